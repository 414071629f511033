"""One call in, one reply out: find the object and method, run it, pack the outcome.

The name policy lives here: only public names are dispatched.  A method
name must be an identifier that does not start with ``_`` (so no dunders
and no dotted paths), and it must name something callable: data attributes
and properties are refused without being read.

Nothing a caller does makes ``handle_call`` raise: a missing object, a
refused name, arguments that do not unpickle, an exception in the method,
a result that does not pickle, each becomes an ERROR reply.
"""

import logging

from . import remote_exc, wire
from .errors import NoSuchMethodError, ProtocolError, SerializationError

__all__ = ['check_method_name', 'resolve', 'handle_call', 'handle_oneway', 'error_reply']

log = logging.getLogger('dopy.dispatch')
_MISSING = object()


def check_method_name(name):
    """Raise ``NoSuchMethodError`` unless ``name`` may be dispatched."""
    if not isinstance(name, str) or not name.isidentifier() or name.startswith('_'):
        raise NoSuchMethodError(f'{name!r} is not a public method name: '
                                'names starting with "_" and dotted names are never dispatched')


def resolve(obj, name):
    """The bound method ``name`` of ``obj``, or ``NoSuchMethodError``."""
    check_method_name(name)
    class_attr = getattr(type(obj), name, _MISSING)
    if class_attr is not _MISSING and not callable(class_attr):
        raise NoSuchMethodError(f'{name!r} of {type(obj).__name__} is a data attribute, not a method')
    try:
        attr = getattr(obj, name)
    except AttributeError:
        raise NoSuchMethodError(f'{type(obj).__name__} object has no method {name!r}') from None
    if not callable(attr):
        raise NoSuchMethodError(f'{name!r} of {type(obj).__name__} is a data attribute, not a method')
    return attr


def handle_call(lookup, frame, loads=wire.loads, dumps=wire.dumps):
    """Run the CALL ``frame`` and return the reply frame's segments.

    ``lookup(name)`` finds a published object or raises
    ``NoSuchObjectError``; ``loads`` and ``dumps`` are the connection's
    pickling functions.
    """
    request_id = frame.request_id
    try:
        label, result = _run(lookup, frame, loads)
    except _Failed as failed:
        return error_reply(request_id, failed.exc, failed.tb, dumps)
    try:
        data, buffers = dumps(result)
    except Exception as exc:
        error = SerializationError(
            f'the result of {label}() could not be pickled on the server: '
            f'{type(exc).__name__}: {exc}')
        return error_reply(request_id, error, None, dumps)
    return wire.frame_segments(wire.REPLY, request_id, data, buffers)


def handle_oneway(lookup, frame, loads=wire.loads):
    """Run the ONEWAY ``frame``; its failure has no caller to go to, so it is logged."""
    try:
        _run(lookup, frame, loads)
    except _Failed as failed:
        log.warning('oneway call %d failed: %s', frame.request_id,
                    remote_exc.pack(failed.exc, failed.tb)[4].rstrip())


class _Failed(Exception):
    """How ``_run`` hands back a refused or failed call, with the frames worth showing."""

    def __init__(self, exc, tb):
        super().__init__(exc)
        self.exc = exc
        self.tb = tb


def _run(lookup, frame, loads):
    try:
        name, method_name, args, kwargs = _load_call(frame, loads)
        method = resolve(lookup(name), method_name)
    except Exception as exc:
        log.debug('refused call %d: %s', frame.request_id, exc)
        raise _Failed(exc, None) from None
    label = f'{name}.{method_name}'
    try:
        return label, method(*args, **kwargs)
    except BaseException as exc:  # a remote SystemExit is the caller's to see, not the server's to obey
        log.debug('%s raised %r', label, exc)
        raise _Failed(exc, exc.__traceback__.tb_next) from None


def error_reply(request_id, exc, tb, dumps=wire.dumps):
    """The segments of an ERROR frame carrying ``exc`` and the frames of ``tb``."""
    data, buffers = dumps(remote_exc.pack(exc, tb))
    return wire.frame_segments(wire.ERROR, request_id, data, buffers)


def _load_call(frame, loads):
    try:
        message = loads(frame.data, frame.buffers)
    except Exception as exc:
        raise SerializationError(f'the call could not be unpickled on the server: '
                                 f'{type(exc).__name__}: {exc}') from exc
    if not (isinstance(message, tuple) and len(message) == 4):
        raise ProtocolError('a CALL frame must hold (object, method, args, kwargs)')
    name, method_name, args, kwargs = message
    if not isinstance(name, str) or not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise ProtocolError('a CALL frame must hold (str, str, tuple, dict)')
    return name, method_name, args, kwargs
