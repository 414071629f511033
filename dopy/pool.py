"""The bounded thread pool of THRD_FUNC: calls run on up to ``size`` threads, started as needed; when all are busy, the caller runs the call.

Unlike ``concurrent.futures.ThreadPoolExecutor`` it can be shut down from
one of its own threads (a remote method that shuts the hub down) and it
joins its threads with a deadline.
"""

import logging
import queue
import threading
import time

__all__ = ['Pool']

log = logging.getLogger('dopy.pool')


class Pool:
    """Runs submitted callables on at most ``size`` threads."""

    def __init__(self, size, name):
        self._size = size
        self._name = name
        self._queue = queue.SimpleQueue()
        self._threads = []
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
            elif len(self._threads) < self._size:
                # Started under the lock, so that shutdown never meets a thread not yet started.
                thread = threading.Thread(target=self._work, daemon=True,
                                          name=f'{self._name}-{len(self._threads)}')
                self._threads.append(thread)
                thread.start()
            else:
                return False
            self._queue.put(work)
            return True

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
                    log.warning('%s is still running a remote method; leaving it behind', thread.name)

    def _work(self):
        while True:
            work = self._queue.get()
            if work is None or self._closed:
                return
            try:
                work()
            except Exception:
                log.exception('a pooled call failed outside dispatch')
            with self._lock:
                self._idle += 1
