"""A call's future keeps every promise of ``concurrent.futures.Future``, however it is waited for and whenever it resolves."""

import concurrent.futures
import threading
import unittest
from concurrent.futures import Future, InvalidStateError

from dopy.futures import CallFuture
from tests.support import TIMEOUT


def resolve_soon(future, result=None, exception=None):
    """Resolve ``future`` from another thread once ``go`` is set; returns (go, thread)."""
    go = threading.Event()

    def resolve():
        go.wait(TIMEOUT)
        if exception is None:
            future.set_result(result)
        else:
            future.set_exception(exception)

    thread = threading.Thread(target=resolve)
    thread.start()
    return go, thread


class CallFutureContract(unittest.TestCase):
    def test_future_has_the_fields_a_call_future_relies_on(self):
        # If a new Python adds a field to Future.__init__, CallFuture must set it too.
        self.assertEqual(set(vars(Future())), {
            '_condition', '_state', '_result', '_exception', '_waiters', '_done_callbacks'})

    def test_a_new_call_future_is_running_and_cannot_be_cancelled(self):
        future = CallFuture('obj', 'method')
        self.assertTrue(future.running())
        self.assertFalse(future.done())
        self.assertFalse(future.cancel())
        self.assertFalse(future.cancelled())
        self.assertIn('state=running', repr(future))

    def test_a_resolved_future_gives_its_result_or_exception(self):
        ok, failed = CallFuture('obj', 'ok'), CallFuture('obj', 'failed')
        ok.set_result(42)
        failed.set_exception(KeyError('gone'))
        self.assertTrue(ok.done() and failed.done())
        self.assertEqual((ok.result(), ok.exception()), (42, None))
        self.assertIsInstance(failed.exception(), KeyError)
        with self.assertRaisesRegex(KeyError, 'gone'):
            failed.result(0)
        self.assertFalse(ok.running() or ok.cancelled())
        self.assertIn('returned int', repr(ok))
        self.assertIn('raised KeyError', repr(failed))

    def test_a_future_resolves_only_once(self):
        for first in ('result', 'exception'):
            future = CallFuture('obj', 'method')
            getattr(future, f'set_{first}')(ValueError() if first == 'exception' else 1)
            with self.assertRaises(InvalidStateError):
                future.set_result(2)
            with self.assertRaises(InvalidStateError):
                future.set_exception(ValueError())

    def test_result_waits_for_a_resolution_from_another_thread(self):
        future = CallFuture('obj', 'method')
        go, thread = resolve_soon(future, result='late')
        with self.assertRaises(concurrent.futures.TimeoutError):
            future.result(0.01)
        go.set()
        self.assertEqual(future.result(TIMEOUT), 'late')
        thread.join(TIMEOUT)

    def test_exception_waits_for_a_resolution_from_another_thread(self):
        future = CallFuture('obj', 'method')
        go, thread = resolve_soon(future, exception=KeyError('late'))
        go.set()
        self.assertIsInstance(future.exception(TIMEOUT), KeyError)
        thread.join(TIMEOUT)

    def test_callbacks_run_once_whether_added_before_or_after_the_outcome(self):
        future = CallFuture('obj', 'method')
        seen = []
        future.add_done_callback(lambda f: seen.append(('before', f.result())))
        future.set_result(7)
        future.add_done_callback(lambda f: seen.append(('after', f.result())))
        self.assertEqual(seen, [('before', 7), ('after', 7)])

    def test_a_callback_added_while_the_future_resolves_runs_once(self):
        seen = []

        class Interleaved(CallFuture):
            # Another thread's add_done_callback, landing between the
            # resolver's check for waiters and its setting of the state.
            def __setattr__(self, name, value):
                object.__setattr__(self, name, value)
                if name == '_result' and value == 'outcome':
                    self.add_done_callback(lambda f: seen.append(f.result()))

        future = Interleaved('obj', 'method')
        future.set_result('outcome')
        self.assertEqual(seen, ['outcome'])

    def test_wait_and_as_completed_see_futures_resolved_before_and_after(self):
        early = [CallFuture('obj', 'early') for _ in range(3)]
        late = [CallFuture('obj', 'late') for _ in range(3)]
        for i, future in enumerate(early):
            future.set_result(i)
        go = threading.Event()

        def resolve_late():
            go.wait(TIMEOUT)
            for i, future in enumerate(late):
                future.set_result(10 + i)

        thread = threading.Thread(target=resolve_late)
        thread.start()
        done, not_done = concurrent.futures.wait(early + late, timeout=0)
        self.assertEqual((set(done), set(not_done)), (set(early), set(late)))
        go.set()
        results = sorted(f.result() for f in concurrent.futures.as_completed(early + late, timeout=TIMEOUT))
        self.assertEqual(results, [0, 1, 2, 10, 11, 12])
        thread.join(TIMEOUT)

    def test_many_threads_waiting_on_many_futures_all_wake(self):
        futures = [CallFuture('obj', str(i)) for i in range(200)]
        results = [None] * len(futures)

        def wait_all(offset):
            for i in range(offset, len(futures), 4):
                results[i] = futures[i].result(TIMEOUT)

        waiters = [threading.Thread(target=wait_all, args=(k,)) for k in range(4)]
        for waiter in waiters:
            waiter.start()
        for i, future in enumerate(futures):
            future.set_result(i)
        for waiter in waiters:
            waiter.join(TIMEOUT)
        self.assertEqual(results, list(range(200)))

    def test_other_missing_attributes_are_still_missing(self):
        with self.assertRaisesRegex(AttributeError, 'no_such_thing'):
            CallFuture('obj', 'method').no_such_thing


if __name__ == '__main__':
    unittest.main()
