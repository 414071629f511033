"""Receive buffers: memory for a large out-of-band buffer to be received into, which becomes a ``bytes`` object without a copy.

Python cannot receive into a ``bytes`` object, so a large ``bytes``
argument or result would arrive in a ``bytearray`` and be copied into a
``bytes`` object at the end: a second payload's worth of memory, and the
time to copy it.  Here a new ``bytes`` object of the buffer's size is
made by CPython's own ``PyBytes_FromStringAndSize(NULL, n)``, the way C
code fills one before anyone else sees it, and a writable view of its
memory is what the socket fills.  ``as_bytes`` then hands out that very
object.  Nothing writes to it after that: a ``bytes`` object stays
immutable from the moment anyone can see it.

Where that function is out of reach (an interpreter other than CPython),
``new_buffer`` falls back to a ``bytearray``, and ``as_bytes`` copies.

Large blocks of such memory go back to the system once freed, where the
C library can be asked to: see ``give_back_large_blocks``.
"""

import ctypes
import os

__all__ = ['new_buffer', 'as_bytes', 'give_back_large_blocks', 'LARGE_BLOCK']

try:
    _new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
    _new_bytes.restype = ctypes.py_object
    _new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    # Where a bytes object's data starts: its fixed part, less the byte
    # that holds the terminating NUL.
    _DATA_OFFSET = bytes.__basicsize__ - 1
except (AttributeError, TypeError):
    _new_bytes = None

# Below this, CPython may hand out a shared object (the empty bytes, or a
# single byte), which must never be written to.
_MIN_SIZE = 2


def new_buffer(size):
    """A writable memoryview of ``size`` bytes to receive into (format ``'B'``)."""
    if _new_bytes is None or size < _MIN_SIZE:
        return memoryview(bytearray(size))
    data = _new_bytes(None, size)
    memory = (ctypes.c_char * size).from_address(id(data) + _DATA_OFFSET)
    # The ctypes array does not own the memory: keep its owner alive with it.
    memory.dopy_bytes = data
    return memoryview(memory).cast('B')


def as_bytes(buffer):
    """``buffer`` as a ``bytes`` object: the one ``new_buffer`` filled, if it is that whole buffer, else a copy."""
    view = memoryview(buffer)
    data = getattr(view.obj, 'dopy_bytes', None)
    if type(data) is bytes and len(data) == view.nbytes:
        return data
    return bytes(view)


# glibc's malloc takes a block of its mmap threshold or more (128 KiB at
# first) from a mapping of its own, unmapped when the block is freed; but
# each such free raises the threshold to the block's size, up to 32 MiB.
# After the first large payload, then, the next ones come from the heap of
# the thread that receives them, and stay there once freed: after a run of
# 16 MiB payloads, tens of MiB per thread.  A threshold set with mallopt
# stays where it is set, and other C libraries need none of this.  The
# trim threshold, which setting one fixes as well, is set as glibc would
# move it, to twice the mmap threshold: free memory at the top of a heap is
# kept up to that much, so that smaller payloads reuse it.
LARGE_BLOCK = 4 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _glibc_mallopt():
    if ({'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_'} & set(os.environ)
            or '_threshold' in os.environ.get('GLIBC_TUNABLES', '')):
        return None  # the user's choice stands
    try:
        if not os.confstr('CS_GNU_LIBC_VERSION'):
            return None
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, ValueError, OSError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return mallopt


_mallopt = _glibc_mallopt()


def give_back_large_blocks():
    """From now on, have every freed block of ``LARGE_BLOCK`` bytes or more go back to the system.

    Called when a large payload first comes or goes, so that a process
    that never moves one keeps its C library's settings; later calls do
    nothing.  With glibc it fixes malloc's mmap and trim thresholds, unless
    the environment sets either (MALLOC_MMAP_THRESHOLD_,
    MALLOC_TRIM_THRESHOLD_, GLIBC_TUNABLES); elsewhere it does nothing.
    """
    global _mallopt
    mallopt, _mallopt = _mallopt, None
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK)
        mallopt(_M_TRIM_THRESHOLD, 2 * LARGE_BLOCK)
