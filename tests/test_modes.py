"""What is particular to each threading mode, to reactors, and to the stdio transport."""

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import unittest

import dopy
import dopy.rsh
import dopy.tcp
from dopy import wire
from tests.support import raw_client, MODES, ROOT, TIMEOUT, Case, HubCase, each_mode, eventually

FIXTURE_STDIO = os.path.join(ROOT, 'tests', 'fixture_stdio.py')


class Slow:
    def __init__(self):
        self.entered = threading.Event()

    def echo(self, value):
        return value

    def size(self, value):
        return len(value)

    def slow(self, seconds, value):
        self.entered.set()
        time.sleep(seconds)
        return value


class SingleThreaded(HubCase):
    thread_mode = dopy.THRD_NONE

    def test_a_half_frame_from_one_client_does_not_stall_the_others(self):
        p = self.serve(Slow())
        stalled = raw_client(self.server.port)
        self.addCleanup(stalled.close)
        frame = wire.encode(wire.CALL, 1, ('obj', 'echo', ('never finished',), {}))
        stalled.sendall(frame[:len(frame) // 2])
        start = time.monotonic()
        for i in range(100):
            self.assertEqual(p.echo(i), i)
        self.assertLess(time.monotonic() - start, TIMEOUT)
        stalled.sendall(frame[len(frame) // 2:])
        decoder = wire.Decoder()
        decoder.feed(stalled.recv(65536))
        self.assertEqual(wire.load_frame(decoder.next_frame()), 'never finished')

    def test_no_thread_serves_anything(self):
        before = set(threading.enumerate())
        p = self.serve(Slow())
        self.assertEqual(p.echo.future(1).result(TIMEOUT), 1)
        self.assertEqual(set(threading.enumerate()) - before, set())

    def test_a_call_from_a_thread_other_than_the_loops_is_refused(self):
        self.hub.addObject('obj', Slow())
        self.server = dopy.tcp.makeServer(0, hub=self.hub)
        with self.assertRaisesRegex(dopy.DopyError, 'one thread'):
            # The server hub's loop runs in another thread; this one may not drive it.
            dopy.tcp.remote('127.0.0.1', self.server.port, 'obj', timeout=TIMEOUT,
                            hub=self.hub).echo(1)


class ThreadPerCall(HubCase):
    thread_mode = dopy.THRD_FUNC

    def test_calls_on_one_connection_run_side_by_side_and_reply_out_of_order(self):
        slow = Slow()
        p = self.serve(slow)
        order = []
        first = p.slow.future(1.0, 'slow')
        first.add_done_callback(lambda f: order.append(f.result()))
        self.assertTrue(slow.entered.wait(TIMEOUT))
        second = p.echo.future('fast')
        second.add_done_callback(lambda f: order.append(f.result()))
        self.assertEqual(second.result(TIMEOUT), 'fast')
        self.assertEqual(first.result(TIMEOUT), 'slow')
        self.assertEqual(order, ['fast', 'slow'])

    def test_an_idle_pool_thread_keeps_nothing_of_the_call_it_ran(self):
        p = self.serve(Slow())
        self.assertEqual(p.echo(b'warm'), b'warm')
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        self.assertEqual(p.size(bytes(8 << 20)), 8 << 20)
        # The reply leaves before the pool thread is done with the call.
        eventually(lambda: tracemalloc.get_traced_memory()[0] < 1 << 20,
                   'rid of the 8 MiB argument')

    def test_the_pool_is_bounded(self):
        hub = dopy.Hub(threadMode=dopy.THRD_FUNC, pool_size=2)
        self.addCleanup(hub.shutdown)
        slow = Slow()
        hub.addObject('obj', slow)
        server = dopy.tcp.makeServer(0, hub=hub)
        p = dopy.tcp.remote('127.0.0.1', server.port, 'obj', timeout=TIMEOUT, hub=self.client_hub)
        self.addCleanup(dopy.close, p)
        futures = [p.slow.future(0.3, i) for i in range(6)]
        self.assertEqual([f.result(TIMEOUT) for f in futures], list(range(6)))
        self.assertLessEqual(len([t for t in threading.enumerate() if t.name.startswith('dopy-call')]), 2)


@each_mode(modes=MODES)
class ShutdownFromInside(HubCase):
    def test_a_remote_method_shuts_its_hub_down(self):
        hub = self.hub

        class Stopper:
            def stop(self):
                hub.shutdown()
                return 'stopping'

        p = self.serve(Stopper())
        try:
            p.stop()
        except dopy.CommunicationError:
            pass  # the hub may close the connection before the reply goes out
        self.assertTrue(hub.closed)
        with self.assertRaises(dopy.CommunicationError):
            self.proxy().stop()


class OneHub(Case):
    """A test with one hub (``self.hub``) in the mode ``each_mode`` gives it, shut down at the end."""

    thread_mode = dopy.THRD_CONN
    transport = 'tcp'

    def setUp(self):
        super().setUp()
        self.hub = dopy.Hub(threadMode=self.thread_mode)
        self.addCleanup(self.hub.shutdown)


@each_mode(modes=MODES)
class Reactors(OneHub):
    def setUp(self):
        super().setUp()
        self.read_end, self.write_end = os.pipe()
        self.addCleanup(os.close, self.read_end)
        self.addCleanup(os.close, self.write_end)

    def run_mainloop(self):
        runner = threading.Thread(target=self.hub.mainloop, kwargs={'console': False})
        runner.start()
        # Cleanups run last first: shut the hub down, then join its loop.
        self.addCleanup(runner.join, TIMEOUT)
        self.addCleanup(self.hub.shutdown)
        return runner

    def test_a_reactor_on_a_pipe_is_called_from_the_loop(self):
        seen = []
        got = threading.Event()

        def on_data(fd):
            seen.append((fd, os.read(fd, 100), threading.current_thread()))
            got.set()

        self.hub.addReactor(self.read_end, on_data)
        runner = self.run_mainloop()
        os.write(self.write_end, b'ping')
        self.assertTrue(got.wait(TIMEOUT))
        self.assertEqual(seen[0][:2], (self.read_end, b'ping'))
        self.assertIs(seen[0][2], runner)
        self.hub.removeReactor(self.read_end)
        with self.assertRaises(KeyError):
            self.hub.removeReactor(self.read_end)

    def test_shutdown_from_a_reactor_callback_ends_mainloop(self):
        self.hub.addReactor(self.read_end, lambda fd: self.hub.shutdown())
        runner = self.run_mainloop()
        os.write(self.write_end, b'stop')
        runner.join(TIMEOUT)
        self.assertFalse(runner.is_alive())
        self.assertTrue(self.hub.closed)

    def test_a_failing_callback_is_logged_and_the_loop_goes_on(self):
        calls = []
        got = threading.Event()

        def flaky(fd):
            data = os.read(fd, 1)
            calls.append(data)
            if data == b'1':
                raise ValueError('reactor trouble')
            got.set()

        self.hub.addReactor(self.read_end, flaky)
        self.run_mainloop()
        with self.assertLogs('dopy', 'ERROR') as logs:
            os.write(self.write_end, b'12')
            self.assertTrue(got.wait(TIMEOUT))
        self.assertIn('reactor trouble', '\n'.join(logs.output))
        self.assertEqual(calls, [b'1', b'2'])

    def test_a_reactor_on_a_regular_file_reads_it_to_the_end(self):
        with tempfile.TemporaryFile() as f:
            f.write(b'line one\nline two\n')
            f.seek(0)
            read = []

            def on_data(fileobj):
                data = os.read(fileobj.fileno(), 4)
                read.append(data)
                if not data:
                    self.hub.removeReactor(fileobj)
                    self.hub.shutdown()

            self.hub.addReactor(f, on_data)
            runner = self.run_mainloop()
            runner.join(TIMEOUT)
            self.assertFalse(runner.is_alive())
        self.assertEqual(b''.join(read), b'line one\nline two\n')

    def test_bad_reactors(self):
        with self.assertRaises(TypeError):
            self.hub.addReactor(self.read_end, 'not callable')
        self.hub.addReactor(self.read_end, lambda fd: None)
        with self.assertRaises(ValueError):
            self.hub.addReactor(self.read_end, lambda fd: None)


@each_mode(modes=MODES)
class StdioTransport(OneHub):
    def setUp(self):
        super().setUp()
        self.command = f'{sys.executable} {FIXTURE_STDIO} {self.thread_mode}'

    def remote(self):
        env_root = f'PYTHONPATH={ROOT} '
        proxy = dopy.rsh.remote(env_root + self.command, 'test', timeout=TIMEOUT, hub=self.hub)
        self.addCleanup(dopy.close, proxy)
        return proxy

    def test_calls_keywords_exceptions_and_callbacks(self):
        p = self.remote()
        self.assertEqual(p.add(a=40, b=2), 42)
        self.assertEqual(p.describe(1, x=2), ((1,), {'x': 2}))
        with self.assertRaises(ValueError) as caught:
            p.fail('over stdio')
        self.assertEqual(caught.exception.dopy_traceback[-1].name, 'fail')
        self.assertNotEqual(p.pid(), os.getpid())

    def test_printing_in_the_server_does_not_corrupt_the_stream(self):
        p = self.remote()
        self.assertEqual(p.chatter('hello'), 'hello')
        self.assertEqual(p.echo('still fine'), 'still fine')

    def test_closing_the_proxy_ends_the_child(self):
        p = self.remote()
        pid = p.pid()
        dopy.close(p)
        with self.assertRaises(ChildProcessError):
            # Reaped already: the child is gone and waited for.
            os.waitpid(pid, os.WNOHANG)

    def test_a_child_that_dies_gives_a_clear_error_and_the_next_call_starts_it_again(self):
        p = self.remote()
        first = p.pid()
        start = time.monotonic()
        with self.assertRaises(dopy.CommunicationError):
            p.die()
        self.assertLess(time.monotonic() - start, TIMEOUT)
        self.assertNotEqual(p.pid(), first)

    def test_a_command_that_is_not_dopy(self):
        proxy = dopy.rsh.remote('echo not dopy; exit 1', 'test', timeout=TIMEOUT, hub=self.hub)
        self.addCleanup(dopy.close, proxy)
        with self.assertRaises(dopy.CommunicationError):
            proxy.echo(1)


class StdioScripts(Case):
    def test_dopyclient_over_stdio_and_the_servers_stderr_passes_through(self):
        for mode in MODES:
            with self.subTest(mode=mode):
                done = subprocess.run(
                    [sys.executable, os.path.join(ROOT, 'dopyclient'), '--stdio',
                     f'{sys.executable} {os.path.join(ROOT, "dopyserver")} --stdio --thread-mode {mode}'],
                    capture_output=True, text=True, timeout=TIMEOUT * 3, cwd=ROOT)
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertEqual(done.stdout.splitlines()[1:], ['test of basic method invocation ok',
                                                                'test of keyword parms ok',
                                                                'test of exceptions ok'])
                self.assertIn('dopyserver: serving "test" over stdio', done.stderr)

    def test_dopyserver_over_stdio_shows_its_banner_before_its_first_answer(self):
        # The banner then comes first in a terminal where both show, as the manual
        # prints it.  The server's first answer is raced against its banner, by a
        # call that waits in its input from the start, a few times over.
        hub = dopy.Hub()
        self.addCleanup(hub.shutdown)
        with tempfile.TemporaryDirectory() as folder:
            banner = os.path.join(folder, 'banner')
            command = f'{sys.executable} {os.path.join(ROOT, "dopyserver")} --stdio 2>{banner}'
            for attempt in range(10):
                proxy = dopy.rsh.remote(command, 'test', timeout=TIMEOUT, hub=hub)
                try:
                    self.assertEqual(proxy.echo(attempt), attempt)
                    with open(banner) as f:
                        self.assertEqual(f.read(), 'dopyserver: serving "test" over stdio\n',
                                         f'attempt {attempt}')
                finally:
                    dopy.close(proxy)

    def test_over_real_ssh(self):
        sshd = shutil.which('sshd') or (os.path.exists('/usr/sbin/sshd') and '/usr/sbin/sshd')
        if not sshd:
            self.skipTest('no sshd on this machine to start on loopback; '
                          'the stdio transport is tested through a plain child process instead')
        self.fail('an sshd exists: write the loopback ssh test that this machine can now run')


if __name__ == '__main__':
    unittest.main()
