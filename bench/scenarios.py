"""The scenarios: what a client process does in each case, and how its results become figures.

A scenario is one or more cases (throughput has four, payload two); each
case runs against a fresh server process, so that memory figures start
clean.  A case's ``client`` function runs in each client process as
``client(system, port, params, sync)`` and returns ``{'metrics': ...,
'notes': ...}``; ``sync(label)`` waits until every client process of the
case has reached ``label`` and the harness has read the server's memory
figures there.  The case's ``combine`` turns the results of its client
processes and those memory readings into the case's metrics.

The instructions scenario is not timed, and has no client function: its
one case counts with valgrind (see ``instructions.py``), once per run,
since the count does not vary as timings do.
"""

import os
import random
import threading
import time

from harness import memory
from systems import RESULT_TIMEOUT, NotApplicable, expect

SCENARIOS = ('instructions', 'latency', 'throughput', 'payload', 'connect', 'idle', 'pipelining')
MIB = 1 << 20
# Calls kept in flight at a time in the pipelining scenario, and oneway
# calls sent before waiting for the server to have run them.
WINDOW = 100
ONEWAY_BURST = 1000
# Threads opening the idle scenario's connections: enough to hide a slow
# handshake, few enough not to overflow a listen backlog.
_HOLDING_THREADS = 8


class Case:
    """One measurement: a fresh server, ``processes`` client processes running ``client``."""

    def __init__(self, name, scenario, client, params, combine, processes=1, work=1.0,
                 server_cpus=None, client_cpus=None, repeated=True):
        self.name = name
        self.scenario = scenario
        self.client = client
        self.params = params
        self.combine = combine
        self.processes = processes
        # The CPUs the server and the client processes are kept on (None: not pinned).
        self.server_cpus = server_cpus
        self.client_cpus = client_cpus
        # False for a count made once per run, which repetitions would not change.
        self.repeated = repeated
        # Generous, so that only a hang trips it, however slow a system is.
        self.timeout = 60.0 + 30.0 * work


def cases(quick):
    """Every case, sized for a full run of a few minutes on 2 cores or, with ``quick``, a smoke run."""
    seconds = 0.1 if quick else 1.0
    short = 0.05 if quick else 0.3
    warmup = 0.02 if quick else 0.1
    result = [Case('instructions', 'instructions', None,
                   {'calls': 200, 'warm': 50} if quick else {'calls': 2000, 'warm': 300}, None,
                   repeated=False),
              Case('latency', 'latency', latency, {'seconds': seconds, 'warmup': warmup}, only_client)]
    for name, server_cpus, client_cpus in pinnings()[0]:
        result.append(Case(name, 'latency', latency, {'seconds': seconds, 'warmup': warmup},
                           only_client, server_cpus=server_cpus, client_cpus=client_cpus))
    for connections in (8, 64):
        for processes in (1, 2):
            result.append(Case(
                f'throughput-{connections}x{processes}', 'throughput', throughput,
                {'seconds': seconds, 'connections': connections // processes, 'connect_timeout': 5.0},
                add_clients, processes=processes))
    sizes = (1 * MIB,) if quick else (1 * MIB, 64 * MIB)
    for size in sizes:
        result.append(Case(
            f'payload-{size // MIB}MiB', 'payload', payload,
            # One timed 64 MiB call is enough where one takes seconds (RPyC).
            {'seconds': short if size <= MIB else seconds, 'size': size,
             'min_calls': 3 if size <= MIB else 1},
            payload_memory, work=size / (8 * MIB)))
    result.append(Case('connect', 'connect', connect, {'seconds': seconds}, only_client))
    result.append(Case('idle', 'idle', idle,
                       {'seconds': short, 'warmup': warmup, 'connections': 50 if quick else 1000,
                        'connect_timeout': 60.0},
                       idle_memory, work=5.0))
    result.append(Case('pipelining', 'pipelining', pipelining,
                       {'seconds': short, 'warmup': warmup, 'window': WINDOW}, only_client))
    return result


def pinnings():
    """The pinned latency cases this machine allows, as (name, server CPUs, client CPUs), and why any is missing.

    Where the two processes run moves a round trip's time more than most
    code does: on one core each call switches from one process to the
    other; on two, each side wakes up on its own core.
    """
    if not hasattr(os, 'sched_setaffinity'):
        return [], ['latency pinned: not measured, this system cannot pin a process to a CPU']
    cpus = sorted(os.sched_getaffinity(0))
    found = [('latency-1core', {cpus[0]}, {cpus[0]})]
    if len(cpus) < 2:
        return found, ['latency-2cores: not measured, this process may use only one CPU']
    return [*found, ('latency-2cores', {cpus[0]}, {cpus[1]})], []


# --- what a client process does ----------------------------------------------------

def _timed_calls(echo, warmup, seconds):
    """Sequential echo(42) calls for ``seconds`` after ``warmup``: (per-call ns, elapsed s)."""
    end = time.perf_counter() + warmup
    while time.perf_counter() < end:
        expect(echo(42), 42)
    clock = time.perf_counter_ns
    samples = []
    start = previous = clock()
    end = start + int(seconds * 1e9)
    while previous < end:
        expect(echo(42), 42)
        now = clock()
        samples.append(now - previous)
        previous = now
    return samples, (previous - start) / 1e9


def _percentile(samples, percent):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * percent / 100))]


def latency(system, port, params, sync):
    client = system.connect(port)
    try:
        samples, elapsed = _timed_calls(client.echo, params['warmup'], params['seconds'])
    finally:
        system.close(client)
    return {'metrics': {'calls_per_s': len(samples) / elapsed,
                        'p50_us': _percentile(samples, 50) / 1000,
                        'p99_us': _percentile(samples, 99) / 1000},
            'notes': {}}


class _Opening:
    """Connections opened by several threads at once, each given up on after a time limit.

    A connection still opening when ``wait`` gives up counts as failed, and
    is closed by its thread if it opens later.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._over = False
        self.held = []
        self.failed = 0
        self.errors = []

    @property
    def over(self):
        return self._over

    def opened(self, connection):
        """Keep ``connection``; False if it came too late, and is the caller's to close."""
        with self._cond:
            if self._over:
                return False
            self.held.append(connection)
            self._cond.notify_all()
            return True

    def fail(self, exc):
        with self._cond:
            if not self._over:
                self.failed += 1
                self.errors.append(repr(exc))
                self._cond.notify_all()

    def wait(self, n, timeout):
        """Wait until ``n`` connections opened or failed, at most ``timeout`` seconds."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.held) + self.failed >= n, timeout)
            self._over = True
            missing = n - len(self.held) - self.failed
            if missing:
                self.failed += missing
                self.errors.insert(0, f'{missing} connection(s) still not open after {timeout} s')

    def note(self):
        return {'failures': '; '.join(dict.fromkeys(self.errors[:10]))} if self.errors else {}


def throughput(system, port, params, sync):
    """``connections`` threads, each with a connection of its own, calling echo(42) flat out."""
    n = params['connections']
    opening = _Opening()
    start, stop = threading.Event(), threading.Event()
    calls = [0] * n
    phase = ['connecting'] * n
    call_errors = []

    def worker(i):
        try:
            client = system.connect(port)
            expect(client.echo(42), 42)
        except Exception as exc:
            opening.fail(exc)
            return
        try:
            if not opening.opened(client):
                return
            phase[i] = 'calling'
            start.wait()
            echo = client.echo
            while not stop.is_set():
                expect(echo(42), 42)
                # A call that ends after the stop falls outside the measured time.
                if not stop.is_set():
                    calls[i] += 1
        except Exception as exc:
            call_errors.append(repr(exc))
        finally:
            phase[i] = 'closing'
            system.close(client)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    opening.wait(n, params['connect_timeout'])
    sync('ready')
    began = time.perf_counter()
    start.set()
    time.sleep(params['seconds'])
    stop.set()
    elapsed = time.perf_counter() - began
    deadline = time.monotonic() + params['connect_timeout']
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    # A thread stuck connecting is already counted, by opening.wait.
    stuck = [phase[i] for i, thread in enumerate(threads) if thread.is_alive()]
    stuck_calls, stuck_closes = stuck.count('calling'), stuck.count('closing')
    notes = opening.note()
    if call_errors:
        notes['failed_calls'] = call_errors[0]
    after = f'{params["connect_timeout"]} s after the stop'
    if stuck_calls:
        notes['stuck_calls'] = f'{stuck_calls} call(s) still unanswered {after}'
    if stuck_closes:
        notes['stuck_closes'] = f'{stuck_closes} connection(s) still closing {after}'
    return {'metrics': {'calls_per_s': sum(calls) / elapsed, 'failed_connections': opening.failed,
                        'failed_calls': len(call_errors) + stuck_calls, 'failed_closes': stuck_closes},
            'notes': notes}


def payload(system, port, params, sync):
    """echo() of ``size`` random bytes (random, so that no compression flatters anyone)."""
    size = params['size']
    value = random.Random(size).randbytes(size)
    client = system.connect(port)
    try:
        expect(client.echo(42), 42)
        sync('ready')
        calls = 0
        busy = 0.0
        # No warm-up call: one 64 MiB call can take seconds.  Only the calls
        # themselves are timed, not the checks of what came back.
        while busy < params['seconds'] or calls < params['min_calls']:
            began = time.perf_counter()
            reply = client.echo(value)
            busy += time.perf_counter() - began
            # The first reply is compared in full, the others by size: a full
            # compare costs as much as a copy.
            if (reply != value) if calls == 0 else (len(reply) != size):
                raise AssertionError('the payload came back changed')
            # Dropped before the next call: holding it would double the peak.
            reply = None
            calls += 1
    finally:
        system.close(client)
    return {'metrics': {'mb_per_s': size * calls / busy / 1e6,
                        'client_peak_mib': memory('self')['hwm_kib'] / 1024},
            'notes': {}}


def connect(system, port, params, sync):
    """New connection, one call, close, again and again."""
    def once():
        client = system.connect(port)
        try:
            expect(client.echo(42), 42)
        finally:
            system.close(client)

    once()
    done = failed = 0
    notes = {}
    start = time.perf_counter()
    end = start + params['seconds']
    while time.perf_counter() < end:
        try:
            once()
            done += 1
        except Exception as exc:
            failed += 1
            notes.setdefault('failures', repr(exc))
    elapsed = time.perf_counter() - start
    return {'metrics': {'connects_per_s': done / elapsed, 'failed': failed}, 'notes': notes}


def idle(system, port, params, sync):
    """A call's latency before and while ``connections`` idle connections are held."""
    probe = system.connect(port)
    held = []
    fresh = None
    try:
        usual, _ = _timed_calls(probe.echo, params['warmup'], params['seconds'])
        sync('before')
        opening = _hold_many(system, port, params['connections'], params['connect_timeout'])
        held = opening.held
        notes = opening.note()
        sync('after')
        metrics = {'held': len(held), 'failed': opening.failed, 'usual_p50_us': _percentile(usual, 50) / 1000}
        try:
            fresh = system.connect(port)
            meanwhile, _ = _timed_calls(fresh.echo, params['warmup'], params['seconds'])
        except Exception as exc:
            notes['meanwhile_p50_us'] = f'a fresh call failed while the connections were held: {exc!r}'
        else:
            metrics['meanwhile_p50_us'] = _percentile(meanwhile, 50) / 1000
            metrics['meanwhile_x_usual'] = metrics['meanwhile_p50_us'] / metrics['usual_p50_us']
    finally:
        for connection in held:
            system.release(connection)
        for client in (probe, fresh):
            if client is not None:
                system.close(client)
    return {'metrics': metrics, 'notes': notes}


def _hold_many(system, port, n, timeout):
    """Open ``n`` idle connections, a few at a time (opening one may take a while)."""
    opening = _Opening()
    todo = iter(range(n))
    lock = threading.Lock()

    def work():
        while not opening.over:
            with lock:
                if next(todo, None) is None:
                    return
            try:
                connection = system.hold(port)
            except Exception as exc:
                opening.fail(exc)
                continue
            if not opening.opened(connection):
                system.release(connection)

    for _ in range(min(n, _HOLDING_THREADS)):
        threading.Thread(target=work, daemon=True).start()
    opening.wait(n, timeout)
    return opening


def pipelining(system, port, params, sync):
    """Sequential calls, then ``window`` calls in flight at a time, then oneway calls, on one connection."""
    client = system.connect(port)
    notes = {}
    try:
        samples, elapsed = _timed_calls(client.echo, params['warmup'], params['seconds'])
        sequential = len(samples) / elapsed
        metrics = {'sequential_calls_per_s': sequential}
        try:
            run = system.pipelined(client)
        except NotApplicable as exc:
            notes['pipelined_calls_per_s'] = str(exc)
        else:
            rate = _pipelined_rate(run, params['window'], params['seconds'])
            metrics['pipelined_calls_per_s'] = rate
            metrics['pipelined_x_sequential'] = rate / sequential
        try:
            send = system.oneway(client)
        except NotApplicable as exc:
            notes['oneway_calls_per_s'] = str(exc)
        else:
            rate = _oneway_rate(send, client.sunk_count, params['seconds'])
            metrics['oneway_calls_per_s'] = rate
            metrics['oneway_x_sequential'] = rate / sequential
    finally:
        system.close(client)
    return {'metrics': metrics, 'notes': notes}


def _pipelined_rate(run, window, seconds):
    run(window)
    calls = 0
    start = time.perf_counter()
    while True:
        run(window)
        calls += window
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls / elapsed


def _oneway_rate(send, sunk_count, seconds):
    """Oneway calls per second, counted as run by the server, not merely sent.

    They go in bursts, each waited for until the server has run it, so that
    a server slower than its client never piles up more than one burst.
    """
    send(None)
    _wait_for_count(sunk_count, 1)
    sent = 0
    start = time.perf_counter()
    while True:
        for _ in range(ONEWAY_BURST):
            send(None)
        sent += ONEWAY_BURST
        _wait_for_count(sunk_count, sent + 1)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return sent / elapsed


def _wait_for_count(sunk_count, expected):
    deadline = time.monotonic() + RESULT_TIMEOUT
    while (count := sunk_count()) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f'only {count} of {expected} oneway calls reached the server')
        time.sleep(0.001)
    if count != expected:
        raise AssertionError(f'the server ran {count} oneway calls, {expected} were sent')


# --- how results become a case's metrics -------------------------------------------------

def only_client(results, probes):
    (result,) = results
    return result


def add_clients(results, probes):
    metrics = {}
    notes = {}
    for result in results:
        for key, value in result['metrics'].items():
            metrics[key] = metrics.get(key, 0) + value
        for key, value in result['notes'].items():
            notes.setdefault(key, value)
    return {'metrics': metrics, 'notes': notes}


def payload_memory(results, probes):
    result = only_client(results, probes)
    result['metrics']['server_peak_mib'] = probes['end']['hwm_kib'] / 1024
    result['metrics']['server_base_mib'] = probes['ready']['rss_kib'] / 1024
    return result


def idle_memory(results, probes):
    result = only_client(results, probes)
    held = result['metrics']['held']
    if held:
        growth = probes['after']['rss_kib'] - probes['before']['rss_kib']
        result['metrics']['server_kib_per_connection'] = growth / held
    return result


# --- what the table shows ----------------------------------------------------------------

class Row:
    """A line of the table: one metric of one case.

    ``failures`` name counts shown beside the figure (summed over the
    repetitions, not a median: one failure is one too many);
    ``ratio`` is False for figures already relative to something.
    """

    def __init__(self, case, metric, label, fmt, ratio=True, failures=()):
        self.case = case
        self.metric = metric
        self.label = label
        self.fmt = fmt
        self.ratio = ratio
        self.failures = failures


ROWS = [
    Row('instructions', 'server_instructions', 'instructions/call: server', '{:,.0f}'),
    Row('instructions', 'client_instructions', 'instructions/call: client', '{:,.0f}'),
    Row('instructions', 'total_instructions', 'instructions/call: total', '{:,.0f}'),
    Row('latency', 'calls_per_s', 'latency: calls/s', '{:,.0f}'),
    Row('latency', 'p50_us', 'latency: p50 us', '{:,.1f}'),
    Row('latency', 'p99_us', 'latency: p99 us', '{:,.1f}'),
    *(Row(f'latency-{where}', metric, f'latency, {label}: {unit}', fmt)
      for where, label in (('1core', 'both on one core'), ('2cores', 'on two cores'))
      for metric, unit, fmt in (('calls_per_s', 'calls/s', '{:,.0f}'), ('p50_us', 'p50 us', '{:,.1f}'))),
    *(Row(f'throughput-{c}x{p}', 'calls_per_s', f'throughput {c} conns, {p} proc: calls/s', '{:,.0f}',
          failures=('failed_connections', 'failed_calls', 'failed_closes'))
      for c in (8, 64) for p in (1, 2)),
    *(Row(f'payload-{size}MiB', metric, f'payload {size} MiB: {label}', fmt)
      for size in (1, 64)
      for metric, label, fmt in (('mb_per_s', 'MB/s', '{:,.0f}'),
                                 ('server_peak_mib', 'server peak RSS MiB', '{:,.1f}'),
                                 ('client_peak_mib', 'client peak RSS MiB', '{:,.1f}'))),
    Row('connect', 'connects_per_s', 'connect: proxy + first call /s', '{:,.0f}', failures=('failed',)),
    Row('idle', 'held', 'idle: connections held', '{:,.0f}', ratio=False, failures=('failed',)),
    Row('idle', 'server_kib_per_connection', 'idle: server RSS KiB/conn', '{:,.1f}'),
    Row('idle', 'usual_p50_us', 'idle: call p50 us before', '{:,.1f}'),
    Row('idle', 'meanwhile_p50_us', 'idle: call p50 us while held', '{:,.1f}'),
    Row('idle', 'meanwhile_x_usual', 'idle: while held / before', '{:.2f}x', ratio=False),
    Row('pipelining', 'sequential_calls_per_s', 'pipelining: sequential calls/s', '{:,.0f}'),
    Row('pipelining', 'pipelined_calls_per_s', f'pipelining: {WINDOW} in flight calls/s', '{:,.0f}'),
    Row('pipelining', 'pipelined_x_sequential', 'pipelining: in flight / sequential', '{:.1f}x', ratio=False),
    Row('pipelining', 'oneway_calls_per_s', 'pipelining: oneway calls/s', '{:,.0f}'),
    Row('pipelining', 'oneway_x_sequential', 'pipelining: oneway / sequential', '{:.1f}x', ratio=False),
]
