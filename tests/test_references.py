"""References that travel: proxies and dopy.ref() as arguments and results, callbacks, lifetime."""

import gc
import pickle
import threading
import unittest
import weakref

import dopy
import dopy.tcp
from tests.support import TIMEOUT, HubCase, each_mode


class Recorder:
    """A callback target that remembers its calls and the thread that ran them."""

    def __init__(self):
        self.calls = []
        self.called = threading.Event()

    def ping(self, value):
        self.calls.append(value)
        self.called.set()
        return ('pong', value, threading.get_ident())


class Service:
    def __init__(self):
        self.saved = None
        self.fired = threading.Event()
        self.made = None

    def call_back(self, callback, value):
        return callback.ping(value)

    def identity(self, value):
        return value

    def call_all(self, callbacks):
        return [c.ping(i) for i, c in enumerate(callbacks)]

    def save(self, callback):
        self.saved = callback

    def call_saved(self, method, *args):
        return getattr(self.saved, method)(*args)

    def call_kept(self, *args):
        return self.saved(*args)

    def call_saved_on(self, target, method):
        return getattr(target, method)()

    def fire_later(self, value):
        threading.Thread(target=lambda: (self.saved.ping(value), self.fired.set())).start()

    def bounce(self, callback, depth):
        return callback.bounce(depth)

    def counter(self):
        counter = Counter()
        self.made = weakref.ref(counter)
        return dopy.ref(counter)

    def counter_alive(self):
        return self.made() is not None


class Counter:
    def __init__(self):
        self.n = 0

    def inc(self):
        self.n += 1
        return self.n


class TwoHubs(HubCase):
    """A server hub with a service, and a client hub with no server of its own."""

    def setUp(self):
        super().setUp()
        self.server_hub = self.hub
        self.service = Service()
        self.p = self.serve(self.service, 'service')

    def bounce(self, depth):
        """Calls nested ``depth`` levels deep, client and server in turn; the depths the client saw."""
        service = self.p
        trail = []

        class Bouncer:
            def bounce(self, depth):
                trail.append(depth)
                if depth == 0:
                    return 'bottom'
                return service.bounce(dopy.ref(self), depth - 1)

        self.assertEqual(self.p.bounce(dopy.ref(Bouncer()), depth), 'bottom')
        return trail

    def remote(self, name, hub=None, server=None):
        if server is None and hub is None:
            return self.proxy(name)
        server = server or self.server
        proxy = dopy.tcp.remote('127.0.0.1', server.port, name, timeout=TIMEOUT,
                                hub=hub or self.client_hub)
        self.addCleanup(dopy.close, proxy)
        return proxy



@each_mode(transports=('tcp', 'pipe'), modes=(dopy.THRD_FUNC,))
class NestedPastThePool(TwoHubs):
    """THRD_FUNC with pools smaller than the nesting: a busy pool's calls run on the reader."""

    thread_mode = dopy.THRD_FUNC
    hub_settings = {'pool_size': 2}

    def test_callbacks_nested_deeper_than_the_pool_complete(self):
        self.assertEqual(self.bounce(8), list(range(8, -1, -1)))


@each_mode(transports=('tcp', 'pipe'))
class Callbacks(TwoHubs):
    def test_a_ref_arrives_as_a_proxy_whose_calls_run_here(self):
        recorder = Recorder()
        kind, value, _ = self.p.call_back(dopy.ref(recorder), 7)
        self.assertEqual((kind, value), ('pong', 7))
        self.assertEqual(recorder.calls, [7])

    def test_callbacks_need_no_server_on_the_client(self):
        self.assertEqual(self.client_hub.stats()['servers'], 0)
        self.assertEqual(self.p.call_back(dopy.ref(Recorder()), 1)[:2], ('pong', 1))

    def test_refs_nested_inside_containers(self):
        recorders = [Recorder() for _ in range(3)]
        results = self.p.call_all([dopy.ref(r) for r in recorders])
        self.assertEqual([r[:2] for r in results], [('pong', 0), ('pong', 1), ('pong', 2)])
        self.assertEqual([r.calls for r in recorders], [[0], [1], [2]])

    def test_nested_callbacks_three_levels_deep(self):
        self.assertEqual(self.bounce(3), [3, 2, 1, 0])

    def test_a_ref_to_my_own_object_comes_back_as_the_object(self):
        recorder = Recorder()
        self.assertIs(self.p.identity(dopy.ref(recorder)), recorder)

    def test_a_ref_returned_as_a_result(self):
        counter = self.p.counter()
        self.assertIsInstance(counter, dopy.RemoteObject)
        self.assertEqual([counter.inc() for _ in range(3)], [1, 2, 3])

    def test_ref_of_a_ref_or_proxy_is_itself(self):
        r = dopy.ref(Recorder())
        self.assertIs(dopy.ref(r), r)
        self.assertIs(dopy.ref(self.p), self.p)


@each_mode(transports=('tcp', 'pipe'), modes=(dopy.THRD_CONN, dopy.THRD_FUNC))
class ThreadedCallbacks(TwoHubs):
    """Callbacks at any time: a threaded client reads while none of its threads waits."""

    def test_a_callback_saved_and_fired_later_from_another_thread(self):
        recorder = Recorder()
        self.p.save(dopy.ref(recorder))
        self.p.fire_later('later')
        self.assertTrue(recorder.called.wait(TIMEOUT))
        self.assertTrue(self.service.fired.wait(TIMEOUT))
        self.assertEqual(recorder.calls, ['later'])


    def test_callbacks_run_on_the_clients_threads_from_the_first_call_that_sends_a_ref(self):
        class Where:
            def thread(self):
                return threading.current_thread().name

        expected = 'dopy-reader-' if self.thread_mode == dopy.THRD_CONN else 'dopy-call-'
        for attempt in ('first', 'second'):
            with self.subTest(call=attempt):
                self.assertTrue(self.p.call_saved_on(dopy.ref(Where()), 'thread').startswith(expected))

    def test_a_callback_proxy_forwarded_to_a_third_hub_still_calls_here(self):
        other_hub = dopy.Hub()
        self.addCleanup(other_hub.shutdown)
        relay = Service()
        other_hub.addObject('relay', relay)
        other_server = dopy.tcp.makeServer(0, hub=other_hub)
        recorder = Recorder()
        self.p.save(dopy.ref(recorder))
        # The server forwards the client's callback to the relay, which calls it.
        relay_proxy = dopy.tcp.remote('127.0.0.1', other_server.port, 'relay', timeout=TIMEOUT,
                                      hub=self.server_hub)
        self.addCleanup(dopy.close, relay_proxy)
        self.assertEqual(relay_proxy.call_back(self.service.saved, 'relayed')[:2],
                         ('pong', 'relayed'))
        self.assertEqual(recorder.calls, ['relayed'])


@each_mode()
class AddressesTravel(TwoHubs):
    """A reference to a published object carries its hub's TCP address."""

    def test_a_published_object_travels_with_its_address(self):
        self.client_hub.addObject('counter', Counter())
        client_server = dopy.tcp.makeServer(0, hub=self.client_hub)
        self.p.save(dopy.ref(self.client_hub.getObject('counter')))
        saved = self.service.saved
        self.assertEqual(str(saved), f'tcp:127.0.0.1:{client_server.port}:counter')
        self.assertEqual(self.p.call_saved('inc'), 1)
        # It has an address, so it outlives the connection that brought it.
        other = self.proxy('service')
        dopy.close(self.p)
        self.assertEqual(other.call_saved('inc'), 2)
        self.assertEqual(pickle.loads(pickle.dumps(saved)), saved)

    def test_a_reference_with_an_address_is_never_called_over_the_connection_its_peer_closed(self):
        # The server may not yet have read the hang-up of the connection
        # that brought the reference when the next call comes on another.
        counter = Counter()
        self.client_hub.addObject('counter', counter)
        dopy.tcp.makeServer(0, hub=self.client_hub)
        other = self.proxy('service')
        for attempt in range(200):
            carrier = self.proxy('service')
            carrier.save(dopy.ref(counter))
            self.assertEqual(carrier.call_saved('inc'), 2 * attempt + 1)
            dopy.close(carrier)
            self.assertEqual(other.call_saved('inc'), 2 * attempt + 2)


@each_mode(transports=('tcp', 'pipe'))
class ProxiesTravel(TwoHubs):
    def test_a_proxy_to_a_third_hub_arrives_working(self):
        other_hub = dopy.Hub()
        self.addCleanup(other_hub.shutdown)
        other_hub.addObject('counter', Counter())
        other_server = dopy.tcp.makeServer(0, hub=other_hub)
        counter = self.remote('counter', server=other_server)
        self.assertEqual(counter.inc(), 1)
        self.p.save(counter)
        self.assertEqual(self.p.call_saved('inc'), 2)
        self.assertEqual(str(self.service.saved), str(counter))

    def test_a_proxy_sent_back_to_its_own_hub_is_the_object(self):
        self.p.save(self.p)
        self.assertIs(self.service.saved, self.service)

    def test_a_callback_proxy_cannot_be_pickled_outside_a_call(self):
        self.p.save(dopy.ref(Recorder()))
        with self.assertRaises(pickle.PicklingError):
            pickle.dumps(self.service.saved)
        with self.assertRaises(pickle.PicklingError):
            pickle.dumps(dopy.ref(Recorder()))

    def test_a_callback_dies_with_the_connection_that_brought_it(self):
        self.p.save(dopy.ref(Recorder()))
        other = self.proxy('service')
        dopy.close(self.p)
        with self.assertRaises(dopy.CommunicationError):
            other.call_saved('ping', 1)


@each_mode(transports=('tcp', 'pipe'))
class Lifetime(TwoHubs):
    def test_a_thousand_short_lived_refs_leave_no_trace(self):
        self.assertEqual(self.p.call_back(dopy.ref(Recorder()), 0)[:2], ('pong', 0))
        gc.collect()
        self.p.identity(None)
        # Idle pool threads come and go with the timing of the calls: not a trace.
        counts = lambda hub: {k: v for k, v in hub.stats().items() if k != 'idle_threads'}
        before = (counts(self.server_hub), counts(self.client_hub))
        for i in range(1000):
            self.p.call_back(dopy.ref(Recorder()), i)
        gc.collect()
        # Releases travel ahead of the next frame each way.
        self.p.identity(None)
        self.p.identity(None)
        after = (counts(self.server_hub), counts(self.client_hub))
        self.assertEqual(after, before)
        self.assertEqual(after[0]['imported_references'], 0)
        self.assertEqual(after[1]['exported_references'], 0)

    def test_a_held_ref_stays_until_released(self):
        recorder = Recorder()
        self.p.save(dopy.ref(recorder))
        self.p.identity(None)
        self.assertEqual(self.client_hub.stats()['exported_references'], 1)
        self.assertEqual(self.p.call_back(dopy.ref(recorder), 'again')[:2], ('pong', 'again'))
        self.assertEqual(self.p.call_saved('ping', 'still')[:2], ('pong', 'still'))
        self.service.saved = None
        gc.collect()
        self.p.identity(None)
        self.p.identity(None)
        self.assertEqual(self.client_hub.stats()['exported_references'], 0)

    def test_a_proxy_dropped_is_released_before_the_next_call_runs(self):
        counter = self.p.counter()
        self.assertEqual(counter.inc(), 1)
        del counter
        gc.collect()
        self.assertFalse(self.p.counter_alive())

    def test_a_callback_dropped_is_released_before_the_next_reply(self):
        self.p.save(dopy.ref(Recorder()))
        self.assertEqual(self.client_hub.stats()['exported_references'], 1)
        self.service.saved = None
        gc.collect()
        self.p.identity(None)
        self.assertEqual(self.client_hub.stats()['exported_references'], 0)

    def test_a_kept_method_of_a_callback_keeps_the_callback_until_it_goes(self):
        recorder = Recorder()
        self.p.save(dopy.ref(recorder))
        self.service.saved = self.service.saved.ping
        gc.collect()
        self.p.identity(None)
        self.assertEqual(self.client_hub.stats()['exported_references'], 1)
        self.assertEqual(self.p.call_kept('kept')[:2], ('pong', 'kept'))
        self.service.saved = None
        self.p.identity(None)
        self.assertEqual(self.client_hub.stats()['exported_references'], 0)

    def test_a_dropped_proxy_is_released_without_the_garbage_collector(self):
        gc.disable()
        self.addCleanup(gc.enable)
        counter = self.p.counter()
        self.assertEqual(counter.inc(), 1)
        self.assertEqual(counter.inc(), 2)
        del counter
        self.assertFalse(self.p.counter_alive())

    def test_closing_the_connection_releases_everything(self):
        self.p.save(dopy.ref(Recorder()))
        self.assertEqual(self.client_hub.stats()['exported_references'], 1)
        dopy.close(self.p)
        self.assertEqual(self.client_hub.stats()['exported_references'], 0)

    def test_published_objects_stay_until_removed(self):
        self.server_hub.addObject('kept', Counter())
        kept = self.remote('kept')
        self.assertEqual(kept.inc(), 1)
        dopy.close(kept)
        self.assertEqual(self.remote('kept').inc(), 2)


class Stream:
    """Iterable, with no length."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


class Sized(Stream):
    def __len__(self):
        return len(self.items)


@each_mode(transports=('tcp', 'pipe'))
class ContainerProtocol(TwoHubs):
    def setUp(self):
        super().setUp()
        self.server_hub.addObject('dict', {'a': 1})
        self.d = self.remote('dict')

    def test_len_in_getitem_setitem_delitem_iter(self):
        self.assertEqual(len(self.d), 1)
        self.assertIn('a', self.d)
        self.assertNotIn('b', self.d)
        self.assertEqual(self.d['a'], 1)
        self.d['b'] = [2]
        self.assertEqual(self.d['b'], [2])
        self.assertEqual(sorted(self.d), ['a', 'b'])
        del self.d['a']
        self.assertEqual(list(self.d), ['b'])
        with self.assertRaises(KeyError):
            self.d['missing']

    def remote_container(self, obj):
        """A proxy for ``obj``, and a list that gets a name for each call the server receives for it."""
        self.server_hub.addObject('container', obj)
        calls = []
        lookup = self.server_hub.lookup

        def counting_lookup(name):
            if name == 'container':
                calls.append(name)
            return lookup(name)
        self.server_hub.lookup = counting_lookup
        return self.remote('container'), calls

    def test_list_tuple_and_sorted_of_an_iterable_without_len_take_one_call_each(self):
        p, calls = self.remote_container(Stream([3, 1, 2]))
        for make, expected in ((list, [3, 1, 2]), (tuple, (3, 1, 2)), (sorted, [1, 2, 3]),
                               (lambda p: [*p], [3, 1, 2])):
            calls.clear()
            self.assertEqual(make(p), expected)
            self.assertEqual(len(calls), 1)
        with self.assertRaisesRegex(dopy.NoSuchMethodError, '__len__'):
            len(p)

    def test_list_of_an_object_with_len_takes_one_call(self):
        p, calls = self.remote_container(Sized(['b', 'a']))
        self.assertEqual(list(p), ['b', 'a'])
        self.assertEqual(len(calls), 1)
        self.assertEqual(sorted(p), ['a', 'b'])
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(p), 2)
        self.assertEqual(len(calls), 3)

    def test_len_once_iterating_has_started_asks_the_remote_object(self):
        sized = Sized(['a', 'b'])
        p, calls = self.remote_container(sized)
        for item in p:
            sized.items.append(item * 2)
        self.assertEqual(len(p), 4)
        iterator = iter(p)
        self.assertEqual(next(iterator), 'a')
        sized.items.append('c')
        self.assertEqual(len(p), 5)
        iter(p)  # let go of at once, never iterated
        sized.items.append('d')
        self.assertEqual(len(p), 6)
        self.assertEqual(len(calls), 6)

    def test_len_in_another_thread_asks_the_remote_object(self):
        sized = Sized(['a', 'b'])
        p, _ = self.remote_container(sized)
        iterator = iter(p)
        sized.items.append('c')
        lengths = []
        thread = threading.Thread(target=lambda: lengths.append(len(p)))
        thread.start()
        thread.join(TIMEOUT)
        self.assertEqual(lengths, [3])
        self.assertEqual(list(iterator), ['a', 'b'])

    def test_a_proxy_is_true_without_asking_len(self):
        self.assertTrue(self.p)

    def test_other_dunders_stay_blocked(self):
        with self.assertRaises(AttributeError):
            self.d.__repr__ and self.d.__class__ and self.d.__dict__
        with self.assertRaises(AttributeError):
            self.d._dopy_nothing
        with self.assertRaises(dopy.NoSuchMethodError):
            len(self.p)

    def test_equal_reference_strings_make_equal_proxies(self):
        again = self.remote('dict')
        self.assertEqual(again, self.d)
        self.assertEqual(hash(again), hash(self.d))
        self.assertNotEqual(self.d, self.p)
        self.assertEqual(len({self.d, again, self.p}), 2)


if __name__ == '__main__':
    unittest.main()


class Relay:
    """The middle hub's object: hands a callback on to a service on a third hub."""

    def __init__(self, hub, port):
        self.hub = hub
        self.port = port
        self.service = None

    def relay(self, callback, value):
        # Connected here, in the thread that serves: a THRD_NONE hub's loop.
        if self.service is None:
            self.service = dopy.tcp.remote('127.0.0.1', self.port, 'service', timeout=TIMEOUT,
                                           hub=self.hub)
        return self.service.call_back(callback, value)

    def close(self):
        if self.service is not None:
            dopy.close(self.service)


class ThreeHubs(unittest.TestCase):
    """A callback passed on through a middle hub to a third one, in every mix of threading modes."""

    def serving_hub(self, mode):
        hub = dopy.Hub(threadMode=mode)
        if mode == dopy.THRD_NONE:
            loop = threading.Thread(target=hub.mainloop, kwargs={'console': False},
                                    name=f'test-loop-{mode}')
            loop.start()
            self.addCleanup(lambda: self.assertFalse(loop.is_alive(), 'a hub loop did not stop'))
            self.addCleanup(loop.join, TIMEOUT)
        self.addCleanup(hub.shutdown)
        return hub

    def relay_once(self, client_mode, middle_mode, service_mode):
        service_hub = self.serving_hub(service_mode)
        service_hub.addObject('service', Service())
        service_server = dopy.tcp.makeServer(0, hub=service_hub)
        middle_hub = self.serving_hub(middle_mode)
        middle_hub.addObject('relay', Relay(middle_hub, service_server.port))
        middle_server = dopy.tcp.makeServer(0, hub=middle_hub)
        # The client's calls drive its hub, whatever its mode: no loop of its own.
        client_hub = dopy.Hub(threadMode=client_mode)
        self.addCleanup(client_hub.shutdown)
        relay = dopy.tcp.remote('127.0.0.1', middle_server.port, 'relay', timeout=TIMEOUT,
                                hub=client_hub)
        recorder = Recorder()
        for value in ('first', 'second'):
            self.assertEqual(relay.relay(dopy.ref(recorder), value)[:2], ('pong', value))
        self.assertEqual(recorder.calls, ['first', 'second'])
        relay.close()

    def test_a_callback_relayed_through_a_middle_hub_is_called_back(self):
        for client_mode in MODES_ALL:
            for middle_mode in MODES_ALL:
                for service_mode in MODES_ALL:
                    with self.subTest(client=client_mode, middle=middle_mode, service=service_mode):
                        try:
                            self.relay_once(client_mode, middle_mode, service_mode)
                        finally:
                            self.doCleanups()


MODES_ALL = (dopy.THRD_CONN, dopy.THRD_FUNC, dopy.THRD_NONE)

