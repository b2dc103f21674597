"""UploadService lifecycle and expiry, with an injected clock instead of sleeping."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from livegen.protocol.errors import NotFound
from livegen.server.db import Database
from livegen.server.storage import FileStore
from livegen.server.uploads import PartRef, UploadKind, UploadService
from livegen.settings import Settings
from tests.conftest import Clock

EXPIRY = 60.0


async def body(data: bytes) -> AsyncIterator[bytes]:
    yield data


def run_service(tmp_path: Path, test: Callable[[UploadService, Clock, Settings], Awaitable[None]]) -> None:
    settings = Settings(data_dir=tmp_path, upload_expiry_s=EXPIRY)
    clock = Clock()

    async def go() -> None:
        with Database.open(settings.db_path) as db:
            async with UploadService(db, FileStore(db, settings.files_dir), settings, clock=clock) as uploads:
                await test(uploads, clock, settings)

    asyncio.run(go())


def test_unfinished_uploads_expire_and_are_swept(tmp_path: Path) -> None:
    async def test(uploads: UploadService, clock: Clock, settings: Settings) -> None:
        single = uploads.initiate(UploadKind.SINGLE, key_id="k", file_name="a", content_type="text/plain")
        multi = uploads.initiate(UploadKind.MULTIPART, key_id="k", file_name="b", content_type="text/plain")
        await uploads.put_part(multi.upload_id, 1, body(b"abc"), declared_length=None)
        clock.now += EXPIRY * 0.9
        # a part keeps a multipart upload alive; nothing touches the one-shot upload
        await uploads.put_part(multi.upload_id, 2, body(b"def"), declared_length=None)
        clock.now += EXPIRY * 0.2
        with pytest.raises(NotFound, match="expired"):
            await uploads.put_single(single.upload_id, body(b"late"), declared_length=None)
        assert uploads.get(multi.upload_id, UploadKind.MULTIPART).completed is False
        assert await asyncio.to_thread(uploads.sweep) == 1
        with pytest.raises(NotFound):
            uploads.get(single.upload_id, UploadKind.SINGLE)

        clock.now += EXPIRY
        assert await asyncio.to_thread(uploads.sweep) == 1
        assert not (settings.uploads_dir / multi.upload_id).exists()
        with pytest.raises(NotFound):
            await uploads.complete(multi.upload_id, [PartRef(1, "0" * 32)])

    run_service(tmp_path, test)


def test_completed_uploads_are_forgotten_after_the_expiry(tmp_path: Path) -> None:
    async def test(uploads: UploadService, clock: Clock, settings: Settings) -> None:
        upload = uploads.initiate(UploadKind.SINGLE, key_id="k", file_name="a.txt", content_type="text/plain")
        stored = await uploads.put_single(upload.upload_id, body(b"kept"), declared_length="4")
        assert stored.path.read_bytes() == b"kept"
        with pytest.raises(NotFound, match="already complete"):
            await uploads.put_single(upload.upload_id, body(b"again"), declared_length=None)
        clock.now += EXPIRY + 1
        assert await asyncio.to_thread(uploads.sweep) == 1
        with pytest.raises(NotFound):
            uploads.get(upload.upload_id, UploadKind.SINGLE)
        assert stored.path.read_bytes() == b"kept"  # the file outlives its upload record

    run_service(tmp_path, test)


def test_stray_staging_files_are_swept(tmp_path: Path) -> None:
    async def test(uploads: UploadService, clock: Clock, settings: Settings) -> None:
        stray = settings.uploads_dir / "direct-0123.tmp"
        stray.write_bytes(b"left by a crash")
        fresh = settings.uploads_dir / "direct-4567.tmp"
        fresh.write_bytes(b"being written")
        old = clock.now - 2 * EXPIRY
        os.utime(stray, (old, old))
        await asyncio.to_thread(uploads.sweep)
        assert not stray.exists() and fresh.exists()

    run_service(tmp_path, test)


def test_lifecycle(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)

    async def go() -> None:
        with Database.open(settings.db_path) as db:
            uploads = UploadService(db, FileStore(db, settings.files_dir), settings)
            with pytest.raises(RuntimeError):
                uploads.initiate(UploadKind.SINGLE, key_id="k", file_name="a", content_type="text/plain")
            async with uploads:
                with pytest.raises(RuntimeError):
                    await uploads.__aenter__()
            with pytest.raises(RuntimeError):
                await uploads.put_single("x" * 32, body(b""), declared_length=None)

    asyncio.run(go())
