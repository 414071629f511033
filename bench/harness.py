"""The processes of one case: a server process, its client processes, and a bounded wait for each.

Every process is started with the 'spawn' method, so that none inherits
another system's threads or sockets, and talks to this one over a pipe.
A case ends, however it went, with every one of its processes gone:
asked to stop, then terminated, then killed, each step with a time limit.
"""

import multiprocessing
import multiprocessing.connection
import os
import resource
import time
import traceback

from systems import SYSTEMS, EchoService

_CTX = multiprocessing.get_context('spawn')
_STOP_TIMEOUT = 5.0


class CaseError(Exception):
    """A case that produced no figures; ``detail`` holds the traceback from the process that failed."""

    def __init__(self, message, detail=''):
        super().__init__(message)
        self.detail = detail


def raise_fd_limit():
    """Let this process hold as many descriptors as the hard limit allows (the idle scenario needs 1,000+)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # an unlimited hard limit cannot be the soft one: keep the soft limit


def memory(pid):
    """The current and peak resident set size of process ``pid`` (or ``'self'``), in KiB."""
    fields = {}
    with open(f'/proc/{pid}/status') as status:
        for line in status:
            name, _, value = line.partition(':')
            if name in ('VmRSS', 'VmHWM'):
                fields[name] = int(value.split()[0])
    return {'rss_kib': fields['VmRSS'], 'hwm_kib': fields['VmHWM']}


def _pin(cpus):
    """Keep this process on ``cpus`` (None: wherever the scheduler likes); first thing, so that its threads inherit it."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def _server_main(system_name, cpus, conn):
    _pin(cpus)
    raise_fd_limit()
    try:
        port, stop = SYSTEMS[system_name]().serve(EchoService())
    except Exception:
        conn.send(('error', traceback.format_exc()))
        return
    conn.send(('port', port))
    try:
        conn.recv()
    except EOFError:
        pass  # the parent is gone: stop all the same
    stop()


class _Aborted(Exception):
    """The parent said stop instead of go."""


def _client_main(system_name, client, params, cpus, conn):
    _pin(cpus)
    raise_fd_limit()
    try:
        port = conn.recv()
    except EOFError:
        return

    def sync(label):
        conn.send(('sync', label))
        if conn.recv() != 'go':
            raise _Aborted(label)

    try:
        result = client(SYSTEMS[system_name](), port, params, sync)
    except (_Aborted, EOFError):
        return
    except BaseException:
        conn.send(('error', traceback.format_exc()))
        return
    conn.send(('result', result))


class _Child:
    """A spawned process and the parent's end of its pipe."""

    def __init__(self, role, target, args):
        self.role = role
        self.conn, child_end = _CTX.Pipe()
        self.process = _CTX.Process(target=target, args=(*args, child_end), daemon=True)
        self.process.start()
        child_end.close()

    def recv(self, deadline):
        if not self.conn.poll(max(0.0, deadline - time.monotonic())):
            raise CaseError(f'the {self.role} process did not answer in time')
        try:
            return self.conn.recv()
        except EOFError:
            self.process.join(1.0)
            raise CaseError(f'the {self.role} process ended (exit code {self.process.exitcode}) '
                            'without a result') from None

    def stop(self):
        """Ask the process to stop, then insist; return a note if it had to be forced."""
        try:
            self.conn.send('stop')
        except OSError:
            pass  # it has already gone
        self.process.join(_STOP_TIMEOUT)
        note = None
        if self.process.is_alive():
            note = f'the {self.role} process did not stop within {_STOP_TIMEOUT:.0f} s and was terminated'
            self.process.terminate()
            self.process.join(_STOP_TIMEOUT)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(_STOP_TIMEOUT)
        elif self.process.exitcode:
            note = f'the {self.role} process exited with code {self.process.exitcode}'
        self.conn.close()
        return note


def run_case(system_name, case):
    """Run ``case`` against ``system_name``: ``{'metrics': ..., 'notes': ...}``, or ``CaseError``."""
    deadline = time.monotonic() + case.timeout
    # The clients start while the server does: both spend most of that time importing.
    server = _Child('server', _server_main, (system_name, case.server_cpus))
    clients = []
    try:
        clients = [_Child(f'client {i + 1}', _client_main, (system_name, case.client, case.params,
                                                            case.client_cpus))
                   for i in range(case.processes)]
        kind, value = server.recv(deadline)
        if kind == 'error':
            raise CaseError('the server failed to start', value)
        for client in clients:
            client.conn.send(value)
        results, probes = _drive(clients, server.process.pid, deadline)
        probes['end'] = memory(server.process.pid)
        outcome = case.combine(results, probes)
    finally:
        # The clients go first, so that they close their connections to a live server.
        stop_notes = [child.stop() for child in (*clients, server)]
    for note in filter(None, stop_notes):
        outcome['notes'].setdefault('shutdown', note)
    return outcome


def _drive(clients, server_pid, deadline):
    """Relay the clients' syncs, reading the server's memory at each, and gather their results."""
    by_conn = {client.conn: client for client in clients}
    pending = set(clients)
    waiting = {}
    results = []
    probes = {}
    while pending:
        ready = multiprocessing.connection.wait([c.conn for c in pending],
                                                max(0.0, deadline - time.monotonic()))
        if not ready:
            raise CaseError('the clients did not finish in time')
        for conn in ready:
            client = by_conn[conn]
            kind, value = client.recv(deadline)
            if kind == 'error':
                raise CaseError(f'{client.role} failed: {value.strip().splitlines()[-1]}', value)
            if kind == 'result':
                results.append(value)
                pending.discard(client)
            else:
                waiting[client] = value
        if pending and len(waiting) == len(pending):
            labels = set(waiting.values())
            if len(labels) != 1:
                raise CaseError(f'the clients are at different steps: {sorted(labels)}')
            probes[labels.pop()] = memory(server_pid)
            for client in waiting:
                client.conn.send('go')
            waiting.clear()
    return results, probes
