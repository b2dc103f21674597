"""Storage faults in the data dir, as errors a caller can act on.

A full disk, a file size limit, a read-only filesystem or an I/O error turn into
``StorageFull`` (507) or ``StorageUnavailable`` (503) with fal's error body, wherever the data
dir is written: SQLite (``db.py``), stored files (``storage.py``) and, for any other write a
request makes (uploads), the error handlers (``errors.py``). Nothing half-written is kept: the
writers remove their temp files and SQLite rolls the transaction back.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

from livegen.protocol.errors import StorageFull, StorageUnavailable

logger = logging.getLogger(__name__)

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_UNAVAILABLE_ERRNOS = frozenset({errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM})
# Primary result codes (https://sqlite.org/rescode.html); extended codes keep them in the low byte.
_SQLITE_FULL = 13
_SQLITE_UNAVAILABLE = frozenset({8, 10, 14})  # READONLY, IOERR, CANTOPEN


def storage_error(exc: BaseException) -> StorageUnavailable | None:
    """The storage error ``exc`` stands for, or None when it is not a storage fault."""
    if isinstance(exc, StorageUnavailable):
        return exc
    if isinstance(exc, sqlite3.Error):
        code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
        if code == _SQLITE_FULL:
            return StorageFull(f"The server's disk is full (database: {exc}); nothing was stored")
        if code in _SQLITE_UNAVAILABLE:
            return StorageUnavailable(f"The server's database cannot be written ({exc}); nothing was stored")
        return None
    if isinstance(exc, OSError):
        reason = exc.strerror or type(exc).__name__
        if exc.errno in _FULL_ERRNOS:
            return StorageFull(f"The server's disk is full ({reason}); nothing was stored")
        if exc.errno in _UNAVAILABLE_ERRNOS:
            return StorageUnavailable(f"The server's storage cannot be written ({reason}); nothing was stored")
    return None


@contextmanager
def storage_faults() -> Iterator[None]:
    """Re-raise a storage fault inside the block as ``StorageFull``/``StorageUnavailable``."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        mapped = storage_error(exc)
        if mapped is None or mapped is exc:
            raise
        logger.error("storage fault: %s: %s", type(exc).__name__, exc)
        raise mapped from exc
