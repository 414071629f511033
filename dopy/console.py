"""The interactive console of ``Hub.mainloop``: Python lines read from a file descriptor.

It reads raw bytes with ``poll``, so that a second descriptor (the hub's
wake-up pipe) can end it from another thread; Python's buffered
``sys.stdin`` cannot be waited on that way.
"""

import code
import codecs
import os
import select
import sys

__all__ = ['run']

_CHUNK = 65536


def run(namespace, fd, wake_fd):
    """Execute the lines read from ``fd`` in ``namespace`` until end of input.

    Returns at end of input, when ``wake_fd`` becomes readable, or on
    KeyboardInterrupt.  Statements may span lines, as at Python's prompt;
    expression values are printed to stdout and exceptions' tracebacks to
    stderr, and the console goes on.
    """
    console = code.InteractiveConsole(namespace)
    interactive = os.isatty(fd)
    decoder = codecs.getincrementaldecoder('utf-8')(errors='replace')
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(wake_fd, select.POLLIN)
    # Lines already read must not run once the hub has been shut down.
    wake_poller = select.poll()
    wake_poller.register(wake_fd, select.POLLIN)
    pending = ''
    more = False
    try:
        while True:
            if interactive:
                _prompt('... ' if more else '>>> ')
            while '\n' not in pending:
                ready = {ready_fd for ready_fd, _ in poller.poll()}
                if wake_fd in ready:
                    return
                chunk = os.read(fd, _CHUNK)
                if not chunk:
                    tail = pending + decoder.decode(b'', final=True)
                    if tail:
                        more = console.push(tail)
                    if more:
                        console.push('')
                    return
                pending += decoder.decode(chunk)
            line, pending = pending.split('\n', 1)
            more = console.push(line)
            if wake_poller.poll(0):
                return
    except KeyboardInterrupt:
        if interactive:
            _prompt('\n')


def _prompt(text):
    sys.stdout.write(text)
    sys.stdout.flush()
