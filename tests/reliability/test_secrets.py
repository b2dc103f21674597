"""Secrets never reach the logs: one full flow against a dedicated DEBUG-level server, then grep.

The flow touches every place a secret travels: API keys (static and managed) in
``Authorization`` headers, realtime tokens in the WebSocket query string, CDN tokens in
``Authorization: Bearer``, data URLs in and out (sync, queue, realtime), an ``image_url`` and a
webhook URL carrying presigned-style query secrets, uploads, and the error paths (wrong key,
bad token, undecodable image). Afterwards the server's whole log and every ``*.log`` in its data
dir must contain none of them, and the database must hold only the managed key's hash.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from click.testing import CliRunner
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from livegen.cli import RedactSecrets, main
from tests.conftest import LiveServer, data_url, png_bytes, start_server, stop_server

TURBO = "fal-ai/fast-turbo-diffusion"
SMALL = {"model_name": "stabilityai/sd-turbo", "num_inference_steps": 2, "strength": 0.5}
# Presigned-URL style secrets, in query parameters the log filter does not know by name.
IMAGE_SECRET = "imgsig-5f1b0c9e7a3d4e2f"
HOOK_SECRET = "hooksig-8c2e4a6b0d1f3e5a"


class _Handler(BaseHTTPRequestHandler):
    server: _Local

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(200, self.server.image, "image/png")

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("content-length") or 0)
        self.server.hooks.append(json.loads(self.rfile.read(length)))
        self._answer(200, b"ok", "text/plain")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Local(ThreadingHTTPServer):
    """Serves the input image on GET and records webhook bodies on POST."""

    daemon_threads = True

    def __init__(self, image: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.image = image
        self.hooks: list[dict[str, Any]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def local() -> Iterator[_Local]:
    srv = _Local(png_bytes(64, 64, (10, 120, 200)))
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def managed_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    data_dir = tmp_path_factory.mktemp("secrets-server")
    created = CliRunner().invoke(main, ["keys", "create", "--name", "secrets", "--data-dir", str(data_dir)])
    assert created.exit_code == 0, created.output
    return data_dir, created.stdout.strip().splitlines()[0]


@pytest.fixture(scope="module")
def debug_server(managed_key: tuple[Path, str], shared_data_dir: Path) -> Iterator[LiveServer]:
    data_dir, _ = managed_key
    server = start_server(
        data_dir,
        "--weights", "tiny-random", "--device", "cpu", "--models", "stabilityai/sd-turbo",
        "--log-level", "DEBUG", "--allow-private-urls",
        env={"LIVEGEN_WEBHOOK_BACKOFF_BASE_S": "0.2"},
        synth_from=shared_data_dir,
    )  # fmt: skip
    yield server
    stop_server(server)


def _run_flow(server: LiveServer, key: str, local: _Local) -> dict[str, str]:
    """Everything a client does with secrets; returns the tokens and output data URLs it got."""
    auth = {"Authorization": f"Key {key}"}
    with httpx.Client(base_url=server.base_url, headers=auth, timeout=120) as http:
        return _flow(server, http, local)


def _flow(server: LiveServer, http: httpx.Client, local: _Local) -> dict[str, str]:
    image = png_bytes(64, 64, (200, 40, 40))
    image_url = data_url(image)
    seen: dict[str, str] = {}

    # Sync runs: data URL in, data URL out; an image_url with a presigned-style query.
    r = http.post(f"/{TURBO}/image-to-image", json={"prompt": "a", "image_url": image_url, "sync_mode": True, **SMALL})
    assert r.status_code == 200, r.text[:300]
    seen["sync output"] = r.json()["images"][0]["url"]
    remote = f"{local.url}/in.png?X-Amz-Signature={IMAGE_SECRET}&token={IMAGE_SECRET}"
    r = http.post(f"/{TURBO}/image-to-image", json={"prompt": "b", "image_url": remote, **SMALL})
    assert r.status_code == 200, r.text[:300]
    # An undecodable image and a wrong key: error paths log too.
    bad = "data:image/png;base64," + base64.b64encode(b"\x89PNG-not-really" + image[:300]).decode()
    assert http.post(f"/{TURBO}/image-to-image", json={"prompt": "c", "image_url": bad, **SMALL}).status_code == 422
    wrong = {"Authorization": http.headers["authorization"] + "x"}
    assert httpx.post(server.base_url + f"/{TURBO}", json={"prompt": "d"}, headers=wrong).status_code == 401

    # Queue: data URL in, sync_mode data URL out, a webhook URL with a secret in its query.
    hook = f"{local.url}/hook?sig={HOOK_SECRET}&key={HOOK_SECRET}"
    body = {"prompt": "e", "image_url": image_url, "sync_mode": True, **SMALL}
    r = http.post(f"/queue/{TURBO}/image-to-image", json=body, params={"fal_webhook": hook})
    assert r.status_code == 200, r.text[:300]
    result = _queue_result(http, r.json())
    seen["queue output"] = result["images"][0]["url"]
    deadline = time.monotonic() + 30
    while not local.hooks and time.monotonic() < deadline:
        time.sleep(0.1)
    assert local.hooks and local.hooks[0]["status"] == "OK"

    # Realtime: the token in the query string, data URL frames, an error frame.
    token = http.post("/rest/tokens/", json={"allowed_apps": ["fast-turbo-diffusion"]}).json()
    seen["realtime token"] = token
    ws_base = server.base_url.replace("http", "ws", 1)
    with connect(f"{ws_base}/{TURBO}/realtime?fal_jwt_token={token}&max_buffering=2", max_size=None) as ws:
        for i in range(2):
            ws.send(msgpack.packb({"prompt": f"rt {i}", "image_url": image_url, "sync_mode": True, **SMALL}))
            seen[f"realtime output {i}"] = _recv_result(ws)["images"][0]["url"]
        ws.send(msgpack.packb({"prompt": "rt bad", "image_url": bad, **SMALL}))
        assert _recv_control(ws)["type"] == "x-fal-error"
    with pytest.raises(InvalidStatus):
        connect(f"{ws_base}/{TURBO}/realtime?fal_jwt_token={token[:-4]}AAAA")
    # fal-client's use_jwt=False: the API key in the handshake headers.
    with connect(
        f"{ws_base}/{TURBO}/realtime",
        additional_headers={"Authorization": http.headers["authorization"]},
        max_size=None,
    ) as ws:
        ws.send(msgpack.packb({"prompt": "keyed", "image_url": image_url, "sync_mode": True, **SMALL}))
        seen["realtime output keyed"] = _recv_result(ws)["images"][0]["url"]

    # Uploads: the CDN token path (Python client) and the initiate + PUT path (JS client).
    cdn = http.post("/rest/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={}).json()
    seen["CDN token"] = cdn["token"]
    r = httpx.post(
        server.base_url + "/cdn/files/upload",
        content=image,
        headers={"Authorization": f"Bearer {cdn['token']}", "Content-Type": "image/png", "X-Fal-File-Name": "a.png"},
    )
    assert r.status_code == 200, r.text[:300]
    bad_bearer = {"Authorization": f"Bearer {cdn['token'][:-4]}AAAA", "Content-Type": "image/png"}
    assert httpx.post(server.base_url + "/cdn/files/upload", content=b"x", headers=bad_bearer).status_code == 401
    r = http.post("/rest/storage/upload/initiate", json={"file_name": "b.png", "content_type": "image/png"})
    assert r.status_code == 200, r.text[:300]
    assert httpx.put(r.json()["upload_url"], content=image, headers={"Content-Type": "image/png"}).is_success
    return seen


def _queue_result(http: httpx.Client, submitted: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if http.get(submitted["status_url"]).json()["status"] == "COMPLETED":
            result: dict[str, Any] = http.get(submitted["response_url"]).json()
            return result
        time.sleep(0.2)
    raise AssertionError("queue job did not complete")


def _recv_control(ws: Any) -> dict[str, Any]:
    while True:
        message = ws.recv(timeout=60)
        if isinstance(message, str) and (control := json.loads(message))["type"] != "x-fal-message":
            assert isinstance(control, dict)
            return control


def _recv_result(ws: Any) -> dict[str, Any]:
    while True:
        message = ws.recv(timeout=60)
        if isinstance(message, bytes):
            result: dict[str, Any] = msgpack.unpackb(message, raw=False)
            return result
        assert json.loads(message)["type"] == "x-fal-message", message


def test_no_secret_or_image_data_in_any_log(
    debug_server: LiveServer, managed_key: tuple[Path, str], local: _Local
) -> None:
    data_dir, key = managed_key
    seen = _run_flow(debug_server, key, local)
    time.sleep(0.5)  # let the last log lines (session closed, webhook delivered) land

    logs = {p.name: p.read_text(errors="replace") for p in data_dir.rglob("*.log")}
    assert debug_server.log_path.name in logs
    everything = "\n".join(logs.values())
    assert "DEBUG" in everything  # the server really ran at debug level
    assert "webhook delivered" in everything and "realtime session closed" in everything

    image_b64 = base64.b64encode(png_bytes(64, 64, (200, 40, 40))).decode()
    needles = {
        "managed API key": key,
        "managed key secret": key.split(":", 1)[1],
        "static API key": debug_server.key,
        "realtime token": seen["realtime token"],
        "realtime token signature": seen["realtime token"].rsplit(".", 1)[1],
        "CDN token": seen["CDN token"],
        "CDN token signature": seen["CDN token"].rsplit(".", 1)[1],
        "image_url query secret": IMAGE_SECRET,
        "webhook query secret": HOOK_SECRET,
        "data URL": "data:image",
        "base64 of the input image": image_b64[:40],
        "base64 of the input image, inside": image_b64[100:140],
        "JWT header": "eyJ",
    }
    for name, url in seen.items():
        if url.startswith("data:"):
            assert url.startswith("data:image/")
            needles[f"base64 of the {name}"] = url.partition(",")[2][:40]
    leaks = {name: _context(everything, needle) for name, needle in needles.items() if needle in everything}
    assert not leaks, f"secrets in the server log: {leaks}"

    # Only the managed key's SHA-256 is stored; no token is stored at all.
    db = (data_dir / "livegen.sqlite3").read_bytes()
    for secret in (key.split(":", 1)[1], seen["realtime token"], seen["CDN token"], debug_server.key):
        assert secret.encode() not in db


def _context(text: str, needle: str) -> str:
    at = text.index(needle)
    return text[max(0, at - 120) : at + len(needle) + 40]


@pytest.mark.parametrize(
    "message, kept, gone",
    [
        ('HTTP Request: GET http://h:1/a.png?X-Amz-Signature=s3cr3t "HTTP/1.1 200"', "http://h:1/a.png?", "s3cr3t"),
        ('HTTP Request: POST https://h/hook?sig=s3cr3t "HTTP/1.1 500"', "https://h/hook?", "s3cr3t"),
        ('1.2.3.4:5 - "WebSocket /x/realtime?fal_jwt_token=s3cr3t&max_buffering=2"', "max_buffering=2", "s3cr3t"),
        ("< authorization: Key id:s3cr3t", "< authorization:", "s3cr3t"),
        ("< Authorization: Bearer s3cr3t", "< Authorization:", "s3cr3t"),
        ("> set-cookie: session=s3cr3t", "> set-cookie:", "s3cr3t"),
        ("upload started file_id=abc key_id=k1", "key_id=k1", "<redacted>"),
    ],
)
def test_log_filter(message: str, kept: str, gone: str) -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%s", (message,), None)
    assert RedactSecrets().filter(record)
    assert kept in record.getMessage() and gone not in record.getMessage()
