"""The ``concurrent.futures.Future`` of a call sent: running from the start, and resolved without a lock where nobody waits.

A future from ``proxy.method.future()`` is made for every call in flight
and resolved by the thread that reads its reply, so its cost is on the
path of every pipelined call.  A plain ``Future`` makes a ``Condition``
(and an ``RLock``) when it is made, and resolving it takes that lock and
notifies it even when nobody has asked for the outcome yet.  A
``CallFuture`` makes its condition, its waiter list and its callback list
on first use instead: by whoever waits, registers a callback, or is
handed it by ``concurrent.futures.wait`` or ``as_completed``.  Until then
resolving it is three assignments, and ``result()``, ``exception()`` and
``done()`` on a resolved future take no lock at all.

This relies on ``Future``'s own fields (the same from Python 3.8 to 3.14,
and checked by a test): ``_condition``, ``_waiters`` and
``_done_callbacks``, made here on first use; ``_state``, ``_result`` and
``_exception``, set at once.  A call future is resolved exactly once, by
whichever thread takes it out of its connection's table of calls in
flight, so the resolving thread is never raced by another.
"""

import time
from concurrent.futures import Future
from concurrent.futures._base import FINISHED, RUNNING
from threading import Condition

from .errors import CallTimeoutError

__all__ = ['CallFuture', 'LoopFuture']

_MADE_ON_FIRST_USE = frozenset(('_condition', '_waiters', '_done_callbacks'))


class CallFuture(Future):
    """The future of the call ``name.method()``, sent: it can no longer be cancelled."""

    def __init__(self, name, method):
        # Future.__init__'s fields but those made on first use, and RUNNING
        # at once: a sent call cannot be cancelled.
        self._state = RUNNING
        self._result = None
        self._exception = None
        self.name = name
        self.method = method

    def __getattr__(self, name):
        if name not in _MADE_ON_FIRST_USE:
            raise AttributeError(f'{type(self).__name__!r} object has no attribute {name!r}')
        fields = self.__dict__
        # setdefault is atomic: threads racing here all get the same objects.
        # The condition is set last, so whoever sees it sees the lists too.
        fields.setdefault('_waiters', [])
        fields.setdefault('_done_callbacks', [])
        fields.setdefault('_condition', Condition())
        return fields[name]

    def set_result(self, result):
        self.resolve(result, None)

    def set_exception(self, exception):
        self.resolve(None, exception)

    def resolve(self, result, exception):
        """``set_result(result)`` if ``exception`` is None, else ``set_exception(exception)``: the connection's one call."""
        fields = self.__dict__
        if '_condition' in fields or self._state != RUNNING:
            # Someone may wait, or the future is resolved already (which the
            # base class reports).
            if exception is None:
                Future.set_result(self, result)
            else:
                Future.set_exception(self, exception)
            return
        self._result = result
        self._exception = exception
        self._state = FINISHED
        if '_condition' in fields:
            # Made meanwhile, by a thread that found the future still running
            # and may now wait on it, or have left a callback or a waiter:
            # the base class's notification, now that the outcome is set.
            with self._condition:
                for waiter in self._waiters:
                    if exception is None:
                        waiter.add_result(self)
                    else:
                        waiter.add_exception(self)
                self._condition.notify_all()
            self._invoke_callbacks()

    # Once FINISHED, nothing in a future changes again, and its outcome was
    # set before its state: these read it without the lock.

    def done(self):
        # Never cancelled: RUNNING from the start, a future cannot be.
        return self._state == FINISHED

    def result(self, timeout=None):
        if self._state == FINISHED:
            if self._exception is not None:
                try:
                    raise self._exception
                finally:
                    self = None  # no cycle through the exception's traceback
            return self._result
        return super().result(timeout)

    def exception(self, timeout=None):
        if self._state == FINISHED:
            return self._exception
        return super().exception(timeout)


class LoopFuture(CallFuture):
    """THRD_NONE: a future whose waiting runs the hub's loop, which is what resolves it."""

    def __init__(self, name, method, loop):
        super().__init__(name, method)
        self._loop = loop

    def _pump(self, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            self._loop.pump_until(self.done, deadline)
        except CallTimeoutError:
            pass  # the Future's own wait reports the timeout

    def result(self, timeout=None):
        self._pump(timeout)
        return super().result(0 if self.done() else timeout)

    def exception(self, timeout=None):
        self._pump(timeout)
        return super().exception(0 if self.done() else timeout)
