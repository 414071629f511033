"""Real processes: the scripts end to end, a server in another process, kill -9 and restart."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import dopy
import dopy.tcp
from tests.support import (FIXTURE_SERVER, MODES, ROOT, TIMEOUT, HubCase, ServerProcess, child_env,
                           eventually, read_line, spawn, stop)

DOPYSERVER = os.path.join(ROOT, 'dopyserver')
DOPYCLIENT = os.path.join(ROOT, 'dopyclient')


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def start_dopyserver(*args, interactive=False):
    proc = spawn(['-i', DOPYSERVER, *args] if interactive else [DOPYSERVER, *args])
    banner = read_line(proc.stderr)
    if 'serving' not in banner:
        proc.kill()
        raise AssertionError(f'dopyserver did not start: {banner!r}')
    return proc, int(banner.rsplit(':', 1)[1])


def run_client(*args, env=None):
    return subprocess.run([sys.executable, DOPYCLIENT, *args], capture_output=True, text=True,
                          timeout=TIMEOUT * 3, cwd=ROOT, env={**os.environ, **(env or {})})


CERTS = os.path.join(ROOT, 'tests', 'certs')


class ScriptSecurity(unittest.TestCase):
    def key_file(self, mode=0o600):
        fd, path = tempfile.mkstemp(prefix='dopy-test-key-')
        self.addCleanup(os.remove, path)
        os.write(fd, b'a key for the scripts\n')
        os.close(fd)
        os.chmod(path, mode)
        return path

    def test_the_scripts_share_a_key_from_a_file_and_from_the_environment(self):
        server, port = start_dopyserver('--port', '0', '--authkey-file', self.key_file())
        keyed = run_client(f'localhost:{port}', env={'DOPY_AUTHKEY': 'a key for the scripts'})
        keyless = run_client(f'localhost:{port}')
        status, _, err = stop(server)
        self.assertEqual(keyed.returncode, 0, keyed.stderr)
        self.assertTrue(keyed.stdout.endswith('test of exceptions ok\n'), keyed.stdout)
        self.assertNotEqual(keyless.returncode, 0)
        self.assertEqual(len(keyless.stderr.splitlines()), 1, keyless.stderr)
        self.assertIn('authkey', keyless.stderr)
        self.assertEqual(status, 0, err)

    def test_a_key_file_other_users_may_read_is_warned_about(self):
        client = run_client(f'127.0.0.1:{free_port()}', '--authkey-file', self.key_file(0o644))
        self.assertIn('chmod 600', client.stderr)

    def test_the_scripts_over_tls(self):
        server, port = start_dopyserver('--port', '0', '--tls-cert', os.path.join(CERTS, 'server.pem'),
                                        '--tls-key', os.path.join(CERTS, 'server.key'))
        trusting = run_client(f'localhost:{port}', '--tls-ca', os.path.join(CERTS, 'ca.pem'))
        plain = run_client(f'localhost:{port}', '--timeout', '1')
        status, _, err = stop(server)
        self.assertEqual(trusting.returncode, 0, trusting.stderr)
        self.assertTrue(trusting.stdout.endswith('test of exceptions ok\n'), trusting.stdout)
        self.assertNotEqual(plain.returncode, 0)
        self.assertNotIn('Traceback', plain.stderr)
        self.assertEqual(status, 0, err)


class ConsoleInput(unittest.TestCase):
    def test_dopyserver_runs_a_file_as_its_console_and_stops_at_its_end_in_every_mode(self):
        for mode in MODES:
            for lines in ("print('from the file', 6 * 7)\n", ''):
                with self.subTest(mode=mode, input='file' if lines else 'empty file'):
                    with tempfile.TemporaryFile('w+') as script:
                        script.write(lines)
                        script.seek(0)
                        result = subprocess.run(
                            [sys.executable, DOPYSERVER, '--port', '0', '--thread-mode', mode],
                            stdin=script, capture_output=True,
                            text=True, timeout=TIMEOUT * 3, cwd=ROOT, env=child_env())
                    self.assertEqual(result.returncode, 0, result.stderr)
                    self.assertNotIn('Traceback', result.stderr)
                    if lines:
                        self.assertIn('from the file 42', result.stdout)

    def test_a_line_typed_while_a_thrd_none_console_line_waits_runs_after_it(self):
        child = spawn(['-c', CONSOLE_WAITING_SERVER])
        try:
            port = int(read_line(child.stdout))
            child.stdin.write("print('first:', p.slow())\n")
            child.stdin.flush()
            self.assertEqual(read_line(child.stdout).strip(), 'slow entered')
            child.stdin.write("print('second')\n")
            child.stdin.flush()
            with dopy.tcp.remote('127.0.0.1', port, 'slow', timeout=TIMEOUT, hub=dopy.Hub()) as p:
                p.release()
            self.assertEqual(read_line(child.stdout).strip(), 'first: slow done')
            self.assertEqual(read_line(child.stdout).strip(), 'second')
        finally:
            status, _, err = stop(child)
        self.assertEqual(status, 0, err)
        self.assertNotIn('Error', err)


# A THRD_NONE hub whose console calls a slow method of a threaded hub in the
# same process; the test releases the method once it has typed a second line.
CONSOLE_WAITING_SERVER = """
import threading, dopy, dopy.tcp
class Slow:
    def __init__(self):
        self.released = threading.Event()
    def slow(self):
        print('slow entered', flush=True)
        self.released.wait(30)
        return 'slow done'
    def release(self):
        self.released.set()
server_hub = dopy.Hub()
server_hub.addObject('slow', Slow())
server = dopy.tcp.makeServer(0, hub=server_hub)
print(server.port, flush=True)
hub = dopy.init(threadMode=dopy.THRD_NONE)
p = dopy.tcp.remote('127.0.0.1', server.port, 'slow', timeout=30, hub=hub)
hub.mainloop(namespace={'p': p})
server_hub.shutdown()
"""


class Scripts(HubCase):
    def test_dopyclient_prints_the_four_lines_against_dopyserver(self):
        server, port = start_dopyserver('--port', '0')
        client = run_client(f'localhost:{port}')
        status, _, err = stop(server)
        self.assertEqual(client.stdout, f'connecting to localhost:{port}...\n'
                                        'test of basic method invocation ok\n'
                                        'test of keyword parms ok\n'
                                        'test of exceptions ok\n')
        self.assertEqual(client.returncode, 0, client.stderr)
        self.assertEqual(client.stderr, '')
        self.assertEqual(status, 0, err)

    def test_dopyclient_without_a_server_says_so_in_one_line(self):
        port = free_port()
        client = run_client(f'127.0.0.1:{port}')
        self.assertNotEqual(client.returncode, 0)
        self.assertEqual(client.stdout, f'connecting to 127.0.0.1:{port}...\n')
        self.assertEqual(len(client.stderr.splitlines()), 1, client.stderr)
        self.assertIn('cannot connect', client.stderr)
        self.assertNotIn('Traceback', client.stderr)

    def test_dopyclient_names_the_failing_test(self):
        class Broken:
            def echo(self, value):
                return value

            def add(self, a, b=0):
                return a + b + 1

        self.hub.addObject('test', Broken())
        server = dopy.tcp.makeServer(0, hub=self.hub)
        client = run_client(f'127.0.0.1:{server.port}')
        self.assertEqual(client.returncode, 1)
        self.assertIn('test of basic method invocation FAILED', client.stderr)
        self.assertIn('add(2, 3)', client.stderr)
        self.assertNotIn('Traceback', client.stderr)

    def test_dopyclient_rejects_a_bad_address(self):
        client = run_client('localhost:notaport')
        self.assertEqual(client.returncode, 2)
        self.assertIn('bad port', client.stderr)

    def test_a_line_typed_into_the_console_publishes_an_object(self):
        for mode in MODES:
            with self.subTest(mode=mode):
                server, port = start_dopyserver('--port', '0', '--thread-mode', mode)
                server.stdin.write('class Greeter:\n'
                                   '    def greet(self, who):\n'
                                   '        return "hello " + who\n'
                                   '\n'
                                   'hub.addObject("greeter", Greeter())\n'
                                   'print("published", hub.threadMode, flush=True)\n')
                server.stdin.flush()
                self.assertEqual(read_line(server.stdout), f'published {mode}\n')
                p = dopy.tcp.remote('127.0.0.1', port, 'greeter', timeout=TIMEOUT, hub=self.client_hub)
                self.assertEqual(p.greet('world'), 'hello world')
                dopy.close(p)
                status, _, err = stop(server)
                self.assertEqual(status, 0, err)

    def test_console_prints_values_and_tracebacks_and_goes_on(self):
        server, _ = start_dopyserver('--port', '0')
        status, out, err = stop_with_input(server, '6 * 7\nraise KeyError("boom")\nprint("after")\n')
        self.assertEqual(status, 0, err)
        self.assertEqual(out, '42\nafter\n')
        self.assertIn('Traceback', err)
        self.assertIn("KeyError: 'boom'", err)

    def test_dopyserver_stops_when_the_hub_is_shut_down_from_a_client(self):
        server, port = start_dopyserver('--port', '0')
        server.stdin.write('hub.addObject("hub", hub)\nprint("ready", flush=True)\n')
        server.stdin.flush()
        self.assertEqual(read_line(server.stdout), 'ready\n')
        p = dopy.tcp.remote('127.0.0.1', port, 'hub', timeout=TIMEOUT, hub=self.client_hub)
        with self.assertRaises(dopy.CommunicationError):
            p.shutdown()
        self.assertEqual(server.wait(TIMEOUT), 0)
        server.communicate()

    def test_lines_after_a_typed_shutdown_do_not_run(self):
        server, _ = start_dopyserver('--port', '0')
        status, out, err = stop_with_input(server, 'print("before")\nhub.shutdown()\nprint("after")\n')
        self.assertEqual(status, 0, err)
        self.assertEqual(out, 'before\n')

    def test_ctrl_c_stops_dopyserver_with_status_zero(self):
        server, port = start_dopyserver('--port', '0')
        server.send_signal(signal.SIGINT)
        self.assertEqual(server.wait(TIMEOUT), 0)
        server.communicate()

    def test_python_dash_i_dopyserver_serves_under_the_python_prompt(self):
        server, port = start_dopyserver('--port', '0', interactive=True)
        client = run_client(f'127.0.0.1:{port}')
        self.assertEqual(client.returncode, 0, client.stderr)
        status, out, err = stop_with_input(server, 'print("typed at the prompt", hub)\n')
        self.assertEqual(status, 0, err)
        self.assertIn('typed at the prompt <dopy.Hub', out)

    def test_dopyserver_on_a_port_in_use_says_so(self):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            s.listen()
            proc = spawn([DOPYSERVER, '--port', str(s.getsockname()[1])])
            status, out, err = stop(proc)
        self.assertEqual(status, 1)
        self.assertIn('cannot serve', err)
        self.assertNotIn('Traceback', err)

    def test_help_explains_every_option(self):
        for script, words in ((DOPYSERVER, ('--host', '--port')), (DOPYCLIENT, ('HOST', '--timeout'))):
            done = subprocess.run([sys.executable, script, '--help'], capture_output=True,
                                  text=True, timeout=TIMEOUT, cwd=ROOT)
            self.assertEqual(done.returncode, 0)
            for word in words:
                self.assertIn(word, done.stdout)

    def test_the_demo_module_runs_both_scripts(self):
        done = subprocess.run([sys.executable, '-m', 'dopy.demo'], capture_output=True,
                              text=True, timeout=TIMEOUT * 6, cwd=ROOT)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn('test of exceptions ok', done.stdout)
        self.assertIn('demo ok', done.stdout)


class InstalledInAVenv(unittest.TestCase):
    """The package copied into a virtual environment that is not activated: its bin is not on the PATH."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        cls.addClassCleanup(cls.dir.cleanup)
        venv = os.path.join(cls.dir.name, 'venv')
        subprocess.run([sys.executable, '-m', 'venv', '--without-pip', venv], check=True,
                       timeout=TIMEOUT * 3)
        cls.python = os.path.join(venv, 'bin', 'python')
        site = subprocess.run([cls.python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                              capture_output=True, text=True, check=True, timeout=TIMEOUT).stdout.strip()
        # As pip installs it: the package alone, its scripts not beside it.
        shutil.copytree(os.path.join(ROOT, 'dopy'), os.path.join(site, 'dopy'),
                        ignore=shutil.ignore_patterns('__pycache__'))
        cls.env = {name: value for name, value in os.environ.items() if name != 'PYTHONPATH'}
        cls.assert_path_lacks(os.path.join(venv, 'bin'))

    @classmethod
    def assert_path_lacks(cls, directory):
        if directory in cls.env.get('PATH', '').split(os.pathsep):
            raise AssertionError(f'{directory} is on the PATH')

    def run_python(self, *args):
        return subprocess.run([self.python, *args], capture_output=True, text=True, env=self.env,
                              cwd=self.dir.name, timeout=TIMEOUT * 3)

    def test_the_demo_runs_on_the_venvs_python_without_activating_it(self):
        done = self.run_python('-m', 'dopy.demo')
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn('test of exceptions ok', done.stdout)
        self.assertIn('demo ok', done.stdout)

    def test_python_m_dopy_says_what_dopy_is_and_its_commands(self):
        done = self.run_python('-m', 'dopy')
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stderr, '')
        self.assertIn('Distributed Objects for Python', done.stdout)
        for command in ('python -m dopy.demo', 'dopyserver', 'dopyclient', 'python -m dopy server',
                        'python -m dopy client'):
            self.assertIn(command, done.stdout)
        wrong = self.run_python('-m', 'dopy', 'serve')
        self.assertEqual(wrong.returncode, 2)
        self.assertIn("no command 'serve'", wrong.stderr)
        self.assertNotIn('Traceback', wrong.stderr)

    def test_python_m_dopy_client_is_dopyclient(self):
        done = self.run_python('-m', 'dopy', 'client', '--help')
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn('usage: dopyclient', done.stdout)


class WithoutAConsole(HubCase):
    """Servers with no input to read serve until SIGTERM (or Ctrl-C), then stop cleanly."""

    def start(self, command, stdin, banner_from='stderr', **kwargs):
        """Start ``command`` with ``stdin``; its port, from dopyserver's banner or ``PORT n``."""
        proc = subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=child_env(), cwd=ROOT, **kwargs)
        self.addCleanup(self.reap, proc)
        line = read_line(getattr(proc, banner_from))
        self.assertRegex(line, r'(serving|PORT)', line)
        return proc, int(line.rsplit(':', 1)[1] if 'serving' in line else line.split()[1])

    def reap(self, proc):
        if proc.poll() is None:
            proc.kill()
        proc.communicate()

    def assert_serves_until_sigterm(self, proc, port, name='test', pid=None):
        pid = pid or proc.pid
        p = dopy.tcp.remote('127.0.0.1', port, name, timeout=TIMEOUT, hub=self.client_hub)
        self.assertEqual(p.echo('served'), 'served')
        dopy.close(p)
        # The server serves before its mainloop begins, which catches SIGTERM.
        eventually(lambda: catches(pid, signal.SIGTERM), 'catching SIGTERM')
        os.kill(pid, signal.SIGTERM)
        status, out, err = stop(proc)
        self.assertEqual(status, 0, err)
        self.assertNotIn('Traceback', err)
        return out, err

    def test_dopyserver_with_standard_input_closed_serves_until_sigterm(self):
        proc, port = self.start(['sh', '-c', 'exec "$@" 0<&-', 'sh', sys.executable, DOPYSERVER,
                                 '--port', '0'], subprocess.PIPE)
        self.assert_serves_until_sigterm(proc, port)

    def test_dopyserver_with_standard_input_open_for_writing_only_serves_until_sigterm(self):
        # What nohup makes of a terminal: /dev/null, opened for writing.
        null = os.open(os.devnull, os.O_WRONLY)
        self.addCleanup(os.close, null)
        proc, port = self.start([sys.executable, DOPYSERVER, '--port', '0'], null)
        self.assert_serves_until_sigterm(proc, port)

    def test_dopyserver_whose_standard_input_fails_to_read_says_so_and_serves_until_sigterm(self):
        # A socket that is not connected: ready at once, then ENOTCONN.
        unconnected = socket.socket()
        self.addCleanup(unconnected.close)
        proc, port = self.start([sys.executable, DOPYSERVER, '--port', '0'], unconnected.fileno())
        _, err = self.assert_serves_until_sigterm(proc, port)
        self.assertIn('cannot read its input', err)

    def test_dopyserver_with_standard_input_from_dev_null_serves_until_sigterm_in_every_mode(self):
        for mode in MODES:
            with self.subTest(mode=mode):
                proc, port = self.start([sys.executable, DOPYSERVER, '--port', '0', '--thread-mode', mode],
                                        subprocess.DEVNULL)
                self.assert_serves_until_sigterm(proc, port)

    def test_dopyserver_no_console_reads_no_input_and_serves_until_sigterm(self):
        proc, port = self.start([sys.executable, DOPYSERVER, '--port', '0', '--no-console'], subprocess.PIPE)
        proc.stdin.write('print("this line does not run")\n')
        proc.stdin.flush()
        out, _ = self.assert_serves_until_sigterm(proc, port)
        self.assertEqual(out, '')

    def test_sigterm_stops_a_console_server_with_status_zero(self):
        proc, port = self.start([sys.executable, DOPYSERVER, '--port', '0'], subprocess.PIPE)
        self.assert_serves_until_sigterm(proc, port)

    def test_a_script_s_mainloop_returns_on_sigterm_so_that_its_shutdown_runs(self):
        # fixture_server.py calls hub.shutdown() after mainloop(): the
        # default SIGTERM would end it with status -15 instead.
        proc, port = self.start([sys.executable, FIXTURE_SERVER], subprocess.DEVNULL, banner_from='stdout')
        self.assert_serves_until_sigterm(proc, port, name='service')

    def test_a_background_job_on_a_terminal_serves_and_leaves_typed_lines_alone(self):
        master, proc, pid, port = self.start_on_a_terminal(background=True)
        os.write(master, b'print("typed", 6 * 7)\n')
        out, _ = self.assert_serves_until_sigterm(proc, port, pid=pid)
        self.assertNotIn('typed 42', out)

    def test_a_foreground_job_on_a_terminal_runs_typed_lines(self):
        master, proc, pid, port = self.start_on_a_terminal(background=False)
        os.write(master, b'print("typed", 6 * 7)\n')
        self.assertIn('typed 42', read_line(proc.stdout))
        self.assert_serves_until_sigterm(proc, port, pid=pid)

    def start_on_a_terminal(self, background):
        """dopyserver with a pseudo-terminal for its terminal, in its foreground or in the background.

        A launcher makes the terminal its session's and so its own group
        the foreground; dopyserver, its child, gets a process group of its
        own when ``background``, as a shell's ``dopyserver &`` does.
        """
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        try:
            proc, port = self.start([sys.executable, '-c', TERMINAL_LAUNCHER, DOPYSERVER, str(background)],
                                    slave, start_new_session=True)
        finally:
            os.close(slave)
        pid = int(read_line(proc.stdout).split()[1])
        self.addCleanup(lambda: proc.poll() is None and os.kill(pid, signal.SIGKILL))
        return master, proc, pid, port


def catches(pid, signum):
    """Whether process ``pid`` has a handler for ``signum`` (Linux's /proc)."""
    with open(f'/proc/{pid}/status') as status:
        for line in status:
            if line.startswith('SigCgt:'):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


# Run as "python3 -c TERMINAL_LAUNCHER DOPYSERVER BACKGROUND" in a session of
# its own, its standard input a pseudo-terminal: prints "PID n", relays
# dopyserver's output and exits with its status.
TERMINAL_LAUNCHER = """
import fcntl, os, subprocess, sys, termios
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
server = subprocess.Popen([sys.executable, sys.argv[1], '--port', '0'], stdout=subprocess.PIPE,
                          preexec_fn=os.setpgrp if sys.argv[2] == 'True' else None)
os.write(1, f'PID {server.pid}\\n'.encode())
while True:
    data = os.read(server.stdout.fileno(), 4096)
    if not data:
        break
    os.write(1, data)
sys.exit(server.wait())
"""


def stop_with_input(proc, text):
    try:
        out, err = proc.communicate(text, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out, err


# A client that calls a long method, is interrupted by SIGINT (Ctrl-C),
# then calls a quick one on the same proxy; argv: port, thread mode.
INTERRUPTED_CLIENT = """
import signal, sys, time, dopy, dopy.tcp
signal.signal(signal.SIGINT, signal.default_int_handler)
hub = dopy.init(threadMode=sys.argv[2])
p = dopy.tcp.remote('127.0.0.1', int(sys.argv[1]), 'sleeper', hub=hub)
try:
    p.long()
except KeyboardInterrupt:
    print('interrupted', flush=True)
start = time.monotonic()
answer = p.echo('quick')
print(answer, round(time.monotonic() - start, 1), flush=True)
"""


class Sleeper:
    LONG = 30.0

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()

    def long(self):
        self.started.set()
        self.release.wait(self.LONG)
        return 'long done'

    def echo(self, value):
        return value


class InterruptedClient(HubCase):
    def test_after_ctrl_c_in_a_long_call_the_next_call_on_the_proxy_is_answered_at_once(self):
        # The server runs each connection's calls in turn (THRD_CONN), and
        # goes on running the abandoned call for 30 s.
        server = dopy.tcp.makeServer(0, hub=self.hub)
        for mode in MODES:
            with self.subTest(client_mode=mode):
                sleeper = Sleeper()
                self.hub.addObject('sleeper', sleeper)
                self.addCleanup(sleeper.release.set)
                proc = spawn(['-c', INTERRUPTED_CLIENT, str(server.port), mode])
                try:
                    self.assertTrue(sleeper.started.wait(TIMEOUT))
                    proc.send_signal(signal.SIGINT)
                    self.assertEqual(read_line(proc.stdout), 'interrupted\n')
                    answer, seconds = read_line(proc.stdout, timeout=5.0).split()
                    self.assertEqual(answer, 'quick')
                    self.assertLess(float(seconds), 5.0)
                finally:
                    sleeper.release.set()
                    status, _, err = stop(proc)
                self.assertEqual(status, 0, err)


class ServerInAnotherProcess(HubCase):
    def remote(self, port, timeout=TIMEOUT):
        p = dopy.tcp.remote('127.0.0.1', port, 'service', timeout=timeout, hub=self.client_hub)
        self.addCleanup(dopy.close, p)
        return p

    def test_calls_cross_the_process_boundary(self):
        with ServerProcess() as server:
            p = self.remote(server.port)
            self.assertNotEqual(p.pid(), os.getpid())
            self.assertEqual(p.echo({'x': [1, 2]}), {'x': [1, 2]})

    def test_exception_class_only_the_server_has_becomes_remote_error(self):
        with ServerProcess() as server:
            p = self.remote(server.port)
            with self.assertRaises(dopy.RemoteError) as caught:
                p.raise_server_only('secret')
            error = caught.exception
            self.assertEqual(error.remote_type, '__main__.ServerOnlyError')
            self.assertEqual(error.remote_message, 'secret')
            self.assertIn('raise ServerOnlyError(message)', error.remote_traceback)
            self.assertEqual(error.dopy_traceback[-1].name, 'raise_server_only')
            self.assertEqual(p.echo('usable'), 'usable')

    def test_result_class_only_the_server_has_is_a_client_side_serialization_error(self):
        with ServerProcess() as server:
            p = self.remote(server.port)
            with self.assertRaises(dopy.SerializationError) as caught:
                p.server_only_value()
            self.assertIn('client', str(caught.exception))
            self.assertEqual(p.echo('usable'), 'usable')

    @unittest.skipUnless(os.path.exists('/proc/self/status'), 'reads the RSS from /proc (Linux)')
    def test_server_memory_comes_back_after_a_run_of_large_payloads(self):
        payload = os.urandom(16 << 20)
        calls = {'received and sent back': lambda p: len(p.echo(payload)),
                 'received': lambda p: p.size(payload),
                 'made and sent': lambda p: len(p.blob(len(payload)))}
        for what, call in calls.items():
            with self.subTest(payloads=what), ServerProcess() as server:
                p = self.remote(server.port, timeout=TIMEOUT * 3)
                start = p.rss_kib()
                for _ in range(100):
                    self.assertEqual(call(p), len(payload))
                grown = p.rss_kib() - start
                # Freed blocks this large go back to the system at once:
                # what stays is a few MiB, well within 64.
                self.assertLess(grown, 32 << 10, f'the server kept {grown >> 10} MiB more after the run')

    def test_server_killed_mid_call_fails_the_call_at_once_and_a_restart_reconnects(self):
        server = ServerProcess()
        port = server.port
        p = self.remote(port, timeout=None)
        first_pid = p.pid()
        outcome = []

        def call():
            start = time.monotonic()
            try:
                p.slow(TIMEOUT * 3)
            except dopy.CommunicationError as exc:
                outcome.append((exc, time.monotonic() - start))

        caller = threading.Thread(target=call)
        caller.start()
        watcher = self.remote(port)
        self.assertTrue(watcher.wait_until_slow_started(TIMEOUT))
        killed_at = time.monotonic()
        server.kill()
        caller.join(TIMEOUT)
        self.assertFalse(caller.is_alive())
        self.assertEqual(len(outcome), 1)
        self.assertIsInstance(outcome[0][0], dopy.ConnectionLostError)
        self.assertLess(time.monotonic() - killed_at, 2.0)
        with ServerProcess(port) as again:
            self.assertNotEqual(p.pid(), first_pid)
            self.assertEqual(p.echo('after restart'), 'after restart')
            self.assertEqual(again.port, port)


if __name__ == '__main__':
    unittest.main()
