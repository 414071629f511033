"""The README's demo: ``dopyserver`` and ``dopyclient`` run as two real processes.

``python3 -m dopy.demo`` starts dopyserver on a free port, runs dopyclient
against it, then ends the server's input so that it stops; it exits 0 when
the client passed and the server stopped cleanly.  Both run on this
interpreter, from this package (``python -m dopy server``/``client``), so
a virtual environment's python runs the demo without being activated.
"""

import select
import subprocess
import sys

__all__ = ['main']

_STARTUP_TIMEOUT = 20.0
_CLIENT_TIMEOUT = 60.0
_COMMAND = [sys.executable, '-m', 'dopy']


def main():
    """Run the demo; return the exit status."""
    server_cmd = [*_COMMAND, 'server', '--port', '0']
    print('$ dopyserver --port 0', flush=True)
    server = subprocess.Popen(server_cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        poller = select.poll()
        poller.register(server.stderr, select.POLLIN)
        if not poller.poll(_STARTUP_TIMEOUT * 1000):
            print(f'dopy.demo: dopyserver did not start within {_STARTUP_TIMEOUT:.0f} s', file=sys.stderr)
            return 1
        banner = server.stderr.readline().strip()
        print(banner, flush=True)
        if ' on ' not in banner:
            print('dopy.demo: dopyserver failed to start', file=sys.stderr)
            return 1
        port = banner.rsplit(':', 1)[1]
        print(f'$ dopyclient localhost:{port}', flush=True)
        client = subprocess.run([*_COMMAND, 'client', f'localhost:{port}'],
                                timeout=_CLIENT_TIMEOUT)
        server.stdin.close()
        server_status = server.wait(timeout=_STARTUP_TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    if client.returncode == 0 and server_status == 0:
        print('demo ok: the client passed, and the server stopped at the end of its input')
        return 0
    print(f'demo FAILED: dopyclient exited {client.returncode}, dopyserver {server_status}',
          file=sys.stderr)
    return 1


if __name__ == '__main__':
    sys.exit(main())
