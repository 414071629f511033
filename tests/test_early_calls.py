"""A keyless client sends its first call to a server it has met OPEN at once, and reads the greeting with the reply."""

import secrets
import socket
import threading
import time
from unittest import mock

import dopy
import dopy.tcp
from dopy import auth, wire

from .support import TIMEOUT, HubCase, each_mode


def open_greeting():
    return auth.GREETING.pack(auth.MAGIC, auth.VERSION, auth.OPEN, 0, bytes(auth.CHALLENGE_SIZE))


def auth_greeting():
    return auth.GREETING.pack(auth.MAGIC, auth.VERSION, auth.AUTH, 0,
                              secrets.token_bytes(auth.CHALLENGE_SIZE))


def refused_greeting(reason):
    message = reason.encode()
    return (auth.GREETING.pack(auth.MAGIC, auth.VERSION, auth.REFUSED, 0, bytes(auth.CHALLENGE_SIZE))
            + len(message).to_bytes(2, 'big') + message)


def read_call(sock):
    """The next CALL frame from ``sock``: its request id and ``(name, method, args, kwargs)``."""
    decoder = wire.Decoder()
    while True:
        frame = decoder.next_frame()
        if frame is not None:
            _, request_id, data, buffers, _ = frame
            return request_id, wire.loads(data, buffers)
        data = sock.recv(65536)
        if not data:
            raise EOFError('the client closed before sending a call')
        decoder.feed(data)


def serve_echo(sock):
    """Answer one call with its first argument."""
    request_id, (_name, _method, args, _kwargs) = read_call(sock)
    sock.sendall(wire.encode(wire.REPLY, request_id, args[0]))


def greet_then_echo(sock):
    """A DOPY server without a key: the greeting first, then one call answered."""
    sock.sendall(open_greeting())
    serve_echo(sock)


def call_then_greet(sock, log):
    """Read a whole call before greeting: only a client that sent it early gets an answer."""
    request_id, (_name, _method, args, _kwargs) = read_call(sock)
    log.append('call before greeting')
    sock.sendall(open_greeting() + wire.encode(wire.REPLY, request_id, args[0]))


def until_closed(sock):
    while sock.recv(65536):
        pass


class Echo:
    def echo(self, value):
        return value


class ScriptedServer:
    """A listener on 127.0.0.1 that runs one script per connection, in order, on a thread of its own."""

    def __init__(self, test, *scripts):
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.scripts = scripts
        self.failure = None
        self.thread = threading.Thread(target=self._run, name='test-scripted-server')
        self.thread.start()
        test.addCleanup(self._finish, test)

    def _run(self):
        try:
            for script in self.scripts:
                sock, _ = self.listener.accept()
                with sock:
                    sock.settimeout(TIMEOUT)
                    script(sock)
        except Exception as exc:
            self.failure = exc

    def _finish(self, test):
        self.thread.join(TIMEOUT)
        self.listener.close()
        test.assertFalse(self.thread.is_alive(), 'the scripted server did not finish')
        if self.failure is not None:
            raise self.failure


@each_mode(modes=(dopy.THRD_CONN, dopy.THRD_FUNC))
class EarlyCalls(HubCase):
    def remote(self, server, **kwargs):
        proxy = dopy.tcp.remote('127.0.0.1', server.port, 'obj', timeout=TIMEOUT,
                                hub=self.client_hub, **kwargs)
        self.addCleanup(dopy.close, proxy)
        return proxy

    def test_the_first_call_goes_out_before_the_greeting_to_a_server_met_open(self):
        log = []
        server = ScriptedServer(self, greet_then_echo, lambda s: call_then_greet(s, log),
                                lambda s: call_then_greet(s, log))
        with self.remote(server) as met:
            self.assertEqual(met.echo('first'), 'first')
        with self.remote(server) as known:
            self.assertEqual(known.echo('early'), 'early')
        with self.remote(server) as by_future:
            self.assertEqual(by_future.echo.future('future').result(TIMEOUT), 'future')
        self.assertEqual(log, ['call before greeting'] * 2)

    def test_a_server_met_open_that_now_requires_a_key_fails_the_first_call_then_remote(self):
        def greet_auth_and_wait(sock):
            sock.sendall(auth_greeting())
            until_closed(sock)

        server = ScriptedServer(self, greet_then_echo, greet_auth_and_wait, greet_auth_and_wait)
        with self.remote(server) as met:
            self.assertEqual(met.echo(1), 1)
        known = self.remote(server)
        with self.assertRaisesRegex(dopy.AuthenticationError, 'requires an authkey'):
            known.echo(2)
        dopy.close(known)
        # The hub forgot the server: the next remote() waits for the greeting, and fails itself.
        with self.assertRaisesRegex(dopy.AuthenticationError, 'requires an authkey'):
            self.remote(server)

    def test_a_refusal_from_a_server_met_open_reaches_the_first_call_with_its_reason(self):
        def refuse(sock):
            read_call(sock)
            sock.sendall(refused_greeting('at its limit; try again later'))

        server = ScriptedServer(self, greet_then_echo, refuse, greet_then_echo)
        with self.remote(server) as met:
            self.assertEqual(met.echo(1), 1)
        with self.remote(server) as known:
            with self.assertRaisesRegex(dopy.AuthenticationError, 'at its limit; try again later'):
                known.echo(2)
        with self.remote(server) as again:
            self.assertEqual(again.echo(3), 3)

    def test_a_server_met_open_that_is_no_longer_dopy_is_a_protocol_error_at_the_first_call(self):
        def not_dopy(sock):
            sock.sendall(b'HTTP/1.1 400 Bad Request\r\n\r\n')
            until_closed(sock)

        server = ScriptedServer(self, greet_then_echo, not_dopy)
        with self.remote(server) as met:
            self.assertEqual(met.echo(1), 1)
        with self.remote(server) as known:
            with self.assertRaisesRegex(dopy.ProtocolError, 'not a DOPY server'):
                known.echo(2)

    def test_a_server_that_closes_before_its_greeting_is_a_lost_connection(self):
        server = ScriptedServer(self, greet_then_echo, read_call)
        with self.remote(server) as met:
            self.assertEqual(met.echo(1), 1)
        with self.remote(server) as known:
            with self.assertRaises(dopy.ConnectionLostError):
                known.echo(2)

    def test_a_greeting_in_pieces_is_put_together(self):
        def greet_in_pieces(sock):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request_id, (_name, _method, args, _kwargs) = read_call(sock)
            greeting = open_greeting()
            for piece in (greeting[:3], greeting[3:20], greeting[20:]):
                sock.sendall(piece)
            sock.sendall(wire.encode(wire.REPLY, request_id, args[0]))

        server = ScriptedServer(self, greet_then_echo, greet_in_pieces)
        with self.remote(server) as met:
            self.assertEqual(met.echo(1), 1)
        with self.remote(server) as known:
            self.assertEqual(known.echo(2), 2)

    def test_a_client_with_a_key_never_sends_early(self):
        self.assertEqual(self.serve(Echo()).echo(1), 1)
        with self.assertRaisesRegex(dopy.AuthenticationError, 'does not authenticate'):
            dopy.tcp.remote('127.0.0.1', self.server.port, 'obj', timeout=TIMEOUT,
                            hub=self.client_hub, authkey=b'a key')

    def test_a_real_server_answers_calls_sent_early(self):
        first = self.serve(Echo())
        self.assertEqual(first.echo(0), 0)
        proxies = [self.proxy() for _ in range(3)]
        self.assertEqual([p.echo(i) for i, p in enumerate(proxies, 1)], [1, 2, 3])
        self.assertEqual(self.server.peer_count(), 4)

    def test_a_server_met_open_that_never_greets_fails_the_first_call_at_the_connect_timeout(self):
        def silent(sock):
            read_call(sock)
            until_closed(sock)

        server = ScriptedServer(self, greet_then_echo, silent, greet_then_echo, silent, until_closed)
        with mock.patch.object(dopy.tcp, 'DEFAULT_CONNECT_TIMEOUT', 0.3):
            for start_call in (lambda p: p.echo(2), lambda p: p.echo.future(2).result(TIMEOUT)):
                # Met (again: the silence made the hub forget the server), then silent.
                with dopy.tcp.remote('127.0.0.1', server.port, 'obj', hub=self.client_hub) as met:
                    self.assertEqual(met.echo(1), 1)
                with dopy.tcp.remote('127.0.0.1', server.port, 'obj', hub=self.client_hub) as known:
                    start = time.monotonic()
                    with self.assertRaisesRegex(dopy.CallTimeoutError, 'timed out waiting for the greeting'):
                        start_call(known)
                    self.assertLess(time.monotonic() - start, TIMEOUT)
            with self.assertRaises(dopy.CallTimeoutError):
                dopy.tcp.remote('127.0.0.1', server.port, 'obj', hub=self.client_hub)


class NoEarlyCallsWithoutThreads(HubCase):
    thread_mode = dopy.THRD_NONE

    def test_a_hub_without_threads_waits_for_the_greeting_of_a_server_it_knows(self):
        def greet_auth_and_wait(sock):
            sock.sendall(auth_greeting())
            until_closed(sock)

        server = ScriptedServer(self, greet_then_echo, greet_auth_and_wait)
        with dopy.tcp.remote('127.0.0.1', server.port, 'obj', timeout=TIMEOUT,
                             hub=self.client_hub) as met:
            self.assertEqual(met.echo(1), 1)
        with self.assertRaisesRegex(dopy.AuthenticationError, 'requires an authkey'):
            dopy.tcp.remote('127.0.0.1', server.port, 'obj', timeout=TIMEOUT, hub=self.client_hub)
