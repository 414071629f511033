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
"""

import ctypes

__all__ = ['new_buffer', 'as_bytes']

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
