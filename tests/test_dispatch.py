"""Dispatch without sockets: the name policy, and every outcome of a call as a reply frame."""

import pickle
import unittest

from dopy import dispatch, remote_exc, wire
from dopy.errors import (NoSuchMethodError, NoSuchObjectError, ProtocolError,
                         SerializationError)


class Target:
    greeting = 'hello'

    def __init__(self):
        self.data = [1, 2]
        self.ran = []
        self.callback = lambda: 'instance callable'

    @property
    def prop(self):
        self.ran.append('prop')
        return 'property value'

    def add(self, a, b=0):
        return a + b

    def _private(self):
        self.ran.append('_private')

    def fail(self):
        raise KeyError('missing')

    def unpicklable(self):
        return lambda: None


def run(obj, name, method, args=(), kwargs=None, raw=None):
    objects = {name: obj}

    def lookup(key):
        try:
            return objects[key], None
        except KeyError:
            raise NoSuchObjectError(key) from None

    data = raw if raw is not None else pickle.dumps((name, method, args, kwargs or {}))
    frame = wire.Frame(wire.CALL, 42, data)
    segments = dispatch.reply_segments(42, dispatch.prepare(lookup, frame)())
    decoder = wire.Decoder()
    for segment in segments:
        decoder.feed(segment)
    kind, request_id, data, buffers, _ = decoder.next_frame()
    value = wire.loads(data, buffers)
    if kind == wire.ERROR:
        return request_id, remote_exc.unpack(value)
    return request_id, value


class NamePolicy(unittest.TestCase):
    def test_public_identifiers_pass(self):
        dispatch.check_method_name('add')

    def test_refused_names(self):
        for name in ('_private', '__class__', '__init__', 'a.b', 'data.append', '', '1x', None, 3):
            with self.subTest(name=name), self.assertRaises(NoSuchMethodError):
                dispatch.check_method_name(name)

    def test_property_is_refused_without_being_read(self):
        target = Target()
        with self.assertRaises(NoSuchMethodError):
            dispatch.resolve(target, 'prop')
        self.assertEqual(target.ran, [])

    def test_data_attributes_are_refused(self):
        for name in ('greeting', 'data'):
            with self.subTest(name=name), self.assertRaises(NoSuchMethodError):
                dispatch.resolve(Target(), name)

    def test_callable_instance_attribute_is_a_method(self):
        self.assertEqual(dispatch.resolve(Target(), 'callback')(), 'instance callable')

    def test_an_allow_list_narrows_what_may_be_called(self):
        self.assertEqual(dispatch.resolve(Target(), 'add', frozenset({'add'}))(1, 2), 3)
        with self.assertRaisesRegex(NoSuchMethodError, 'exposes'):
            dispatch.resolve(Target(), 'fail', frozenset({'add'}))

    def test_missing_method(self):
        with self.assertRaisesRegex(NoSuchMethodError, 'nope'):
            dispatch.resolve(Target(), 'nope')

    def test_a_name_once_found_public_is_still_checked_against_each_object(self):
        self.assertEqual(dispatch.resolve(Target(), 'add')(1, 2), 3)

        class Other:
            add = 'data'

        with self.assertRaisesRegex(NoSuchMethodError, 'data attribute'):
            dispatch.resolve(Other(), 'add')
        with self.assertRaisesRegex(NoSuchMethodError, 'exposes'):
            dispatch.resolve(Target(), 'add', frozenset({'fail'}))

    def test_refused_names_stay_refused_however_often_they_come(self):
        for _ in range(3):
            for name in ('_private', '__class__', 'a.b', '', None, 3, ['add']):
                with self.subTest(name=name), self.assertRaises(NoSuchMethodError):
                    dispatch.resolve(Target(), name)

    def test_made_up_names_do_not_grow_the_cache_without_bound(self):
        for i in range(dispatch._MAX_PUBLIC_NAMES + 100):
            with self.assertRaises(NoSuchMethodError):
                dispatch.resolve(Target(), f'made_up_{i}')
        self.assertLessEqual(len(dispatch._public_names), dispatch._MAX_PUBLIC_NAMES)
        self.assertEqual(dispatch.resolve(Target(), 'add')(2, 3), 5)


class Replies(unittest.TestCase):
    def test_result_reply_keeps_the_request_id(self):
        self.assertEqual(run(Target(), 'obj', 'add', (1,), {'b': 2}), (42, 3))

    def test_underscore_method_does_not_run(self):
        target = Target()
        _, error = run(target, 'obj', '_private')
        self.assertIsInstance(error, NoSuchMethodError)
        self.assertEqual(target.ran, [])

    def test_unknown_object(self):
        _, error = run(Target(), 'obj', 'add', raw=pickle.dumps(('other', 'add', (), {})))
        self.assertIsInstance(error, NoSuchObjectError)

    def test_exception_comes_back_as_itself_with_the_method_frame(self):
        _, error = run(Target(), 'obj', 'fail')
        self.assertIsInstance(error, KeyError)
        self.assertEqual(error.args, ('missing',))
        self.assertEqual([f.name for f in error.dopy_traceback], ['fail'])

    def test_unpicklable_result_is_a_serialization_error_reply(self):
        _, error = run(Target(), 'obj', 'unpicklable')
        self.assertIsInstance(error, SerializationError)
        self.assertIn('obj.unpicklable()', str(error))
        self.assertIn('server', str(error))

    def test_call_that_does_not_unpickle(self):
        raw = pickle.dumps(('obj', 'add', (), {}))[:-3]
        _, error = run(Target(), 'obj', 'add', raw=raw)
        self.assertIsInstance(error, SerializationError)

    def test_call_of_the_wrong_shape(self):
        for message in (('obj', 'add'), 'text', ('obj', 'add', [1], {}), ('obj', 'add', (), [])):
            with self.subTest(message=message):
                _, error = run(Target(), 'obj', 'add', raw=pickle.dumps(message))
                self.assertIsInstance(error, ProtocolError)

    def test_system_exit_in_a_method_is_reported_not_obeyed(self):
        class Quitter:
            def quit(self):
                raise SystemExit(3)
        _, error = run(Quitter(), 'obj', 'quit')
        self.assertIsInstance(error, SystemExit)


if __name__ == '__main__':
    unittest.main()
