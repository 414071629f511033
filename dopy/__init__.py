"""DOPY, Distributed Objects for Python: call objects in another process as if they were here."""

from . import auth, naming, rsh, tb, tcp
from .errors import (AuthenticationError, CallTimeoutError, CommunicationError, ConnectionClosedError,
                     ConnectionLostError, DopyError, MessageTooLargeError,
                     NamingError, NoSuchMethodError, NoSuchObjectError, ProtocolError, RemoteError,
                     SerializationError)
from .hub import THRD_CONN, THRD_FUNC, THRD_NONE, Hub, getHub, init
from .proxy import Ref, RemoteObject, close, ref

__version__ = '1.0.0'

__all__ = [
    'Hub', 'getHub', 'init', 'THRD_CONN', 'THRD_FUNC', 'THRD_NONE',
    'RemoteObject', 'Ref', 'ref', 'close', 'auth', 'naming', 'rsh', 'tb', 'tcp',
    'DopyError', 'AuthenticationError', 'CommunicationError', 'ConnectionClosedError', 'ConnectionLostError',
    'CallTimeoutError', 'ProtocolError', 'MessageTooLargeError', 'SerializationError',
    'NoSuchObjectError', 'NoSuchMethodError', 'NamingError', 'RemoteError',
]
