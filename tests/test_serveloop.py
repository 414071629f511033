"""The threaded server's loop: descriptors served by a leading thread, which steps aside when a handler takes long."""

import os
import socket
import threading
import unittest
from unittest import mock

import dopy
import dopy.tcp
from dopy import auth, serveloop, wire
from dopy.serveloop import ServeLoop
from tests.support import TIMEOUT, Case, HubCase, each_mode, eventually, logged
from tests.test_auth import tls_contexts

NEVER = 3600.0


@unittest.skipUnless(serveloop.AVAILABLE, 'the serve loop needs epoll')
class Loop(Case):
    """``ServeLoop`` alone, over pipes."""

    def setUp(self):
        super().setUp()
        self.loop = ServeLoop('test-loop', max_idle=2)
        self.addCleanup(self.loop.close, TIMEOUT)

    def pipe(self, on_data):
        """A pipe whose reading end the loop serves: ``on_data(bytes)`` runs for what is read;
        returns the writing end."""
        loop = self.loop

        class Handler:
            def __init__(self, r):
                self.r = r

            def on_ready(self):
                data = os.read(self.r, 100)
                on_data(data)
                if not data:
                    loop.remove(self.r)
                return bool(data)

        return self.raw_pipe(Handler)[1]

    def raw_pipe(self, make_handler):
        """A pipe whose reading end the loop serves with ``make_handler(read_fd)``; returns both ends."""
        r, w = os.pipe()
        self.addCleanup(os.close, w)
        self.addCleanup(os.close, r)
        self.loop.add(r, make_handler(r))
        return r, w

    def loop_threads(self):
        return [t for t in threading.enumerate() if t.name.startswith('test-loop-')
                and not t.name.endswith('watchdog')]

    def test_a_readable_descriptor_is_handled_on_a_loop_thread(self):
        seen = []
        done = threading.Event()
        w = self.pipe(lambda data: (seen.append((data, threading.current_thread().name)), done.set()))
        os.write(w, b'hello')
        self.assertTrue(done.wait(TIMEOUT))
        self.assertEqual(seen, [(b'hello', 'test-loop-0')])

    def test_a_descriptor_waits_for_its_handler_to_return_before_it_is_handled_again(self):
        running = []
        overlapped = []
        got = []
        first_in = threading.Event()
        release = threading.Event()
        all_read = threading.Event()

        def on_data(data):
            if running:
                overlapped.append(data)
            running.append(data)
            got.append(data)
            if len(got) == 1:
                first_in.set()
                self.assertTrue(release.wait(TIMEOUT))
            running.pop()
            if b''.join(got) == b'abc':
                all_read.set()

        w = self.pipe(on_data)
        os.write(w, b'a')
        self.assertTrue(first_in.wait(TIMEOUT))
        # The first handler is stuck, long enough to be stepped aside from:
        # the bytes written meanwhile wait for it all the same.
        os.write(w, b'bc')
        other = threading.Event()
        os.write(self.pipe(lambda data: other.set()), b'x')
        self.assertTrue(other.wait(TIMEOUT))
        self.assertEqual(got, [b'a'])
        release.set()
        self.assertTrue(all_read.wait(TIMEOUT))
        self.assertEqual(overlapped, [])

    def test_the_watchdog_lets_another_thread_lead_while_a_handler_blocks(self):
        release = threading.Event()
        blocked = threading.Event()
        served = []
        second = threading.Event()

        def block(data):
            blocked.set()
            self.assertTrue(release.wait(TIMEOUT))

        w1 = self.pipe(block)
        w2 = self.pipe(lambda data: (served.append(threading.current_thread().name), second.set()))
        os.write(w1, b'x')
        self.assertTrue(blocked.wait(TIMEOUT))
        os.write(w2, b'y')
        self.assertTrue(second.wait(TIMEOUT))
        release.set()
        self.assertEqual(served, ['test-loop-1'])

    def test_step_aside_hands_the_lead_over_at_once(self):
        # With the watchdog out of the picture, only step_aside can let the second pipe be served.
        patcher = mock.patch('dopy.serveloop._TICK', NEVER)
        patcher.start()
        self.addCleanup(patcher.stop)
        release = threading.Event()
        blocked = threading.Event()
        second = threading.Event()

        def block(data):
            serveloop.step_aside()
            blocked.set()
            self.assertTrue(release.wait(TIMEOUT))

        w1 = self.pipe(block)
        w2 = self.pipe(lambda data: second.set())
        os.write(w1, b'x')
        self.assertTrue(blocked.wait(TIMEOUT))
        os.write(w2, b'y')
        self.assertTrue(second.wait(TIMEOUT))
        release.set()

    def test_a_descriptor_whose_handler_overran_is_run_by_a_thread_that_no_longer_leads(self):
        gates = [threading.Event() for _ in range(3)]
        entered = threading.Semaphore(0)
        runs = []
        second = threading.Event()

        def on_data(data):
            runs.append(data)
            entered.release()
            gates[min(len(runs), 3) - 1].wait(TIMEOUT)

        slow = self.pipe(on_data)
        fast = self.pipe(lambda data: second.set())
        os.write(slow, b'1')
        self.assertTrue(entered.acquire(timeout=TIMEOUT))
        os.write(fast, b'x')
        self.assertTrue(second.wait(TIMEOUT))  # the watchdog handed over
        gates[0].set()
        # From now on the watchdog never hands over: only the handler's record can.
        patcher = mock.patch('dopy.serveloop._TICK', NEVER)
        patcher.start()
        self.addCleanup(patcher.stop)
        second.clear()
        os.write(slow, b'2')
        self.assertTrue(entered.acquire(timeout=TIMEOUT))
        os.write(fast, b'y')
        self.assertTrue(second.wait(TIMEOUT))
        gates[1].set()
        # A quick run clears the record: the next run, if slow, holds the lead again.
        gates[2].set()
        os.write(slow, b'3')
        self.assertTrue(entered.acquire(timeout=TIMEOUT))
        gates[2].clear()
        second.clear()
        os.write(slow, b'4')
        self.assertTrue(entered.acquire(timeout=TIMEOUT))
        os.write(fast, b'z')
        self.assertFalse(second.wait(0.2))
        gates[2].set()
        self.assertTrue(second.wait(TIMEOUT))

    def test_step_aside_outside_a_handler_does_nothing(self):
        serveloop.step_aside()
        done = threading.Event()
        os.write(self.pipe(lambda data: done.set()), b'x')
        self.assertTrue(done.wait(TIMEOUT))
        self.assertEqual(len(self.loop_threads()), 1)

    def test_threads_left_waiting_to_lead_are_kept_up_to_max_idle(self):
        release = threading.Event()
        entered = threading.Semaphore(0)

        def block(data):
            serveloop.step_aside()
            entered.release()
            self.assertTrue(release.wait(TIMEOUT))

        writers = [self.pipe(block) for _ in range(5)]
        for w in writers:
            os.write(w, b'x')
        for _ in writers:
            self.assertTrue(entered.acquire(timeout=TIMEOUT))
        self.assertEqual(len(self.loop_threads()), 6)  # five blocked, one leading
        release.set()
        eventually(lambda: len(self.loop_threads()) == 3 and self.loop.idle_count() == 2,
                   'down to one leader and two idle threads')

    def test_close_joins_every_thread(self):
        done = threading.Event()
        os.write(self.pipe(lambda data: done.set()), b'x')
        self.assertTrue(done.wait(TIMEOUT))
        self.loop.close(TIMEOUT)
        self.assertEqual([t for t in threading.enumerate() if t.name.startswith('test-loop')], [])
        with self.assertRaises(RuntimeError):
            self.loop.add(0, None)

    def test_close_leaves_a_handler_that_overruns_and_its_thread_ends_after(self):
        release = threading.Event()
        blocked = threading.Event()

        def block(data):
            blocked.set()
            release.wait(TIMEOUT)

        os.write(self.pipe(block), b'x')
        self.assertTrue(blocked.wait(TIMEOUT))
        stuck = self.loop_threads()
        with logged('dopy.serveloop') as records:
            self.loop.close(0.05)
        self.assertIn('still running', records[0].getMessage())
        release.set()
        for thread in stuck:
            thread.join(TIMEOUT)
            self.assertFalse(thread.is_alive())

    def test_close_from_inside_a_handler(self):
        done = threading.Event()

        def close(data):
            self.loop.close(TIMEOUT)
            done.set()

        os.write(self.pipe(close), b'x')
        self.assertTrue(done.wait(TIMEOUT))
        eventually(lambda: not self.loop_threads(), 'every loop thread ended')

    def test_a_removed_descriptor_is_not_handled(self):
        got = []

        class Handler:
            def __init__(self, r):
                self.r = r

            def on_ready(self):
                got.append(os.read(self.r, 100))
                return True

        r, w = self.raw_pipe(Handler)
        self.loop.remove(r)
        os.write(w, b'x')
        done = threading.Event()
        os.write(self.pipe(lambda data: done.set()), b'y')
        self.assertTrue(done.wait(TIMEOUT))
        self.assertEqual(got, [])

    def test_a_failing_handler_is_logged_and_its_descriptor_dropped(self):
        calls = []

        class Broken:
            def __init__(self, r):
                self.r = r

            def on_ready(self):
                calls.append(os.read(self.r, 1))
                raise RuntimeError('broken handler')

        w = self.raw_pipe(Broken)[1]
        with logged('dopy.serveloop', count=1) as records:
            os.write(w, b'xy')
            eventually(lambda: records, 'the failure logged')
        self.assertIn('broken handler', str(records[0].exc_info[1]))
        done = threading.Event()
        os.write(self.pipe(lambda data: done.set()), b'z')
        self.assertTrue(done.wait(TIMEOUT))
        self.assertEqual(calls, [b'x'])


class Sleeper:
    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def echo(self, value):
        return value

    def wait(self, value):
        self.entered.set()
        # Longer than a call's timeout: a call held up behind this one fails.
        if not self.release.wait(2 * TIMEOUT):
            raise TimeoutError('never released')
        return value

    def visit(self, visitor, value):
        return visitor.call(value)


class Visitor:
    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def call(self, value):
        self.entered.set()
        self.release.wait(2 * TIMEOUT)
        return value


@each_mode(modes=(dopy.THRD_CONN, dopy.THRD_FUNC))
class ServedByTheLoop(HubCase):
    """A threaded server's connections, served by its loop (where there is epoll)."""

    def server_threads(self):
        port = self.server.port
        return [t for t in threading.enumerate()
                if t.name.startswith((f'dopy-serve-{port}-', f'dopy-conn-{port}'))]

    @unittest.skipUnless(serveloop.AVAILABLE, 'without epoll, each connection has a thread')
    def test_idle_connections_hold_no_thread(self):
        proxies = [self.serve(Sleeper()) if i == 0 else self.proxy() for i in range(40)]
        for i, p in enumerate(proxies):
            self.assertEqual(p.echo(i), i)
        self.assertEqual(len(self.server.connections()), 40)
        # A leader and its watchdog, and at most a thread or two that took a turn.
        self.assertLess(len(self.server_threads()), 6)

    def test_a_method_blocked_outside_dopy_holds_up_only_its_own_connection(self):
        sleeper = Sleeper()
        blocked = self.serve(sleeper)
        other = self.proxy()
        first = blocked.wait.future('first')
        self.assertTrue(sleeper.entered.wait(TIMEOUT))
        behind = blocked.echo.future('behind')
        self.assertEqual(other.echo('other'), 'other')
        if self.thread_mode == dopy.THRD_CONN:
            self.assertFalse(behind.done())
        sleeper.release.set()
        self.assertEqual(first.result(TIMEOUT), 'first')
        self.assertEqual(behind.result(TIMEOUT), 'behind')

    def test_a_method_waiting_for_a_callback_holds_up_no_other_connection(self):
        # The watchdog is out of the picture: the wait for the reply steps aside by itself.
        patcher = mock.patch('dopy.serveloop._TICK', NEVER)
        patcher.start()
        self.addCleanup(patcher.stop)
        visiting = self.serve(Sleeper())
        other = self.proxy()
        visitor = Visitor()
        result = visiting.visit.future(dopy.ref(visitor), 'visited')
        self.assertTrue(visitor.entered.wait(TIMEOUT))
        self.assertEqual(other.echo('other'), 'other')
        visitor.release.set()
        self.assertEqual(result.result(TIMEOUT), 'visited')

    def test_a_connection_whose_method_overran_holds_up_no_one_the_next_time(self):
        sleeper = Sleeper()
        slow = self.serve(sleeper)
        other = self.proxy()
        first = slow.wait.future('first')
        self.assertTrue(sleeper.entered.wait(TIMEOUT))
        self.assertEqual(other.echo('other'), 'other')
        sleeper.release.set()
        self.assertEqual(first.result(TIMEOUT), 'first')
        # The watchdog is out of the picture from now on.
        patcher = mock.patch('dopy.serveloop._TICK', NEVER)
        patcher.start()
        self.addCleanup(patcher.stop)
        sleeper.entered.clear()
        sleeper.release.clear()
        again = slow.wait.future('again')
        self.assertTrue(sleeper.entered.wait(TIMEOUT))
        self.assertEqual(other.echo('other again'), 'other again')
        sleeper.release.set()
        self.assertEqual(again.result(TIMEOUT), 'again')

    def test_calls_pipelined_on_one_connection_are_all_answered(self):
        p = self.serve(Sleeper())
        futures = [p.echo.future(i) for i in range(500)]
        self.assertEqual([f.result(TIMEOUT) for f in futures], list(range(500)))

    def test_without_epoll_each_connection_has_a_thread(self):
        patcher = mock.patch('dopy.tcp._LOOP_AVAILABLE', False)
        patcher.start()
        self.addCleanup(patcher.stop)
        proxies = [self.serve(Sleeper()) if i == 0 else self.proxy() for i in range(3)]
        for i, p in enumerate(proxies):
            self.assertEqual(p.echo(i), i)
        names = [t.name for t in threading.enumerate()]
        self.assertEqual(len([n for n in names if n.startswith('dopy-conn-127.0.0.1:')]), 3)
        self.assertEqual([n for n in names if n.startswith('dopy-serve-')], [])


class TLSFramesBehindTheHandshake(Case):
    """Bytes that TLS decrypted with the handshake's last record do not show on the socket."""

    def test_a_call_in_the_handshakes_last_tls_record_is_answered(self):
        key = b'a key for this test'
        server_context, client_context = tls_contexts()
        hub = dopy.Hub(authkey=key)
        self.addCleanup(hub.shutdown)
        hub.addObject('obj', Sleeper())
        server = dopy.tcp.makeServer(0, hub=hub, ssl_context=server_context)
        raw = socket.create_connection(('127.0.0.1', server.port), timeout=TIMEOUT)
        sock = client_context.wrap_socket(raw, server_hostname='localhost')
        self.addCleanup(sock.close)
        handshake = auth.ClientHandshake(key)
        handshake.initial()
        answer = b''
        while not answer:
            answer = handshake.feed(sock.recv(handshake.wanted))
        call = wire.encode(wire.CALL, 1, ('obj', 'echo', ('behind',), {}))
        # One send, so one TLS record: the server reads the answer and holds the call decrypted.
        sock.sendall(answer + call)
        while not handshake.done:
            handshake.feed(sock.recv(handshake.wanted))
        decoder = wire.Decoder()
        frame = None
        while frame is None:
            data = sock.recv(65536)
            self.assertTrue(data, 'the server closed the connection')
            decoder.feed(data)
            frame = decoder.next_frame()
        self.assertEqual((frame.kind, wire.loads(frame.data)), (wire.REPLY, 'behind'))
