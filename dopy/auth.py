"""The connection handshake: mutual HMAC-SHA256 authentication and protected mode, as bytes in and bytes out, before any pickle.

Every connection starts with this exchange, before the first DOPY frame
(see ``dopy.wire``) in either direction.  The server speaks first, with a
greeting of 44 bytes.  All integers are unsigned, big-endian.

======  ====  ==========================================================
offset  size  field
======  ====  ==========================================================
0       8     magic, the bytes ``DOPYHELO``
8       1     version, currently 1
9       1     mode: 0 OPEN (no key needed), 1 AUTH (a key is required),
              2 REFUSED (this connection will not be served)
10      2     reserved, zero
12      32    the server's challenge *Cs*: random bytes in AUTH mode,
              zero bytes in OPEN and REFUSED modes
======  ====  ==========================================================

OPEN: the handshake is over; DOPY frames follow.  A client that has an
authkey refuses such a server, since a server that does not authenticate
could be anyone.  A keyless client that had an OPEN greeting from the
same address before may send frames at once, before the greeting comes
(``dopy.streams.EarlyStream`` reads it before the first frame); a
REFUSED server never reads them, and an AUTH server that finds a frame
where the answer goes fails the handshake saying the client has no key.

REFUSED: the greeting is followed by the reason, and the server closes.

======  ====  ==========================================================
offset  size  field
======  ====  ==========================================================
44      2     length of the message, *n*, at most 1024
46      *n*   the message, UTF-8: why, and what the operator can do
======  ====  ==========================================================

AUTH: the client answers with 64 bytes,

======  ====  ==========================================================
offset  size  field
======  ====  ==========================================================
0       32    the client's challenge *Cc*, random bytes
32      32    HMAC-SHA256(key, ``DOPY-C`` + *Cs* + *Cc*)
======  ====  ==========================================================

and the server, having checked that with ``hmac.compare_digest``, sends
its verdict: on a wrong answer the single byte 0 and it closes; on a
right one 33 bytes,

======  ====  ==========================================================
offset  size  field
======  ====  ==========================================================
0       1     1: accepted
1       32    HMAC-SHA256(key, ``DOPY-S`` + *Cc* + *Cs*)
======  ====  ==========================================================

which the client checks in turn, so a server that does not know the key
is caught too.  The two proofs use different prefixes and orders, so
neither side can reflect the other's proof back, and fresh challenges on
both sides mean no recorded exchange can be replayed.

``ServerHandshake`` and ``ClientHandshake`` are the protocol with no I/O:
``initial()`` gives the first bytes to send, ``feed(data)`` takes bytes
received and gives the bytes to send back, and ``wanted`` says how many
more bytes it needs *at most*, so a reader that asks for no more never
takes the frames that follow off the socket.  A server never wants more
than 64 bytes from an unauthenticated peer.  ``server_handshake`` and
``client_handshake`` drive them over a socket (plain or TLS, blocking or
not) within a deadline.

The rest are the helpers the transports and scripts need to decide and
find a key: ``is_loopback`` (for protected mode: a server without a key
serves only loopback peers and refuses the others), ``read_authkey_file``
and ``authkey_from_env``.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import select
import ssl
import stat
import struct
import time
from collections.abc import Mapping

from . import wire
from .channel import translate_os_error, wait_ready
from .hub import check_authkey
from .errors import AuthenticationError, CallTimeoutError, ConnectionLostError, ProtocolError

__all__ = [
    'MAGIC', 'VERSION', 'OPEN', 'AUTH', 'REFUSED', 'GREETING', 'CHALLENGE_SIZE',
    'ANSWER_SIZE', 'MAX_REFUSAL_SIZE', 'DEFAULT_HANDSHAKE_TIMEOUT', 'GREETING_GRACE',
    'NO_GREETING', 'ENV_VARIABLE',
    'ServerHandshake', 'ClientHandshake', 'server_handshake', 'client_handshake',
    'check_authkey', 'is_loopback', 'read_authkey_file', 'authkey_from_env', 'wait_for_socket',
]

log = logging.getLogger('dopy.auth')

MAGIC = b'DOPYHELO'
VERSION = 1
OPEN = 0
AUTH = 1
REFUSED = 2
_MODES = {OPEN: 'OPEN', AUTH: 'AUTH', REFUSED: 'REFUSED'}

GREETING = struct.Struct('!8sBBH32s')
_LENGTH = struct.Struct('!H')
CHALLENGE_SIZE = 32
_MAC_SIZE = hashlib.sha256().digest_size
ANSWER_SIZE = CHALLENGE_SIZE + _MAC_SIZE
MAX_REFUSAL_SIZE = 1024
_NO_CHALLENGE = bytes(CHALLENGE_SIZE)
# Every server without a key greets so, byte for byte.
OPEN_GREETING = GREETING.pack(MAGIC, VERSION, OPEN, 0, _NO_CHALLENGE)
_ACCEPTED = b'\x01'
_REJECTED = b'\x00'
# How a frame starts: what a keyless client that met this address OPEN
# before sends where the answer goes (a random answer starts so once in 2**40).
_FRAME_START = wire.MAGIC + bytes((wire.VERSION,))

# A suggestion for the transports: long enough for a slow link, short
# enough that a peer that connects and says nothing is soon let go.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0

# A DOPY server greets as it accepts.  A peer that says nothing is most
# likely one that waits for the client to speak first: an HTTP server, or
# a TLS server met without TLS.  The client warns once it has waited
# GREETING_GRACE seconds, and goes on waiting until its deadline, since a
# busy server can be slow to accept.
GREETING_GRACE = 1.0
NO_GREETING = 'no DOPY greeting: not a DOPY server, or one that expects TLS?'
_NO_GREETING_OVER_TLS = 'no DOPY greeting: not a DOPY server?'

ENV_VARIABLE = 'DOPY_AUTHKEY'


def _client_proof(key, server_challenge, client_challenge):
    return hmac.new(key, b'DOPY-C' + server_challenge + client_challenge, hashlib.sha256).digest()


def _server_proof(key, server_challenge, client_challenge):
    return hmac.new(key, b'DOPY-S' + client_challenge + server_challenge, hashlib.sha256).digest()


class _Handshake:
    """What both sides share: a state, the bytes gathered for it, and the outcome."""

    def __init__(self):
        self._state = None
        self._need = 0
        self._buffer = bytearray()
        self._error = None
        self._unused = b''

    @property
    def done(self):
        """True once the handshake succeeded: DOPY frames may follow."""
        return self._state == 'done'

    @property
    def failed(self):
        """True once the handshake failed; ``error`` is the exception that says why."""
        return self._state == 'failed'

    @property
    def error(self):
        """The ``AuthenticationError`` or ``ProtocolError`` of a failed handshake, else None."""
        return self._error

    @property
    def wanted(self):
        """How many more bytes the handshake can use, at most; 0 when it is over."""
        return self._need - len(self._buffer)

    @property
    def unused(self):
        """Bytes fed past the end of a successful handshake: the start of the frames."""
        return self._unused

    def feed(self, data):
        """Take bytes received from the peer; return the bytes to send to it now (maybe ``b''``).

        Bytes past what the handshake needs are kept in ``unused`` once it is
        done.  Feeding a handshake that is over, or has not started, is a
        ``ValueError``.
        """
        if self._state in (None, 'done', 'failed'):
            raise ValueError(f'the handshake is {"not started" if self._state is None else "over"}')
        view = memoryview(data).cast('B')
        out = []
        while view and self._state not in ('done', 'failed'):
            take = self.wanted
            self._buffer += view[:take]
            view = view[take:]
            if not self.wanted:
                chunk = bytes(self._buffer)
                self._buffer.clear()
                out.append(self._step(chunk))
        if self.done:
            self._unused = bytes(view)
        return b''.join(out)

    def _expect(self, state, need):
        self._state = state
        self._need = need
        self._buffer.clear()

    def _finish(self):
        self._expect('done', 0)

    def _fail(self, error):
        self._expect('failed', 0)
        self._error = error
        return error

    def _step(self, chunk):
        raise NotImplementedError

    def lost(self, peer):
        """The ``ConnectionLostError`` for ``peer`` closing before the handshake is over."""
        return ConnectionLostError(f'{peer} closed the connection during the handshake')


class ServerHandshake(_Handshake):
    """The server's side of the handshake.

    With ``authkey`` None the server is OPEN and done as soon as its
    greeting is sent.  With a key it asks for one.  With ``refusal`` (a
    message, str) it refuses, whatever its key: ``initial()`` is the
    REFUSED greeting and the message, and the handshake has then failed.

    Unlike the client's, this ``feed`` does not raise for a wrong answer: it
    returns the byte that tells the client so, which must still be sent,
    and sets ``failed`` and ``error``.
    """

    def __init__(self, authkey, refusal=None):
        super().__init__()
        self._key = check_authkey(authkey)
        self._refusal = None
        if refusal is not None:
            if not isinstance(refusal, str):
                raise TypeError(f'a refusal message is a str, not {type(refusal).__name__}')
            self._refusal = refusal.encode('utf-8')
            if len(self._refusal) > MAX_REFUSAL_SIZE:
                raise ValueError(f'a refusal message is at most {MAX_REFUSAL_SIZE} bytes '
                                 f'in UTF-8, not {len(self._refusal)}')
            self.mode = REFUSED
        else:
            self.mode = OPEN if self._key is None else AUTH
        self._challenge = _NO_CHALLENGE

    def initial(self):
        """The greeting, to send first (with the message, when refusing)."""
        if self._state is not None:
            raise ValueError('initial() is called once, first')
        if self.mode == REFUSED:
            self._fail(AuthenticationError(
                f'refused the connection: {self._refusal.decode("utf-8")}'))
            return (GREETING.pack(MAGIC, VERSION, REFUSED, 0, _NO_CHALLENGE)
                    + _LENGTH.pack(len(self._refusal)) + self._refusal)
        if self.mode == OPEN:
            self._finish()
        else:
            self._challenge = secrets.token_bytes(CHALLENGE_SIZE)
            self._expect('answer', ANSWER_SIZE)
        return GREETING.pack(MAGIC, VERSION, self.mode, 0, self._challenge)

    def _step(self, chunk):
        if chunk.startswith(_FRAME_START):
            self._fail(AuthenticationError(
                'the client has no authkey: it sent a call where the answer to the challenge goes'))
            return _REJECTED
        client_challenge, proof = chunk[:CHALLENGE_SIZE], chunk[CHALLENGE_SIZE:]
        expected = _client_proof(self._key, self._challenge, client_challenge)
        if not hmac.compare_digest(proof, expected):
            self._fail(AuthenticationError(
                'the client did not prove it knows the authkey (a wrong key)'))
            return _REJECTED
        self._finish()
        return _ACCEPTED + _server_proof(self._key, self._challenge, client_challenge)


class ClientHandshake(_Handshake):
    """The client's side of the handshake; ``authkey`` None means it has no key.

    ``feed`` raises ``AuthenticationError`` (refused, a wrong or missing key
    on either side, or a key meeting an OPEN server) or ``ProtocolError``
    (not a DOPY greeting) when the handshake fails.
    """

    def __init__(self, authkey):
        super().__init__()
        self._key = check_authkey(authkey)
        self._server_challenge = None
        self._challenge = None
        self.server_mode = None

    @property
    def greeted(self):
        """False until the first byte of the server's greeting has come."""
        return self._state not in (None, 'greeting') or bool(self._buffer)

    def lost(self, peer):
        if self.greeted:
            return super().lost(peer)
        return ConnectionLostError(f'{peer} closed the connection with {NO_GREETING}')

    def initial(self):
        """``b''``: the client waits for the server's greeting."""
        if self._state is not None:
            raise ValueError('initial() is called once, first')
        self._expect('greeting', GREETING.size)
        return b''

    def feed(self, data):
        """Take bytes from the server; return the bytes to send back; raise if the handshake fails."""
        if self._state == 'greeting':
            if data == OPEN_GREETING and self._key is None and not self._buffer:
                # The usual greeting, whole: no need to take it apart.
                self.server_mode = OPEN
                self._finish()
                return b''
            # Check the magic as it comes, so that a server of another
            # protocol is told apart at once rather than at the deadline.
            seen = bytes(self._buffer[:len(MAGIC)])
            seen += bytes(data[:len(MAGIC) - len(seen)])
            if not MAGIC.startswith(seen):
                raise self._fail(ProtocolError(
                    f'the server is not a DOPY server: it greeted with {seen!r}, '
                    f'not {MAGIC!r}'))
        return super().feed(data)

    def _step(self, chunk):
        state = self._state
        if state == 'greeting':
            return self._greeting(chunk)
        if state == 'refusal length':
            (length,) = _LENGTH.unpack(chunk)
            if length > MAX_REFUSAL_SIZE:
                raise self._fail(ProtocolError(
                    f'the server refused the connection with a message of {length} bytes, '
                    f'more than the {MAX_REFUSAL_SIZE} allowed'))
            if length == 0:
                return self._refused(b'')
            self._expect('refusal', length)
            return b''
        if state == 'refusal':
            return self._refused(chunk)
        if state == 'verdict':
            if chunk == _REJECTED:
                raise self._fail(AuthenticationError(
                    'the server rejected the authkey: it is not the server\'s key'))
            if chunk != _ACCEPTED:
                raise self._fail(ProtocolError(
                    f'the server answered the authentication with {chunk!r}, not 0 or 1'))
            self._expect('proof', _MAC_SIZE)
            return b''
        expected = _server_proof(self._key, self._server_challenge, self._challenge)
        if not hmac.compare_digest(chunk, expected):
            raise self._fail(AuthenticationError(
                'the server did not prove it knows the authkey: it is not the server '
                'you meant, or it has another key'))
        self._finish()
        return b''

    def _greeting(self, chunk):
        magic, version, mode, reserved, challenge = GREETING.unpack(chunk)
        if version != VERSION:
            raise self._fail(ProtocolError(
                f'the server speaks handshake version {version}; this DOPY speaks {VERSION}'))
        if mode not in _MODES:
            raise self._fail(ProtocolError(f'the server greeted with unknown mode {mode}'))
        if reserved:
            raise self._fail(ProtocolError(
                f'the server greeted with reserved bits set ({reserved:#06x})'))
        if mode != AUTH and challenge != _NO_CHALLENGE:
            raise self._fail(ProtocolError(
                f'the server greeted in {_MODES[mode]} mode with a challenge'))
        self.server_mode = mode
        if mode == REFUSED:
            self._expect('refusal length', _LENGTH.size)
            return b''
        if mode == OPEN:
            if self._key is not None:
                raise self._fail(AuthenticationError(
                    'the server does not authenticate (it has no authkey), so it could be '
                    'anyone: refusing to talk to it with an authkey set; give the server '
                    'the same key, or connect without one'))
            self._finish()
            return b''
        if self._key is None:
            raise self._fail(AuthenticationError(
                'the server requires an authkey: pass the same authkey= as the server '
                f'(the scripts read it from --authkey-file or {ENV_VARIABLE})'))
        self._server_challenge = challenge
        self._challenge = secrets.token_bytes(CHALLENGE_SIZE)
        self._expect('verdict', 1)
        return self._challenge + _client_proof(self._key, challenge, self._challenge)

    def _refused(self, chunk):
        message = chunk.decode('utf-8', errors='replace')
        raise self._fail(AuthenticationError(f'the server refused the connection: {message}'))


def server_handshake(sock, authkey, refusal=None, deadline=None, greeted=None, peer=None):
    """Run the server's side of the handshake on a connected socket.

    ``deadline`` is a ``time.monotonic()`` time, or None for no limit.
    ``greeted``, when given, is the ``ServerHandshake`` whose greeting
    (``initial()``) was already sent on ``sock``: it goes on from there.
    ``peer`` names the client in messages (by default, its address).
    Returns once the peer may send frames; reads nothing past the
    handshake.  On failure, logs one line on ``dopy.auth`` and raises:
    ``AuthenticationError`` (a wrong key, or ``refusal`` was given),
    ``CallTimeoutError`` (the deadline passed), ``ConnectionLostError`` or
    another ``CommunicationError``.  The caller closes the socket.
    """
    if greeted is not None and greeted.done:
        return  # an OPEN greeting, already sent: nothing more to say or hear
    peer = peer or _peer_name(sock)
    handshake = greeted if greeted is not None else ServerHandshake(authkey, refusal)
    try:
        _drive(sock, handshake, deadline, peer, greeted=greeted is not None)
    except OSError as exc:
        # DOPY's CommunicationErrors are OSErrors too.  A client without
        # the key, or with a key meeting an OPEN server, just hangs up:
        # that is a ConnectionLostError here.
        log_failure(peer, exc)
        raise


def log_failure(peer, why):
    """The one log line of a handshake that failed on the server's side."""
    log.warning('handshake with %s failed: %s', peer, why)


def client_handshake(sock, authkey, deadline=None, wait=None, peer=None):
    """Run the client's side of the handshake on a connected socket.

    ``deadline`` is a ``time.monotonic()`` time, or None for no limit.
    ``wait(sock, events, deadline, what)`` waits until the socket is ready
    for ``select.POLLIN`` or ``POLLOUT`` (``wait_for_socket`` by default; a
    THRD_NONE hub runs its loop meanwhile).  ``peer`` names the server in
    messages (by default, its address).  Returns once frames may be
    sent; reads nothing past the handshake.  Raises ``AuthenticationError``,
    ``ProtocolError``, ``CallTimeoutError``, ``ConnectionLostError`` or
    another ``CommunicationError``.  A server that sends no greeting gets
    a warning on ``dopy.auth`` after ``GREETING_GRACE`` seconds, and, at the
    deadline, a ``CallTimeoutError`` that says what it likely is.
    """
    handshake = ClientHandshake(authkey)
    hint = _NO_GREETING_OVER_TLS if isinstance(sock, ssl.SSLSocket) else NO_GREETING
    wait = _GreetingWait(handshake, wait or wait_for_socket, hint)
    _drive(sock, handshake, deadline, peer or _peer_name(sock), wait)


class _GreetingWait:
    """A client's ``wait`` that, while no byte of the greeting has come, warns after
    ``GREETING_GRACE`` and times out saying what is likely wrong."""

    def __init__(self, handshake, wait, hint):
        self.handshake = handshake
        self.wait = wait
        self.hint = hint
        self.warn_at = time.monotonic() + GREETING_GRACE

    def __call__(self, sock, events, deadline, what):
        if self.handshake.greeted:
            return self.wait(sock, events, deadline, what)
        warn_at = self.warn_at
        if warn_at is not None and (deadline is None or warn_at < deadline):
            try:
                return self.wait(sock, events, warn_at, what)
            except CallTimeoutError:
                self.warn_at = None
                log.warning('%s: %s (waiting on until the deadline, in case it is a '
                            'busy DOPY server)', what, self.hint)
        try:
            return self.wait(sock, events, deadline, what)
        except CallTimeoutError:
            raise CallTimeoutError(f'{what}: timed out with {self.hint}') from None


def _drive(sock, handshake, deadline, peer, wait=None, greeted=False):
    """Run ``handshake`` over ``sock`` until it is done, or raise why not."""
    what = f'handshake with {peer}'
    timeout = sock.gettimeout()
    # Non-blocking for the handshake, so that no read or write can outlast
    # the deadline (a blocking TLS read waits for a whole record).
    if timeout != 0.0:
        sock.settimeout(0.0)
    try:
        wait = wait or wait_for_socket
        if not greeted:
            _send_all(sock, handshake.initial(), deadline, what, wait)
        while not handshake.done and not handshake.failed:
            data = _recv(sock, handshake.wanted, deadline, what, wait)
            if not data:
                raise handshake.lost(peer)
            out = handshake.feed(data)
            if out:
                _send_all(sock, out, deadline, what, wait)
        if handshake.failed:
            raise handshake.error
    finally:
        if timeout != 0.0 and sock.fileno() >= 0:
            sock.settimeout(timeout)


def _recv(sock, size, deadline, what, wait):
    events = select.POLLIN
    pending = isinstance(sock, ssl.SSLSocket) and sock.pending()
    while True:
        if not pending:
            wait(sock, events, deadline, what)
        pending = False
        try:
            return sock.recv(size)
        except (BlockingIOError, ssl.SSLWantReadError):
            events = select.POLLIN
        except ssl.SSLWantWriteError:
            events = select.POLLOUT
        except OSError as exc:
            raise translate_os_error(exc, what) from exc


def _send_all(sock, data, deadline, what, wait):
    view = memoryview(data)
    events = select.POLLOUT
    while view:
        wait(sock, events, deadline, what)
        try:
            sent = sock.send(view)
        except (BlockingIOError, ssl.SSLWantWriteError):
            events = select.POLLOUT
            continue
        except ssl.SSLWantReadError:
            events = select.POLLIN
            continue
        except OSError as exc:
            raise translate_os_error(exc, what) from exc
        view = view[sent:]
        events = select.POLLOUT


def wait_for_socket(sock, events, deadline, what):
    """Wait until ``sock`` is ready for ``events`` (``select.POLLIN``/``POLLOUT``), or ``CallTimeoutError`` at ``deadline``."""
    poller = select.poll()
    poller.register(sock.fileno(), events)
    wait_ready(poller, deadline, what)


def _peer_name(sock):
    try:
        address = sock.getpeername()
    except OSError:
        return 'the peer'
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'
    return repr(address) if address else 'the peer'


def is_loopback(address):
    """True if ``address`` is a loopback address: 127.0.0.0/8, ``::1`` or ``::ffff:127.x.y.z``.

    ``address`` is an IP address string, or a socket address tuple as
    ``getpeername()`` returns it.  Anything that is not an IP address (a
    host name, a Unix socket's path) is not loopback: names are not
    resolved here.
    """
    if isinstance(address, tuple):
        if not address:
            return False
        address = address[0]
    if not isinstance(address, str):
        return False
    return _is_loopback_ip(address)


# A server asks for every peer it accepts; parsing an address in Python
# costs more than the rest of accepting it, and peers come back.
@functools.lru_cache(maxsize=1024)
def _is_loopback_ip(address):
    try:
        ip = ipaddress.ip_address(address.split('%', 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def read_authkey_file(path: str | os.PathLike[str]) -> bytes:
    """The authkey kept in the file at ``path``: its bytes, less one trailing newline.

    Raises ``OSError`` if it cannot be read and ``ValueError`` if it holds
    no key.  Logs a warning if other users may read it.
    """
    with open(path, 'rb') as f:
        key = f.read()
        mode = os.fstat(f.fileno()).st_mode
    if key.endswith(b'\r\n'):
        key = key[:-2]
    elif key.endswith(b'\n'):
        key = key[:-1]
    if not key:
        raise ValueError(f'the authkey file {path} is empty: it must hold the key')
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning('the authkey file %s may be read by other users (mode %o): '
                    'chmod 600 it', path, stat.S_IMODE(mode))
    return key


def authkey_from_env(environ: Mapping[str, str] | None = None) -> bytes | None:
    """The authkey in the ``DOPY_AUTHKEY`` variable, as UTF-8 bytes; None if it is not set.

    ``environ`` is a mapping to look in, ``os.environ`` by default (not a
    default argument, which ``help()`` would print, key and all).  Raises
    ``ValueError`` if the variable is set but empty.
    """
    value = (os.environ if environ is None else environ).get(ENV_VARIABLE)
    if value is None:
        return None
    if not value:
        raise ValueError(f'{ENV_VARIABLE} is set but empty: unset it, or give it the key')
    return value.encode('utf-8')
