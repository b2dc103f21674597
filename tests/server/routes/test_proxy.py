"""``/api/fal/proxy`` (the JS client's ``proxyUrl`` protocol) over real HTTP, plus the URL mapping."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from livegen.protocol.errors import BadRequest
from livegen.server.routes.proxy import target_path
from tests.conftest import LiveServer

PROXY = "/api/fal/proxy"
TURBO_URL = "https://fal.run/fal-ai/fast-turbo-diffusion"
TURBO_INPUT = {"prompt": "a red fox", "model_name": "stabilityai/sd-turbo"}


@pytest.mark.parametrize(
    ("url", "path", "query"),
    [
        ("https://fal.run/fal-ai/fast-lcm-diffusion", "/fal-ai/fast-lcm-diffusion", ""),
        ("https://fal.run", "/", ""),
        ("https://queue.fal.run/fal-ai/x/requests/1/status?logs=1", "/queue/fal-ai/x/requests/1/status", "logs=1"),
        ("https://rest.fal.ai/tokens/", "/rest/tokens/", ""),
        (
            "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
            "/rest/storage/upload/initiate",
            "storage_type=fal-cdn-v3",
        ),
        ("https://FAL.RUN/a%20b/c d", "/a%20b/c%20d", ""),
        (
            "https://queue.fal.run/fal-ai/x?fal_webhook=https%3A%2F%2Fh%2Fw",
            "/queue/fal-ai/x",
            "fal_webhook=https%3A%2F%2Fh%2Fw",
        ),
    ],
)
def test_target_path_maps_fal_hosts(url: str, path: str, query: str) -> None:
    assert target_path(url) == (path, query)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/fal-ai/fast-turbo-diffusion",
        "https://fal.run.example.com/x",
        "https://v3.fal.media/files/upload",
        "wss://fal.run/fal-ai/fast-lcm-diffusion/realtime",
        "/fal-ai/fast-turbo-diffusion",
        "http://[::1/x",
        "",
    ],
)
def test_target_path_refuses_other_urls(url: str) -> None:
    with pytest.raises(BadRequest):
        target_path(url)


@pytest.fixture(scope="module")
def http(live_server: LiveServer) -> httpx.Client:
    return live_server.client()


def proxied(http: httpx.Client, method: str, target: str, **kwargs: Any) -> httpx.Response:
    headers = {"x-fal-target-url": target, **kwargs.pop("headers", {})}
    return http.request(method, PROXY, headers=headers, **kwargs)


def assert_bad_request(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-fal-error-type"] == "bad_request"
    body = response.json()
    assert body["error_type"] == "bad_request"
    detail: str = body["detail"]
    assert "x-fal-target-url" in detail
    return detail


def test_missing_target_header_is_400(http: httpx.Client) -> None:
    assert_bad_request(http.post(PROXY, json=TURBO_INPUT))


def test_foreign_host_is_400_and_not_fetched(http: httpx.Client) -> None:
    detail = assert_bad_request(proxied(http, "POST", "https://example.com/steal", json=TURBO_INPUT))
    assert "fal.run" in detail and "example.com" in detail


def test_other_methods_are_405(http: httpx.Client) -> None:
    response = proxied(http, "DELETE", TURBO_URL)
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, POST, PUT"


def test_run_through_proxy(http: httpx.Client) -> None:
    response = proxied(http, "POST", TURBO_URL, json=TURBO_INPUT)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    request_id = response.headers["x-fal-request-id"]
    assert len(request_id) == 36 and "," not in request_id  # one id, not the proxy's plus the route's
    image = response.json()["images"][0]
    assert image["url"].startswith("data:image/jpeg;base64,")
    assert (image["width"], image["height"]) == (512, 512)


def test_validation_error_through_proxy(http: httpx.Client) -> None:
    response = proxied(http, "POST", TURBO_URL, json={"model_name": "stabilityai/sd-turbo"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "prompt"]
    assert response.headers["x-fal-request-id"]


def test_realtime_token_through_proxy_is_a_bare_string(http: httpx.Client) -> None:
    body = {"allowed_apps": ["fast-lcm-diffusion"], "token_expiration": 120}
    response = proxied(http, "POST", "https://rest.fal.ai/tokens/", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    token = response.json()
    assert isinstance(token, str) and len(token) > 20


def test_no_key_is_401_from_the_target_route(live_server: LiveServer) -> None:
    response = httpx.post(
        live_server.base_url + PROXY, headers={"x-fal-target-url": TURBO_URL}, json=TURBO_INPUT, timeout=30
    )
    assert response.status_code == 401
    assert response.json()["error_type"] == "unauthorized"


def test_unknown_path_on_a_fal_host_is_404(http: httpx.Client) -> None:
    response = proxied(http, "POST", "https://fal.run/fal-ai/not-a-model", json=TURBO_INPUT)
    assert response.status_code == 404
    assert response.json() == {"detail": "Path /fal-ai/not-a-model not found"}


def test_queue_with_query_and_stream_through_proxy(http: httpx.Client) -> None:
    # Submit, then follow the status SSE stream and fetch the result, all through the proxy:
    # the query string (?logs=1) survives and the event stream is relayed as it is produced.
    submitted = proxied(http, "POST", "https://queue.fal.run/fal-ai/fast-turbo-diffusion", json=TURBO_INPUT)
    assert submitted.status_code == 200, submitted.text
    request_id = submitted.json()["request_id"]
    base = f"https://queue.fal.run/fal-ai/fast-turbo-diffusion/requests/{request_id}"
    headers = {"x-fal-target-url": base + "/status/stream?logs=1", "accept": "text/event-stream"}
    with http.stream("GET", PROXY, headers=headers) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    assert events[-1]["status"] == "COMPLETED"
    assert isinstance(events[-1]["logs"], list)
    result = proxied(http, "GET", base)
    assert result.status_code == 200
    assert result.json()["images"][0]["width"] == 512
