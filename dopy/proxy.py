"""``RemoteObject``, the proxy: attribute access makes method stubs that call the remote object.

A proxy owns its connection and opens a new one when the old one is gone:
after the peer went away, or after a call timed out (so a late reply, or a
server still busy with the abandoned call, never holds up the next call).
Nothing is ever re-sent: the call that met the failure raises, and only the
next call reconnects.  A proxy is safe to share between threads; their calls
travel side by side on the one connection.
"""

import threading
import weakref

from .errors import CallTimeoutError, CommunicationError, ConnectionClosedError
from .hub import getHub

__all__ = ['RemoteObject', 'close']


class _Link:
    """A proxy's connection, and how to open a new one."""

    __slots__ = ('connect', 'connection', 'lock', 'closed', '__weakref__')

    def __init__(self, connect):
        self.connect = connect
        self.connection = None
        self.lock = threading.Lock()
        self.closed = False

    def get(self):
        connection = self.connection
        if connection is not None and not connection.retired and connection.check_alive():
            return connection
        with self.lock:
            if self.closed:
                raise ConnectionClosedError('this proxy was closed')
            connection = self.connection
            if connection is None or connection.retired or not connection.check_alive():
                connection = self.connection = self.connect()
            return connection

    def drop(self, connection, retire):
        with self.lock:
            if self.connection is connection:
                self.connection = None
        if retire:
            connection.retire()

    def close(self):
        with self.lock:
            self.closed = True
            connection, self.connection = self.connection, None
        if connection is not None:
            connection.close()


class RemoteObject:
    """A proxy for an object published by another hub.

    Any public attribute is a method of the remote object: ``proxy.name(...)``
    runs ``name`` there, with arguments and result passed by copy.  Names
    starting with ``_`` are not forwarded.  ``str()`` is the reference string
    (``'tcp:host:port:name'``), which is also what a proxy pickles as.
    Use it as a context manager, or call ``dopy.close(proxy)``, to close its
    connection.
    """

    __slots__ = ('_dopy_ref', '_dopy_name', '_dopy_timeout', '_dopy_link', '__weakref__')

    def __init__(self, ref, name, connect, timeout=None):
        self._dopy_ref = ref
        self._dopy_name = name
        self._dopy_timeout = timeout
        self._dopy_link = _Link(connect)
        weakref.finalize(self, self._dopy_link.close)

    def __getattr__(self, name):
        if name.startswith('_'):
            raise AttributeError(f'{name!r}: names starting with "_" are not forwarded to the remote object')
        return _Method(self, name)

    def __str__(self):
        return self._dopy_ref

    def __repr__(self):
        return f'<dopy.RemoteObject {self._dopy_ref}>'

    def __reduce__(self):
        return _rebuild, (self._dopy_ref,)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._dopy_link.close()

    def _dopy_call(self, method, args, kwargs, how='call'):
        link = self._dopy_link
        connection = link.get()
        try:
            return getattr(connection, _CALLS[how])(
                self._dopy_name, method, args, kwargs, self._dopy_timeout)
        except CallTimeoutError:
            link.drop(connection, retire=True)
            raise
        except CommunicationError:
            if connection.closed:
                link.drop(connection, retire=False)
            raise


_CALLS = {'call': 'call', 'future': 'call_async', 'oneway': 'call_oneway'}


class _Method:
    """A remote method of a proxy: calling it makes the call and waits for the result.

    ``future(...)`` makes the call without waiting and returns a
    ``concurrent.futures.Future``; ``oneway(...)`` sends it and wants no
    reply at all (a failure is logged by the server).
    """

    __slots__ = ('_proxy', '_name')

    def __init__(self, proxy, name):
        self._proxy = proxy
        self._name = name

    def __call__(self, /, *args, **kwargs):
        return self._proxy._dopy_call(self._name, args, kwargs)

    def future(self, /, *args, **kwargs):
        """Start the call and return a ``concurrent.futures.Future`` of its result."""
        return self._proxy._dopy_call(self._name, args, kwargs, 'future')

    def oneway(self, /, *args, **kwargs):
        """Send the call and return None at once, without waiting for it to run."""
        self._proxy._dopy_call(self._name, args, kwargs, 'oneway')

    def __repr__(self):
        return f'<remote method {self._name} of {self._proxy!r}>'


def close(proxy):
    """Close the connection of ``proxy``; later calls on it raise ``ConnectionClosedError``."""
    if not isinstance(proxy, RemoteObject):
        raise TypeError(f'not a dopy.RemoteObject: {proxy!r}')
    proxy._dopy_link.close()


def _rebuild(ref):
    return getHub().makeRemoteObject(ref, connect=False)
