"""Traceback text that tells the whole story of a remote call: ``errorText``."""

from __future__ import annotations

import traceback

__all__ = ['errorText']


def errorText(exc: BaseException) -> str:
    """The local traceback, the remote frames and the exception line, as one text.

    For an exception raised by a remote method (one that has
    ``dopy_traceback``), the server's frames follow the caller's, under a
    ``Remote traceback`` heading.  Any other exception gives its ordinary
    traceback text.
    """
    remote = getattr(exc, 'dopy_traceback', None)
    parts = ['Traceback (most recent call last):\n']
    parts.extend(traceback.format_tb(exc.__traceback__))
    if remote is not None:
        parts.append('Remote traceback (most recent call last):\n')
        parts.extend(traceback.format_list(remote))
    parts.extend(traceback.format_exception_only(type(exc), exc))
    return ''.join(parts)
