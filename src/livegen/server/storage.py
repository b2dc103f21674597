"""Files livegen serves back: generated images (``sync_mode: false``) and uploads.

Stored under server-generated ids in the data dir (never a client's name in a path), with
their content type, size and a sanitised display name in SQLite, and served unauthenticated
at ``{base}/cdn/files/{file_id}/{file_name}``. The display name only decorates the URL: the
id alone finds the file. A file is served for ``files_ttl_s`` after it was stored (7 days by
default, as long as finished jobs are kept), or less where the request that made it asked for
less with fal's lifecycle header (``requested_ttl``); then it is gone (404), and ``expire``
deletes it a little later (``EXPIRY_GRACE_S``), so that a request that found the file just in
time can still open it.

Methods touch the disk; async callers run them through ``anyio.to_thread``.
"""

from __future__ import annotations

import contextlib
import json
import math
import mimetypes
import os
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from livegen.protocol.errors import InvalidInput, NotFound
from livegen.server.db import Database
from livegen.server.disk import storage_faults

DEFAULT_CONTENT_TYPE = "application/octet-stream"
MAX_NAME_CHARS = 100

_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_FILE_ID = re.compile(r"^[0-9a-f]{32}$")
# Printable ASCII only: the value goes back out verbatim as a response header.
_CONTENT_TYPE = re.compile(r"^[!-~][ -~]{0,254}$")
DEFAULT_TTL_S = 7 * 24 * 3600.0
# A file in the folder without a row (a crash between writing and registering it) is removed by
# the first sweep after a start once it is this old: long past any write still in progress.
ORPHAN_AGE_S = 3600.0
# How long a file stays on disk after it stopped being served: a GET (or an image_url read) that
# found it a moment before its time opens it a moment after, and must not find it deleted.
# Capped at the store's TTL, so a store with a TTL of seconds (tests) still sweeps promptly.
EXPIRY_GRACE_S = 60.0


SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    file_id      TEXT PRIMARY KEY,
    content_type TEXT NOT NULL,
    size         INTEGER NOT NULL,
    file_name    TEXT NOT NULL,
    created_at   REAL NOT NULL,
    expires_at   REAL
);
"""

# fal's lifecycle preference: ``x-fal-object-lifecycle-preference`` on run and queue requests
# (what the generated files get), ``X-Fal-Object-Lifecycle`` on uploads (fal-client sends both
# names there), each ``{"expiration_duration_seconds": N, "initial_acl": ...}``.
LIFECYCLE_HEADERS = ("x-fal-object-lifecycle-preference", "x-fal-object-lifecycle")


def requested_ttl(headers: Mapping[str, str]) -> float | None:
    """The lifetime a request asks for the files it stores, in seconds, or None for the server's
    default: fal's clients send ``expiration_duration_seconds`` (``expiresIn: "immediate"`` is
    60, ``"1d"`` 86400; ``"never"`` sends none, and fal reads 0 as none too). The store caps it at
    its own ``ttl_s``. ``initial_acl`` is not applied: files are public to whoever has the URL."""
    for name in LIFECYCLE_HEADERS:
        raw = headers.get(name)
        if raw is None:
            continue
        loc = ("header", name)
        try:
            preference = json.loads(raw)
        except ValueError:
            raise InvalidInput(f"{name} must be a JSON object", loc=loc) from None
        if not isinstance(preference, dict):
            raise InvalidInput(f"{name} must be a JSON object", loc=loc)
        seconds = preference.get("expiration_duration_seconds")
        if seconds is None or seconds == 0:
            return None
        try:
            number = float(seconds) if isinstance(seconds, int | float) and not isinstance(seconds, bool) else math.nan
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if not 0 < number < math.inf:
            raise InvalidInput("expiration_duration_seconds must be a positive number of seconds", loc=loc)
        return number
    return None


def new_file_id() -> str:
    return secrets.token_hex(16)


def file_url(base_url: str, file_id: str, file_name: str) -> str:
    return f"{base_url}/cdn/files/{file_id}/{file_name}"


def safe_name(file_name: str | None, content_type: str = DEFAULT_CONTENT_TYPE) -> str:
    """A display name that is one harmless URL segment: ``[A-Za-z0-9._-]``, no leading dot
    (so never ``.`` or ``..``), at most ``MAX_NAME_CHARS``, keeping the end (the extension).
    Without a usable name: ``upload`` plus an extension guessed from the content type."""
    name = _UNSAFE_NAME_CHARS.sub("_", file_name or "")[-MAX_NAME_CHARS:].lstrip(".")
    if name.strip("_"):
        return name
    return "upload" + (mimetypes.guess_extension(content_type.split(";")[0].strip()) or ".bin")


def check_content_type(value: str | None, *, loc: tuple[str | int, ...] = ("body", "content_type")) -> str:
    """The content type to store and serve back verbatim; the default when none is given."""
    if not value or not value.strip():
        return DEFAULT_CONTENT_TYPE
    value = value.strip()
    if not _CONTENT_TYPE.match(value):
        raise InvalidInput("content type must be printable ASCII, at most 255 characters", loc=loc)
    return value


@dataclass(frozen=True)
class StoredFile:
    file_id: str
    content_type: str
    size: int
    file_name: str
    path: Path
    expires_at: float

    def url(self, base_url: str) -> str:
        return file_url(base_url, self.file_id, self.file_name)


class FileStore:
    def __init__(
        self, db: Database, root: Path, *, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.time
    ) -> None:
        self._db = db
        db.migrate(SCHEMA)
        db.add_column("files", "expires_at", "REAL")
        # Rows from before expires_at existed, and rows stored under a longer files_ttl_s than
        # today's, expire ttl_s after they were stored (normally no row needs it).
        db.execute(
            "UPDATE files SET expires_at = created_at + ? WHERE expires_at IS NULL OR expires_at > created_at + ?",
            (ttl_s, ttl_s),
        )
        db.migrate("CREATE INDEX IF NOT EXISTS files_expiry ON files (expires_at);")
        self._root = root
        self._ttl_s = ttl_s
        self._clock = clock
        self._expired = 0  # deleted by expire() since this store opened
        root.mkdir(parents=True, exist_ok=True)

    def put(self, data: bytes, content_type: str, file_name: str, *, ttl_s: float | None = None) -> StoredFile:
        """Store ``data`` for ``ttl_s`` seconds (None, or more than the store's own: the store's)."""
        file_id = new_file_id()
        tmp = self._root / f"{file_id}.tmp"
        try:
            with storage_faults():
                tmp.write_bytes(data)
            return self.adopt(tmp, file_id=file_id, content_type=content_type, file_name=file_name, ttl_s=ttl_s)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # a partly written file is never kept
            raise

    def adopt(
        self, path: Path, *, file_id: str, content_type: str, file_name: str, ttl_s: float | None = None
    ) -> StoredFile:
        """Take over a finished file written elsewhere on the same filesystem (an upload's
        staging area): moved into place, then registered under ``file_id`` for ``ttl_s``."""
        if not _FILE_ID.match(file_id):
            raise ValueError(f"not a file id: {file_id!r}")
        name = safe_name(file_name, content_type)
        size = path.stat().st_size
        target = self._root / file_id
        with storage_faults():
            os.replace(path, target)
        now = self._clock()
        expires_at = now + min(ttl_s or self._ttl_s, self._ttl_s)
        try:
            self._db.execute(
                "INSERT INTO files (file_id, content_type, size, file_name, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (file_id, content_type, size, name, now, expires_at),
            )
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return StoredFile(file_id, content_type, size, name, target, expires_at)

    def get(self, file_id: str) -> StoredFile:
        if not _FILE_ID.match(file_id):
            raise NotFound("file not found")
        query = "SELECT content_type, size, file_name, expires_at FROM files WHERE file_id = ?"
        rows = self._db.query(query, (file_id,))
        path = self._root / file_id
        if not rows or not path.is_file():
            raise NotFound("file not found")
        content_type, size, name, expires_at = rows[0]
        if expires_at <= self._clock():
            raise NotFound("file has expired")
        return StoredFile(file_id, content_type, size, name, path, expires_at)

    def expire(self, *, orphans: bool = False) -> int:
        """Delete the files past their time (by ``EXPIRY_GRACE_S``, or the TTL if shorter) and,
        with ``orphans`` (a crash leaves them, so the first sweep after a start looks), files
        without a row that are older than ``ORPHAN_AGE_S``; the number of files deleted.
        Blocking: runs in a worker thread."""
        now = self._clock()
        cutoff = now - min(EXPIRY_GRACE_S, self._ttl_s)
        rows = self._db.query("SELECT file_id FROM files WHERE expires_at <= ?", (cutoff,))
        gone = [row[0] for row in rows]
        for file_id in gone:
            # The row first: a file without a row is never served, a row without a file is a 404 anyway.
            self._db.execute("DELETE FROM files WHERE file_id = ?", (file_id,))
            (self._root / file_id).unlink(missing_ok=True)
        self._expired += len(gone)
        return len(gone) + (self._remove_orphans(now) if orphans else 0)

    def usage(self) -> tuple[int, int, int]:
        """The stored files (expired ones not yet swept included), their bytes, and how many
        ``expire`` has deleted since the store opened: for ``/metrics``."""
        count, size = self._db.query("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM files")[0]
        return count, size, self._expired

    def _remove_orphans(self, now: float) -> int:
        known = {row[0] for row in self._db.query("SELECT file_id FROM files")}
        removed = 0
        for entry in self._root.iterdir():
            with contextlib.suppress(FileNotFoundError):
                if entry.name in known or not entry.is_file() or entry.stat().st_mtime > now - ORPHAN_AGE_S:
                    continue
                entry.unlink()
                removed += 1
        return removed
