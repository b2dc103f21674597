"""The official Python client's queue, stream and webhook paths against a live server."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fal_client
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from PIL import Image

from livegen.client import point_fal_client
from tests.conftest import LiveServer, decode_data_url, start_server, stop_server

APP = "fal-ai/fast-turbo-diffusion"
SD = {"model_name": "stabilityai/sd-turbo"}
# Slow enough on a CPU to be caught running (50 steps at 1024x1024 with the tiny model).
SLOW = {"prompt": "a slow one", **SD, "num_inference_steps": 50, "image_size": "square_hd"}


@pytest.fixture(scope="module")
def queue_server(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> Iterator[LiveServer]:
    """One job at a time (so jobs can be seen waiting), private URLs allowed (the webhook
    receiver is on loopback), fast webhook retries."""
    env = {"LIVEGEN_MAX_RUNNING_JOBS": "1", "LIVEGEN_WEBHOOK_BACKOFF_BASE_S": "0.3"}
    server = start_server(
        tmp_path_factory.mktemp("queue-server"),
        "--weights", "tiny-random", "--device", "cpu", "--models", "stabilityai/sd-turbo", "--allow-private-urls",
        env=env, synth_from=shared_data_dir,
    )  # fmt: skip
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def fal(queue_server: LiveServer) -> fal_client.SyncClient:
    point_fal_client(queue_server.base_url)
    return fal_client.SyncClient(key=queue_server.key)


def _raw_status(server: LiveServer, request_id: str) -> dict[str, Any]:
    url = f"{server.base_url}/queue/{APP}/requests/{request_id}/status?logs=1"
    body: dict[str, Any] = httpx.get(url, headers={"Authorization": f"Key {server.key}"}).json()
    return body


def _wait_state(server: LiveServer, request_id: str, status: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = _raw_status(server, request_id)
        if body["status"] == status:
            return body
        time.sleep(0.05)
    raise AssertionError(f"{request_id} never reached {status}: {body}")


def test_subscribe_with_logs(fal: fal_client.SyncClient) -> None:
    updates: list[fal_client.Status] = []
    result = fal.subscribe(APP, {"prompt": "a fox", **SD}, with_logs=True, on_queue_update=updates.append)
    assert decode_data_url(result["images"][0]["url"])[0] == "image/jpeg"
    assert isinstance(updates[-1], fal_client.Completed)
    assert any("Generation started" in log["message"] for log in updates[-1].logs or [])
    assert updates[-1].metrics["inference_time"] >= 0


def test_submit_status_result(fal: fal_client.SyncClient) -> None:
    handle = fal.submit(f"{APP}/image-to-image", {"prompt": "a fox", **SD, "image_url": _png_url(), "strength": 0.5})
    assert handle.request_id
    assert isinstance(handle.status(), fal_client.Queued | fal_client.InProgress | fal_client.Completed)
    result = handle.get()
    assert Image.open(io.BytesIO(decode_data_url(result["images"][0]["url"])[1])).size == (64, 64)
    assert isinstance(handle.status(with_logs=True), fal_client.Completed)


def test_module_level_status_and_result(queue_server: LiveServer, fal: fal_client.SyncClient) -> None:
    handle = fal.submit(APP, {"prompt": "a hen", **SD, "seed": 5})
    handle.get()
    client = fal_client.SyncClient(key=queue_server.key)  # what the module functions use, with FAL_KEY set
    status = client.status(APP, handle.request_id, with_logs=True)
    assert isinstance(status, fal_client.Completed)
    assert client.result(APP, handle.request_id)["seed"] == 5


def test_cancel_queued_never_runs_and_running_stops(queue_server: LiveServer, fal: fal_client.SyncClient) -> None:
    slow = fal.submit(APP, SLOW)
    _wait_state(queue_server, slow.request_id, "IN_PROGRESS")
    waiting = fal.submit(APP, {"prompt": "never", **SD})
    assert _raw_status(queue_server, waiting.request_id)["status"] == "IN_QUEUE"
    assert _raw_status(queue_server, waiting.request_id)["queue_position"] == 0
    fal.cancel(APP, waiting.request_id)
    done = _wait_state(queue_server, waiting.request_id, "COMPLETED", timeout=5)
    assert done["error_type"] == "request_cancelled"
    assert not any("started" in log["message"] for log in done["logs"])  # it never ran

    started = time.monotonic()
    slow.cancel()
    done = _wait_state(queue_server, slow.request_id, "COMPLETED", timeout=30)
    assert done["error_type"] == "request_cancelled"
    # The engine stopped at a denoising step: the next job does not wait for 50 steps.
    fal.run(APP, {"prompt": "after", **SD, "image_size": {"width": 64, "height": 64}})
    after_cancel = time.monotonic() - started

    full = time.monotonic()
    fal.run(APP, {**SLOW, "num_inference_steps": 25})
    half_run = time.monotonic() - full
    assert after_cancel < half_run, (after_cancel, half_run)

    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal.cancel(APP, slow.request_id)
    assert info.value.status_code == 400
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        slow.get()
    assert info.value.status_code == 499


def test_failed_job_is_completed_with_error(queue_server: LiveServer, fal: fal_client.SyncClient) -> None:
    bad = {"prompt": "x", **SD, "image_url": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}
    handle = fal.submit(f"{APP}/image-to-image", bad)
    status = _wait_state(queue_server, handle.request_id, "COMPLETED")
    assert status["error_type"] == "validation_error" and "PNG" in status["error"]
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        handle.get()
    assert info.value.status_code == 422


def test_submit_validation_error_is_immediate(fal: fal_client.SyncClient) -> None:
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal.submit(APP, {"num_images": 3})
    assert info.value.status_code == 422


def test_unknown_request_id(queue_server: LiveServer, fal: fal_client.SyncClient) -> None:
    with pytest.raises(fal_client.FalClientHTTPError) as info:
        fal.status(APP, "00000000-0000-0000-0000-000000000000")
    assert info.value.status_code == 404
    r = httpx.put(
        f"{queue_server.base_url}/queue/{APP}/requests/nope/cancel",
        headers={"Authorization": f"Key {queue_server.key}"},
    )
    assert r.status_code == 404 and r.json() == {"status": "NOT_FOUND"}


def test_start_timeout(queue_server: LiveServer, fal: fal_client.SyncClient) -> None:
    slow = fal.submit(APP, {**SLOW, "num_inference_steps": 20})
    _wait_state(queue_server, slow.request_id, "IN_PROGRESS")
    late = fal.submit(APP, {"prompt": "late", **SD}, start_timeout=1.5)
    status = _wait_state(queue_server, late.request_id, "COMPLETED", timeout=30)
    assert status["error_type"] == "startup_timeout"
    r = httpx.get(status["response_url"], headers={"Authorization": f"Key {queue_server.key}"})
    assert r.status_code == 504 and r.headers["x-fal-request-timeout-type"] == "user"
    slow.cancel()


def test_stream(fal: fal_client.SyncClient) -> None:
    events = list(fal.stream(APP, {"prompt": "a stream", **SD}))
    assert len(events) == 1 and events[0]["images"][0]["url"].startswith("data:image/jpeg;base64,")


# -- webhooks -----------------------------------------------------------------------------------


class Receiver:
    """A loopback webhook receiver that fails the first ``fail_first`` deliveries."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.calls: list[tuple[float, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.calls.append((time.monotonic(), {k.lower(): v for k, v in self.headers.items()}, body))
                ok = len(receiver.calls) > receiver.fail_first
                self.send_response(200 if ok else 503)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?x=1"

    def wait(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.calls) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(self.calls) >= n, f"{len(self.calls)} of {n} deliveries arrived"


def _verify(server: LiveServer, headers: dict[str, str], body: bytes) -> None:
    jwks = httpx.get(server.base_url + "/rest/.well-known/jwks.json").json()
    message = "\n".join(
        [
            headers["x-fal-webhook-request-id"],
            headers["x-fal-webhook-user-id"],
            headers["x-fal-webhook-timestamp"],
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()
    signature = bytes.fromhex(headers["x-fal-webhook-signature"])
    assert abs(time.time() - int(headers["x-fal-webhook-timestamp"])) < 300
    for key in jwks["keys"]:
        raw = base64.urlsafe_b64decode(key["x"] + "=" * (-len(key["x"]) % 4))
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, message)  # raises if invalid
        return
    raise AssertionError("no keys published")


def test_webhook_delivery_is_signed(queue_server: LiveServer, fal: fal_client.SyncClient) -> None:
    receiver = Receiver()
    handle = fal.submit(APP, {"prompt": "hook", **SD}, webhook_url=receiver.url)
    receiver.wait(1)
    _, headers, body = receiver.calls[0]
    _verify(queue_server, headers, body)
    payload = json.loads(body)
    assert payload["request_id"] == handle.request_id == headers["x-fal-webhook-request-id"]
    assert payload["status"] == "OK" and payload["payload"]["images"]


def test_webhook_outage_then_recovery(queue_server: LiveServer, fal: fal_client.SyncClient) -> None:
    receiver = Receiver(fail_first=3)
    handles = [fal.submit(APP, {"prompt": f"hook {i}", **SD}, webhook_url=receiver.url) for i in range(2)]
    bad = fal.submit(
        f"{APP}/image-to-image",
        {"prompt": "x", **SD, "image_url": "data:image/png;base64,AAAA"},
        webhook_url=receiver.url,
    )
    receiver.wait(3 + 3)  # three failures, then one success per request
    time.sleep(1.0)
    by_request: dict[str, list[tuple[float, bytes]]] = {}
    for at, headers, body in receiver.calls:
        _verify(queue_server, headers, body)
        by_request.setdefault(headers["x-fal-webhook-request-id"], []).append((at, body))
    ids = {h.request_id for h in handles} | {bad.request_id}
    assert set(by_request) == ids
    assert all(len(calls) >= 1 for calls in by_request.values())
    delivered = {json.loads(calls[-1][1])["request_id"]: json.loads(calls[-1][1]) for calls in by_request.values()}
    assert delivered[bad.request_id]["status"] == "ERROR"
    assert delivered[bad.request_id]["error"] == "Invalid status code: 422"
    # Retries of one request back off: each wait is about twice the previous (base 0.3 s, ±20 %).
    retried = max(by_request.values(), key=len)
    gaps = [b[0] - a[0] for a, b in zip(retried, retried[1:], strict=False)]
    assert len(gaps) >= 1 and gaps[0] >= 0.2
    for earlier, later in zip(gaps, gaps[1:], strict=False):
        assert later > earlier * 1.2


def test_private_webhook_refused_without_the_flag(live_server: LiveServer) -> None:
    r = httpx.post(
        f"{live_server.base_url}/queue/{APP}?fal_webhook=http://127.0.0.1:9/hook",
        json={"prompt": "x", **SD},
        headers={"Authorization": f"Key {live_server.key}"},
    )
    assert r.status_code == 422 and "--allow-private-urls" in r.text


def _png_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
