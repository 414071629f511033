"""A DOPY server process for the tests: prints ``PORT n``, serves until its input ends.

Its exception and result classes live in this script's ``__main__``, which
a client process does not have: that is what the tests need them for.
"""

import argparse
import os
import resource
import sys
import threading
import time

import dopy
import dopy.tcp


class ServerOnlyError(Exception):
    """An exception class that exists only in the server process."""


class ServerOnlyValue:
    """A result class that exists only in the server process."""


class Service:
    def __init__(self):
        self.slow_started = threading.Event()

    def echo(self, value):
        return value

    def blob(self, size):
        return b'x' * size

    def size(self, value):
        return len(value)

    def pid(self):
        return os.getpid()

    def slow(self, seconds, value=None):
        self.slow_started.set()
        time.sleep(seconds)
        return value

    def wait_until_slow_started(self, timeout):
        return self.slow_started.wait(timeout)

    def connections(self):
        return dopy.getHub().stats()['connections']

    def rss_kib(self):
        with open('/proc/self/status') as status:
            for line in status:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1])
        return None

    def call_back(self, callback, value):
        return callback.notify(value)

    def raise_server_only(self, message):
        raise ServerOnlyError(message)

    def server_only_value(self):
        return ServerOnlyValue()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--port', type=int, default=0)
    args = parser.parse_args()
    # Room for the tests' thousand idle connections.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    hub = dopy.getHub()
    hub.addObject('service', Service())
    server = dopy.tcp.makeServer(args.port)
    print('PORT', server.port, flush=True)
    try:
        hub.mainloop(namespace={'server': server})
    finally:
        hub.shutdown()


if __name__ == '__main__':
    sys.exit(main())
