"""The reference table of one connection: the local objects exported to the peer, the peer's objects imported as proxies, and the RELEASE frames between them; no I/O.

An object sent by reference (``dopy.ref(obj)``, or a proxy forwarded) is
*exported*: it gets a name ``#N`` on this connection, and a count of how
many times it was sent.  The peer *imports* it as one proxy per name,
counting how many times it received it.  When that proxy is garbage, the
count goes back in a RELEASE frame, and the exporting side drops the
object once every reference it sent is released.  Counting both ways
means a RELEASE crossing a new send of the same object never drops an
object the peer still holds.

A RELEASE frame's payload is a list of ``(name, count)``: a ``str`` and an
``int`` over zero.  Anything else is refused with ``ValueError``, which the
connection treats as the peer breaking the protocol.
"""

import itertools
import threading
import weakref
from collections import deque

from . import wire
from .errors import NoSuchObjectError

__all__ = ['ReferenceTable']


class ReferenceTable:
    """One connection's exported objects and imported proxies, and what is to be released."""

    def __init__(self):
        self._lock = threading.Lock()
        # '#N' -> [object, times sent]; id(object) -> '#N'.
        self._exports = {}
        self._export_names = {}
        self._export_ids = itertools.count(1)
        # '#N' -> (weak reference to its proxy, [times received]).
        self._imports = {}
        # The (name, [times received]) of imported proxies gone, for the
        # next RELEASE frame.  True when one is due: every send looks.
        self.released = deque()

    def export(self, obj):
        """The name ``obj`` travels by, counted as sent once more."""
        with self._lock:
            name = self._export_names.get(id(obj))
            if name is None:
                name = f'#{next(self._export_ids)}'
                self._export_names[id(obj)] = name
                self._exports[name] = [obj, 0]
            self._exports[name][1] += 1
        return name

    def exported(self, name):
        """The local object exported as ``name``, or ``NoSuchObjectError``."""
        try:
            return self._exports[name][0]
        except KeyError:
            raise NoSuchObjectError(
                f'reference {name} was never exported on this connection, or was released') from None

    def imported(self, name, make_proxy):
        """The proxy for the peer's export ``name``, made by ``make_proxy()`` unless one is alive, counted as received once more.

        ``make_proxy()`` returns the proxy and what it calls through (its
        link): the reference is released when that is gone, which may be
        after the proxy, while a method stub of it is kept.
        """
        with self._lock:
            entry = self._imports.get(name)
            remote = entry[0]() if entry is not None else None
            if remote is None:
                remote, link = make_proxy()
                received = [0]
                self._imports[name] = (weakref.ref(remote), received)
                # A finalizer may run inside any code, this lock's holder
                # included: it only appends, and the counting is done later.
                weakref.finalize(link, self.released.append, (name, received))
            else:
                received = entry[1]
            received[0] += 1
        return remote

    def release_frame(self):
        """The RELEASE frame for the imported proxies gone since the last one (they are forgotten here)."""
        releases = []
        with self._lock:
            while self.released:
                name, received = self.released.popleft()
                entry = self._imports.get(name)
                if entry is not None and entry[1] is received:
                    del self._imports[name]
                releases.append((name, received[0]))
        return wire.encode(wire.RELEASE, 0, releases)

    def apply_release(self, frame):
        """A RELEASE frame from the peer: drop what it no longer holds; ``ValueError`` if the frame is not one."""
        releases = wire.load_frame(frame)
        if type(releases) is not list or not all(
                type(item) is tuple and len(item) == 2 and type(item[0]) is str
                and type(item[1]) is int and item[1] > 0 for item in releases):
            raise ValueError(f'not a list of (name, count) pairs: {releases!r:.100}')
        with self._lock:
            for name, count in releases:
                entry = self._exports.get(name)
                if entry is None:
                    continue
                entry[1] -= count
                if entry[1] <= 0:
                    del self._exports[name]
                    self._export_names.pop(id(entry[0]), None)

    def export_count(self):
        """How many local objects are held for the peer."""
        return len(self._exports)

    def import_count(self):
        """How many of the peer's exports this side still has proxies for."""
        return len(self._imports)

    def clear(self):
        """Forget everything: the connection has closed."""
        with self._lock:
            self._exports.clear()
            self._export_names.clear()
            self._imports.clear()
