"""Naming contexts: hierarchical names, copies, mounts, persistence, and a naming service in use."""

import os
import shutil
import signal
import sqlite3
import tempfile
import threading
import unittest

import dopy
import dopy.tcp
from dopy.naming import PersistentNamingContext, StandardNamingContext
from tests.support import ROOT, TIMEOUT, Case, HubCase, read_line, spawn, stop

DOPYSERVER = os.path.join(ROOT, 'dopyserver')
FIXTURE_SERVICE = os.path.join(ROOT, 'tests', 'fixture_service.py')


class Printer:
    def __init__(self):
        self.jobs = []

    def status(self):
        return 'ready'

    def submit(self, job):
        self.jobs.append(job)
        return len(self.jobs)


class ContextBehaviour:
    """The behaviour every kind of context shares; ``make()`` builds one."""

    def make(self):
        raise NotImplementedError

    def setUp(self):
        super().setUp()
        self.ns = self.make()

    def test_bind_look_up_unbind(self):
        self.ns['printer'] = {'model': 'hp', 'pages': [1, 2]}
        self.assertEqual(self.ns['printer'], {'model': 'hp', 'pages': [1, 2]})
        self.assertIn('printer', self.ns)
        self.assertEqual(len(self.ns), 1)
        del self.ns['printer']
        self.assertNotIn('printer', self.ns)
        with self.assertRaises(dopy.NamingError) as caught:
            self.ns['printer']
        self.assertIsInstance(caught.exception, KeyError)
        self.assertEqual(str(caught.exception), "'printer' is not bound")

    def test_values_are_copies(self):
        value = {'list': [1]}
        self.ns['v'] = value
        value['list'].append(2)
        got = self.ns['v']
        self.assertEqual(got, {'list': [1]})
        got['list'].append(3)
        self.assertEqual(self.ns['v'], {'list': [1]})

    def test_hierarchical_names_and_listing_one_level(self):
        self.ns['lab/printers/hp1'] = 1
        self.ns['lab/printers/hp2'] = 2
        self.ns['lab/scanner'] = 3
        self.ns['top'] = 4
        self.assertEqual(self.ns['lab/printers/hp2'], 2)
        self.assertEqual(self.ns.list('lab/printers'), ['hp1', 'hp2'])
        self.assertEqual(self.ns.list('lab'), ['printers/', 'scanner'])
        self.assertEqual(self.ns.list(), ['lab/', 'top'])
        self.assertEqual(sorted(self.ns), ['lab/printers/hp1', 'lab/printers/hp2', 'lab/scanner', 'top'])
        self.assertEqual(self.ns.get('lab/none', 'default'), 'default')

    def test_bad_names(self):
        for name in ('', '/a', 'a/', 'a//b', None, 3):
            with self.subTest(name=name), self.assertRaises(dopy.NamingError):
                self.ns[name] = 1
        with self.assertRaises(dopy.NamingError):
            self.ns.list('nothing/here')

    def test_a_value_is_not_a_context(self):
        self.ns['leaf'] = 1
        with self.assertRaisesRegex(dopy.NamingError, 'not a context'):
            self.ns['leaf/child'] = 2
        self.ns['dir/child'] = 1
        with self.assertRaisesRegex(dopy.NamingError, 'names under it'):
            self.ns['dir'] = 2

    def test_an_unpicklable_value_stores_nothing(self):
        with self.assertRaises(dopy.SerializationError):
            self.ns['lock'] = threading.Lock()
        self.assertNotIn('lock', self.ns)
        self.assertEqual(len(self.ns), 0)

    def test_a_name_and_a_name_under_it_are_never_both_bound_by_racing_writers(self):
        for attempt in range(100):
            start = threading.Barrier(2)
            bound = []

            def bind(name):
                start.wait(TIMEOUT)
                try:
                    self.ns[name] = attempt
                    bound.append(name)
                except dopy.NamingError:
                    pass

            threads = [threading.Thread(target=bind, args=(name,))
                       for name in (f'x{attempt}', f'x{attempt}/y')]
            for t in threads:
                t.start()
            for t in threads:
                t.join(TIMEOUT)
            self.assertEqual(len(bound), 1, bound)

class StandardContext(ContextBehaviour, Case):
    def make(self):
        return StandardNamingContext()

    def test_a_local_sub_context_is_a_mount(self):
        sub = StandardNamingContext()
        self.ns['lab'] = sub
        self.ns['lab/printers/hp1'] = 'in the sub-context'
        self.assertEqual(sub['printers/hp1'], 'in the sub-context')
        self.assertEqual(self.ns.list('lab'), ['printers/'])
        self.assertEqual(self.ns.list(), ['lab/'])
        del self.ns['lab/printers/hp1']
        self.assertEqual(len(sub), 0)


class PersistentContext(ContextBehaviour, Case):
    def make(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        self.path = os.path.join(folder, 'names.db')
        context = PersistentNamingContext(self.path)
        self.addCleanup(context.close)
        return context

    def test_bindings_survive_reopening(self):
        self.ns['a/b'] = [1, 2]
        self.ns.close()
        again = PersistentNamingContext(self.path)
        self.addCleanup(again.close)
        self.assertEqual(again['a/b'], [1, 2])

    def test_concurrent_writers(self):
        other = PersistentNamingContext(self.path)
        self.addCleanup(other.close)
        errors = []

        def writer(context, prefix):
            try:
                for i in range(50):
                    context[f'{prefix}/{i}'] = i
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(ctx, f'w{k}'))
                   for k, ctx in enumerate([self.ns, other, self.ns, other])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 3)
        self.assertEqual(errors, [])
        self.assertEqual(len(self.ns), 200)

    def test_a_proxy_with_an_address_is_stored_as_its_reference(self):
        hub = dopy.Hub()
        self.addCleanup(hub.shutdown)
        hub.addObject('printer', Printer())
        server = dopy.tcp.makeServer(0, hub=hub)
        proxy = dopy.tcp.remote('127.0.0.1', server.port, 'printer', timeout=TIMEOUT, hub=hub)
        self.addCleanup(dopy.close, proxy)
        self.ns['printer'] = proxy
        with sqlite3.connect(self.path) as db:
            stored = db.execute('SELECT value FROM bindings').fetchone()[0]
        self.assertIn(str(proxy).encode(), stored)
        again = self.ns['printer']
        self.assertEqual(again, proxy)
        self.assertEqual(again.status(), 'ready')
        dopy.close(again)

    def test_a_reference_without_an_address_is_refused(self):
        with self.assertRaisesRegex(dopy.SerializationError, 'no address'):
            self.ns['local'] = dopy.ref(Printer())
        with self.assertRaisesRegex(dopy.SerializationError, 'no address'):
            self.ns['sub'] = StandardNamingContext()
        self.assertEqual(len(self.ns), 0)


class NamingService(HubCase):
    def setUp(self):
        super().setUp()
        self.hub.addObject(dopy.naming.DEFAULT_KEY, StandardNamingContext())
        self.server = dopy.tcp.makeServer(0, hub=self.hub)
        self.client_hub = dopy.Hub()
        self.addCleanup(self.client_hub.shutdown)
        self.ns = self.client('naming')

    def client(self, name, hub=None, server=None):
        proxy = dopy.tcp.remote('127.0.0.1', (server or self.server).port, name,
                                timeout=TIMEOUT, hub=hub or self.client_hub)
        self.addCleanup(dopy.close, proxy)
        return proxy

    def test_a_client_uses_it_like_a_dict(self):
        printer = Printer()
        self.ns['printer'] = dopy.ref(printer)
        self.assertEqual(self.ns['printer'].status(), 'ready')
        self.assertEqual(self.ns['printer'].submit('job'), 1)
        self.assertEqual(printer.jobs, ['job'])
        self.assertEqual(self.ns.list(), ['printer'])
        self.assertIn('printer', self.ns)
        self.assertEqual(list(self.ns), ['printer'])

    def test_another_client_reaches_a_callback_through_the_naming_server(self):
        printer = Printer()
        self.ns['lab/printers/hp1'] = dopy.ref(printer)
        other_hub = dopy.Hub()
        self.addCleanup(other_hub.shutdown)
        other = self.client('naming', hub=other_hub)
        found = other['lab/printers/hp1']
        self.assertIsInstance(found, dopy.RemoteObject)
        self.assertEqual(found.submit('from the other client'), 1)
        self.assertEqual(printer.jobs, ['from the other client'])

    def test_a_sub_context_on_another_hub(self):
        far_hub = dopy.Hub()
        self.addCleanup(far_hub.shutdown)
        far_context = StandardNamingContext()
        far_hub.addObject('naming', far_context)
        far_server = dopy.tcp.makeServer(0, hub=far_hub)
        self.ns['far'] = self.client('naming', server=far_server)
        self.ns['far/printers/x'] = 'stored far away'
        self.assertEqual(far_context['printers/x'], 'stored far away')
        self.assertEqual(self.ns['far/printers/x'], 'stored far away')
        self.assertEqual(self.ns.list('far'), ['printers/'])
        self.assertEqual(self.ns.list(), ['far/'])

    def test_resolve_goes_from_one_string_to_a_value(self):
        self.hub.addObject('printer', Printer())
        printer_here = self.client('printer')
        self.ns['lab/printers/hp1'] = printer_here
        ref = f'tcp:127.0.0.1:{self.server.port}:naming/lab/printers/hp1'
        found = dopy.naming.resolve(ref, timeout=TIMEOUT, hub=self.client_hub)
        self.assertEqual(found.status(), 'ready')
        self.assertEqual(found, printer_here)
        whole = dopy.naming.resolve(f'tcp:127.0.0.1:{self.server.port}:naming',
                                    timeout=TIMEOUT, hub=self.client_hub)
        self.assertEqual(whole.list('lab'), ['printers/'])

    def test_unpicklable_value_over_the_wire(self):
        with self.assertRaises(dopy.SerializationError):
            self.ns['bad'] = threading.Lock()
        self.assertNotIn('bad', self.ns)


class NamingInProcesses(Case):
    def start_naming_server(self, *args):
        proc = spawn([DOPYSERVER, '--port', '0', '--naming', *args])
        banner = read_line(proc.stderr)
        self.assertIn('serving', banner)
        return proc, int(banner.rsplit(':', 1)[1])

    def test_three_hubs_client_finds_service_and_hands_it_a_callback(self):
        naming_proc, naming_port = self.start_naming_server()
        service_proc = spawn([FIXTURE_SERVICE, str(naming_port), 'services/echo'])
        try:
            self.assertEqual(read_line(service_proc.stdout), 'READY\n')
            hub = dopy.Hub()
            self.addCleanup(hub.shutdown)
            service = dopy.naming.resolve(f'tcp:127.0.0.1:{naming_port}:naming/services/echo',
                                          timeout=TIMEOUT, hub=hub)
            self.assertTrue(str(service).startswith('tcp:127.0.0.1:'))
            self.assertEqual(service.where(), 'service process')

            heard = []
            got_event = threading.Event()

            class Listener:
                def notify(self, value):
                    heard.append(value)
                    got_event.set()
                    return f'heard {value}'

            listener = Listener()
            self.assertEqual(service.call_back(dopy.ref(listener), 1), 'heard 1')
            got_event.clear()
            service.subscribe(dopy.ref(listener))
            service.publish(2)
            self.assertTrue(got_event.wait(TIMEOUT))
            self.assertEqual(heard, [1, 2])
            dopy.close(service)
        finally:
            for proc in (service_proc, naming_proc):
                status, _, err = stop(proc)
                self.assertEqual(status, 0, err)

    def test_persistent_naming_server_killed_keeps_every_acknowledged_binding(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, 'names.db')
        proc, port = self.start_naming_server(path)
        hub = dopy.Hub()
        self.addCleanup(hub.shutdown)
        ns = dopy.tcp.remote('127.0.0.1', port, 'naming', timeout=TIMEOUT, hub=hub)
        for i in range(200):
            ns[f'jobs/{i}'] = {'job': i}
        proc.send_signal(signal.SIGKILL)
        proc.wait(TIMEOUT)
        proc.communicate()
        dopy.close(ns)
        proc, port = self.start_naming_server(path)
        try:
            ns = dopy.tcp.remote('127.0.0.1', port, 'naming', timeout=TIMEOUT, hub=hub)
            self.assertEqual(len(ns), 200)
            self.assertEqual([ns[f'jobs/{i}']['job'] for i in range(200)], list(range(200)))
            self.assertEqual(len(ns.list('jobs')), 200)
            dopy.close(ns)
        finally:
            status, _, err = stop(proc)
        self.assertEqual(status, 0, err)

    def test_a_bad_store_path_is_a_clear_error(self):
        proc = spawn([DOPYSERVER, '--port', '0', '--naming', '/nonexistent/dir/names.db'])
        status, _, err = stop(proc)
        self.assertEqual(status, 1)
        self.assertIn('cannot open the naming store', err)
        self.assertNotIn('Traceback', err)


if __name__ == '__main__':
    unittest.main()
