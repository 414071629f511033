"""The hub's select loop: one selector for reactors, the console and, in THRD_NONE, every socket.

``run()`` is what ``Hub.mainloop`` runs; ``pump_until`` runs the same loop
from inside a call that waits (a THRD_NONE call waiting for its reply, or
for its socket to take more bytes), so nested calls need no threads.  The
loop may be re-entered that way; a callback for a file object that went
away meanwhile is skipped, and work left over by an outer iteration (frames
a connection has decoded but not yet handled) is offered again before the
loop blocks.  Only one thread runs a hub's loop at a time.
"""

import contextlib
import heapq
import itertools
import logging
import os
import selectors
import signal
import threading
import time

from .errors import CallTimeoutError, DopyError

__all__ = ['Loop']

log = logging.getLogger('dopy.loop')


class Loop:
    """A selector with readable callbacks, a wake-up pipe and a backlog of deferred work."""

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._callbacks = {}
        self._always_ready = set()
        self._backlog = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False
        self._closed = False
        self._close_lock = threading.Lock()
        self._owner = None
        self._depth = 0
        self._timers = []
        self._timer_ids = itertools.count()

    def add_reader(self, fileobj, callback):
        """Call ``callback(fileobj)`` whenever ``fileobj`` (or a descriptor) is readable."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd in self._callbacks:
            raise ValueError(f'{fileobj!r} is already watched by this loop')
        try:
            self._selector.register(fd, selectors.EVENT_READ)
        except PermissionError:
            # A regular file (or /dev/null): epoll cannot wait on one, and it
            # is always readable, so its callback runs on every turn.
            self._always_ready.add(fd)
        self._callbacks[fd] = (fileobj, callback)
        # Another thread may be blocked in select() without this descriptor.
        self.wake()

    def remove_reader(self, fileobj):
        """Stop watching ``fileobj``; False if it was not watched."""
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if self._callbacks.pop(fd, None) is None or self._closed:
            return False
        if fd in self._always_ready:
            self._always_ready.discard(fd)
        else:
            self._selector.unregister(fd)
        return True

    def call_later(self, delay, work):
        """Run ``work()`` from the loop after ``delay`` seconds; returns a handle whose ``cancel()`` stops it."""
        timer = _Timer(time.monotonic() + delay, next(self._timer_ids), work)
        heapq.heappush(self._timers, timer)
        self.wake()
        return timer

    def _run_timers(self):
        """Run the timers that are due; the seconds until the next one, or None."""
        while self._timers:
            timer = self._timers[0]
            wait = timer.when - time.monotonic()
            if timer.cancelled:
                heapq.heappop(self._timers)
            elif wait > 0:
                return wait
            else:
                heapq.heappop(self._timers)
                timer.work()
        return None

    def defer(self, key, work):
        """Run ``work()`` before the loop next blocks (once per ``key``)."""
        self._backlog[key] = work

    def stop(self):
        """Make ``run()`` return; safe from any thread."""
        self._stopping = True
        self.wake()

    def wake(self):
        """Interrupt a blocked ``select``; safe from any thread."""
        with self._close_lock:
            if self._closed:
                return
            try:
                os.write(self._wake_w, b'x')
            except BlockingIOError:
                pass  # a full pipe wakes the loop just as well

    @property
    def stopping(self):
        return self._stopping

    @property
    def closed(self):
        return self._closed

    def run(self, finished):
        """Run until ``stop()``, or until ``finished()`` is true when the loop wakes."""
        self._enter()
        try:
            self._stopping = False
            while not self._stopping and not finished():
                self.run_once(None)
        finally:
            self._leave()

    @contextlib.contextmanager
    def watching_signals(self, *signums):
        """While in it, catch ``signums`` and wake the loop for them; yields the list of those caught.

        Pass ``lambda: caught`` (or more) as ``run``'s ``finished`` to end
        it on one.  Only on the main thread, where Python runs signal
        handlers, and only signals still handled the default way: an
        application's own handler stays.  Every signal's number goes down
        the wake-up pipe, so that ``select`` wakes even when another
        thread received the signal, and a handler (Ctrl-C's
        ``KeyboardInterrupt`` too) runs at once.
        """
        caught = []
        if threading.current_thread() is not threading.main_thread():
            yield caught
            return

        def handler(signum, frame):
            # Nothing that takes a lock: the signal may have come while
            # this very thread held it.
            caught.append(signum)

        previous = {signum: signal.signal(signum, handler) for signum in signums
                    if signal.getsignal(signum) == signal.SIG_DFL}
        wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        if wakeup != -1:
            # Someone else's (an asyncio loop's): theirs it stays.
            signal.set_wakeup_fd(wakeup)
        try:
            yield caught
        finally:
            if wakeup == -1:
                signal.set_wakeup_fd(-1)
            for signum, action in previous.items():
                signal.signal(signum, action)

    def pump_until(self, done, deadline, write_fd=None):
        """Run the loop until ``done()`` is true; None, or ``CallTimeoutError`` at ``deadline``.

        With ``write_fd``, also return as soon as that descriptor is writable.
        """
        self._enter()
        try:
            self._pump(done, deadline, write_fd)
        finally:
            self._leave()

    def _enter(self):
        me = threading.get_ident()
        with self._close_lock:
            if self._owner not in (None, me):
                raise DopyError('a THRD_NONE hub is driven by one thread: this call came from '
                                'another thread while its loop runs (use THRD_CONN or THRD_FUNC '
                                'for threads, or make the call from the loop thread)')
            self._owner = me
            self._depth += 1

    def _leave(self):
        with self._close_lock:
            self._depth -= 1
            if not self._depth:
                self._owner = None

    def _pump(self, done, deadline, write_fd):
        while not done():
            if self._closed:
                return
            timeout = None
            if deadline is not None:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    raise CallTimeoutError('timed out waiting in the hub loop')
            if self.run_once(timeout, write_fd):
                return

    def run_once(self, timeout, write_fd=None):
        """One turn: deferred work, then one select and its callbacks. True if ``write_fd`` is writable."""
        if self._backlog:
            key, work = next(iter(self._backlog.items()))
            del self._backlog[key]
            work()
            return False
        next_timer = self._run_timers()
        if next_timer is not None and (timeout is None or next_timer < timeout):
            timeout = next_timer
        if self._always_ready:
            timeout = 0
        reading = write_fd in self._callbacks
        if write_fd is not None:
            # A socket is read and written through one descriptor.
            if reading:
                self._selector.modify(write_fd, selectors.EVENT_READ | selectors.EVENT_WRITE)
            else:
                self._selector.register(write_fd, selectors.EVENT_WRITE)
        try:
            events = self._selector.select(timeout)
        finally:
            if write_fd is not None:
                if reading:
                    self._selector.modify(write_fd, selectors.EVENT_READ)
                else:
                    self._selector.unregister(write_fd)
        writable = False
        for key, mask in events:
            fd = key.fd
            if fd == write_fd and mask & selectors.EVENT_WRITE:
                writable = True
            if fd == self._wake_r:
                self._drain_wake()
            elif mask & selectors.EVENT_READ:
                entry = self._callbacks.get(fd)
                if entry is not None:
                    entry[1](entry[0])
        for fd in list(self._always_ready):
            entry = self._callbacks.get(fd)
            if entry is not None:
                entry[1](entry[0])
        return writable

    def _drain_wake(self):
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self):
        """Release the selector and the wake-up pipe. The loop is unusable after."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


class _Timer:
    """A piece of work due at a ``time.monotonic()`` time."""

    __slots__ = ('when', 'order', 'work', 'cancelled')

    def __init__(self, when, order, work):
        self.when = when
        self.order = order
        self.work = work
        self.cancelled = False

    def __lt__(self, other):
        return (self.when, self.order) < (other.when, other.order)

    def cancel(self):
        self.cancelled = True
