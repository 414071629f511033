"""The wire format, without sockets: frames in, bytes out, and back, whatever the chunking."""

import array
import pickle
import struct
import tracemalloc
import unittest

from dopy import wire
from dopy.errors import MessageTooLargeError, ProtocolError


def frames_of(decoder):
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def decoded(frame):
    kind, request_id, data, buffers, _ = frame
    return kind, request_id, wire.loads(data, buffers)


MESSAGES = [
    (wire.CALL, 1, ('obj', 'method', (1, 'two', [3.0]), {'k': None})),
    (wire.REPLY, 2, {'result': b'\x00' * 100}),
    (wire.ERROR, 2 ** 64 - 1, ('packed', 'error')),
    (wire.REPLY, 0, None),
]


def _fill(buffer, data):
    """A ``recv_into`` that brings all of ``data`` at once."""
    buffer[:len(data)] = data
    return len(data)


class FrameLayout(unittest.TestCase):
    def test_header_is_24_bytes_at_the_documented_offsets(self):
        data = wire.encode(wire.CALL, 0x0102030405060708, 'x')
        self.assertEqual(data[0:4], b'DOPY')
        self.assertEqual(data[4], wire.VERSION)
        self.assertEqual(data[5], wire.CALL)
        self.assertEqual(data[6:8], b'\x00\x00')
        self.assertEqual(data[8:16], bytes([1, 2, 3, 4, 5, 6, 7, 8]))
        self.assertEqual(struct.unpack('!Q', data[16:24])[0], len(data) - 24)
        self.assertEqual(pickle.loads(data[24:]), 'x')

    def test_the_references_flag_is_the_top_bit_of_the_buffer_count(self):
        plain = wire.encode(wire.REPLY, 1, 'x')
        flagged = wire.encode(wire.REPLY, 1, 'x', references=True)
        self.assertEqual(plain[6:8], b'\x00\x00')
        self.assertEqual(flagged[6:8], b'\x80\x00')
        data, buffers = wire.dumps(pickle.PickleBuffer(bytearray(1 << 17)))
        head = wire.frame_segments(wire.REPLY, 1, data, buffers, references=True)[0]
        self.assertEqual(head[6:8], b'\x80\x01')

    def test_every_frame_says_whether_its_pickle_may_hold_references(self):
        big = wire.out_of_band(bytes(1 << 17))
        cases = [('small', False, 1), ('small', True, 1), (big, False, 1), (big, True, 1),
                 ('y' * (1 << 19), True, 1 << 16), (big, True, 1 << 16)]
        for value, references, chunk in cases:
            with self.subTest(references=references, chunk=chunk, size=len(wire.encode(wire.REPLY, 1, value))):
                data = wire.encode(wire.REPLY, 1, value, references=references)
                decoder = wire.Decoder()
                for i in range(0, len(data), chunk):
                    decoder.feed(data[i:i + chunk])
                frame = wire.Frame._make(decoder.next_frame())
                self.assertIs(frame.references, references)
                self.assertEqual(decoded(frame)[2], value.data if value is big else value)

    def test_a_lone_frame_received_whole_keeps_its_references_flag(self):
        for references in (False, True):
            with self.subTest(references=references):
                data = wire.encode(wire.REPLY, 9, 'one', references=references)
                frame = wire.Frame._make(wire.Decoder().receive(lambda buffer: _fill(buffer, data)))
                self.assertIs(frame.references, references)

    def test_small_message_is_one_segment(self):
        data, buffers = wire.dumps(('o', 'm', (1,), {}))
        self.assertEqual(len(wire.frame_segments(wire.CALL, 1, data, buffers)), 1)

    def test_large_buffer_travels_out_of_band_as_its_own_segment(self):
        payload = bytearray(range(256)) * 1024
        data, buffers = wire.dumps(pickle.PickleBuffer(payload))
        self.assertEqual(len(buffers), 1)
        self.assertLess(len(data), 1000)
        segments = wire.frame_segments(wire.REPLY, 5, data, buffers)
        self.assertEqual(len(segments), 2)
        self.assertEqual(bytes(segments[1]), payload)

    def test_plain_values_frame_as_with_the_buffer_callback(self):
        for value in (42, 2 ** 70, -1.5, 'text', True, None):
            with self.subTest(value=value):
                data, buffers = wire.dumps(value)
                self.assertEqual(wire.message_segments(wire.REPLY, 3, value),
                                 wire.frame_segments(wire.REPLY, 3, data, buffers))
        message = ('o', 'm', (1, 'two', None), {})
        data, buffers = wire.dumps(message)
        self.assertEqual(wire.message_segments(wire.CALL, 4, message, plain=True),
                         wire.frame_segments(wire.CALL, 4, data, buffers))

    def test_values_that_are_not_plain_still_send_large_buffers_out_of_band(self):
        payload = bytearray(wire.OUT_OF_BAND_THRESHOLD)
        for value in (pickle.PickleBuffer(payload), [wire.out_of_band(payload)]):
            with self.subTest(type=type(value).__name__):
                segments = wire.message_segments(wire.REPLY, 5, value)
                self.assertEqual(len(segments), 2)
                self.assertEqual(len(segments[1]), len(payload))

    def test_plain_framing_still_rejects_bad_kind_and_request_id(self):
        with self.assertRaises(ValueError):
            wire.message_segments(99, 1, 42)
        with self.assertRaises(ValueError):
            wire.message_segments(wire.REPLY, 2 ** 64, 'x', plain=True)

    def test_rejects_bad_kind_and_request_id_when_encoding(self):
        with self.assertRaises(ValueError):
            wire.frame_segments(99, 1, b'')
        with self.assertRaises(ValueError):
            wire.frame_segments(wire.CALL, -1, b'')
        with self.assertRaises(ValueError):
            wire.frame_segments(wire.CALL, 2 ** 64, b'')


class OutOfBand(unittest.TestCase):
    def round_trip(self, value):
        data, buffers = wire.dumps(wire.out_of_band(value))
        decoder = wire.Decoder()
        decoder.feed(b''.join(bytes(s) for s in wire.frame_segments(wire.REPLY, 1, data, buffers)))
        return data, buffers, decoded(decoder.next_frame())[2]

    def test_large_bytes_and_bytearray_leave_the_pickle_and_come_back_as_themselves(self):
        for value in (bytes(range(256)) * 400, bytearray(b'z' * 100_000)):
            with self.subTest(type=type(value)):
                data, buffers, back = self.round_trip(value)
                self.assertEqual(len(buffers), 1)
                self.assertLess(len(data), 200)
                self.assertIs(type(back), type(value))
                self.assertEqual(back, value)

    def test_a_memoryview_comes_back_as_a_memoryview_with_its_format_and_shape(self):
        large = bytes(range(256)) * 400
        cases = [(memoryview(b'small'), 0), (memoryview(large), 1),
                 (memoryview(array.array('d', [1.5, 2.5])), 0),
                 (memoryview(bytearray(range(12))).cast('B', (3, 4)), 0)]
        for view, out_of_band in cases:
            with self.subTest(format=view.format, shape=view.shape, size=view.nbytes):
                _, buffers, back = self.round_trip(view)
                self.assertEqual(len(buffers), out_of_band)
                self.assertIs(type(back), memoryview)
                self.assertEqual((back.format, back.shape), (view.format, view.shape))
                self.assertEqual(back.tolist(), view.tolist())

    def test_a_non_contiguous_memoryview_does_not_pickle(self):
        with self.assertRaises(pickle.PicklingError):
            wire.dumps(wire.out_of_band(memoryview(bytes(10))[::2]))

    def test_small_values_and_other_types_stay_as_they_are(self):
        for value in (b'small', bytearray(b'x' * 100), 'text' * 50_000, [b'y' * 100_000]):
            with self.subTest(type=type(value)):
                self.assertIs(wire.out_of_band(value), value)


class Decoding(unittest.TestCase):
    def test_frames_larger_than_the_first_staging_buffer_decode(self):
        messages = [(wire.REPLY, i, b'm' * size) for i, size in enumerate((10, 20_000, 100_000, 250_000, 5))]
        stream = b''.join(wire.encode(*m) for m in messages)
        decoder = wire.Decoder()
        for i in range(0, len(stream), 4096):
            decoder.feed(stream[i:i + 4096])
        self.assertEqual([decoded(f) for f in frames_of(decoder)], messages)

    def test_every_message_fed_one_byte_at_a_time(self):
        stream = b''.join(wire.encode(*m) for m in MESSAGES)
        decoder = wire.Decoder()
        got = []
        for i in range(len(stream)):
            decoder.feed(stream[i:i + 1])
            got.extend(frames_of(decoder))
        self.assertEqual([decoded(f) for f in got], MESSAGES)
        self.assertEqual(decoder.pending, 0)

    def test_many_messages_in_one_chunk(self):
        stream = b''.join(wire.encode(*m) for m in MESSAGES * 50)
        decoder = wire.Decoder()
        decoder.feed(stream)
        self.assertEqual([decoded(f) for f in frames_of(decoder)], MESSAGES * 50)

    def test_truncated_input_yields_nothing_until_complete(self):
        data = wire.encode(wire.REPLY, 3, list(range(100)))
        for cut in (1, 4, 23, 24, 25, len(data) - 1):
            decoder = wire.Decoder()
            decoder.feed(data[:cut])
            self.assertIsNone(decoder.next_frame(), f'cut at {cut}')
            self.assertEqual(decoder.pending, cut)
            decoder.feed(data[cut:])
            self.assertEqual(decoded(decoder.next_frame()), (wire.REPLY, 3, list(range(100))))

    def test_large_frame_fed_one_byte_then_in_chunks(self):
        payload = bytearray(b'abc' * 200_000)
        data, buffers = wire.dumps([pickle.PickleBuffer(payload), 'tail'])
        stream = b''.join(bytes(s) for s in wire.frame_segments(wire.REPLY, 9, data, buffers))
        stream += wire.encode(wire.REPLY, 10, 'next')
        decoder = wire.Decoder()
        for i in range(100):
            decoder.feed(stream[i:i + 1])
        for i in range(100, len(stream), 7777):
            decoder.feed(stream[i:i + 7777])
        first, second = frames_of(decoder)
        value = decoded(first)[2]
        self.assertEqual(bytes(value[0]), bytes(payload))
        self.assertEqual(value[1], 'tail')
        self.assertEqual(decoded(second), (wire.REPLY, 10, 'next'))

    def test_large_payload_is_received_in_place_with_get_buffer(self):
        payload = bytearray(b'\x5a' * (3 << 20))
        data, buffers = wire.dumps(pickle.PickleBuffer(payload))
        stream = memoryview(b''.join(bytes(s) for s in wire.frame_segments(wire.REPLY, 1, data, buffers)))
        decoder = wire.Decoder()
        position = 0
        while position < len(stream):
            target = decoder.get_buffer()
            self.assertGreater(len(target), 0)
            n = min(len(target), len(stream) - position, 1 << 20)
            target[:n] = stream[position:position + n]
            position += n
            decoder.advance(n)
        self.assertEqual(bytes(decoded(decoder.next_frame())[2]), bytes(payload))


class Receiving(unittest.TestCase):
    """``receive``: one ``recv_into`` straight into the decoder, and the next frame out."""

    @staticmethod
    def chunks(*pieces):
        """A ``recv_into`` that delivers ``pieces`` one per call, then the end of the stream."""
        pieces = list(pieces)

        def recv_into(buffer):
            if not pieces:
                return 0
            piece = pieces.pop(0)
            buffer[:len(piece)] = piece
            return len(piece)
        return recv_into

    def test_every_frame_comes_out_in_order_whatever_the_chunks(self):
        stream = b''.join(wire.encode(*m) for m in MESSAGES * 3)
        recv = self.chunks(stream[:30], stream[30:31], stream[31:200], stream[200:])
        decoder = wire.Decoder()
        got = []
        with self.assertRaises(EOFError):
            while True:
                frame = decoder.receive(recv)
                while frame is not None:
                    got.append(decoded(frame))
                    frame = decoder.next_frame()
        self.assertEqual(got, MESSAGES * 3)

    def test_a_lone_frame_owns_its_pickle_after_later_receives(self):
        first, second = wire.encode(wire.REPLY, 1, 'first'), wire.encode(wire.REPLY, 2, 'second')
        decoder = wire.Decoder()
        recv = self.chunks(first, second)
        frame = decoder.receive(recv)
        self.assertIsInstance(wire.Frame._make(frame).data, (bytes, bytearray))
        self.assertEqual(decoded(decoder.receive(recv)), (wire.REPLY, 2, 'second'))
        self.assertEqual(decoded(frame), (wire.REPLY, 1, 'first'))

    def test_every_frame_s_pickle_is_bytes_like_with_or_without_buffers(self):
        big = b'x' * wire.OUT_OF_BAND_THRESHOLD
        for message in ('small', wire.out_of_band(big), 'y' * (1 << 19)):
            with self.subTest(size=len(wire.encode(wire.REPLY, 1, message))):
                decoder = wire.Decoder()
                decoder.feed(wire.encode(wire.REPLY, 1, message))
                frame = wire.Frame._make(decoder.next_frame())
                self.assertIsInstance(frame.data, (bytes, bytearray))

    def test_frames_waiting_behind_the_first_are_copies_that_outlive_later_receives(self):
        two = wire.encode(wire.REPLY, 1, 'one') + wire.encode(wire.REPLY, 2, 'two')
        decoder = wire.Decoder()
        recv = self.chunks(two, wire.encode(wire.REPLY, 3, 'three'))
        self.assertEqual(decoded(decoder.receive(recv)), (wire.REPLY, 1, 'one'))
        waiting = decoder.next_frame()
        self.assertEqual(decoded(decoder.receive(recv)), (wire.REPLY, 3, 'three'))
        self.assertEqual(decoded(waiting), (wire.REPLY, 2, 'two'))

    def test_end_of_stream_is_an_eof_error(self):
        with self.assertRaises(EOFError):
            wire.Decoder().receive(self.chunks())

    def test_a_bad_header_is_refused_on_receipt(self):
        with self.assertRaises(ProtocolError):
            wire.Decoder().receive(self.chunks(b'HTTP/1.1 200 OK\r\n' + bytes(30)))


class LargeFrames(unittest.TestCase):
    """Frames too large for the staging buffer: received in place, each out-of-band buffer in memory of its own."""

    @staticmethod
    def framed(value):
        data, buffers = wire.dumps(wire.out_of_band(value))
        return memoryview(b''.join(bytes(s) for s in wire.frame_segments(wire.REPLY, 1, data, buffers)))

    @staticmethod
    def decoded_frame(stream, chunk=1 << 16):
        """``stream`` fed to a decoder through ``get_buffer``/``advance``, as a socket would: its one frame."""
        decoder = wire.Decoder()
        position = 0
        while position < len(stream):
            target = decoder.get_buffer()
            n = min(len(target), len(stream) - position, chunk)
            target[:n] = stream[position:position + n]
            position += n
            decoder.advance(n)
        return decoder.next_frame()

    def received(self, value, chunk=1 << 16):
        return self.decoded_frame(self.framed(value), chunk)

    def test_a_large_bytes_value_is_received_into_the_object_it_becomes(self):
        value = bytes(range(256)) * (16 << 10)
        stream = self.framed(value)
        tracemalloc.start()
        try:
            frame = self.decoded_frame(stream)
            back = decoded(frame)[2]
            del frame
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        self.assertIs(type(back), bytes)
        self.assertEqual(back, value)
        # One payload's worth: received in place, never copied into a second object.
        self.assertLess(peak, 1.25 * len(value))

    def test_large_bytearray_and_memoryview_values_come_back_as_themselves(self):
        for value in (bytearray(b'q' * (3 << 20)), memoryview(bytearray(b'v' * (3 << 20))).cast('B', (3, 1 << 20))):
            with self.subTest(type=type(value)):
                back = wire.load_frame(self.received(value))
                self.assertIs(type(back), type(value))
                self.assertEqual(back, value)

    def test_several_large_buffers_in_one_frame_keep_their_order(self):
        values = [b'a' * (1 << 20), b'b' * (2 << 20), b'', b'c' * 300_000]
        back = wire.load_frame(self.received([wire.out_of_band(v) for v in values], chunk=99_999))
        self.assertEqual(back, values)

    def test_buffer_lengths_past_the_end_of_a_large_frame_are_refused_before_allocating(self):
        table = struct.pack('!QQ', 1 << 40, 1 << 40)
        header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.REPLY, 2, 1, 1 << 20)
        decoder = wire.Decoder()
        with self.assertRaises(ProtocolError) as caught:
            decoder.feed(header + table)
        self.assertIn('past the end', str(caught.exception))


class Refusals(unittest.TestCase):
    def header(self, magic=b'DOPY', version=wire.VERSION, kind=wire.CALL, nbuf=0, rid=1, length=0):
        return wire.HEADER.pack(magic, version, kind, nbuf, rid, length)

    def assert_refused(self, data, error=ProtocolError, max_size=wire.DEFAULT_MAX_MESSAGE_SIZE):
        decoder = wire.Decoder(max_size)
        with self.assertRaises(error) as caught:
            decoder.feed(data)
        return caught.exception

    def test_wrong_magic(self):
        error = self.assert_refused(self.header(magic=b'HTTP'))
        self.assertIn('magic', str(error))

    def test_wrong_magic_is_refused_before_a_whole_header_arrives(self):
        self.assert_refused(b'GET / HTTP/1.1\r\n')

    def test_wrong_version(self):
        error = self.assert_refused(self.header(version=wire.VERSION + 1))
        self.assertIn('version', str(error))

    def test_unknown_kind(self):
        self.assert_refused(self.header(kind=200))

    def test_oversized_frame_refused_from_its_header_alone(self):
        error = self.assert_refused(self.header(length=2 ** 60), MessageTooLargeError)
        self.assertIn(str(2 ** 60), str(error))

    def test_size_limit_is_the_decoders_setting(self):
        self.assert_refused(self.header(length=1001), MessageTooLargeError, max_size=1000)
        decoder = wire.Decoder(1000)
        decoder.feed(wire.encode(wire.REPLY, 1, b'x' * 900))
        self.assertIsNotNone(decoder.next_frame())

    def test_buffer_table_longer_than_the_frame(self):
        self.assert_refused(self.header(nbuf=3, length=8))

    def test_buffer_lengths_past_the_end_of_the_frame(self):
        table = struct.pack('!Q', 1000)
        self.assert_refused(self.header(nbuf=1, length=len(table) + 4) + table + b'abcd')

    def test_negative_limit_is_a_value_error(self):
        with self.assertRaises(ValueError):
            wire.Decoder(-1)


if __name__ == '__main__':
    unittest.main()
