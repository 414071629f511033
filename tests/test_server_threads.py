"""A threaded server's threads: each connection has one of its own, which runs its calls in order and holds up no other."""

import os
import socket
import sqlite3
import statistics
import threading
import time
import unittest

import dopy
import dopy.tcp
from dopy import auth, wire
from tests.support import TIMEOUT, Case, HubCase, each_mode
from tests.test_auth import tls_contexts

# Far above a quick call's usual tenth of a millisecond, far below the
# seconds that a call held up behind another connection's would take.
QUICK = 0.05


class Sleeper:
    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()

    def echo(self, value):
        return value

    def thread(self):
        return threading.get_ident()

    def wait(self, value):
        self.entered.set()
        # Longer than a call's timeout: a call held up behind this one fails.
        if not self.release.wait(2 * TIMEOUT):
            raise TimeoutError('never released')
        return value

    def compute(self, value):
        """Hold the CPU, in Python code, until released."""
        self.entered.set()
        deadline = time.monotonic() + 2 * TIMEOUT
        count = 0
        while not self.release.is_set():
            count += 1
            if count % 10000 == 0 and time.monotonic() > deadline:
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


class Rows:
    """Keeps an sqlite3 connection per thread, as thread-bound state often is."""

    def __init__(self):
        self._local = threading.local()

    def _db(self):
        db = getattr(self._local, 'db', None)
        if db is None:
            # check_same_thread (the default) raises if another thread uses it.
            db = self._local.db = sqlite3.connect(':memory:')
            db.execute('create table rows (value)')
        return db

    def put(self, value):
        self._db().execute('insert into rows values (?)', (value,))

    def rows(self):
        return [value for (value,) in self._db().execute('select value from rows order by rowid')]


def in_threads(count, work):
    """``work(i)`` for i in range(count), each in a thread of its own, all at once; their results in order."""
    results = [None] * count
    errors = []
    start = threading.Barrier(count, timeout=TIMEOUT)

    def run(i):
        try:
            start.wait()
            results[i] = work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(4 * TIMEOUT)
    if errors:
        raise errors[0]
    return results


class ThreadPerConnection(HubCase):
    """THRD_CONN: a connection's calls all run on the one thread that reads it."""

    def test_every_call_of_a_connection_runs_on_its_own_thread(self):
        first = self.serve(Sleeper())
        proxies = [first] + [self.proxy() for _ in range(8)]
        seen = in_threads(9, lambda i: {proxies[i].thread() for _ in range(100)})
        for threads in seen:
            self.assertEqual(len(threads), 1, threads)
        self.assertEqual(len(set.union(*seen)), 9)

    def test_thread_local_state_gives_every_client_its_own_rows(self):
        first = self.serve(Rows())
        proxies = [first] + [self.proxy() for _ in range(8)]

        def client(i):
            for n in range(50):
                proxies[i].put(f'{i}-{n}')
            return proxies[i].rows()

        results = in_threads(9, client)
        for i, rows in enumerate(results):
            self.assertEqual(rows, [f'{i}-{n}' for n in range(50)])

    def test_a_call_waits_for_the_calls_before_it_on_its_connection(self):
        sleeper = Sleeper()
        blocked = self.serve(sleeper)
        first = blocked.wait.future('first')
        self.assertTrue(sleeper.entered.wait(TIMEOUT))
        behind = blocked.echo.future('behind')
        # Answered in order: the echo cannot have run before the wait ends.
        self.assertFalse(behind.done())
        sleeper.release.set()
        self.assertEqual(first.result(TIMEOUT), 'first')
        self.assertEqual(behind.result(TIMEOUT), 'behind')


@each_mode(modes=(dopy.THRD_CONN, dopy.THRD_FUNC))
class ConnectionsApart(HubCase):
    """A connection's slow method holds up no other connection."""

    def quick_calls(self, proxy):
        """The median and the longest of 20 sequential echo calls, in seconds."""
        times = []
        for i in range(20):
            start = time.perf_counter()
            self.assertEqual(proxy.echo(i), i)
            times.append(time.perf_counter() - start)
        return statistics.median(times), max(times)

    def check_quick_beside(self, method):
        sleeper = Sleeper()
        slow = self.serve(sleeper)
        other = self.proxy()
        other.echo('warm')
        running = getattr(slow, method).future('slow')
        self.assertTrue(sleeper.entered.wait(TIMEOUT))
        median, longest = self.quick_calls(other)
        sleeper.release.set()
        self.assertEqual(running.result(TIMEOUT), 'slow')
        self.assertLess(median, QUICK, f'median {median * 1000:.1f} ms, longest {longest * 1000:.1f} ms')

    def test_a_quick_call_stays_quick_while_another_connections_method_blocks(self):
        self.check_quick_beside('wait')

    def test_a_quick_call_stays_quick_while_another_connections_method_computes(self):
        self.check_quick_beside('compute')

    def test_a_method_waiting_for_a_callback_holds_up_no_other_connection(self):
        visiting = self.serve(Sleeper())
        other = self.proxy()
        visitor = Visitor()
        result = visiting.visit.future(dopy.ref(visitor), 'visited')
        self.assertTrue(visitor.entered.wait(TIMEOUT))
        self.assertEqual(other.echo('other'), 'other')
        visitor.release.set()
        self.assertEqual(result.result(TIMEOUT), 'visited')

    def test_calls_pipelined_on_one_connection_are_all_answered(self):
        p = self.serve(Sleeper())
        futures = [p.echo.future(i) for i in range(500)]
        self.assertEqual([f.result(TIMEOUT) for f in futures], list(range(500)))


class Notifier:
    """Keeps a client's callback, to call it from another of the server's threads while a slow method runs."""

    def __init__(self):
        self.callback = None
        self.entered = threading.Event()
        self.release = threading.Event()

    def save(self, callback):
        self.callback = callback

    def thread(self):
        return threading.get_ident()

    def slow(self):
        self.entered.set()
        if not self.release.wait(2 * TIMEOUT):
            raise TimeoutError('never released')
        return threading.get_ident()

    def ping_beside(self, count):
        """Call the callback ``count`` times from this method and as many from another thread at once: both lists of answers."""
        others = []
        thread = threading.Thread(target=lambda: others.extend(self.callback.ping(i) for i in range(count)))
        thread.start()
        own = [self.callback.ping(i) for i in range(count)]
        thread.join(TIMEOUT)
        return own, others


class Recorder:
    def ping(self, value):
        return ('pong', value)


class LateRecorder:
    """A callback that answers only once ``ready`` is set."""

    def __init__(self, ready):
        self.ready = ready

    def ping(self, value):
        if not self.ready.wait(TIMEOUT):
            raise TimeoutError('never ready')
        return ('pong', value)


def call_in_thread(function, *args):
    """``function(*args)`` in another thread, as a server's own thread would call; its result, bounded."""
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(function(*args)))
    thread.start()
    thread.join(TIMEOUT)
    if not outcome:
        raise AssertionError(f'no answer within {TIMEOUT} s')
    return outcome[0]


@each_mode(modes=(dopy.THRD_CONN, dopy.THRD_FUNC))
class CallbacksBesideASlowMethod(HubCase):
    """A callback over a client's connection is answered at once, whatever that connection's thread is running."""

    def slow_method_running(self):
        """A proxy whose object holds a callback to it, with a slow method running: ``(notifier, proxy, its connection's thread, the slow call's future)``."""
        notifier = Notifier()
        p = self.serve(notifier)
        p.save(dopy.ref(Recorder()))
        own_thread = p.thread()
        slow = p.slow.future()
        self.assertTrue(notifier.entered.wait(TIMEOUT))
        return notifier, p, own_thread, slow

    def test_a_callback_from_another_server_thread_is_answered_while_the_connections_method_runs(self):
        notifier, p, own_thread, slow = self.slow_method_running()
        behind = p.thread.future()
        self.assertEqual(call_in_thread(notifier.callback.ping, 'note'), ('pong', 'note'))
        if self.thread_mode == dopy.THRD_CONN:
            # Read meanwhile by the thread that called back, and left for the connection's own thread.
            self.assertFalse(behind.done())
        notifier.release.set()
        if self.thread_mode == dopy.THRD_CONN:
            self.assertEqual(slow.result(TIMEOUT), own_thread)
            self.assertEqual(behind.result(TIMEOUT), own_thread)
        else:
            slow.result(TIMEOUT)
            behind.result(TIMEOUT)

    def test_a_callback_waiting_before_the_connections_method_began_is_answered_while_it_runs(self):
        notifier = Notifier()
        p = self.serve(notifier)
        # Answered once the slow method has begun: the server's thread that
        # calls it back waits for the reply from before then.
        p.save(dopy.ref(LateRecorder(notifier.entered)))
        p.thread()
        answers = []
        caller = threading.Thread(target=lambda: answers.append(notifier.callback.ping('early')))
        caller.start()
        slow = p.slow.future()
        caller.join(TIMEOUT)
        self.assertEqual(answers, [('pong', 'early')])
        self.assertFalse(slow.done())
        notifier.release.set()
        slow.result(TIMEOUT)

    def test_a_method_and_another_server_thread_calling_back_over_one_connection_at_once_both_get_their_answers(self):
        p = self.serve(Notifier())
        p.save(dopy.ref(Recorder()))
        answers = [('pong', i) for i in range(200)]
        self.assertEqual(p.ping_beside(200), (answers, answers))
        self.assertEqual(p.ping_beside(1), (answers[:1], answers[:1]))

    def test_calls_read_by_another_thread_run_in_order_on_the_connections_thread(self):
        notifier, p, own_thread, slow = self.slow_method_running()
        behind = [p.thread.future() for _ in range(20)]
        for i in range(5):
            self.assertEqual(call_in_thread(notifier.callback.ping, i), ('pong', i))
        notifier.release.set()
        threads = [slow.result(TIMEOUT)] + [f.result(TIMEOUT) for f in behind]
        if self.thread_mode == dopy.THRD_CONN:
            self.assertEqual(set(threads), {own_thread})


def context_switches(native_ids):
    """Voluntary and involuntary context switches of these threads of this process, so far."""
    total = 0
    for tid in native_ids:
        with open(f'/proc/self/task/{tid}/status') as status:
            for line in status:
                if line.startswith(('voluntary_ctxt_switches', 'nonvoluntary_ctxt_switches')):
                    total += int(line.split()[1])
    return total


@unittest.skipUnless(os.path.exists('/proc/self/task'), 'needs Linux /proc')
@each_mode(modes=(dopy.THRD_CONN, dopy.THRD_FUNC))
class IdleServer(HubCase):
    """An idle server sleeps: no timer, no watchdog, no polling."""

    def test_an_idle_servers_threads_make_no_wakeups(self):
        first = self.serve(Sleeper())
        proxies = [first] + [self.proxy() for _ in range(4)]
        for i, p in enumerate(proxies):
            self.assertEqual(p.echo(i), i)
        dopy_threads = [t for t in threading.enumerate() if t.name.startswith('dopy')]
        # The accept thread and a thread for each connection, at least.
        self.assertGreaterEqual(len(dopy_threads), 6, [t.name for t in dopy_threads])
        native_ids = [t.native_id for t in dopy_threads]
        # The threads that answered the last calls go back to sleep a moment
        # after their replies have left: wait, bounded, until none moves.
        before = context_switches(native_ids)
        deadline = time.monotonic() + TIMEOUT
        while True:
            time.sleep(0.1)
            now = context_switches(native_ids)
            if now == before or time.monotonic() > deadline:
                break
            before = now
        # Not a wait for anything: the window over which nothing may happen.
        time.sleep(1.0)
        self.assertEqual(context_switches(native_ids), before,
                         f'threads that woke: {[t.name for t in dopy_threads]}')


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
        kind, _, data, _, _ = frame
        self.assertEqual((kind, wire.loads(data)), (wire.REPLY, 'behind'))


class Gate:
    """A service that waits until someone opens it."""

    def __init__(self):
        self.opened = threading.Event()

    def wait(self):
        return 'opened' if self.opened.wait(TIMEOUT) else 'never opened'

    def open(self):
        self.opened.set()


class Middle:
    """Waits on a gate of a third hub, which only a call of its own client, sent meanwhile, opens."""

    def __init__(self, hub, port):
        self.hub, self.port = hub, port
        self.callback = None
        self.waiting = threading.Event()

    def gate(self):
        return dopy.tcp.remote('127.0.0.1', self.port, 'gate', timeout=2 * TIMEOUT, hub=self.hub)

    def save(self, callback):
        self.callback = callback

    def pass_gate(self):
        gate = self.gate()
        try:
            self.waiting.set()
            return gate.wait()
        finally:
            dopy.close(gate)

    def open_gate(self):
        gate = self.gate()
        try:
            gate.open()
        finally:
            dopy.close(gate)
        return 'opening'


class Opener:
    """The client's callback: asks the middle hub, over the same connection, to open the gate."""

    def __init__(self):
        self.middle = None

    def ping(self):
        return self.middle.open_gate()


class OwnerWaitingOnAnotherConnection(HubCase):
    """A connection's thread waiting for a reply on another connection still runs the calls left for it."""

    def test_a_call_left_for_a_thread_that_waits_on_another_connection_runs(self):
        gate_hub = dopy.Hub()
        self.addCleanup(gate_hub.shutdown)
        gate_hub.addObject('gate', Gate())
        gate_server = dopy.tcp.makeServer(0, hub=gate_hub)
        middle = Middle(self.hub, gate_server.port)
        p = self.serve(middle, timeout=2 * TIMEOUT)
        opener = Opener()
        opener.middle = p
        p.save(dopy.ref(opener))
        passed = p.pass_gate.future()
        self.assertTrue(middle.waiting.wait(TIMEOUT))
        # Another thread of the middle hub calls the client back over the
        # connection whose thread waits at the gate; the client's callback
        # then asks that connection, in a call that only that thread may
        # run, to open the gate.
        self.assertEqual(call_in_thread(middle.callback.ping), 'opening')
        self.assertEqual(passed.result(TIMEOUT), 'opened')
