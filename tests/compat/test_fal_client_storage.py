"""fal-client 1.0.3's uploads against a live livegen server (PROTOCOL.md §9).

Each upload goes through one repository only (``fallback_repository=[]``), so a broken
``fal_v3`` path cannot hide behind the client's silent fallback to ``fal``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fal_client
import fal_client.client as fcc
import httpx
import pytest
from PIL import Image

from livegen.client import point_fal_client
from tests.conftest import LiveServer, png_bytes

REPOSITORIES = ["fal_v3", "fal"]
FLAVOURS = ["sync", "async"]


@pytest.fixture(scope="module")
def key(live_server: LiveServer) -> str:
    point_fal_client(live_server.base_url)
    return live_server.key


def call(flavour: str, key: str, method: str, *args: Any, **kwargs: Any) -> str:
    """``SyncClient(key).method(...)`` or the same awaited on an ``AsyncClient``."""
    if flavour == "sync":
        result: str = getattr(fal_client.SyncClient(key=key), method)(*args, **kwargs)
        return result

    async def go() -> str:
        out: str = await getattr(fal_client.AsyncClient(key=key), method)(*args, **kwargs)
        return out

    return asyncio.run(go())


def fetch(url: str, base_url: str) -> httpx.Response:
    assert url.startswith(base_url + "/cdn/files/"), url
    response = httpx.get(url)  # no key: file URLs are public
    assert response.status_code == 200, response.text[:300]
    assert response.headers["x-content-type-options"] == "nosniff"
    return response


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("repository", REPOSITORIES)
def test_upload_bytes(key: str, live_server: LiveServer, repository: str, flavour: str) -> None:
    data = os.urandom(50_000) + b"\x00\r\n" + repository.encode()
    url = call(
        flavour, key, "upload", data, "application/x-livegen-test", repository=repository, fallback_repository=[]
    )
    response = fetch(url, live_server.base_url)
    assert response.content == data
    assert response.headers["content-type"] == "application/x-livegen-test"


@pytest.mark.parametrize("repository", REPOSITORIES)
def test_upload_with_a_lifecycle(key: str, live_server: LiveServer, repository: str, small_multipart: int) -> None:
    """``lifecycle=StorageSettings(expires_in=...)`` sets how long livegen serves the file, seen as
    its Cache-Control max-age (capped by the file's remaining life); a multipart upload (fal_v3,
    over the threshold) keeps it from its start to its completion."""
    settings = fcc.StorageSettings(expires_in="immediate")  # 60 s
    before = multipart_uploads(live_server)
    for data in (b"brief" * 100, os.urandom(4 * small_multipart + 1)):
        url = call("sync", key, "upload", data, "text/plain", repository=repository, fallback_repository=[],
                   lifecycle=settings)  # fmt: skip
        max_age = int(fetch(url, live_server.base_url).headers["cache-control"].split("max-age=")[1].split(",")[0])
        assert 0 < max_age <= 60, (repository, len(data), max_age)
    assert multipart_uploads(live_server) == before + (repository == "fal_v3")
    url = call("sync", key, "upload", b"default", "text/plain", repository=repository, fallback_repository=[])
    assert "max-age=86400" in fetch(url, live_server.base_url).headers["cache-control"]


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("repository", REPOSITORIES)
def test_upload_file(key: str, live_server: LiveServer, tmp_path: Path, repository: str, flavour: str) -> None:
    path = tmp_path / f"notes {repository}.txt"
    path.write_text("plain text, served back without a charset added\n" * 100)
    url = call(flavour, key, "upload_file", path, repository=repository, fallback_repository=[])
    response = fetch(url, live_server.base_url)
    assert response.content == path.read_bytes()
    assert response.headers["content-type"] == "text/plain"  # from mimetypes, verbatim
    assert url.endswith(f"/notes_{repository}.txt")  # the name, made URL-safe


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("repository", REPOSITORIES)
def test_upload_image(key: str, live_server: LiveServer, repository: str, flavour: str) -> None:
    image = Image.open(io.BytesIO(png_bytes(64, 48)))
    expected = io.BytesIO()
    image.save(expected, format="png")  # what upload_image sends
    url = call(flavour, key, "upload_image", image, "png", repository=repository, fallback_repository=[])
    response = fetch(url, live_server.base_url)
    assert response.content == expected.getvalue()
    assert response.headers["content-type"] == "image/png"


@pytest.fixture
def small_multipart(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    # Lowered thresholds drive the client's real multipart code (create, concurrent part PUTs
    # read back through the ETag header, complete) without 100 MB of test data; the real
    # sizes are covered once by test_multipart_upload_file_over_100_mb.
    monkeypatch.setattr(fcc, "MULTIPART_THRESHOLD", 1024 * 1024)
    monkeypatch.setattr(fcc, "MULTIPART_CHUNK_SIZE", 256 * 1024)
    yield 256 * 1024


def multipart_uploads(server: LiveServer) -> int:
    return server.log().count("kind=multipart")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_multipart_upload_bytes(key: str, live_server: LiveServer, small_multipart: int, flavour: str) -> None:
    data = os.urandom(7 * small_multipart + 12_345)  # 8 parts, the last one short
    before = multipart_uploads(live_server)
    url = call(flavour, key, "upload", data, "video/mp4", "clip.mp4")
    assert multipart_uploads(live_server) == before + 1
    response = fetch(url, live_server.base_url)
    assert response.content == data
    assert response.headers["content-type"] == "video/mp4"
    assert url.endswith("/clip.mp4")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_multipart_upload_file(
    key: str, live_server: LiveServer, small_multipart: int, tmp_path: Path, flavour: str
) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(5 * small_multipart))
    before = multipart_uploads(live_server)
    url = call(flavour, key, "upload_file", path)
    assert multipart_uploads(live_server) == before + 1
    response = fetch(url, live_server.base_url)
    assert response.content == path.read_bytes()
    assert response.headers["content-type"] == "application/octet-stream"


def test_multipart_upload_file_over_100_mb(key: str, live_server: LiveServer, tmp_path: Path) -> None:
    # The real threshold and part size (11 parts of 10 MB, 10 PUTs at once); a few seconds on loopback.
    path = tmp_path / "big.bin"
    chunk = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for i in range(101):
            block = chunk[i:] + chunk[:i]
            f.write(block)
            digest.update(block)
    assert path.stat().st_size > fcc.MULTIPART_THRESHOLD
    before = multipart_uploads(live_server)
    url = fal_client.SyncClient(key=key).upload_file(path)
    assert multipart_uploads(live_server) == before + 1
    received = hashlib.sha256()
    with httpx.stream("GET", url) as response:
        assert response.status_code == 200
        assert int(response.headers["content-length"]) == path.stat().st_size
        for block in response.iter_bytes():
            received.update(block)
    assert received.hexdigest() == digest.hexdigest()


def test_uploaded_image_as_image_url(key: str, live_server: LiveServer) -> None:
    # The server reads its own file URLs from disk (a fetch of a loopback URL would be refused).
    url = fal_client.SyncClient(key=key).upload(png_bytes(256, 256), "image/png", "input.png")
    with live_server.client() as http:
        response = http.post(
            "/fal-ai/fast-turbo-diffusion/image-to-image",
            json={"prompt": "x", "model_name": "stabilityai/sd-turbo", "image_url": url},
        )
    assert response.status_code == 200, response.text[:500]
    assert response.json()["images"][0]["width"] == 256


def test_wrong_key_cannot_upload(key: str) -> None:
    client = fal_client.SyncClient(key="not-a-key")
    failures: list[Callable[[], str]] = [
        lambda: client.upload(b"x", "text/plain", repository="fal_v3", fallback_repository=[]),
        lambda: client.upload(b"x", "text/plain", repository="fal", fallback_repository=[]),
    ]
    for attempt in failures:
        with pytest.raises((httpx.HTTPStatusError, fal_client.FalClientHTTPError)) as info:
            attempt()
        error = info.value
        assert isinstance(error, httpx.HTTPStatusError | fal_client.FalClientHTTPError)
        assert error.response.status_code == 401
