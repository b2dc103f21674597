"""fal-client 1.0.3 against livegen deployed behind a reverse proxy under a path prefix, as at
``https://example.com/livegen/``: a proxy that strips ``/livegen`` (``tests/web/prefix_proxy.py``)
in front of ``livegen serve --public-url <the proxy's URL>``, and ``point_fal_client`` given the
prefixed URL. Every URL the client builds or is handed (queue status and result, upload targets,
file URLs, the realtime WebSocket, tokens) must keep the prefix: the proxy serves nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fal_client
import httpx
import pytest

from livegen.bench import free_port
from livegen.client import point_fal_client
from tests.conftest import LiveServer, png_bytes, start_server, stop_server
from tests.web.prefix_proxy import prefix_proxy

TURBO = "fal-ai/fast-turbo-diffusion"
SMALL = {"prompt": "a red fox", "model_name": "stabilityai/sd-turbo", "image_size": {"width": 64, "height": 64}}


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> Iterator[tuple[LiveServer, str]]:
    port = free_port()
    public = f"http://127.0.0.1:{port}/livegen"
    server = start_server(
        tmp_path_factory.mktemp("proxied"),
        *("--weights", "tiny-random", "--device", "cpu", "--public-url", public),
        synth_from=shared_data_dir,
    )
    try:
        with prefix_proxy(server.base_url, "/livegen", port=port) as base:
            assert base == public
            point_fal_client(base)
            yield server, base
    finally:
        stop_server(server)


def fetched(url: str, base: str) -> bytes:
    assert url.startswith(base + "/cdn/files/"), url
    response = httpx.get(url)
    assert response.status_code == 200, response.text[:200]
    return response.content


def test_run_queue_stream_and_files_through_the_proxy(proxied: tuple[LiveServer, str]) -> None:
    server, base = proxied
    fal = fal_client.SyncClient(key=server.key)
    result = fal.run(TURBO, {**SMALL, "sync_mode": False})
    assert fetched(result["images"][0]["url"], base)[:3] == b"\xff\xd8\xff"

    handle = fal.submit(TURBO, {**SMALL, "sync_mode": False})
    statuses = list(handle.iter_events(with_logs=True, interval=0.1))
    assert isinstance(statuses[-1], fal_client.Completed)
    queued = handle.get()
    assert fetched(queued["images"][0]["url"], base)[:3] == b"\xff\xd8\xff"
    assert fal.status(TURBO, handle.request_id).__class__ is fal_client.Completed

    events = list(fal.stream(TURBO, SMALL))
    assert len(events) == 1 and events[0]["images"][0]["url"].startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize("repository", ["fal_v3", "fal"])
def test_uploads_through_the_proxy(proxied: tuple[LiveServer, str], repository: str) -> None:
    server, base = proxied
    data = png_bytes(64, 64)
    url = fal_client.SyncClient(key=server.key).upload(data, "image/png", repository=repository, fallback_repository=[])
    assert fetched(url, base) == data


def test_realtime_through_the_proxy(proxied: tuple[LiveServer, str]) -> None:
    server, _ = proxied
    fal = fal_client.SyncClient(key=server.key)
    for use_jwt in (True, False):  # the token comes from {base}/rest/tokens/
        with fal.realtime(TURBO, use_jwt=use_jwt) as connection:
            connection.send(SMALL)
            result = connection.recv()
        assert result is not None and result["images"][0]["width"] == 64
