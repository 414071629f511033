"""Exceptions across the wire: pack one with its traceback, rebuild it on the other side.

The packed form is a tuple of plain values, so it always pickles::

    (exception_pickle_or_None, type_name, message, frames, traceback_text)

``frames`` are ``(filename, lineno, name, line)`` tuples, as
``traceback.extract_tb`` gives them.  The exception itself travels as a
pickle inside the pickle, so that an exception class the receiver does not
have spoils only that exception, never the reply: it becomes a
``RemoteError`` carrying the type name, message and traceback text.
"""

import pickle
import traceback

from .errors import RemoteError

__all__ = ['RemoteTraceback', 'pack', 'unpack']


class RemoteTraceback(Exception):
    """The remote side's traceback text, chained as ``__cause__`` of a rebuilt exception."""

    def __str__(self):
        return '\n' + self.args[0].rstrip('\n')


def pack(exc, tb):
    """Pack ``exc`` for the wire, with the frames of ``tb`` (None for no frames)."""
    frames = [(f.filename, f.lineno, f.name, f.line) for f in traceback.extract_tb(tb)]
    text = ''.join(traceback.format_list(frames))
    text = 'Traceback (most recent call last):\n' + text if frames else ''
    text += ''.join(traceback.format_exception_only(type(exc), exc))
    exc_pickle = None
    try:
        exc_pickle = pickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        # An exception whose __init__ cannot take back its own args pickles
        # fine but fails to load; find out here, where the message is clear.
        pickle.loads(exc_pickle)
    except Exception:
        exc_pickle = None
    cls = type(exc)
    type_name = cls.__qualname__ if cls.__module__ == 'builtins' else f'{cls.__module__}.{cls.__qualname__}'
    return exc_pickle, type_name, _safe_str(exc), frames, text


def unpack(packed):
    """Rebuild the exception from ``pack``'s tuple, ready to raise.

    The result carries ``dopy_traceback`` (a ``traceback.StackSummary`` of
    the remote frames) and has ``RemoteTraceback`` as its ``__cause__``.
    """
    exc_pickle, type_name, message, frames, text = packed
    exc = None
    if exc_pickle is not None:
        try:
            exc = pickle.loads(exc_pickle)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteError(type_name, message, text)
    exc.dopy_traceback = traceback.StackSummary.from_list(frames)
    exc.__cause__ = RemoteTraceback(text)
    return exc


def _safe_str(exc):
    try:
        return str(exc)
    except Exception:
        return f'<{type(exc).__name__} whose str() failed>'
