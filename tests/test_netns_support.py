"""The multi-host helper itself: three hosts in network namespaces that reach each other, and a link that can be cut."""

import sys
import time

from tests import netns
from tests.support import TIMEOUT, Case, read_line, stop

# Accepts connections on the host's address, port 0; prints the port, then
# the address of each peer it accepts, and greets it.
LISTENER = '''
import socket, sys
server = socket.socket()
server.bind((sys.argv[1], 0))
server.listen()
print('PORT', server.getsockname()[1], flush=True)
while True:
    conn, peer = server.accept()
    print('PEER', peer[0], flush=True)
    conn.sendall(b'hello')
    conn.close()
'''

# Connects to argv[1]:argv[2] within argv[3] seconds; prints OK and what it
# read, or FAIL and why, then the seconds it took.
CONNECT = '''
import socket, sys, time
start = time.monotonic()
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3])) as s:
        print('OK', s.recv(5).decode(), round(time.monotonic() - start, 3), flush=True)
except OSError as exc:
    print('FAIL', type(exc).__name__, round(time.monotonic() - start, 3), flush=True)
'''


class NetnsCase(Case):
    def setUp(self):
        super().setUp()
        reason = netns.unavailable()
        if reason:
            self.skipTest(reason)
        self.net = netns.Network(3).open()
        self.addCleanup(self.net.close)

    def listen(self, host):
        proc = host.python('-c', LISTENER, host.ip)
        line = read_line(proc.stdout)
        self.assertTrue(line.startswith('PORT '), (line, proc.stderr.read() if proc.poll() else ''))
        return proc, int(line.split()[1])

    def connect(self, host, ip, port, timeout):
        """Run CONNECT in ``host``; returns its one line of output, split."""
        proc = host.python('-c', CONNECT, ip, str(port), str(timeout))
        status, out, err = stop(proc, timeout + TIMEOUT)
        self.assertEqual(status, 0, err)
        return out.split()


class ThreeHosts(NetnsCase):
    def test_hosts_have_their_addresses_and_no_way_out(self):
        self.assertEqual([h.ip for h in self.net.hosts], ['10.231.0.1', '10.231.0.2', '10.231.0.3'])
        for host in self.net.hosts:
            addresses = host.run('ip', '-4', '-o', 'addr', 'show', 'dev', 'eth0')
            self.assertEqual(addresses.returncode, 0, addresses.stderr)
            self.assertIn(f'{host.ip}/24', addresses.stdout)
            routes = host.run('ip', 'route', 'show').stdout
            self.assertNotIn('default', routes)
            self.assertEqual(len(routes.splitlines()), 1, routes)

    def test_host_1_reaches_a_listener_on_host_2(self):
        h1, h2 = self.net[1], self.net[2]
        listener, port = self.listen(h2)
        self.assertEqual(self.connect(h1, h2.ip, port, TIMEOUT)[:2], ['OK', 'hello'])
        self.assertEqual(read_line(listener.stdout).split(), ['PEER', h1.ip])
        self.assertEqual(self.connect(self.net[3], h2.ip, port, TIMEOUT)[:2], ['OK', 'hello'])
        self.assertEqual(read_line(listener.stdout).split(), ['PEER', self.net[3].ip])

    def test_a_cut_link_fails_a_connect_quickly_and_can_be_restored(self):
        h1, h2 = self.net[1], self.net[2]
        listener, port = self.listen(h2)
        self.assertEqual(self.connect(h1, h2.ip, port, TIMEOUT)[0], 'OK')
        h2.cut()
        start = time.monotonic()
        outcome = self.connect(h1, h2.ip, port, 1.0)
        self.assertEqual(outcome[0], 'FAIL', outcome)
        self.assertLess(float(outcome[2]), 3.0)
        self.assertLess(time.monotonic() - start, 3.0 + TIMEOUT)
        h2.restore()
        self.assertEqual(self.connect(h1, h2.ip, port, TIMEOUT)[0], 'OK')


class Lifecycle(Case):
    def setUp(self):
        super().setUp()
        reason = netns.unavailable()
        if reason:
            self.skipTest(reason)

    def namespaces(self):
        return {line.split()[0] for line in netns._ip('netns', 'list').splitlines() if line.split()}

    def test_everything_is_removed_on_exit_even_after_an_error(self):
        before = self.namespaces()
        with self.assertRaises(ZeroDivisionError):
            with netns.Network(2) as net:
                names = {net.switch, *(h.name for h in net.hosts)}
                self.assertLessEqual(names, self.namespaces())
                proc = net[1].python('-c', 'import sys; sys.stdin.read()')
                1 / 0
        self.assertIsNotNone(proc.poll())
        self.assertFalse(names & self.namespaces())
        self.assertLessEqual(self.namespaces(), before)

    def test_dopy_imports_inside_a_host(self):
        with netns.Network(1) as net:
            done = net[1].run(sys.executable, '-c', 'import dopy, sys; print(dopy.__file__)')
            self.assertEqual(done.returncode, 0, done.stderr)
            self.assertTrue(done.stdout.strip().startswith(netns.ROOT), done.stdout)
