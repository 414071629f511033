"""A threaded server's connections, read from one epoll by whichever of its threads leads: leader and followers.

A ``ServeLoop`` holds handlers, each with a descriptor to read (a server's
connections: see ``Connection.serve_in``).  One of its threads at a time,
the *leader*, waits in ``epoll`` and runs ``handler.on_ready()`` for each
descriptor that became readable, in that same thread: a call that comes in
is read, run and answered with no thread woken, and one wake-up serves every
connection that became ready at once.  The other threads, the *followers*,
wait to lead.

A descriptor is armed one-shot: once the leader takes it, nobody else sees
it until its handler is done and it is armed again.  So a connection's
calls run one at a time, in order, whichever thread runs them.

A handler may take long: a slow method, a nested call waiting for its
reply.  The leader then *steps aside*, and a follower (started if there is
none) leads meanwhile; the handler's thread becomes a follower once its
handler is done.  It steps aside:

- before DOPY itself blocks in a handler (``step_aside()``, called by
  ``dopy.connection`` before it waits for a socket or another thread);
- when a *watchdog* thread sees the same handler still running at two of
  its ticks, ``_TICK`` seconds apart: a method that computes, or blocks
  outside DOPY, holds up the other connections for 2 to 4 ms, about as long
  as the GIL's own switch interval (5 ms) would.  The watchdog ticks only
  while handlers run: after a tick with none, it sleeps until the next;
- before it runs the handler of a descriptor whose handler the watchdog
  saw overrun last time, until one of its runs takes less than a tick: a
  connection whose calls are slow holds up no one, at the price of a
  wake-up per call, as a thread per connection would cost.

Threads that wait to lead are kept, up to ``max_idle``; the others end.
Every thread is the loop's, and ``close()`` joins them.  This needs
``select.epoll`` (Linux); ``AVAILABLE`` says whether the system has it.
"""

import logging
import os
import select
import threading
import time
from collections import deque
from threading import get_ident

__all__ = ['ServeLoop', 'step_aside', 'AVAILABLE']

log = logging.getLogger('dopy.serveloop')

AVAILABLE = hasattr(select, 'epoll')
_ONESHOT = (select.EPOLLIN | select.EPOLLONESHOT) if AVAILABLE else 0
# Seconds between the watchdog's looks at a running handler.
_TICK = 0.002
# Thread ident -> the loop it leads, while it runs a handler: step_aside's lookup.
_leading = {}


def step_aside():
    """This thread is about to block: if it leads a loop from inside a handler, let a follower lead."""
    if _leading:
        me = get_ident()
        loop = _leading.pop(me, None)
        if loop is not None:
            loop._step_aside(me)


class ServeLoop:
    """Descriptors read, and their handlers run, by one leading thread at a time; see the module's docstring."""

    def __init__(self, name, max_idle):
        self._name = name
        self._max_idle = max_idle
        self._epoll = select.epoll()
        self._handlers = {}
        # Events the leader has taken from epoll and not yet handled: a
        # leader that steps aside leaves them to the next one.
        self._ready = deque()
        self._lock = threading.Lock()
        self._followers = threading.Condition(self._lock)
        self._watch = threading.Condition(self._lock)
        self._leader = None
        # The descriptor whose handler the leader runs, or None.
        self._running_fd = None
        self._turn = 0
        # Descriptors whose handler the watchdog last saw overrun.
        self._slow = set()
        self._watch_asleep = False
        self._idle = 0
        self._threads = set()
        self._started = 0
        self._watchdog = None
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        # Level-triggered, never re-armed: once close() writes, every poll returns.
        self._epoll.register(self._wake_r, select.EPOLLIN)

    def add(self, fd, handler):
        """Read ``fd`` from now on: ``handler.on_ready()`` runs whenever it is readable.

        ``on_ready`` returns True to go on reading, False when the
        descriptor is done with (``remove`` it before closing it).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError('the serve loop is closed')
            self._handlers[fd] = handler
            self._epoll.register(fd, _ONESHOT)
            if not self._threads:
                self._start_thread()
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch_loop, daemon=True,
                                                  name=f'{self._name}-watchdog')
                self._watchdog.start()

    def remove(self, fd):
        """Stop reading ``fd``; called before it is closed."""
        with self._lock:
            self._handlers.pop(fd, None)
            self._slow.discard(fd)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # already closed, or never added

    def idle_count(self):
        """How many threads wait to lead."""
        with self._lock:
            return self._idle

    def close(self, timeout):
        """Stop, and join every thread, waiting at most ``timeout`` seconds for handlers still running."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
            if self._watchdog is not None:
                threads.append(self._watchdog)
            self._followers.notify_all()
            self._watch.notify_all()
            # Under the lock: the last thread out closes the pipe once it sees _closed.
            os.write(self._wake_w, b'x')
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        left = []
        for thread in threads:
            if thread is not me:
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    left.append(thread)
        for thread in left:
            log.warning('%s is still running a remote method; leaving it behind', thread.name)
        self._close_fds_if_unused()

    def _close_fds_if_unused(self):
        # By close(), or by the last thread out when close() had to leave some running.
        with self._lock:
            if not self._closed or self._threads or self._epoll.closed:
                return
            self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _start_thread(self):
        # Under the lock: close() never misses a thread.
        thread = threading.Thread(target=self._work, daemon=True, name=f'{self._name}-{self._started}')
        self._started += 1
        self._threads.add(thread)
        thread.start()

    def _work(self):
        me = get_ident()
        try:
            while self._follow(me) and self._lead(me):
                pass
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())
                if self._leader == me:
                    self._leader = None
            self._close_fds_if_unused()

    def _follow(self, me):
        """Wait to lead; True once this thread leads, False if it is to end."""
        with self._lock:
            while self._leader is not None and not self._closed:
                if self._idle >= self._max_idle:
                    return False
                self._idle += 1
                self._followers.wait()
                self._idle -= 1
            if self._closed:
                return False
            self._leader = me
            return True

    def _lead(self, me):
        """Wait for descriptors and handle them until this thread steps aside (True) or the loop closes (False)."""
        ready = self._ready
        handlers = self._handlers
        slow = self._slow
        lock = self._lock
        poll = self._epoll.poll
        while True:
            if not ready:
                try:
                    ready.extend(poll())
                except OSError:
                    if self._closed:
                        return False
                    raise
                if self._closed:
                    return False
                continue
            fd = ready.popleft()[0]
            handler = handlers.get(fd)
            if handler is None:
                continue  # the wake-up pipe, or removed meanwhile
            if fd in slow:
                # Its handler overran last time: a follower leads before it
                # runs, rather than once the watchdog sees it overrun again.
                self._step_aside(me)
                started = time.monotonic()
                self._run(fd, handler)
                if time.monotonic() - started < _TICK:
                    slow.discard(fd)
                return True
            self._turn += 1
            self._running_fd = fd
            if self._watch_asleep:
                with self._lock:
                    self._watch.notify()
            _leading[me] = self
            self._run(fd, handler)
            _leading.pop(me, None)
            # acquire and release rather than ``with``: half the cost, on every call's path.
            lock.acquire()
            if self._leader != me:
                lock.release()
                return True
            self._running_fd = None
            lock.release()

    def _run(self, fd, handler):
        try:
            go_on = handler.on_ready()
        except Exception:
            log.exception('%s failed handling a ready connection', threading.current_thread().name)
            go_on = False
        if go_on:
            try:
                self._epoll.modify(fd, _ONESHOT)
            except OSError:
                pass  # removed and closed meanwhile

    def _step_aside(self, me):
        with self._lock:
            self._hand_over(me)

    def _hand_over(self, me):
        """Thread ``me`` no longer leads, if it did: a follower leads instead (the lock is held)."""
        if self._leader != me or self._closed:
            return
        self._leader = None
        self._running_fd = None
        if self._idle:
            self._followers.notify()
        else:
            self._start_thread()

    def _watch_loop(self):
        with self._lock:
            seen = None
            while not self._closed:
                if self._running_fd is None and self._turn == seen:
                    # A whole tick with no handler: sleep until the leader starts one.
                    self._watch_asleep = True
                    if self._running_fd is None and self._turn == seen:
                        self._watch.wait()
                    self._watch_asleep = False
                    continue
                seen = self._turn
                self._watch.wait(_TICK)
                running = self._running_fd
                if running is not None and self._turn == seen:
                    self._slow.add(running)
                    self._hand_over(self._leader)
