"""The handshake: the state machines without sockets, the drivers over socket pairs, the helpers, the test certificates."""

import hashlib
import hmac
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
import unittest
from unittest import mock

from dopy import auth, wire
from dopy.errors import (AuthenticationError, CallTimeoutError, CommunicationError,
                         ConnectionLostError, ProtocolError)
from tests.support import ROOT, TIMEOUT, Case

KEY = b'the right key'
CERTS = os.path.join(ROOT, 'tests', 'certs')


def pump(server, client, step=1, wanted_seen=None):
    """Carry bytes both ways between two handshakes, ``step`` bytes at a time, as the drivers do.

    Never feeds a side more than it wants.  Records every ``wanted`` of the
    server in ``wanted_seen``.  The client's exceptions propagate.
    """
    to_client, to_server = server.initial(), client.initial()
    while to_client or to_server:
        if to_server:
            if wanted_seen is not None:
                wanted_seen.append(server.wanted)
            n = min(step, server.wanted)
            if not n:
                raise AssertionError(f'the server wants no more, yet {to_server!r} is left for it')
            to_client += server.feed(to_server[:n])
            to_server = to_server[n:]
        if to_client:
            n = min(step, client.wanted)
            if not n:
                raise AssertionError(f'the client wants no more, yet {to_client!r} is left for it')
            to_server += client.feed(to_client[:n])
            to_client = to_client[n:]


def greeting(mode=auth.AUTH, magic=auth.MAGIC, version=auth.VERSION, reserved=0,
             challenge=None):
    if challenge is None:
        challenge = os.urandom(32) if mode == auth.AUTH else bytes(32)
    return struct.pack('!8sBBH32s', magic, version, mode, reserved, challenge)


def client_after_greeting(key, data):
    """A client fed ``data`` as the server's greeting; returns (client, its answer)."""
    client = auth.ClientHandshake(key)
    client.initial()
    return client, client.feed(data)


class GreetingLayout(unittest.TestCase):
    def test_auth_greeting_is_44_bytes_at_the_documented_offsets(self):
        data = auth.ServerHandshake(KEY).initial()
        self.assertEqual(len(data), 44)
        self.assertEqual(data[0:8], b'DOPYHELO')
        self.assertEqual(data[8], 1)
        self.assertEqual(data[9], auth.AUTH)
        self.assertEqual(data[10:12], b'\x00\x00')
        self.assertNotEqual(data[12:44], bytes(32))

    def test_open_greeting_has_a_zero_challenge_and_is_done(self):
        server = auth.ServerHandshake(None)
        data = server.initial()
        self.assertEqual(data, b'DOPYHELO\x01\x00\x00\x00' + bytes(32))
        self.assertTrue(server.done)
        self.assertEqual(server.wanted, 0)

    def test_refused_greeting_carries_the_message_and_fails(self):
        server = auth.ServerHandshake(None, refusal='go away, ünd set a key')
        data = server.initial()
        message = 'go away, ünd set a key'.encode('utf-8')
        self.assertEqual(data[:12], b'DOPYHELO\x01\x02\x00\x00')
        self.assertEqual(data[12:44], bytes(32))
        self.assertEqual(struct.unpack('!H', data[44:46])[0], len(message))
        self.assertEqual(data[46:], message)
        self.assertTrue(server.failed)
        self.assertFalse(server.done)
        self.assertEqual(server.wanted, 0)
        self.assertIsInstance(server.error, AuthenticationError)

    def test_challenges_are_fresh(self):
        challenges = {auth.ServerHandshake(KEY).initial()[12:] for _ in range(20)}
        self.assertEqual(len(challenges), 20)
        answers = {client_after_greeting(KEY, greeting(challenge=b'c' * 32))[1][:32]
                   for _ in range(20)}
        self.assertEqual(len(answers), 20)

    def test_answer_and_verdict_are_the_documented_hmacs(self):
        server = auth.ServerHandshake(KEY)
        hello = server.initial()
        cs = hello[12:44]
        client, answer = client_after_greeting(KEY, hello)
        self.assertEqual(len(answer), 64)
        cc = answer[:32]
        self.assertEqual(answer[32:], hmac.new(KEY, b'DOPY-C' + cs + cc, hashlib.sha256).digest())
        verdict = server.feed(answer)
        self.assertEqual(len(verdict), 33)
        self.assertEqual(verdict[:1], b'\x01')
        self.assertEqual(verdict[1:], hmac.new(KEY, b'DOPY-S' + cc + cs, hashlib.sha256).digest())
        self.assertTrue(server.done)
        self.assertEqual(client.feed(verdict), b'')
        self.assertTrue(client.done)


class Handshakes(unittest.TestCase):
    """Both state machines, fed one byte at a time unless said otherwise."""

    def test_right_key(self):
        for step in (1, 7, 1000):
            server, client = auth.ServerHandshake(KEY), auth.ClientHandshake(bytearray(KEY))
            pump(server, client, step)
            self.assertTrue(server.done and client.done, step)
            self.assertFalse(server.failed or client.failed)
            self.assertIsNone(client.error)
            self.assertEqual(client.server_mode, auth.AUTH)

    def test_no_key_meets_open_server(self):
        server, client = auth.ServerHandshake(None), auth.ClientHandshake(None)
        pump(server, client)
        self.assertTrue(server.done and client.done)
        self.assertEqual(client.server_mode, auth.OPEN)

    def test_wrong_key_is_refused_by_the_server(self):
        server, client = auth.ServerHandshake(KEY), auth.ClientHandshake(b'a wrong key')
        with self.assertRaisesRegex(AuthenticationError, 'rejected the authkey'):
            pump(server, client)
        self.assertTrue(server.failed and client.failed)
        self.assertIsInstance(server.error, AuthenticationError)
        self.assertEqual(server.wanted, 0)

    def test_server_without_the_key_is_caught_by_the_client(self):
        # A fake server that accepts any answer but cannot prove it knows the key.
        client, answer = client_after_greeting(KEY, greeting())
        self.assertEqual(len(answer), 64)
        with self.assertRaisesRegex(AuthenticationError, 'did not prove it knows the authkey'):
            for byte in b'\x01' + os.urandom(32):
                client.feed(bytes([byte]))
        self.assertTrue(client.failed)

    def test_server_with_another_key_is_caught_by_the_client(self):
        # A fake server that says yes to anything, proving with its own key.
        hello = greeting()
        client, answer = client_after_greeting(KEY, hello)
        proof = hmac.new(b'other', b'DOPY-S' + answer[:32] + hello[12:], hashlib.sha256).digest()
        with self.assertRaises(AuthenticationError):
            client.feed(b'\x01' + proof)

    def test_a_recorded_answer_does_not_open_another_session(self):
        server = auth.ServerHandshake(KEY)
        _, answer = client_after_greeting(KEY, server.initial())
        replayed = auth.ServerHandshake(KEY)
        replayed.initial()
        self.assertEqual(replayed.feed(answer), b'\x00')
        self.assertTrue(replayed.failed)

    def test_client_with_key_refuses_open_server(self):
        server, client = auth.ServerHandshake(None), auth.ClientHandshake(KEY)
        with self.assertRaisesRegex(AuthenticationError, 'could be anyone'):
            pump(server, client)
        self.assertTrue(client.failed)

    def test_client_without_key_meets_auth_server(self):
        server, client = auth.ServerHandshake(KEY), auth.ClientHandshake(None)
        with self.assertRaisesRegex(AuthenticationError, 'requires an authkey'):
            pump(server, client)
        self.assertFalse(server.done)

    def test_a_call_sent_early_to_an_auth_server_is_told_apart_from_a_wrong_key(self):
        server = auth.ServerHandshake(KEY)
        server.initial()
        call = wire.encode(wire.CALL, 1, ('obj', 'echo', (b'x' * 64,), {}))
        self.assertEqual(server.feed(call), b'\x00')
        self.assertTrue(server.failed)
        self.assertRegex(str(server.error), 'no authkey.*sent a call')

    def test_refusal_reaches_the_client_with_its_message(self):
        message = 'only loopback peers: set an authkey'
        for server_key in (None, KEY):
            for client_key in (None, KEY):
                server = auth.ServerHandshake(server_key, refusal=message)
                with self.assertRaisesRegex(AuthenticationError, 'refused.*' + message):
                    pump(server, auth.ClientHandshake(client_key))
                self.assertTrue(server.failed)

    def test_empty_and_largest_refusals(self):
        for message in ('', 'x' * 1024):
            with self.assertRaises(AuthenticationError) as caught:
                pump(auth.ServerHandshake(None, refusal=message), auth.ClientHandshake(None))
            self.assertTrue(str(caught.exception).endswith(message))

    def test_oversize_refusal_is_refused_on_both_sides(self):
        with self.assertRaises(ValueError):
            auth.ServerHandshake(None, refusal='x' * 1025)
        with self.assertRaises(ValueError):
            auth.ServerHandshake(None, refusal='é' * 513)  # 1026 bytes in UTF-8
        with self.assertRaises(TypeError):
            auth.ServerHandshake(None, refusal=b'bytes')
        client, _ = client_after_greeting(None, greeting(auth.REFUSED))
        self.assertEqual(client.wanted, 2)
        with self.assertRaisesRegex(ProtocolError, '1025 bytes'):
            client.feed(struct.pack('!H', 1025))

    def test_bad_magic_is_caught_at_the_first_wrong_byte(self):
        client = auth.ClientHandshake(KEY)
        client.initial()
        with self.assertRaisesRegex(ProtocolError, 'not a DOPY server'):
            client.feed(b'S')
        client = auth.ClientHandshake(None)
        client.initial()
        client.feed(b'DOPY')
        with self.assertRaises(ProtocolError):
            client.feed(b'\x01\x00\x00\x00')  # a DOPY frame header, not a greeting

    def test_malformed_greetings(self):
        for bad in (greeting(version=2), greeting(mode=3), greeting(reserved=1),
                    greeting(auth.OPEN, challenge=b'c' * 32),
                    greeting(auth.REFUSED, challenge=b'c' * 32)):
            for key in (None, KEY):
                client = auth.ClientHandshake(key)
                client.initial()
                with self.assertRaises(ProtocolError, msg=bad):
                    for byte in bad:
                        client.feed(bytes([byte]))
                self.assertTrue(client.failed)

    def test_verdict_other_than_0_or_1(self):
        client, _ = client_after_greeting(KEY, greeting())
        with self.assertRaises(ProtocolError):
            client.feed(b'\x02')

    def test_the_server_never_wants_more_than_64_bytes(self):
        seen = []
        pump(auth.ServerHandshake(KEY), auth.ClientHandshake(KEY), wanted_seen=seen)
        self.assertTrue(seen)
        self.assertLessEqual(max(seen), 64)
        server = auth.ServerHandshake(KEY)
        server.initial()
        self.assertEqual(server.wanted, 64)
        for i in range(63):
            server.feed(b'\xff')
            self.assertEqual(server.wanted, 63 - i)
        self.assertEqual(server.feed(b'\xff' * 1000), b'\x00')
        self.assertTrue(server.failed)
        self.assertEqual(server.wanted, 0)
        self.assertEqual(server.unused, b'')

    def test_the_client_never_wants_past_the_handshake(self):
        server, client = auth.ServerHandshake(KEY), auth.ClientHandshake(KEY)
        self.assertEqual(client.initial(), b'')
        self.assertEqual(client.wanted, 44)
        answer = client.feed(server.initial())
        self.assertEqual(client.wanted, 1)
        verdict = server.feed(answer)
        client.feed(verdict[:1])
        self.assertEqual(client.wanted, 32)
        client.feed(verdict[1:])
        self.assertEqual(client.wanted, 0)

    def test_bytes_past_the_handshake_are_left_unused(self):
        server, client = auth.ServerHandshake(KEY), auth.ClientHandshake(KEY)
        client.initial()
        answer = client.feed(server.initial())
        verdict = server.feed(answer + b'frames')
        self.assertTrue(server.done)
        self.assertEqual(server.unused, b'frames')
        client.feed(verdict + b'more')
        self.assertTrue(client.done)
        self.assertEqual(client.unused, b'more')

    def test_feeding_out_of_turn(self):
        server = auth.ServerHandshake(KEY)
        with self.assertRaises(ValueError):
            server.feed(b'x')
        server.initial()
        with self.assertRaises(ValueError):
            server.initial()
        done = auth.ServerHandshake(None)
        done.initial()
        with self.assertRaises(ValueError):
            done.feed(b'x')

    def test_keys_must_be_non_empty_bytes(self):
        for bad in ('text', 12, ['k']):
            with self.assertRaises(TypeError):
                auth.ServerHandshake(bad)
            with self.assertRaises(TypeError):
                auth.ClientHandshake(bad)
        for empty in (b'', bytearray()):
            with self.assertRaises(ValueError):
                auth.ServerHandshake(empty)
            with self.assertRaises(ValueError):
                auth.ClientHandshake(empty)
        self.assertEqual(auth.check_authkey(bytearray(b'k')), b'k')
        self.assertIsNone(auth.check_authkey(None))


class Background:
    """A function run in a thread; ``join`` waits for it (bounded) and gives its outcome."""

    def __init__(self, fn, *args):
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self.thread.start()

    def _run(self, fn, args):
        try:
            self.result = fn(*args)
        except BaseException as exc:
            self.error = exc

    def join(self):
        self.thread.join(TIMEOUT)
        if self.thread.is_alive():
            raise AssertionError('the background thread did not finish in time')
        return self


def deadline(seconds=TIMEOUT):
    return time.monotonic() + seconds


class Drivers(Case):
    """server_handshake and client_handshake over a socket pair, the server in a thread."""

    def setUp(self):
        super().setUp()
        self.server_sock, self.client_sock = socket.socketpair()
        self.addCleanup(self.server_sock.close)
        self.addCleanup(self.client_sock.close)

    def handshake(self, server_key, client_key, refusal=None):
        """Both drivers at once; returns (server outcome, client error)."""
        server = Background(auth.server_handshake, self.server_sock, server_key, refusal,
                            deadline())
        client_error = None
        try:
            auth.client_handshake(self.client_sock, client_key, deadline())
        except Exception as exc:
            client_error = exc
            # What a client does after a failed handshake: it hangs up.
            self.client_sock.close()
        return server.join(), client_error

    def test_right_key_and_frames_follow(self):
        with self.assertNoLogs('dopy.auth'):
            server, error = self.handshake(KEY, KEY)
        self.assertIsNone(server.error)
        self.assertIsNone(error)
        self.client_sock.sendall(b'a frame')
        self.server_sock.settimeout(TIMEOUT)
        self.assertEqual(self.server_sock.recv(100), b'a frame')

    def test_open_server_and_client_without_key(self):
        server, error = self.handshake(None, None)
        self.assertIsNone(server.error)
        self.assertIsNone(error)

    def test_wrong_key_fails_both_sides_and_logs_one_line_without_the_key(self):
        with self.assertLogs('dopy.auth', 'WARNING') as logs:
            server, error = self.handshake(KEY, b'Zq-7-not-it')
        self.assertIsInstance(error, AuthenticationError)
        self.assertIsInstance(server.error, AuthenticationError)
        self.assertEqual(len(logs.records), 1)
        self.assertIn('the peer', logs.output[0])
        self.assertNotIn(KEY.decode(), logs.output[0])
        self.assertNotIn('Zq-7-not-it', logs.output[0])

    def test_client_without_key(self):
        with self.assertLogs('dopy.auth', 'WARNING') as logs:
            server, error = self.handshake(KEY, None)
        self.assertIsInstance(error, AuthenticationError)
        self.assertIsInstance(server.error, ConnectionLostError)
        self.assertEqual(len(logs.records), 1)

    def test_client_with_key_meets_open_server(self):
        server, error = self.handshake(None, KEY)
        self.assertIsInstance(error, AuthenticationError)
        self.assertIsNone(server.error)  # the open server is done; the client hangs up

    def test_refusal(self):
        with self.assertLogs('dopy.auth', 'WARNING') as logs:
            server, error = self.handshake(None, None, refusal='not from there')
        self.assertIsInstance(error, AuthenticationError)
        self.assertIn('not from there', str(error))
        self.assertIsInstance(server.error, AuthenticationError)
        self.assertEqual(len(logs.records), 1)

    def test_client_deadline_passes_when_the_server_says_nothing(self):
        start = time.monotonic()
        with self.assertRaises(CallTimeoutError):
            auth.client_handshake(self.client_sock, KEY, deadline(0.2))
        self.assertLess(time.monotonic() - start, 2)

    def test_server_deadline_passes_when_the_client_says_nothing(self):
        start = time.monotonic()
        with self.assertLogs('dopy.auth', 'WARNING'):
            with self.assertRaises(CallTimeoutError):
                auth.server_handshake(self.server_sock, KEY, None, deadline(0.2))
        self.assertLess(time.monotonic() - start, 2)

    def test_a_deadline_already_passed(self):
        with self.assertRaises(CallTimeoutError):
            auth.client_handshake(self.client_sock, None, time.monotonic() - 1)

    def test_peer_hangs_up_mid_greeting(self):
        self.server_sock.sendall(greeting()[:20])
        self.server_sock.close()
        with self.assertRaises(ConnectionLostError):
            auth.client_handshake(self.client_sock, KEY, deadline())

    def test_client_reads_nothing_past_the_handshake(self):
        # The whole OPEN greeting and a frame behind it, in the socket at once.
        self.server_sock.sendall(greeting(auth.OPEN) + b'the first frame')
        auth.client_handshake(self.client_sock, None, deadline())
        self.client_sock.settimeout(TIMEOUT)
        self.assertEqual(self.client_sock.recv(100), b'the first frame')

    def test_auth_client_reads_nothing_past_the_handshake(self):
        fake = auth.ServerHandshake(KEY)
        self.server_sock.sendall(fake.initial())
        client = Background(auth.client_handshake, self.client_sock, KEY, deadline())
        self.server_sock.settimeout(TIMEOUT)
        answer = b''
        while len(answer) < 64:
            answer += self.server_sock.recv(64 - len(answer))
        self.server_sock.sendall(fake.feed(answer) + b'the first frame')
        self.assertIsNone(client.join().error)
        self.client_sock.settimeout(TIMEOUT)
        self.assertEqual(self.client_sock.recv(100), b'the first frame')

    def test_server_reads_nothing_past_the_handshake(self):
        server = Background(auth.server_handshake, self.server_sock, KEY, None, deadline())
        self.client_sock.settimeout(TIMEOUT)
        hello = self.client_sock.recv(44)
        client, answer = client_after_greeting(KEY, hello)
        self.client_sock.sendall(answer + b'the first frame')
        self.assertIsNone(server.join().error)
        verdict = self.client_sock.recv(33)
        client.feed(verdict)
        self.assertTrue(client.done)
        self.server_sock.settimeout(TIMEOUT)
        self.assertEqual(self.server_sock.recv(100), b'the first frame')

    def test_the_socket_timeout_is_restored(self):
        self.server_sock.settimeout(3.5)
        self.client_sock.setblocking(False)
        self.handshake(KEY, KEY)
        self.assertEqual(self.server_sock.gettimeout(), 3.5)
        self.assertEqual(self.client_sock.gettimeout(), 0.0)

    def test_a_closed_socket_is_a_communication_error(self):
        self.client_sock.close()
        with self.assertLogs('dopy.auth', 'WARNING'):
            with self.assertRaises(CommunicationError):
                auth.server_handshake(self.server_sock, KEY, None, deadline())


def tls_contexts():
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(os.path.join(CERTS, 'server.pem'), os.path.join(CERTS, 'server.key'))
    server.load_verify_locations(os.path.join(CERTS, 'ca.pem'))
    server.verify_mode = ssl.CERT_REQUIRED
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_verify_locations(os.path.join(CERTS, 'ca.pem'))
    client.load_cert_chain(os.path.join(CERTS, 'client.pem'), os.path.join(CERTS, 'client.key'))
    return server, client


def tls_pair(server_context, client_context, hostname='localhost'):
    """A socket pair with TLS on both ends, handshaken; the server's end first."""
    a, b = socket.socketpair()
    for sock in (a, b):
        sock.settimeout(TIMEOUT)
    server = Background(server_context.wrap_socket, a, True)
    try:
        client = client_context.wrap_socket(b, server_hostname=hostname)
    except BaseException:
        a.close()
        b.close()
        server.join()
        raise
    server.join()
    if server.error is not None:
        client.close()
        a.close()
        raise server.error
    return server.result, client


class CertificatesWork(Case):
    """The certificates in tests/certs make a mutually authenticated TLS link."""

    def test_mutual_tls_handshake(self):
        server_context, client_context = tls_contexts()
        for hostname in ('localhost', '127.0.0.1', '::1'):
            server, client = tls_pair(server_context, client_context, hostname)
            with server, client:
                subject = dict(item[0] for item in server.getpeercert()['subject'])
                self.assertEqual(subject['commonName'], 'dopy-test-client')
                client.sendall(b'ping')
                self.assertEqual(server.recv(4), b'ping')

    def test_server_refuses_a_client_without_a_certificate(self):
        server_context, _ = tls_contexts()
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.load_verify_locations(os.path.join(CERTS, 'ca.pem'))
        a, b = socket.socketpair()
        a.settimeout(TIMEOUT)
        b.settimeout(TIMEOUT)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        server = Background(server_context.wrap_socket, a, True)
        with self.assertRaises(OSError):  # ssl.SSLError is one
            with bare.wrap_socket(b, server_hostname='localhost') as client:
                client.recv(1)  # TLS 1.3 tells the client only after its handshake
        self.assertIsInstance(server.join().error, ssl.SSLError)

    def test_handshake_over_tls(self):
        server_context, client_context = tls_contexts()
        server, client = tls_pair(server_context, client_context)
        self.addCleanup(server.close)
        self.addCleanup(client.close)
        # The whole exchange and a frame behind the verdict: the client
        # reads the verdict from TLS records that also hold the frame.
        background = Background(auth.server_handshake, server, KEY, None, deadline())
        auth.client_handshake(client, KEY, deadline())
        self.assertIsNone(background.join().error)
        client.sendall(b'the first frame')
        self.assertEqual(server.recv(100), b'the first frame')
        fake = auth.ServerHandshake(KEY)
        server.sendall(fake.initial())
        client.setblocking(False)
        background = Background(auth.client_handshake, client, KEY, deadline())
        answer = b''
        while len(answer) < 64:
            answer += server.recv(64 - len(answer))
        server.sendall(fake.feed(answer) + b'after')
        self.assertIsNone(background.join().error)
        client.settimeout(TIMEOUT)
        self.assertEqual(client.recv(100), b'after')


class IsLoopback(unittest.TestCase):
    def test_loopback(self):
        for address in ('127.0.0.1', '127.1.2.3', '127.255.255.254', '::1', '::ffff:127.0.0.1',
                        '::ffff:127.9.9.9', ('127.0.0.1', 5000), ('::1', 5000, 0, 0)):
            self.assertTrue(auth.is_loopback(address), address)

    def test_not_loopback(self):
        for address in ('10.231.0.1', '192.168.1.1', '0.0.0.0', '::', '::ffff:10.0.0.1',
                        'fe80::1%eth0', '128.0.0.1', 'localhost', '', 'not an address', None,
                        (), ('10.0.0.1', 5000), b'127.0.0.1', '::2'):
            self.assertFalse(auth.is_loopback(address), address)


class AuthkeyHelpers(Case):
    def key_file(self, content, mode=0o600):
        fd, path = tempfile.mkstemp()
        self.addCleanup(os.unlink, path)
        with os.fdopen(fd, 'wb') as f:
            f.write(content)
        os.chmod(path, mode)
        return path

    def test_file_loses_one_trailing_newline(self):
        self.assertEqual(auth.read_authkey_file(self.key_file(b'secret\n')), b'secret')
        self.assertEqual(auth.read_authkey_file(self.key_file(b'secret\r\n')), b'secret')
        self.assertEqual(auth.read_authkey_file(self.key_file(b'secret\n\n')), b'secret\n')
        self.assertEqual(auth.read_authkey_file(self.key_file(b'\x00\xffbin')), b'\x00\xffbin')

    def test_empty_file_is_an_error(self):
        for content in (b'', b'\n'):
            with self.assertRaisesRegex(ValueError, 'empty'):
                auth.read_authkey_file(self.key_file(content))

    def test_missing_file_is_an_os_error(self):
        with self.assertRaises(FileNotFoundError):
            auth.read_authkey_file(os.path.join(tempfile.gettempdir(), 'no-such-dopy-key-file'))

    def test_file_others_may_read_is_warned_about(self):
        path = self.key_file(b'secret', 0o644)
        with self.assertLogs('dopy.auth', 'WARNING') as logs:
            self.assertEqual(auth.read_authkey_file(path), b'secret')
        self.assertIn('chmod 600', logs.output[0])
        self.assertNotIn('secret', logs.output[0])
        with self.assertNoLogs('dopy.auth'):
            auth.read_authkey_file(self.key_file(b'secret', 0o600))

    def test_environment(self):
        self.assertIsNone(auth.authkey_from_env({}))
        self.assertEqual(auth.authkey_from_env({'DOPY_AUTHKEY': 'clé'}), 'clé'.encode('utf-8'))
        with self.assertRaisesRegex(ValueError, 'DOPY_AUTHKEY'):
            auth.authkey_from_env({'DOPY_AUTHKEY': ''})

    def test_environment_defaults_to_os_environ(self):
        with mock.patch.dict(os.environ, {'DOPY_AUTHKEY': 'from the environment'}):
            self.assertEqual(auth.authkey_from_env(), b'from the environment')


if __name__ == '__main__':
    unittest.main()
