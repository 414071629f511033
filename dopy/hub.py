"""The Hub: one per process, it owns the published objects, the servers, the connections and the loop.

``getHub()`` returns the process's hub, creating it on first use;
``init(**settings)`` creates it explicitly.  ``Hub`` can also be built
directly, for tests and embedding: pass it as ``hub=`` to ``makeServer``
and ``remote``.

A hub that has been shut down stays shut; ``getHub()`` then makes a new one.

Threading modes (``threadMode=``):

- ``THRD_CONN`` (the default): a thread per connection; the calls that
  arrive on one connection run one after another.
- ``THRD_FUNC``: a thread per call, from a bounded pool (``pool_size``):
  calls in flight on one connection run side by side, and their replies
  may go back out of order, matched by request id.
- ``THRD_NONE``: no threads at all.  ``mainloop()`` runs one select loop
  over every server, connection and reactor; a call made inside it runs
  that loop until its reply arrives.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import ssl
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from . import wire
from .console import CHUNK, Console, console_fd
from .errors import ConnectionClosedError, DopyError, NoSuchObjectError
from .loop import Loop
from .pool import Pool

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from _typeshed import FileDescriptorLike

    from .proxy import RemoteObject

__all__ = ['Hub', 'getHub', 'init', 'register_scheme', 'DEFAULT_SHUTDOWN_TIMEOUT',
           'THRD_CONN', 'THRD_FUNC', 'THRD_NONE', 'DEFAULT_POOL_SIZE', 'check_authkey']

THRD_CONN = 'THRD_CONN'
THRD_FUNC = 'THRD_FUNC'
THRD_NONE = 'THRD_NONE'
_MODES = (THRD_CONN, THRD_FUNC, THRD_NONE)
DEFAULT_POOL_SIZE = 32

log = logging.getLogger('dopy.hub')
# The application decides where DOPY's log goes; until it does, nowhere.
logging.getLogger('dopy').addHandler(logging.NullHandler())

# How long shutdown waits for a thread still running a remote method
# before it leaves it behind (it is a daemon thread) and says so in the log.
DEFAULT_SHUTDOWN_TIMEOUT = 5.0

_schemes = {}


def register_scheme(scheme: str, factory: Callable[[Hub, str, float | None, bool], RemoteObject]) -> None:
    """Let ``makeRemoteObject`` build proxies for ``scheme:...`` reference strings.

    ``factory(hub, rest, timeout, connect)`` gets what follows ``scheme:``
    and connects at once when ``connect`` is true.  Each transport module
    registers itself when imported.
    """
    _schemes[scheme] = factory


class Hub:
    """The registry of published objects, and the owner of servers and connections.

    ``Hub(*, threadMode=THRD_CONN, pool_size=32, max_message_size=256 MiB,
    call_timeout=None, authkey=None, ssl_context=None)``, all keyword arguments:

    ``max_message_size`` bounds every frame this hub receives, in bytes.
    ``call_timeout`` (seconds, or None for no limit) bounds the calls of
    proxies this hub makes from references it receives or unpickles, which
    have no ``remote(timeout=...)`` of their own.  ``threadMode`` is one of
    ``THRD_CONN``, ``THRD_FUNC``, ``THRD_NONE``; ``pool_size`` bounds the
    THRD_FUNC pool; when all its threads are busy, a connection's reader
    runs the next call itself.  ``authkey`` (bytes) is the key this hub's servers and
    proxies use when they are not given one (see ``dopy.auth``);
    ``ssl_context`` (a client-side ``ssl.SSLContext``), the TLS of the
    connections its proxies open when not given one, references included.
    """

    def __init__(self, **settings: Any) -> None:
        self.settings = _checked_settings(**settings)
        self.authkey = self.settings['authkey']
        self.ssl_context = self.settings['ssl_context']
        self.threadMode = self.settings['threadMode']
        self.max_message_size = self.settings['max_message_size']
        self.call_timeout = self.settings['call_timeout']
        self.loop = Loop()
        self._pool = (Pool(self.settings['pool_size'], 'dopy-call')
                      if self.threadMode == THRD_FUNC else None)
        # Host names are looked up on a thread of this pool, so that a name
        # server that never answers holds up no caller past its deadline.
        self._resolver = Pool(None, 'dopy-resolve', max_idle=1, doing='looking up a host name')
        # HOST:PORT of the TCP servers that greeted this hub's keyless clients OPEN (dopy.tcp).
        self._open_servers = {}
        self._loop_thread = None
        self._objects = {}
        # The live registry, name -> (object, exposed), for a connection to
        # tell at a glance whether what a call names is still what it was.
        # Only this class changes it.
        self.registry = self._objects
        # How many times the registry has changed: what a connection found
        # checked in it holds while this stays the same.
        self.generation = 0
        self._names = {}
        self._lock = threading.Lock()
        self._servers = set()
        self._connections = weakref.WeakSet()
        self._closed = threading.Event()
        self._shut_down = threading.Event()
        self._shutdown_timeout = DEFAULT_SHUTDOWN_TIMEOUT

    def __repr__(self) -> str:
        state = 'shut down' if self.closed else f'{len(self._objects)} objects, {len(self._servers)} servers'
        return f'<dopy.Hub {state}>'

    @property
    def closed(self) -> bool:
        """True once ``shutdown`` has begun."""
        return self._closed.is_set()

    def addObject(self, name: str, obj: object, expose: Iterable[str] | None = None) -> None:
        """Publish ``obj`` under ``name``; a later call with the same name replaces it.

        Any public method may be called, unless ``expose`` (a list of method
        names) narrows that to those.  Names starting with ``#`` are taken
        by references exported for a call.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f'an object name must be a non-empty str, not {name!r}')
        if name.startswith('#'):
            raise ValueError(f'object names starting with "#" are reserved: {name!r}')
        if expose is not None:
            wrong = TypeError(f'expose must be a list of method names, not {expose!r}')
            if isinstance(expose, (str, bytes)):
                raise wrong
            try:
                # Taken once: a generator would be used up by a check before it.
                names = frozenset(expose)
            except TypeError:
                raise wrong from None
            if not all(isinstance(m, str) for m in names):
                raise wrong
            expose = names
        with self._lock:
            old = self._objects.get(name)
            if old is not None and self._names.get(id(old[0])) == name:
                del self._names[id(old[0])]
            self._objects[name] = (obj, expose)
            self._names[id(obj)] = name
            self.generation += 1

    def removeObject(self, name: str) -> None:
        """Stop publishing ``name``; ``NoSuchObjectError`` if it is not published."""
        with self._lock:
            try:
                obj = self._objects.pop(name)[0]
            except KeyError:
                raise NoSuchObjectError(f'no object named {name!r} is published') from None
            if self._names.get(id(obj)) == name:
                del self._names[id(obj)]
            self.generation += 1

    def published_name(self, obj: object) -> str | None:
        """The name ``obj`` is published under, or None."""
        name = self._names.get(id(obj))
        entry = self._objects.get(name) if name is not None else None
        return name if entry is not None and entry[0] is obj else None

    def advertised_address(self, local_ip: str) -> str | None:
        """``tcp:HOST:PORT`` of a server of this hub that a peer reaching ``local_ip`` can reach, or None."""
        with self._lock:
            servers = list(self._servers)
        for server in servers:
            address = server.advertise(local_ip)
            if address is not None:
                return address
        return None

    def stats(self) -> dict[str, int]:
        """Counts for watching a long-running hub: objects, servers, connections, references.

        ``connections`` counts the open ones: this hub's own, and every peer
        its servers hold, those still in their handshake included.
        ``idle_threads`` counts the threads kept waiting for the next peer of
        a server, the next call of the THRD_FUNC pool, or the next host name
        to look up.
        """
        with self._lock:
            # Closed connections may linger, held by a proxy: they are not counted.
            connections = [c for c in self._connections if not c.closed]
            held = len(connections)
            idle = self._resolver.idle_count()
            if self._pool is not None:
                idle += self._pool.idle_count()
            for server in self._servers:
                connections.extend(server.connections())
                held += server.peer_count()
                idle += server.idle_threads()
            counts = {'objects': len(self._objects), 'servers': len(self._servers),
                      'connections': held, 'idle_threads': idle}
        counts['exported_references'] = sum(c.export_count() for c in connections)
        counts['imported_references'] = sum(c.import_count() for c in connections)
        return counts

    def getObject(self, name: str) -> Any:
        """The local object published under ``name``, or ``NoSuchObjectError``."""
        return self.lookup(name)[0]

    def lookup(self, name: str) -> tuple[Any, frozenset[str] | None]:
        """``(object, exposed)`` for ``name``: ``exposed`` is None or the set of callable names."""
        try:
            return self._objects[name]
        except (KeyError, TypeError):
            raise NoSuchObjectError(f'no object named {name!r} is published') from None

    def makeRemoteObject(self, ref: str, timeout: float | None = None, connect: bool = True) -> RemoteObject:
        """A proxy from a reference string such as ``'tcp:localhost:9600:myObject'``.

        ``timeout`` is as for ``dopy.tcp.remote``.  With ``connect=False`` the
        proxy connects on its first call instead of now.
        """
        if not isinstance(ref, str) or ':' not in ref:
            raise ValueError(f'not a reference string: {ref!r} (expected "scheme:...")')
        scheme, rest = ref.split(':', 1)
        try:
            factory = _schemes[scheme]
        except KeyError:
            raise ValueError(f'unknown transport {scheme!r} in reference {ref!r}; '
                             f'known: {", ".join(sorted(_schemes))}') from None
        return factory(self, rest, timeout, connect)

    @property
    def threaded(self) -> bool:
        """False in THRD_NONE, where the loop does all the reading."""
        return self.threadMode != THRD_NONE

    def submit(self, work: Callable[[], object]) -> bool:
        """Start ``work()`` on an idle thread of the THRD_FUNC pool; False if every one is busy."""
        return self._pool.submit(work)

    def addReactor(self, fileobj: FileDescriptorLike, callback: Callable[[Any], object]) -> None:
        """Call ``callback(fileobj)`` from the hub's loop whenever ``fileobj`` is readable.

        ``fileobj`` is anything with ``fileno()`` (a pipe, a socket, standard
        input) or a descriptor.  Reactors run while ``mainloop`` runs, and,
        in THRD_NONE, while a call waits for its reply.  An exception in a
        callback is logged and the loop goes on.
        """
        if not callable(callback):
            raise TypeError(f'callback must be callable, not {callback!r}')

        def guarded(ready):
            try:
                callback(ready)
            except Exception:
                log.exception('reactor callback %r failed', callback)

        self.loop.add_reader(fileobj, guarded)
        self.loop.wake()

    def removeReactor(self, fileobj: FileDescriptorLike) -> None:
        """Stop watching ``fileobj``; ``KeyError`` if it has no reactor."""
        if not self.loop.remove_reader(fileobj):
            raise KeyError(f'no reactor for {fileobj!r}')

    def mainloop(self, console: bool = True, namespace: dict[str, Any] | None = None) -> None:
        """Serve until end of input, Ctrl-C, SIGTERM or ``shutdown()``, running typed lines meanwhile.

        With ``console=True`` each line read from standard input is executed
        as Python in a namespace holding ``hub``, ``dopy`` and whatever
        ``namespace`` adds, while requests are served (on threads, or, in
        THRD_NONE, by this same loop).  With ``console=False``, or with no
        standard input a console can read (see ``dopy.console.console_fd``:
        closed, /dev/null, a background job's terminal), it serves until
        ``shutdown()``, Ctrl-C or SIGTERM.  Reactors run here.  It does not
        shut the hub down: call ``shutdown()`` after it, or let the process
        exit.
        """
        if self.closed:
            self._shut_down.wait(self._shutdown_timeout + 1.0)
            return
        stdin = console_fd() if console else None
        if stdin is not None:
            names = {'__name__': '__console__', 'hub': self, 'dopy': sys.modules[__package__]}
            names.update(namespace or {})
            shell = Console(names, stdin, lambda: self.closed or self.loop.stopping)

            def on_input(fd):
                # A line that waits for a call runs this loop (THRD_NONE):
                # input typed meanwhile waits for it rather than interleave.
                self.loop.remove_reader(stdin)
                try:
                    data = os.read(fd, CHUNK)
                except OSError as exc:
                    log.warning('the console cannot read its input (%s): serving on without it', exc)
                    return
                if not shell.feed(data):
                    self.loop.stop()
                elif not (self.closed or self.loop.stopping):
                    self.loop.add_reader(stdin, on_input)

            self.loop.add_reader(stdin, on_input)
            shell.prompt()
        self._loop_thread = threading.current_thread()
        try:
            with self.loop.watching_signals(signal.SIGTERM) as caught:
                self.loop.run(lambda: self.closed or caught)
            if caught:
                log.info('mainloop ended by signal %d', caught[0])
        except KeyboardInterrupt:
            log.info('mainloop interrupted')
            if stdin is not None:
                shell.interrupted()
        finally:
            self._loop_thread = None
            if self.closed:
                # A shutdown begun on another thread: return once it is done.
                self._shut_down.wait(self._shutdown_timeout + 1.0)
                self.loop.close()
            elif stdin is not None:
                self.loop.remove_reader(stdin)

    def shutdown(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
        """Close every server and connection of this hub and join their threads.

        Safe from any thread, including one serving a remote call, and
        idempotent.  ``mainloop`` returns.  A thread still inside a remote
        method after ``timeout`` seconds is left to finish on its own and
        named in the log.
        """
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            self._shutdown_timeout = timeout
            servers = list(self._servers)
            connections = list(self._connections)
        self.loop.stop()
        deadline = time.monotonic() + timeout
        for server in servers:
            server.close(max(0.0, deadline - time.monotonic()))
        for connection in connections:
            connection.close(max(0.0, deadline - time.monotonic()))
        if self._pool is not None:
            self._pool.shutdown(max(0.0, deadline - time.monotonic()))
        self._resolver.shutdown(max(0.0, deadline - time.monotonic()))
        if self._loop_thread is None:
            self.loop.close()
        self._shut_down.set()
        log.debug('hub shut down')

    def _add_server(self, server):
        with self._lock:
            if self._closed.is_set():
                raise ConnectionClosedError('this hub has been shut down')
            self._servers.add(server)

    def _remove_server(self, server):
        with self._lock:
            self._servers.discard(server)

    def _add_connection(self, connection):
        with self._lock:
            if self._closed.is_set():
                raise ConnectionClosedError('this hub has been shut down')
            self._connections.add(connection)


def check_authkey(authkey: bytes | bytearray | None) -> bytes | None:
    """``authkey`` as ``bytes``, or None for no key; TypeError or ValueError if it is not a key."""
    if authkey is None:
        return None
    if isinstance(authkey, str):
        raise TypeError('an authkey must be bytes, not str: encode it, e.g. key.encode()')
    if not isinstance(authkey, (bytes, bytearray)):
        raise TypeError(f'an authkey must be bytes, not {type(authkey).__name__}')
    if not authkey:
        raise ValueError('an authkey must not be empty')
    return bytes(authkey)


_SETTINGS = ('threadMode', 'pool_size', 'max_message_size', 'call_timeout', 'authkey', 'ssl_context')


def _checked_settings(**settings):
    """A hub's settings, checked and completed with the defaults: the keyword arguments of ``Hub``."""
    unknown = sorted(set(settings) - set(_SETTINGS))
    if unknown:
        raise TypeError(f'unknown hub settings: {", ".join(unknown)} '
                        f'(the settings are {", ".join(_SETTINGS)})')
    return _completed_settings(**settings)


def _completed_settings(*, threadMode=THRD_CONN, pool_size=DEFAULT_POOL_SIZE,
                        max_message_size=wire.DEFAULT_MAX_MESSAGE_SIZE, call_timeout=None, authkey=None,
                        ssl_context=None):
    authkey = check_authkey(authkey)
    if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
        raise TypeError(f'ssl_context must be an ssl.SSLContext or None, not {ssl_context!r}')
    if threadMode not in _MODES:
        raise ValueError(f'threadMode must be one of {", ".join(_MODES)}, not {threadMode!r}')
    if not isinstance(pool_size, int) or pool_size <= 0:
        raise ValueError(f'pool_size must be a positive int, not {pool_size!r}')
    if not isinstance(max_message_size, int) or max_message_size <= 0:
        raise ValueError(f'max_message_size must be a positive int, not {max_message_size!r}')
    if call_timeout is not None and not (isinstance(call_timeout, (int, float)) and call_timeout > 0):
        raise ValueError(f'call_timeout must be None or a positive number, not {call_timeout!r}')
    return {'threadMode': threadMode, 'pool_size': pool_size,
            'max_message_size': max_message_size, 'call_timeout': call_timeout,
            'authkey': authkey, 'ssl_context': ssl_context}


_hub = None
_hub_lock = threading.Lock()


def getHub() -> Hub:
    """The process's hub, created with default settings on first use."""
    global _hub
    with _hub_lock:
        if _hub is None or _hub.closed:
            _hub = Hub()
        return _hub


def init(**settings: Any) -> Hub:
    """Create the process's hub with ``settings`` (see ``Hub``) and return it.

    Calling it again with the same settings returns the same hub; with
    different settings, while that hub is alive, raises ``DopyError``.
    """
    global _hub
    with _hub_lock:
        if _hub is not None and not _hub.closed:
            wanted = _checked_settings(**settings)
            changed = sorted(k for k in wanted if wanted[k] != _hub.settings[k])
            if changed:
                # Names only: the values may include a key.
                raise DopyError(f'the hub already exists; init() cannot change its settings '
                                f'{", ".join(changed)}')
            return _hub
        _hub = Hub(**settings)
        return _hub


@atexit.register
def _shutdown_at_exit():
    hub = _hub
    if hub is not None:
        hub.shutdown(timeout=1.0)
