"""Naming contexts: thread-safe mappings from hierarchical names to picklable values, meant for references.

A context is published like any object, by convention under ``naming``
(``DEFAULT_KEY``), and used through its proxy like a dict::

    ns = dopy.tcp.remote(host, port, 'naming')
    ns['lab/printers/hp1'] = dopy.ref(printer)
    ns['lab/printers/hp1'].status()
    ns.list('lab/printers')        # ['hp1']

Names are paths: components separated by ``/``, none of them empty.  A
name bound to another context (a local one, or a proxy to one on another
hub) is a mount point: the names under it are looked up, bound and listed
in that context.  What is stored is a copy, as pickle makes it, and every
lookup returns a new copy; references inside a value (proxies,
``dopy.ref``) stay references.  A value that cannot be stored raises
``SerializationError`` and stores nothing.

``StandardNamingContext`` keeps its bindings in memory;
``PersistentNamingContext`` keeps them in a SQLite file, committed before
the call that made them returns, so that a binding acknowledged to a
client survives a crash and a restart.  References are stored there as
their reference strings, so only references with an address (to objects
published on a hub with a server) can be stored.
"""

import io
import pickle
import sqlite3
import threading

from .errors import DopyError, NamingError, SerializationError
from .hub import getHub
from .proxy import Ref, RemoteObject

__all__ = ['DEFAULT_KEY', 'NamingContext', 'StandardNamingContext',
           'PersistentNamingContext', 'resolve']

DEFAULT_KEY = 'naming'
SEPARATOR = '/'


def _split(name):
    if not isinstance(name, str) or not name:
        raise NamingError(f'a name must be a non-empty str, not {name!r}')
    parts = name.split(SEPARATOR)
    if '' in parts:
        raise NamingError(f'{name!r} has an empty component')
    return parts


class NamingContext:
    """What every naming context does; a subclass says where the bindings live.

    A subclass provides ``_get(path)`` (``(value_bytes, is_context)`` or
    None), ``_put(path, value_bytes, is_context)``, ``_remove(path)`` (true
    if it was bound), ``_paths()``, and ``_encode``/``_decode`` for values,
    and calls ``NamingContext.__init__``.
    """

    def __init__(self):
        # Held from the check that nothing is bound under a name to the
        # binding itself, so two writers cannot bind 'a' and 'a/b' at once.
        self._binding_lock = threading.Lock()

    def isNamingContext(self):
        """True: lets a context recognise another one, even through a proxy."""
        return True

    def __getitem__(self, name):
        mount, rest, path = self._locate(name)
        if mount is not None:
            return mount[rest]
        found = self._get(path)
        if found is None:
            raise NamingError(f'{name!r} is not bound')
        return self._decode(found[0])

    def __setitem__(self, name, value):
        mount, rest, path = self._locate(name)
        if mount is None:
            # Outside the lock: asking a proxy whether it is a context is a remote call.
            is_context = _is_context(value)
            data = self._encode(value)
            with self._binding_lock:
                mount, rest, path = self._locate(name)
                if mount is None:
                    prefix = path + SEPARATOR
                    if any(p.startswith(prefix) for p in self._paths()):
                        raise NamingError(f'{name!r} has names under it: unbind them first')
                    self._put(path, data, is_context)
                    return
        mount[rest] = value

    def __delitem__(self, name):
        mount, rest, path = self._locate(name)
        if mount is not None:
            del mount[rest]
        elif not self._remove(path):
            raise NamingError(f'{name!r} is not bound')

    def __contains__(self, name):
        try:
            self[name]
        except NamingError:
            return False
        return True

    def __len__(self):
        return len(self._paths())

    def __iter__(self):
        return iter(sorted(self._paths()))

    def get(self, name, default=None):
        """The value bound to ``name``, or ``default``."""
        try:
            return self[name]
        except NamingError:
            return default

    def list(self, name=''):
        """The names one level below ``name`` (all of the top level for ''), sorted.

        A name that has names below it, or is bound to a context, ends in ``/``.
        """
        if name:
            mount, rest, path = self._locate(name)
            if mount is not None:
                return mount.list(rest)
            found = self._get(path)
            if found is not None:
                if found[1]:
                    return self._decode(found[0]).list()
                raise NamingError(f'{name!r} is bound to a value, not a context')
            prefix = path + SEPARATOR
        else:
            prefix = ''
        entries = set()
        for path in self._paths():
            if not path.startswith(prefix):
                continue
            head, sep, _ = path[len(prefix):].partition(SEPARATOR)
            found = None if sep else self._get(prefix + head)
            entries.add(head + SEPARATOR if sep or (found is not None and found[1]) else head)
        if name and not entries:
            raise NamingError(f'{name!r} is not bound')
        return sorted(entries)

    def _locate(self, name):
        """``(mount, rest, path)``: the context a proper prefix of ``name`` is bound to, if any."""
        parts = _split(name)
        for i in range(1, len(parts)):
            prefix = SEPARATOR.join(parts[:i])
            found = self._get(prefix)
            if found is None:
                continue
            if not found[1]:
                raise NamingError(f'{prefix!r} is bound to a value, not a context')
            return self._decode(found[0]), SEPARATOR.join(parts[i:]), None
        return None, None, name


def _is_context(value):
    if isinstance(value, NamingContext):
        return True
    if isinstance(value, RemoteObject):
        try:
            return value.isNamingContext() is True
        except (DopyError, AttributeError):
            return False
    return False


class StandardNamingContext(NamingContext):
    """A naming context in memory: gone when the process ends."""

    def __init__(self):
        super().__init__()
        self._bindings = {}
        self._lock = threading.Lock()

    def __repr__(self):
        return f'<dopy.naming.StandardNamingContext with {len(self._bindings)} names>'

    def _get(self, path):
        return self._bindings.get(path)

    def _put(self, path, data, is_context):
        with self._lock:
            self._bindings[path] = (data, is_context)

    def _remove(self, path):
        with self._lock:
            return self._bindings.pop(path, None) is not None

    def _paths(self):
        return list(self._bindings)

    def _encode(self, value):
        # References and contexts are kept as themselves, beside the pickle
        # of everything else.
        refs = []

        def keep(obj):
            if isinstance(obj, (RemoteObject, Ref, NamingContext)):
                refs.append(obj)
                return len(refs) - 1
            return None

        return _dumps(value, keep), refs

    def _decode(self, stored):
        data, refs = stored
        return _loads(data, refs.__getitem__)


class PersistentNamingContext(NamingContext):
    """A naming context kept in the SQLite database at ``path``, created if missing.

    Every binding is committed before the call that made it returns.
    Proxies in values are stored as their reference strings and come back
    as proxies of ``hub`` (the process's hub by default); a reference
    without an address cannot be stored.  Several processes may share the
    file; SQLite serialises their writes.
    """

    def __init__(self, path, hub=None):
        super().__init__()
        self.path = path
        self._hub = hub
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute('PRAGMA journal_mode=WAL')
        self._db.execute('PRAGMA synchronous=FULL')
        self._db.execute('CREATE TABLE IF NOT EXISTS bindings ('
                         'path TEXT PRIMARY KEY, value BLOB NOT NULL, is_context INTEGER NOT NULL)')

    def __repr__(self):
        return f'<dopy.naming.PersistentNamingContext {self.path!r}>'

    def close(self):
        """Close the database; the context is unusable after."""
        with self._lock:
            self._db.close()

    def _get(self, path):
        with self._lock:
            row = self._db.execute('SELECT value, is_context FROM bindings WHERE path = ?',
                                   (path,)).fetchone()
        return None if row is None else (row[0], bool(row[1]))

    def _put(self, path, data, is_context):
        with self._lock:
            self._db.execute('INSERT OR REPLACE INTO bindings VALUES (?, ?, ?)',
                             (path, data, int(is_context)))

    def _remove(self, path):
        with self._lock:
            return self._db.execute('DELETE FROM bindings WHERE path = ?', (path,)).rowcount > 0

    def _paths(self):
        with self._lock:
            return [row[0] for row in self._db.execute('SELECT path FROM bindings')]

    def _encode(self, value):
        def address_of(obj):
            if isinstance(obj, RemoteObject):
                if not str(obj).startswith('tcp:'):
                    raise pickle.PicklingError(
                        f'{obj!r} has no address (it can only be reached over the connection '
                        'that brought it), so it cannot be stored persistently')
                return str(obj)
            if isinstance(obj, (Ref, NamingContext)):
                raise pickle.PicklingError(
                    f'{obj!r} is a local object with no address; publish it on a hub with a '
                    'server and store a proxy to it')
            return None

        return _dumps(value, address_of)

    def _decode(self, data):
        hub = self._hub if self._hub is not None else getHub()
        return _loads(data, lambda ref: hub.makeRemoteObject(ref, hub.call_timeout, connect=False))


# Python 3.13 refuses persistent_id (and persistent_load) set on a pickler
# instance, so they are methods of subclasses, which every version accepts.

class _Pickler(pickle.Pickler):
    def __init__(self, file, persistent_id):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._persistent_id = persistent_id

    def persistent_id(self, obj):
        return self._persistent_id(obj)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, persistent_load):
        super().__init__(file)
        self._persistent_load = persistent_load

    def persistent_load(self, pid):
        return self._persistent_load(pid)


def _dumps(value, persistent_id):
    buffer = io.BytesIO()
    try:
        _Pickler(buffer, persistent_id).dump(value)
    except Exception as exc:
        raise SerializationError(f'the value cannot be stored: {type(exc).__name__}: {exc}') from exc
    return buffer.getvalue()


def _loads(data, persistent_load):
    return _Unpickler(io.BytesIO(data), persistent_load).load()


def resolve(ref, timeout=None, hub=None):
    """The value bound at a full reference, such as ``'tcp:host:9600:naming/lab/printers/hp1'``.

    The part up to the first ``/`` names a context; the rest is looked up
    in it.  Without a ``/`` this is ``hub.makeRemoteObject(ref)``.
    """
    if not isinstance(ref, str):
        raise TypeError(f'a reference must be a str, not {ref!r}')
    hub = hub if hub is not None else getHub()
    context_ref, sep, name = ref.partition(SEPARATOR)
    context = hub.makeRemoteObject(context_ref, timeout)
    return context[name] if sep else context
