"""The systems under test: how each one serves the benchmark object and how a client calls it.

Every system has the same shape.  In the server process, ``serve(obj)``
publishes ``obj`` (an ``EchoService``) on an ephemeral port of 127.0.0.1
and returns ``(port, stop)``.  In a client process, ``connect(port)``
returns a client with the methods ``echo``, ``sink`` and ``sunk_count``,
which ``close(client)`` closes; ``hold(port)`` opens one connection to be
held idle; ``pipelined(client)`` and ``oneway(client)`` return the
system's way to have many calls in flight at once and to send calls that
want no reply, or raise ``NotApplicable`` saying why there is none.

Pyro5 and RPyC are imported only when used, so that the benchmark runs
without them.
"""

import pickle
import socket
import struct
import threading

import dopy
import dopy.tcp

HOST = '127.0.0.1'
OBJECT_NAME = 'bench'
# No call of the benchmark legitimately takes this long; it only keeps a
# lost reply from hanging a client forever.
RESULT_TIMEOUT = 60.0


class NotApplicable(Exception):
    """The system has no such feature; the message says which and why."""


class EchoService:
    """The object every system serves: an echo, and a sink that counts the calls it got."""

    def __init__(self):
        # Oneway calls may run on several server threads at once (Pyro5 runs
        # each in a thread of its own), so the count needs a lock to be exact.
        self._lock = threading.Lock()
        self._sunk = 0

    def echo(self, value):
        return value

    def sink(self, value):
        with self._lock:
            self._sunk += 1

    def sunk_count(self):
        with self._lock:
            return self._sunk


def expect(value, expected):
    """Raise unless a call returned what it should: a wrong answer must never count as a call."""
    if value != expected:
        raise AssertionError(f'expected {expected!r}, got {value!r}'[:200])


class System:
    """The default behaviour of a system; subclasses fill in the rest."""

    name = None
    # How ``pipelined`` and ``oneway`` do it, for the table's notes.
    pipelining_how = None

    def hold(self, port):
        client = self.connect(port)
        expect(client.echo(42), 42)
        return client

    def release(self, held):
        self.close(held)

    def pipelined(self, client):
        raise NotApplicable(f'{self.name} has no way to have several calls in flight on one connection')

    def oneway(self, client):
        raise NotApplicable(f'{self.name} has no oneway calls')


# --- the floor: raw sockets and pickle, nothing else ------------------------

_LENGTH = struct.Struct('!Q')
_HEADER = _LENGTH.size
_pack_length = _LENGTH.pack
_unpack_length = _LENGTH.unpack_from
_PROTOCOL = pickle.HIGHEST_PROTOCOL
# Room for many small messages, so that one recv_into takes all that have
# arrived; a message larger than this gets a buffer of its own.
_BUFFER_SIZE = 16 * 1024


class _Reader:
    """Length-prefixed messages from a socket, read ahead: one ``recv_into`` for all the small ones that have arrived."""

    def __init__(self, sock):
        self._recv_into = sock.recv_into
        self._buffer = bytearray(_BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0

    def next(self):
        """The next message's pickle, valid until the next call; None at a clean end of stream."""
        start, end = self._start, self._end
        if start == end:
            # Nothing left over, the usual case: read straight into the whole buffer.
            start, end = 0, self._recv_into(self._view)
            if not end:
                return None
        if end - start >= _HEADER:
            body = start + _HEADER
            stop = body + _unpack_length(self._buffer, start)[0]
            if stop <= end:
                self._start, self._end = stop, end
                return self._view[body:stop]
        return self._more(start, end)

    def _more(self, start, end):
        """Read on until the message that begins at ``start`` is complete."""
        view = self._view
        if start:
            view[:end - start] = view[start:end]
            end -= start
        while True:
            if end >= _HEADER:
                stop = _HEADER + _unpack_length(self._buffer)[0]
                if stop > len(view):
                    self._start = self._end = 0
                    return self._large(stop - _HEADER, view[_HEADER:end])
                if stop <= end:
                    self._start, self._end = stop, end
                    return view[_HEADER:stop]
            received = self._recv_into(view[end:])
            if not received:
                raise EOFError('the peer closed the connection mid-message')
            end += received

    def _large(self, length, head):
        body = memoryview(bytearray(length))
        body[:len(head)] = head
        received = len(head)
        while received < length:
            n = self._recv_into(body[received:])
            if not n:
                raise EOFError('the peer closed the connection mid-message')
            received += n
        return body


def _send(sendall, obj):
    data = pickle.dumps(obj, _PROTOCOL)
    if len(data) <= _BUFFER_SIZE:
        sendall(_pack_length(len(data)) + data)
    else:
        # Joining would copy a large message once more.
        sendall(_pack_length(len(data)))
        sendall(data)


def _floor_serve(sock, obj):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    next_message = _Reader(sock).next
    sendall = sock.sendall
    loads = pickle.loads
    with sock:
        try:
            while (message := next_message()) is not None:
                method, args = loads(message)
                _send(sendall, getattr(obj, method)(*args))
        except (EOFError, OSError):
            return


class FloorClient:
    """One connection of the floor: a request is ``(method, args)``, a reply the result."""

    def __init__(self, port):
        self._sock = socket.create_connection((HOST, port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sendall = self._sock.sendall
        self._next = _Reader(self._sock).next

    def _call(self, method, *args):
        _send(self._sendall, (method, args))
        return self._reply()

    def _reply(self):
        message = self._next()
        if message is None:
            raise EOFError('the server closed the connection')
        return pickle.loads(message)

    def echo(self, value):
        return self._call('echo', value)

    def sink(self, value):
        return self._call('sink', value)

    def sunk_count(self):
        return self._call('sunk_count')

    def pipeline(self, n):
        """Send ``n`` echo(42) requests, then read the ``n`` replies."""
        for _ in range(n):
            _send(self._sendall, ('echo', (42,)))
        for _ in range(n):
            expect(self._reply(), 42)

    def close(self):
        self._sock.close()


class Floor(System):
    """What Python itself can do: a thread per connection, a length prefix, one send a message, reads ahead."""

    name = 'floor'
    pipelining_how = 'N requests sent, then N replies read'

    def serve(self, obj):
        listener = socket.create_server((HOST, 0))

        def accept_loop():
            while True:
                try:
                    sock, _ = listener.accept()
                except OSError:
                    return
                threading.Thread(target=_floor_serve, args=(sock, obj), daemon=True).start()

        threading.Thread(target=accept_loop, daemon=True).start()

        def stop():
            # close() alone does not wake a thread blocked in accept(); shutdown() does.
            try:
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()

        return listener.getsockname()[1], stop

    def connect(self, port):
        return FloorClient(port)

    def close(self, client):
        client.close()

    def pipelined(self, client):
        return client.pipeline


# --- DOPY ---------------------------------------------------------------------

class Dopy(System):
    """DOPY with its defaults: the process's hub, ``makeServer`` and ``remote``."""

    name = 'dopy'
    pipelining_how = 'method.future() and method.oneway()'

    def serve(self, obj):
        hub = dopy.getHub()
        hub.addObject(OBJECT_NAME, obj)
        server = dopy.tcp.makeServer(0, HOST)
        return server.port, hub.shutdown

    def connect(self, port):
        return dopy.tcp.remote(HOST, port, OBJECT_NAME)

    def close(self, client):
        dopy.close(client)

    def pipelined(self, client):
        try:
            start = client.echo.future
        except AttributeError:
            raise NotApplicable('dopy: futures (method.future) not available in this version') from None

        def run(n):
            futures = [start(42) for _ in range(n)]
            for future in futures:
                expect(future.result(RESULT_TIMEOUT), 42)
        return run

    def oneway(self, client):
        try:
            return client.sink.oneway
        except AttributeError:
            raise NotApplicable('dopy: oneway calls (method.oneway) not available in this version') from None


# --- multiprocessing.managers --------------------------------------------------

_AUTHKEY = b'dopy-bench'
_EXPOSED = ('echo', 'sink', 'sunk_count')
_shared = {}


def _shared_echo():
    return _shared['echo']


def _echo_manager_class():
    from multiprocessing.managers import BaseManager

    class EchoManager(BaseManager):
        """A manager whose only type is the benchmark's echo object."""

    EchoManager.register('echo', callable=_shared_echo, exposed=_EXPOSED)
    return EchoManager


class Managers(System):
    """multiprocessing.managers: a BaseManager serving one registered echo object."""

    name = 'managers'

    def serve(self, obj):
        _shared['echo'] = obj
        server = _echo_manager_class()(address=(HOST, 0), authkey=_AUTHKEY).get_server()
        # serve_forever ends with sys.exit(); in a daemon thread that ends only the thread.
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        return server.address[1], lambda: None

    def connect(self, port):
        manager = _echo_manager_class()(address=(HOST, port), authkey=_AUTHKEY)
        manager.connect()
        return manager.echo()

    def close(self, client):
        # What garbage collection of a proxy does (decref, and close the
        # thread's connection if it was the last proxy): there is no public close.
        client._close()

    def hold(self, port):
        # All proxies of one thread share that thread's connection, so an idle
        # connection is made the way each proxy-using thread makes its own:
        # an authenticated connection handed to the server's serve_client loop.
        from multiprocessing.connection import Client
        from multiprocessing.managers import dispatch
        connection = Client((HOST, port), authkey=_AUTHKEY)
        dispatch(connection, None, 'accept_connection', ('idle',))
        return connection

    def release(self, held):
        held.close()

    def pipelined(self, client):
        raise NotApplicable('managers: proxies have no asynchronous calls')

    def oneway(self, client):
        raise NotApplicable('managers: proxies have no oneway calls')


# --- Pyro5 -----------------------------------------------------------------------

class Pyro5System(System):
    """Pyro5 with its defaults (thread pool server), but the marshal serializer.

    marshal is the fastest of Pyro5's serializers that needs no extra
    package and carries ``bytes`` as they are; the default, serpent,
    base64-encodes them.
    """

    name = 'pyro5'
    pipelining_how = 'a batch proxy (all the calls in one message) and @oneway'

    def serve(self, obj):
        import Pyro5.api

        @Pyro5.api.expose
        class PyroEcho:
            def echo(self, value):
                return obj.echo(value)

            @Pyro5.api.oneway
            def sink(self, value):
                obj.sink(value)

            def sunk_count(self):
                return obj.sunk_count()

        daemon = Pyro5.api.Daemon(host=HOST, port=0)
        daemon.register(PyroEcho(), OBJECT_NAME)
        threading.Thread(target=daemon.requestLoop, daemon=True).start()
        return int(daemon.locationStr.rsplit(':', 1)[1]), daemon.shutdown

    def connect(self, port):
        import Pyro5.api
        proxy = Pyro5.api.Proxy(f'PYRO:{OBJECT_NAME}@{HOST}:{port}')
        proxy._pyroSerializer = 'marshal'
        proxy._pyroBind()
        return proxy

    def close(self, client):
        # A proxy belongs to the thread that made it; the idle scenario closes
        # connections opened by other threads.
        client._pyroClaimOwnership()
        client._pyroRelease()

    def pipelined(self, client):
        import Pyro5.api

        # Pyro5 has no asynchronous calls; its batch proxy sends many calls in
        # one message, which is its way to avoid a round trip per call.  Its
        # marshal serializer fails on batches (5.17: kwargs None), so batches
        # go with the default serializer; the server takes either.
        def run(n):
            batch = Pyro5.api.BatchProxy(client)
            for _ in range(n):
                batch.echo(42)
            client._pyroSerializer = None
            try:
                for result in batch():
                    expect(result, 42)
            finally:
                client._pyroSerializer = 'marshal'
        return run

    def oneway(self, client):
        return client.sink


# --- RPyC ------------------------------------------------------------------------

class RpycClient:
    """An RPyC connection with the remote methods looked up once (each lookup is a round trip)."""

    def __init__(self, connection):
        self.connection = connection
        root = connection.root
        self.echo = root.echo
        self.sink = root.sink
        self.sunk_count = root.sunk_count


class Rpyc(System):
    """RPyC with its defaults: a ThreadedServer and a service exposing the three methods."""

    name = 'rpyc'
    pipelining_how = 'rpyc.async_()'

    def serve(self, obj):
        import rpyc
        from rpyc.utils.server import ThreadedServer

        class EchoRpycService(rpyc.Service):
            def exposed_echo(self, value):
                return obj.echo(value)

            def exposed_sink(self, value):
                obj.sink(value)

            def exposed_sunk_count(self):
                return obj.sunk_count()

        server = ThreadedServer(EchoRpycService(), hostname=HOST, port=0)
        threading.Thread(target=server.start, daemon=True).start()
        return server.port, server.close

    def connect(self, port):
        import rpyc
        return RpycClient(rpyc.connect(HOST, port))

    def close(self, client):
        client.connection.close()

    def pipelined(self, client):
        import rpyc
        start = rpyc.async_(client.echo)

        def run(n):
            results = [start(42) for _ in range(n)]
            for result in results:
                expect(result.value, 42)
        return run

    def oneway(self, client):
        raise NotApplicable('rpyc: no oneway calls (an async_ call still gets its reply)')


SYSTEMS = {cls.name: cls for cls in (Floor, Dopy, Managers, Pyro5System, Rpyc)}
# The module each optional system needs; the others need only the standard library and dopy.
OPTIONAL = {'pyro5': 'Pyro5', 'rpyc': 'rpyc'}
