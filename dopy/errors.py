"""The exception tree of DOPY: every error the library raises on purpose.

::

    DopyError
    ├── CommunicationError (also ConnectionError)
    │   ├── ConnectionClosedError      you closed it, or used it after close
    │   ├── ConnectionLostError        the peer or the network went away
    │   ├── CallTimeoutError           (also TimeoutError)
    │   ├── ProtocolError              bad magic, version, kind or id
    │   │   └── MessageTooLargeError
    │   └── AuthenticationError        a wrong or missing authkey, or a refused connection
    ├── SerializationError             pickling failed; says which side and what
    ├── NoSuchObjectError              (also LookupError)
    ├── NoSuchMethodError              (also AttributeError)
    ├── NamingError                    (also KeyError) a name that is not bound, or not valid
    └── RemoteError                    a remote exception that could not be rebuilt

A remote exception that *can* be rebuilt is raised as itself, not as one of
these: see ``dopy.remote_exc``.
"""

from __future__ import annotations

__all__ = [
    'DopyError', 'CommunicationError', 'ConnectionClosedError',
    'ConnectionLostError', 'CallTimeoutError', 'ProtocolError',
    'MessageTooLargeError', 'AuthenticationError', 'SerializationError', 'NoSuchObjectError',
    'NoSuchMethodError', 'NamingError', 'RemoteError',
]


class DopyError(Exception):
    """The root of every error DOPY raises on purpose."""


class CommunicationError(DopyError, ConnectionError):
    """The call could not be carried to the peer and back."""


class ConnectionClosedError(CommunicationError):
    """The connection was closed on this side, or used after it was closed."""


class ConnectionLostError(CommunicationError):
    """The peer or the network went away; ``__cause__`` is the OS error, if any."""


class CallTimeoutError(CommunicationError, TimeoutError):
    """No reply came within the call's timeout.  The call was not re-sent."""


class ProtocolError(CommunicationError):
    """The peer sent bytes that are not DOPY's wire format."""


class MessageTooLargeError(ProtocolError):
    """A frame declared (or would need) more bytes than the size limit allows."""


class AuthenticationError(CommunicationError):
    """The handshake failed: a wrong or missing authkey on either side, or the server refused us.

    Nothing from the peer has been unpickled.  A refusal carries the
    server's own message, which says why and what to do.
    """


class SerializationError(DopyError):
    """A value could not be pickled or unpickled; the message says which side and what."""


class NoSuchObjectError(DopyError, LookupError):
    """No object is published under the name the call asked for."""


class NoSuchMethodError(DopyError, AttributeError):
    """The object has no public method of that name (data attributes are not methods)."""


class NamingError(DopyError, KeyError):
    """A name that is not bound in a naming context, or that is not a valid name."""

    def __str__(self) -> str:
        # KeyError would show the message as a quoted repr.
        return str(self.args[0]) if self.args else ''


class RemoteError(DopyError):
    """A remote exception that could not be rebuilt on this side.

    ``remote_type`` is the dotted name of its class on the server,
    ``remote_message`` its ``str()``, and ``remote_traceback`` the server's
    formatted traceback text.
    """

    def __init__(self, remote_type: str, remote_message: str, remote_traceback: str = '') -> None:
        super().__init__(remote_type, remote_message, remote_traceback)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f'{self.remote_type}: {self.remote_message}'
