"""The stdio transport: DOPY over the standard input and output of a command (rsh, ssh, anything).

``remote(command, key)`` runs ``command`` through the shell and talks to
the hub it serves over the child's stdin and stdout; the child's stderr is
ours.  ``makeServer()`` serves this process's hub over its own stdin and
stdout, and ``wait()`` blocks until that input ends::

    p = dopy.rsh.remote('ssh somehost dopyserver --stdio', 'test')

While this process serves over stdio, its file descriptor 1 points at
stderr, so that a stray ``print()`` cannot corrupt the stream, and its
descriptor 0 at ``/dev/null``; both are given back when the connection
ends.  Reference strings look like ``rsh:KEY:COMMAND``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from typing import TYPE_CHECKING

from .channel import translate_os_error
from .connection import Connection
from .errors import ConnectionClosedError
from .hub import getHub, register_scheme
from .proxy import RemoteObject
from .streams import PipeStream

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ['remote', 'makeServer', 'wait', 'StdioServer', 'CHILD_EXIT_TIMEOUT']

log = logging.getLogger('dopy.rsh')

# How long closing waits for a child to leave after its input ends, before
# it is terminated, and then killed.
CHILD_EXIT_TIMEOUT = 5.0

_server = None
_server_lock = threading.Lock()


def remote(command: str, key: str, *, timeout: float | None = None, hub: Hub | None = None) -> RemoteObject:
    """A proxy for the object ``key`` of the hub served by ``command``'s stdin and stdout.

    Closing the proxy (or shutting the hub down) ends the child's input and
    waits for it to exit; a child that dies makes calls fail with a
    ``CommunicationError``, and the next call starts the command again.
    """
    if not isinstance(command, str) or not command.strip():
        raise TypeError(f'command must be a non-empty str, not {command!r}')
    if not isinstance(key, str) or not key:
        raise TypeError(f'key must be a non-empty str, not {key!r}')
    if timeout is not None and not timeout > 0:
        raise ValueError(f'timeout must be None or a positive number of seconds, not {timeout!r}')
    proxy = _proxy(hub if hub is not None else getHub(), command, key, timeout)
    proxy._dopy_link.get()
    return proxy


def _proxy(hub, command, key, timeout):
    def connect():
        if hub.closed:
            raise ConnectionClosedError('the hub of this proxy has been shut down')
        try:
            child = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, bufsize=0)
        except OSError as exc:
            raise translate_os_error(exc, f'cannot run {command!r}') from exc
        # The stream owns descriptors of its own, so that the pipe objects
        # can be closed now and never close a descriptor number twice.
        read_fd, write_fd = os.dup(child.stdout.fileno()), os.dup(child.stdin.fileno())
        child.stdout.close()
        child.stdin.close()
        stream = PipeStream(read_fd, write_fd, on_close=lambda: _reap(child, command))
        connection = Connection(stream, hub, f'rsh {command!r} (pid {child.pid})',
                                close_when_unused=True)
        try:
            hub._add_connection(connection)
        except ConnectionClosedError:
            connection.close()
            raise
        return connection

    return RemoteObject(f'rsh:{key}:{command}', key, connect, timeout)


def _reap(child, command):
    for step in (None, child.terminate, child.kill):
        if step is not None:
            step()
        try:
            child.wait(CHILD_EXIT_TIMEOUT)
            break
        except subprocess.TimeoutExpired:
            log.warning('%r did not exit after its input ended; %s', command,
                        'terminating it' if step is None else 'killing it')
    if child.returncode not in (0, None):
        log.info('%r exited with status %s', command, child.returncode)


class StdioServer:
    """This process's hub served over its own stdin and stdout; see ``makeServer``."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        sys.stdout.flush()
        # The protocol gets descriptors of its own; 0 and 1 are pointed
        # away from it, so that nothing else reads or writes the stream.
        self._saved = os.dup(0), os.dup(1)
        read_fd, write_fd = os.dup(0), os.dup(1)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.dup2(2, 1)
        self.ended = threading.Event()
        stream = PipeStream(read_fd, write_fd, on_close=self._give_back)
        self.connection = Connection(stream, hub, 'stdio', on_close=lambda _c: self.ended.set())
        hub._add_connection(self.connection)
        self._thread = None
        if hub.threaded:
            self._thread = threading.Thread(target=self.connection.serve, name='dopy-stdio', daemon=True)
            self._thread.start()

    def _give_back(self):
        sys.stdout.flush()
        saved_in, saved_out = self._saved
        os.dup2(saved_in, 0)
        os.dup2(saved_out, 1)
        os.close(saved_in)
        os.close(saved_out)

    def wait(self) -> None:
        """Serve until the input ends (in THRD_NONE, by running the hub's loop)."""
        if self.hub.threaded:
            self.ended.wait()
            self._thread.join()
        else:
            self.hub.loop.pump_until(self.ended.is_set, None)

    def close(self) -> None:
        """End the connection now."""
        self.connection.close()


def makeServer(hub: Hub | None = None) -> StdioServer:
    """Serve ``hub`` (the process's hub by default) over this process's stdin and stdout."""
    global _server
    with _server_lock:
        if _server is not None and not _server.ended.is_set():
            raise RuntimeError('this process already serves over its stdin and stdout')
        _server = StdioServer(hub if hub is not None else getHub())
        return _server


def wait() -> None:
    """Block until the input of the server ``makeServer`` started ends."""
    server = _server
    if server is None:
        raise RuntimeError('dopy.rsh.makeServer() was not called')
    server.wait()


def _from_reference(hub, rest, timeout, connect):
    key, sep, command = rest.partition(':')
    if not (sep and key and command):
        raise ValueError(f'not an rsh reference: "rsh:{rest}" (expected rsh:KEY:COMMAND)')
    proxy = _proxy(hub, command, key, timeout)
    if connect:
        proxy._dopy_link.get()
    return proxy


register_scheme('rsh', _from_reference)
