"""One call in, one reply out: find the object and method, run it, pack the outcome.

The name policy lives here: only public names are dispatched.  A method
name must be an identifier that does not start with ``_`` (so no dunders
and no dotted paths), and it must name something callable: data attributes
and properties are refused without being read.

Nothing a caller does makes ``prepare``, a ``Call``, ``run`` or
``reply_segments`` raise: a missing object, a refused name, arguments that
do not unpickle, an exception in the method, a result that does not
pickle, each becomes an ERROR reply.  Running and replying are apart so
that the connection can pickle and send a reply in one step, without
holding its send lock while the method runs.
"""

import logging
from collections import namedtuple

from . import remote_exc, wire
from .errors import NoSuchMethodError, ProtocolError, SerializationError

__all__ = ['CONTAINER_METHODS', 'Call', 'Outcome', 'check_method_name', 'resolve', 'prepare',
           'prepare_message', 'unpicklable', 'failed', 'run', 'reply_segments', 'log_oneway', 'error_reply']

log = logging.getLogger('dopy.dispatch')
_MISSING = object()

# The only dunders dispatched: a proxy forwards these so that it can be
# used like a container.  ``__iter__`` returns the items as one list.
CONTAINER_METHODS = frozenset(
    ('__len__', '__contains__', '__getitem__', '__setitem__', '__delitem__', '__iter__'))

# Method names already found public, so that a call's name is checked by
# one set lookup.  Bounded: a peer sending made-up names cannot grow it.
_public_names = set()
_MAX_PUBLIC_NAMES = 4096


def check_method_name(name):
    """Raise ``NoSuchMethodError`` unless ``name`` may be dispatched."""
    if isinstance(name, str) and name in CONTAINER_METHODS:
        return
    if not isinstance(name, str) or not name.isidentifier() or name.startswith('_'):
        raise NoSuchMethodError(f'{name!r} is not a public method name: '
                                'names starting with "_" and dotted names are never dispatched')


def resolve(obj, name, exposed=None):
    """The bound method ``name`` of ``obj``, or ``NoSuchMethodError``.

    ``exposed``, when not None, is the set of the only names that may be called.
    """
    if type(name) is not str or name not in _public_names:
        check_method_name(name)
        if name not in CONTAINER_METHODS and len(_public_names) < _MAX_PUBLIC_NAMES:
            _public_names.add(name)
    if exposed is not None and name not in exposed:
        raise NoSuchMethodError(f'{name!r} is not among the methods this object exposes')
    if name in CONTAINER_METHODS:
        return _container_method(obj, name)
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


def _container_method(obj, name):
    if getattr(type(obj), name, None) is None:
        raise NoSuchMethodError(f'{type(obj).__name__} object does not support {name}')
    if name == '__iter__':
        return lambda: list(obj)
    return getattr(obj, name)


class Outcome(namedtuple('Outcome', ('label', 'ok', 'value', 'tb'), defaults=(None,))):
    """What running one call came to: a result, or an exception with the frames worth showing."""

    __slots__ = ()


# Outcomes are made by the tuple's own constructor: no Python frame of
# ``Outcome.__new__`` on each call's path.
_new = tuple.__new__


class Call:
    """A call ready to run: its arguments unpickled and its method found, or the error that stopped it."""

    __slots__ = ('label', 'method', 'args', 'kwargs', 'error')

    def __init__(self, label, method, args, kwargs, error=None):
        self.label = label
        self.method = method
        self.args = args
        self.kwargs = kwargs
        self.error = error

    def __call__(self):
        """Run it: the ``Outcome``."""
        if self.error is not None:
            return _new(Outcome, (None, False, self.error, None))
        return _invoke(self.label, self.method, self.args, self.kwargs)


def prepare(lookup, frame, loads=wire.load_frame):
    """Unpickle the CALL or ONEWAY ``frame`` and find its method; never raises for the caller's mistakes.

    ``lookup(name)`` returns ``(object, exposed)`` (``exposed`` is None or
    the set of callable names) or raises ``NoSuchObjectError``;
    ``loads(frame)`` is the connection's unpickling of a frame.  Preparing is apart
    from running so that the connection can unpickle every frame in the
    order it came, and run the call on another thread.
    """
    try:
        message = loads(frame)
    except Exception as exc:
        return unpicklable(exc)
    return prepare_message(lookup, message)


def unpicklable(exc):
    """The ``Call`` refused for a CALL frame that did not unpickle, raising ``exc``."""
    return _refused(_unpickling_error(exc))


def _unpickling_error(exc):
    error = SerializationError(f'the call could not be unpickled on the server: '
                               f'{type(exc).__name__}: {exc}')
    error.__cause__ = exc
    return error


def _refused(exc):
    log.debug('refused call: %s', exc)
    return Call(None, None, None, None, exc)


def run(lookup, frame, loads=wire.loads):
    """``prepare(lookup, frame, loads)()`` in one step, for a call run in the thread that read it: the ``Outcome``.

    The arguments are let go of before it returns, so that references
    among them are released before the reply is sent.
    """
    try:
        label, method, args, kwargs = _find(lookup, frame, loads)
    except Exception as exc:
        log.debug('refused call %d: %s', frame[1], exc)  # its request id
        return _new(Outcome, (None, False, exc, None))
    return _invoke(label, method, args, kwargs)


def _invoke(label, method, args, kwargs):
    try:
        return _new(Outcome, (label, True, method(*args, **kwargs), None))
    except BaseException as exc:  # a remote SystemExit is the caller's to see, not the server's to obey
        return failed(label, exc)


def failed(label, exc):
    """The ``Outcome`` of a call to ``label`` whose method raised ``exc``, caught in the frame that called it."""
    log.debug('%s.%s raised %r', *label, exc)
    return _new(Outcome, (label, False, exc, exc.__traceback__.tb_next))


def reply_segments(request_id, outcome, references=False):
    """The REPLY or ERROR frame for ``outcome``; a result that does not pickle becomes an ERROR.

    ``references``: pickled in a connection's context (see ``wire.frame_segments``).
    """
    if not outcome.ok:
        return error_reply(request_id, outcome.value, outcome.tb, references)
    value = outcome.value
    if type(value) in wire.OUT_OF_BAND_TYPES:
        value = wire.out_of_band(value)
    try:
        return wire.message_segments(wire.REPLY, request_id, value, references=references)
    except Exception as exc:
        error = SerializationError(
            f'the result of {".".join(outcome.label)}() could not be pickled on the server: '
            f'{type(exc).__name__}: {exc}')
        return error_reply(request_id, error, None, references)


def log_oneway(request_id, outcome):
    """A oneway call's failure has no caller to go to: log it."""
    if not outcome.ok:
        log.warning('oneway call %d failed: %s', request_id,
                    remote_exc.pack(outcome.value, outcome.tb)[4].rstrip())


def error_reply(request_id, exc, tb, references=False):
    """The segments of an ERROR frame carrying ``exc`` and the frames of ``tb``."""
    return wire.message_segments(wire.ERROR, request_id, remote_exc.pack(exc, tb), references=references)


def _find(lookup, frame, loads):
    """``(label, method, args, kwargs)`` for the call in ``frame``, or the exception that refuses it.

    The label, ``(object name, method name)``, is joined only for a message.
    """
    try:
        message = loads(frame)
    except Exception as exc:
        raise _unpickling_error(exc) from exc
    return _find_in(lookup, message)


def _find_in(lookup, message):
    if not (isinstance(message, tuple) and len(message) == 4):
        raise ProtocolError('a CALL frame must hold (object, method, args, kwargs)')
    name, method_name, args, kwargs = message
    if not isinstance(name, str) or not isinstance(args, tuple) or not isinstance(kwargs, dict):
        raise ProtocolError('a CALL frame must hold (str, str, tuple, dict)')
    obj, exposed = lookup(name)
    return (name, method_name), resolve(obj, method_name, exposed), args, kwargs


def prepare_message(lookup, message):
    """The ``Call`` for a CALL frame's unpickled ``message``; never raises for the caller's mistakes."""
    try:
        return Call(*_find_in(lookup, message))
    except Exception as exc:
        return _refused(exc)
