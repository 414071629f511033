"""One peer connection: calls sent and replies matched by id, calls received and served.

Both ends of a link are a ``Connection``, over a stream (``dopy.streams``:
a socket or a pair of pipes); a server's and a client's differ only in who
reads.  A connection is composed of a call table (``dopy.calls``), a
reference table (``dopy.references``), a channel (``dopy.channel``) and
the driver of its hub's threading mode (``dopy.drivers``), which says who
else reads it and where the peer's calls run.

The reading role.  At most one thread reads a connection at a time: the
one whose ident ``_role`` holds.  A threaded server runs ``serve()`` in a
thread of the connection's own, which sleeps in a blocking recv; in
THRD_CONN that thread is the connection's *owner*, and every call the peer
sends runs on it.  While it runs one it keeps the role but reads nothing,
and a thread that waits for a reply on the connection may take the role
over and read it instead (the owner learns of it from a flag when its call
is done, and takes the role back once it is free); the calls that thread
reads go to the owner's mailbox, which the owner empties before
it reads again and whenever it waits for a reply itself (woken by a pipe of
its own while it reads another connection).  So no reply waits for a
method, and no call leaves its thread.  A client has no thread of its own:
a thread waiting for a reply takes the role and reads the socket itself,
handing replies meant for other threads to them (they wait on a condition)
and serving any call that arrives meanwhile.  A thread that finds the role
free takes it before it sends, and needs no waiter at all: the common case
of one caller at a time is kept to the fewest steps.  A call made while
serving a call on the same connection reads in the same thread, so nested
calls do not deadlock.  A connection that must read while no thread waits
(replies to futures, say) gets a reader thread of its own with
``start_reader``; it is the connection's, and ``close`` joins it.

No read or send ever blocks past the call's deadline (``time.monotonic()``;
None means no limit).  A reader sleeps in the stream's ``recv_wait`` where
there is one, bounded by the socket's own receive timeout if it has a
deadline, and in ``poll`` where there is none; a sender with a deadline
never blocks in the kernel and waits in ``poll`` for room, and one without
sleeps in the stream's ``send_wait``.  So the common call over a socket,
one thread at a time, is one ``send`` and one ``recv``.  Several threads
may call at once: sends are serialised by a lock, and each call's reply is
found by its request id, so a late reply never answers a later call.  A
RELEASE frame due goes out ahead of the next frame sent.  Nothing outlives
the connection.

A frame read is a tuple, ``(kind, request_id, data, buffers, references)``
(see ``wire.Frame``): ``frame[0]`` is its kind, ``frame[1]`` its request id.
Its frames go out and come in through the channel, the one place where an
``OSError`` becomes one of DOPY's errors; the connection decides what each
error means for it (closing, mostly).
"""

import itertools
import logging
import os
import pickle
import select
import threading
import time
from collections import deque
from concurrent.futures import Future
from threading import get_ident
from time import monotonic as _monotonic

from . import dispatch, proxy, wire
from .calls import CallTable, Waiter, reply_outcome, unpickling_failed
from .channel import Channel, wait_ready
from .errors import (CallTimeoutError, CommunicationError, ConnectionClosedError,
                     ConnectionLostError, ProtocolError,
                     SerializationError)
from .drivers import driver_for
from .references import ReferenceTable

__all__ = ['Connection']

log = logging.getLogger('dopy.connection')

_ANSWERS = frozenset((wire.REPLY, wire.ERROR))
_CALL = wire.CALL
_REPLY = wire.REPLY
_ONEWAY = wire.ONEWAY
_plain_frame = wire.plain_frame
_PLAIN_TYPES = wire.PLAIN_TYPES
_wire_state = proxy.wire_state
_pickle_loads = pickle.loads
_serials = itertools.count(1)
# The key of a connection's reading role (see ``Connection._role``).
_READER = 'reader'
# Method names a connection remembers as checked (see _serve_owned).
_MAX_CHECKED = 1024


# Thread ident -> the connection whose calls that thread runs (see
# ``Connection.serve``).  A dict rather than a thread-local: looked up on
# every read, where a thread-local costs several times as much.
_owners = {}


class Connection:
    """One end of a link to a peer, over a stream (see ``dopy.streams``).

    ``hub`` supplies the objects that incoming calls are served from and
    the size limit for incoming frames; ``peer`` names the other end in
    messages.
    """

    # Slots rather than a dictionary: a connection has more attributes than
    # CPython keeps in an instance's shared-key values, and every call's
    # path reads a dozen of them.
    __slots__ = ('peer', '_on_close', 'hub', '_serial', '_stream', '_driver', '_threaded',
                 'write_fd', '_channel', '_channel_send', '_send_wait', '_decoder', 'next_frame',
                 '_send_lock', '_lock', '_cond', '_sleepers', '_calls', '_next_id', '_role', '_reader_thread',
                 '_direct', '_serving', 'owner', '_owner_in_call', '_taken_over', '_mailbox',
                 '_owner_waits_on', '_wake_fds',
                 '_owner_reads_elsewhere', '_refs', '_released', 'closed', '_users',
                 '_close_when_unused', '_error', '_recv_wait', '__weakref__')

    def __init__(self, stream, hub, peer, close_when_unused=False, on_close=None):
        self.peer = peer
        self._on_close = on_close
        self.hub = hub
        self._serial = next(_serials)
        self._stream = stream
        self._driver = driver = driver_for(hub)
        self._threaded = driver.threaded
        self.write_fd = stream.write_fd
        self._channel = Channel(stream, hub.max_message_size, peer,
                                None if driver.wait_writable is None
                                else lambda deadline: driver.wait_writable(self, deadline))
        self._channel_send = self._channel.send
        self._send_wait = self._channel.send_wait
        self._decoder = self._channel.decoder
        self.next_frame = self._decoder.next_frame
        self._send_lock = threading.RLock()
        # One lock, two names: ``_lock`` where nobody waits or is woken (the
        # C-level lock is much cheaper than the Condition), ``_cond`` where
        # threads wait.  ``_sleepers`` counts the threads that may wait, so
        # that nobody is woken in vain: a thread counts itself, under the
        # lock, before it first looks at the reading role, and a thread that
        # gives the role up looks at the count after it has.  ``_cond`` is
        # made by the first thread to wait: most connections never have one.
        self._lock = threading.Lock()
        self._cond = None
        self._sleepers = 0
        self._calls = CallTable()
        self._next_id = self._calls.next_id
        # The reading role: {_READER: the ident of the thread that reads}, or
        # empty while nobody does.  Taken with ``setdefault`` and given up
        # with ``del`` by its holder, each one step under the GIL: the
        # common call takes and gives it without the lock.
        self._role = {}
        self._reader_thread = None
        # True while a caller whose reply nobody else reads may read it
        # itself: the connection is open, threaded, with no reader thread.
        self._direct = self._threaded
        self._serving = False
        # THRD_CONN: the thread that serves this connection (``serve``).  It
        # holds the role but while it runs a call; calls that another thread
        # reads meanwhile wait in the mailbox for it.
        self.owner = None
        # True while the owner runs a call, holding the role but reading
        # nothing: a thread that waits for a reply here may take the role
        # over (see read_until), and says so in _taken_over.  The owner looks
        # at both flags, not the role, on every call's path: two attribute
        # reads where a dictionary's methods cost several times as much.
        self._owner_in_call = False
        self._taken_over = False
        self._mailbox = deque()
        # The connection the owner sleeps on, waiting for a reply, if any.
        self._owner_waits_on = None
        # A pipe that wakes the owner while it reads another connection
        # (made the first time it does), and whether it is doing so now.
        self._wake_fds = None
        self._owner_reads_elsewhere = False
        self._refs = ReferenceTable()
        # Imported proxies gone, for the next RELEASE: every send looks.
        self._released = self._refs.released
        # True once the connection is closed, by either side; others only read it.
        self.closed = False
        self._users = 0
        self._close_when_unused = close_when_unused
        self._error = None
        # A reader with no deadline sleeps in recv itself, where the stream allows.
        self._recv_wait = stream.recv_wait if self._threaded else None
        driver.attach(self, stream)

    def __repr__(self):
        state = 'closed' if self.closed else f'{len(self._calls)} calls in flight'
        return f'<dopy Connection with {self.peer}, {state}>'

    def call(self, name, method, args, kwargs, timeout=None):
        """Call ``method`` of the peer's object ``name`` and return its result.

        Raises the remote exception, rebuilt (see ``dopy.remote_exc``), or a
        ``CommunicationError``.  The call is sent at most once.
        """
        common = timeout is None and not kwargs and self._direct and not self._released
        if common:
            for arg in args:
                if type(arg) not in _PLAIN_TYPES:
                    common = False
                    break
        role = self._role
        me = get_ident()
        # Taken only if nobody holds it: not even this thread, which may be
        # reading already, and running a callback that calls here again.
        if not common or _READER in role or role.setdefault(_READER, me) != me:
            return self._call(name, method, args, kwargs, timeout)
        # The common call, every call's path while one thread at a time
        # calls: no deadline, positional arguments of plain types, and a
        # reply that this thread, which has just taken the reading role,
        # reads itself off a socket.  No waiter, no thread to wake, and a
        # Python frame only where one is due: about the floor's cost.
        try:
            request_id = self._next_id()
            data = _plain_frame(_CALL, request_id, (name, method, args, kwargs))
            send_lock = self._send_lock
            send_lock.acquire()
            try:
                # _send_frame's last step, with no deadline: no RELEASE was
                # due, and a socket closed meanwhile refuses the send.
                self._send_wait(data)
            except BaseException as exc:
                raise self._send_failed(exc)
            finally:
                send_lock.release()
            recv = self._recv_wait
            if recv is None or me in _owners:
                frame = self._read_frame(None)
            else:
                # _read_frame's own first step, a Python frame fewer.
                receive = self._decoder.receive
                try:
                    frame = receive(recv)
                    while frame is None:  # part of a frame came
                        frame = receive(recv)
                except BlockingIOError:
                    # The receive timeout that a call with a deadline left
                    # on the socket: _read_frame lets it go, and reads on.
                    frame = self._read_frame(None)
                except Exception as exc:
                    raise self._receive_failed(exc)
            kind, answers, data, buffers, references = frame
            if answers != request_id or kind != _REPLY or references or buffers:
                value, error = self._answer_of(request_id, frame, name, method, None)
            else:
                try:
                    return _pickle_loads(data)
                except Exception as exc:
                    value, error = unpickling_failed(kind, exc, name, method)
        finally:
            # _give_up_reading(), a Python frame fewer.  A proxy that let go
            # of the connection meanwhile has closed it: this call was not
            # in the call table to keep it open.
            del role[_READER]
            if self._sleepers or self.closed:
                self._after_reading()
        if error is not None:
            raise error
        return value

    def _answer_of(self, request_id, frame, name, method, deadline):
        """The ``(value, exception)`` of the call ``request_id``, reading from ``frame`` on until ``deadline``: the frames before its answer are handled as they come."""
        while frame[1] != request_id or frame[0] not in _ANSWERS:
            self.handle(frame)
            frame = self._read_frame(deadline)
        return self._unpack(frame, name, method)

    def _call(self, name, method, args, kwargs, timeout):
        """``call``, any call."""
        deadline = None if timeout is None else _monotonic() + timeout
        role = self._role
        me = get_ident()
        if not self._direct or _READER in role or role.setdefault(_READER, me) != me:
            waiter = Waiter(name, method)
            request_id = self._send_call(wire.CALL, waiter, args, kwargs, deadline, name, method)
            return self._await(waiter, request_id, deadline, timeout)
        # No thread read: this one has taken the role, and reads its own
        # reply: no lock, no waiter to register, no other thread to wake.
        waiter = request_id = None
        try:
            request_id = self._send_call(wire.CALL, None, args, kwargs, deadline, name, method)
            if self._reader_thread is not None:
                # A reference among the arguments has just started the
                # connection's reader thread: from now on it reads, this
                # reply included, and serves the callbacks.
                waiter = Waiter(name, method)
                self._register(request_id, waiter)
            else:
                value, error = self._answer_of(request_id, self._read_frame(deadline), name, method, deadline)
        except CallTimeoutError:
            if self.closed or request_id is None:
                # Connecting timed out (the greeting never came:
                # streams.EarlyStream), or the call was never sent.
                raise
            raise self._timed_out(name, method, timeout) from None
        finally:
            self._give_up_reading()
            if waiter is None and self._close_when_unused and self._users <= 0:
                self._close_if_unused()
        if waiter is not None:
            return self._await(waiter, request_id, deadline, timeout)
        if error is not None:
            raise error
        return value

    def _await(self, waiter, request_id, deadline, timeout):
        """The outcome of a call registered under ``waiter``, once whichever thread reads has answered it."""
        try:
            self._driver.wait(self, waiter, deadline)
        except BaseException as exc:
            # Given up on, timed out or interrupted (Ctrl-C, say): a late reply is discarded.
            with self._lock:
                self._calls.discard(request_id)
            if not isinstance(exc, CallTimeoutError):
                raise
            if not waiter.done:
                raise self._timed_out(waiter.name, waiter.method, timeout) from None
        finally:
            if self._close_when_unused:
                self._close_if_unused()
        if waiter.error is not None:
            raise waiter.error
        return waiter.value

    def _timed_out(self, name, method, timeout):
        return CallTimeoutError(
            f'no reply to {name}.{method}() from {self.peer} within {timeout} s; '
            'the call was not re-sent, and it may or may not have run')

    def call_async(self, name, method, args, kwargs, timeout=None):
        """Send the call and return a ``concurrent.futures.Future`` of its outcome.

        ``timeout`` bounds the sending only; ``future.result(timeout)``
        bounds the wait for the reply.  Starts the reader thread.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        future = self._driver.new_future(name, method)
        if self._reader_thread is None:
            self.start_reader()
        self._send_call(wire.CALL, future, args, kwargs, deadline, name, method)
        return future

    def call_oneway(self, name, method, args, kwargs, timeout=None):
        """Send the call and return at once; no reply comes, and the server logs a failure."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._send_call(wire.ONEWAY, None, args, kwargs, deadline, name, method)

    def _send_call(self, kind, waiter, args, kwargs, deadline, name, method):
        request_id = self._next_id()
        plain = not kwargs
        for arg in args:
            arg_type = type(arg)
            if arg_type not in _PLAIN_TYPES:
                plain = False
                if arg_type in wire.OUT_OF_BAND_TYPES:
                    args = tuple(map(wire.out_of_band, args))
                    break
        send_lock = self._send_lock
        if plain:
            # Every small call's path: arguments that can refer to no object
            # are pickled with no wire state, and outside the send lock.
            data = wire.plain_frame(kind, request_id, (name, method, args, kwargs))
            self._lock_to_send(deadline)
            try:
                if waiter is not None:
                    self._register(request_id, waiter)
                self._send_frame(data, deadline)
            finally:
                send_lock.release()
            return request_id
        if kwargs:
            kwargs = {k: wire.out_of_band(v) for k, v in kwargs.items()}
        self._lock_to_send(deadline)
        try:
            # The RELEASE due goes ahead of the frame, and is taken before the
            # frame is pickled, under the send lock: one queued meanwhile must
            # not overtake a frame that may still refer to the released object.
            release = self._release_frame() if self._released else None
            segments = self._pickle_call(kind, request_id, name, method, args, kwargs)
            if waiter is not None:
                self._register(request_id, waiter)
            self._send(segments, deadline, release)
        finally:
            send_lock.release()
        return request_id

    def _lock_to_send(self, deadline):
        """Take the send lock, waiting no later than ``deadline``: ``CallTimeoutError`` if another sender holds it past then, with nothing sent.

        A sender with no deadline may hold the lock for as long as a peer
        that reads nothing takes: a call with a timeout does not wait for it.
        """
        if deadline is None:
            self._send_lock.acquire()
        elif not self._send_lock.acquire(timeout=max(deadline - _monotonic(), 0)):
            raise CallTimeoutError(
                f'waiting to send to {self.peer}: timed out behind another send, with nothing sent')

    def _pickle_call(self, kind, request_id, name, method, args, kwargs):
        try:
            return self._in_wire_state(wire.message_segments, kind, request_id,
                                       (name, method, args, kwargs), False, True)
        except Exception as exc:
            raise SerializationError(
                f'the arguments of {name}.{method}() could not be pickled on the client: '
                f'{type(exc).__name__}: {exc}') from exc

    def _in_wire_state(self, function, *args):
        """``function(*args)``, pickling or unpickling for this connection (see ``proxy.wire_state``)."""
        state = proxy.wire_state
        saved, state.connection = state.connection, self
        try:
            return function(*args)
        finally:
            state.connection = saved

    def _register(self, request_id, waiter):
        """Have the reply to ``request_id`` answer ``waiter``."""
        # acquire() and release() rather than ``with``, here and in
        # _answer, on every pipelined call's path: on 3.11 the with
        # statement costs twice as much.
        lock = self._lock
        lock.acquire()
        try:
            if self.closed:
                raise _fresh(self._error)
            self._calls.add(request_id, waiter)
        finally:
            lock.release()

    def start_reader(self):
        """Read in a thread of the connection's own from now on (in THRD_NONE the loop reads). Idempotent."""
        with self._lock:
            if self._reader_thread is not None or self._serving or self.closed or not self._threaded:
                return
            self._reader_thread = threading.Thread(
                target=self.serve, name=f'dopy-reader-{self.peer}', daemon=True)
            self._direct = False
        self._reader_thread.start()

    def serve(self):
        """Read in this thread, serving the peer's calls, until the peer leaves or ``close()``.

        In THRD_CONN this thread is the connection's *owner*: every call the
        peer sends runs on it, in order.  While it runs one, it still holds
        the reading role, but a thread that waits for a reply on this
        connection may take the role over; the calls that thread reads wait
        in the mailbox, which the owner empties before it reads again and
        whenever it waits for a reply itself.  So no reply waits for a
        method, and no call leaves its thread.
        """
        me = get_ident()
        role = self._role
        with self._lock:
            self._serving = True
            self._sleepers += 1
            try:
                while role.setdefault(_READER, me) != me:
                    if self.closed:
                        return
                    self._sleep(None)
            finally:
                self._sleepers -= 1
            owning = self._driver.owns
            if owning:
                self.owner = me
        reading = True
        try:
            if not owning:
                while True:
                    self.handle(self._read_frame(None))
            saved = _owners.get(me)
            _owners[me] = self
            try:
                self._serve_owned(me)
            finally:
                if saved is None:
                    del _owners[me]
                else:
                    _owners[me] = saved
                self._close_wake_pipe()
                # Whether this thread still reads, once the loop has ended.
                reading = role.get(_READER) == me
        except Exception as exc:
            self.ended(exc)
        finally:
            if reading:
                self._give_up_reading()

    def _serve_owned(self, me):
        """The owner's loop: read a call, run it, reply, and again; raises once the connection ends.

        The common call, a published object's public method, with arguments
        that unpickle and a result of a plain type, takes the fewest steps
        that can be: its object and method name found checked before (and
        the object still published under that name) skip dispatch's checks.
        A oneway call takes the same steps, but for the reply.  Anything else
        takes dispatch's path, which says why it fails.
        """
        mailbox = self._mailbox
        receive = self._decoder.receive
        recv = self._recv_wait
        read_frame = self._read_frame
        handle = self.handle
        hub = self.hub
        # method name -> object name -> the registry entry they were found
        # public in: good for as long as the registry does not change
        # (hub.generation).  Keyed by the method first, as most servers have
        # fewer methods than objects; and by two plain keys, not a tuple made
        # on every call.
        checked = {}
        generation = hub.generation
        loads = self.loads
        send_frame = self._send_frame
        send_wait = self._send_wait
        plain = _PLAIN_TYPES
        call_kind, oneway_kind, reply_kind = wire.CALL, wire.ONEWAY, wire.REPLY
        send_lock = self._send_lock
        while True:
            if recv is None or self.closed:
                frame = read_frame(None)
            else:
                try:
                    frame = receive(recv)
                except BlockingIOError:
                    # The receive timeout that a thread reading with a
                    # deadline left on the socket: read_frame lets it go,
                    # and reads on.
                    frame = read_frame(None)
                except Exception as exc:
                    raise self._receive_failed(exc)
                if frame is None:
                    continue
            kind, request_id, data, buffers, references = frame
            if kind != call_kind and kind != oneway_kind:
                handle(frame)
                continue
            method = None
            try:
                # A frame of plain values is a pickle and no more (see loads).
                if references or buffers:
                    message = loads(frame)
                else:
                    message = _pickle_loads(data)
            except Exception as exc:
                message = dispatch.unpicklable(exc)
            if hub.generation != generation:
                checked.clear()
                generation = hub.generation
            if type(message) is tuple:
                try:
                    name, method_name, args, kwargs = message
                    entry = checked[method_name].get(name)
                except (ValueError, KeyError, TypeError):
                    entry = None  # not four items, or unhashable: dispatch says why
                if entry is not None and type(args) is tuple and type(kwargs) is dict:
                    method = getattr(entry[0], method_name, None)
                    if not callable(method):
                        method = None
            if method is None:
                call = (message if type(message) is dispatch.Call
                        else self._prepare_checked(message, checked))
            message = None
            # While the call runs, a thread that waits for a reply here may
            # take the role over and read it meanwhile.  Set before the
            # sleepers are counted, as read_until counts itself before it
            # looks at this flag: one of the two sees the other.
            self._owner_in_call = True
            if self._sleepers:
                self._wake()
            if method is None:
                self.run(frame, call)
            else:
                try:
                    value = method(*args, **kwargs)
                except BaseException as exc:
                    args = kwargs = None
                    self.reply(frame, dispatch.failed((name, method_name), exc))
                else:
                    # Let go of the arguments before the reply: the
                    # references among them are released ahead of it.
                    args = kwargs = None
                    if kind == oneway_kind:
                        value = None  # wants no reply
                    elif type(value) in plain:
                        data = _plain_frame(reply_kind, request_id, value)
                        value = None
                        send_lock.acquire()
                        try:
                            if self._released:
                                send_frame(data, None)
                            else:
                                # _send_frame's last step, with no deadline.
                                try:
                                    send_wait(data)
                                except BaseException as exc:
                                    raise self._send_failed(exc)
                        finally:
                            send_lock.release()
                    else:
                        self.reply(frame, dispatch.Outcome((name, method_name), True, value))
                        value = None
            self._owner_in_call = False
            # Cleared before the sleepers are counted, as above: a thread
            # counted after this finds the flag cleared, and waits for the
            # owner to read its reply.
            if not self._sleepers and not self._taken_over and not mailbox:
                continue
            self._take_back_reading()

    def _prepare_checked(self, message, checked):
        """Dispatch's ``Call`` for a CALL's unpickled ``message``, remembering its object and method name in ``checked`` once found public."""
        call = dispatch.prepare_message(self.lookup, message)
        if call.error is None:
            name, method_name = call.label
            entry = self.hub.registry.get(name)
            if entry is not None and method_name not in dispatch.CONTAINER_METHODS:
                objects = checked.get(method_name)
                if objects is None:
                    if len(checked) >= _MAX_CHECKED:
                        checked.clear()
                    objects = checked[method_name] = {}
                elif len(objects) >= _MAX_CHECKED:
                    objects.clear()
                objects[name] = entry
        return call

    def _take_back_reading(self):
        """The owner, its call done: run the calls read meanwhile, then read again once the role is free.

        Returns True holding the role; raises the connection's error once it is closed.
        """
        me = get_ident()
        role = self._role
        lock = self._lock
        while True:
            lock.acquire()
            self._sleepers += 1
            try:
                self._taken_over = False
                if not self._mailbox:
                    if self.closed:
                        raise _fresh(self._error)
                    if role.setdefault(_READER, me) == me:
                        return True
                    self._sleep(None)
                    continue
            finally:
                self._sleepers -= 1
                lock.release()
            if role.get(_READER) == me:
                self._step_aside()
            self._run_posted()

    def _step_aside(self):
        """The owner, about to run a call, gives up the reading role: a thread that waits for a reply here may read it meanwhile."""
        del self._role[_READER]
        if self._sleepers:
            self._wake()

    def _wake(self):
        """Wake the threads that wait on this connection: one of them may take the reading role."""
        with self._lock:
            if self._sleepers:
                self._cond.notify_all()

    def post(self, frame):
        """A call read by a thread that is not its connection's owner: leave it in the owner's mailbox, and wake the owner."""
        call = dispatch.prepare(self.lookup, frame, self.loads)
        with self._lock:
            self._mailbox.append((frame, call))
            if self._sleepers:
                self._cond.notify_all()
            if self._owner_reads_elsewhere:
                # Under the lock that the owner closes the pipe under.
                try:
                    os.write(self._wake_fds[1], b'x')
                except BlockingIOError:
                    pass  # full of wake-ups the owner has yet to read: it will wake
        waits_on = self._owner_waits_on
        if waits_on is not None and waits_on is not self:
            with waits_on._lock:
                if waits_on._sleepers:
                    waits_on._cond.notify_all()

    def check_alive(self):
        """False if closed, or found hung up by the peer (without sending anything: a system call)."""
        if self.closed:
            return False
        try:
            # Asked without reading anything, so it is safe beside a reading
            # thread.  Asked even where a reader thread would find the hang-up
            # and close the connection: it may not have yet, and a call sent
            # now would be lost.
            if not self._stream.peer_closed():
                return True
        except OSError as exc:
            self._lost(self._channel.lost(exc))
            return False
        if self._reader_thread is None:
            self._lost(self._channel.ended())
        # Else the reader thread serves what came before the hang-up, then closes.
        return False

    def ended(self, exc):
        """Log why reading stopped, once, at the level it deserves; make sure the connection is shut."""
        if isinstance(exc, ConnectionClosedError):
            log.debug('connection with %s closed', self.peer)
        elif isinstance(exc, ProtocolError):
            pass  # logged by _refuse, before the connection closed
        elif isinstance(exc, ConnectionLostError) and exc.__cause__ is None and not self._decoder.pending:
            log.debug('%s closed the connection', self.peer)
        elif isinstance(exc, CommunicationError):
            log.info('connection with %s ended: %s', self.peer, exc)
        else:
            log.error('closing connection with %s after an internal error', self.peer, exc_info=exc)
            self._shutdown(ConnectionClosedError(f'connection with {self.peer} closed after an internal error'))

    def _refuse(self, exc):
        """The peer broke the protocol: one log line, then close."""
        log.warning('closing connection with %s: %s', self.peer, exc)
        self._shutdown(exc)

    def acquire(self):
        """Count one more proxy using this connection."""
        with self._lock:
            self._users += 1

    def release(self):
        """Count one proxy fewer; the last one out closes a connection that proxies opened."""
        with self._lock:
            self._users -= 1
        self._close_if_unused()

    def _close_if_unused(self):
        # Calls still in flight keep it open: a proxy that gave up on a
        # timed-out call must not end the calls of other threads.
        if self._close_when_unused and self._users <= 0 and not self._calls:
            self.close(timeout=0)

    def close(self, timeout=None):
        """Close the connection; calls waiting on it get ``ConnectionClosedError``. Idempotent.

        Joins the reader thread, if there is one, waiting at most ``timeout``
        seconds for a callback it may be running.
        """
        self._shutdown(ConnectionClosedError(f'connection with {self.peer} was closed'))
        thread = self._reader_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def lookup(self, name):
        """``(object, exposed)`` for the local object a call names: exported on this connection, or published."""
        if name.startswith('#'):
            return self._refs.exported(name), None
        return self.hub.lookup(name)

    def exported_object(self, name):
        """The local object behind a reference the peer sent back (unpickling *yours*)."""
        return self.lookup(name)[0]

    def export_count(self):
        """How many local objects this connection holds for the peer."""
        return self._refs.export_count()

    def import_count(self):
        """How many of the peer's exported objects this side still has proxies for."""
        return self._refs.import_count()

    def reduce_local(self, obj):
        """Pickling a ``dopy.ref(obj)`` over this connection: *here*, by name or exported id."""
        # The peer may call back while no thread here waits for a reply.
        self.start_reader()
        name = self.hub.published_name(obj)
        if name is not None:
            local_ip = self._stream.local_ip()
            address = self.hub.advertised_address(local_ip) if local_ip else None
            return proxy.rebuild_here, (name, address)
        return proxy.rebuild_here, (self._refs.export(obj), None)

    def reduce_proxy(self, remote):
        """Pickling a proxy over this connection: *yours*, an address, or forwarded *here*."""
        link = remote._dopy_link
        if link.connection is self:
            return proxy.rebuild_yours, (remote._dopy_name,)
        if link.connect is not None:
            return proxy.rebuild_address, (str(remote),)
        return self.reduce_local(remote)

    def import_proxy(self, name, address):
        """Unpickling *here*: the proxy for the peer's object ``name``, calling over this connection."""
        timeout = self.hub.call_timeout
        if address is not None:
            remote = self.hub.makeRemoteObject(f'{address}:{name}', timeout, connect=False)
            return proxy.attach(remote, self)
        ref = f'via:{self.peer}/{self._serial}:{name}'
        if not name.startswith('#'):
            return proxy.RemoteObject(ref, name, None, timeout, connection=self)
        def make_proxy():
            remote = proxy.RemoteObject(ref, name, None, timeout, connection=self)
            return remote, remote._dopy_link
        return self._refs.imported(name, make_proxy)

    def _release_frame(self):
        return self._refs.release_frame()

    def _release_exports(self, frame):
        """A RELEASE frame: the peer lets go of references; one of any other shape than ours breaks the protocol."""
        try:
            self._refs.apply_release(frame)
        except Exception as exc:
            error = ProtocolError(f'malformed RELEASE frame: {type(exc).__name__}: {exc}')
            error.__cause__ = exc
            self._refuse(error)
            raise error from exc

    def loads(self, frame):
        """Unpickle a frame received on this connection: in its wire state if the frame may hold references.

        Every message's path: setting the wire state, a thread-local, costs
        as much as unpickling a small message, and a frame of plain values
        needs none.
        """
        _, _, data, buffers, references = frame
        if not references:
            return _pickle_loads(data) if not buffers else wire.load_frame(frame)
        state = _wire_state
        saved, state.connection = state.connection, self
        try:
            return wire.load_frame(frame)
        finally:
            state.connection = saved

    def _unpack(self, frame, name, method):
        """A reply frame's ``(value, exception)``: the exception is built, not raised."""
        try:
            value = self.loads(frame)
        except Exception as exc:
            return unpickling_failed(frame[0], exc, name, method)
        if frame[0] == wire.REPLY:
            return value, None
        return reply_outcome(frame[0], value, name, method)

    def read_until(self, waiter, deadline):
        """Wait for ``waiter``'s reply, reading for it while no other thread reads (the threaded drivers' ``wait``)."""
        me = get_ident()
        # The connection whose calls this thread runs, if any: its calls read
        # by another thread are run here while this thread waits.
        owned = _owners.get(me)
        role = self._role
        lock = self._lock
        lock.acquire()
        self._sleepers += 1
        try:
            while not waiter.done:
                reader = role.get(_READER)
                if reader == me:
                    nested = True
                    # The owner, reading inside its own call: nobody takes
                    # the role over from under it until it is done.
                    in_call, self._owner_in_call = self._owner_in_call, False
                    break
                # A connection's reader thread, once it has one, does all
                # the reading, and so does a server connection's owner,
                # but for while they run a call (then the role is free, or
                # may be taken over from the owner).
                if (reader is None and (self._reader_thread is None or self.owner is not None)
                        and role.setdefault(_READER, me) == me):
                    nested = False
                    break
                if reader is not None and reader == self.owner and self._owner_in_call:
                    role[_READER] = me
                    self._taken_over = True
                    nested = False
                    break
                if owned is not None and owned._mailbox:
                    lock.release()
                    try:
                        owned._run_posted()
                    finally:
                        lock.acquire()
                    continue
                if owned is not None:
                    owned._owner_waits_on = self
                try:
                    self._sleep(deadline)
                finally:
                    if owned is not None:
                        owned._owner_waits_on = None
            else:
                return
        finally:
            self._sleepers -= 1
            lock.release()
        try:
            read_frame, handle = self._read_frame, self.handle
            while not waiter.done:
                handle(read_frame(deadline))
        except CallTimeoutError:
            raise
        except CommunicationError:
            pass  # _shutdown has already failed every waiter, this one included
        finally:
            if not nested:
                self._give_up_reading()
            elif in_call:
                with lock:
                    self._owner_in_call = True
                    if self._sleepers:
                        self._cond.notify_all()

    def _run_posted(self):
        """The owner runs the calls that other threads read for it, in the order they came."""
        mailbox = self._mailbox
        while mailbox:
            frame, call = mailbox.popleft()
            self.run(frame, call)

    def _give_up_reading(self):
        """This thread stops reading: wake the waiting threads, one of which will read next."""
        del self._role[_READER]
        if self._sleepers or self.closed:
            self._after_reading()

    def _after_reading(self):
        """What a thread that has just given up reading owes the others: to wake them, and to close a socket closed meanwhile."""
        if self._sleepers:
            self._wake()
        if self.closed:
            self._close_socket()

    def handle(self, frame):
        kind = frame[0]
        if kind in _ANSWERS:
            self._answer(frame)
        elif kind == _CALL or kind == _ONEWAY:
            self._driver.run_call(self, frame)
        else:
            self._release_exports(frame)

    def _answer(self, frame):
        """A REPLY or ERROR frame: the outcome of the call it answers, handed to whoever waits for it."""
        request_id = frame[1]
        lock = self._lock
        lock.acquire()
        try:
            waiter = self._calls.take(request_id)
        finally:
            lock.release()
        if waiter is None:
            log.debug('discarding the reply to request %d from %s: no call awaits it '
                      '(it came after a timeout or an interrupt)', request_id, self.peer)
            return
        value, error = self._unpack(frame, waiter.name, waiter.method)
        if isinstance(waiter, Future):
            # Closed first, if its proxies have gone: whoever holds the
            # future may check the connection as soon as it resolves.
            if self._close_when_unused and self._users <= 0:
                self._close_if_unused()
            waiter.resolve(value, error)
            return
        with self._lock:
            waiter.value, waiter.error, waiter.done = value, error, True
            if self._sleepers:
                self._cond.notify_all()

    def run(self, frame, call):
        outcome = call()
        # Let go of the arguments now, so that the references among them are
        # released ahead of this reply rather than of a later frame.
        call.args = call.kwargs = None
        self.reply(frame, outcome)

    def reply(self, frame, outcome):
        kind, request_id = frame[0], frame[1]
        if kind == wire.ONEWAY:
            dispatch.log_oneway(request_id, outcome)
            return
        send_lock = self._send_lock
        try:
            if outcome.ok and type(outcome.value) in _PLAIN_TYPES:
                # A value that can refer to no object is pickled with no
                # wire state, and outside the send lock.
                data = wire.plain_frame(wire.REPLY, request_id, outcome.value)
                send_lock.acquire()
                try:
                    self._send_frame(data, None)
                finally:
                    send_lock.release()
                return
            send_lock.acquire()
            try:
                # The RELEASE due first, then the reply pickled: as in _send_call.
                release = self._release_frame() if self._released else None
                segments = self._in_wire_state(dispatch.reply_segments, request_id, outcome, True)
                self._send(segments, None, release)
            finally:
                send_lock.release()
        except CommunicationError as exc:
            self._driver.reply_failed(self, exc)

    def _read_frame(self, deadline):
        """The next frame, read by this thread, which holds the reading role; waits until ``deadline``."""
        # The connection whose calls this thread runs, if another: the calls
        # left for it while it reads here run as they come (see _post).
        owned = _owners.get(get_ident()) if _owners else None
        if owned is None or owned is self:
            recv = self._recv_wait
            if recv is not None:
                # Every read's path: asleep in recv, for as long as the
                # deadline allows (see Channel.receive_by).
                channel = self._channel
                if deadline is None and channel.recv_timeout is not None:
                    channel.untime()
                receive = self._decoder.receive
                while True:
                    if self.closed:
                        raise _fresh(self._error)
                    try:
                        frame = receive(recv) if deadline is None else channel.receive_by(recv, deadline)
                    except Exception as exc:
                        raise self._receive_failed(exc)
                    if frame is not None:
                        return frame
                    if deadline is not None and time.monotonic() >= deadline:
                        raise CallTimeoutError(f'waiting for {self.peer}: timed out')
            owned = None
        else:
            # The pipe first: whoever sees the flag writes to it.
            owned._wake_pipe()
            # Nested, when a call run here reads this connection again.
            was_reading, owned._owner_reads_elsewhere = owned._owner_reads_elsewhere, True
        decoder = self._decoder
        try:
            while True:
                if self.closed:
                    raise _fresh(self._error)
                frame = decoder.next_frame()
                if frame is not None:
                    return frame
                if owned is not None:
                    if owned._mailbox:
                        owned._run_posted()
                        continue
                    receive = self._stream.recv_into
                    if not self._stream.pending():
                        owned._wait_or_wake(self._stream.read_fd, deadline, f'waiting for {self.peer}')
                        if owned._mailbox:
                            continue
                else:
                    receive = self._stream.recv_into
                    self._channel.wait_readable(deadline)
                try:
                    frame = self.receive(receive)
                except BlockingIOError:
                    continue
                if frame is not None:
                    return frame
        finally:
            if owned is not None:
                owned._owner_reads_elsewhere = was_reading

    def _wait_or_wake(self, read_fd, deadline, what):
        """The owner, reading another connection: wait until ``read_fd`` is readable or a call is left for it (by ``deadline``)."""
        wake_r = self._wake_fds[0]
        poller = select.poll()
        poller.register(read_fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        wait_ready(poller, deadline, what)
        try:
            os.read(wake_r, 512)
        except BlockingIOError:
            pass

    def _wake_pipe(self):
        """The reading end of the pipe that wakes this connection's owner, made on first use (by the owner)."""
        if self._wake_fds is None:
            wake_r, wake_w = os.pipe()
            os.set_blocking(wake_r, False)
            os.set_blocking(wake_w, False)
            self._wake_fds = (wake_r, wake_w)
        return self._wake_fds[0]

    def _close_wake_pipe(self):
        with self._lock:
            fds, self._wake_fds = self._wake_fds, None
        if fds is not None:
            os.close(fds[0])
            os.close(fds[1])

    def receive(self, receive):
        """The channel's ``receive(receive)``: the next whole frame or None; the connection shut if the channel failed."""
        try:
            return self._channel.receive(receive)
        except CommunicationError as exc:
            raise self._receive_failed(exc)

    def _receive_failed(self, exc):
        """What a read that raised ``exc`` raises: translated by the channel, and the connection shut if it cannot go on.

        The readers on every call's path read the decoder themselves, a
        Python frame fewer than the channel's ``receive``, and come here.
        """
        error = self._channel.read_error(exc)
        if isinstance(error, ProtocolError):
            self._refuse(error)
        elif isinstance(error, ConnectionLostError):
            return self._lost(error)
        elif isinstance(error, CommunicationError):
            # The greeting of a server that frames were sent to early
            # (streams.EarlyStream) refused them: every call hears why.
            self._shutdown(error)
        return error

    def _send_frame(self, data, deadline):
        """Send one frame that refers to no object, in one ``bytes``, after the RELEASE due; the caller holds the send lock.

        Every small message's path: one send, which takes it all.
        """
        if self._released:
            # A frame that refers to no object may follow the RELEASE taken now.
            self._send([data], deadline, self._release_frame())
            return
        if self.closed:
            raise _fresh(self._error)
        try:
            if deadline is None:
                self._send_wait(data)
            else:
                self._channel_send(data, deadline)
        except BaseException as exc:
            raise self._send_failed(exc)

    def _send(self, segments, deadline, release=None):
        """Send a frame's segments, after the RELEASE frame ``release`` if there is one; the caller holds the send lock."""
        if self.closed:
            raise _fresh(self._error)
        if release is not None:
            segments = [release, *segments]
        try:
            if len(segments) == 1:
                self._channel_send(segments[0], deadline)
            else:
                self._channel.send_segments(segments, deadline)
        except BaseException as exc:
            raise self._send_failed(exc)

    def _send_failed(self, exc):
        """What a send that raised ``exc`` raises: the connection is shut, for part of a frame may have gone."""
        if isinstance(exc, CallTimeoutError):
            self._shutdown(ConnectionLostError(
                f'connection with {self.peer} closed: a send timed out part-way through a frame'))
            return exc
        if isinstance(exc, ConnectionLostError):
            return self._lost(exc)
        if isinstance(exc, CommunicationError):
            self._shutdown(exc)
            return exc
        if isinstance(exc, OSError):
            return self._lost(self._channel.lost(exc))  # from a stream's send_wait
        # Interrupted (Ctrl-C, say) at a point that cannot be known: part
        # of a frame may have gone, and nothing can follow it.
        self._shutdown(ConnectionLostError(
            f'connection with {self.peer} closed: a send was interrupted, perhaps part-way through a frame'))
        return exc

    def _lost(self, error):
        """The connection is lost, as ``error`` (a ``ConnectionLostError``) says: what to raise, the connection shut."""
        if self.closed:
            return _fresh(self._error)
        self._shutdown(error)
        return error

    def _shutdown(self, error):
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._direct = False
            self._error = error
            waiters = self._calls.take_all()
            for waiter in waiters:
                if not isinstance(waiter, Future):
                    waiter.error, waiter.done = _fresh(error), True
            if self._sleepers:
                self._cond.notify_all()
            reading = _READER in self._role
        for waiter in waiters:
            if isinstance(waiter, Future):
                waiter.resolve(None, _fresh(error))
        self._refs.clear()
        self._driver.detach(self, self._stream)
        if reading:
            # Wakes the thread blocked reading this stream; it closes the
            # stream once no thread can be using its descriptors.
            self._stream.shutdown()
        if self._on_close is not None:
            self._on_close(self)
        if not reading:
            self._close_socket()

    def _sleep(self, deadline):
        """Wait on ``_cond`` (its lock held, the caller counted in ``_sleepers``) until woken, or ``CallTimeoutError`` at ``deadline``."""
        remaining = _remaining(deadline)
        if self._cond is None:
            self._cond = threading.Condition(self._lock)
        self._cond.wait(remaining)

    def _close_socket(self):
        with self._send_lock:
            self._stream.close()


def _remaining(deadline):
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise CallTimeoutError('timed out waiting for the reply')
    return remaining


def _fresh(error):
    """A new instance of ``error`` for this thread to raise, with the same cause."""
    fresh = type(error)(*error.args)
    fresh.__cause__ = error.__cause__
    return fresh
