"""Calls through a proxy over real sockets on 127.0.0.1, server and client in this process."""

import concurrent.futures
import contextlib
import logging
import os
import pickle
import queue
import socket
import ssl
import threading
import time
import weakref
import unittest
from unittest import mock

import dopy
import dopy.tcp
from dopy import wire
from tests.support import (ROOT, raw_client, TIMEOUT, HubCase, each_mode, eventually, logged,
                           pipe_proxy)


class Service:
    """The object most tests here call."""

    counter = 0

    def __init__(self):
        self.release = threading.Event()
        self.started = threading.Event()

    def echo(self, value):
        return value

    def add(self, a, b=0, *, scale=1):
        return (a + b) * scale

    def fail(self, message):
        raise KeyError(message)

    def unpicklable_result(self):
        return threading.Lock()

    def wait_for_release(self, value):
        self.started.set()
        self.release.wait(TIMEOUT)
        return value

    def _hidden(self):
        raise AssertionError('a private method ran')

    @property
    def prop(self):
        raise AssertionError('a property was read')


class Blob:
    """Pickles its data out of band, the way numpy arrays do."""

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        return Blob, (pickle.PickleBuffer(self.data),)

    def __eq__(self, other):
        return isinstance(other, Blob) and bytes(self.data) == bytes(other.data)


class Unpicklable:
    def __reduce__(self):
        raise TypeError('this object refuses to be pickled')



@contextlib.contextmanager
def full_listener():
    """The port of a listener whose backlog is full, so that connecting to it hangs."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        s.listen(0)
        fillers = []
        try:
            for _ in range(16):
                f = socket.socket()
                fillers.append(f)
                f.setblocking(False)
                f.connect_ex(s.getsockname())
            yield s.getsockname()[1]
        finally:
            for f in fillers:
                f.close()

@each_mode(transports=('tcp', 'pipe'))
class BasicCalls(HubCase):
    def setUp(self):
        super().setUp()
        self.service = Service()
        self.p = self.serve(self.service)

    def test_positional_and_keyword_arguments(self):
        self.assertEqual(self.p.add(1, 2), 3)
        self.assertEqual(self.p.add(1, b=2, scale=10), 30)
        self.assertEqual(self.p.add(a=5), 5)

    def test_arguments_and_results_are_copies(self):
        value = {'list': [1, 2, (3, 4)], 'bytes': b'\x00\xff', 'set': {1, 2}}
        self.assertEqual(self.p.echo(value), value)
        self.assertIsNot(self.p.echo(value), value)

    def test_large_payload_round_trip(self):
        blob = bytes(range(256)) * (4 << 12)
        self.assertEqual(self.p.echo(blob), blob)
        self.assertEqual(self.p.echo(bytearray(blob)), bytearray(blob))
        back = self.p.echo(memoryview(blob))
        self.assertIs(type(back), memoryview)
        self.assertEqual(back, memoryview(blob))

    def test_out_of_band_buffers_round_trip(self):
        blobs = [Blob(bytearray(b'q' * (3 << 20))), Blob(b'small'), Blob(bytes(range(256)) * 1000)]
        self.assertEqual(self.p.echo(blobs), blobs)

    def test_remote_exception_is_raised_as_its_own_type(self):
        with self.assertRaises(KeyError) as caught:
            self.p.fail('gone')
        self.assertEqual(caught.exception.args, ('gone',))
        self.assertEqual(caught.exception.dopy_traceback[-1].name, 'fail')
        self.assertIn('raise KeyError(message)', dopy.tb.errorText(caught.exception))

    def test_underscore_names_are_not_forwarded(self):
        with self.assertRaises(AttributeError):
            self.p._hidden()
        with self.assertRaises(AttributeError):
            self.p.__len__()

    def test_a_method_taken_from_a_proxy_calls_after_the_proxy_is_gone(self):
        if self.transport == 'tcp':
            proxy = dopy.tcp.remote('127.0.0.1', self.server.port, 'obj', timeout=TIMEOUT,
                                    hub=self.client_hub)
        else:
            proxy = pipe_proxy(self.hub, self.client_hub, 'obj', TIMEOUT)
        add, echo = proxy.add, proxy.echo
        self.assertIs(proxy.add, add)
        connection = proxy._dopy_link.connection
        gone = weakref.ref(proxy)
        del proxy
        self.assertIsNone(gone())
        self.assertEqual(add(2, 3), 5)
        self.assertEqual(echo.future('later').result(TIMEOUT), 'later')
        self.assertFalse(connection.closed)
        del add, echo
        self.assertTrue(connection.closed)

    def test_a_proxy_has_no_attributes_of_its_own_to_set(self):
        for name in ('add', 'value', '__dict__'):
            with self.subTest(name=name), self.assertRaises(AttributeError):
                setattr(self.p, name, 1)
        with self.assertRaises(AttributeError):
            self.p.__dict__
        self.assertEqual(self.p.add(1, 2), 3)

    def test_data_attributes_and_properties_are_not_methods(self):
        for name in ('counter', 'prop', 'release'):
            with self.subTest(name=name), self.assertRaises(dopy.NoSuchMethodError) as caught:
                getattr(self.p, name)()
            self.assertIsInstance(caught.exception, AttributeError)

    def test_unknown_method(self):
        with self.assertRaises(dopy.NoSuchMethodError):
            self.p.nothing_here()
        self.assertEqual(self.p.echo('still usable'), 'still usable')

    def test_unknown_object(self):
        with self.assertRaises(dopy.NoSuchObjectError) as caught:
            self.proxy('nobody').echo(1)
        self.assertIsInstance(caught.exception, LookupError)

    def test_unpicklable_argument_fails_on_the_client_and_sends_nothing(self):
        with self.assertRaises(dopy.SerializationError) as caught:
            self.p.echo(Unpicklable())
        self.assertIn('client', str(caught.exception))
        self.assertEqual(self.p.echo(1), 1)

    def test_unpicklable_result_fails_on_the_server_and_the_connection_survives(self):
        with self.assertRaises(dopy.SerializationError) as caught:
            self.p.unpicklable_result()
        self.assertIn('server', str(caught.exception))
        self.assertEqual(self.p.echo(2), 2)

    def test_removed_object_is_no_longer_served(self):
        self.hub.removeObject('obj')
        with self.assertRaises(dopy.NoSuchObjectError):
            self.p.echo(1)

    def test_bad_reference_strings(self):
        for ref in ('nocolon', 'udp:host:1:x', 'tcp:host', 'tcp:host:port:x', 'tcp:host:1:'):
            with self.subTest(ref=ref), self.assertRaises(ValueError):
                self.hub.makeRemoteObject(ref)

    def test_closed_proxy_refuses_calls(self):
        dopy.close(self.p)
        dopy.close(self.p)
        with self.assertRaises(dopy.ConnectionClosedError):
            self.p.echo(1)

    def test_proxy_as_context_manager_closes(self):
        with self.proxy() as p:
            self.assertEqual(p.echo(3), 3)
        with self.assertRaises(dopy.ConnectionClosedError):
            p.echo(1)


class Named:
    def __init__(self, name):
        self.name = name

    def who(self):
        return self.name

    def other(self):
        return 'other'


@each_mode(transports=('tcp', 'pipe'))
class TheRegistryChangesBetweenCalls(HubCase):
    """A connection's later calls see the registry as it is then, whatever an earlier call found."""

    def test_an_object_replaced_under_its_name_answers_the_next_call(self):
        p = self.serve(Named('first'))
        self.assertEqual(p.who(), 'first')
        self.hub.addObject('obj', Named('second'))
        self.assertEqual(p.who(), 'second')

    def test_an_object_removed_is_no_longer_called(self):
        p = self.serve(Named('first'))
        self.assertEqual(p.who(), 'first')
        self.hub.removeObject('obj')
        with self.assertRaises(dopy.NoSuchObjectError):
            p.who()

    def test_an_object_published_again_with_fewer_methods_refuses_the_others(self):
        named = Named('first')
        p = self.serve(named)
        self.assertEqual(p.other(), 'other')
        self.hub.addObject('obj', named, expose=['who'])
        with self.assertRaises(dopy.NoSuchMethodError):
            p.other()
        self.assertEqual(p.who(), 'first')

    def test_a_method_replaced_by_a_data_attribute_is_refused(self):
        named = Named('first')
        p = self.serve(named)
        self.assertEqual(p.who(), 'first')
        named.who = 'no longer a method'
        with self.assertRaises(dopy.NoSuchMethodError):
            p.who()

    def test_a_method_replaced_on_the_instance_is_the_one_called(self):
        named = Named('first')
        p = self.serve(named)
        self.assertEqual(p.who(), 'first')
        named.who = lambda: 'replaced'
        self.assertEqual(p.who(), 'replaced')


@each_mode()
class TcpReferences(HubCase):
    def setUp(self):
        super().setUp()
        self.p = self.serve(Service())

    def test_reference_string_and_repr(self):
        ref = f'tcp:127.0.0.1:{self.server.port}:obj'
        self.assertEqual(str(self.p), ref)
        self.assertIn(ref, repr(self.p))
        self.assertIsInstance(self.p, dopy.RemoteObject)
        again = self.client_hub.makeRemoteObject(ref, timeout=TIMEOUT)
        self.addCleanup(dopy.close, again)
        self.assertEqual(again.echo('via ref'), 'via ref')
        self.assertEqual(str(again), ref)

    def test_proxy_pickles_as_its_reference(self):
        data = pickle.dumps(self.p)
        self.assertIn(str(self.p).encode(), data)
        self.assertLess(len(data), 200)


@each_mode(transports=('tcp', 'pipe'), modes=(dopy.THRD_CONN, dopy.THRD_FUNC))
class Threads(HubCase):
    def test_many_threads_share_one_proxy_and_get_their_own_results(self):
        p = self.serve(Service())
        failures = []

        def worker(k):
            try:
                for i in range(200):
                    got = p.add(k, i)
                    if got != k + i:
                        failures.append((k, i, got))
            except Exception as exc:
                failures.append(exc)

        threads = [threading.Thread(target=worker, args=(k * 1000,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 3)
        self.assertFalse(any(t.is_alive() for t in threads))
        self.assertEqual(failures, [])

    def test_timeout_of_one_thread_leaves_the_others_calls_alone(self):
        service = Service()
        shared = self.serve(service, timeout=0.3)
        self.assertEqual(shared.echo(0), 0)
        with self.assertRaises(dopy.CallTimeoutError):
            shared.wait_for_release(1)
        service.release.set()
        results = []
        threads = [threading.Thread(target=lambda i=i: results.append(shared.echo(i))) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        self.assertEqual(sorted(results), list(range(8)))

    def test_calls_of_other_threads_go_on_while_one_waits(self):
        service = Service()
        p = self.serve(service)
        other = self.proxy()
        result = []
        waiter = threading.Thread(target=lambda: result.append(p.wait_for_release('late')))
        waiter.start()
        self.assertTrue(service.started.wait(TIMEOUT))
        self.assertEqual(other.echo('meanwhile'), 'meanwhile')
        service.release.set()
        waiter.join(TIMEOUT)
        self.assertEqual(result, ['late'])


@each_mode()
class SocketOptions(HubCase):
    """Both ends of a TCP connection send small messages at once and probe an idle peer."""

    OPTIONS = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, True), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, True)]
    OPTIONS += [(socket.IPPROTO_TCP, getattr(socket, name), value)
                for name, value in (('TCP_KEEPIDLE', 60), ('TCP_KEEPINTVL', 10), ('TCP_KEEPCNT', 6))
                if hasattr(socket, name)]

    def options(self, sock):
        # A flag reads back as any non-zero int on some systems.
        return [(level, option, bool(got) if isinstance(value, bool) else got)
                for level, option, value in self.OPTIONS
                for got in [sock.getsockopt(level, option)]]

    def test_both_ends_have_nodelay_and_keepalive(self):
        p = self.serve(Service())
        self.assertEqual(p.echo(1), 1)
        (server_side,) = self.server.connections()
        self.assertEqual(self.options(p._dopy_link.connection._stream.sock), self.OPTIONS)
        self.assertEqual(self.options(server_side._stream.sock), self.OPTIONS)


@each_mode(transports=('tcp', 'pipe'), modes=(dopy.THRD_CONN, dopy.THRD_FUNC))
class FuturesWithoutWaiting(HubCase):
    """In the threaded modes a future resolves by itself: nothing needs to call result() first."""

    def setUp(self):
        super().setUp()
        self.p = self.serve(Service())

    def test_futures_complete_under_concurrent_futures_wait_and_as_completed(self):
        futures = [self.p.add.future(i, b=1) for i in range(50)]
        done, not_done = concurrent.futures.wait(futures, timeout=TIMEOUT)
        self.assertEqual((len(done), len(not_done)), (50, 0))
        more = {self.p.echo.future(i): i for i in range(50)}
        seen = [f.result() == more[f] for f in concurrent.futures.as_completed(more, timeout=TIMEOUT)]
        self.assertEqual(seen, [True] * 50)

    def test_done_callbacks_run_with_the_outcome(self):
        outcomes = queue.Queue()
        self.p.echo.future('fine').add_done_callback(lambda f: outcomes.put(f.result()))
        self.p.fail.future('broken').add_done_callback(lambda f: outcomes.put(type(f.exception())))
        got = {outcomes.get(timeout=TIMEOUT), outcomes.get(timeout=TIMEOUT)}
        self.assertEqual(got, {'fine', KeyError})


class Log:
    """Keeps what it is given, in the order its calls ran."""

    def __init__(self):
        self.seen = []

    def add(self, value):
        self.seen.append(value)

    def count(self):
        return len(self.seen)

    def echo(self, value):
        return value


@each_mode(transports=('tcp', 'pipe'))
class Pipelining(HubCase):
    def setUp(self):
        super().setUp()
        self.service = Service()
        self.p = self.serve(self.service)

    def test_many_futures_in_flight_each_get_their_own_result(self):
        futures = [self.p.add.future(i, b=1) for i in range(500)]
        self.assertEqual([f.result(TIMEOUT) for f in futures], [i + 1 for i in range(500)])

    def test_future_carries_the_remote_exception(self):
        future = self.p.fail.future('via future')
        with self.assertRaises(KeyError) as caught:
            future.result(TIMEOUT)
        self.assertEqual(caught.exception.dopy_traceback[-1].name, 'fail')

    def test_sync_calls_still_work_beside_futures(self):
        future = self.p.echo.future('async')
        self.assertEqual(self.p.echo('sync'), 'sync')
        self.assertEqual(future.result(TIMEOUT), 'async')

    def test_a_sent_future_is_running_and_cannot_be_cancelled(self):
        future = self.p.wait_for_release.future('late')
        self.assertTrue(self.service.started.wait(TIMEOUT))
        self.assertTrue(future.running())
        self.assertFalse(future.cancel())
        self.service.release.set()
        self.assertEqual(future.result(TIMEOUT), 'late')
        self.assertFalse(future.cancelled())

    def test_every_oneway_call_runs_once_and_a_later_call_gets_its_own_result(self):
        # In THRD_FUNC the oneway calls run in no set order, and may still be
        # running when the later call returns.
        log = Log()
        proxy = self.serve(log, 'log')
        for i in range(100):
            self.assertIsNone(proxy.add.oneway(i))
        self.assertEqual(proxy.echo('after'), 'after')
        eventually(lambda: len(log.seen) >= 100, 'all 100 oneway calls run')
        self.assertEqual(sorted(log.seen), list(range(100)))

    def test_a_proxy_closed_with_a_future_in_flight_frees_its_connection_after_the_reply(self):
        future = self.p.wait_for_release.future('late')
        self.assertTrue(self.service.started.wait(TIMEOUT))
        dopy.close(self.p)
        self.assertEqual(self.client_hub.stats()['connections'], 1)
        self.service.release.set()
        self.assertEqual(future.result(TIMEOUT), 'late')
        self.assertEqual(self.client_hub.stats()['connections'], 0)

    def test_oneway_failure_is_logged_by_the_server(self):
        # In THRD_FUNC the next call may finish first: logged() waits for the record.
        with logged('dopy', logging.WARNING) as records:
            self.p.fail.oneway('nobody waits')
            self.assertEqual(self.p.echo('after'), 'after')
        self.assertIn("KeyError: 'nobody waits'", '\n'.join(r.getMessage() for r in records))

    def test_no_thread_is_left_after_shutdown(self):
        self.assertEqual(self.p.echo.future(1).result(TIMEOUT), 1)
        readers = [t for t in threading.enumerate() if t.name.startswith('dopy-reader')]
        self.assertEqual(bool(readers), self.client_hub.threaded)
        self.client_hub.shutdown()
        self.hub.shutdown()
        self.assertFalse(any(t.name.startswith('dopy-') for t in threading.enumerate()))


@each_mode(transports=('tcp', 'pipe'), modes=(dopy.THRD_CONN, dopy.THRD_NONE))
class OnewayOrder(HubCase):
    """The modes that run a connection's calls one at a time run its oneway calls in the order sent."""

    def test_oneway_runs_in_order_before_a_later_call(self):
        log = Log()
        proxy = self.serve(log, 'log')
        for i in range(100):
            self.assertIsNone(proxy.add.oneway(i))
        self.assertEqual(proxy.count(), 100)
        self.assertEqual(log.seen, list(range(100)))


class Holder:
    """Holds its connection's thread in ``hold()`` until released, and hands out a reference to itself."""

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def me(self):
        return dopy.ref(self)

    def hold(self):
        self.entered.set()
        if not self.release.wait(2 * TIMEOUT):
            raise TimeoutError('never released')
        return 'held'

    def size(self, blob):
        return len(blob)

    def echo(self, value):
        return value


class SendingBehindASlowSend(HubCase):
    """A call with a timeout does not wait past it for a send without one on its connection."""

    def test_a_call_with_a_timeout_behind_a_send_the_peer_does_not_read_times_out_with_nothing_sent(self):
        holder = Holder()
        p = self.serve(holder, timeout=1.0)
        # A proxy over p's connection, with the hub's call timeout: none.
        unbounded = p.me()
        held = p.hold.future()
        self.assertTrue(holder.entered.wait(TIMEOUT))
        self.addCleanup(holder.release.set)
        # The server's thread for this connection runs hold() and reads
        # nothing: a large argument fills the socket's buffers, and its
        # sender waits, holding the connection's send lock.
        sizes = []
        big = threading.Thread(target=lambda: sizes.append(unbounded.size(bytes(64 << 20))))
        big.start()
        send_lock = p._dopy_link.connection._send_lock

        def held_by_another():
            if send_lock.acquire(blocking=False):
                send_lock.release()
                return False
            return True
        eventually(held_by_another, 'the large send under way')
        outcome = []

        def behind():
            start = time.monotonic()
            try:
                p.echo('behind')
            except dopy.CallTimeoutError as exc:
                outcome.append((exc, time.monotonic() - start))
        caller = threading.Thread(target=behind)
        caller.start()
        caller.join(TIMEOUT)
        holder.release.set()
        caller.join(TIMEOUT)
        self.assertEqual(len(outcome), 1, 'no CallTimeoutError')
        error, waited = outcome[0]
        self.assertLess(waited, TIMEOUT)
        self.assertIn('nothing sent', str(error))
        self.assertEqual(held.result(TIMEOUT), 'held')
        big.join(TIMEOUT)
        self.assertEqual(sizes, [64 << 20])


@each_mode(transports=('tcp', 'pipe'))
class Timeouts(HubCase):
    def test_timeout_raises_and_the_next_call_gets_its_own_reply(self):
        service = Service()
        p = self.serve(service, timeout=0.3)
        start = time.monotonic()
        with self.assertRaises(dopy.CallTimeoutError) as caught:
            p.wait_for_release('stale')
        self.assertIsInstance(caught.exception, TimeoutError)
        self.assertLess(time.monotonic() - start, TIMEOUT)
        self.assertIn('not re-sent', str(caught.exception))
        service.release.set()
        self.assertEqual(p.echo('fresh'), 'fresh')
        self.assertEqual(p.echo('fresh again'), 'fresh again')

class Caller:
    """Calls back a client's object, from a method or from a thread of its own."""

    def __init__(self):
        self.callback = None

    def save(self, callback):
        self.callback = callback

    def ping(self, value):
        return self.callback.ping(value)

    def ping_later(self, value):
        done = threading.Event()
        answers = []
        threading.Thread(target=lambda: (answers.append(self.callback.ping(value)), done.set())).start()
        done.wait(TIMEOUT)
        return answers

    def slow_echo(self, seconds, value):
        time.sleep(seconds)
        return value


class Pinged:
    def ping(self, value):
        return ('pong', value)


class TimedReads(HubCase):
    """A reader with a deadline sleeps in recv under the socket's own timeout; a reader without one still waits for ever."""

    def idle(self, seconds):
        """Let the connections sit idle, past the timeouts under test."""
        threading.Event().wait(seconds)

    def test_a_reply_that_comes_after_the_sockets_own_timeout_but_in_time_is_read(self):
        p = self.serve(Caller(), timeout=1.5)
        self.assertEqual(p.slow_echo(0, 'first'), 'first')
        # The socket's timeout is 0.9 of the call's, 1.35 s: this reply comes after it.
        self.assertEqual(p.slow_echo(1.4, 'late'), 'late')
        self.assertEqual(p.slow_echo(0, 'after'), 'after')

    def test_a_server_connection_read_with_a_deadline_serves_on_after_it(self):
        self.hub.call_timeout = 0.2
        p = self.serve(Caller())
        p.save(dopy.ref(Pinged()))
        connection = p._dopy_link.connection
        # Called back from the method, on the connection's own thread: it
        # reads the reply itself, with the server's 0.2 s deadline.
        self.assertEqual(p.ping(1), ('pong', 1))
        self.idle(0.5)
        self.assertEqual(p.ping(2), ('pong', 2))
        self.assertEqual(p.slow_echo(0, 'still'), 'still')
        self.assertIs(p._dopy_link.connection, connection)
        self.assertFalse(connection.closed)

    def test_a_client_connection_read_with_a_deadline_serves_callbacks_after_it(self):
        p = self.serve(Caller(), timeout=0.2)
        self.assertEqual(p.slow_echo(0, 'timed'), 'timed')
        connection = p._dopy_link.connection
        # From now on the client's own thread reads, with no deadline.
        p.save(dopy.ref(Pinged()))
        self.idle(0.5)
        self.assertEqual(p.ping_later(3), [('pong', 3)])
        self.assertIs(p._dopy_link.connection, connection)
        self.assertFalse(connection.closed)


@each_mode()
class TcpTimeouts(HubCase):
    def test_late_reply_on_a_shared_connection_is_discarded_by_id(self):
        service = Service()
        self.hub.addObject('obj', service)
        self.server = dopy.tcp.makeServer(0, hub=self.hub)
        listener = socket.create_server(('127.0.0.1', 0))
        self.addCleanup(listener.close)
        # A hand-written peer that answers the second call first, then the first.
        client = raw_client(self.server.port)
        self.addCleanup(client.close)
        client.sendall(wire.encode(wire.CALL, 1, ('obj', 'wait_for_release', ('first',), {})))
        self.assertTrue(service.started.wait(TIMEOUT))
        client.sendall(wire.encode(wire.CALL, 2, ('obj', 'echo', ('second',), {})))
        service.release.set()
        decoder = wire.Decoder()
        frames = []
        while len(frames) < 2:
            data = client.recv(65536)
            self.assertTrue(data)
            decoder.feed(data)
            while (frame := decoder.next_frame()) is not None:
                _, request_id, data, _, _ = frame
                frames.append((request_id, wire.loads(data)))
        self.assertEqual(sorted(frames), [(1, 'first'), (2, 'second')])

    def test_bad_timeouts_are_refused(self):
        self.hub.addObject('obj', Service())
        server = dopy.tcp.makeServer(0, hub=self.hub)
        for timeout in (0, -1):
            with self.subTest(timeout=timeout), self.assertRaises(ValueError):
                dopy.tcp.remote('127.0.0.1', server.port, 'obj', timeout=timeout, hub=self.client_hub)


@each_mode()
class ServerGoesAway(HubCase):
    def stuck_call_warning(self):
        """Closing a server whose connection thread is stuck in a method warns (the other modes have no such thread)."""
        return (self.assertLogs("dopy", "WARNING") if self.hub.threadMode == dopy.THRD_CONN
                else contextlib.nullcontext())

    def test_future_fails_when_the_connection_is_lost(self):
        self.service = Service()
        self.p = self.serve(self.service)
        future = self.p.wait_for_release.future('never')
        self.assertTrue(self.service.started.wait(TIMEOUT))
        with self.stuck_call_warning():
            self.server.close(timeout=0.1)
        with self.assertRaises(dopy.ConnectionLostError):
            future.result(TIMEOUT)
        self.service.release.set()


    def test_no_server_listening_is_a_communication_error(self):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            port = s.getsockname()[1]
        start = time.monotonic()
        with self.assertRaises(dopy.CommunicationError) as caught:
            dopy.tcp.remote('127.0.0.1', port, 'obj', hub=self.client_hub)
        self.assertIsInstance(caught.exception, ConnectionError)
        self.assertIsInstance(caught.exception.__cause__, OSError)
        self.assertLess(time.monotonic() - start, TIMEOUT)

    def test_connect_timeout_is_bounded(self):
        with full_listener() as port:
            start = time.monotonic()
            try:
                dopy.tcp.remote('127.0.0.1', port, 'obj', timeout=0.5, hub=self.client_hub)
            except dopy.CallTimeoutError:
                self.assertLess(time.monotonic() - start, TIMEOUT)
            except dopy.CommunicationError:
                pass  # the system refused rather than queued: bounded all the same
            else:
                self.skipTest('this system accepted past a full backlog')

    def resolver(self, answers):
        """Patch the system resolver: ``answers`` maps a host name to its IP or to an exception to raise;
        other names go to the real resolver.  Returns the names looked up, with the thread each was looked up on."""
        real, asked = socket.getaddrinfo, []

        def getaddrinfo(host, port, *args, **kwargs):
            asked.append((host, threading.get_ident()))
            answer = answers.get(host)
            if callable(answer):
                answer = answer()
            if isinstance(answer, BaseException):
                raise answer
            return real(answer if answer is not None else host, port, *args, **kwargs)

        patcher = mock.patch('socket.getaddrinfo', getaddrinfo)
        patcher.start()
        self.addCleanup(patcher.stop)
        return asked

    def test_a_name_server_that_never_answers_cannot_hold_up_a_connect(self):
        release = threading.Event()
        self.addCleanup(release.set)
        self.resolver({'hung.example': lambda: release.wait(TIMEOUT) and socket.gaierror(socket.EAI_AGAIN, 'late')})
        start = time.monotonic()
        with self.assertRaises(dopy.CallTimeoutError) as caught:
            dopy.tcp.remote('hung.example', 9600, 'obj', timeout=0.2, hub=self.client_hub)
        self.assertLess(time.monotonic() - start, TIMEOUT)
        self.assertIn('looking up hung.example timed out', str(caught.exception))

    def test_a_host_name_is_looked_up_off_the_calling_thread_and_connected_to(self):
        self.hub.addObject('obj', Service())
        server = dopy.tcp.makeServer(0, '127.0.0.1', hub=self.hub)
        asked = self.resolver({'server.example': '127.0.0.1'})
        p = dopy.tcp.remote('server.example', server.port, 'obj', timeout=TIMEOUT, hub=self.client_hub)
        self.addCleanup(dopy.close, p)
        self.assertEqual(p.echo('by name'), 'by name')
        self.assertEqual([host for host, _ in asked], ['server.example'])
        self.assertNotEqual(asked[0][1], threading.get_ident())

    def test_an_unknown_host_name_is_a_communication_error_with_the_resolvers_reason(self):
        self.resolver({'nowhere.example': socket.gaierror(socket.EAI_NONAME, 'Name or service not known')})
        with self.assertRaises(dopy.CommunicationError) as caught:
            dopy.tcp.remote('nowhere.example', 9600, 'obj', timeout=TIMEOUT, hub=self.client_hub)
        self.assertIn('nowhere.example', str(caught.exception))
        self.assertIsInstance(caught.exception.__cause__, socket.gaierror)

    def test_localhost_and_ip_addresses_are_looked_up_on_the_calling_thread(self):
        self.hub.addObject('obj', Service())
        server = dopy.tcp.makeServer(0, '127.0.0.1', hub=self.hub)
        asked = self.resolver({})
        for host in ('127.0.0.1', 'localhost'):
            p = dopy.tcp.remote(host, server.port, 'obj', timeout=TIMEOUT, hub=self.client_hub)
            self.addCleanup(dopy.close, p)
            self.assertEqual(p.echo(host), host)
        self.assertTrue(all(thread == threading.get_ident() for _, thread in asked))
        self.assertNotIn('127.0.0.1', [host for host, _ in asked])

    def called_then_closed(self):
        """A proxy that made a call to a server closed since: the proxy, and the port to serve on again."""
        self.hub.addObject('obj', Service())
        server = dopy.tcp.makeServer(0, hub=self.hub)
        p = dopy.tcp.remote('127.0.0.1', server.port, 'obj', timeout=TIMEOUT, hub=self.client_hub)
        self.addCleanup(dopy.close, p)
        self.assertEqual(p.echo(1), 1)
        server.close()
        return p, server.port

    def test_server_closed_between_calls_then_back_reconnects(self):
        p, port = self.called_then_closed()
        with self.assertRaises(dopy.CommunicationError):
            p.echo(2)
        self.server = dopy.tcp.makeServer(port, hub=self.hub)
        self.assertEqual(p.echo(3), 3)

    def count_hang_up_checks(self, proxy):
        """A list that grows by one each time ``proxy``'s connection asks whether its peer hung up."""
        asked = []
        stream = proxy._dopy_link.connection._stream
        check = stream.peer_closed
        stream.peer_closed = lambda: asked.append(True) or check()
        return asked

    def test_a_connection_in_steady_use_is_not_asked_about_a_hang_up_before_every_call(self):
        p = self.serve(Service())
        p.echo(0)
        asked = self.count_hang_up_checks(p)
        with mock.patch('dopy.proxy.HANG_UP_CHECK_INTERVAL', 3600):
            for i in range(50):
                self.assertEqual(p.echo(i), i)
        self.assertEqual(asked, [])

    def test_a_connection_whose_check_interval_has_passed_is_asked_before_the_next_call(self):
        p = self.serve(Service())
        p.echo(0)
        asked = self.count_hang_up_checks(p)
        with mock.patch('dopy.proxy.HANG_UP_CHECK_INTERVAL', 0):
            for i in range(5):
                self.assertEqual(p.echo(i), i)
        self.assertEqual(len(asked), 5)

    def test_server_closed_then_back_after_the_check_interval_reconnects_with_no_call_failing(self):
        p, port = self.called_then_closed()
        self.server = dopy.tcp.makeServer(port, hub=self.hub)
        with mock.patch('dopy.proxy.HANG_UP_CHECK_INTERVAL', 0):
            self.assertEqual(p.echo(2), 2)

    def test_server_closed_mid_call_fails_the_call_quickly(self):
        service = Service()
        p = self.serve(service, timeout=None)
        errors = []

        def call():
            try:
                p.wait_for_release(1)
            except dopy.CommunicationError as exc:
                errors.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        self.assertTrue(service.started.wait(TIMEOUT))
        with self.stuck_call_warning():
            self.server.close(timeout=0.1)
        caller.join(TIMEOUT)
        service.release.set()
        self.assertFalse(caller.is_alive())
        self.assertEqual(len(errors), 1)
        self.assertIsInstance(errors[0], dopy.ConnectionLostError)


class LoopConnect(HubCase):
    thread_mode = dopy.THRD_NONE

    def test_a_thrd_none_hub_serves_others_while_one_of_its_methods_connects(self):
        hub = self.hub

        class Dialer:
            def dial(self, port):
                try:
                    dopy.tcp.remote('127.0.0.1', port, 'obj', timeout=2.0, hub=hub)
                except dopy.CommunicationError as exc:
                    return type(exc).__name__
                return 'connected'

        self.serve(Service())
        dialer = self.serve(Dialer(), 'dialer')
        other = self.proxy()
        with full_listener() as port:
            dialling = dialer.dial.future(port)
            self.assertEqual(other.echo('served meanwhile'), 'served meanwhile')
            served_first = not dialling.done()
            outcome = dialling.result(TIMEOUT)
        if outcome == 'connected':
            self.skipTest('this system accepted past a full backlog')
        self.assertEqual(outcome, 'CallTimeoutError')
        self.assertTrue(served_first, 'the other client waited for the connect')


@each_mode()
class OwnServer(HubCase):
    def test_a_method_can_call_the_server_of_its_own_hub(self):
        hub = self.hub

        class Relay:
            def via_own_server(self, port):
                with dopy.tcp.remote('127.0.0.1', port, 'obj', timeout=TIMEOUT, hub=hub) as p:
                    return p.echo('the long way round')

        self.serve(Service())
        relay = self.serve(Relay(), 'relay')
        self.assertEqual(relay.via_own_server(self.server.port), 'the long way round')


@each_mode()
class Addresses(HubCase):
    def test_server_port_zero_and_close_is_idempotent(self):
        server = dopy.tcp.makeServer(0, hub=self.hub)
        self.assertGreater(server.port, 0)
        self.assertEqual(server.host, '127.0.0.1')
        server.close()
        server.close()

    def test_server_as_context_manager(self):
        self.hub.addObject('obj', Service())
        with dopy.tcp.makeServer(0, hub=self.hub) as server:
            p = dopy.tcp.remote('localhost', server.port, 'obj', timeout=TIMEOUT, hub=self.client_hub)
            self.assertEqual(p.echo('in'), 'in')
            dopy.close(p)
        with self.assertRaises(dopy.CommunicationError):
            dopy.tcp.remote('127.0.0.1', server.port, 'obj', timeout=TIMEOUT, hub=self.client_hub)

    def test_ipv6_loopback(self):
        if not socket.has_ipv6:
            self.skipTest('no IPv6 in this Python')
        try:
            server = dopy.tcp.makeServer(0, host='::1', hub=self.hub)
        except dopy.CommunicationError as exc:
            self.skipTest(f'no IPv6 loopback here: {exc}')
        self.hub.addObject('obj', Service())
        p = dopy.tcp.remote('::1', server.port, 'obj', timeout=TIMEOUT, hub=self.client_hub)
        self.addCleanup(dopy.close, p)
        self.assertEqual(p.echo('six'), 'six')
        self.assertEqual(str(p), f'tcp:[::1]:{server.port}:obj')
        again = self.client_hub.makeRemoteObject(str(p), timeout=TIMEOUT)
        self.addCleanup(dopy.close, again)
        self.assertEqual(again.echo(6), 6)

    def test_an_ipv6_host_may_come_in_brackets(self):
        reason = ipv6_loopback()
        if reason:
            self.skipTest(reason)
        server = dopy.tcp.makeServer(0, host='[::1]', hub=self.hub)
        self.assertEqual(server.address, f'[::1]:{server.port}')
        self.hub.addObject('obj', Service())
        p = dopy.tcp.remote('[::1]', server.port, 'obj', timeout=TIMEOUT, hub=self.client_hub)
        self.addCleanup(dopy.close, p)
        self.assertEqual(p.echo('six'), 'six')
        self.assertEqual(str(p), f'tcp:[::1]:{server.port}:obj')

    def test_port_in_use_is_a_clear_error(self):
        server = dopy.tcp.makeServer(0, hub=self.hub)
        with self.assertRaises(dopy.CommunicationError) as caught:
            dopy.tcp.makeServer(server.port, hub=self.hub)
        self.assertIn(str(server.port), str(caught.exception))

    def test_bad_ports(self):
        for port in (-1, 65536, '9600', None):
            with self.subTest(port=port), self.assertRaises(ValueError):
                dopy.tcp.makeServer(port, hub=self.hub)


def ipv6_loopback():
    """None if this machine can serve on ::1, else why not."""
    if not socket.has_ipv6:
        return 'no IPv6 in this Python'
    try:
        socket.create_server(('::1', 0), family=socket.AF_INET6).close()
    except OSError as exc:
        return f'no IPv6 loopback here: {exc}'
    return None


class _Warned(logging.Handler):
    """Sets ``event`` at the first warning."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.event = threading.Event()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())
        self.event.set()


@each_mode()
class WrongServer(HubCase):
    """Pointed at something that is not a DOPY server, or not the way it serves, a client says what is likely wrong."""

    def listener(self):
        """A TCP listener that accepts (its backlog does) and never says anything."""
        listener = socket.create_server(('127.0.0.1', 0))
        self.addCleanup(listener.close)
        return listener

    def remote(self, port, timeout, host='127.0.0.1'):
        return dopy.tcp.remote(host, port, 'obj', timeout=timeout, hub=self.client_hub)

    def warnings(self):
        handler = _Warned()
        target = logging.getLogger('dopy.auth')
        target.addHandler(handler)
        self.addCleanup(target.removeHandler, handler)
        return handler

    def test_a_server_that_never_greets_times_out_saying_what_it_likely_is(self):
        listener = self.listener()
        start = time.monotonic()
        with self.assertRaisesRegex(dopy.CallTimeoutError,
                                    r'no DOPY greeting: not a DOPY server, or one that expects TLS\?'):
            self.remote(listener.getsockname()[1], timeout=0.3)
        self.assertLess(time.monotonic() - start, TIMEOUT / 2)

    def test_a_silent_server_is_warned_about_soon_and_waited_for_until_the_deadline(self):
        listener = self.listener()
        warned = self.warnings()

        def hang_up_once_warned():
            if warned.event.wait(TIMEOUT):
                sock, _ = listener.accept()
                sock.close()
        closer = threading.Thread(target=hang_up_once_warned)
        closer.start()
        self.addCleanup(closer.join, TIMEOUT)
        start = time.monotonic()
        # Closed after the warning, and before the deadline: what the client waited for.
        with self.assertRaisesRegex(dopy.ConnectionLostError, 'closed the connection with no DOPY greeting'):
            self.remote(listener.getsockname()[1], timeout=TIMEOUT)
        self.assertGreaterEqual(time.monotonic() - start, dopy.auth.GREETING_GRACE)
        self.assertEqual(len(warned.messages), 1)
        self.assertIn('no DOPY greeting: not a DOPY server, or one that expects TLS?', warned.messages[0])

    def test_a_server_of_another_protocol_is_told_apart_at_once(self):
        listener = self.listener()

        def answer_like_http():
            sock, _ = listener.accept()
            with sock:
                sock.sendall(b'HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n')
        server = threading.Thread(target=answer_like_http)
        server.start()
        self.addCleanup(server.join, TIMEOUT)
        start = time.monotonic()
        with self.assertRaisesRegex(dopy.ProtocolError, "not a DOPY server: it greeted with b'HTTP/1.1'"):
            self.remote(listener.getsockname()[1], timeout=TIMEOUT)
        self.assertLess(time.monotonic() - start, dopy.auth.GREETING_GRACE)

    def test_a_plain_client_of_a_tls_server_is_told_it_may_expect_tls(self):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        certs = os.path.join(ROOT, 'tests', 'certs')
        context.load_cert_chain(os.path.join(certs, 'server.pem'), os.path.join(certs, 'server.key'))
        self.hub.addObject('obj', Service())
        server = dopy.tcp.makeServer(0, hub=self.hub, ssl_context=context)
        with self.assertRaisesRegex(dopy.CallTimeoutError, 'one that expects TLS'):
            self.remote(server.port, timeout=0.3)
        # Each waits for the other; the server lets go first.
        server.handshake_timeout = 0.3
        with logged('dopy.auth'):
            with self.assertRaisesRegex(dopy.ConnectionLostError, 'no DOPY greeting.*expects TLS'):
                self.remote(server.port, timeout=TIMEOUT)

    @unittest.skipIf(ipv6_loopback(), ipv6_loopback())
    def test_ipv6_loopback_against_an_ipv4_only_server_says_so(self):
        self.hub.addObject('obj', Service())
        server = dopy.tcp.makeServer(0, host='127.0.0.1', hub=self.hub)
        for host in ('::1', '[::1]'):
            with self.subTest(host=host):
                with self.assertRaisesRegex(dopy.CommunicationError,
                                            rf'cannot connect to \[::1\]:{server.port}: .*IPv4 only.*127\.0\.0\.1'):
                    self.remote(server.port, TIMEOUT, host=host)


class RealServerSlowToGreet(HubCase):
    """A THRD_NONE server accepts on its loop, which runs calls too: one busy in a call greets late."""

    thread_mode = dopy.THRD_NONE

    def test_a_client_warns_but_waits_for_a_dopy_server_slow_to_greet(self):
        service = Service()
        self.hub.addObject('obj', service)
        server = dopy.tcp.makeServer(0, hub=self.hub)
        busy = raw_client(server.port)
        self.addCleanup(busy.close)
        busy.sendall(wire.encode(wire.CALL, 1, ('obj', 'wait_for_release', ('busy',), {})))
        self.assertTrue(service.started.wait(TIMEOUT))
        warned = _Warned()
        logging.getLogger('dopy.auth').addHandler(warned)
        self.addCleanup(logging.getLogger('dopy.auth').removeHandler, warned)
        releaser = threading.Thread(target=lambda: warned.event.wait(TIMEOUT) and service.release.set())
        releaser.start()
        self.addCleanup(releaser.join, TIMEOUT)
        p = dopy.tcp.remote('127.0.0.1', server.port, 'obj', timeout=TIMEOUT, hub=self.client_hub)
        self.addCleanup(dopy.close, p)
        self.assertEqual(p.echo('late'), 'late')
        self.assertEqual(len(warned.messages), 1)
        self.assertIn('in case it is a busy DOPY server', warned.messages[0])


class MessageLimit(HubCase):
    def test_oversized_call_closes_that_connection_only(self):
        hub = dopy.Hub(max_message_size=10_000)
        self.addCleanup(hub.shutdown)
        hub.addObject('obj', Service())
        server = dopy.tcp.makeServer(0, hub=hub)
        p = dopy.tcp.remote('127.0.0.1', server.port, 'obj', timeout=TIMEOUT, hub=self.client_hub)
        self.addCleanup(dopy.close, p)
        with self.assertLogs('dopy', 'WARNING') as logs, self.assertRaises(dopy.ConnectionLostError):
            p.echo(b'x' * 20_000)
        self.assertEqual(len(logs.output), 1)
        self.assertIn('over the limit of 10000 bytes', logs.output[0])
        self.assertEqual(p.echo(b'small'), b'small')


if __name__ == '__main__':
    unittest.main()
