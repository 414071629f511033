"""Exceptions packed on one side and rebuilt on the other, without sockets."""

import pickle
import traceback
import unittest

import dopy
from dopy import remote_exc, tb


def raised(exc):
    try:
        raise exc
    except BaseException as caught:
        return caught


class NeedsTwoArgs(Exception):
    def __init__(self, a, b):
        super().__init__(f'{a}-{b}')


class Rebuilding(unittest.TestCase):
    def roundtrip(self, exc):
        exc = raised(exc)
        packed = pickle.loads(pickle.dumps(remote_exc.pack(exc, exc.__traceback__)))
        return remote_exc.unpack(packed)

    def test_same_type_and_args(self):
        rebuilt = self.roundtrip(KeyError('k', 2))
        self.assertIs(type(rebuilt), KeyError)
        self.assertEqual(rebuilt.args, ('k', 2))

    def test_frames_as_extract_tb_gives_them(self):
        rebuilt = self.roundtrip(ValueError('v'))
        self.assertIsInstance(rebuilt.dopy_traceback, traceback.StackSummary)
        self.assertEqual(rebuilt.dopy_traceback[-1].name, 'raised')
        self.assertEqual(rebuilt.dopy_traceback[-1].line, 'raise exc')

    def test_remote_traceback_text_is_the_cause(self):
        rebuilt = self.roundtrip(ValueError('v'))
        self.assertIsInstance(rebuilt.__cause__, remote_exc.RemoteTraceback)
        text = str(rebuilt.__cause__)
        self.assertIn('in raised', text)
        self.assertIn('ValueError: v', text)

    def test_exception_that_cannot_rebuild_becomes_remote_error(self):
        rebuilt = self.roundtrip(NeedsTwoArgs(1, 2))
        self.assertIsInstance(rebuilt, dopy.RemoteError)
        self.assertTrue(rebuilt.remote_type.endswith('NeedsTwoArgs'))
        self.assertEqual(rebuilt.remote_message, '1-2')
        self.assertIn('in raised', rebuilt.remote_traceback)

    def test_exception_whose_class_is_unknown_here_becomes_remote_error(self):
        exc = raised(ValueError('x'))
        packed = list(remote_exc.pack(exc, exc.__traceback__))
        packed[0] = packed[0].replace(b'builtins', b'nomodule')
        packed[1] = 'nomodule.Gone'
        rebuilt = remote_exc.unpack(tuple(packed))
        self.assertIsInstance(rebuilt, dopy.RemoteError)
        self.assertEqual(str(rebuilt), 'nomodule.Gone: x')

    def test_error_text_has_local_frames_remote_frames_and_the_exception_line(self):
        rebuilt = self.roundtrip(KeyError('k'))
        try:
            raise rebuilt
        except KeyError as caught:
            text = tb.errorText(caught)
        self.assertTrue(text.startswith('Traceback (most recent call last):\n'))
        self.assertIn('test_error_text_has_local_frames', text)
        remote_part = text.split('Remote traceback (most recent call last):\n')[1]
        self.assertIn('in raised', remote_part)
        self.assertTrue(text.endswith("KeyError: 'k'\n"))

    def test_error_text_of_a_local_exception_is_its_traceback(self):
        exc = raised(ValueError('local'))
        text = tb.errorText(exc)
        self.assertNotIn('Remote', text)
        self.assertTrue(text.endswith('ValueError: local\n'))


if __name__ == '__main__':
    unittest.main()
