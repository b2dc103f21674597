"""Stored files are served for ``files_ttl_s`` (or less, as a request's lifecycle header asks)
and then deleted: the store with an injected clock, then a live server with a short TTL (its
sweeper removes the file from disk). The official clients' lifecycle options:
``tests/js/lifecycle.test.mjs`` and ``tests/compat/test_fal_client_storage.py``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from livegen.protocol.errors import InvalidInput, NotFound
from livegen.server.db import Database
from livegen.server.jobs.store import JobState, SqliteJobStore
from livegen.server.storage import EXPIRY_GRACE_S, ORPHAN_AGE_S, FileStore, requested_ttl
from tests.conftest import Clock, LiveServer, start_server, stop_server, wait_for
from tests.reliability.conftest import scrape

TTL = 100.0


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
    assert files.expire() == 0 and (root / old.file_id).is_file()  # on disk a little longer
    clock.now += EXPIRY_GRACE_S
    assert files.expire() == 1
    assert not (root / old.file_id).exists() and (root / new.file_id).is_file()
    with pytest.raises(NotFound, match="file not found"):
        files.get(old.file_id)


def test_a_file_found_just_in_time_can_still_be_read(store: tuple[FileStore, Clock, Path]) -> None:
    """A GET (or an image_url read) finds the file, then opens it on another thread: a sweep in
    between must not have deleted it, or the response would be a 500 instead of the file."""
    files, clock, _ = store
    stored = files.put(b"last", "text/plain", "last.txt")
    clock.now += TTL - 0.001
    found = files.get(stored.file_id)
    clock.now += 0.002  # past its time when the sweep runs
    assert files.expire() == 0 and found.path.read_bytes() == b"last"
    clock.now += EXPIRY_GRACE_S
    assert files.expire() == 1 and not found.path.exists()


def test_files_left_without_a_row_are_removed_once_old(store: tuple[FileStore, Clock, Path]) -> None:
    files, clock, root = store
    kept = files.put(b"kept", "text/plain", "kept.txt")
    stray, fresh = root / "0123.tmp", root / "4567.tmp"  # a crash between writing and registering
    stray.write_bytes(b"x")
    fresh.write_bytes(b"y")
    past = clock.now - ORPHAN_AGE_S - 1
    os.utime(stray, (past, past))
    os.utime(root / kept.file_id, (past, past))  # an old mtime alone does not make a registered file stray
    assert files.expire() == 0 and stray.exists()  # the periodic sweep does not look
    assert files.expire(orphans=True) == 1  # the first sweep after a start does
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
    before = scrape(short_lived)
    assert before["livegen_stored_files"] >= 1 and before["livegen_stored_bytes"] >= stored.stat().st_size
    wait_for(lambda: httpx.get(url).status_code == 404, timeout=10)
    # 404 from its expiry (or, if the sweeper came first, from its absence)
    assert httpx.get(url).json()["detail"] in ("file has expired", "file not found")
    wait_for(lambda: not stored.exists(), timeout=10)  # the sweeper runs every second at this TTL
    assert httpx.get(url).json()["detail"] == "file not found"
    assert "expired files removed count=1" in short_lived.log()
    after = scrape(short_lived)  # /metrics: what an operator watches the disk with
    assert after["livegen_files_expired_total"] >= 1
    assert after["livegen_stored_files"] == before["livegen_stored_files"] - after["livegen_files_expired_total"]


def test_an_expired_file_as_image_url_says_so(short_lived: LiveServer) -> None:
    """The server reads its own file URLs from disk. One it no longer serves is a 422 that says
    why, not a fetch of its own URL (refused as a loopback address, which would mislead)."""
    body = {"prompt": "a boat", "model_name": "stabilityai/sd-turbo", "image_size": {"width": 64, "height": 64}}
    with short_lived.client() as http:
        url = http.post("/fal-ai/fast-turbo-diffusion", json={**body, "sync_mode": False}).json()["images"][0]["url"]
        i2i = {**body, "image_url": url, "strength": 0.5}
        assert http.post("/fal-ai/fast-turbo-diffusion/image-to-image", json=i2i).status_code == 200
        wait_for(lambda: httpx.get(url).status_code == 404, timeout=10)
        response = http.post("/fal-ai/fast-turbo-diffusion/image-to-image", json=i2i)
        never = url.replace(url.split("/cdn/files/")[1].split("/")[0], "0" * 32)
        missing = http.post("/fal-ai/fast-turbo-diffusion/image-to-image", json={**i2i, "image_url": never})
    assert response.status_code == 422
    (detail,) = response.json()["detail"]
    assert detail["loc"] == ["body", "image_url"] and detail["type"] == "file_download_error"
    assert detail["msg"] in (
        "image_url could not be read from this server's files: file has expired",
        "image_url could not be read from this server's files: file not found",  # the sweeper came first
    )
    assert "--allow-private-urls" not in response.text
    assert missing.status_code == 422
    assert missing.json()["detail"][0]["msg"] == "image_url could not be read from this server's files: file not found"


# -- fal's lifecycle preference ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"x-fal-object-lifecycle-preference": '{"expiration_duration_seconds": 60}'}, 60.0),
        ({"x-fal-object-lifecycle": '{"expiration_duration_seconds": 3600.5, "initial_acl": {}}'}, 3600.5),
        ({"x-fal-object-lifecycle": '{"initial_acl": {"default": "allow"}}'}, None),  # expiresIn "never"
        ({"x-fal-object-lifecycle": '{"expiration_duration_seconds": 0}'}, None),  # fal: 0 is no expiration
        ({"x-fal-object-lifecycle": '{"expiration_duration_seconds": null}'}, None),
    ],
)
def test_requested_ttl(headers: dict[str, str], expected: float | None) -> None:
    assert requested_ttl(headers) == expected


@pytest.mark.parametrize(
    "value", ["", "60", "[60]", '{"expiration_duration_seconds": -1}', '{"expiration_duration_seconds": "60"}',
              '{"expiration_duration_seconds": true}', '{"expiration_duration_seconds": 1e999}',
              '{"expiration_duration_seconds": 1' + '0' * 400 + '}', '{"expiration_duration_seconds": NaN}'],
)  # fmt: skip
def test_a_malformed_lifecycle_header_is_invalid_input(value: str) -> None:
    with pytest.raises(InvalidInput) as info:
        requested_ttl({"x-fal-object-lifecycle-preference": value})
    assert info.value.loc == ("header", "x-fal-object-lifecycle-preference")


def test_a_file_asked_for_less_goes_sooner_and_more_is_capped(store: tuple[FileStore, Clock, Path]) -> None:
    files, clock, _ = store
    brief = files.put(b"brief", "text/plain", "brief.txt", ttl_s=10)
    long = files.put(b"long", "text/plain", "long.txt", ttl_s=TTL * 100)
    assert brief.expires_at == clock.now + 10 and long.expires_at == clock.now + TTL
    clock.now += 10
    with pytest.raises(NotFound, match="expired"):
        files.get(brief.file_id)
    clock.now += EXPIRY_GRACE_S
    assert files.expire() == 1 and files.get(long.file_id).size == 4


def test_a_shorter_files_ttl_applies_to_files_already_stored(tmp_path: Path) -> None:
    clock = Clock()
    with Database.open(tmp_path / "db.sqlite") as db:
        stored = FileStore(db, tmp_path / "files", ttl_s=TTL, clock=clock).put(b"x", "text/plain", "x.txt")
        clock.now += TTL / 2
        shorter = FileStore(db, tmp_path / "files", ttl_s=TTL / 4, clock=clock)  # restarted with a lower TTL
        with pytest.raises(NotFound, match="expired"):
            shorter.get(stored.file_id)
        assert shorter.expire() == 1
        longer = FileStore(db, tmp_path / "files", ttl_s=TTL * 10, clock=clock)
        again = longer.put(b"y", "text/plain", "y.txt")
        assert (
            FileStore(db, tmp_path / "files", ttl_s=TTL * 20, clock=clock).get(again.file_id).expires_at
            == again.expires_at
        )


def test_a_data_dir_from_before_expiry_is_migrated(tmp_path: Path) -> None:
    """Tables made by an older livegen (no expires_at, no file_ttl_s) gain the columns; their rows
    keep working, and old files expire ttl_s after they were stored."""
    clock = Clock()
    with Database.open(tmp_path / "db.sqlite") as db:
        db.migrate(
            "CREATE TABLE files (file_id TEXT PRIMARY KEY, content_type TEXT NOT NULL, size INTEGER NOT NULL,"
            " file_name TEXT NOT NULL, created_at REAL NOT NULL);"
        )
        (tmp_path / "files").mkdir()
        for file_id, age in (("a" * 32, TTL + EXPIRY_GRACE_S), ("b" * 32, TTL - 10)):
            (tmp_path / "files" / file_id).write_bytes(b"old")
            db.execute("INSERT INTO files VALUES (?, 'text/plain', 3, 'x.txt', ?)", (file_id, clock.now - age))
        db.migrate(OLD_JOBS)
        db.execute("INSERT INTO jobs VALUES ('r', 'fal-ai/x', 'fal-ai/x', 'k', '{}', 'queued', 0, 1.0, 'http://x',"
                   " NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, '[]')")  # fmt: skip
        files = FileStore(db, tmp_path / "files", ttl_s=TTL, clock=clock)
        with pytest.raises(NotFound, match="expired"):
            files.get("a" * 32)
        assert files.get("b" * 32).expires_at == pytest.approx(clock.now + 10)
        assert files.expire() == 1
        jobs = SqliteJobStore(db)
        job = jobs.get("r")
        assert job.state is JobState.QUEUED and job.file_ttl_s is None
        jobs.insert(dataclasses.replace(job, request_id="s", file_ttl_s=60.0))
        assert jobs.get("s").file_ttl_s == 60.0
        SqliteJobStore(db)  # opening again adds nothing twice


OLD_JOBS = """
CREATE TABLE jobs (
    request_id TEXT PRIMARY KEY, app_id TEXT NOT NULL, endpoint_id TEXT NOT NULL, key_id TEXT NOT NULL,
    input_json TEXT NOT NULL, state TEXT NOT NULL, priority INTEGER NOT NULL, created_at REAL NOT NULL,
    base_url TEXT NOT NULL, started_at REAL, completed_at REAL, deadline_at REAL, webhook_url TEXT,
    output_json TEXT, error_status INTEGER, error_json TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    logs_json TEXT NOT NULL DEFAULT '[]'
);
"""


def test_a_malformed_lifecycle_header_is_a_422_before_any_work(short_lived: LiveServer) -> None:
    body = {"prompt": "x", "model_name": "stabilityai/sd-turbo", "image_size": {"width": 64, "height": 64}}
    bad = {"x-fal-object-lifecycle-preference": '{"expiration_duration_seconds": -5}'}
    with short_lived.client() as http:
        for path in ("/fal-ai/fast-turbo-diffusion", "/queue/fal-ai/fast-turbo-diffusion"):
            r = http.post(path, json=body, headers=bad)
            assert r.status_code == 422, r.text
            assert r.json()["detail"][0]["loc"] == ["header", "x-fal-object-lifecycle-preference"]
        r = http.post(
            "/rest/storage/upload/initiate",
            json={"content_type": "text/plain"},
            headers={"x-fal-object-lifecycle": "{"},
        )
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["header", "x-fal-object-lifecycle"]
