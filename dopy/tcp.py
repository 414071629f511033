"""The TCP transport: ``makeServer`` to serve a hub's objects, ``remote`` to call them.

In the threaded modes a server has an accept thread, and each connection
a thread of its own for its whole life: it does the handshake, then sleeps
in a blocking recv and runs the connection's calls in order, itself (in
THRD_FUNC it hands each to the hub's pool).  The threads come from a pool
(``dopy.pool``) that keeps up to eight idle for the next peers, since
starting a thread costs more than the rest of accepting a peer.  In
THRD_NONE the hub's loop accepts and reads.
A client connection has no thread of its own (see ``dopy.connection``).  Every socket has
``TCP_NODELAY``, so a small message leaves at once, and ``SO_KEEPALIVE``.

Reference strings look like ``tcp:HOST:PORT:NAME``, with an IPv6 host in
brackets: ``tcp:[::1]:9600:myObject``.

Every connection starts with the handshake of ``dopy.auth``, before any
pickle in either direction: with an ``authkey``, mutual HMAC
authentication; without one, a server answers only loopback peers
(protected mode) unless it was made ``insecure``.  A keyless plain client of a
threaded hub sends its first call to a server the hub has met without a
key at once, and reads the greeting before the reply.  A server over its
``max_connections`` refuses new peers the same way, and goes on serving
the others.  With an ``ssl_context`` the connection is TLS first, and the
handshake runs inside it; a server whose context requires client
certificates lets peers from other hosts in without an authkey, since TLS
has authenticated them.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import ssl
import sys
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import TYPE_CHECKING

from .auth import (DEFAULT_HANDSHAKE_TIMEOUT, OPEN_GREETING, ClientHandshake, ServerHandshake,
                   check_authkey, client_handshake, is_loopback, log_failure, server_handshake,
                   wait_for_socket)
from .channel import translate_os_error
from .connection import Connection
from .errors import (AuthenticationError, CallTimeoutError, CommunicationError,
                     ConnectionClosedError, DopyError)
from .hub import DEFAULT_SHUTDOWN_TIMEOUT, getHub, register_scheme
from .pool import Pool
from .proxy import RemoteObject
from .streams import EarlyStream, SocketStream, TLSStream

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ['makeServer', 'remote', 'TCPServer', 'DEFAULT_PORT', 'DEFAULT_CONNECT_TIMEOUT']

log = logging.getLogger('dopy.tcp')

DEFAULT_PORT = 9600
DEFAULT_HOST = '127.0.0.1'
# Connecting never waits forever, even when calls may.
DEFAULT_CONNECT_TIMEOUT = 10.0
_BACKLOG = 128
# Idle connection threads a server keeps for the next peers (see idle_threads).
_MAX_IDLE_THREADS = 8
# Made non-blocking as it is made, where the system can: one system call fewer.
_NONBLOCK = getattr(socket, 'SOCK_NONBLOCK', 0)
# Servers a hub remembers as OPEN, to send its first call to at once (see connect).
_MAX_OPEN_SERVERS = 1024


PROTECTED_MODE_REFUSAL = (
    'this DOPY server has no authkey, so it answers only clients on its own machine; '
    'give the server and its clients the same authkey (authkey=, --authkey-file or '
    'DOPY_AUTHKEY), or start it insecure to accept anyone')
TOO_MANY_REFUSAL = 'this DOPY server is at its limit of {} connections; try again later'


def makeServer(port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, *, hub: Hub | None = None,
               authkey: bytes | None = None, insecure: bool = False, max_connections: int | None = None,
               ssl_context: ssl.SSLContext | None = None) -> TCPServer:
    """Serve ``hub``'s objects (the process's hub by default) on a TCP port.

    ``host`` is the address to bind: ``'127.0.0.1'`` (the default) serves
    this machine only, ``''`` every interface (IPv4 and IPv6 where the
    system allows), and an IPv6 literal such as ``'::1'`` (or ``'[::1]'``)
    works too.  Port 0 picks a free port; ``server.port`` tells which.
    ``authkey`` (bytes; the hub's by default) makes every client prove it
    knows the key, and the server prove it too, before anything is
    unpickled.  Without a key
    the server answers only loopback clients, unless ``insecure`` is true.
    ``max_connections`` bounds the connections served at once.
    ``ssl_context`` (an ``ssl.SSLContext`` for the server side, with its
    certificate loaded) makes every connection TLS.
    """
    hub = hub if hub is not None else getHub()
    return TCPServer(port, host, hub, authkey if authkey is not None else hub.authkey,
                     insecure, max_connections, ssl_context)


def remote(host: str, port: int, name: str, *, timeout: float | None = None, hub: Hub | None = None,
           authkey: bytes | None = None, ssl_context: ssl.SSLContext | None = None) -> RemoteObject:
    """A proxy for the object published as ``name`` by the server at ``host:port``.

    An IPv6 ``host`` may come with or without brackets (``'::1'``, ``'[::1]'``).
    ``timeout`` (seconds) bounds connecting and every call; None, the
    default, lets a call wait as long as it takes, while connecting is still
    bounded by ``DEFAULT_CONNECT_TIMEOUT``.  Connects at once, so a server
    that is down raises ``CommunicationError`` here, and a peer that is not a
    DOPY server ``ProtocolError``, or, if it never speaks, a
    ``CallTimeoutError`` that says so (see ``dopy.auth.client_handshake``);
    a keyless plain client whose threaded hub has met this server without a
    key does not wait for its greeting, which the first call reads (and
    raises for, if it refuses).  ``authkey`` (bytes; the hub's by default)
    is the key the server must share; a client with a
    key refuses a server that does not authenticate.  ``ssl_context`` (an
    ``ssl.SSLContext`` for the client side; the hub's by default) makes the
    connection TLS, checking the server's certificate against ``host``.
    """
    hub = hub if hub is not None else getHub()
    proxy = _proxy(hub, host, port, name, timeout,
                   authkey if authkey is not None else hub.authkey,
                   ssl_context if ssl_context is not None else hub.ssl_context)
    proxy._dopy_link.get()
    return proxy


class TCPServer:
    """A listening socket that serves its hub's objects; see ``makeServer``."""

    def __init__(self, port: int, host: str, hub: Hub, authkey: bytes | None = None, insecure: bool = False,
                 max_connections: int | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f'port must be an int from 0 to 65535, not {port!r}')
        if max_connections is not None and not (isinstance(max_connections, int) and max_connections > 0):
            raise ValueError(f'max_connections must be a positive int or None, not {max_connections!r}')
        self.hub = hub
        self.authkey = check_authkey(authkey)
        self.insecure = bool(insecure)
        self.max_connections = max_connections
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise TypeError(f'ssl_context must be an ssl.SSLContext, not {ssl_context!r}')
        self.ssl_context = ssl_context
        # Seconds a new peer has to finish the handshake; may be changed at any time.
        self.handshake_timeout = DEFAULT_HANDSHAKE_TIMEOUT
        if self.insecure and self.authkey is None:
            log.warning('serving without an authkey to anyone who can reach the port: '
                        'any of them can run code in this process')
        host = _unbracket(host)
        self._sock = _listen(host, port)
        self.host = host
        self.port = self._sock.getsockname()[1]
        self._lock = threading.Lock()
        self._peers = set()
        # A thread for each connection, kept for the next peer when it ends.
        self._threads = Pool(None, f'dopy-conn-{self.port}', max_idle=_MAX_IDLE_THREADS,
                             doing="running a connection's calls")
        self._closed = False
        self._wake_r, self._wake_w = os.pipe()
        try:
            hub._add_server(self)
        except BaseException:
            self._close_fds()
            raise
        self._accept_thread = None
        if hub.threaded:
            self._accept_thread = threading.Thread(
                target=self._accept_loop, name=f'dopy-accept-{self.port}', daemon=True)
            self._accept_thread.start()
        else:
            self._sock.setblocking(False)
            hub.loop.add_reader(self._sock, self._accept_ready)
        log.info('serving on %s', self.address)

    @property
    def address(self) -> str:
        """``host:port`` as a client would name it."""
        return f'{_format_host(self.host or "0.0.0.0")}:{self.port}'

    def __repr__(self) -> str:
        return f'<dopy.tcp.TCPServer {self.address}{" closed" if self._closed else ""}>'

    def __enter__(self) -> TCPServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> None:
        """Stop listening, close every connection and join their threads. Idempotent.

        A thread still running a remote method after ``timeout`` seconds is
        left to finish on its own (it is a daemon thread) and named in the log.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        deadline = time.monotonic() + timeout
        os.write(self._wake_w, b'x')
        if self._accept_thread is None:
            self.hub.loop.remove_reader(self._sock)
        elif self._accept_thread is not threading.current_thread():
            self._accept_thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            peers = list(self._peers)
        for peer in peers:
            peer.close()
        self._threads.shutdown(max(0.0, deadline - time.monotonic()))
        self.hub._remove_server(self)
        if self._accept_thread is None or not self._accept_thread.is_alive():
            self._close_fds()
        log.info('stopped serving on %s', self.address)

    def peer_count(self) -> int:
        """How many peers this server holds: served, or still in their handshake."""
        with self._lock:
            return len(self._peers)

    def idle_threads(self) -> int:
        """How many of this server's threads are kept waiting for the next peer."""
        return self._threads.idle_count()

    def connections(self) -> list[Connection]:
        """The connections this server is serving now."""
        with self._lock:
            return [peer.connection for peer in self._peers if peer.connection is not None]

    def advertise(self, local_ip: str) -> str | None:
        """``tcp:IP:PORT`` if a peer that reached this host at ``local_ip`` can reach this server."""
        if self._closed:
            return None
        bound = self._sock.getsockname()[0]
        if bound in ('0.0.0.0', '::') or _same_ip(bound, local_ip):
            return f'tcp:{_format_host(_plain_ip(local_ip))}:{self.port}'
        return None

    def _close_fds(self):
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _accept_loop(self):
        poller = select.poll()
        poller.register(self._sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        wake_poller = select.poll()
        wake_poller.register(self._wake_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll()}
            if self._wake_r in ready:
                return
            try:
                sock, address = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:
                # Out of descriptors, say: wait for a wake-up or for things to
                # ease rather than spin on a socket that stays readable.
                log.error('accept on %s failed: %s', self.address, exc)
                if wake_poller.poll(100):
                    return
                continue
            self._start_worker(sock, address)

    def _accept_ready(self, _sock):
        """THRD_NONE: the loop saw a connection waiting."""
        try:
            sock, address = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError as exc:
            log.error('accept on %s failed: %s', self.address, exc)
            return
        self._start_worker(sock, address)

    def _start_worker(self, sock, address):
        if not _OPTIONS_INHERITED:
            _tune(sock)
        peer = _Peer(sock, f'{_format_host(address[0])}:{address[1]}')
        with self._lock:
            if self._closed:
                sock.close()
                return
            refusal = self._refusal(address[0])
            if self.hub.threaded:
                greeted = self._greet_early(peer) if refusal is None else None
                if greeted is False:
                    sock.close()
                    return
                # Under the lock: close() never misses a peer's thread.
                self._threads.submit(lambda: self._serve(peer, refusal, greeted))
            self._peers.add(peer)
        log.debug('accepted %s', peer.name)
        if not self.hub.threaded:
            self._handshake_in_loop(peer, refusal)

    def _greet_early(self, peer):
        """Send a plain connection's greeting from the accepting thread, so that the
        client reads it while the connection's thread starts.

        Returns the ``ServerHandshake`` it sent, None to leave the greeting to
        that thread (TLS comes first, or the socket would block), or False if
        the peer is gone.  Never blocks.
        """
        if self.ssl_context is not None:
            return None
        handshake = ServerHandshake(self.authkey)
        greeting = handshake.initial()
        try:
            sent = peer.sock.send(greeting, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            log_failure(peer.name, exc)
            return False
        if sent != len(greeting):
            log_failure(peer.name, 'the greeting did not fit in an empty socket buffer')
            return False
        return handshake

    def _refusal(self, ip):
        """Why a peer at ``ip`` is refused, or None (called with the lock held)."""
        if self.max_connections is not None and len(self._peers) >= self.max_connections:
            return TOO_MANY_REFUSAL.format(self.max_connections)
        certified = (self.ssl_context is not None
                     and self.ssl_context.verify_mode == ssl.CERT_REQUIRED)
        if self.authkey is None and not self.insecure and not certified and not is_loopback(ip):
            return PROTECTED_MODE_REFUSAL
        return None

    def _serve(self, peer, refusal, greeted=None):
        deadline = time.monotonic() + self.handshake_timeout
        if self.ssl_context is not None:
            try:
                peer.sock = self.ssl_context.wrap_socket(peer.sock, server_side=True,
                                                         do_handshake_on_connect=False)
                _tls_handshake(peer.sock, deadline, f'TLS with {peer.name}')
            except (DopyError, OSError) as exc:
                log_failure(peer.name, exc)
                peer.sock.close()
                self.forget(peer)
                return
        try:
            server_handshake(peer.sock, self.authkey, refusal, deadline, greeted, peer.name)
        except (DopyError, OSError):
            # dopy.auth has logged why, in one line.
            peer.sock.close()
            self.forget(peer)
            return
        if self._connect(peer):
            thread = threading.current_thread()
            pooled_name, thread.name = thread.name, f'dopy-conn-{peer.name}'
            try:
                peer.connection.serve()
            finally:
                thread.name = pooled_name

    def _handshake_in_loop(self, peer, refusal):
        """THRD_NONE: the handshakes, driven by the loop, so that a slow peer stalls no one."""
        loop = self.hub.loop
        handshake = ServerHandshake(self.authkey, refusal)
        sock = peer.sock
        sock.setblocking(False)
        if self.ssl_context is not None:
            sock = peer.sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                            do_handshake_on_connect=False)

        def fail(why):
            log_failure(peer.name, why)
            timer.cancel()
            loop.remove_reader(sock)
            sock.close()
            self.forget(peer)

        def on_tls_readable(_sock):
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                # Rare (a full socket buffer mid-handshake); wait briefly rather than add write interest.
                select.select([], [sock], [], 1.0)
                return
            except OSError as exc:
                fail(exc)
                return
            loop.remove_reader(sock)
            greet()

        def on_readable(_sock):
            try:
                data = sock.recv(handshake.wanted)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as exc:
                fail(exc)
                return
            if not data:
                fail('the peer closed the connection during the handshake')
                return
            try:
                sock.send(handshake.feed(data))
            except OSError as exc:
                fail(exc)
                return
            settle()

        def greet():
            try:
                # A greeting is a few dozen bytes: an empty socket buffer takes it whole.
                sock.send(handshake.initial())
            except OSError as exc:
                fail(exc)
                return
            loop.add_reader(sock, on_readable)
            settle()

        def settle():
            if handshake.failed:
                fail(handshake.error)
            elif handshake.done:
                timer.cancel()
                loop.remove_reader(sock)
                self._connect(peer)

        timer = loop.call_later(self.handshake_timeout, lambda: fail('timed out'))
        if self.ssl_context is not None:
            loop.add_reader(sock, on_tls_readable)
        else:
            greet()

    def _connect(self, peer):
        """The handshake is over: make the peer a connection, unless the server closed meanwhile."""
        with self._lock:
            if self._closed or peer not in self._peers:
                peer.sock.close()
                return False
            stream = (TLSStream(peer.sock) if isinstance(peer.sock, ssl.SSLSocket)
                      else SocketStream(peer.sock))
            peer.connection = Connection(stream, self.hub, peer.name,
                                         on_close=lambda _c: self.forget(peer))
        return True

    def forget(self, peer):
        """Stop tracking a peer that has gone."""
        with self._lock:
            self._peers.discard(peer)


class _Peer:
    """An accepted socket: in its handshake, then a connection."""

    __slots__ = ('sock', 'name', 'connection')

    def __init__(self, sock, name):
        self.sock = sock
        self.name = name
        self.connection = None

    def close(self):
        if self.connection is not None:
            self.connection.close()
        else:
            # Wakes a handshake waiting to read; its thread closes the socket.
            # The plain socket's shutdown: an SSLSocket's own would drop its
            # SSL object under a thread that may be mid-handshake.
            try:
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
            except OSError:
                pass


def _listen(host, port):
    sock = None
    try:
        if host == '':
            if socket.has_dualstack_ipv6():
                sock = socket.create_server(('', port), family=socket.AF_INET6,
                                            backlog=_BACKLOG, dualstack_ipv6=True)
            else:
                sock = socket.create_server(('', port), backlog=_BACKLOG)
        else:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, _, _, _, address = infos[0]
            sock = socket.create_server(address, family=family, backlog=_BACKLOG)
        if _OPTIONS_INHERITED:
            _tune(sock)
        return sock
    except OSError as exc:
        if sock is not None:
            sock.close()
        raise translate_os_error(exc, f'cannot serve on {_format_host(host)}:{port}') from exc


# Keepalive probes start after this many idle seconds, and the connection is
# declared lost after _KEEPALIVE_PROBES unanswered ones, _KEEPALIVE_INTERVAL
# apart: a vanished peer is found in about two minutes, not the system's two hours.
_KEEPALIVE_IDLE = 60
_KEEPALIVE_INTERVAL = 10
_KEEPALIVE_PROBES = 6


def _socket_options():
    options = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    # TCP_KEEPIDLE is Linux's name, TCP_KEEPALIVE macOS's; elsewhere the system's defaults stay.
    idle = getattr(socket, 'TCP_KEEPIDLE', None) or getattr(socket, 'TCP_KEEPALIVE', None)
    for option, value in ((idle, _KEEPALIVE_IDLE),
                          (getattr(socket, 'TCP_KEEPINTVL', None), _KEEPALIVE_INTERVAL),
                          (getattr(socket, 'TCP_KEEPCNT', None), _KEEPALIVE_PROBES)):
        if option is not None:
            options.append((socket.IPPROTO_TCP, option, value))
    return tuple(options)


_SOCKET_OPTIONS = _socket_options()
# Linux gives an accepted socket the options of the socket that listened:
# set once there, they cost no system calls on each connection.
_OPTIONS_INHERITED = sys.platform.startswith('linux')


def _tune(sock):
    for level, option, value in _SOCKET_OPTIONS:
        sock.setsockopt(level, option, value)


def _plain_ip(ip):
    return ip[7:] if ip.startswith('::ffff:') else ip


def _same_ip(a, b):
    return _plain_ip(a) == _plain_ip(b)


def _format_host(host):
    return f'[{host}]' if ':' in host else host


def _unbracket(host):
    """``host`` as sockets take it: an IPv6 address may come in brackets, as in a reference string."""
    return host[1:-1] if host.startswith('[') and host.endswith(']') else host


def _refused_hint(host, exc):
    """What to add to a refused connection to an IPv6 address: the likely cause."""
    if not isinstance(exc, ConnectionRefusedError) or ':' not in host:
        return ''
    ipv4 = '127.0.0.1' if is_loopback(host) else 'its IPv4 address'
    return (f' over IPv6: is the server listening on IPv4 only, as it does on makeServer\'s '
            f'default host 127.0.0.1? Connect to {ipv4}, or serve on \'::1\' or \'\'')


def _tls_handshake(sock, deadline, what, wait=wait_for_socket):
    """Complete the TLS handshake of a non-blocking ``SSLSocket`` by ``deadline``; ``wait`` as for ``client_handshake``."""
    sock.setblocking(False)
    while True:
        try:
            sock.do_handshake()
            return
        except ssl.SSLWantReadError:
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        except ssl.SSLError as exc:
            raise AuthenticationError(f'{what} failed: {getattr(exc, "verify_message", None) or exc.reason or exc}') from exc
        except OSError as exc:
            raise translate_os_error(exc, what) from exc
        wait(sock, events, deadline, what)


def _ip_family(host):
    """``AF_INET`` or ``AF_INET6`` if ``host`` is an IP address, else None."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return family
        except (OSError, ValueError):
            pass
    return None


def _addresses(hub, host, port, deadline, what):
    """``getaddrinfo``'s stream addresses for ``host:port``, found by ``deadline``.

    An IP address is taken as it is, with no resolver (which would first
    pass it through Python's IDNA codec), and ``localhost`` is looked up in
    this thread: RFC 6761 has it answered locally, never by a name server.
    Any other name is looked up on a thread of the hub's, so that a name
    server that does not answer cannot hold the caller past ``deadline``.
    """
    family = _ip_family(host)
    if family is not None:
        return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, '', (host, port))]
    if host.lower() == 'localhost':
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found = Future()

    def look_up():
        try:
            found.set_result(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except Exception as exc:
            found.set_exception(exc)

    try:
        hub._resolver.submit(look_up)
    except RuntimeError:
        raise ConnectionClosedError('the hub of this proxy has been shut down') from None
    try:
        return found.result(max(0.0, deadline - time.monotonic()))
    except FutureTimeoutError:
        raise CallTimeoutError(f'{what}: looking up {host} timed out') from None


def _connect_waiting(hub, host, port, deadline, wait, what):
    """A non-blocking socket connected to ``host:port``, waiting with ``wait`` (as the handshakes do).

    Like ``socket.create_connection``, it tries each address in turn and
    raises the last error.
    """
    error = OSError(f'no address found for {host}')
    for family, kind, proto, _, address in _addresses(hub, host, port, deadline, what):
        sock = socket.socket(family, kind | _NONBLOCK, proto)
        try:
            if not _NONBLOCK:
                sock.setblocking(False)
            code = sock.connect_ex(address)
            if code in (errno.EINPROGRESS, errno.EWOULDBLOCK):
                wait(sock, select.POLLOUT, deadline, what)
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
            return sock
        except DopyError:
            sock.close()
            raise
        except OSError as exc:
            sock.close()
            error = exc
    raise error


def _loop_wait(loop):
    """A ``wait`` for the handshakes that runs ``loop`` meanwhile: a THRD_NONE hub may be connecting to itself."""
    def wait(sock, events, deadline, what):
        if loop.closed:
            raise ConnectionClosedError(f'{what}: the hub has been shut down')
        try:
            if events & select.POLLOUT:
                loop.pump_until(lambda: False, deadline, sock.fileno())
                return
            ready = []
            loop.add_reader(sock.fileno(), lambda _fd: ready.append(True))
            try:
                loop.pump_until(lambda: ready, deadline)
            finally:
                loop.remove_reader(sock.fileno())
        except CallTimeoutError as exc:
            raise CallTimeoutError(f'{what}: timed out') from exc
    return wait


def _proxy(hub, host, port, name, timeout, authkey, ssl_context):
    if not isinstance(name, str) or not name:
        raise TypeError(f'an object name must be a non-empty str, not {name!r}')
    if not isinstance(port, int) or not 0 < port <= 65535:
        raise ValueError(f'port must be an int from 1 to 65535, not {port!r}')
    if timeout is not None and not timeout > 0:
        raise ValueError(f'timeout must be None or a positive number of seconds, not {timeout!r}')
    connect_timeout = DEFAULT_CONNECT_TIMEOUT if timeout is None else timeout
    host = _unbracket(host)
    address = f'{_format_host(host)}:{port}'
    open_servers = hub._open_servers

    def connect():
        if hub.closed:
            raise ConnectionClosedError('the hub of this proxy has been shut down')
        deadline = time.monotonic() + connect_timeout
        wait = wait_for_socket if hub.threaded else _loop_wait(hub.loop)
        try:
            sock = _connect_waiting(hub, host, port, deadline, wait, f'connecting to {address}')
        except DopyError:
            raise  # already says what it was doing: a timeout, or the hub shut down
        except OSError as exc:
            raise translate_os_error(exc, f'cannot connect to {address}',
                                     _refused_hint(host, exc)) from exc
        _tune(sock)
        # A keyless plain client has nothing to say in the handshake: to a
        # server that greeted it OPEN before, it sends its first call at once
        # and reads the greeting before the reply, saving a round trip.  Not
        # in THRD_NONE, whose loop would wait for a greeting without the
        # connect deadline.
        early = (authkey is None and ssl_context is None and address in open_servers
                 and hub.threaded)
        try:
            if ssl_context is not None:
                sock = ssl_context.wrap_socket(sock, server_hostname=host,
                                               do_handshake_on_connect=False)
                _tls_handshake(sock, deadline, f'TLS with {address}', wait)
            if not early:
                client_handshake(sock, authkey, deadline, wait, address)
        except BaseException:
            sock.close()
            raise
        if early:
            stream = EarlyStream(sock, OPEN_GREETING, _Early(open_servers, address, deadline))
        elif ssl_context is not None:
            stream = TLSStream(sock)
        else:
            stream = SocketStream(sock)
            if authkey is None:
                _remember_open(open_servers, address)
        connection = Connection(stream, hub, address, close_when_unused=True)
        try:
            hub._add_connection(connection)
        except CommunicationError:
            connection.close()
            raise
        return connection

    return RemoteObject(f'tcp:{address}:{name}', name, connect, timeout)


class _Early:
    """What an ``EarlyStream`` asks of the transport: a handshake to explain an unexpected greeting, and what to forget."""

    __slots__ = ('open_servers', 'address', 'deadline')

    def __init__(self, open_servers, address, deadline):
        self.open_servers = open_servers
        self.address = address
        self.deadline = deadline

    def handshake(self):
        handshake = ClientHandshake(None)
        handshake.initial()
        return handshake

    def failed(self):
        # The next connection waits for the greeting, and remote() reports what it says.
        self.open_servers.pop(self.address, None)

    def wait_for_greeting(self, sock):
        # A reader with no deadline of its own: connecting still has one.
        try:
            wait_for_socket(sock, select.POLLIN, self.deadline, f'connecting to {self.address}')
        except CallTimeoutError as exc:
            self.failed()
            raise CallTimeoutError(
                f'connecting to {self.address}: timed out waiting for the greeting') from exc


def _remember_open(open_servers, address):
    # Bounded the cheap way: forgetting them all costs each server one
    # handshake round trip more, once.
    if len(open_servers) >= _MAX_OPEN_SERVERS:
        open_servers.clear()
    open_servers[address] = True


def _parse_reference(rest):
    """``HOST:PORT:NAME`` (HOST may be ``[v6]``) to its three parts."""
    if rest.startswith('['):
        host, sep, tail = rest[1:].partition(']:')
    else:
        host, sep, tail = rest.partition(':')
    port, sep2, name = tail.partition(':')
    if not (sep and sep2 and host and name and port.isdigit()):
        raise ValueError(f'not a TCP reference: "tcp:{rest}" (expected tcp:HOST:PORT:NAME)')
    return host, int(port), name


def _from_reference(hub, rest, timeout, connect):
    host, port, name = _parse_reference(rest)
    proxy = _proxy(hub, host, port, name, timeout, hub.authkey, hub.ssl_context)
    if connect:
        proxy._dopy_link.get()
    return proxy


register_scheme('tcp', _from_reference)
