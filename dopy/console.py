"""The interactive console of ``Hub.mainloop``: Python lines fed in as bytes, run one by one.

It is fed raw bytes by the hub's loop (a reactor on standard input), so
that the loop can serve, and be stopped from another thread, meanwhile:
Python's buffered ``sys.stdin`` cannot be waited on that way.
"""

import code
import codecs
import os
import sys

__all__ = ['Console', 'CHUNK']

CHUNK = 65536


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
