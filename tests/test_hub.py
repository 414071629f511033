"""The hub: the process's hub, the registry, mainloop and shutdown."""

import socket
import threading
import time
import unittest

import dopy
import dopy.tcp
from tests.support import TIMEOUT, Case, HubCase, eventually


class Echo:
    def echo(self, value):
        return value


class TheProcessHub(Case):
    def setUp(self):
        super().setUp()
        dopy.getHub().shutdown()
        self.addCleanup(lambda: dopy.getHub().shutdown())

    def test_get_hub_returns_one_hub(self):
        self.assertIs(dopy.getHub(), dopy.getHub())
        self.assertIsInstance(dopy.getHub(), dopy.Hub)

    def test_init_creates_it_with_settings(self):
        hub = dopy.init(max_message_size=4096)
        self.assertIs(dopy.getHub(), hub)
        self.assertEqual(hub.max_message_size, 4096)
        self.assertIs(dopy.init(max_message_size=4096), hub)

    def test_second_init_with_other_settings_is_an_error(self):
        dopy.init(max_message_size=4096)
        with self.assertRaisesRegex(dopy.DopyError, 'already exists'):
            dopy.init(max_message_size=8192)

    def test_init_refuses_unknown_and_bad_settings(self):
        with self.assertRaisesRegex(TypeError, 'unknown hub settings: colour'):
            dopy.init(colour='blue')
        with self.assertRaises(ValueError):
            dopy.init(max_message_size=0)
        for bad, error in ((b'', ValueError), ('text', TypeError)):
            with self.subTest(authkey=bad), self.assertRaises(error):
                dopy.Hub(authkey=bad)
        with self.assertRaises(TypeError):
            dopy.Hub(ssl_context='not a context')
        dopy.init()
        with self.assertRaisesRegex(TypeError, 'unknown hub settings: colour'):
            dopy.init(colour='blue')

    def test_a_shut_down_hub_is_replaced(self):
        old = dopy.getHub()
        old.shutdown()
        self.assertTrue(old.closed)
        self.assertIsNot(dopy.getHub(), old)
        self.assertFalse(dopy.getHub().closed)

    def test_make_server_and_remote_default_to_the_process_hub(self):
        dopy.getHub().addObject('e', Echo())
        with dopy.tcp.makeServer(0) as server:
            p = dopy.tcp.remote('127.0.0.1', server.port, 'e', timeout=TIMEOUT)
            self.assertEqual(p.echo('default hub'), 'default hub')
            dopy.close(p)


class Registry(HubCase):
    def test_add_get_remove(self):
        obj = Echo()
        self.hub.addObject('a', obj)
        self.assertIs(self.hub.getObject('a'), obj)
        self.hub.removeObject('a')
        with self.assertRaises(dopy.NoSuchObjectError):
            self.hub.getObject('a')

    def test_add_replaces(self):
        self.hub.addObject('a', 1)
        self.hub.addObject('a', 2)
        self.assertEqual(self.hub.getObject('a'), 2)

    def test_remove_missing_is_an_error(self):
        with self.assertRaises(dopy.NoSuchObjectError) as caught:
            self.hub.removeObject('never')
        self.assertIsInstance(caught.exception, LookupError)

    def test_names_must_be_nonempty_strings(self):
        for name in ('', None, 3, b'x'):
            with self.subTest(name=name), self.assertRaises(TypeError):
                self.hub.addObject(name, 1)

    def test_the_default_message_limit_is_256_MiB(self):
        self.assertEqual(self.hub.max_message_size, 256 << 20)

    def test_bad_max_message_size(self):
        for size in (0, -5, 1.5, '10'):
            with self.subTest(size=size), self.assertRaises(ValueError):
                dopy.Hub(max_message_size=size)


class Shutdown(HubCase):
    def test_mainloop_returns_after_shutdown_from_another_thread(self):
        stopper = threading.Thread(target=self.hub.shutdown)
        done = threading.Event()

        def loop():
            self.hub.mainloop(console=False)
            done.set()

        runner = threading.Thread(target=loop)
        runner.start()
        stopper.start()
        self.assertTrue(done.wait(TIMEOUT))
        runner.join(TIMEOUT)
        stopper.join(TIMEOUT)

    def test_mainloop_returns_once_a_shutdown_from_a_remote_method_is_done(self):
        hub = self.hub

        class Stopper:
            def stop(self):
                hub.shutdown()

        hub.addObject('s', Stopper())
        server = dopy.tcp.makeServer(0, hub=hub)
        p = dopy.tcp.remote('127.0.0.1', server.port, 's', timeout=TIMEOUT, hub=self.client_hub)
        self.addCleanup(dopy.close, p)
        p.stop.oneway()
        hub.mainloop(console=False)
        # The server is closed: its port is free again.
        socket.create_server(('127.0.0.1', server.port)).close()

    def test_stats_count_only_open_connections(self):
        self.hub.addObject('e', Echo())
        server = dopy.tcp.makeServer(0, hub=self.hub)
        p = dopy.tcp.remote('127.0.0.1', server.port, 'e', timeout=TIMEOUT, hub=self.client_hub)
        self.addCleanup(dopy.close, p)
        self.assertEqual(p.echo(1), 1)
        self.assertEqual(self.client_hub.stats()['connections'], 1)
        self.client_hub.shutdown()
        # The proxy still holds its closed connection: it is not counted.
        self.assertEqual(self.client_hub.stats()['connections'], 0)

    def test_mainloop_of_a_shut_hub_returns_at_once(self):
        self.hub.shutdown()
        self.hub.mainloop()

    def test_shutdown_closes_servers_and_connections_and_joins_threads(self):
        before = set(threading.enumerate())
        self.hub.addObject('e', Echo())
        server = dopy.tcp.makeServer(0, hub=self.hub)
        proxies = [dopy.tcp.remote('127.0.0.1', server.port, 'e', timeout=TIMEOUT, hub=self.client_hub)
                   for _ in range(5)]
        for p in proxies:
            self.assertEqual(p.echo(1), 1)
        self.hub.shutdown()
        self.hub.shutdown()
        self.assertEqual(set(threading.enumerate()) - before, set())
        for p in proxies:
            with self.assertRaises(dopy.CommunicationError):
                p.echo(2)
        with self.assertRaises(dopy.CommunicationError):
            dopy.tcp.remote('127.0.0.1', server.port, 'e', timeout=TIMEOUT, hub=self.client_hub)

    def test_new_peers_are_served_on_kept_threads_and_at_most_eight_wait(self):
        served_on = []

        class Where:
            def thread(self):
                served_on.append(threading.current_thread())

        self.hub.addObject('where', Where())
        server = dopy.tcp.makeServer(0, hub=self.hub)

        def peers(count):
            proxies = [dopy.tcp.remote('127.0.0.1', server.port, 'where', timeout=TIMEOUT,
                                       hub=self.client_hub) for _ in range(count)]
            for p in proxies:
                p.thread()
            for p in proxies:
                dopy.close(p)

        peers(20)
        self.assertEqual(len(set(served_on)), 20)
        eventually(lambda: self.hub.stats()['idle_threads'] == 8
                   and sum(t.is_alive() for t in served_on) == 8, 'eight threads kept')
        kept = {t for t in served_on if t.is_alive()}
        served_on.clear()
        peers(8)
        self.assertEqual(set(served_on), kept)
        self.hub.shutdown()
        self.assertEqual([t for t in kept if t.is_alive()], [])

    def test_shutdown_from_inside_a_remote_method(self):
        hub = self.hub

        class Stopper:
            def stop(self):
                hub.shutdown()
                return 'stopping'

        hub.addObject('s', Stopper())
        server = dopy.tcp.makeServer(0, hub=hub)
        p = dopy.tcp.remote('127.0.0.1', server.port, 's', timeout=TIMEOUT, hub=dopy.Hub())
        self.addCleanup(dopy.close, p)
        with self.assertRaises(dopy.CommunicationError):
            p.stop()
        self.assertTrue(hub.closed)
        hub.mainloop(console=False)

    def test_shutdown_does_not_wait_forever_for_a_stuck_method(self):
        release = threading.Event()
        entered = threading.Event()
        self.addCleanup(release.set)

        class Stuck:
            def stick(self):
                entered.set()
                release.wait(TIMEOUT * 3)

        self.hub.addObject('s', Stuck())
        server = dopy.tcp.makeServer(0, hub=self.hub)
        client_hub = dopy.Hub()
        self.addCleanup(client_hub.shutdown)
        p = dopy.tcp.remote('127.0.0.1', server.port, 's', hub=client_hub)
        caller = threading.Thread(target=lambda: self.assertRaises(dopy.CommunicationError, p.stick))
        caller.start()
        self.assertTrue(entered.wait(TIMEOUT))
        start = time.monotonic()
        with self.assertLogs('dopy', 'WARNING') as logs:
            self.hub.shutdown(timeout=0.2)
        self.assertLess(time.monotonic() - start, TIMEOUT)
        self.assertIn('still running', '\n'.join(logs.output))
        caller.join(TIMEOUT)
        self.assertFalse(caller.is_alive())


if __name__ == '__main__':
    unittest.main()
