"""The call table of one connection: request ids, the calls in flight and who waits for each, and the outcome a reply frame brings; no I/O.

A call sent gets the next request id, and its *waiter* (a ``Waiter``, or
the call's future: see ``dopy.futures``) is kept under that id until the
reply with the same id comes, the caller gives up on it (a timeout, an
interrupt), or the connection ends.  A reply that finds no waiter is
discarded: it came after the caller gave up.  The table does no locking:
its connection holds its lock around every use but ``next_id``, which is
atomic.

A reply's outcome is ``(value, error)``: the result, or the exception the
caller is to raise for it, built and not raised.
"""

import functools
import itertools

from . import remote_exc, wire
from .errors import ProtocolError, SerializationError

__all__ = ['Waiter', 'CallTable', 'reply_outcome', 'unpickling_failed']


class Waiter:
    """Where a call's outcome lands: its result, or the exception to raise for it.

    The thread that reads the reply unpickles it before it reads on, so
    that a reference in a reply is resolved before any RELEASE behind it.
    """

    __slots__ = ('done', 'value', 'error', 'name', 'method')

    def __init__(self, name, method):
        self.done = False
        self.value = None
        self.error = None
        self.name = name
        self.method = method


class CallTable:
    """The calls in flight on one connection, by request id."""

    def __init__(self):
        # A partial of next(): a new id with no Python frame, on every call's path.
        self.next_id = functools.partial(next, itertools.count(1))
        self._waiting = {}

    def __len__(self):
        return len(self._waiting)

    def add(self, request_id, waiter):
        """Have the reply to ``request_id`` answer ``waiter``."""
        self._waiting[request_id] = waiter

    def discard(self, request_id):
        """The caller gave up on ``request_id``: a reply to it will be discarded."""
        self._waiting.pop(request_id, None)

    def take(self, request_id):
        """The waiter for the reply to ``request_id``, no longer waiting; None if nobody waits for it."""
        return self._waiting.pop(request_id, None)

    def take_all(self):
        """Every waiter, no longer waiting: the connection has ended."""
        waiting, self._waiting = self._waiting, {}
        return list(waiting.values())


def reply_outcome(kind, loaded, name, method):
    """The ``(value, error)`` of the call ``name.method()`` from its REPLY or ERROR frame's unpickled payload ``loaded``."""
    if kind == wire.REPLY:
        return loaded, None
    try:
        return None, remote_exc.unpack(loaded)
    except (TypeError, ValueError) as exc:
        error = ProtocolError(f'malformed exception in the reply to {name}.{method}()')
        error.__cause__ = exc
        return None, error


def unpickling_failed(kind, exc, name, method):
    """The ``(value, error)`` of the call ``name.method()`` whose REPLY or ERROR frame did not unpickle, raising ``exc``."""
    what = 'result' if kind == wire.REPLY else 'exception'
    error = SerializationError(
        f'the {what} of {name}.{method}() could not be unpickled on the client: '
        f'{type(exc).__name__}: {exc}')
    error.__cause__ = exc
    return None, error
