"""A thread pool that starts threads as needed and keeps idle ones for the next work: THRD_FUNC's calls, a server's connections, a hub's host name lookups.

``size`` bounds the threads (None: no bound); when all of them are busy,
``submit`` refuses and the caller runs the work itself.  ``max_idle``
bounds the threads kept waiting for work: the others end when their work
is done.  Unlike ``concurrent.futures.ThreadPoolExecutor`` it can be shut
down from one of its own threads (a remote method that shuts the hub down)
and it joins its threads with a deadline.
"""

import logging
import queue
import threading
import time

__all__ = ['Pool']

log = logging.getLogger('dopy.pool')


class Pool:
    """Runs submitted callables on at most ``size`` threads, keeping at most ``max_idle`` of them idle."""

    def __init__(self, size, name, max_idle=None, doing='running a remote method'):
        self._size = size
        self._doing = doing
        self._max_idle = max_idle
        self._name = name
        self._queue = queue.SimpleQueue()
        self._threads = set()
        self._started = 0
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, work):
        """Start ``work()`` on an idle or new pool thread and return True; False if all ``size`` are busy.

        Nothing waits for a busy pool: the caller runs refused work itself,
        so work that waits on other work (nested calls) cannot deadlock.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError('the pool is shut down')
            if self._idle > 0:
                self._idle -= 1
            elif self._size is None or len(self._threads) < self._size:
                # Started under the lock, so that shutdown never meets a thread not yet started.
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f'{self._name}-{self._started}')
                self._started += 1
                self._threads.add(thread)
                thread.start()
            else:
                return False
            self._queue.put(work)
            return True

    def idle_count(self):
        """How many threads wait for work."""
        with self._lock:
            return self._idle

    def shutdown(self, timeout):
        """Drop the work not yet started and join the threads, waiting at most ``timeout`` seconds."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for _ in threads:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        for thread in threads:
            if thread is not me:
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    log.warning('%s is still %s; leaving it behind', thread.name, self._doing)

    def _work(self):
        me = threading.current_thread()
        while True:
            work = self._queue.get()
            if work is None or self._closed:
                return
            try:
                work()
            except Exception:
                log.exception('%s failed outside dispatch', me.name)
            # Nothing of the finished work stays alive while this thread waits.
            work = None
            with self._lock:
                if self._max_idle is not None and self._idle >= self._max_idle and not self._closed:
                    self._threads.discard(me)
                    return
                self._idle += 1
