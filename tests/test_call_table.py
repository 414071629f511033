"""The call table alone, with no sockets: request ids, waiters, and what a reply frame brings."""

import unittest

import dopy
from dopy import remote_exc, wire
from dopy.calls import CallTable, Waiter, reply_outcome, unpickling_failed
from tests.support import one_frame


def raised(exc):
    try:
        raise exc
    except Exception as caught:
        return caught


class Table(unittest.TestCase):
    def setUp(self):
        self.table = CallTable()

    def test_request_ids_count_up_from_one(self):
        self.assertEqual([self.table.next_id() for _ in range(3)], [1, 2, 3])

    def test_a_reply_answers_the_waiter_of_its_request_id_once(self):
        first, second = Waiter('obj', 'a'), Waiter('obj', 'b')
        self.table.add(1, first)
        self.table.add(2, second)
        reply = one_frame(wire.encode(wire.REPLY, 2, 'two'))
        self.assertIs(self.table.take(reply.request_id), second)
        self.assertIsNone(self.table.take(reply.request_id))
        self.assertEqual(len(self.table), 1)

    def test_a_reply_after_the_caller_gave_up_finds_no_waiter(self):
        self.table.add(1, Waiter('obj', 'a'))
        self.table.discard(1)
        self.assertIsNone(self.table.take(one_frame(wire.encode(wire.REPLY, 1, 'late')).request_id))
        self.table.discard(1)
        self.assertEqual(len(self.table), 0)

    def test_take_all_empties_the_table(self):
        waiters = [Waiter('obj', str(i)) for i in range(3)]
        for i, waiter in enumerate(waiters):
            self.table.add(i + 1, waiter)
        self.assertEqual(self.table.take_all(), waiters)
        self.assertEqual((len(self.table), self.table.take_all()), (0, []))


class Outcomes(unittest.TestCase):
    def test_a_reply_brings_its_value(self):
        frame = one_frame(wire.encode(wire.REPLY, 1, [1, 'two']))
        self.assertEqual(reply_outcome(frame.kind, wire.loads(frame.data), 'obj', 'm'), ([1, 'two'], None))

    def test_an_error_brings_the_exception_rebuilt_not_raised(self):
        packed = remote_exc.pack(raised(KeyError('k')), None)
        frame = one_frame(wire.encode(wire.ERROR, 1, packed))
        value, error = reply_outcome(frame.kind, wire.loads(frame.data), 'obj', 'm')
        self.assertIsNone(value)
        self.assertIsInstance(error, KeyError)
        self.assertEqual(error.args, ('k',))

    def test_an_error_of_the_wrong_shape_is_a_protocol_error(self):
        frame = one_frame(wire.encode(wire.ERROR, 1, 'not a packed exception'))
        value, error = reply_outcome(frame.kind, wire.loads(frame.data), 'obj', 'm')
        self.assertIsInstance(error, dopy.ProtocolError)
        self.assertIn('obj.m()', str(error))

    def test_a_reply_that_did_not_unpickle_says_which_call_and_why(self):
        cause = ValueError('bad bytes')
        value, error = unpickling_failed(wire.REPLY, cause, 'obj', 'm')
        self.assertIsInstance(error, dopy.SerializationError)
        self.assertIs(error.__cause__, cause)
        self.assertIn('the result of obj.m()', str(error))
        self.assertIn('exception of obj.m()', str(unpickling_failed(wire.ERROR, cause, 'obj', 'm')[1]))


if __name__ == '__main__':
    unittest.main()
