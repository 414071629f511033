"""Security and robustness: authentication before any pickle, refusals, and bad input that harms no one."""

import logging
import os
import random
import socket
import ssl
import threading
import time
import unittest
from unittest import mock

import dopy
import dopy.tcp
from dopy import auth, wire
from tests import netns
from tests.support import MODES, ROOT, TIMEOUT, HubCase, each_mode, logged, raw_client

KEY = b'a key shared by server and client'
UNPICKLED = threading.Event()


def mark_unpickled():
    UNPICKLED.set()


def replies_by_id(sock, count):
    """The next ``count`` frames the server sends on ``sock``, their fields named, by request id (in THRD_FUNC, replies may leave in any order)."""
    decoder = wire.Decoder()
    frames = []
    while len(frames) < count:
        decoder.feed(sock.recv(65536))
        while (frame := decoder.next_frame()) is not None:
            frames.append(wire.Frame._make(frame))
    return {frame.request_id: frame for frame in frames}


class YoursReference:
    """Pickles as a reference to the receiver's own object ``name``, as a proxy does inside a call."""

    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return dopy.proxy.rebuild_yours, (self.name,)


class Trap:
    """Sets UNPICKLED if anyone ever unpickles it."""

    def __reduce__(self):
        return mark_unpickled, ()


class Echo:
    def echo(self, value):
        return value


@each_mode(modes=MODES)
class Authentication(HubCase):
    def setUp(self):
        super().setUp()
        self.hub.addObject('obj', Echo())

    def connect(self, server_key, client_key):
        self.server = dopy.tcp.makeServer(0, hub=self.hub, authkey=server_key)
        return dopy.tcp.remote('127.0.0.1', self.server.port, 'obj', timeout=TIMEOUT,
                               hub=self.client_hub, authkey=client_key)

    def test_the_same_key_on_both_sides(self):
        p = self.connect(KEY, KEY)
        self.addCleanup(dopy.close, p)
        self.assertEqual(p.echo('authenticated'), 'authenticated')

    def test_the_hubs_key_is_the_default(self):
        hub = dopy.Hub(threadMode=dopy.THRD_CONN, authkey=KEY)
        self.addCleanup(hub.shutdown)
        hub.addObject('obj', Echo())
        server = dopy.tcp.makeServer(0, hub=hub)
        p = dopy.tcp.remote('127.0.0.1', server.port, 'obj', timeout=TIMEOUT, hub=hub)
        self.addCleanup(dopy.close, p)
        self.assertEqual(p.echo(1), 1)
        with self.assertRaises(dopy.AuthenticationError):
            dopy.tcp.remote('127.0.0.1', server.port, 'obj', timeout=TIMEOUT, hub=self.client_hub)

    def test_a_wrong_key_is_refused_and_logged_once_by_the_server(self):
        with logged('dopy.auth') as records:
            with self.assertRaisesRegex(dopy.AuthenticationError, 'not the server'):
                self.connect(KEY, b'some other key')
        self.assertEqual(len(records), 1)
        self.assertNotIn(KEY.decode(), records[0].getMessage())

    def test_no_key_against_a_server_that_wants_one(self):
        with logged('dopy.auth'):
            with self.assertRaisesRegex(dopy.AuthenticationError, 'requires an authkey'):
                self.connect(KEY, None)

    def test_a_client_with_a_key_refuses_a_server_without_one(self):
        with self.assertRaisesRegex(dopy.AuthenticationError, 'does not authenticate'):
            self.connect(None, KEY)

    def test_nothing_from_an_unauthenticated_peer_is_unpickled(self):
        UNPICKLED.clear()
        self.server = dopy.tcp.makeServer(0, hub=self.hub, authkey=KEY)
        sock = socket.create_connection(('127.0.0.1', self.server.port), timeout=TIMEOUT)
        self.addCleanup(sock.close)
        greeting = sock.recv(auth.GREETING.size)
        self.assertEqual(greeting[:8], auth.MAGIC)
        with logged('dopy.auth'):
            frame = wire.encode(wire.CALL, 1, ('obj', 'echo', (Trap(),), {}))
            sock.sendall(frame * 4)
            self.assertEqual(sock.recv(10), b'\x00')
        self.assertFalse(UNPICKLED.is_set())

    def test_a_silent_peer_is_dropped_at_the_handshake_deadline_while_others_are_served(self):
        self.server = dopy.tcp.makeServer(0, hub=self.hub, authkey=KEY)
        self.server.handshake_timeout = 0.3
        silent = socket.create_connection(('127.0.0.1', self.server.port), timeout=TIMEOUT)
        self.addCleanup(silent.close)
        p = dopy.tcp.remote('127.0.0.1', self.server.port, 'obj', timeout=TIMEOUT,
                            hub=self.client_hub, authkey=KEY)
        self.addCleanup(dopy.close, p)
        with logged('dopy.auth'):
            self.assertEqual(p.echo('served'), 'served')
            start = time.monotonic()
            silent.recv(auth.GREETING.size)
            self.assertEqual(silent.recv(1), b'')
            self.assertLess(time.monotonic() - start, TIMEOUT)


@each_mode(modes=MODES)
class AllowList(HubCase):
    def test_only_the_exposed_methods_are_called(self):
        class Account:
            def __init__(self):
                self.ran = []

            def balance(self):
                return 10

            def close_account(self):
                self.ran.append('close_account')

        account = Account()
        self.hub.addObject('account', account, expose=['balance'])
        self.server = dopy.tcp.makeServer(0, hub=self.hub)
        p = self.proxy('account')
        self.assertEqual(p.balance(), 10)
        with self.assertRaises(dopy.NoSuchMethodError):
            p.close_account()
        self.assertEqual(account.ran, [])

    def test_an_allow_list_may_be_any_iterable_of_names(self):
        self.hub.addObject('obj', Echo(), expose=(name for name in ['echo']))
        self.server = dopy.tcp.makeServer(0, hub=self.hub)
        self.assertEqual(self.proxy('obj').echo(1), 1)

    def test_bad_allow_lists(self):
        for expose in ('balance', [1], 5):
            with self.subTest(expose=expose), self.assertRaises(TypeError):
                self.hub.addObject('x', object(), expose=expose)


@each_mode(modes=MODES)
class ConnectionLimit(HubCase):
    def test_past_the_limit_new_peers_are_refused_and_the_others_served(self):
        self.hub.addObject('obj', Echo())
        self.server = dopy.tcp.makeServer(0, hub=self.hub, max_connections=2)
        first, second = self.proxy(), self.proxy()
        self.assertEqual(first.echo(1), 1)
        with logged('dopy.auth'):
            # Raised by remote() or, as this hub knows the server as OPEN
            # and sends its first call at once, by that call.
            with self.assertRaisesRegex(dopy.AuthenticationError, 'limit of 2 connections'):
                self.proxy().echo(0)
        self.assertEqual(second.echo(2), 2)
        dopy.close(first)
        self.assertEqual(second.echo(3), 3)
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                third = self.proxy()
                self.assertEqual(third.echo(4), 4)
                break
            except dopy.AuthenticationError:
                # The server notices the closed connection a moment later.
                self.assertLess(time.monotonic() - deadline, 0)

    def test_bad_limits(self):
        for limit in (0, -1, 1.5):
            with self.subTest(limit=limit), self.assertRaises(ValueError):
                dopy.tcp.makeServer(0, hub=self.hub, max_connections=limit)


@each_mode(modes=MODES)
class BadInput(HubCase):
    """Whatever a peer sends, its connection alone is closed, with one log line, and others are served."""

    def setUp(self):
        super().setUp()
        self.p = self.serve(Echo())

    def send_and_expect_close(self, data):
        sock = raw_client(self.server.port)
        self.addCleanup(sock.close)
        with logged('dopy', logging.WARNING) as records:
            sock.sendall(data)
            sock.settimeout(TIMEOUT)
            while True:
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
            self.assertEqual(self.p.echo('still served'), 'still served')
        return [r.getMessage() for r in records]

    def header(self, magic=b'DOPY', version=wire.VERSION, kind=wire.CALL, nbuf=0, length=0):
        return wire.HEADER.pack(magic, version, kind, nbuf, 1, length)

    def test_each_kind_of_bad_frame_closes_only_its_connection(self):
        cases = {
            'wrong magic': b'GET / HTTP/1.1\r\n\r\n',
            'wrong version': self.header(version=99),
            'unknown kind': self.header(kind=200),
            'a frame of 2**60 bytes': self.header(length=2 ** 60),
            'buffer table past the end': self.header(nbuf=5, length=8) + b'x' * 8,
        }
        for what, data in cases.items():
            with self.subTest(what):
                output = self.send_and_expect_close(data)
                self.assertEqual(len([line for line in output if 'closing connection' in line]), 1, output)

    def test_a_release_of_the_wrong_shape_closes_its_connection_with_a_call_behind_it(self):
        call = wire.encode(wire.CALL, 1, ('obj', 'echo', ('behind',), {}))
        cases = {
            'not a list': 5,
            'an item too short': [('x',)],
            'a name that is not a str': [([], 1)],
            'a count that is not an int': [('#1', 'one')],
            'a count below one': [('#1', 0)],
            'a pickle that does not load': None,
        }
        for what, releases in cases.items():
            with self.subTest(what):
                if releases is None:
                    release = b''.join(wire.frame_segments(
                        wire.RELEASE, 0, b'\x80\x05cbuiltins\nnothing_here\n)R.'))
                else:
                    release = wire.encode(wire.RELEASE, 0, releases)
                output = self.send_and_expect_close(release + call)
                closing = [line for line in output if 'closing connection' in line]
                self.assertEqual(len(closing), 1, output)
                self.assertIn('RELEASE', closing[0])

    def test_a_pickle_that_raises_on_load_is_an_error_reply_and_the_connection_lives(self):
        sock = raw_client(self.server.port)
        self.addCleanup(sock.close)
        bad = b'\x80\x05cbuiltins\nnothing_here\n)R.'
        sock.sendall(b''.join(wire.frame_segments(wire.CALL, 7, bad)) +
                     wire.encode(wire.CALL, 8, ('obj', 'echo', ('after',), {})))
        replies = replies_by_id(sock, 2)
        self.assertEqual(sorted(replies), [7, 8])
        self.assertEqual(replies[7].kind, wire.ERROR)
        self.assertEqual((replies[8].kind, wire.loads(replies[8].data)), (wire.REPLY, 'after'))

    def test_a_oneway_call_gets_no_reply_whatever_its_method_returns_or_raises(self):
        sock = raw_client(self.server.port)
        self.addCleanup(sock.close)

        def frame(kind, request_id, *args):
            return wire.encode(kind, request_id, ('obj', 'echo', args, {}))
        # The first call has the server check echo, so that the oneway
        # calls after it take its common path.
        sock.sendall(frame(wire.CALL, 1, 'first') +
                     frame(wire.ONEWAY, 2, 'a plain value') +
                     frame(wire.ONEWAY, 3, ['a', 'list']) +
                     frame(wire.ONEWAY, 4) +  # echo() raises TypeError
                     wire.encode(wire.ONEWAY, 5, ('obj', 'nothing', (), {})) +
                     frame(wire.CALL, 6, 'last'))
        replies = replies_by_id(sock, 2)
        self.assertEqual(sorted(replies), [1, 6])
        self.assertEqual(wire.loads(replies[6].data), 'last')

    def test_a_reference_in_a_frame_not_flagged_for_references_is_an_error_reply(self):
        sock = raw_client(self.server.port)
        self.addCleanup(sock.close)
        # What the server's own object pickles to, sent back, but outside
        # any connection's context: the frame does not say it may hold one.
        sock.sendall(wire.encode(wire.CALL, 7, ('obj', 'echo', (YoursReference('obj'),), {})) +
                     wire.encode(wire.CALL, 8, ('obj', 'echo', ('after',), {})))
        replies = replies_by_id(sock, 2)
        self.assertEqual(replies[7].kind, wire.ERROR)
        self.assertEqual((replies[8].kind, wire.loads(replies[8].data)), (wire.REPLY, 'after'))

    def test_seeded_fuzz(self):
        rng = random.Random(5)
        valid = wire.encode(wire.CALL, 1, ('obj', 'echo', ('fuzz',), {}))
        inputs = []
        for i in range(1500):
            choice = i % 3
            if choice == 0:
                data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))
            elif choice == 1:
                data = bytearray(valid)
                for _ in range(rng.randrange(1, 6)):
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
                data = bytes(data)
            else:
                data = valid[:rng.randrange(1, len(valid))]
            inputs.append(data)
        sockets = []
        try:
            for data in inputs[:200]:
                sock = raw_client(self.server.port)
                sockets.append(sock)
                sock.sendall(data)
            for sock in sockets:
                sock.close()
            stream = raw_client(self.server.port)
            sockets = [stream]
            stream.sendall(b''.join(inputs[200:]))
            stream.close()
        finally:
            for sock in sockets:
                sock.close()
        for i in range(20):
            self.assertEqual(self.p.echo(i), i)

    def test_a_half_frame_then_silence_does_not_hold_up_others(self):
        sock = raw_client(self.server.port)
        self.addCleanup(sock.close)
        sock.sendall(wire.encode(wire.CALL, 1, ('obj', 'echo', ('x' * 1000,), {}))[:500])
        start = time.monotonic()
        for i in range(50):
            self.assertEqual(self.p.echo(i), i)
        self.assertLess(time.monotonic() - start, TIMEOUT)


CERTS = os.path.join(ROOT, 'tests', 'certs')


def server_context(require_client_cert=False):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.path.join(CERTS, 'server.pem'), os.path.join(CERTS, 'server.key'))
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(os.path.join(CERTS, 'ca.pem'))
    return context


def client_context(with_cert=False, trust=True):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if trust:
        context.load_verify_locations(os.path.join(CERTS, 'ca.pem'))
    if with_cert:
        context.load_cert_chain(os.path.join(CERTS, 'client.pem'), os.path.join(CERTS, 'client.key'))
    return context


@each_mode(modes=MODES)
class Tls(HubCase):
    def setUp(self):
        super().setUp()
        self.hub.addObject('obj', Echo())

    def connect(self, server_ctx, client_ctx, server_key=None, client_key=None, host='localhost'):
        self.server = dopy.tcp.makeServer(0, hub=self.hub, ssl_context=server_ctx, authkey=server_key)
        p = dopy.tcp.remote(host, self.server.port, 'obj', timeout=TIMEOUT, hub=self.client_hub,
                            ssl_context=client_ctx, authkey=client_key)
        self.addCleanup(dopy.close, p)
        return p

    def test_calls_futures_and_large_payloads_over_tls(self):
        p = self.connect(server_context(), client_context())
        self.assertEqual(p.echo('secret'), 'secret')
        blob = os.urandom(3 << 20)
        self.assertEqual(p.echo(blob), blob)
        futures = [p.echo.future(i) for i in range(200)]
        self.assertEqual([f.result(TIMEOUT) for f in futures], list(range(200)))

    def test_a_tls_proxy_reconnects_before_its_next_call_after_a_server_restart(self):
        p = self.connect(server_context(), client_context())
        self.assertEqual(p.echo(1), 1)
        port = self.server.port
        self.server.close()
        self.server = dopy.tcp.makeServer(port, hub=self.hub, ssl_context=server_context())
        # As if the check interval had passed since the last call: the
        # hang-up is seen before anything is sent, and no call fails.
        with mock.patch('dopy.proxy.HANG_UP_CHECK_INTERVAL', 0):
            self.assertEqual(p.echo(2), 2)

    def test_client_certificates_and_an_authkey_combine(self):
        p = self.connect(server_context(require_client_cert=True), client_context(with_cert=True),
                         KEY, KEY, host='127.0.0.1')
        self.assertEqual(p.echo('both'), 'both')

    def test_a_client_without_the_required_certificate_is_refused(self):
        with logged('dopy.auth'):
            with self.assertRaises(dopy.CommunicationError):
                self.connect(server_context(require_client_cert=True), client_context())

    def test_a_server_certificate_the_client_does_not_trust_is_refused(self):
        with logged('dopy.auth'):
            with self.assertRaisesRegex(dopy.AuthenticationError, 'certificate'):
                self.connect(server_context(), client_context(trust=False))

    def test_a_plain_client_meets_a_tls_server(self):
        # Each waits for the other to speak first, until the server's handshake deadline.
        self.server = dopy.tcp.makeServer(0, hub=self.hub, ssl_context=server_context())
        self.server.handshake_timeout = 0.3
        with logged('dopy.auth'):
            with self.assertRaises(dopy.CommunicationError):
                dopy.tcp.remote('localhost', self.server.port, 'obj', timeout=TIMEOUT,
                                hub=self.client_hub)

    def test_the_hubs_tls_context_serves_reference_strings_and_remote(self):
        self.server = dopy.tcp.makeServer(0, hub=self.hub, ssl_context=server_context())
        reference = f'tcp:localhost:{self.server.port}:obj'
        plain = self.client_hub.makeRemoteObject(reference, timeout=0.5, connect=False)
        self.addCleanup(dopy.close, plain)
        with logged('dopy.auth'), self.assertRaises(dopy.CommunicationError):
            plain.echo('no TLS')
        tls_hub = dopy.Hub(threadMode=self.thread_mode, ssl_context=client_context())
        self.addCleanup(tls_hub.shutdown)
        by_reference = tls_hub.makeRemoteObject(reference, timeout=TIMEOUT)
        self.addCleanup(dopy.close, by_reference)
        self.assertEqual(by_reference.echo('over TLS'), 'over TLS')
        by_remote = dopy.tcp.remote('localhost', self.server.port, 'obj', timeout=TIMEOUT, hub=tls_hub)
        self.addCleanup(dopy.close, by_remote)
        self.assertEqual(by_remote.echo('also'), 'also')

    def test_closing_the_server_mid_tls_handshake_fails_no_thread(self):
        self.server = dopy.tcp.makeServer(0, hub=self.hub, ssl_context=server_context())
        errors = []
        old_hook = threading.excepthook
        threading.excepthook = errors.append
        self.addCleanup(setattr, threading, 'excepthook', old_hook)
        # A client that sends its hello and stops once the server has answered:
        # the server is then inside its handshake, waiting for the rest.
        outgoing = ssl.MemoryBIO()
        hello = client_context().wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname='localhost')
        with self.assertRaises(ssl.SSLWantReadError):
            hello.do_handshake()
        with socket.create_connection(('127.0.0.1', self.server.port), timeout=TIMEOUT) as sock:
            sock.sendall(outgoing.read())
            self.assertTrue(sock.recv(1))
            self.server.close()
        self.assertEqual(errors, [])
        self.assertEqual(self.hub.stats()['connections'], 0)


NETNS_REASON = netns.unavailable()


@unittest.skipIf(NETNS_REASON, NETNS_REASON)
class AcrossHosts(unittest.TestCase):
    """Three hosts in network namespaces, so that traffic crosses a real network stack."""

    SERVER = '''
import os, ssl, sys, dopy, dopy.tcp
class Echo:
    def echo(self, value):
        return value
    def slow(self, seconds):
        import time; time.sleep(seconds); return seconds
key = sys.argv[1].encode() if len(sys.argv) > 1 and sys.argv[1] else None
context = None
if len(sys.argv) > 2:
    certs = sys.argv[2]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(os.path.join(certs, 'server.pem'), os.path.join(certs, 'server.key'))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(os.path.join(certs, 'ca.pem'))
hub = dopy.getHub()
hub.addObject('obj', Echo())
server = dopy.tcp.makeServer(0, host='', authkey=key, ssl_context=context)
print(server.port, flush=True)
sys.stdin.read()
hub.shutdown()
'''

    CLIENT = '''
import os, ssl, sys, time, dopy, dopy.tcp
host, port, key = sys.argv[1], int(sys.argv[2]), (sys.argv[3].encode() if sys.argv[3] else None)
context = None
if os.environ.get('CERTS'):
    certs = os.environ['CERTS']
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # The test certificate names localhost, not these hosts' addresses: check the chain only.
    context.check_hostname = False
    context.load_verify_locations(os.path.join(certs, 'ca.pem'))
    context.load_cert_chain(os.path.join(certs, 'client.pem'), os.path.join(certs, 'client.key'))
try:
    p = dopy.tcp.remote(host, port, 'obj', timeout=3, authkey=key, ssl_context=context)
    print('ok', p.echo('across'), flush=True)
    if len(sys.argv) > 4:
        print('calling', flush=True)
        start = time.monotonic()
        try:
            p.slow(60)
        except dopy.CommunicationError as exc:
            print('failed after', round(time.monotonic() - start, 1), type(exc).__name__, flush=True)
except dopy.DopyError as exc:
    print('error', type(exc).__name__, exc, flush=True)
'''

    def start_server(self, host, key='', *extra):
        proc = host.python('-c', self.SERVER, key, *extra)
        self.addCleanup(proc.kill)
        return proc, int(proc.stdout.readline())

    def run_client(self, host, server_host, port, key='', *extra, **kwargs):
        proc = host.python('-c', self.CLIENT, server_host.ip, str(port), key, *extra, **kwargs)
        out, _ = proc.communicate(timeout=TIMEOUT * 2)
        return out

    def test_protected_mode_refuses_another_host_and_a_key_lets_it_in(self):
        with netns.Network(3) as net:
            server_host, client_host, _ = net.hosts
            _, port = self.start_server(server_host)
            out = self.run_client(client_host, server_host, port)
            self.assertIn('error AuthenticationError', out)
            self.assertIn('only clients on its own machine', out)
            _, keyed_port = self.start_server(server_host, 'shared')
            self.assertIn('ok across', self.run_client(client_host, server_host, keyed_port, 'shared'))
            self.assertIn('error AuthenticationError',
                          self.run_client(client_host, server_host, keyed_port, 'wrong'))

    def test_tls_with_client_certificates_between_hosts(self):
        with netns.Network(3) as net:
            server_host, client_host, _ = net.hosts
            _, port = self.start_server(server_host, '', CERTS)
            with_certs = dict(netns._child_env(), CERTS=CERTS)
            self.assertIn('ok across', self.run_client(client_host, server_host, port, env=with_certs))
            self.assertIn('error', self.run_client(client_host, server_host, port))

    def test_a_cut_link_fails_the_call_within_its_timeout(self):
        with netns.Network(3) as net:
            server_host, client_host, _ = net.hosts
            _, port = self.start_server(server_host, 'shared')
            proc = client_host.python('-c', self.CLIENT, server_host.ip, str(port), 'shared', 'slow')
            self.assertIn('ok across', proc.stdout.readline())
            self.assertEqual(proc.stdout.readline().strip(), 'calling')
            server_host.cut()
            out, _ = proc.communicate(timeout=TIMEOUT * 2)
            self.assertIn('CallTimeoutError', out)
            self.assertLess(float(out.split()[2]), TIMEOUT)


if __name__ == '__main__':
    unittest.main()
