"""The realtime WebSocket with raw msgpack frames: flow control, isolation, refusals."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from livegen.server.tokens import REALTIME, TokenSigner
from tests.conftest import LiveServer, start_server, stop_server

TURBO = "fal-ai/fast-turbo-diffusion"
SMALL = {"model_name": "stabilityai/sd-turbo", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}


def ws_url(server: LiveServer, app: str = TURBO, **query: str) -> str:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return f"{server.base_url.replace('http', 'ws', 1)}/{app}/realtime" + (f"?{qs}" if qs else "")


def token(server: LiveServer, *apps: str, expiration: int = 120) -> str:
    r = httpx.post(
        server.base_url + "/rest/tokens/",
        json={"allowed_apps": list(apps), "token_expiration": expiration},
        headers={"Authorization": f"Key {server.key}"},
    )
    assert r.status_code == 200
    value: str = r.json()
    return value


def open_session(server: LiveServer, app: str = TURBO, **query: str) -> ClientConnection:
    return connect(ws_url(server, app, fal_jwt_token=token(server, app.split("/")[1]), **query), max_size=None)


def recv_result(ws: ClientConnection, timeout: float = 60) -> dict[str, Any]:
    """The next binary result, skipping x-fal-message frames; raises on x-fal-error."""
    while True:
        message = ws.recv(timeout=timeout)
        if isinstance(message, bytes):
            result: dict[str, Any] = msgpack.unpackb(message, raw=False)
            return result
        control = json.loads(message)
        if control.get("type") == "x-fal-error":
            raise AssertionError(f"error frame: {control}")
        assert control == {"type": "x-fal-message", "action": "timings", "timing": control["timing"]}


def recv_control(ws: ClientConnection, timeout: float = 60) -> dict[str, Any]:
    while True:
        message = ws.recv(timeout=timeout)
        if isinstance(message, str):
            control: dict[str, Any] = json.loads(message)
            if control.get("type") == "x-fal-error":
                return control


def send(ws: ClientConnection, frame: dict[str, Any]) -> None:
    ws.send(msgpack.packb(frame, use_bin_type=True))


def test_bad_frames_get_error_frames_and_the_session_stays_open(live_server: LiveServer) -> None:
    with open_session(live_server) as ws:
        send(ws, {"prompt": ""})
        assert recv_control(ws)["error"] == "INVALID_INPUT"
        ws.send(b"\xc1 not msgpack")
        assert "msgpack" in recv_control(ws)["reason"]
        ws.send("a text frame")
        assert recv_control(ws)["error"] == "INVALID_INPUT"
        send(ws, {**SMALL, "prompt": "x", "image_url": "data:image/png;base64,AAAA"})
        assert "PNG" in recv_control(ws)["reason"]
        send(ws, {**SMALL, "prompt": "still here", "request_id": "ok"})
        assert recv_result(ws)["request_id"] == "ok"


def test_latest_frame_wins(live_server: LiveServer) -> None:
    with open_session(live_server, max_buffering="1") as ws:
        for i in range(30):
            send(ws, {**SMALL, "prompt": f"frame {i}", "seed": i, "request_id": str(i)})
        seen: list[int] = []
        while not seen or seen[-1] != 29:
            seen.append(int(recv_result(ws)["request_id"]))
        assert len(seen) < 30  # superseded frames were dropped, not processed late
        assert seen == sorted(seen)  # never backwards
    text = httpx.get(live_server.base_url + "/metrics").text
    assert 'livegen_realtime_frames_total{outcome="dropped"}' in text


def test_sessions_are_isolated_and_batched_together(live_server: LiveServer) -> None:
    before = httpx.get(live_server.base_url + "/readyz").json()["multi_request_batches"]
    results: dict[int, list[dict[str, Any]]] = {}
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            with open_session(live_server) as ws:
                got = []
                for k in range(3):
                    send(ws, {**SMALL, "prompt": f"session {n}", "seed": 1000 * n + k, "request_id": f"{n}-{k}"})
                    got.append(recv_result(ws))
                results[n] = got
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for n, got in results.items():
        assert [r["request_id"] for r in got] == [f"{n}-{k}" for k in range(3)]
        assert [r["seed"] for r in got] == [1000 * n + k for k in range(3)]
        assert all(r["prompt"] == f"session {n}" for r in got)
    after = httpx.get(live_server.base_url + "/readyz").json()["multi_request_batches"]
    assert after > before  # frames of different sessions shared pipeline calls


def test_key_header_instead_of_a_token(live_server: LiveServer) -> None:
    with connect(ws_url(live_server), additional_headers={"Authorization": f"Key {live_server.key}"}) as ws:
        send(ws, {**SMALL, "prompt": "keyed"})
        assert recv_result(ws)["images"][0]["url"].startswith("data:image/jpeg;base64,")


def _refusal(url: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(InvalidStatus) as info:
        connect(url, **kwargs)
    response = info.value.response
    return response.status_code, json.loads(response.body or b"{}")


def test_refusals_before_the_handshake(live_server: LiveServer) -> None:
    status, body = _refusal(ws_url(live_server))
    assert status == 403 and "fal_jwt_token" in body["detail"]
    status, body = _refusal(ws_url(live_server, fal_jwt_token=token(live_server, "fast-lcm-diffusion")))
    assert status == 403 and "fast-turbo-diffusion" in body["detail"]
    status, body = _refusal(ws_url(live_server, fal_jwt_token="not-a-jwt"))
    assert status == 403 and body["detail"] == "invalid token"
    secret = (live_server.data_dir / "secret.key").read_bytes()
    expired, _ = TokenSigner(secret, clock=lambda: time.time() - 600).mint(
        REALTIME, "static-0", ttl_s=120, apps=("fast-turbo-diffusion",)
    )
    status, body = _refusal(ws_url(live_server, fal_jwt_token=expired))
    assert status == 403 and body["detail"] == "token expired"
    good = token(live_server, "fast-turbo-diffusion")
    status, body = _refusal(ws_url(live_server, fal_jwt_token=good), origin="http://evil.example")
    assert status == 403 and "evil.example" in body["detail"]
    status, body = _refusal(ws_url(live_server, fal_jwt_token=good, max_buffering="61"))
    assert status == 422
    # The server's own origin is fine (the playground).
    with connect(ws_url(live_server, fal_jwt_token=good), origin=live_server.base_url):
        pass
    # A refusal is logged as uvicorn's INFO "connection rejected", not as an ERROR.
    log = live_server.log()
    assert "connection rejected (403 Forbidden)" in log
    assert "without completing handshake" not in log


def test_tokens_never_reach_the_log(live_server: LiveServer) -> None:
    t = token(live_server, "fast-turbo-diffusion")
    with open_session(live_server) as ws:
        send(ws, {**SMALL, "prompt": "logged?"})
        recv_result(ws)
    with connect(ws_url(live_server, fal_jwt_token=t)):
        pass
    log = live_server.log()
    assert "fal_jwt_token=<redacted>" in log
    assert t not in log and "eyJ" not in log


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> Iterator[LiveServer]:
    env = {"LIVEGEN_MAX_SESSIONS": "1", "LIVEGEN_SESSION_TIMEOUT_S": "1.5", "LIVEGEN_MAX_SESSION_FPS": "4",
           "LIVEGEN_WS_COMPRESSION": "true"}  # fmt: skip
    server = start_server(
        tmp_path_factory.mktemp("small-server"),
        "--weights", "tiny-random", "--device", "cpu", "--models", "stabilityai/sd-turbo",
        env=env, synth_from=shared_data_dir,
    )  # fmt: skip
    yield server
    stop_server(server)


def test_session_limit_and_idle_timeout(small_server: LiveServer) -> None:
    with open_session(small_server) as ws:
        status, body = _refusal(ws_url(small_server, fal_jwt_token=token(small_server, "fast-turbo-diffusion")))
        assert status == 503 and "session limit" in body["detail"]
        started = time.monotonic()
        control = recv_control(ws, timeout=10)
        assert control == {"type": "x-fal-error", "error": "TIMEOUT", "reason": "no inputs, reconnect when needed!"}
        with pytest.raises(Exception):  # noqa: B017 - the close itself is what we check below
            ws.recv(timeout=10)
        assert ws.close_code == 1000
        assert 1.0 < time.monotonic() - started < 5
    with open_session(small_server) as ws:  # the slot was freed
        send(ws, {**SMALL, "prompt": "again"})
        assert recv_result(ws)["images"]


def test_frame_rate_cap(small_server: LiveServer) -> None:
    with open_session(small_server, max_buffering="60") as ws:
        for i in range(8):
            send(ws, {**SMALL, "prompt": "capped", "request_id": str(i)})
        arrivals = []
        for _ in range(8):
            recv_result(ws)
            arrivals.append(time.monotonic())
    # 4 frames/s: eight frames need at least 7 intervals of 0.25 s, however fast the engine is.
    assert arrivals[-1] - arrivals[0] >= 7 * 0.25 * 0.9


def test_permessage_deflate_is_declined_unless_enabled(live_server: LiveServer, small_server: LiveServer) -> None:
    """Clients offer permessage-deflate (websockets, as fal-client uses it, and every browser).
    By default the server declines: results are image bytes, which do not compress. The session
    works the same either way; LIVEGEN_WS_COMPRESSION=true (small_server) accepts it."""
    for server, compressed in ((live_server, False), (small_server, True)):
        with open_session(server) as ws:
            assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]  # offered
            accepted = ws.response.headers.get("Sec-WebSocket-Extensions")
            assert ("permessage-deflate" in (accepted or "")) is compressed, accepted
            send(ws, {**SMALL, "prompt": "a fox", "request_id": "1"})
            assert recv_result(ws)["request_id"] == "1"
