"""CORS for the browser origins in ``--allowed-origins``, and the stream route's realtime token,
over real HTTP against ``livegen serve --weights tiny-random --allowed-origins ...``.

A browser runs these checks itself (``tests/web/test_cross_origin.py`` runs fal's JS client on
another origin); here each header is looked at, as a browser would read it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from livegen.server.middleware import origin_allowed
from livegen.server.tokens import REALTIME, TokenSigner
from tests.conftest import LiveServer, data_url, png_bytes, start_server, stop_server

APP_ORIGIN = "http://app.example:5173"
EVIL = "http://evil.example"
TURBO = "/fal-ai/fast-turbo-diffusion"
SMALL = {"prompt": "a red fox", "model_name": "stabilityai/sd-turbo", "image_size": {"width": 64, "height": 64}}
# What Chrome sends before @fal-ai/client's POST with a key (fetch with Authorization and JSON).
PREFLIGHT = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> Iterator[LiveServer]:
    s = start_server(
        tmp_path_factory.mktemp("cors"),
        "--weights",
        "tiny-random",
        "--device",
        "cpu",
        "--allowed-origins",
        f"{APP_ORIGIN},https://other.example",
        synth_from=shared_data_dir,
        env={"LIVEGEN_MAX_REQUEST_BYTES": str(1024 * 1024)},
    )
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def token(http: httpx.Client, *apps: str) -> str:
    response = http.post("/rest/tokens/", json={"allowed_apps": list(apps), "token_expiration": 120})
    assert response.status_code == 200, response.text
    value: str = response.json()
    return value


def test_a_preflight_from_an_allowed_origin_is_answered(http: httpx.Client) -> None:
    headers = {
        "Origin": APP_ORIGIN,
        **PREFLIGHT,
        "Access-Control-Request-Headers": "authorization,content-type,x-fal-queue-priority",
    }
    r = http.options("/queue" + TURBO, headers=headers)
    assert r.status_code == 204, r.text
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"] and "PUT" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization, content-type, x-fal-queue-priority"
    assert r.headers["vary"] == "Origin" and int(r.headers["access-control-max-age"]) > 0
    assert "access-control-allow-credentials" not in r.headers  # keys travel in headers, never cookies
    assert "access-control-allow-private-network" not in r.headers
    # Chrome's Private Network Access: a public page asking for a server on the local network.
    r = http.options(
        TURBO,
        headers={"Origin": "https://other.example", **PREFLIGHT, "Access-Control-Request-Private-Network": "true"},
    )
    assert r.status_code == 204 and r.headers["access-control-allow-private-network"] == "true"
    assert r.headers["access-control-allow-origin"] == "https://other.example"


def test_a_preflight_from_another_origin_is_refused_in_fals_format(http: httpx.Client) -> None:
    r = http.options(TURBO, headers={"Origin": EVIL, **PREFLIGHT})
    assert r.status_code == 403
    assert r.json() == {
        "detail": f"origin {EVIL} is not allowed; add it to --allowed-origins",
        "error_type": "forbidden",
    }
    assert not any(name.startswith("access-control-") for name in r.headers)


def test_answers_to_an_allowed_origin_can_be_read(http: httpx.Client) -> None:
    r = http.post(TURBO, json=SMALL, headers={"Origin": APP_ORIGIN})
    assert r.status_code == 200 and r.json()["images"]
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN and r.headers["vary"] == "Origin"
    exposed = {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}
    assert {"x-fal-request-id", "x-fal-request-timeout-type", "retry-after"} <= exposed
    # Errors too: a client must see its 401 or 422, not an opaque network failure.
    for response in (
        httpx.post(http.base_url.join(TURBO), json=SMALL, headers={"Origin": APP_ORIGIN}),
        http.post(TURBO, json={"prompt": "x", "num_inference_steps": 0}, headers={"Origin": APP_ORIGIN}),
    ):
        assert response.status_code in (401, 422)
        assert response.headers["access-control-allow-origin"] == APP_ORIGIN


def test_refusals_from_middleware_carry_the_headers(http: httpx.Client) -> None:
    # The body cap answers before any route: its 413 must still be readable by the page.
    r = http.post(
        TURBO, content=b"x" * (2 * 1024 * 1024), headers={"Origin": APP_ORIGIN, "Content-Type": "application/json"}
    )
    assert r.status_code == 413 and r.headers["x-fal-error-type"] == "payload_too_large"
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN


def test_other_origins_and_plain_requests_get_no_cors_headers(http: httpx.Client, server: LiveServer) -> None:
    r = http.post(TURBO, json=SMALL, headers={"Origin": EVIL})
    assert r.status_code == 200  # not a browser: nothing stops it, and the key is what guards the server
    assert "access-control-allow-origin" not in r.headers and r.headers["vary"] == "Origin"
    r = http.get("/healthz")
    assert "access-control-allow-origin" not in r.headers and "vary" not in r.headers
    # The server's own origin (its playground) is always allowed.
    r = http.get("/healthz", headers={"Origin": server.base_url})
    assert r.headers["access-control-allow-origin"] == server.base_url
    # An OPTIONS that is not a preflight is the app's: 405, as before.
    assert http.options(TURBO, headers={"Origin": APP_ORIGIN}).status_code == 405


def test_websockets_use_the_same_list(http: httpx.Client, server: LiveServer) -> None:
    url = (
        server.base_url.replace("http", "ws", 1)
        + TURBO
        + "/realtime?fal_jwt_token="
        + token(http, "fast-turbo-diffusion")
    )
    with connect(url, origin=APP_ORIGIN):  # type: ignore[arg-type]
        pass


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "expected"),
    [
        ("http://a.example", "livegen:8000", ["http://a.example"], True),
        ("http://a.example:81", "livegen:8000", ["http://a.example"], False),
        ("https://a.example", "livegen:8000", ["http://a.example"], False),
        ("http://b.example", "livegen:8000", ["*"], True),
        ("http://livegen:8000", "LiveGen:8000", [], True),
        ("null", "livegen:8000", [], False),  # sandboxed iframes and file:// pages
    ],
)
def test_origin_allowed(origin: str, host: str, allowed: list[str], expected: bool) -> None:
    assert origin_allowed(origin, host, allowed) is expected


# -- POST /{endpoint}/stream with ?fal_jwt_token= -------------------------------------------------


def stream(server: LiveServer, path: str, body: dict[str, object], **params: str) -> httpx.Response:
    # No Authorization header: what fal.stream(..., {connectionMode: "client"}) sends.
    return httpx.post(
        server.base_url + path, json=body, params=params, headers={"Accept": "text/event-stream"}, timeout=120
    )


def test_stream_takes_a_realtime_token_for_its_app(http: httpx.Client, server: LiveServer) -> None:
    r = stream(server, TURBO + "/stream", SMALL, fal_jwt_token=token(http, "fast-turbo-diffusion"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text[:300]
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    assert len(events) == 1 and events[0]["images"][0]["url"].startswith("data:image/jpeg;base64,")
    # A subpath of the app takes the app's token, as the realtime WebSocket does.
    sub = {**SMALL, "image_url": data_url(png_bytes(64, 64)), "num_inference_steps": 2}
    r = stream(server, TURBO + "/image-to-image/stream", sub, fal_jwt_token=token(http, "fast-turbo-diffusion"))
    assert r.status_code == 200, r.text[:300]


def test_stream_refuses_bad_tokens(http: httpx.Client, server: LiveServer) -> None:
    r = stream(server, TURBO + "/stream", SMALL, fal_jwt_token=token(http, "fast-lcm-diffusion"))
    assert r.status_code == 403 and r.json()["detail"] == "this token is not valid for fast-turbo-diffusion"
    r = stream(server, TURBO + "/stream", SMALL, fal_jwt_token="not-a-jwt")
    assert r.status_code == 401 and r.json() == {"detail": "invalid token", "error_type": "unauthorized"}
    secret = (server.data_dir / "secret.key").read_bytes()
    expired, _ = TokenSigner(secret, clock=lambda: time.time() - 600).mint(
        REALTIME, "static-0", ttl_s=120, apps=("fast-turbo-diffusion",)
    )
    r = stream(server, TURBO + "/stream", SMALL, fal_jwt_token=expired)
    assert r.status_code == 401 and r.json()["detail"] == "token expired"
    r = stream(server, TURBO + "/stream", SMALL)
    assert r.status_code == 401 and "fal_jwt_token" in r.json()["detail"]
    # The token is for the stream only: the other routes still want the key.
    r = httpx.post(server.base_url + TURBO, json=SMALL, params={"fal_jwt_token": token(http, "fast-turbo-diffusion")})
    assert r.status_code == 401
    assert "fal_jwt_token=ey" not in server.log()
