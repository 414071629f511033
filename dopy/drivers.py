"""Who reads a connection and where the peer's calls run: one driver for each of the hub's threading modes.

- ``ThreadDriver`` (THRD_CONN): a thread of the connection's own serves it
  (``Connection.serve``) and is its *owner*: every call the peer sends runs
  on it, in order.  A call that another thread reads meanwhile is left in
  the owner's mailbox.
- ``PoolDriver`` (THRD_FUNC): a reader thread serves the connection and hands
  each call to the hub's pool; when every pool thread is busy, the reader
  runs it itself.
- ``LoopDriver`` (THRD_NONE): no threads.  The hub's loop reads the connection
  and runs each call; a call made meanwhile runs the loop until its reply
  comes, and a slow peer is waited for the same way.

A connection asks its driver at each of these points, and nowhere else
does it look at the threading mode.  In the threaded modes a thread that
waits for a reply may read for itself (see ``Connection``'s reading role);
a driver says only who else reads, and where calls run.
"""

import logging
from threading import get_ident

from . import dispatch
from .futures import CallFuture, LoopFuture
from .hub import THRD_CONN, THRD_FUNC

__all__ = ['Driver', 'ThreadDriver', 'PoolDriver', 'LoopDriver', 'driver_for']

log = logging.getLogger('dopy.connection')


class Driver:
    """What every mode does alike: calls run where they were read, a failed reply closes the connection."""

    # Threads read: a caller may read its own reply, and a connection may
    # have a reader thread of its own (``Connection.start_reader``).
    threaded = True
    # The thread that serves a connection is its owner, and runs its calls.
    owns = False
    # None: the channel waits for a slow peer in poll.
    wait_writable = None

    def attach(self, connection, stream):
        """``connection``, over ``stream``, is new: see that it is read."""

    def detach(self, connection, stream):
        """``connection`` has closed: it is read no more."""

    def new_future(self, name, method):
        return CallFuture(name, method)

    def run_call(self, connection, frame):
        """A CALL or ONEWAY ``frame`` that ``connection``'s reader has read: run it where this mode runs calls.

        Here: on the connection's owner, if it has one and another thread
        read the frame, else on the thread that read it.
        """
        owner = connection.owner
        if owner is not None and owner != get_ident():
            connection.post(frame)
        else:
            connection.reply(frame, dispatch.run(connection.lookup, frame, connection.loads))

    def reply_failed(self, connection, exc):
        """A reply could not be sent (``exc``): the reader hears of it and closes the connection."""
        raise exc

    def wait(self, connection, waiter, deadline):
        """A call waits for its reply (``waiter.done``): it reads for it while no other thread does."""
        connection.read_until(waiter, deadline)


class ThreadDriver(Driver):
    """THRD_CONN: the connection's own thread reads it and runs its calls."""

    owns = True


class PoolDriver(Driver):
    """THRD_FUNC: a reader thread reads the connection; each call runs on the hub's pool."""

    def __init__(self, hub):
        self._submit = hub.submit

    def run_call(self, connection, frame):
        call = dispatch.prepare(connection.lookup, frame, connection.loads)
        if not self._submit(lambda: connection.run(frame, call)):
            # Every pool thread is busy, perhaps each waiting for a nested
            # call that needs this one: the reader runs it, as in THRD_CONN.
            connection.run(frame, call)

    def reply_failed(self, connection, exc):
        # No reader to tell: the connection is shut, and the reader logs why.
        log.debug('reply to %s not sent: %s', connection.peer, exc)


class LoopDriver(Driver):
    """THRD_NONE: the hub's loop reads every connection and runs every call."""

    threaded = False

    def __init__(self, hub):
        self._loop = hub.loop

    def attach(self, connection, stream):
        self._loop.add_reader(stream.read_fd, lambda _fd: self._on_readable(connection, stream))
        if stream.pending():
            self._defer_pending(connection, stream)

    def detach(self, connection, stream):
        self._loop.remove_reader(stream.read_fd)

    def new_future(self, name, method):
        return LoopFuture(name, method, self._loop)

    def wait(self, connection, waiter, deadline):
        """A call waits for its reply (``waiter.done``): the loop runs, serving everyone, until it comes."""
        self._loop.pump_until(lambda: waiter.done or connection.closed, deadline)

    def wait_writable(self, connection, deadline):
        """The peer is slow to read: the loop runs, serving everyone else, until it may be written to."""
        self._loop.pump_until(lambda: connection.closed, deadline, connection.write_fd)

    def _defer_pending(self, connection, stream):
        # Decrypted bytes the descriptor does not show: read them before the loop blocks.
        self._loop.defer((connection, 'pending'), lambda: self._on_readable(connection, stream))

    def _on_readable(self, connection, stream):
        """The loop saw data: read what is there and handle every whole frame."""
        if connection.closed:
            return
        try:
            frame = connection.receive(stream.recv_into)
        except BlockingIOError:
            frame = None  # read already by a nested turn of the loop
        except Exception as exc:
            connection.ended(exc)
            return
        try:
            self._handle_ready(connection, frame)
            if stream.pending():
                self._defer_pending(connection, stream)
        except Exception as exc:
            connection.ended(exc)

    def _handle_ready(self, connection, frame=None):
        """Handle ``frame``, then the other frames decoded so far, one by one.

        Before each, the rest are left to the loop's backlog, so that a call
        made while handling this frame (which runs the loop) handles them
        first, in order, and no frame waits for more bytes to arrive.
        """
        next_frame = connection.next_frame
        while not connection.closed:
            if frame is None:
                frame = next_frame()
                if frame is None:
                    return
            self._loop.defer(connection, lambda: self._handle_backlog(connection))
            connection.handle(frame)
            frame = None

    def _handle_backlog(self, connection):
        try:
            self._handle_ready(connection)
        except Exception as exc:
            connection.ended(exc)


def driver_for(hub):
    """The driver of ``hub``'s threading mode."""
    if hub.threadMode == THRD_CONN:
        return ThreadDriver()
    if hub.threadMode == THRD_FUNC:
        return PoolDriver(hub)
    return LoopDriver(hub)
