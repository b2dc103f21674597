"""HTTP over WebSocket (``WS /{endpoint_id}``, fal's ``wss://ws.fal.run/{endpoint_id}``): the
answers match ``POST /{endpoint_id}``, framed by start/end messages, many per connection; errors
are answers; the handshake is checked like realtime's; the connection ends with its token and
at shutdown. The official client's ``ws_connect``: ``tests/compat/test_fal_client.py``."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.conftest import LiveServer, png_bytes, start_server, stop_server
from tests.server.routes.test_realtime import _refusal, token

TURBO = "fal-ai/fast-turbo-diffusion"
PNG = base64.b64encode(png_bytes(64, 64)).decode()
SMALL = {"model_name": "stabilityai/sd-turbo", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}


@pytest.fixture(scope="module")
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with live_server.client() as client:
        yield client


def ws_url(server: LiveServer, endpoint: str = TURBO, **query: str) -> str:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    return f"{server.base_url.replace('http', 'ws', 1)}/{endpoint}" + (f"?{qs}" if qs else "")


def open_ws(server: LiveServer, endpoint: str = TURBO, **kwargs: Any) -> ClientConnection:
    return connect(ws_url(server, endpoint), additional_headers={"Authorization": f"Key {server.key}"}, **kwargs)


def answer(ws: ClientConnection, timeout: float = 60) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """One answer: its start message, its body (parsed) and its end message, checked as fal's
    ``fal.apps.ws`` checks them (meta messages are JSON text with ``type`` and ``request_id``)."""
    start = json.loads(ws.recv(timeout=timeout))
    assert start["type"] == "start" and set(start) == {"type", "request_id", "status", "headers"}
    body = ws.recv(timeout=timeout)
    assert isinstance(body, str)
    end = json.loads(ws.recv(timeout=timeout))
    assert end["type"] == "end" and set(end) == {"type", "request_id", "status", "time_to_first_byte_seconds"}
    assert end["request_id"] == start["request_id"] == start["headers"]["x-fal-request-id"]
    assert end["status"] == start["status"] and end["time_to_first_byte_seconds"] >= 0
    return start, json.loads(body), end


def comparable(output: dict[str, Any]) -> dict[str, Any]:
    """The output without what differs between two runs: timings and the images' random file names."""
    images = [{k: v for k, v in image.items() if k != "file_name"} for image in output["images"]]
    return {**{k: v for k, v in output.items() if k != "timings"}, "images": images}


def test_answers_are_the_posts_answers(live_server: LiveServer, http: httpx.Client) -> None:
    body = {**SMALL, "prompt": "a lighthouse", "seed": 7}
    posted = http.post(f"/{TURBO}", json=body)
    with open_ws(live_server, max_size=None) as ws:
        ws.send(json.dumps(body))
        start, output, _ = answer(ws)
        ws.send(json.dumps(body).encode())  # a binary message holding the JSON is taken too
        again = answer(ws)[1]
    assert start["status"] == 200 and start["headers"]["content-type"] == "application/json"
    assert comparable(output) == comparable(posted.json()) == comparable(again)
    assert output["images"][0]["url"].startswith("data:image/jpeg;base64,")


def test_errors_are_answers_and_the_connection_stays_open(live_server: LiveServer, http: httpx.Client) -> None:
    not_json = b"{not json"
    posted = http.post(f"/{TURBO}", content=not_json, headers={"content-type": "application/json"})
    with open_ws(live_server, max_size=None) as ws:
        ws.send(not_json.decode())
        start, error, _ = answer(ws)
        assert start["status"] == 422 and start["headers"]["x-fal-error-type"] == "validation_error"
        assert error == posted.json()  # the POST's 422, detail for detail
        ws.send(json.dumps({**SMALL, "prompt": 5}))
        start, error, _ = answer(ws)
        assert start["status"] == 422 and error["detail"][0]["loc"] == ["body", "prompt"]
        ws.send(json.dumps([1, 2]))
        assert answer(ws)[0]["status"] == 422
        ws.send(json.dumps({**SMALL, "prompt": "still here"}))
        assert answer(ws)[0]["status"] == 200


def test_requests_sent_ahead_are_answered_in_order(live_server: LiveServer) -> None:
    seeds = [11, 12, 13, 14]
    with open_ws(live_server, max_size=None) as ws:
        for seed in seeds:
            ws.send(json.dumps({**SMALL, "prompt": f"frame {seed}", "seed": seed}))
        answers = [answer(ws) for _ in seeds]
    assert [output["seed"] for _, output, _ in answers] == seeds
    assert len({start["request_id"] for start, _, _ in answers}) == len(seeds)


def test_subpaths_and_the_other_app(live_server: LiveServer) -> None:
    with open_ws(live_server, f"{TURBO}/image-to-image", max_size=None) as ws:
        ws.send(json.dumps({**SMALL, "prompt": "x"}))  # no image_url: the i2i schema's 422
        start, error, _ = answer(ws)
        assert start["status"] == 422 and error["detail"][0]["loc"] == ["body", "image_url"]
        ws.send(json.dumps({**SMALL, "prompt": "x", "image_url": "data:image/png;base64,AAAA"}))
        start, error, _ = answer(ws)  # an error the generation raises, not the schema
        assert start["status"] == 422 and start["headers"]["x-fal-error-type"] != "validation_error"
        assert error["detail"][0]["loc"] == ["body", "image_url"] and "PNG" in error["detail"][0]["msg"]
        ws.send(json.dumps({**SMALL, "prompt": "x", "image_url": f"data:image/png;base64,{PNG}", "strength": 1.0}))
        start, output, _ = answer(ws)
        assert start["status"] == 200, output
        assert (output["images"][0]["width"], output["images"][0]["height"]) == (64, 64)
    with open_ws(live_server, "fal-ai/fast-lcm-diffusion", max_size=None) as ws:
        lcm = {"model_name": "runwayml/stable-diffusion-v1-5", "image_size": {"width": 64, "height": 64}}
        ws.send(json.dumps({**lcm, "prompt": "x", "num_inference_steps": 2}))
        start, output, _ = answer(ws)
        assert start["status"] == 200 and len(output["images"]) == 1


def test_refusals_before_the_handshake(live_server: LiveServer) -> None:
    status, body = _refusal(ws_url(live_server))
    assert status == 403 and "fal_jwt_token" in body["detail"]
    status, body = _refusal(ws_url(live_server), additional_headers={"Authorization": "Key wrong"})
    assert status == 403
    other_app = token(live_server, "fast-lcm-diffusion")
    status, body = _refusal(ws_url(live_server, fal_jwt_token=other_app))
    assert status == 403 and "fast-turbo-diffusion" in body["detail"]
    good = token(live_server, "fast-turbo-diffusion")
    status, body = _refusal(ws_url(live_server, fal_jwt_token=good), origin="http://evil.example")
    assert status == 403 and "evil.example" in body["detail"]
    bad_lifecycle = {"Authorization": f"Key {live_server.key}", "X-Fal-Object-Lifecycle-Preference": "[]"}
    status, body = _refusal(ws_url(live_server), additional_headers=bad_lifecycle)
    assert status == 422
    with connect(ws_url(live_server, fal_jwt_token=good), origin=live_server.base_url, max_size=None) as ws:
        ws.send(json.dumps({**SMALL, "prompt": "with a token"}))
        assert answer(ws)[0]["status"] == 200


def test_requests_are_counted_in_metrics(live_server: LiveServer) -> None:
    with open_ws(live_server, max_size=None) as ws:
        ws.send("{")
        answer(ws)
    metrics = httpx.get(live_server.base_url + "/metrics").text
    assert f'livegen_http_requests_total{{method="WS",route="/{TURBO}",status="422"}}' in metrics


def test_the_connection_ends_with_its_token(live_server: LiveServer) -> None:
    """At the token's expiry the connection closes (1000 and why, as realtime sessions do); every
    request that got a start got its whole answer."""
    brief = httpx.post(
        live_server.base_url + "/rest/tokens/",
        json={"allowed_apps": ["fast-turbo-diffusion"], "token_expiration": 2},
        headers={"Authorization": f"Key {live_server.key}"},
    ).json()
    started = time.monotonic()
    answered = 0
    with connect(ws_url(live_server, fal_jwt_token=brief), max_size=None) as ws, pytest.raises(ConnectionClosed):
        while time.monotonic() - started < 10:
            ws.send(json.dumps({**SMALL, "prompt": f"frame {answered}"}))
            assert answer(ws, timeout=10)[0]["status"] == 200
            answered += 1
    assert ws.close_code == 1000 and ws.close_reason == "token expired; reconnect with a new token"
    assert 0.9 < time.monotonic() - started < 8 and answered > 0  # exp is whole seconds: 1-2 s left


MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture
def own_server(tmp_path: Path, shared_data_dir: Path) -> Iterator[LiveServer]:
    server = start_server(
        tmp_path,
        *("--weights", "tiny-random", "--device", "cpu", "--max-sessions", "1"),
        env={"LIVEGEN_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES)},
        synth_from=shared_data_dir,
    )
    yield server
    stop_server(server)


def test_limits_and_shutdown(own_server: LiveServer) -> None:
    """A message over the request size limit is a 413 answer, as the POST would be; connections
    count against --max-sessions (503 beyond); at SIGTERM an idle connection closes with 1012 and
    a reason, as realtime sessions do, and the server exits cleanly."""
    with open_ws(own_server, max_size=None) as ws:
        ws.send(json.dumps({**SMALL, "prompt": "x" * MAX_REQUEST_BYTES}))
        start, error, _ = answer(ws)
        assert start["status"] == 413 and error["error_type"] == start["headers"]["x-fal-error-type"]
        ws.send(json.dumps({**SMALL, "prompt": "x"}))
        assert answer(ws)[0]["status"] == 200
        status, body = _refusal(ws_url(own_server), additional_headers={"Authorization": f"Key {own_server.key}"})
        assert status == 503
        own_server.process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1012, "server shutting down; reconnect")
    assert own_server.process.wait(30) == 0


def test_a_bug_is_a_500_answer_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An exception nobody mapped (a bug) becomes the 500 the POST would give, in fal's shape,
    and the connection carries on; it is logged with its traceback."""
    from types import SimpleNamespace

    from livegen.protocol.apps import ENDPOINTS
    from livegen.server.metrics import Metrics
    from livegen.server.ratelimit import RateLimiter
    from livegen.server.routes.ws import HttpOverWs
    from livegen.settings import Settings

    class Broken:
        async def run(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            raise RuntimeError("a bug")

    state = SimpleNamespace(
        settings=Settings(data_dir=tmp_path),
        metrics=Metrics(),
        rate_limiter=RateLimiter(0, 0),
        generation=Broken(),
        draining=False,
    )
    websocket = SimpleNamespace(app=SimpleNamespace(state=state))
    endpoint = next(e for e in ENDPOINTS if e.endpoint_id == TURBO)
    connection = HttpOverWs(websocket, endpoint, key_id="k", base_url="http://x", file_ttl_s=None)  # type: ignore[arg-type]
    message = {"type": "websocket.receive", "text": json.dumps({"prompt": "x"})}
    with caplog.at_level("ERROR"):
        answer = asyncio.run(connection._respond(message))
    assert answer == (500, {"detail": "Internal Server Error"}, {})
    assert "unhandled error on WS" in caplog.text and "RuntimeError: a bug" in caplog.text
