"""DOPY's wire format: messages to bytes and bytes to messages, with no I/O.

Every message is one frame: a fixed 24-byte header, then the payload.  All
integers are unsigned, big-endian (network order).

======  ====  ==========================================================
offset  size  field
======  ====  ==========================================================
0       4     magic, the bytes ``DOPY``
4       1     version, currently 1
5       1     kind: 1 CALL, 2 REPLY, 3 ERROR, 4 ONEWAY, 5 RELEASE
6       2     flags and buffers: the top bit is *references*; the other
              15 bits are the number of out-of-band buffers, *n*
8       8     request id: chosen by the caller, echoed by the reply
16      8     payload length: the bytes that follow the header
24      ...   payload
======  ====  ==========================================================

*references* says that the pickle may hold references to objects, which
unpickling rebuilds in the receiving connection's context (see
``dopy.proxy``): the sender pickled it in its own.  A pickle without it
holds plain values only, and is unpickled as it is.

The payload is *n* 8-byte buffer lengths, then a pickle (protocol 5), then
the *n* buffers, back to back.  Large buffers (``pickle.PickleBuffer``)
travel out of band this way, so they are neither copied into the pickle on
the sending side nor out of it on the receiving side.  A frame too large
for the staging buffer is received part by part, each buffer in memory of
its own, so that a large ``bytes`` value arrives in the very object it
becomes (see ``dopy.buffers``).

The pickle of each kind holds:

- CALL: the tuple ``(object_name, method_name, args, kwargs)``;
- REPLY: the method's result;
- ERROR: an exception packed by ``dopy.remote_exc.pack``;
- ONEWAY: a CALL that wants no reply, and gets none;
- RELEASE: a list of ``(reference_id, count)``: references the sender no
  longer holds (see ``dopy.connection``); no reply.

A receiver checks the magic, the version, the kind and the declared payload
length against its size limit *before* it allocates anything for the frame.
Decoding a frame does not unpickle it: a frame holds raw bytes, and
``loads`` is a separate step the connection takes once the peer is trusted.
"""

import pickle
import struct
from collections import deque, namedtuple

from .buffers import LARGE_BLOCK, as_bytes, give_back_large_blocks, new_buffer
from .errors import MessageTooLargeError, ProtocolError

__all__ = [
    'MAGIC', 'VERSION', 'HEADER', 'CALL', 'REPLY', 'ERROR', 'ONEWAY', 'RELEASE', 'KINDS',
    'DEFAULT_MAX_MESSAGE_SIZE', 'Frame', 'Decoder', 'dumps', 'loads', 'load_frame', 'out_of_band',
    'OUT_OF_BAND_TYPES',
    'PLAIN_TYPES',
    'frame_segments', 'message_segments', 'plain_frame', 'encode',
]

MAGIC = b'DOPY'
VERSION = 1
HEADER = struct.Struct('!4sBBHQQ')
# The header as the decoder reads it: magic and version together, as one
# field to compare, then kind, buffer count, request id and length.
_PARSED_HEADER = struct.Struct('!5sBHQQ')
_LENGTH = struct.Struct('!Q')
_PLAIN_HEADER_PACK = _PARSED_HEADER.pack
_pickle_dumps = pickle.dumps
_HEADER_SIZE = HEADER.size
_LENGTH_SIZE = _LENGTH.size

CALL = 1
REPLY = 2
ERROR = 3
ONEWAY = 4
RELEASE = 5
KINDS = frozenset((CALL, REPLY, ERROR, ONEWAY, RELEASE))
_PREFIX = MAGIC + bytes((VERSION,))

# Large enough for big payloads, small enough that one peer cannot make a
# server allocate a gigabyte per connection; Hub(max_message_size=) changes it.
DEFAULT_MAX_MESSAGE_SIZE = 256 << 20
_MAX_REQUEST_ID = (1 << 64) - 1
# The header's buffer count and its references flag share two bytes.
_BUFFER_COUNT = (1 << 15) - 1
_MAX_BUFFERS = _BUFFER_COUNT
_REFERENCES = 1 << 15
# The header as the decoder's fast path reads it: its first eight bytes as
# one field, then request id and length; and those eight bytes of every
# valid frame that has no buffers -> (kind, references).  One dictionary
# lookup checks magic, version, kind and buffer count at once.
_SHORT_HEADER = struct.Struct('!8sQQ')
_unpack_short_header = _SHORT_HEADER.unpack_from
_BUFFERLESS = {_PREFIX + struct.pack('!BH', kind, flags): (kind, flags == _REFERENCES)
               for kind in KINDS for flags in (0, _REFERENCES)}

# Buffers smaller than this stay inside the pickle: a separate segment
# costs more than the copy it saves.
OUT_OF_BAND_THRESHOLD = 64 * 1024

# Frames up to _STAGING_MAX bytes are read through the decoder's staging
# buffer, so one recv can bring several of them; larger payloads get a
# buffer of their own, allocated once at their declared size and filled in
# place.  The staging buffer starts small, so that an idle connection costs
# little memory, and grows to fit the frames that come.
_STAGING_START = 16 * 1024
_STAGING_MAX = 256 * 1024


Frame = namedtuple('Frame', ('kind', 'request_id', 'data', 'buffers', 'references'),
                   defaults=((), False))
Frame.__doc__ = """One decoded frame: its kind, request id, pickle, buffers, and whether the pickle may hold references.

The decoder gives each frame as a plain tuple of these five fields, in
this order, and its readers unpack it (``kind, request_id, data, buffers,
references = frame``): on 3.11 a plain tuple is made and read in a
seventh of the instructions an object with slots takes, and every call
makes one on each side.  ``Frame`` names the fields, for code that builds
one.  The pickle (``data``) is a ``bytes`` or ``bytearray`` of its own,
never a view of a buffer that is used again; ``buffers`` are memoryviews.
"""


class _OutOfBand:
    """A large ``bytes`` or ``bytearray``, or a ``memoryview``, to send out of band, rebuilt as its own type.

    Pickle protocol 5 keeps bytes and bytearray inside the pickle, and
    cannot pickle a memoryview at all; wrapped, they travel as a separate
    segment sent from their own memory (a small memoryview goes in the
    pickle).  A memoryview arrives as a memoryview of the received frame,
    with its format and shape.
    """

    __slots__ = ('data',)

    def __init__(self, data):
        self.data = data

    def __reduce_ex__(self, protocol):
        data = self.data
        if type(data) is memoryview:
            return _rebuild_view, (pickle.PickleBuffer(data), data.format, data.shape)
        if type(data) is bytes:
            return as_bytes, (pickle.PickleBuffer(data),)
        return bytearray, (pickle.PickleBuffer(data),)


def _rebuild_view(buffer, format, shape):
    view = memoryview(buffer)
    return view if format == 'B' and len(shape) == 1 else view.cast('B').cast(format, shape)


# The only types ``out_of_band`` wraps: a caller may skip it for any other.
OUT_OF_BAND_TYPES = frozenset((bytes, bytearray, memoryview))
# Types whose values pickle whole, with no buffer that could go out of band.
PLAIN_TYPES = frozenset((int, float, str, bool, type(None)))


def out_of_band(value):
    """``value``, wrapped to travel out of band if it is a large ``bytes`` or ``bytearray``, or a ``memoryview``."""
    kind = type(value)
    if kind is memoryview or (kind in (bytes, bytearray) and len(value) >= OUT_OF_BAND_THRESHOLD):
        return _OutOfBand(value)
    return value


class _Buffers(list):
    """The out-of-band buffers of one pickling: those large enough to be worth a segment of their own."""

    def keep_large(self, buf):
        """A pickler's ``buffer_callback``: true keeps ``buf`` inside the pickle."""
        nbytes = buf.raw().nbytes
        if nbytes < OUT_OF_BAND_THRESHOLD:
            return True
        if nbytes >= LARGE_BLOCK:
            give_back_large_blocks()
        self.append(buf)
        return False


def dumps(obj):
    """Pickle ``obj`` for the wire: returns ``(pickle_bytes, buffers)``.

    Raises whatever pickling raises; the caller says which side failed.
    Wrap large values with ``out_of_band`` first to keep them out of the pickle.
    """
    buffers = _Buffers()
    return pickle.dumps(obj, protocol=5, buffer_callback=buffers.keep_large), buffers


def loads(data, buffers=()):
    """Unpickle what ``dumps`` made, given the frame's buffers."""
    # The keyword costs more than the unpickling of a small call.
    return pickle.loads(data, buffers=buffers) if buffers else pickle.loads(data)


def load_frame(frame):
    """Unpickle ``frame``'s pickle, out of any connection's context (a frame with references fails if it holds one)."""
    _, _, data, buffers, _ = frame
    return loads(data, buffers)


def frame_segments(kind, request_id, data, buffers=(), references=False):
    """The frame as a list of bytes-like segments, ready for ``sendmsg``.

    With no buffers the list has one element, so a small message leaves in
    one ``send``.  ``references`` sets the header's flag: the pickle was
    made in a connection's context, and may hold references.
    """
    if kind not in KINDS:
        raise ValueError(f'unknown frame kind {kind!r}')
    if not 0 <= request_id <= _MAX_REQUEST_ID:
        raise ValueError(f'request id {request_id!r} out of range')
    flags = _REFERENCES if references else 0
    if not buffers:
        return [HEADER.pack(MAGIC, VERSION, kind, flags, request_id, len(data)) + data]
    if len(buffers) > _MAX_BUFFERS:
        raise ValueError(f'{len(buffers)} out-of-band buffers is too many')
    raws = [b.raw() if isinstance(b, pickle.PickleBuffer) else memoryview(b).cast('B')
            for b in buffers]
    table = b''.join(_LENGTH.pack(r.nbytes) for r in raws)
    length = len(table) + len(data) + sum(r.nbytes for r in raws)
    head = HEADER.pack(MAGIC, VERSION, kind, len(raws) | flags, request_id, length)
    return [head + table + data, *raws]


def message_segments(kind, request_id, obj, plain=False, references=False):
    """Pickle ``obj`` and frame it: the segments, as ``frame_segments`` gives them.

    Raises whatever pickling raises.  ``plain`` says that the caller has
    found nothing in ``obj`` that could go out of band (a value of
    ``PLAIN_TYPES`` is found so here); ``references``, that it pickles in a
    connection's context (see ``frame_segments``).
    """
    if plain or type(obj) in PLAIN_TYPES:
        # No buffer callback: a third of the cost of a small pickle.
        data = _pickle_dumps(obj, 5)
        buffers = None
    else:
        buffers = _Buffers()
        data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.keep_large)
    if buffers or references or kind not in KINDS or not 0 <= request_id <= _MAX_REQUEST_ID:
        return frame_segments(kind, request_id, data, buffers, references)
    return [_PLAIN_HEADER_PACK(_PREFIX, kind, 0, request_id, len(data)) + data]


def plain_frame(kind, request_id, obj):
    """Pickle ``obj``, which holds no buffer that could go out of band and no reference, and frame it: the frame as one ``bytes``.

    Every small message's path.  ``kind`` must be one of ``KINDS``; a
    request id out of range raises ``struct.error``.
    """
    data = _pickle_dumps(obj, 5)
    return _PLAIN_HEADER_PACK(_PREFIX, kind, 0, request_id, len(data)) + data


def encode(kind, request_id, obj, references=False):
    """Pickle ``obj`` and frame it: the whole frame as one ``bytes``."""
    return b''.join(message_segments(kind, request_id, obj, references=references))


class Decoder:
    """Turns a byte stream into frames (tuples, see ``Frame``), checking each header.

    Two ways to give it bytes:

    - ``feed(data)`` copies them in;
    - ``get_buffer()`` returns a writable memoryview to ``recv_into``,
      then ``advance(n)`` says how many bytes arrived.  A large payload is
      received straight into its own buffer this way, with no extra copy.

    ``next_frame()`` returns the next complete frame, or None.  A header
    that breaks the format raises ``ProtocolError`` (``MessageTooLargeError``
    for a declared length over ``max_size``) before anything is allocated
    for it; after that the stream is unusable.
    """

    def __init__(self, max_size=DEFAULT_MAX_MESSAGE_SIZE):
        if max_size < 0:
            raise ValueError('max_size must not be negative')
        self.max_size = max_size
        self._set_staging(bytearray(_STAGING_START))
        self._start = 0
        self._end = 0
        self._large = None
        self._ready = deque()

    @property
    def pending(self):
        """The number of bytes received that are not yet part of a whole frame."""
        if self._large is not None:
            return HEADER.size + self._large.received
        return self._end - self._start

    def get_buffer(self):
        """Where the next received bytes should be written (never empty)."""
        if self._large is not None:
            return self._large.target()
        if self._end == self._size:
            self._compact()
        return self._view[self._end:]

    def advance(self, nbytes):
        """Record that ``nbytes`` were written into the last ``get_buffer()``."""
        if self._large is not None:
            if not self._large.advance(nbytes):
                return
            frame, self._large = self._large.frame(), None
            self._ready.append(frame)
        else:
            self._end += nbytes
        self._parse()

    def receive(self, recv):
        """Call ``recv(buffer)`` (a ``recv_into``) once, straight into the decoder: every read's path.

        Returns the next whole frame, or None if there is none yet (the
        same as ``advance(recv(get_buffer()))``, then ``next_frame()``).
        A frame decoded before comes first, without calling ``recv``.
        Raises ``EOFError`` if ``recv`` returned 0: the stream has ended.

        """
        if self._ready:
            return self._ready.popleft()
        end = self._end
        if not end and self._large is None:
            # Nothing held back, the usual case: what comes starts the buffer.
            staging = self._staging
            received = recv(staging)
            if not received:
                raise EOFError('end of stream')
            # Read whatever came (the staging buffer is longer than a
            # header): a header that did not all come declares a length
            # that cannot match.
            head, request_id, length = _unpack_short_header(staging)
            known = _BUFFERLESS.get(head)
            if known is not None and length == received - _HEADER_SIZE and length <= self.max_size:
                # One whole frame and nothing more: every call's path.
                kind, references = known
                return kind, request_id, staging[_HEADER_SIZE:received], (), references
            self._end = received
            self._parse()
            return self.next_frame()
        if self._large is not None or end == self._size:
            received = recv(self.get_buffer())
            if not received:
                raise EOFError('end of stream')
            self.advance(received)
            return self.next_frame()
        view = self._view
        received = recv(view[end:])
        if not received:
            raise EOFError('end of stream')
        end += received
        self._end = end
        start = self._start
        if end - start > _HEADER_SIZE:
            head, request_id, length = _SHORT_HEADER.unpack_from(view, start)
            body = start + _HEADER_SIZE
            known = _BUFFERLESS.get(head)
            if known is not None and body + length == end and length <= self.max_size:
                # One whole frame and nothing more.
                self._start = self._end = 0
                kind, references = known
                return kind, request_id, self._staging[body:end], (), references
        self._parse()
        return self.next_frame()

    def feed(self, data):
        """Copy ``data`` in; frames it completes become ready."""
        data = memoryview(data).cast('B')
        while data:
            target = self.get_buffer()
            n = min(len(target), len(data))
            target[:n] = data[:n]
            data = data[n:]
            self.advance(n)

    def next_frame(self):
        """The next complete frame, or None if there is none yet."""
        return self._ready.popleft() if self._ready else None

    def _grow(self, needed):
        size = len(self._staging)
        while size < needed:
            size *= 2
        staging = bytearray(min(size, _STAGING_MAX))
        remaining = self._end - self._start
        staging[:remaining] = self._view[self._start:self._end]
        self._set_staging(staging)
        self._start, self._end = 0, remaining

    def _set_staging(self, staging):
        self._staging, self._view, self._size = staging, memoryview(staging), len(staging)

    def _compact(self):
        remaining = self._end - self._start
        self._view[:remaining] = self._view[self._start:self._end]
        self._start, self._end = 0, remaining

    def _parse(self):
        # Every frame's path: kept to the fewest steps, with the checks of a
        # valid header folded into one test.
        view, start, end, ready = self._view, self._start, self._end, self._ready
        while end - start >= _HEADER_SIZE:
            prefix, kind, flags, request_id, length = _PARSED_HEADER.unpack_from(view, start)
            nbuf = flags & _BUFFER_COUNT
            if (prefix != _PREFIX or kind not in KINDS or length > self.max_size
                    or length < nbuf * _LENGTH_SIZE):
                _check_header(view, start, self.max_size)
            references = flags >= _REFERENCES
            header = (kind, nbuf, request_id, length, references)
            body = start + _HEADER_SIZE
            stop = body + length
            if stop > end:
                self._start = start
                self._await_body(header)
                return
            data = bytes(view[body:stop])
            ready.append((kind, request_id, data, (), references) if not nbuf
                         else _make_frame(header, data))
            start = stop
        if start == end:
            self._start = self._end = 0
            return
        self._start = start
        # Fail at once on a stray protocol rather than wait for 24 bytes.
        seen = min(end - start, len(MAGIC))
        if view[start:start + seen] != MAGIC[:seen]:
            raise ProtocolError(f'bad magic {bytes(view[start:start + seen])!r}: '
                                'the peer does not speak DOPY')

    def _await_body(self, header):
        """The frame at ``_start``, whose header fields are ``header``, is not all here: make room for the rest of it."""
        needed = HEADER.size + header[3]
        if needed > _STAGING_MAX:
            body = self._view[self._start + HEADER.size:self._end]
            self._start = self._end = 0
            self._large = _LargeFrame(header)
            # The start of the body came with the header: into its parts it goes.
            self.feed(body)
        elif needed > self._size:
            self._grow(needed)


class _LargeFrame:
    """A frame too large for the staging buffer, received in place, part by part.

    The parts follow the payload's layout: the buffer table, then the
    pickle, then each out-of-band buffer in memory of its own (see
    ``dopy.buffers``), so that a large ``bytes`` value is received
    straight into the object it becomes.  The table is received first:
    it says how the rest is cut, and its sizes are checked against the
    frame's length before anything more is allocated.
    """

    __slots__ = ('header', 'views', 'index', 'filled', 'received')

    def __init__(self, header):
        kind, nbuf, request_id, length, references = header
        if length >= LARGE_BLOCK:
            give_back_large_blocks()
        self.header = header
        self.views = [memoryview(bytearray(nbuf * _LENGTH_SIZE if nbuf else length))]
        self.index = 0
        self.filled = 0
        self.received = 0

    def target(self):
        """Where the next bytes go."""
        return self.views[self.index][self.filled:]

    def advance(self, nbytes):
        """Record ``nbytes`` written into ``target()``; True once the whole frame is in."""
        self.filled += nbytes
        self.received += nbytes
        while self.filled == len(self.views[self.index]):
            if self.index == 0 and self.header[1]:
                self._cut()
            self.index += 1
            self.filled = 0
            if self.index == len(self.views):
                return True
        return False

    def _cut(self):
        """The table is in: a part for the pickle, then one for each buffer."""
        kind, nbuf, request_id, length, references = self.header
        table = self.views[0]
        sizes = [_LENGTH.unpack_from(table, i * _LENGTH_SIZE)[0] for i in range(nbuf)]
        data_size = length - len(table) - sum(sizes)
        if data_size < 0:
            raise ProtocolError(f'buffer lengths add up past the end of a {length}-byte frame')
        self.views.append(memoryview(bytearray(data_size)))
        self.views.extend(new_buffer(size) for size in sizes)

    def frame(self):
        kind, nbuf, request_id, length, references = self.header
        if not nbuf:
            return kind, request_id, self.views[0].obj, (), references
        return kind, request_id, self.views[1].obj, self.views[2:], references


def _check_header(view, start, max_size):
    """Raise the ``ProtocolError`` for a header that breaks the format; return its fields if none does."""
    magic, version, kind, flags, request_id, length = HEADER.unpack_from(view, start)
    nbuf = flags & _BUFFER_COUNT
    if magic != MAGIC:
        raise ProtocolError(f'bad magic {bytes(magic)!r}: the peer does not speak DOPY')
    if version != VERSION:
        raise ProtocolError(f'unsupported wire version {version} (this side speaks {VERSION})')
    if kind not in KINDS:
        raise ProtocolError(f'unknown frame kind {kind}')
    if length > max_size:
        raise MessageTooLargeError(
            f'frame of {length} bytes is over the limit of {max_size} bytes')
    if length < nbuf * _LENGTH.size:
        raise ProtocolError(f'frame of {length} bytes cannot hold {nbuf} buffer lengths')
    return kind, nbuf, request_id, length


def _make_frame(header, payload):
    kind, nbuf, request_id, length, references = header
    if not nbuf:
        return kind, request_id, payload, (), references
    view = memoryview(payload)
    table = nbuf * _LENGTH.size
    sizes = [_LENGTH.unpack_from(view, i * _LENGTH.size)[0] for i in range(nbuf)]
    data_size = length - table - sum(sizes)
    if data_size < 0:
        raise ProtocolError(f'buffer lengths add up past the end of a {length}-byte frame')
    position = table + data_size
    buffers = []
    for size in sizes:
        buffers.append(view[position:position + size])
        position += size
    return kind, request_id, payload[table:table + data_size], buffers, references
