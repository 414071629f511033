"""The byte streams a connection runs over: a socket, a TLS socket, or a pair of pipes.

A stream's ``recv_into``, ``send(data, send_flags)`` and ``sendmsg`` never
block and raise ``OSError`` (``BlockingIOError`` when they would block);
``dopy.channel`` translates the rest.  ``send`` takes the stream's own
``send_flags``: a socket's ``send`` is the socket's, given
``MSG_DONTWAIT``, with no Python frame on every send.  ``recv_wait``, when
not None, is a ``recv_into`` that sleeps until data comes: one system call
instead of a ``poll`` and a read.  ``send_wait``, when not None, is a
``sendall`` that sleeps until all of its data has gone, for a sender with no
deadline: one system call, and no Python frame.  A stream that has a
``recv_wait`` has
``set_recv_timeout(seconds)`` too, which bounds that sleep, so that a reader
with a deadline can use it as well.  ``shutdown()`` wakes
any thread waiting to read and may be called from any thread;
``close()`` releases the descriptors and is called once no thread can be
using them.  ``wake_fd``, when not None, is a descriptor to wait on beside
``read_fd``: it becomes readable at ``shutdown()`` for streams whose
reading end cannot be woken otherwise (a pipe we do not own).
``pending()`` counts bytes a stream holds that its descriptor does not
show (decrypted TLS data): a reader must not wait while there are any.
``peer_closed()`` is true once the peer has hung up, found without reading
anything: for a socket, plain or TLS, by ``poll`` where it reports a
hang-up (``POLLRDHUP``, Linux): one system call, lighter than asking
for the TCP state.
``local_ip()`` is the IP address of this end, or None (pipes have none).
"""

import functools
import os
import select
import socket
import ssl
import struct

__all__ = ['SocketStream', 'EarlyStream', 'TLSStream', 'PipeStream']

# Plain ints: or-ing the enum flags on every call costs more than the system call.
_DONTWAIT = int(socket.MSG_DONTWAIT)
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
# struct timeval, as SO_RCVTIMEO takes it.
_TIMEVAL = struct.Struct('@ll')
# Set by the peer's FIN; an RST sets POLLHUP and POLLERR, which poll always reports.
_POLLRDHUP = getattr(select, 'POLLRDHUP', None) if hasattr(select, 'poll') else None


def _hang_up_check(fd):
    """A ``peer_closed`` for socket ``fd``, by poll (Linux): a descriptor closed meanwhile answers POLLNVAL, true as well."""
    poll = _hang_up_poller(fd).poll

    def peer_closed():
        try:
            return bool(poll(0))
        except RuntimeError:
            # A poll object serves one thread at a time, and another checks right now.
            return bool(_hang_up_poller(fd).poll(0))
    return peer_closed


def _hang_up_poller(fd):
    poller = select.poll()
    poller.register(fd, _POLLRDHUP)
    return poller


def _local_ip(sock):
    try:
        return sock.getsockname()[0]
    except OSError:
        return None  # closed meanwhile: nothing more will go out on it


class SocketStream:
    """A connected stream socket."""

    wake_fd = None
    send_flags = _DONTWAIT

    def __init__(self, sock):
        # A blocking socket, so that recv_wait and send_wait can sleep in the
        # kernel; every other operation passes MSG_DONTWAIT and never blocks.
        if sock.gettimeout() is not None:
            sock.settimeout(None)
        self.sock = sock
        self.read_fd = self.write_fd = sock.fileno()
        self.recv_wait = sock.recv_into
        # A partial rather than a method: no Python frame on every read.
        self.recv_into = functools.partial(sock.recv_into, flags=_DONTWAIT)
        # The socket's own send (see send_flags): no Python frame on every send.
        self.send = sock.send
        self.send_wait = sock.sendall

    def sendmsg(self, views):
        return self.sock.sendmsg(views, (), _DONTWAIT)

    def set_recv_timeout(self, seconds):
        """Make ``recv_wait`` give up after ``seconds`` (at least a millisecond), raising ``BlockingIOError``; None: wait for ever.

        The kernel keeps the timeout in whole clock ticks, rounded up.
        """
        if seconds is None:
            whole = micro = 0
        else:
            whole = int(seconds)
            micro = max(int((seconds - whole) * 1e6), 0 if whole else 1000)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(whole, micro))

    def pending(self):
        return 0

    def local_ip(self):
        """The IP address this end of the connection has (found when asked: it costs a system call)."""
        return _local_ip(self.sock)

    @functools.cached_property
    def peer_closed(self):
        """The hang-up check, made on first use: only a connection that proxies call over needs one."""
        return self._peek_closed if _POLLRDHUP is None else _hang_up_check(self.read_fd)

    def _peek_closed(self):
        # Where poll cannot tell: a peek sees the end of the stream, if nothing is unread before it.
        try:
            return not self.sock.recv(1, _PEEK)
        except BlockingIOError:
            return False

    def shutdown(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone: nothing left to wake

    def close(self):
        self.sock.close()


class EarlyStream(SocketStream):
    """A client's socket whose frames went out before the server's greeting came: the greeting is read first.

    ``greeting`` is the greeting expected, as bytes.  Reading takes no more
    bytes than it has, so that no frame is taken for it; once it has come,
    frames pass.  ``early`` is the transport's side of it:

    - ``early.handshake()``: a started ``dopy.auth.ClientHandshake``, fed
      the bytes that differ from ``greeting`` for the error they make
      (``AuthenticationError`` or ``ProtocolError``; a refusal's message is
      read in full first), which the read raises;
    - ``early.failed()``: called before that, or when the server closes
      before it has greeted;
    - ``early.wait_for_greeting(sock)``: how ``recv_wait``, a reader with
      no deadline of its own, waits for the greeting: until the socket is
      readable, or ``CallTimeoutError`` at the connect deadline.
    """

    def __init__(self, sock, greeting, early):
        super().__init__(sock)
        self._expected = greeting
        self._seen = b''
        self._early = early
        self._handshake = None
        self._greeted = False
        self.recv_into = self._recv_into_greeted
        self.recv_wait = self._recv_wait_greeted

    def _recv_into_greeted(self, buffer):
        if not self._greeted:
            self._greet(_DONTWAIT)
        return self.sock.recv_into(buffer, 0, _DONTWAIT)

    def _recv_wait_greeted(self, buffer):
        if not self._greeted:
            try:
                # Usually here already: the server greets as it accepts.
                self._greet(_DONTWAIT)
            except BlockingIOError:
                self._await_greeting()
        return self.sock.recv_into(buffer)

    def _await_greeting(self):
        while not self._greeted:
            self._early.wait_for_greeting(self.sock)
            try:
                self._greet(_DONTWAIT)
            except BlockingIOError:
                pass

    def _greet(self, flags):
        while True:
            handshake = self._handshake
            if handshake is None:
                wanted = len(self._expected) - len(self._seen)
            else:
                wanted = handshake.wanted
            data = self.sock.recv(wanted, flags)
            if not data:
                self._early.failed()
                break  # the read that follows finds the end of the stream
            if handshake is None:
                seen = self._seen + data
                if seen == self._expected:
                    break
                if self._expected.startswith(seen):
                    self._seen = seen
                    continue
                handshake = self._handshake = self._early.handshake()
                data = seen
            try:
                handshake.feed(data)
            except Exception:
                self._early.failed()
                raise
            if handshake.done:
                break
        self._greeted = True
        self.recv_wait = self.sock.recv_into


def _not_known():
    # TLS cannot peek: where poll cannot tell, a hang-up is found by the next read.
    return False


class TLSStream:
    """A connected ``ssl.SSLSocket``, its handshake done."""

    wake_fd = None
    recv_wait = None
    send_wait = None
    send_flags = 0

    def __init__(self, sock):
        sock.setblocking(False)
        self.sock = sock
        self.read_fd = self.write_fd = sock.fileno()

    def recv_into(self, buffer):
        try:
            return self.sock.recv_into(buffer)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None
        except ssl.SSLZeroReturnError:
            return 0

    def send(self, data, flags=0):
        try:
            return self.sock.send(data)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise BlockingIOError from None

    def sendmsg(self, views):
        # TLS has no scatter-gather: one segment a call; the caller sends the rest.
        return self.send(views[0])

    def pending(self):
        return self.sock.pending()

    @functools.cached_property
    def peer_closed(self):
        """The hang-up check, made on first use: only a connection that proxies call over needs one."""
        return _not_known if _POLLRDHUP is None else _hang_up_check(self.read_fd)

    def local_ip(self):
        """The IP address this end of the connection has."""
        return _local_ip(self.sock)

    def shutdown(self):
        try:
            # The plain socket's shutdown: SSLSocket's own would drop its SSL
            # object under a thread that may still be reading.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already gone: nothing left to wake

    def close(self):
        self.sock.close()


class PipeStream:
    """Reading from one pipe and writing to another: a child's stdio, or our own.

    ``on_close`` runs after the descriptors are closed (to reap a child, or
    to give this process its stdin and stdout back).
    """

    recv_wait = None
    send_wait = None
    send_flags = 0

    def __init__(self, read_fd, write_fd, on_close=None):
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self.read_fd = read_fd
        self.write_fd = write_fd
        self._on_close = on_close
        self.wake_fd, self._wake_w = os.pipe()
        self._closed = False

    def recv_into(self, buffer):
        return os.readv(self.read_fd, [buffer])

    def send(self, data, flags=0):
        return os.write(self.write_fd, data)

    def sendmsg(self, views):
        return os.writev(self.write_fd, views)

    def pending(self):
        return 0

    def local_ip(self):
        return None

    def peer_closed(self):
        """True if the writer has gone and nothing is left to read."""
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        events = poller.poll(0)
        return bool(events) and not events[0][1] & select.POLLIN

    def shutdown(self):
        try:
            os.write(self._wake_w, b'x')
        except OSError:
            pass  # closed already, or full: either way the reader is woken

    def close(self):
        if self._closed:
            return
        self._closed = True
        # Closing our writing end is the end of input for the peer.
        for fd in (self.write_fd, self.read_fd, self.wake_fd, self._wake_w):
            os.close(fd)
        if self._on_close is not None:
            self._on_close()
