"""References to objects in other hubs: ``RemoteObject`` (the proxy), ``ref``, and how both travel.

A proxy turns attribute access into method stubs that call the remote
object.  It reaches that object over a connection it opened from a
reference string, or over the connection that brought it (a reference that
arrived inside a call or a reply).  A connection that proxies opened closes
when no proxy uses it and no call is in flight on it.  A proxy with an
address opens a new connection when its old one is gone: after the peer
went away, or after a call timed out or was interrupted (Ctrl-C, say), so
that a late reply, or a server still busy with the abandoned call, never
holds up the next call.  Nothing is ever re-sent: the call that met the
failure raises, and only the next call reconnects.  A proxy is safe to
share between threads; their calls travel side by side on one connection.

How references travel.  Pickled by a connection (see ``wire_state``), a
proxy or a ``ref`` becomes one of:

- *here*: an object of the sender, named by its published name or by an id
  the sending connection exported it under; the receiver gets a proxy that
  calls back over the same connection, so no listening port is needed;
- *yours*: a proxy for an object of the receiver's own, which the receiver
  gets back as the object itself;
- *address*: a reference string any hub can connect to.

Pickled anywhere else (``pickle.dumps``, a persistent store), a proxy
becomes its reference string, which needs an address: a proxy that can only
be reached over the connection that brought it does not pickle there.
"""

from __future__ import annotations

import math
import pickle
import threading
import weakref
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, Any

from .errors import CallTimeoutError, CommunicationError, ConnectionClosedError, SerializationError
from .hub import getHub

# A connection in use is asked whether its peer hung up at most this often
# (seconds): a call sooner than that after the peer closed may fail, unsent again.
HANG_UP_CHECK_INTERVAL = 0.5
_ASK_EVERY_TIME = -math.inf

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from .connection import Connection

__all__ = ['RemoteObject', 'Ref', 'ref', 'close', 'wire_state', 'attach',
           'rebuild_here', 'rebuild_yours', 'rebuild_address']

class _WireState(threading.local):
    connection = None


# ``wire_state.connection``: the connection pickling or unpickling in this
# thread, which references travel for; None outside a DOPY call.  A
# connection sets it and puts back the old value itself: on every call's
# path, that is cheaper than a context manager.
wire_state = _WireState()


def _current_connection():
    return wire_state.connection


class Ref:
    """A reference to a local object, made by ``dopy.ref(obj)``, for sending."""

    __slots__ = ('obj',)

    def __init__(self, obj: object) -> None:
        self.obj = obj

    def __repr__(self) -> str:
        return f'<dopy.ref to {self.obj!r}>'

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Ref) and other.obj is self.obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __reduce__(self):
        connection = _current_connection()
        if connection is None:
            raise pickle.PicklingError(
                f'{self!r} can only travel inside a DOPY call or reply')
        return connection.reduce_local(self.obj)


def ref(obj: object) -> Ref | RemoteObject:
    """A reference to ``obj`` for sending: the receiver gets a proxy whose calls run on ``obj`` here."""
    if isinstance(obj, (Ref, RemoteObject)):
        return obj
    return Ref(obj)


class _Link:
    """A proxy's use of a connection, and how to open a new one (``connect`` is None if it cannot)."""

    __slots__ = ('connect', 'connection', 'borrowed', 'checked_at', 'lock', 'closed', '__weakref__')

    # A link lives as long as its proxy or any of its method stubs (see
    # ``_method_stub``), and holds neither: when the last of them goes, it
    # lets go of its connection.

    def __init__(self, connect):
        self.connect = connect
        self.connection = None
        # True while the connection is one that brought a reference with an
        # address (see ``attach``): the peer may have closed it a moment
        # ago, with no call of this proxy's to tell, and the call can go
        # over a new connection instead; so it is checked before every call.
        self.borrowed = False
        # When the connection was last found alive (time.monotonic()); minus
        # infinity while it is to be asked before every call.
        self.checked_at = _ASK_EVERY_TIME
        self.lock = threading.Lock()
        self.closed = False

    def get(self):
        """The connection, asked whether its peer hung up; a new one if it did, or if there is none."""
        connection = self.connection
        if connection is not None and connection.check_alive():
            self._checked()
            return connection
        with self.lock:
            if self.closed:
                raise ConnectionClosedError('this proxy was closed')
            connection = self.connection
            if connection is not None and connection.check_alive():
                self._checked()
                return connection
            if connection is not None:
                self.connection = None
                connection.release()
            if self.connect is None:
                raise ConnectionClosedError(
                    'the connection that brought this reference is closed, '
                    'and the object has no address to reconnect to')
            connection = self.connect()
            connection.acquire()
            self.connection = connection
            self.borrowed = False
            # Just connected: as good as checked.
            self._checked()
            return connection

    def _checked(self):
        """The connection was found alive just now."""
        self.checked_at = _ASK_EVERY_TIME if self.borrowed else _monotonic()

    def failed(self, connection, error):
        """A call over ``connection`` raised ``error``: see that the next call opens a new connection if it must."""
        if connection.closed:
            self.drop(connection)
        elif self.connect is not None and _abandoned(error):
            # A new connection for the next call, where there is an address to
            # open one: a server still busy with this call must not hold that
            # one up.  A late reply on the old one is discarded by its id.
            self.drop(connection)

    def use(self, connection):
        with self.lock:
            old, self.connection = self.connection, connection
            self.borrowed = self.connect is not None
            self.checked_at = _ASK_EVERY_TIME
            connection.acquire()
        if old is not None:
            old.release()

    def drop(self, connection):
        with self.lock:
            if self.connection is not connection:
                return
            self.connection = None
        connection.release()

    def close(self):
        with self.lock:
            self.closed = True
            connection, self.connection = self.connection, None
        if connection is not None:
            connection.release()

    def __del__(self):
        connection = self.connection
        if connection is not None:
            connection.release()


def _abandoned(error):
    """True if ``error`` is the caller giving up on a call in flight, not its outcome nor a failed connection.

    That is a timeout, or an exception raised in the caller's thread while
    it waited: KeyboardInterrupt (Ctrl-C), or whatever a signal handler
    raises.  The remote method's own exceptions carry ``dopy_traceback``;
    a ``SerializationError`` means the call was not sent, or was answered
    with a reply that did not unpickle.
    """
    if hasattr(error, 'dopy_traceback'):
        return False
    return isinstance(error, CallTimeoutError) or not isinstance(error, (CommunicationError, SerializationError))


class _Stubs:
    """The instance dictionary of a proxy, which holds nothing but its method stubs (see ``RemoteObject.__getattr__``)."""


# The real instance dictionary of a proxy: ``RemoteObject`` hides ``__dict__``.
_stubs_of = _Stubs.__dict__['__dict__'].__get__
_set = object.__setattr__
# Method stubs a proxy keeps, at most: past that, each access makes a new one.
_MAX_STUBS = 256


class RemoteObject(_Stubs):
    """A proxy for an object in another hub.

    Any public attribute is a method of the remote object: ``proxy.name(...)``
    runs ``name`` there, with arguments and result passed by copy.  Names
    starting with ``_`` are not forwarded, except the container methods, so
    that ``len(p)``, ``k in p``, ``p[k]``, ``p[k] = v``, ``del p[k]`` and
    ``for x in p`` work when the remote object supports them.  ``str()`` is
    the reference string (``'tcp:host:port:name'``); proxies with equal
    reference strings are equal.  Use it as a context manager, or call
    ``dopy.close(proxy)``, to close the connection it owns.
    """

    __slots__ = ('_dopy_ref', '_dopy_name', '_dopy_timeout', '_dopy_link', '_dopy_fetched')

    def __init__(self, ref: str, name: str, connect: Callable[[], Connection] | None,
                 timeout: float | None = None, connection: Connection | None = None) -> None:
        _set(self, '_dopy_ref', ref)
        _set(self, '_dopy_name', name)
        _set(self, '_dopy_timeout', timeout)
        _set(self, '_dopy_link', _Link(connect))
        _set(self, '_dopy_fetched', None)
        if connection is not None:
            self._dopy_link.use(connection)

    @property
    def __dict__(self):
        raise AttributeError('a dopy proxy has no __dict__: its attributes are remote methods')

    def __setattr__(self, name: str, value: object) -> None:
        if not name.startswith('_dopy_'):
            raise AttributeError(f'cannot set {name!r} on a dopy proxy: its attributes are remote methods')
        _set(self, name, value)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        # Called once per name: the stub made is kept in the instance
        # dictionary, where the next ``proxy.name`` finds it at once.
        if name.startswith('_'):
            raise AttributeError(f'{name!r}: names starting with "_" are not forwarded to the remote object')
        stub = _method_stub(self._dopy_link, self._dopy_name, name, self._dopy_timeout, self._dopy_ref)
        stubs = _stubs_of(self)
        if len(stubs) < _MAX_STUBS:
            stubs[name] = stub
        return stub

    def __str__(self) -> str:
        return self._dopy_ref

    def __repr__(self) -> str:
        return f'<dopy.RemoteObject {self._dopy_ref}>'

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RemoteObject):
            return NotImplemented
        return self._dopy_ref == other._dopy_ref

    def __hash__(self) -> int:
        return hash(self._dopy_ref)

    def __bool__(self) -> bool:
        # Without this, truth would ask the remote object for its len().
        return True

    def __len__(self) -> int:
        # list(p), tuple(p) and sorted(p) ask for the length just after
        # iter(p), as a hint: the items iter(p) fetched answer it, so that
        # they cost one call, on an object without __len__ too.
        fetched = self._dopy_fetched
        if fetched is not None:
            self._dopy_fetched = None
            if fetched.thread == threading.get_ident() and fetched.iterator() is not None:
                return fetched.count
        return self._dopy_call('__len__', ())

    def __contains__(self, item: object) -> bool:
        return self._dopy_call('__contains__', (item,))

    def __getitem__(self, key: Any) -> Any:
        return self._dopy_call('__getitem__', (key,))

    def __setitem__(self, key: Any, value: Any) -> None:
        self._dopy_call('__setitem__', (key, value))

    def __delitem__(self, key: Any) -> None:
        self._dopy_call('__delitem__', (key,))

    def __iter__(self) -> Iterator[Any]:
        items = self._dopy_call('__iter__', ())
        fetched = _Fetched(len(items))
        iterator = _iterate(self, fetched, items)
        fetched.iterator = weakref.ref(iterator)
        self._dopy_fetched = fetched
        return iterator

    def __reduce__(self):
        connection = _current_connection()
        if connection is not None:
            return connection.reduce_proxy(self)
        if self._dopy_link.connect is None:
            raise pickle.PicklingError(
                f'{self!r} can only be reached over the connection that brought it, '
                'so it cannot be pickled outside a DOPY call')
        return _rebuild, (self._dopy_ref,)

    def __enter__(self) -> RemoteObject:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._dopy_link.close()

    def _dopy_call(self, method, args):
        return _caller(self._dopy_link, self._dopy_name, method, self._dopy_timeout)(*args)


class _Fetched:
    """The items one ``iter(proxy)`` fetched, as its proxy's ``len()`` sees them until iterating starts."""

    __slots__ = ('thread', 'iterator', 'count')

    def __init__(self, count):
        self.thread = threading.get_ident()
        self.iterator = None
        self.count = count


def _iterate(proxy, fetched, items):
    # Started: from now on, len(proxy) asks the remote object.
    if proxy._dopy_fetched is fetched:
        proxy._dopy_fetched = None
    yield from items


def _method_stub(link, name, method, timeout, ref):
    """The method ``method`` of the remote object ``name``, as a function that calls it over ``link``.

    ``stub.future(...)`` makes the call without waiting and returns a
    ``concurrent.futures.Future``; ``stub.oneway(...)`` sends it and wants
    no reply at all (a failure is logged by the server).  A stub holds the
    link, not the proxy: a proxy keeps its stubs, and a cycle would keep
    the proxy, and its connection, alive until the garbage collector ran.
    """
    remote_method = _caller(link, name, method, timeout)
    future = _caller(link, name, method, timeout, 'call_async')
    oneway = _caller(link, name, method, timeout, 'call_oneway')
    remote_method.__name__ = method
    remote_method.__qualname__ = f'remote method {method} of {ref}'
    remote_method.__doc__ = f'Call {method}() of the remote object {ref} and return its result.'
    future.__name__ = future.__qualname__ = 'future'
    future.__doc__ = 'Start the call and return a ``concurrent.futures.Future`` of its result.'
    oneway.__name__ = oneway.__qualname__ = 'oneway'
    oneway.__doc__ = 'Send the call and return None at once, without waiting for it to run.'
    remote_method.future = future
    remote_method.oneway = oneway
    return remote_method


def _caller(link, name, method, timeout, how=None):
    """A function that calls ``method`` of the remote object ``name`` over ``link``: with the connection's ``call``, or its method named ``how``."""
    # A plain function: a call of one from Python code enters no C code on
    # its way (a __call__ method would); and it does the link's part
    # itself, with no Python frame of the link's on every call's path.
    def remote_method(*args, **kwargs):
        connection = link.connection
        # A connection in use, checked for a hang-up within the interval,
        # is used as it is.
        if (connection is None or connection.closed
                or _monotonic() - link.checked_at >= HANG_UP_CHECK_INTERVAL):
            connection = link.get()
        try:
            if how is None:
                return connection.call(name, method, args, kwargs, timeout)
            return getattr(connection, how)(name, method, args, kwargs, timeout)
        except BaseException as exc:
            link.failed(connection, exc)
            raise
    return remote_method


def close(proxy: RemoteObject) -> None:
    """Close the connection ``proxy`` owns; later calls on it raise ``ConnectionClosedError``."""
    if not isinstance(proxy, RemoteObject):
        raise TypeError(f'not a dopy.RemoteObject: {proxy!r}')
    proxy._dopy_link.close()


def attach(proxy, connection):
    """Let ``proxy`` call over ``connection`` until that closes (then it reconnects, if it can)."""
    proxy._dopy_link.use(connection)
    return proxy


def rebuild_address(ref):
    """Unpickling *address*: a proxy that connects to ``ref`` on its first call."""
    return _rebuild(ref)


def _rebuild(ref):
    connection = _current_connection()
    hub = connection.hub if connection is not None else getHub()
    return hub.makeRemoteObject(ref, hub.call_timeout, connect=False)


def rebuild_here(name, address):
    """Unpickling *here*: a proxy over the receiving connection."""
    return _current_connection().import_proxy(name, address)


def rebuild_yours(name):
    """Unpickling *yours*: the receiver's own exported object."""
    return _current_connection().exported_object(name)
