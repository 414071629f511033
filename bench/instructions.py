"""Instructions per call: what one more echo(42) costs each side, counted by valgrind.

Timings on a shared machine move by tens of percent from run to run; the
number of instructions a process executes for the same work moves by about
2% (less with hash randomisation fixed, as here).  For one system and one
side (server or client), that side runs under ``valgrind --tool=callgrind``
twice, once for N and once for 2N sequential echo(42) calls on one
connection after a warm-up, while the other side runs natively; the figure
is (Ir(2N) - Ir(N)) / N, the instructions that one more call costs that
side, every thread of its process included.  Start-up, connecting and
shutting down cancel out.  This is the method of the project's
``callcost.py``, applied to the benchmark's own systems.

Under valgrind a process runs some 50 times slower, so a thread that wakes
on a timer runs some 50 times more often per call than it would natively,
and the figure overstates its share.

The sides run as ``python3 bench/instructions.py serve SYSTEM`` (prints its
port, stops at a line on its standard input) and ``python3
bench/instructions.py call SYSTEM PORT WARM N``.
"""

import os
import select
import shutil
import subprocess
import sys
import tempfile

if __name__ == '__main__':
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import systems  # noqa: E402  (run as a script, it needs the path above for dopy)

# Each side of a run under valgrind starts Python in tens of seconds at worst.
_START_TIMEOUT = 300.0
_RUN_TIMEOUT = 1800.0
# The systems counted: the floor to compare with, and DOPY.  The others
# would count alike, but each count costs four runs under valgrind.
COUNTED = ('floor', 'dopy')
_VALGRIND = ['valgrind', '--tool=callgrind', '--dump-instr=no', '--compress-strings=no']


class CountError(Exception):
    """A count that could not be made; ``detail`` holds what the processes said."""

    def __init__(self, message, detail=''):
        super().__init__(message)
        self.detail = detail


def unavailable():
    """None if valgrind can count, else why not."""
    if not shutil.which('valgrind'):
        return 'valgrind is not installed (apt-get install valgrind), so instructions were not counted'
    return None


def count(system, calls, warm):
    """``{'server_instructions': ..., 'client_instructions': ..., 'total_instructions': ...}`` per call."""
    env = dict(os.environ, PYTHONHASHSEED='0')
    with tempfile.TemporaryDirectory(prefix='dopy-bench-') as workdir:
        figures = {}
        for side in ('server', 'client'):
            one = _instructions(system, side, calls, warm, workdir, env)
            two = _instructions(system, side, 2 * calls, warm, workdir, env)
            figures[f'{side}_instructions'] = (two - one) / calls
    figures['total_instructions'] = figures['server_instructions'] + figures['client_instructions']
    return figures


def _instructions(system, side, calls, warm, workdir, env):
    """Instructions that one run of ``side`` executed, every thread summed."""
    out = os.path.join(workdir, f'{side}-{calls}.callgrind')
    counted = [*_VALGRIND, f'--callgrind-out-file={out}']
    me = os.path.abspath(__file__)
    server_cmd = [*(counted if side == 'server' else []), sys.executable, me, 'serve', system]
    server = subprocess.Popen(server_cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env)
    try:
        ready, _, _ = select.select([server.stdout], [], [], _START_TIMEOUT)
        port = server.stdout.readline().strip().decode() if ready else ''
        if not port:
            raise CountError(f'the {system} server did not start', _stderr(server))
        client_cmd = [*(counted if side == 'client' else []), sys.executable, me, 'call', system,
                      port, str(warm), str(calls)]
        client = subprocess.run(client_cmd, env=env, capture_output=True, text=True,
                                timeout=_RUN_TIMEOUT)
        if client.returncode:
            raise CountError(f'the {system} client failed (exit code {client.returncode})',
                             client.stderr)
        server.stdin.write(b'stop\n')
        server.stdin.flush()
        server.wait(_RUN_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise CountError(f'the {system} {side} run did not end within {exc.timeout:.0f} s') from exc
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        server.stdin.close()
        server.stdout.close()
        server.stderr.close()
    total = 0
    with open(out) as counts:
        for line in counts:
            if line.startswith(('summary:', 'totals:')):
                total = max(total, int(line.split()[1]))
    if not total:
        raise CountError(f'callgrind wrote no total for the {system} {side}')
    return total


def _stderr(process):
    process.kill()
    process.wait()
    return process.stderr.read().decode(errors='replace')


def _serve(system_name):
    port, _ = systems.SYSTEMS[system_name]().serve(systems.EchoService())
    print(port, flush=True)
    sys.stdin.readline()
    # No shutdown: its cost would cancel out anyway, and nothing is left to flush.
    os._exit(0)


def _call(system_name, port, warm, n):
    system = systems.SYSTEMS[system_name]()
    echo = system.connect(int(port)).echo
    for _ in range(int(warm) + int(n)):
        systems.expect(echo(42), 42)
    os._exit(0)


if __name__ == '__main__':
    {'serve': _serve, 'call': _call}[sys.argv[1]](*sys.argv[2:])
