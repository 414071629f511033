"""The interactive console of ``Hub.mainloop``: Python lines fed in as bytes, run one by one.

It is fed raw bytes by the hub's loop (a reactor on standard input), so
that the loop can serve, and be stopped from another thread, meanwhile:
Python's buffered ``sys.stdin`` cannot be waited on that way.
"""

import code
import codecs
import fcntl
import os
import stat
import sys

__all__ = ['Console', 'CHUNK', 'console_fd']

CHUNK = 65536


def console_fd():
    """Standard input's descriptor if a console can read it, else None.

    There is no console to read when standard input is closed or no file;
    when it is open for writing only (``nohup`` puts /dev/null there that
    way); when it is the null device, the input of a background job of a
    script or of a service, which has nothing to say: its end of file does
    not mean "stop" as a script's does; and when it is a terminal whose
    foreground is another process group, a shell's background job, which
    reading would stop (SIGTTIN).
    """
    try:
        fd = sys.stdin.fileno()
        info = os.fstat(fd)
        access = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except (AttributeError, ValueError, OSError):
        return None
    if access == os.O_WRONLY:
        return None
    if stat.S_ISCHR(info.st_mode) and (_is_null(info) or _in_background(fd)):
        return None
    return fd


def _is_null(info):
    try:
        return info.st_rdev == os.stat(os.devnull).st_rdev
    except OSError:
        return False  # no /dev/null here (a bare chroot, say)


def _in_background(fd):
    try:
        return os.tcgetpgrp(fd) != os.getpgrp()
    except OSError:
        return False  # not this process's controlling terminal: reading it cannot stop the process


class Console:
    """Runs each complete line fed to it in ``namespace``, as Python's prompt would.

    Statements may span lines; expression values are printed to stdout and
    exceptions' tracebacks to stderr, and the console goes on.  ``prompt``
    writes a prompt when the input is a terminal.
    """

    def __init__(self, namespace, fd, should_stop):
        self._console = code.InteractiveConsole(namespace)
        self._interactive = os.isatty(fd)
        self._decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
        self._should_stop = should_stop
        self._pending = ''
        self._more = False

    def prompt(self):
        """Show the prompt, on a terminal."""
        if self._interactive:
            _write('... ' if self._more else '>>> ')

    def feed(self, data):
        """Run the lines ``data`` completes; ``b''`` means end of input. False once it should stop."""
        if not data:
            tail = self._pending + self._decoder.decode(b'', final=True)
            self._pending = ''
            if tail:
                self._more = self._console.push(tail)
            if self._more:
                self._console.push('')
            return False
        self._pending += self._decoder.decode(data)
        while '\n' in self._pending:
            line, self._pending = self._pending.split('\n', 1)
            self._more = self._console.push(line)
            # Lines already read must not run once the hub has been shut down.
            if self._should_stop():
                return False
            if '\n' in self._pending:
                continue
            self.prompt()
        return True

    def interrupted(self):
        """Ctrl-C: end the line on a terminal."""
        if self._interactive:
            _write('\n')


def _write(text):
    sys.stdout.write(text)
    sys.stdout.flush()
