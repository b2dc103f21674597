"""Uploads in flight (PROTOCOL.md §9): request bodies streamed to disk under a size cap, the
signed-upload URLs handed out by ``/rest/storage/upload/initiate*``, and multipart uploads.

    async with UploadService(db, files, settings) as uploads:
        upload = uploads.initiate(UploadKind.SINGLE, key_id="k", file_name="a.png", content_type="image/png")
        stored = await uploads.put_single(upload.upload_id, request.stream(), declared_length=None)

Bodies are written chunk by chunk (file I/O in worker threads) and refused with
``PayloadTooLarge`` as soon as they pass their cap; a too-large ``Content-Length`` is refused
before anything is read. Every upload stages under ``settings.uploads_dir``; a finished file
moves into the ``FileStore`` under the file id chosen when the upload began, so a file URL can
be handed out before its bytes arrive.

Initiated uploads are rows in SQLite with a random, unguessable id: the id is the only
credential of the PUT URLs (the JS client sends no auth there). An upload is completed once;
a later PUT is refused with 404 (as S3 answers ``NoSuchUpload``). Unfinished uploads expire
``upload_expiry_s`` after they began (multipart: after their last part) and a background sweep
deletes them, their staged parts and stray temp files.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import hashlib
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from livegen.protocol.errors import InvalidInput, NotFound, PayloadTooLarge
from livegen.server.db import Database
from livegen.server.storage import FileStore, StoredFile, new_file_id, safe_name
from livegen.settings import Settings

logger = logging.getLogger(__name__)

MAX_PARTS = 10_000
_UPLOAD_ID = re.compile(r"^[A-Za-z0-9_-]{32}$")
_ETAG = re.compile(r'^(?:W/)?"?([0-9a-f]{32})"?$')
_FLUSH_BYTES = 1024 * 1024  # bytes gathered before each write, so a thread hop per ~1 MiB

SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    upload_id     TEXT PRIMARY KEY,
    kind          TEXT NOT NULL,
    file_id       TEXT NOT NULL,
    file_name     TEXT NOT NULL,
    content_type  TEXT NOT NULL,
    key_id        TEXT NOT NULL,
    created_at    REAL NOT NULL,
    expires_at    REAL NOT NULL,
    completed_at  REAL,
    file_ttl_s    REAL
);
"""


class UploadKind(enum.Enum):
    SINGLE = "single"  # one PUT of the whole body
    MULTIPART = "multipart"  # numbered part PUTs, then complete


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class Upload:
    upload_id: str
    kind: UploadKind
    file_id: str
    file_name: str
    content_type: str
    key_id: str
    expires_at: float
    completed: bool
    file_ttl_s: float | None = None  # what the initiating request asked for the file (storage.requested_ttl)


@dataclass(frozen=True)
class PartRef:
    part_number: int
    etag: str


class UploadService:
    def __init__(
        self, db: Database, files: FileStore, settings: Settings, *, clock: Callable[[], float] = time.time
    ) -> None:
        db.migrate(SCHEMA)
        db.add_column("uploads", "file_ttl_s", "REAL")
        self._db = db
        self._files = files
        self._staging = settings.uploads_dir
        self._max_bytes = settings.max_upload_bytes
        self._max_part_bytes = min(settings.max_upload_part_bytes, settings.max_upload_bytes)
        self._expiry_s = settings.upload_expiry_s
        self._files_ttl_s = settings.files_ttl_s
        self._clock = clock
        self._state = _State.NEW
        self._sweeper: asyncio.Task[None] | None = None

    async def __aenter__(self) -> UploadService:
        """Start the expiry sweep (its first round clears a previous run's leftovers)."""
        if self._state is not _State.NEW:
            raise RuntimeError(f"upload service is {self._state.value}; it opens once")
        await anyio.to_thread.run_sync(lambda: self._staging.mkdir(mode=0o700, parents=True, exist_ok=True))
        self._sweeper = asyncio.create_task(self._sweep_loop())
        self._state = _State.OPEN
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._state = _State.CLOSED
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    # -- direct uploads (POST /cdn/files/upload) ---------------------------------------------

    async def receive_file(
        self,
        body: AsyncIterator[bytes],
        *,
        declared_length: str | None,
        content_type: str,
        file_name: str | None,
        file_ttl_s: float | None = None,
    ) -> StoredFile:
        self._require_open()
        tmp = self._staging / f"direct-{secrets.token_hex(8)}.tmp"
        await _receive(body, tmp, limit=self._max_bytes, declared_length=declared_length)
        return await self._adopt(tmp, new_file_id(), content_type, safe_name(file_name, content_type), file_ttl_s)

    # -- initiated uploads ------------------------------------------------------------------

    def initiate(
        self,
        kind: UploadKind,
        *,
        key_id: str,
        file_name: str | None,
        content_type: str,
        file_ttl_s: float | None = None,
    ) -> Upload:
        self._require_open()
        now = self._clock()
        upload = Upload(
            upload_id=secrets.token_urlsafe(24),
            kind=kind,
            file_id=new_file_id(),
            file_name=safe_name(file_name, content_type),
            content_type=content_type,
            key_id=key_id,
            expires_at=now + self._expiry_s,
            completed=False,
            file_ttl_s=file_ttl_s,
        )
        self._db.execute(
            "INSERT INTO uploads (upload_id, kind, file_id, file_name, content_type, key_id, created_at,"
            " expires_at, file_ttl_s) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                upload.upload_id,
                kind.value,
                upload.file_id,
                upload.file_name,
                content_type,
                key_id,
                now,
                upload.expires_at,
                file_ttl_s,
            ),
        )
        logger.info("upload started file_id=%s kind=%s key_id=%s", upload.file_id, kind.value, key_id)
        return upload

    def get(self, upload_id: str, kind: UploadKind) -> Upload:
        """An upload of this kind that is unfinished and unexpired, or completed; else NotFound."""
        rows: list[tuple[Any, ...]] = []
        if _UPLOAD_ID.match(upload_id):
            rows = self._db.query(
                "SELECT kind, file_id, file_name, content_type, key_id, expires_at, completed_at, file_ttl_s"
                " FROM uploads WHERE upload_id = ?",
                (upload_id,),
            )
        if not rows or rows[0][0] != kind.value:
            raise NotFound(f"no {kind.value} upload {upload_id!r}")
        _, file_id, file_name, content_type, key_id, expires_at, completed_at, file_ttl_s = rows[0]
        if completed_at is None and expires_at <= self._clock():
            raise NotFound(f"upload {upload_id!r} has expired; start a new one")
        completed = completed_at is not None
        return Upload(upload_id, kind, file_id, file_name, content_type, key_id, expires_at, completed, file_ttl_s)

    async def put_single(
        self, upload_id: str, body: AsyncIterator[bytes], *, declared_length: str | None
    ) -> StoredFile:
        self._require_open()
        upload = _unfinished(self.get(upload_id, UploadKind.SINGLE))
        tmp = self._staging / f"{upload_id}.{secrets.token_hex(8)}.tmp"
        await _receive(body, tmp, limit=self._max_bytes, declared_length=declared_length)
        if not self._claim(upload_id):  # another PUT finished first
            await anyio.to_thread.run_sync(tmp.unlink, True)
            raise _already_complete(upload_id)
        try:
            return await self._adopt(tmp, upload.file_id, upload.content_type, upload.file_name, upload.file_ttl_s)
        except BaseException:
            self._unclaim(upload_id)
            raise

    async def put_part(
        self, upload_id: str, part_number: int, body: AsyncIterator[bytes], *, declared_length: str | None
    ) -> str:
        """Stage one part (a repeated part number replaces the earlier one); its ETag."""
        self._require_open()
        _unfinished(self.get(upload_id, UploadKind.MULTIPART))
        if not 1 <= part_number <= MAX_PARTS:
            raise InvalidInput(f"part number must be in 1..{MAX_PARTS}", loc=("path", "part_number"))
        folder = self._staging / upload_id
        staged = await anyio.to_thread.run_sync(_staged_bytes, folder)
        limit = min(self._max_part_bytes, self._max_bytes - staged)
        tmp = folder / f"{part_number}.{secrets.token_hex(8)}.tmp"
        etag = await _receive(body, tmp, limit=max(limit, 0), declared_length=declared_length)
        try:
            await anyio.to_thread.run_sync(os.replace, tmp, folder / f"{part_number}.{etag}")
        except FileNotFoundError as exc:  # completed or expired while this part was arriving
            raise _already_complete(upload_id) from exc
        self._db.execute(
            "UPDATE uploads SET expires_at = ? WHERE upload_id = ?", (self._clock() + self._expiry_s, upload_id)
        )
        return etag

    async def complete(self, upload_id: str, parts: Sequence[PartRef]) -> StoredFile:
        """Join the listed parts in part-number order into the upload's file. Completing a
        completed upload again answers the same file (a client may retry a lost response)."""
        self._require_open()
        upload = self.get(upload_id, UploadKind.MULTIPART)
        if upload.completed:
            return await anyio.to_thread.run_sync(self._files.get, upload.file_id)
        ordered = _check_parts(parts)
        if not self._claim(upload_id):
            return await anyio.to_thread.run_sync(self._files.get, upload.file_id)
        folder = self._staging / upload_id
        tmp = self._staging / f"{upload_id}.{secrets.token_hex(8)}.tmp"
        try:
            await anyio.to_thread.run_sync(_join_parts, folder, ordered, tmp, self._max_bytes)
            stored = await self._adopt(tmp, upload.file_id, upload.content_type, upload.file_name, upload.file_ttl_s)
        except BaseException:
            self._unclaim(upload_id)
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(tmp.unlink, True)
            raise
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(folder, ignore_errors=True))
        return stored

    # -- expiry -----------------------------------------------------------------------------

    def sweep(self) -> int:
        """Delete expired unfinished uploads, old completed records and stray staging files;
        the number of uploads removed. Blocking: runs in a worker thread."""
        now = self._clock()
        gone = [
            row[0]
            for row in self._db.query(
                "SELECT upload_id FROM uploads WHERE (completed_at IS NULL AND expires_at <= ?)"
                " OR (completed_at IS NOT NULL AND completed_at <= ?)",
                (now, now - self._expiry_s),
            )
        ]
        for upload_id in gone:
            self._db.execute("DELETE FROM uploads WHERE upload_id = ?", (upload_id,))
            shutil.rmtree(self._staging / upload_id, ignore_errors=True)
        live = {row[0] for row in self._db.query("SELECT upload_id FROM uploads WHERE completed_at IS NULL")}
        for entry in self._staging.iterdir() if self._staging.is_dir() else ():
            with contextlib.suppress(FileNotFoundError):  # an upload finishing meanwhile
                if entry.name in live or entry.stat().st_mtime > now - self._expiry_s:
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        if gone:
            logger.info("expired uploads removed count=%d", len(gone))
        return len(gone)

    async def _sweep_loop(self) -> None:
        """The data dir's sweeper: unfinished uploads (``sweep``) and stored files past their time
        (``FileStore.expire``)."""
        interval = max(1.0, min(300.0, self._expiry_s / 4, self._files_ttl_s / 4))
        first = True
        while True:
            try:
                await anyio.to_thread.run_sync(self.sweep)
                expired = await anyio.to_thread.run_sync(functools.partial(self._files.expire, orphans=first))
                first = False
                if expired:
                    logger.info("expired files removed count=%d", expired)
            except Exception:  # noqa: BLE001 - a failed sweep is retried on the next round
                logger.exception("upload sweep failed")
            await asyncio.sleep(interval)

    # -- helpers ----------------------------------------------------------------------------

    def _require_open(self) -> None:
        if self._state is not _State.OPEN:
            raise RuntimeError(f"upload service is {self._state.value}")

    def _claim(self, upload_id: str) -> bool:
        changed = self._db.execute(
            "UPDATE uploads SET completed_at = ? WHERE upload_id = ? AND completed_at IS NULL",
            (self._clock(), upload_id),
        )
        return changed == 1

    def _unclaim(self, upload_id: str) -> None:
        self._db.execute("UPDATE uploads SET completed_at = NULL WHERE upload_id = ?", (upload_id,))

    async def _adopt(
        self, tmp: Path, file_id: str, content_type: str, file_name: str, ttl_s: float | None
    ) -> StoredFile:
        try:
            stored = await anyio.to_thread.run_sync(
                lambda: self._files.adopt(
                    tmp, file_id=file_id, content_type=content_type, file_name=file_name, ttl_s=ttl_s
                )
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(tmp.unlink, True)
            raise
        logger.info("file stored file_id=%s bytes=%d content_type=%s", file_id, stored.size, content_type)
        return stored


def _unfinished(upload: Upload) -> Upload:
    if upload.completed:
        raise _already_complete(upload.upload_id)
    return upload


def _already_complete(upload_id: str) -> NotFound:
    return NotFound(f"upload {upload_id!r} is already complete; start a new upload")


def _check_parts(parts: Sequence[PartRef]) -> list[tuple[int, str]]:
    """``(part_number, md5 hex)`` in part-number order; the client may list them in any order
    (fal-client lists them as its concurrent PUTs finish)."""
    if not 1 <= len(parts) <= MAX_PARTS:
        raise InvalidInput(f"list 1..{MAX_PARTS} parts", loc=("body", "parts"))
    ordered: dict[int, str] = {}
    for i, part in enumerate(parts):
        match = _ETAG.match(part.etag.strip())
        if match is None:
            raise InvalidInput("not an ETag this server gave out", loc=("body", "parts", i, "etag"))
        if part.part_number in ordered:
            raise InvalidInput(f"part {part.part_number} is listed twice", loc=("body", "parts", i))
        ordered[part.part_number] = match.group(1)
    return sorted(ordered.items())


def _join_parts(folder: Path, parts: list[tuple[int, str]], dest: Path, max_bytes: int) -> None:
    sources = [folder / f"{n}.{etag}" for n, etag in parts]
    for (n, _), source in zip(parts, sources, strict=True):
        if not source.is_file():
            raise InvalidInput(f"part {n} with this ETag was not uploaded", loc=("body", "parts"))
    if sum(s.stat().st_size for s in sources) > max_bytes:
        raise PayloadTooLarge(f"the parts add up to more than the {max_bytes}-byte upload limit")
    with open(dest, "xb") as out:
        for source in sources:
            with open(source, "rb") as f:
                shutil.copyfileobj(f, out, _FLUSH_BYTES)


def _staged_bytes(folder: Path) -> int:
    folder.mkdir(mode=0o700, exist_ok=True)
    total = 0
    for entry in os.scandir(folder):
        try:
            if entry.is_file():
                total += entry.stat().st_size
        except FileNotFoundError:
            continue  # a part uploaded in parallel was renamed or discarded since the listing
    return total


class _Sink:
    """A file being written off the event loop, hashed as it goes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "xb")  # noqa: SIM115 - closed by close() or discard()
        self._md5 = hashlib.md5(usedforsecurity=False)

    def write(self, data: bytes | bytearray) -> None:
        self._file.write(data)
        self._md5.update(data)

    def close(self) -> str:
        self._file.close()
        return self._md5.hexdigest()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


async def _receive(body: AsyncIterator[bytes], dest: Path, *, limit: int, declared_length: str | None) -> str:
    """Write a request body to ``dest``; its MD5 hex. Refuses a body over ``limit`` bytes up
    front when its ``Content-Length`` says so, else as soon as the cap is passed."""
    if declared_length is not None and declared_length.strip().isdigit() and int(declared_length) > limit:
        raise _too_large(limit)
    sink = await anyio.to_thread.run_sync(_Sink, dest)
    try:
        size = 0
        pending = bytearray()
        async for chunk in body:
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            pending += chunk
            if len(pending) >= _FLUSH_BYTES:
                data, pending = pending, bytearray()
                await anyio.to_thread.run_sync(sink.write, data)
        if pending:
            await anyio.to_thread.run_sync(sink.write, pending)
        return await anyio.to_thread.run_sync(sink.close)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(sink.discard)
        raise


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the upload is larger than this server's {limit}-byte limit")
