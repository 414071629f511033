"""What the tests share: a per-test watchdog, hubs with servers, and processes with bounded waits."""

import contextlib
import faulthandler
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest

import dopy
import dopy.tcp
from dopy import wire
from dopy.auth import client_handshake
from dopy.connection import Connection
from dopy.proxy import RemoteObject
from dopy.streams import PipeStream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_SERVER = os.path.join(ROOT, 'tests', 'fixture_server.py')

MODES = (dopy.THRD_CONN, dopy.THRD_FUNC, dopy.THRD_NONE)

# Every wait in the tests is bounded by this, and every test by the watchdog.
TIMEOUT = 10.0
TEST_WATCHDOG = 120


class Case(unittest.TestCase):
    """A test that dumps every thread's stack and exits if it runs past the watchdog.

    A test meant to run longer, such as a soak, raises ``watchdog``.
    """

    watchdog = TEST_WATCHDOG

    def setUp(self):
        faulthandler.dump_traceback_later(self.watchdog, exit=True)
        self.addCleanup(faulthandler.cancel_dump_traceback_later)


class _Collect(logging.Handler):
    def __init__(self, count):
        super().__init__()
        self.records = []
        self.count = count
        self.enough = threading.Event()

    def emit(self, record):
        self.records.append(record)
        if len(self.records) >= self.count:
            self.enough.set()


@contextlib.contextmanager
def logged(logger='dopy', level=logging.WARNING, count=1):
    """Collect ``logger``'s records; on exit, wait (bounded) until ``count`` have come from any thread."""
    target = logging.getLogger(logger)
    handler = _Collect(count)
    handler.setLevel(level)
    old_level = target.level
    target.addHandler(handler)
    if target.getEffectiveLevel() > level:
        target.setLevel(level)
    try:
        yield handler.records
        if not handler.enough.wait(TIMEOUT):
            raise AssertionError(f'fewer than {count} {logging.getLevelName(level)} records on '
                                 f'{logger} within {TIMEOUT} s: {[r.getMessage() for r in handler.records]}')
    finally:
        target.removeHandler(handler)
        target.setLevel(old_level)


class HubCase(Case):
    """A test with a server hub (``self.hub``) and a client hub, both shut down at the end.

    ``thread_mode`` and ``transport`` ('tcp', or 'pipe': a pair of pipes
    inside this process) say how; ``each_mode`` makes the variants.  In
    THRD_NONE the server hub's loop runs in a thread of the test's, as it
    would in the server's own process.
    """

    thread_mode = dopy.THRD_CONN
    transport = 'tcp'
    # More settings for both hubs.
    hub_settings = {}

    def setUp(self):
        super().setUp()
        self.hub = dopy.Hub(threadMode=self.thread_mode, **self.hub_settings)
        self.client_hub = dopy.Hub(threadMode=self.thread_mode, **self.hub_settings)
        self.server = None
        if self.thread_mode == dopy.THRD_NONE:
            loop = threading.Thread(target=self.hub.mainloop, kwargs={'console': False},
                                    name='test-server-loop')
            loop.start()
            # Cleanups run last first: the shutdowns below stop the loop, then it is joined.
            self.addCleanup(lambda: self.assertFalse(loop.is_alive(), "the server loop did not stop"))
            self.addCleanup(loop.join, TIMEOUT)
        self.addCleanup(self.client_hub.shutdown)
        self.addCleanup(self.hub.shutdown)

    def serve(self, obj, name='obj', timeout=TIMEOUT):
        """Publish ``obj``, serve it, return a proxy to it."""
        self.hub.addObject(name, obj)
        if self.transport == 'tcp' and self.server is None:
            self.server = dopy.tcp.makeServer(0, hub=self.hub)
        return self.proxy(name, timeout=timeout)

    def proxy(self, name='obj', timeout=TIMEOUT):
        """A new proxy, on a connection of its own, from the client hub."""
        if self.transport == 'tcp':
            proxy = dopy.tcp.remote('127.0.0.1', self.server.port, name, timeout=timeout,
                                    hub=self.client_hub)
        else:
            proxy = pipe_proxy(self.hub, self.client_hub, name, timeout)
        self.addCleanup(dopy.close, proxy)
        return proxy


def pipe_proxy(server_hub, client_hub, name, timeout):
    """A proxy to ``name`` of ``server_hub`` over two pipes, the way dopy.rsh links two processes."""
    to_server, to_client = os.pipe(), os.pipe()
    server_side = Connection(PipeStream(to_server[0], to_client[1]), server_hub, 'pipe client')
    server_hub._add_connection(server_side)
    if server_hub.threaded:
        threading.Thread(target=server_side.serve, name='test-pipe-server', daemon=True).start()
    client_side = Connection(PipeStream(to_client[0], to_server[1]), client_hub, 'pipe server',
                             close_when_unused=True)
    client_hub._add_connection(client_side)
    return RemoteObject(f'pipe:{name}', name, None, timeout, connection=client_side)


def each_mode(transports=('tcp',), modes=MODES):
    """Class decorator: the class runs as THRD_CONN over TCP; add a variant for every other mode and transport."""
    def decorate(cls):
        module = sys.modules[cls.__module__]
        for mode in modes:
            for transport in transports:
                if (mode, transport) == (cls.thread_mode, cls.transport):
                    continue
                name = f'{cls.__name__}_{mode}_{transport}'
                setattr(module, name, type(cls)(name, (cls,), {
                    'thread_mode': mode, 'transport': transport,
                    '__module__': cls.__module__, '__qualname__': name}))
        return cls
    return decorate


def eventually(condition, what, timeout=TIMEOUT):
    """Poll ``condition()`` until it is true; fail naming ``what`` if it is not within ``timeout``.

    For state another thread reaches a moment after an event this test
    cannot wait on (a peer's departure noticed, a thread gone idle).
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f'still not {what} after {timeout} s')
        time.sleep(0.01)


def one_frame(data):
    """The one whole frame that the bytes ``data`` hold, its fields named (``wire.Frame``)."""
    decoder = wire.Decoder()
    decoder.feed(data)
    frame = decoder.next_frame()
    if frame is None or decoder.next_frame() is not None:
        raise AssertionError(f'not one frame: {data!r:.60}')
    return wire.Frame._make(frame)


def raw_client(port, authkey=None):
    """A plain socket to a DOPY server on 127.0.0.1, past the handshake: frames go next."""
    sock = socket.create_connection(('127.0.0.1', port), timeout=TIMEOUT)
    client_handshake(sock, authkey, time.monotonic() + TIMEOUT)
    return sock


def child_env():
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    env['PYTHONUNBUFFERED'] = '1'
    return env


def spawn(args, **kwargs):
    """Start ``python3 args...`` with pipes on all three streams, text mode."""
    return subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(), cwd=ROOT, **kwargs)


def read_line(stream, timeout=TIMEOUT):
    """The next line of a child's pipe ('' at its end), waiting at most ``timeout`` seconds for it.

    It reads the descriptor a byte at a time: a file object's ``readline``
    would buffer the lines after this one, where the next wait for the
    descriptor could not see them.
    """
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(stream, select.POLLIN)
    line = bytearray()
    while not line.endswith(b'\n'):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            raise AssertionError(f'no line from the child within {timeout} s (got {bytes(line)!r})')
        byte = os.read(stream.fileno(), 1)
        if not byte:
            break
        line += byte
    return line.decode()


def stop(proc, timeout=TIMEOUT):
    """End a child: close its input, wait; kill it if it does not go. Returns (status, out, err)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f'child {proc.args} did not exit within {timeout} s; stderr: {err}')
    return proc.returncode, out, err


class ServerProcess:
    """tests/fixture_server.py in a child process: a server whose classes the client lacks."""

    def __init__(self, port=0):
        self.proc = spawn([FIXTURE_SERVER, '--port', str(port)])
        line = read_line(self.proc.stdout)
        if not line.startswith('PORT '):
            self.proc.kill()
            raise AssertionError(f'fixture server did not start: {line!r} {self.proc.stderr.read()}')
        self.port = int(line.split()[1])

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.proc.poll() is None:
            stop(self.proc)
        else:
            self.proc.communicate()

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(TIMEOUT)
        self.proc.communicate()
