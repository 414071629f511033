"""A stdio server for the rsh tests: its methods print, which must not reach the stream.

Usage: fixture_stdio.py THREAD_MODE.  Serves ``test`` over stdin/stdout
until its input ends.
"""

import os
import sys

import dopy
import dopy.rsh
from dopy.cli import TestObject


class Chatty(TestObject):
    def chatter(self, text):
        print('printed by the server:', text)
        sys.stdout.flush()
        return text

    def pid(self):
        return os.getpid()

    def die(self):
        os._exit(3)


def main():
    hub = dopy.init(threadMode=sys.argv[1])
    hub.addObject('test', Chatty())
    print('a line printed before serving starts goes to stderr too', file=sys.stderr)
    dopy.rsh.makeServer()
    dopy.rsh.wait()
    hub.shutdown()


if __name__ == '__main__':
    main()
