"""Framed I/O on one stream, and the one place where ``OSError`` becomes one of DOPY's errors.

A ``Channel`` sends frames, already encoded, on a stream (``dopy.streams``)
and reads frames from it through the wire's decoder.  It knows nothing of
calls, threads or references: what a failure means for a connection is the
connection's to decide.  It never blocks past a deadline
(``time.monotonic()``; None means no limit): a send with a deadline never
blocks in the kernel, and waits in ``poll`` while the peer is slow to read;
``send_wait``, for a sender with no deadline, may sleep in the kernel
instead, as long as the peer takes.

What it raises is DOPY's:

- ``ConnectionLostError`` when the stream ends (no cause) or fails (its
  ``OSError`` is the cause);
- ``CallTimeoutError`` at a deadline;
- ``ProtocolError`` for bytes that break the wire format;
- whatever DOPY error the stream itself raises (a greeting refused:
  ``streams.EarlyStream``).

A read that would block raises ``BlockingIOError`` as it is: it means
nothing has come yet, not a failure.  ``translate_os_error`` and
``wait_ready`` serve the transports' connecting and handshakes as well.
"""

import functools
import math
import select
import socket
import time

from . import wire
from .errors import CallTimeoutError, CommunicationError, ConnectionLostError

__all__ = ['Channel', 'translate_os_error', 'wait_ready']

# sendmsg takes at most IOV_MAX (1024 on Linux) segments a call.
_MAX_SEGMENTS = 512
# A read with less time than this left waits in poll.  Longer ones sleep in
# recv under the socket's own timeout, which the kernel keeps in clock ticks
# (up to _TICK long) and rounds up: it is set at most _TICK short of the
# time left, and to a tenth less than that time, so that the calls of one
# proxy, with one timeout, find it set already.
_TIMED_RECV_MIN = 0.05
_TICK = 0.01


def translate_os_error(exc, what, hint=''):
    """The DOPY error for an ``OSError`` met while doing ``what``, chained to it; ``hint`` ends its message."""
    if isinstance(exc, (socket.timeout, TimeoutError)):
        error = CallTimeoutError(f'{what}: timed out{hint}')
    elif isinstance(exc, socket.gaierror):
        error = CommunicationError(f'{what}: {exc.strerror or exc}{hint}')
    elif isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        error = ConnectionLostError(f'{what}: {exc.strerror or exc}{hint}')
    else:
        error = CommunicationError(f'{what}: {exc.strerror or exc}{hint}')
    error.__cause__ = exc
    return error


def wait_ready(poller, deadline, what):
    """``poller.poll()`` until something is ready, or ``CallTimeoutError`` at ``deadline`` (None: no limit)."""
    if deadline is None:
        poller.poll()
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0 or (not poller.poll(math.ceil(remaining * 1000))
                          and time.monotonic() >= deadline):
        raise CallTimeoutError(f'{what}: timed out')


class Channel:
    """Frames on ``stream``, to and from ``peer`` (a name for messages), each at most ``max_size`` bytes long.

    ``wait_writable(deadline)``, if given, replaces the wait in ``poll``
    while the peer is slow to read: a hub's loop passes its own, which
    serves the other peers meanwhile.
    """

    def __init__(self, stream, max_size, peer, wait_writable=None):
        self.stream = stream
        self.peer = peer
        self.decoder = wire.Decoder(max_size)
        self._send = stream.send
        self._send_flags = stream.send_flags
        # send_wait(data): the whole frame sent, however long the peer takes
        # to make room for it, for a sender with no deadline.  The stream's
        # own where it has one and nothing else is to be served meanwhile
        # (a loop's wait_writable is): it raises its OSError untranslated
        # (``lost`` translates it), and it is one system call and no Python
        # frame, on every call's path.
        if stream.send_wait is not None and wait_writable is None:
            self.send_wait = stream.send_wait
        else:
            self.send_wait = functools.partial(self.send, deadline=None)
        self._wait_writable = wait_writable or self._poll_writable
        # The stream's receive timeout (see ``receive_by``), or None while
        # a read waits for ever.  Only the reading thread sets it.
        self.recv_timeout = None

    # Made on first use: a channel that never has to wait for its stream has none.
    @functools.cached_property
    def _read_poll(self):
        poller = select.poll()
        poller.register(self.stream.read_fd, select.POLLIN)
        if self.stream.wake_fd is not None:
            poller.register(self.stream.wake_fd, select.POLLIN)
        return poller

    @functools.cached_property
    def _write_poll(self):
        poller = select.poll()
        poller.register(self.stream.write_fd, select.POLLOUT)
        return poller

    def send(self, data, deadline):
        """Send the frame ``data`` (bytes-like), all of it: a small one leaves in one system call."""
        try:
            try:
                sent = self._send(data, self._send_flags)
            except BlockingIOError:
                sent = 0
            if sent != len(data):
                self._send_rest(data, sent, deadline)
        except CommunicationError:
            raise
        except OSError as exc:
            raise self.lost(exc) from exc

    def send_segments(self, segments, deadline):
        """Send a frame made of several bytes-like ``segments``, with as few system calls as the kernel allows."""
        try:
            self._send_segments(segments, deadline)
        except CommunicationError:
            raise
        except OSError as exc:
            raise self.lost(exc) from exc

    def _send_rest(self, data, sent, deadline):
        send, flags = self._send, self._send_flags
        view = memoryview(data)
        while sent < len(view):
            self._wait_writable(deadline)
            try:
                sent += send(view[sent:], flags)
            except BlockingIOError:
                pass

    def _send_segments(self, segments, deadline):
        views = [v for v in (memoryview(s).cast('B') for s in segments) if len(v)]
        first = 0
        sendmsg = self.stream.sendmsg
        while first < len(views):
            try:
                sent = sendmsg(views[first:first + _MAX_SEGMENTS])
            except BlockingIOError:
                self._wait_writable(deadline)
                continue
            while sent:
                if sent >= len(views[first]):
                    sent -= len(views[first])
                    first += 1
                else:
                    views[first] = views[first][sent:]
                    sent = 0

    def _poll_writable(self, deadline):
        wait_ready(self._write_poll, deadline, f'waiting for {self.peer}')

    def receive(self, recv):
        """One ``recv(buffer)`` (a ``recv_into``) into the decoder: the next whole frame, or None if none is whole yet.

        A frame decoded before comes first, without calling ``recv``.
        """
        try:
            return self.decoder.receive(recv)
        except BlockingIOError:
            raise
        except Exception as exc:
            raise self.read_error(exc)

    def read_error(self, exc):
        """The error to raise for ``exc``, raised by a read of this channel: DOPY's, chained to it."""
        if isinstance(exc, EOFError):
            error = self.ended()
            error.__suppress_context__ = True
            return error
        if isinstance(exc, OSError) and not isinstance(exc, CommunicationError):
            return self.lost(exc)
        return exc

    def ended(self):
        """``ConnectionLostError`` for a stream the peer has closed."""
        return ConnectionLostError(f'{self.peer} closed the connection')

    def lost(self, cause):
        """``ConnectionLostError`` for the ``OSError`` ``cause``."""
        error = ConnectionLostError(f'connection with {self.peer} lost: {cause.strerror or cause}')
        error.__cause__ = cause
        return error

    def receive_by(self, recv, deadline):
        """One ``recv_wait`` of the stream (``recv``) into the decoder, given up at ``deadline``: the next whole frame, or None.

        One system call when the frame comes in time: the socket's own
        timeout bounds the sleep, set again only when it no longer fits
        the time left.  With little time left, it waits in ``poll``.  None
        does not say why (nothing came in time, or only part of a frame):
        the caller looks at its deadline.
        """
        remaining = deadline - time.monotonic()
        if remaining < _TIMED_RECV_MIN:
            if remaining > 0 and not self.stream.pending():
                self._read_poll.poll(math.ceil(remaining * 1000))
            recv = self.stream.recv_into
        else:
            timeout = self.recv_timeout
            if timeout is None or not remaining / 2 <= timeout <= remaining - _TICK:
                timeout = min(remaining * 0.9, remaining - _TICK)
                self._set_recv_timeout(timeout)
        try:
            return self.receive(recv)
        except BlockingIOError:
            return None  # the socket's timeout, or nothing yet after poll

    def untime(self):
        """After reads with a deadline: let the stream's ``recv_wait`` wait for ever again."""
        self._set_recv_timeout(None)

    def _set_recv_timeout(self, seconds):
        try:
            self.stream.set_recv_timeout(seconds)
        except OSError as exc:
            raise self.lost(exc) from exc
        self.recv_timeout = seconds

    def wait_readable(self, deadline):
        """Wait until the stream has something to read (or is shut down), or ``CallTimeoutError`` at ``deadline``."""
        if not self.stream.pending():
            wait_ready(self._read_poll, deadline, f'waiting for {self.peer}')
