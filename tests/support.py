"""What the tests share: a per-test watchdog, hubs with servers, and processes with bounded waits."""

import faulthandler
import os
import select
import signal
import subprocess
import sys
import unittest

import dopy
import dopy.tcp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_SERVER = os.path.join(ROOT, 'tests', 'fixture_server.py')

# Every wait in the tests is bounded by this, and every test by the watchdog.
TIMEOUT = 10.0
TEST_WATCHDOG = 120


class Case(unittest.TestCase):
    """A test that dumps every thread's stack and exits if it runs past the watchdog."""

    def setUp(self):
        faulthandler.dump_traceback_later(TEST_WATCHDOG, exit=True)
        self.addCleanup(faulthandler.cancel_dump_traceback_later)


class HubCase(Case):
    """A test with its own hub, shut down at the end."""

    def setUp(self):
        super().setUp()
        self.hub = dopy.Hub()
        self.addCleanup(self.hub.shutdown)

    def serve(self, obj, name='obj', timeout=TIMEOUT):
        """Publish ``obj``, serve it on a free loopback port, return a proxy to it."""
        self.hub.addObject(name, obj)
        if not getattr(self, 'server', None):
            self.server = dopy.tcp.makeServer(0, hub=self.hub)
        return self.proxy(name, timeout=timeout)

    def proxy(self, name='obj', timeout=TIMEOUT):
        proxy = dopy.tcp.remote('127.0.0.1', self.server.port, name, timeout=timeout, hub=self.hub)
        self.addCleanup(dopy.close, proxy)
        return proxy


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
    """The next line of a child's pipe, waiting at most ``timeout`` seconds for it."""
    poller = select.poll()
    poller.register(stream, select.POLLIN)
    if not poller.poll(timeout * 1000):
        raise AssertionError(f'no line from the child within {timeout} s')
    return stream.readline()


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
