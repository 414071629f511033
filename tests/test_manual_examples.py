"""Every example of Manual.html and README.html prints, today, the output the page shows under it.

Each example runs as a real process, with this interpreter, in a fresh
directory that holds the clone's top-level entries (so files it writes stay
there), with a ``python3`` on the PATH that is this interpreter.

How the pages are read: a ``<pre><code>`` is a Python script, and a
``<pre class="out">`` is the output of the script before it (prose may come
between). A script followed by no output is not run. ``data-test`` on a
``<pre>`` says more:

``shell``              on a script: bash commands, not Python.
``stdin``              on a script: lines piped into the standard input of
                       the script before it.
``file NAME``          on a script: not run, but saved as NAME in the
                       directory of the next example, which uses it.
``server``             on a script: it runs in the background, and the next
                       script is its client, run once the server listens; on
                       an output, that output is the server's.
``transcript``         on an output: a terminal session, run as it stands:
                       each ``$ `` line a bash command, then what it printed.
``transcript server``  the same, as the server of the next transcript.
``skip: REASON``       on an output: not run, for the reason given.

Port 9600, which every example uses, is replaced by a free port, in the
script and in the output shown; dopyserver and dopyclient, which take 9600
when they are given no port, are given the free one.  Standard output and
standard error are compared as one stream, as a terminal shows them.  A
server's input ends once its client is done and it has printed as many
lines as the page shows for it.
"""

import concurrent.futures
import html
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import unittest

from tests.support import ROOT, TIMEOUT, Case, child_env, eventually

PAGES = ('Manual.html', 'README.html')
PORT = '9600'
# An example's own bound, longer than any example takes, however loaded the machine.
EXAMPLE_TIMEOUT = 3 * TIMEOUT

# Differences between the output shown and the output printed that are not
# drift, each replaced by the same text in both before they are compared.
NORMALISE = [
    # The ports the system picks (a client's, a server's on port 0) differ
    # from run to run; the examples' own port, 9600, is kept.
    (re.compile(r'(127\.0\.0\.1|localhost|\]):(?!9600\b)\d+'), r'\1:PORT'),
    # Where the script and DOPY live depends on the machine; the line numbers
    # in tracebacks move with any edit of the file.
    (re.compile(r'File "/[^"]*", line \d+'), 'File "PATH", line N'),
    (re.compile(r'File "(<\w+>)", line \d+'), r'File "\1", line N'),
    # Temporary files are named at random, in a folder that TMPDIR may move.
    (re.compile(rf'({re.escape(tempfile.gettempdir())}|/tmp)/tmp\w+'), '/tmp/tmpXXXXXXXX'),
    # Times an example measures and prints in tenths of a second, such as
    # "came back after 0.5 s", vary with the machine's load.
    (re.compile(r'\b(after )\d+\.\d( s)\b'), r'\1T\2'),
    (re.compile(r'\b\d+\.\d( s after)\b'), r'T\1'),
    # OpenSSL errors name the line of CPython's _ssl.c, which differs by version.
    (re.compile(r'\(_ssl\.c:\d+\)'), '(_ssl.c:N)'),
    # A via: reference numbers its connection among those of the process,
    # where a server's accept and a client's connect may come in either order.
    (re.compile(r'\b(via:\S+?/)\d+'), r'\1N'),
    # Object addresses differ from run to run.
    (re.compile(r'0x[0-9a-fA-F]+'), '0x...'),
    # Python 3.11 and later mark the failing expression under a traceback's
    # source line with ^ and ~, differently in each version; 3.10 does not.
    (re.compile(r'^[ \t]*[~^]+[~^ \t]*\n', re.MULTILINE), ''),
]


def normalise(text, port):
    text = re.sub(rf'\b{port}\b', PORT, text)
    for pattern, replacement in NORMALISE:
        text = pattern.sub(replacement, text)
    return text.rstrip('\n')


# ---------------------------------------------------------------- the pages

class Pre:
    def __init__(self, page, line, section, attrs, text):
        self.page, self.line, self.section, self.text = page, line, section, text
        self.is_output = 'class="out"' in attrs
        found = re.search(r'data-test="([^"]*)"', attrs)
        self.test = html.unescape(found.group(1)) if found else ''

    def __repr__(self):
        return f'{self.page} line {self.line}'


class Example:
    """A script (or transcript) to run, what it is given, and what the page says it prints."""

    def __init__(self, script, shell=False):
        self.script = script
        self.shell = shell
        self.stdin = ''
        self.output = None
        self.files = {}
        self.server = None          # an Example run in the background first
        self.skip = None


def pres(page):
    with open(os.path.join(ROOT, page), encoding='utf-8') as f:
        source = f.read()
    line, section, done = 1, 'top', 0
    for found in re.finditer(r'<pre([^>]*)>(.*?)</pre>', source, re.DOTALL):
        before = source[done:found.start()]
        line += before.count('\n')
        section = (re.findall(r'id="([\w-]+)"', before) or [section])[-1]
        text = html.unescape(re.sub(r'<[^>]+>', '', found.group(2))).strip('\n')
        yield Pre(page, line, section, found.group(1), text)
        line += found.group(0).count('\n')
        done = found.end()


def examples(page):
    """The page's examples that show output, in order; a ValueError for a page they cannot be read from."""
    found = []
    script = None           # the last script, until an output is given to it
    server = None           # a server waiting for its client
    files = {}
    for pre in pres(page):
        words = pre.test.split()
        if pre.test.startswith('skip:'):
            if not pre.is_output or not pre.test[len('skip:'):].strip():
                raise ValueError(f'{pre}: a skip goes on an output, with its reason')
            example = Example(pre)
            example.skip = pre.test[len('skip:'):].strip()
            found.append(example)
            script = None
        elif 'transcript' in words:
            example = Example(pre, shell=True)
            example.output = pre.text
            if 'server' in words:
                server = example
            else:
                example.server, server = server, None
                found.append(example)
            script = None
        elif pre.is_output:
            if words == ['server']:
                owner = server or (script and script.server)
                if owner is None:
                    raise ValueError(f'{pre}: the output of a server with no server before it')
                owner.output = pre.text
            elif script is not None:
                script.output = pre.text
                found.append(script)
                script = None
            else:
                raise ValueError(f'{pre}: an output with no script before it')
        elif words == ['stdin']:
            if script is None:
                raise ValueError(f'{pre}: standard input with no script before it')
            script.stdin = pre.text + '\n'
        elif words[:1] == ['file'] and len(words) == 2:
            files[words[1]] = pre.text
        elif set(words) <= {'shell', 'server'}:
            script = Example(pre, shell='shell' in words)
            script.files, files = files, {}
            if 'server' in words:
                server, script = script, None
            elif server is not None:
                script.server, server = server, None
        else:
            raise ValueError(f'{pre}: unknown data-test="{pre.test}"')
    return found


# ---------------------------------------------------------------- running them

def free_port():
    """A port no one listens on, below those the system hands out for port 0.

    The port is free when the probe closes, and the example binds it a
    moment later.  Only a process that binds this very port in between can
    take it: the system does not pick it for port 0 or an outgoing
    connection, and a clash fails the example loudly (address in use).
    """
    try:
        with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
            lowest = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        lowest = 32768
    for port in random.sample(range(max(lowest - 10000, 1024), lowest), 100):
        with socket.socket() as probe:
            try:
                probe.bind(('127.0.0.1', port))
            except OSError:
                continue
            if not listening(port):
                return port
    raise AssertionError('no free port below the ephemeral range')


def listening(port):
    """Whether something listens on ``port``, asked of the system rather than by connecting, which a server logs."""
    for table in ('/proc/net/tcp', '/proc/net/tcp6'):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            if state == '0A' and int(local.rsplit(':', 1)[1], 16) == port:
                return True
    return False


def on_port(command, port):
    """A shell command with ``port`` where dopyserver or dopyclient would take their default, 9600."""
    if re.search(r'\bdopyserver\b', command) and not re.search(r'--port|--stdio', command):
        command += f' --port {port}'
    if re.search(r'\bdopyclient\b', command) and not re.search(r'--stdio|\S:\d', command):
        command = re.sub(r'\bdopyclient\b', f'dopyclient localhost:{port}', command, count=1)
    return command


def transcript_script(text, port):
    """A bash script that prints each ``$ `` command of a transcript, then runs it, keeping $? for the next."""
    lines = ['status=0']
    for line in text.splitlines():
        if line.startswith('$ '):
            lines += [f'echo {shlex.quote(line)}', '(exit $status)', on_port(line[2:], port), 'status=$?']
    return '\n'.join(lines) + '\n'


class Run:
    """One example's process, its output collected as it comes."""

    def __init__(self, example, directory, port):
        self.lines = []
        self.more = threading.Condition()
        text = re.sub(rf'\b{PORT}\b', str(port), example.script.text)
        if example.script.test.startswith('transcript'):
            command = ['bash', '-c', transcript_script(text, port)]
        elif example.shell:
            command = ['bash', '-c', '\n'.join(on_port(line, port) for line in text.splitlines())]
        else:
            path = os.path.join(directory, f'example_{example.script.line}.py')
            with open(path, 'w') as f:
                f.write(text + '\n')
            # -u, as a terminal would show it: each line as it is printed, in
            # order with standard error.  Unlike PYTHONUNBUFFERED, the flag is
            # not inherited by the example's own children, whose pipes buffer
            # as they would for a user.
            command = [sys.executable, '-u', path]
        env = child_env()
        if not example.shell:
            del env['PYTHONUNBUFFERED']
        env['PATH'] = os.path.join(directory, '.bin') + os.pathsep + env['PATH']
        self.proc = subprocess.Popen(command, cwd=directory, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        stdin = re.sub(rf'\b{PORT}\b', str(port), example.stdin)
        if stdin:
            self.proc.stdin.write(stdin)
            self.proc.stdin.flush()

    def _read(self):
        with self.proc.stdout:
            for line in self.proc.stdout:
                with self.more:
                    self.lines.append(line)
                    self.more.notify_all()
        with self.more:
            self.lines.append(None)
            self.more.notify_all()

    def wait_for_lines(self, count, timeout):
        """Bounded: until ``count`` lines have come, or the output ends."""
        with self.more:
            self.more.wait_for(lambda: len(self.lines) >= count or None in self.lines, timeout)

    def finish(self, timeout):
        """End of input, then the output until the process ends (killed past ``timeout``)."""
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()
            self.lines.append(f'\n[killed after {timeout} s]\n')
        self.reader.join(TIMEOUT)
        return ''.join(line for line in self.lines if line is not None)


def run(example):
    """Run ``example`` (and its server); return (shown, printed) pairs, normalised, server first."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix='dopy-example-') as directory:
        for entry in os.listdir(ROOT):
            if not entry.startswith('.'):
                os.symlink(os.path.join(ROOT, entry), os.path.join(directory, entry))
        os.mkdir(os.path.join(directory, '.bin'))
        for name in ('python3', 'python'):
            os.symlink(sys.executable, os.path.join(directory, '.bin', name))
        for name, text in example.files.items():
            with open(os.path.join(directory, name), 'w') as f:
                f.write(text + '\n')
        server = None if example.server is None else Run(example.server, directory, port)
        try:
            if server is not None:
                eventually(lambda: listening(port) or server.proc.poll() is not None,
                           'a server listening or ended', EXAMPLE_TIMEOUT)
                if not listening(port):
                    raise AssertionError(f'{example.server.script} ended without serving: '
                                         f'{server.finish(TIMEOUT)}')
            pairs = [(example.output, Run(example, directory, port).finish(EXAMPLE_TIMEOUT))]
            if server is not None and example.server.output is not None:
                server.wait_for_lines(len(example.server.output.splitlines()), TIMEOUT)
        finally:
            if server is not None:
                printed = server.finish(TIMEOUT)
        if server is not None and example.server.output is not None:
            pairs.insert(0, (example.server.output, printed))
        return [(normalise(shown, port), normalise(printed, port)) for shown, printed in pairs]


# ---------------------------------------------------------------- the tests

ALL = [example for page in PAGES for example in examples(page)]
_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix='example')
_runs = {}


def result(index):
    """The outcome of example ``index``, starting the one after it meanwhile: two run at a time."""
    for i in (index, index + 1):
        if i < len(ALL) and i not in _runs and ALL[i].skip is None:
            _runs[i] = _pool.submit(run, ALL[i])
    return _runs[index].result(EXAMPLE_TIMEOUT * 3)


class ExamplesPrintWhatThePagesShow(Case):
    maxDiff = None

    def test_every_output_shown_is_compared_or_skipped_for_a_reason(self):
        shown = sum(pre.is_output for page in PAGES for pre in pres(page))
        compared = sum(1 + (example.server is not None and example.server.output is not None)
                       for example in ALL if example.skip is None)
        skipped = [example for example in ALL if example.skip is not None]
        self.assertEqual(compared + len(skipped), shown)
        for example in skipped:
            self.assertTrue(example.skip, f'{example.script} is skipped without a reason')
        # Each one a case that cannot run unattended: a peer on another
        # machine, a shell's job control, and a transcript shown again where it runs.
        self.assertLessEqual(len(skipped), 3, f'skipped: {[str(e.script) for e in skipped]}')


def _test(index):
    def test(self):
        example = ALL[index]
        if example.skip is not None:
            self.skipTest(example.skip)
        for shown, printed in result(index):
            self.assertEqual(printed, shown, f'{example.script} prints something else than it shows')
    return test


for _index, _example in enumerate(ALL):
    # Named after the page and the section (the last id before it), which
    # edits elsewhere do not move, and numbered within the section.
    _name = f'test_{_example.script.page[:-5].lower()}_{_example.script.section}'.replace('-', '_')
    _number = 1
    while hasattr(ExamplesPrintWhatThePagesShow, f'{_name}_{_number}'):
        _number += 1
    setattr(ExamplesPrintWhatThePagesShow, f'{_name}_{_number}', _test(_index))


if __name__ == '__main__':
    unittest.main()
