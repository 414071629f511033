"""A service process for the naming tests: publishes itself and registers in a naming server.

Usage: fixture_service.py NAMING_PORT NAME.  Prints ``READY`` once bound,
then serves until its input ends.
"""

import sys
import threading

import dopy
import dopy.tcp


class Service:
    def __init__(self):
        self.listeners = []

    def where(self):
        return 'service process'

    def call_back(self, callback, value):
        return callback.notify(value)

    def subscribe(self, listener):
        self.listeners.append(listener)

    def publish(self, value):
        threading.Thread(target=lambda: [l.notify(value) for l in self.listeners]).start()


def main():
    naming_port, name = int(sys.argv[1]), sys.argv[2]
    hub = dopy.getHub()
    service = Service()
    hub.addObject('service', service)
    dopy.tcp.makeServer(0)
    ns = dopy.tcp.remote('127.0.0.1', naming_port, dopy.naming.DEFAULT_KEY, timeout=10)
    ns[name] = dopy.ref(service)
    print('READY', flush=True)
    try:
        hub.mainloop()
    finally:
        hub.shutdown()


if __name__ == '__main__':
    main()
