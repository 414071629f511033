"""Throwaway Linux network namespaces for multi-host tests: hosts on one bridge, with no way out.

``unavailable()`` says why such tests cannot run here (not root, no ``ip``,
``ip netns`` not permitted), or None when they can.  ``Network(n)`` is a
context manager that builds this, and removes all of it on exit, even
after an error::

    namespace <prefix>-sw                 namespace <prefix>-hN
    bridge br0 ─ port hN ═══ veth ═══ eth0, address 10.231.0.N/24

    (one such pair for each host N = 1, 2, 3, ...)

where ``<prefix>`` is ``dopy-<pid>-<serial>``.  Every interface is made
inside the namespaces (none in the machine's own), the hosts have only
the route to their /24 and no default route, and the switch namespace has
no addresses at all: nothing sent between the hosts can leave them, and
nothing outside can reach them.  The network is IPv4 only.

Each ``Host`` runs Python in its namespace (``host.python('-c', code)``),
with ``PYTHONPATH`` set so that ``import dopy`` finds this work tree, and
can have its cable cut at the switch and put back (``cut``, ``restore``).
The processes it started are killed when the network is removed.  Every
command is bounded by ``TIMEOUT``.
"""

import functools
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys

__all__ = ['TIMEOUT', 'SUBNET', 'unavailable', 'remove_stale', 'Network', 'Host']

log = logging.getLogger('dopy.tests.netns')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 10.0
SUBNET = '10.231.0'  # hosts are SUBNET.1, SUBNET.2, ...; private, and only ever inside the namespaces
_serials = itertools.count(1)
_STALE = re.compile(r'^dopy-(\d+)-\d+-(sw|h\d+)$')


def _ip(*args, check=True):
    """Run ``ip args...``; returns its stdout; raises RuntimeError with its stderr if it fails."""
    try:
        done = subprocess.run(['ip', *args], stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f'ip {" ".join(args)} did not finish within {TIMEOUT} s') from exc
    if check and done.returncode:
        raise RuntimeError(f'ip {" ".join(args)} failed ({done.returncode}): '
                           f'{done.stderr.strip()}')
    return done.stdout


@functools.lru_cache(maxsize=None)
def unavailable():
    """Why network namespace tests cannot run here, or None if they can (cached)."""
    if not sys.platform.startswith('linux'):
        return f'network namespaces are Linux only, not {sys.platform}'
    if os.geteuid() != 0:
        return 'network namespace tests need root (ip netns add)'
    if shutil.which('ip') is None:
        return 'network namespace tests need the ip command (iproute2)'
    probe = f'dopy-{os.getpid()}-probe'
    try:
        _ip('netns', 'add', probe)
    except RuntimeError as exc:
        return f'ip netns add does not work here: {exc}'
    try:
        _ip('netns', 'exec', probe, 'true')
        _ip('-n', probe, 'link', 'add', 'name', 'br0', 'type', 'bridge')
        _ip('-n', probe, 'link', 'add', 'name', 'a', 'type', 'veth', 'peer', 'name', 'b')
    except RuntimeError as exc:
        return f'network namespaces cannot be used here: {exc}'
    finally:
        _ip('netns', 'del', probe, check=False)
    return None


def remove_stale():
    """Remove the namespaces left by test runs that died (their process is gone)."""
    for line in _ip('netns', 'list').splitlines():
        name = line.split()[0] if line.split() else ''
        match = _STALE.match(name)
        if match and not os.path.exists(f'/proc/{match.group(1)}'):
            log.info('removing the stale namespace %s', name)
            _ip('netns', 'del', name, check=False)


class Host:
    """One host of a ``Network``: its namespace ``name``, its ``ip`` and its cable at the switch."""

    def __init__(self, network, index):
        self.network = network
        self.index = index
        self.name = f'{network.prefix}-h{index}'
        self.ip = f'{SUBNET}.{index}'
        self.port = f'h{index}'  # its end of the veth, on the switch

    def __repr__(self):
        return f'<Host {self.name} {self.ip}>'

    def run(self, *args, timeout=TIMEOUT):
        """Run a command in the namespace; returns the ``CompletedProcess`` (text, output captured)."""
        return subprocess.run(['ip', 'netns', 'exec', self.name, *args], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=_child_env())

    def python(self, *args, **kwargs):
        """Start ``python3 args...`` in the namespace: a ``Popen`` with text pipes on all three streams.

        The process is the network's: it is killed when the network is
        removed, if it has not exited by then.
        """
        options = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, cwd=ROOT, env=_child_env())
        options.update(kwargs)
        proc = subprocess.Popen(['ip', 'netns', 'exec', self.name, sys.executable, *args],
                                **options)
        self.network.processes.append(proc)
        return proc

    def cut(self):
        """Pull the host's cable out of the switch: frames to and from it are lost."""
        _ip('-n', self.network.switch, 'link', 'set', 'dev', self.port, 'down')

    def restore(self):
        """Plug the host's cable back in."""
        _ip('-n', self.network.switch, 'link', 'set', 'dev', self.port, 'up')


class Network:
    """``hosts`` hosts on one bridge, made on ``__enter__`` (or ``open()``), removed on exit."""

    def __init__(self, hosts=3):
        if not 1 <= hosts <= 250:
            raise ValueError(f'between 1 and 250 hosts, not {hosts}')
        self.prefix = f'dopy-{os.getpid()}-{next(_serials)}'
        self.switch = f'{self.prefix}-sw'
        self.hosts = [Host(self, i) for i in range(1, hosts + 1)]
        self.processes = []
        self._namespaces = []

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc_info):
        self.close()

    def open(self):
        """Make the namespaces, the bridge and the links; returns the network."""
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        try:
            remove_stale()
            self._add_namespace(self.switch)
            _ip('-n', self.switch, 'link', 'set', 'dev', 'lo', 'up')
            _ip('-n', self.switch, 'link', 'add', 'name', 'br0', 'type', 'bridge')
            _ip('-n', self.switch, 'link', 'set', 'dev', 'br0', 'up')
            for host in self.hosts:
                self._add_namespace(host.name)
                _ip('-n', host.name, 'link', 'set', 'dev', 'lo', 'up')
                _ip('-n', self.switch, 'link', 'add', 'name', host.port, 'type', 'veth',
                    'peer', 'name', 'eth0', 'netns', host.name)
                _ip('-n', self.switch, 'link', 'set', 'dev', host.port, 'master', 'br0')
                _ip('-n', self.switch, 'link', 'set', 'dev', host.port, 'up')
                _ip('-n', host.name, 'addr', 'add', f'{host.ip}/24', 'dev', 'eth0')
                _ip('-n', host.name, 'link', 'set', 'dev', 'eth0', 'up')
        except BaseException:
            self.close()
            raise
        return self

    def _add_namespace(self, name):
        _ip('netns', 'add', name)
        self._namespaces.append(name)

    def close(self):
        """Kill the processes started in the hosts and remove every namespace (with its links)."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.communicate(timeout=TIMEOUT)
            except (subprocess.TimeoutExpired, ValueError, OSError) as exc:
                log.warning('process %s in a test namespace did not end: %s', proc.args, exc)
        self.processes.clear()
        errors = []
        for name in reversed(self._namespaces):
            try:
                _ip('netns', 'del', name)
            except RuntimeError as exc:
                errors.append(str(exc))
        self._namespaces.clear()
        if errors:
            raise RuntimeError('could not remove every test namespace: ' + '; '.join(errors))

    def __getitem__(self, index):
        """The host numbered ``index``, from 1, as in its address."""
        if index < 1:
            raise IndexError(index)
        return self.hosts[index - 1]


def _child_env():
    env = dict(os.environ)
    env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
    env['PYTHONUNBUFFERED'] = '1'
    return env
