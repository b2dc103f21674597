"""Every limit is documented in ``/openapi.json`` and enforced, in fal's error shapes.

* Field bounds (prompt length, steps, sizes, num_images, strength, guidance_scale, seed): fal
  publishes none (PROTOCOL.md §11), so they are livegen's own, in ``protocol/schemas.py``. They
  appear as ``minimum``/``maximum``/``maxLength`` in the request schemas and are enforced as
  422 with a ``loc`` naming the field, on the sync route, at queue submit and per realtime
  frame (an ``x-fal-error``, the session stays open).
* A server's own caps (``LIVEGEN_MAX_NUM_IMAGES``, ``..._INFERENCE_STEPS``, ``..._IMAGE_SIDE``)
  may be lower than the schema's; they are enforced the same way.
* The request body cap answers 413 before the body has arrived; the realtime message cap
  answers with an error frame (and, past twice the cap, the WebSocket layer closes with 1009).
* The queue length cap answers 429 with ``Retry-After``.
* The sync cap (``LIVEGEN_MAX_PENDING_SYNC``) answers 503 ``server_overloaded`` like fal's
  ingress (no ``x-fal-request-id``, ``nginx`` in the body), so the real fal_client retries it,
  as it retries the queue's 429, and succeeds once there is room again.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fal_client
import fal_client.client as fcc
import httpx
import msgpack
import pytest
from websockets.exceptions import ConnectionClosed

from livegen.client import point_fal_client
from livegen.protocol import schemas
from livegen.settings import Settings
from tests.conftest import LiveServer, data_url, png_bytes, start_server, stop_server
from tests.reliability.conftest import SERVER_ENV, next_answer, open_session

TURBO = "fal-ai/fast-turbo-diffusion"
LCM = "fal-ai/fast-lcm-diffusion"
FAST = {"prompt": "a cat", "model_name": "stabilityai/sd-turbo", "num_inference_steps": 1}
I2I = {**FAST, "image_url": data_url(png_bytes(64, 64)), "strength": 1.0}
BODY_CAP = 64 * 1024
WS_CAP = 64 * 1024


@pytest.fixture(scope="module")
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with live_server.client() as client:
        yield client


@pytest.fixture(scope="module")
def capped(live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A server with every cap set low. It reuses live_server's synthesized checkpoints (so
    it starts after it) and may fetch from loopback (the queue test's slow image server)."""
    env = {
        **SERVER_ENV,
        "LIVEGEN_MAX_REQUEST_BYTES": str(BODY_CAP),
        "LIVEGEN_MAX_WS_MESSAGE_BYTES": str(WS_CAP),
        "LIVEGEN_MAX_QUEUED": "1",
        "LIVEGEN_MAX_RUNNING_JOBS": "1",
        "LIVEGEN_MAX_PENDING_SYNC": "1",
        "LIVEGEN_MAX_NUM_IMAGES": "2",
        "LIVEGEN_MAX_INFERENCE_STEPS": "4",
        "LIVEGEN_MAX_IMAGE_SIDE": "256",
    }
    server = start_server(
        tmp_path_factory.mktemp("capped"),
        "--weights",
        "tiny-random",
        "--device",
        "cpu",
        "--models",
        "stabilityai/sd-turbo",
        "--allow-private-urls",
        env=env,
        synth_from=live_server.data_dir,
    )
    yield server
    stop_server(server)


# -- the schema's bounds: documented ------------------------------------------------------------------


def resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[1]
        resolved: dict[str, Any] = spec["components"]["schemas"][name]
        return resolved
    return node


def request_schema(spec: dict[str, Any], path: str) -> dict[str, Any]:
    body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    return resolve(spec, body)


def field_schema(spec: dict[str, Any], model: dict[str, Any], name: str) -> dict[str, Any]:
    node = model["properties"][name]
    options = [resolve(spec, o) for o in node.get("anyOf", [node]) if o.get("type") != "null"]
    assert len(options) == 1, (name, node)
    return options[0]


GENERATION_PATHS = [
    f"{prefix}/{app}{sub}" for prefix in ("", "/queue") for app in (TURBO, LCM) for sub in ("", "/image-to-image")
]


@pytest.mark.parametrize("path", GENERATION_PATHS)
def test_openapi_documents_every_bound(live_server: LiveServer, path: str) -> None:
    spec = httpx.get(live_server.base_url + "/openapi.json").json()
    model = request_schema(spec, path)

    def bounds(name: str, *keys: str) -> tuple[Any, ...]:
        node = field_schema(spec, model, name)
        return tuple(node.get(k) for k in keys)

    assert bounds("prompt", "minLength", "maxLength") == (1, schemas.MAX_PROMPT_CHARS)
    assert bounds("negative_prompt", "maxLength") == (schemas.MAX_PROMPT_CHARS,)
    assert bounds("num_inference_steps", "minimum", "maximum") == (1, schemas.MAX_STEPS)
    assert bounds("num_images", "minimum", "maximum") == (1, schemas.MAX_IMAGES)
    assert bounds("guidance_scale", "minimum", "maximum") == (0, 20)
    # JSON numbers are doubles: 2**63 - 1 is written as 9.223372036854776e18.
    assert bounds("seed", "minimum", "maximum") == (0, float(schemas.MAX_SEED))
    assert bounds("request_id", "maxLength") == (256,)
    size = resolve(spec, [o for o in model["properties"]["image_size"]["anyOf"] if "$ref" in o][0])
    for side in ("width", "height"):
        assert (size["properties"][side]["minimum"], size["properties"][side]["maximum"]) == (
            schemas.MIN_SIDE,
            schemas.MAX_SIDE,
        )
    if "image-to-image" in path:
        assert bounds("strength", "exclusiveMinimum", "maximum") == (0, 1)
        assert bounds("image_url", "minLength") == (1,)


def test_settings_defaults_match_the_schema() -> None:
    """The server's caps default to the schema's bounds, and may not exceed them."""
    settings = Settings()
    assert settings.max_image_side == schemas.MAX_SIDE
    assert settings.max_num_images == schemas.MAX_IMAGES
    assert settings.max_inference_steps == schemas.MAX_STEPS
    for name, too_many in (
        ("max_image_side", schemas.MAX_SIDE + 8),
        ("max_num_images", schemas.MAX_IMAGES + 1),
        ("max_inference_steps", schemas.MAX_STEPS + 1),
    ):
        with pytest.raises(ValueError, match=name):
            Settings.model_validate({name: too_many})


# -- the schema's bounds: enforced ----------------------------------------------------------------------

OUT_OF_RANGE: list[tuple[str, dict[str, Any], list[Any]]] = [
    ("empty prompt", {"prompt": ""}, ["body", "prompt"]),
    ("long prompt", {"prompt": "x" * (schemas.MAX_PROMPT_CHARS + 1)}, ["body", "prompt"]),
    ("long negative prompt", {"negative_prompt": "x" * (schemas.MAX_PROMPT_CHARS + 1)}, ["body", "negative_prompt"]),
    ("zero steps", {"num_inference_steps": 0}, ["body", "num_inference_steps"]),
    ("too many steps", {"num_inference_steps": schemas.MAX_STEPS + 1}, ["body", "num_inference_steps"]),
    ("fractional steps", {"num_inference_steps": 1.5}, ["body", "num_inference_steps"]),
    ("zero images", {"num_images": 0}, ["body", "num_images"]),
    ("too many images", {"num_images": schemas.MAX_IMAGES + 1}, ["body", "num_images"]),
    (
        "wide",
        {"image_size": {"width": schemas.MAX_SIDE + 8, "height": 64}},
        ["body", "image_size", "ImageSize", "width"],
    ),
    ("narrow", {"image_size": {"width": 64, "height": 56}}, ["body", "image_size", "ImageSize", "height"]),
    ("odd side", {"image_size": {"width": 100, "height": 64}}, ["body", "image_size", "ImageSize", "width"]),
    ("unknown preset", {"image_size": "huge"}, ["body", "image_size"]),
    ("zero strength", {"strength": 0}, ["body", "strength"]),
    ("strength above 1", {"strength": 1.5}, ["body", "strength"]),
    ("negative guidance", {"guidance_scale": -1}, ["body", "guidance_scale"]),
    ("guidance above 20", {"guidance_scale": 20.5}, ["body", "guidance_scale"]),
    ("negative seed", {"seed": -1}, ["body", "seed"]),
    ("seed above 2**63", {"seed": 2**63}, ["body", "seed"]),
    ("long request_id", {"request_id": "r" * 257}, ["body", "request_id"]),
]
IDS = [case[0] for case in OUT_OF_RANGE]


def assert_422(response: httpx.Response, loc: list[Any]) -> None:
    assert response.status_code == 422, response.text[:300]
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-fal-request-id"]
    detail = response.json()["detail"]
    assert any(d["loc"][: len(loc)] == loc for d in detail), detail
    assert all(isinstance(d["msg"], str) and d["msg"] for d in detail)
    assert "x" * 100 not in response.text  # the input is not echoed back


@pytest.mark.parametrize(("name", "change", "loc"), OUT_OF_RANGE, ids=IDS)
def test_out_of_range_is_422_on_run_and_submit(
    http: httpx.Client, name: str, change: dict[str, Any], loc: list[Any]
) -> None:
    body = {**I2I, **change}
    assert_422(http.post(f"/{TURBO}/image-to-image", json=body), loc)
    assert_422(http.post(f"/queue/{TURBO}/image-to-image", json=body), loc)


def test_out_of_range_is_an_error_frame_on_realtime(live_server: LiveServer) -> None:
    with open_session(live_server) as ws:
        for _, change, loc in OUT_OF_RANGE:
            ws.send(msgpack.packb({**I2I, **change}, use_bin_type=True))
            got = next_answer(ws)
            assert got.get("error") == "INVALID_INPUT", (change, str(got)[:200])
            assert ".".join(map(str, loc[1:])) in got["reason"], (loc, got["reason"])
        ws.send(msgpack.packb(I2I, use_bin_type=True))
        assert "images" in next_answer(ws)  # the session outlived every refusal


# -- a server's own, lower caps -------------------------------------------------------------------------

SERVER_CAPS = [
    ({"num_images": 3}, "num_images", "at most 2"),
    ({"num_inference_steps": 5}, "num_inference_steps", "at most 4"),
    ({"image_size": {"width": 512, "height": 256}}, "image_size", "at most 256"),
]


@pytest.mark.parametrize(("change", "field", "needle"), SERVER_CAPS, ids=[c[1] for c in SERVER_CAPS])
def test_server_caps_below_the_schema(capped: LiveServer, change: dict[str, Any], field: str, needle: str) -> None:
    body = {**I2I, **change}
    with capped.client() as http:
        for path in (f"/{TURBO}/image-to-image", f"/queue/{TURBO}/image-to-image"):
            response = http.post(path, json=body)
            assert_422(response, ["body", field])
            assert needle in response.json()["detail"][0]["msg"]
    with open_session(capped) as ws:
        ws.send(msgpack.packb(body, use_bin_type=True))
        got = next_answer(ws)
        assert got["error"] == "INVALID_INPUT" and needle in got["reason"], got


def test_capped_side_scales_inputs_down_instead_of_refusing(capped: LiveServer) -> None:
    """Without image_size the output takes the input's size, scaled into the server's cap."""
    body = {**I2I, "image_url": data_url(png_bytes(512, 384))}
    with capped.client() as http:
        response = http.post(f"/{TURBO}/image-to-image", json=body)
    assert response.status_code == 200, response.text[:300]
    image = response.json()["images"][0]
    assert (image["width"], image["height"]) == (256, 192)


def test_text_to_image_default_size_counts_against_the_cap(capped: LiveServer) -> None:
    """LCM's default image_size is square_hd (1024): over this server's 256 cap."""
    with capped.client() as http:
        response = http.post(f"/{LCM}", json={"prompt": "x", "num_inference_steps": 1})
    assert_422(response, ["body", "image_size"])
    assert "1024×1024" in response.json()["detail"][0]["msg"]


# -- the request body cap -----------------------------------------------------------------------------------


def send_slowly(server: LiveServer, head: str, pieces: Iterator[bytes]) -> tuple[bytes, int]:
    """Send a request by hand, a piece at a time, stopping as soon as the server answers;
    (the answer's first bytes, body bytes sent)."""
    u = urlsplit(server.base_url)
    assert u.hostname is not None and u.port is not None
    with socket.create_connection((u.hostname, u.port), timeout=20) as sock:
        sock.sendall(head.encode())
        sent = 0
        for piece in pieces:
            if select.select([sock], [], [], 0.01)[0]:
                break
            sock.sendall(piece)
            sent += len(piece)
        answer = b""
        while b"larger than" not in answer and (chunk := sock.recv(65536)):  # head and body may come apart
            answer += chunk
    return answer, sent


def head(server: LiveServer, framing: str) -> str:
    return (
        f"POST /{TURBO} HTTP/1.1\r\nHost: {urlsplit(server.base_url).netloc}\r\n"
        f"Authorization: Key {server.key}\r\nContent-Type: application/json\r\n{framing}\r\n\r\n"
    )


def test_declared_body_over_the_cap_is_413_before_the_body_arrives(capped: LiveServer) -> None:
    declared = 4 * BODY_CAP
    pieces = (b"x" * 1024 for _ in range(declared // 1024))  # a client trickling its body in
    answer, sent = send_slowly(capped, head(capped, f"Content-Length: {declared}"), pieces)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"error_type":"payload_too_large"' in answer.replace(b" ", b"")
    assert b"x-fal-error-type: payload_too_large" in answer.lower()
    assert sent < declared  # it came back while most of the body was still unsent


def test_chunked_body_over_the_cap_is_413_once_past_it(capped: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(64):  # 64 × 16 KiB = 16 × the cap
            yield b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
        yield b"0\r\n\r\n"

    answer, sent = send_slowly(capped, head(capped, "Transfer-Encoding: chunked"), chunks())
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert BODY_CAP < sent < 16 * BODY_CAP


def test_body_under_the_cap_is_read(capped: LiveServer) -> None:
    with capped.client() as http:
        response = http.post(f"/{TURBO}", json={**FAST, "negative_prompt": "y" * 1000, "image_size": "square"})
    assert response.status_code == 422  # read and validated (512 is over this server's side cap)
    assert response.json()["detail"][0]["loc"] == ["body", "image_size"]


# -- the realtime message cap --------------------------------------------------------------------------------


def test_realtime_message_cap(capped: LiveServer) -> None:
    big = {**I2I, "image_url": "data:image/png;base64," + "A" * (WS_CAP + 1000)}
    with open_session(capped) as ws:
        ws.send(msgpack.packb(big, use_bin_type=True))
        got = next_answer(ws)
        assert got["error"] == "PAYLOAD_TOO_LARGE" and str(WS_CAP) in got["reason"], got
        ws.send(msgpack.packb(I2I, use_bin_type=True))
        assert "images" in next_answer(ws)  # still open

    huge = {**I2I, "image_url": "data:image/png;base64," + "A" * (3 * WS_CAP)}
    with open_session(capped) as ws:
        ws.send(msgpack.packb(huge, use_bin_type=True))
        with pytest.raises(ConnectionClosed) as info:
            next_answer(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


# -- the queue length cap ---------------------------------------------------------------------------------------


class SlowImage(BaseHTTPRequestHandler):
    """Serves a PNG once ``release`` is set: a queued job (or a sync run) that fetches it stays
    running. ``arrived`` is set once a fetch has come in."""

    release = threading.Event()
    arrived = threading.Event()
    png = png_bytes(64, 64)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.arrived.set()
        self.release.wait(30)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(self.png)))
        self.end_headers()
        self.wfile.write(self.png)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def slow_image() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), SlowImage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    SlowImage.release.clear()
    SlowImage.arrived.clear()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/slow.png"
    finally:
        SlowImage.release.set()
        server.shutdown()
        server.server_close()


def test_queue_full_is_429_with_retry_after(capped: LiveServer, slow_image: str, tmp_path: Path) -> None:
    body = {**FAST, "image_url": slow_image, "strength": 1.0}
    with capped.client() as http:
        running = http.post(f"/queue/{TURBO}/image-to-image", json=body).json()
        deadline = time.monotonic() + 30
        while http.get(running["status_url"]).json()["status"] != "IN_PROGRESS":  # fetching, held
            assert time.monotonic() < deadline
            time.sleep(0.05)
        queued = http.post(f"/queue/{TURBO}/image-to-image", json=body)
        assert queued.status_code == 200  # the one place in the queue
        refused = http.post(f"/queue/{TURBO}/image-to-image", json=body)
        assert refused.status_code == 429, refused.text[:300]
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-fal-error-type"] == "queue_full"
        assert refused.json()["error_type"] == "queue_full" and "limit" in refused.json()["detail"]

        SlowImage.release.set()
        for job in (running, queued.json()):
            deadline = time.monotonic() + 60
            while http.get(job["status_url"]).json()["status"] != "COMPLETED":
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert http.get(job["response_url"]).status_code == 200
        # Room again once the queue drained.
        again = http.post(f"/queue/{TURBO}/image-to-image", json=I2I)
        assert again.status_code == 200


# -- refusals the official Python client retries --------------------------------------------------------------


class Fal:
    """The real fal_client pointed at a server, and the status of every response it got."""

    def __init__(self, server: LiveServer) -> None:
        self.client = fal_client.SyncClient(key=server.key, default_timeout=60)
        self.statuses: list[int] = []
        self.client._client.event_hooks = {"response": [lambda r: self.statuses.append(r.status_code)]}


@pytest.fixture
def fal(capped: LiveServer, monkeypatch: pytest.MonkeyPatch) -> Fal:
    for name in ("RUN_URL_FORMAT", "QUEUE_URL_FORMAT", "REALTIME_URL_FORMAT", "REST_URL", "CDN_URL"):
        monkeypatch.setattr(fcc, name, getattr(fcc, name))  # put back after the test
    point_fal_client(capped.base_url)
    return Fal(capped)


def retried_until_room(fal: Fal, status: int, call: Callable[[], Any], pool: ThreadPoolExecutor) -> Any:
    """Start ``call`` (a fal_client call) while the server is full, wait until fal_client has
    been refused with ``status``, then make room (``SlowImage.release``): the call must still
    succeed, i.e. fal_client retried. Returns its result.

    Not timing-sensitive: room is made only once a refusal has been seen, and fal_client keeps
    retrying for 25 s or more after its first one (10 attempts, 0.1 s doubling, ±50 % jitter)."""
    future = pool.submit(call)
    deadline = time.monotonic() + 60
    while status not in fal.statuses:
        if future.done():  # returned or raised without being refused: not what was set up
            pytest.fail(f"fal_client ended before any {status} ({fal.statuses}): {future.exception()!r}")
        assert time.monotonic() < deadline, f"no {status} within 60 s: {fal.statuses}"
        time.sleep(0.02)
    SlowImage.release.set()
    result = future.result(timeout=180)  # raises fal_client's error if it gave up
    assert fal.statuses[-1] == 200 and fal.statuses.count(status) >= 1, fal.statuses
    return result


def test_overload_503_is_retried_by_fal_client_run(capped: LiveServer, slow_image: str, fal: Fal) -> None:
    """LIVEGEN_MAX_PENDING_SYNC=1 and one sync run held while it fetches its input: a second run
    is refused at once with 503 ``server_overloaded`` in fal's ingress shape, which fal_client
    retries (until this change it carried ``x-fal-request-id`` and fal_client raised at once:
    it retries a 503 only when fal's ingress, not the app, sent it). Once the held run finishes,
    a retry is admitted and fal_client.run returns the images."""
    held_body = {**FAST, "image_url": slow_image, "strength": 1.0}
    with capped.client() as http, ThreadPoolExecutor(2) as pool:
        try:
            held = pool.submit(http.post, f"/{TURBO}/image-to-image", json=held_body)
            assert SlowImage.arrived.wait(60), "the held run never fetched its image"  # admitted: no room left

            refused = http.post(f"/{TURBO}/image-to-image", json=I2I)
            assert refused.status_code == 503, refused.text[:300]
            assert "x-fal-request-id" not in refused.headers
            assert refused.headers["x-fal-error-type"] == "server_overloaded"
            assert int(refused.headers["retry-after"]) >= 1
            body = refused.json()
            assert body == {"detail": body["detail"], "error_type": "server_overloaded", "ingress": "nginx"}
            assert "in flight" in body["detail"]
            assert fcc._should_retry_response(refused)  # fal_client's own test for "retry this"

            result = retried_until_room(
                fal, 503, lambda: fal.client.run(f"{TURBO}/image-to-image", I2I, timeout=60), pool
            )
            assert held.result(timeout=120).status_code == 200
        finally:
            SlowImage.release.set()  # never leave the pool waiting on the held run
    assert len(result["images"]) == 1 and result["images"][0]["url"].startswith("data:image/")


def test_queue_full_429_is_retried_by_fal_client_subscribe(capped: LiveServer, slow_image: str, fal: Fal) -> None:
    """The queue cap's 429 keeps ``x-fal-request-id`` (both clients retry 429 regardless):
    with the queue full, fal_client.subscribe is refused, retries its submit, and gets its
    result once the queue has room."""
    body = {**FAST, "image_url": slow_image, "strength": 1.0}
    with capped.client() as http, ThreadPoolExecutor(1) as pool:
        try:
            running = http.post(f"/queue/{TURBO}/image-to-image", json=body).json()
            assert SlowImage.arrived.wait(60), "the running job never fetched its image"
            assert http.post(f"/queue/{TURBO}/image-to-image", json=body).status_code == 200  # the queue's one place
            refused = http.post(f"/queue/{TURBO}/image-to-image", json=I2I)
            assert refused.status_code == 429 and refused.headers["x-fal-request-id"], refused.text[:300]
            assert fcc._should_retry_response(refused)

            subscribe = lambda: fal.client.subscribe(f"{TURBO}/image-to-image", I2I, client_timeout=120)  # noqa: E731
            result = retried_until_room(fal, 429, subscribe, pool)
            assert http.get(running["response_url"]).status_code == 200
        finally:
            SlowImage.release.set()
    assert len(result["images"]) == 1
