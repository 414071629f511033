"""The reference table alone, with no sockets: exports counted, imports counted, RELEASE frames out and in."""

import gc
import pickle
import unittest

import dopy
from dopy import wire
from dopy.references import ReferenceTable
from tests.support import one_frame


class Thing:
    pass


class Proxy:
    """Stands for a proxy: any object a weak reference can follow."""


def new_proxy():
    """A proxy, and what it calls through: here the proxy itself."""
    proxy = Proxy()
    return proxy, proxy


def release_of(pairs):
    return one_frame(wire.encode(wire.RELEASE, 0, pairs))


class Exports(unittest.TestCase):
    def setUp(self):
        self.table = ReferenceTable()

    def test_an_object_sent_twice_keeps_one_name(self):
        thing = Thing()
        first = self.table.export(thing)
        self.assertEqual(self.table.export(thing), first)
        self.assertTrue(first.startswith('#'))
        self.assertNotEqual(self.table.export(Thing()), first)
        self.assertIs(self.table.exported(first), thing)

    def test_an_object_stays_until_every_send_is_released(self):
        thing = Thing()
        name = self.table.export(thing)
        self.table.export(thing)
        self.table.apply_release(release_of([(name, 1)]))
        self.assertIs(self.table.exported(name), thing)
        self.table.apply_release(release_of([(name, 1)]))
        with self.assertRaises(dopy.NoSuchObjectError):
            self.table.exported(name)
        self.assertEqual(self.table.export_count(), 0)

    def test_a_release_of_a_name_never_exported_is_ignored(self):
        self.table.apply_release(release_of([('#99', 1)]))
        self.assertEqual(self.table.export_count(), 0)

    def test_a_release_of_any_other_shape_is_refused(self):
        name = self.table.export(Thing())
        for payload in (5, [('x',)], [([], 1)], [(name, '1')], [(name, 0)], [(name, -1)],
                        ((name, 1),), [[name, 1]], None):
            with self.subTest(payload=payload):
                with self.assertRaises(ValueError):
                    self.table.apply_release(release_of(payload))
        self.assertEqual(self.table.export_count(), 1)

    def test_a_release_that_does_not_unpickle_is_refused(self):
        frame = wire.Frame(wire.RELEASE, 0, b'not a pickle')
        with self.assertRaises(pickle.UnpicklingError):
            self.table.apply_release(frame)


class Imports(unittest.TestCase):
    def setUp(self):
        self.table = ReferenceTable()

    def test_a_name_received_twice_is_one_proxy_released_with_both_counts(self):
        first = self.table.imported('#1', new_proxy)
        self.assertIs(self.table.imported('#1', new_proxy), first)
        self.assertEqual(self.table.import_count(), 1)
        self.assertFalse(self.table.released)
        del first
        gc.collect()
        self.assertTrue(self.table.released)
        frame = one_frame(self.table.release_frame())
        self.assertEqual((frame.kind, wire.loads(frame.data)), (wire.RELEASE, [('#1', 2)]))
        self.assertFalse(self.table.released)
        self.assertEqual(self.table.import_count(), 0)

    def test_a_name_received_again_after_its_proxy_went_gets_a_new_proxy(self):
        first = self.table.imported('#1', new_proxy)
        del first
        gc.collect()
        second = self.table.imported('#1', new_proxy)
        frame = one_frame(self.table.release_frame())
        # The first proxy's one receipt goes back; the new one is still held.
        self.assertEqual(wire.loads(frame.data), [('#1', 1)])
        self.assertEqual(self.table.import_count(), 1)
        self.assertIsNotNone(second)

    def test_the_release_frame_of_one_side_is_what_the_other_applies(self):
        exporter, importer = ReferenceTable(), ReferenceTable()
        thing = Thing()
        name = exporter.export(thing)
        exporter.export(thing)
        held = importer.imported(name, new_proxy)
        importer.imported(name, new_proxy)
        del held
        gc.collect()
        exporter.apply_release(one_frame(importer.release_frame()))
        self.assertEqual(exporter.export_count(), 0)

    def test_clear_forgets_everything(self):
        held = self.table.imported('#1', new_proxy)
        self.table.export(Thing())
        self.table.clear()
        self.assertEqual((self.table.export_count(), self.table.import_count()), (0, 0))
        self.assertIsNotNone(held)


if __name__ == '__main__':
    unittest.main()
