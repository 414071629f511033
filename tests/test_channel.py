"""The channel: frames over a real socket pair, and DOPY's errors for everything that can go wrong on one."""

import socket
import threading
import time
import unittest

from dopy import wire
from dopy.channel import Channel
from dopy.errors import CallTimeoutError, ConnectionLostError, ProtocolError
from dopy.streams import SocketStream

SHORT = 0.2


class Channels(unittest.TestCase):
    def setUp(self):
        left, right = socket.socketpair()
        self.addCleanup(left.close)
        self.addCleanup(right.close)
        self.left = Channel(SocketStream(left), wire.DEFAULT_MAX_MESSAGE_SIZE, 'the right end')
        self.right = Channel(SocketStream(right), 1 << 20, 'the left end')
        self.left_sock, self.right_sock = left, right

    def read(self, channel, deadline=None):
        """The next frame ``channel`` reads, its fields named, waiting no longer than ``deadline``."""
        while True:
            channel.wait_readable(deadline)
            try:
                frame = channel.receive(channel.stream.recv_into)
            except BlockingIOError:
                continue
            if frame is not None:
                return wire.Frame._make(frame)

    def test_a_frame_sent_is_the_frame_read(self):
        self.left.send(wire.plain_frame(wire.CALL, 7, ('obj', 'echo', (42,), {})), None)
        frame = self.read(self.right)
        self.assertEqual((frame.kind, frame.request_id), (wire.CALL, 7))
        self.assertEqual(wire.loads(frame.data), ('obj', 'echo', (42,), {}))

    def reading(self, count):
        """The frames the right end reads, ``count`` of them, in a thread: (the list they go in, the thread)."""
        received = []
        reader = threading.Thread(target=lambda: received.extend(
            self.read(self.right, time.monotonic() + 10) for _ in range(count)))
        reader.start()
        return received, reader

    def test_a_frame_in_segments_is_one_frame_read(self):
        blob = b'x' * (1 << 19)
        received, reader = self.reading(1)
        self.left.send_segments(wire.message_segments(wire.REPLY, 1, wire.out_of_band(blob)), time.monotonic() + 10)
        reader.join(10)
        frame, = received
        self.assertEqual(wire.loads(frame.data, frame.buffers), blob)

    def test_frames_larger_than_the_socket_buffer_go_out_whole_while_the_peer_reads(self):
        self.left_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        frames = [wire.encode(wire.REPLY, i, bytes(200_000)) for i in range(3)]
        received, reader = self.reading(len(frames))
        for data in frames:
            self.left.send(data, time.monotonic() + 10)
        reader.join(10)
        self.assertEqual([f.request_id for f in received], [0, 1, 2])

    def test_the_peer_closing_is_a_lost_connection_with_no_cause(self):
        self.left_sock.close()
        with self.assertRaises(ConnectionLostError) as caught:
            self.read(self.right, time.monotonic() + 10)
        self.assertIsNone(caught.exception.__cause__)
        self.assertEqual(str(caught.exception), 'the left end closed the connection')

    def test_a_send_to_a_closed_peer_is_a_lost_connection_caused_by_the_os_error(self):
        self.right_sock.close()
        with self.assertRaises(ConnectionLostError) as caught:
            for _ in range(100):
                self.left.send(wire.encode(wire.REPLY, 1, bytes(65536)), time.monotonic() + 10)
        self.assertIsInstance(caught.exception.__cause__, OSError)

    def test_a_send_the_peer_never_reads_times_out_at_its_deadline(self):
        self.left_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        start = time.monotonic()
        with self.assertRaises(CallTimeoutError):
            self.left.send(bytes(8 << 20), start + SHORT)
        self.assertGreaterEqual(time.monotonic(), start + SHORT)

    def test_a_read_with_nothing_coming_times_out_at_its_deadline(self):
        start = time.monotonic()
        with self.assertRaises(CallTimeoutError):
            self.read(self.right, start + SHORT)
        self.assertGreaterEqual(time.monotonic(), start + SHORT)

    def test_bytes_that_are_not_dopy_are_a_protocol_error(self):
        self.left_sock.sendall(b'GET / HTTP/1.1\r\n\r\n' + bytes(24))
        with self.assertRaises(ProtocolError):
            self.read(self.right, time.monotonic() + 10)

    def test_a_frame_over_the_readers_limit_is_refused_before_its_body_comes(self):
        header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.CALL, 0, 1, 2 << 20)
        self.left_sock.sendall(header)
        with self.assertRaises(ProtocolError):
            self.read(self.right, time.monotonic() + 10)


if __name__ == '__main__':
    unittest.main()
