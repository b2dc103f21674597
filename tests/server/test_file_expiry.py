"""Stored files are served for ``files_ttl_s`` and then deleted: the store with an injected
clock, then a live server with a short TTL (its sweeper removes the file from disk)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from livegen.protocol.errors import NotFound
from livegen.server.db import Database
from livegen.server.storage import ORPHAN_AGE_S, FileStore
from tests.conftest import LiveServer, start_server, stop_server, wait_for

TTL = 100.0


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[FileStore, Clock, Path]]:
    clock = Clock()
    with Database.open(tmp_path / "db.sqlite") as db:
        yield FileStore(db, tmp_path / "files", ttl_s=TTL, clock=clock), clock, tmp_path / "files"


def test_a_file_is_served_until_its_time_then_deleted(store: tuple[FileStore, Clock, Path]) -> None:
    files, clock, root = store
    old = files.put(b"old", "text/plain", "old.txt")
    clock.now += TTL / 2
    new = files.put(b"new", "text/plain", "new.txt")
    assert files.expire() == 0
    clock.now += TTL / 2 - 1
    assert files.get(old.file_id).path.read_bytes() == b"old"
    clock.now += 1
    with pytest.raises(NotFound, match="file has expired"):
        files.get(old.file_id)  # gone at once, before any sweep
    assert files.get(new.file_id).size == 3
    assert files.expire() == 1
    assert not (root / old.file_id).exists() and (root / new.file_id).is_file()
    with pytest.raises(NotFound, match="file not found"):
        files.get(old.file_id)


def test_files_left_without_a_row_are_removed_once_old(store: tuple[FileStore, Clock, Path]) -> None:
    files, clock, root = store
    kept = files.put(b"kept", "text/plain", "kept.txt")
    stray, fresh = root / "0123.tmp", root / "4567.tmp"  # a crash between writing and registering
    stray.write_bytes(b"x")
    fresh.write_bytes(b"y")
    past = clock.now - ORPHAN_AGE_S - 1
    os.utime(stray, (past, past))
    os.utime(root / kept.file_id, (past, past))  # an old mtime alone does not make a registered file stray
    assert files.expire() == 1
    assert not stray.exists() and fresh.exists() and files.get(kept.file_id).size == 4


@pytest.fixture(scope="module")
def short_lived(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> Iterator[LiveServer]:
    server = start_server(
        tmp_path_factory.mktemp("file-expiry"),
        *("--weights", "tiny-random", "--device", "cpu"),
        env={"LIVEGEN_FILES_TTL_S": "3"},
        synth_from=shared_data_dir,
    )
    yield server
    stop_server(server)


def test_a_served_file_expires_and_the_sweeper_deletes_it(short_lived: LiveServer) -> None:
    body = {"prompt": "a boat", "model_name": "stabilityai/sd-turbo", "sync_mode": False}
    with short_lived.client() as http:
        response = http.post("/fal-ai/fast-turbo-diffusion", json={**body, "image_size": {"width": 64, "height": 64}})
    assert response.status_code == 200, response.text
    url = response.json()["images"][0]["url"]
    file_id = url.split("/cdn/files/")[1].split("/")[0]
    stored = short_lived.data_dir / "files" / file_id
    assert httpx.get(url).status_code == 200 and stored.is_file()
    wait_for(lambda: httpx.get(url).status_code == 404, timeout=10)
    # 404 from its expiry (or, if the sweeper came first, from its absence)
    assert httpx.get(url).json()["detail"] in ("file has expired", "file not found")
    wait_for(lambda: not stored.exists(), timeout=10)  # the sweeper runs every second at this TTL
    assert httpx.get(url).json()["detail"] == "file not found"
    assert "expired files removed count=1" in short_lived.log()
