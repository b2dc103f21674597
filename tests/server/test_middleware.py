"""In-process checks of ``RequestIdMiddleware``'s two answers, judged by fal-client's own retry
rule (``fal_client.client._should_retry_response``, fal-client 1.0.3): a request refused before
livegen accepted it looks like fal's ingress (retried), an accepted request's error carries
``x-fal-request-id`` (not replayed). The same against a real server and the real client:
``tests/reliability/test_limits.py``."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from fal_client.client import _should_retry_response as fal_client_retries
from hypothesis import example, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from livegen.protocol.errors import (
    GpuOutOfMemory,
    LivegenError,
    ModelUnavailable,
    Overloaded,
    QueueFull,
    ShuttingDown,
)
from livegen.server.errors import livegen_error
from livegen.server.middleware import CorsMiddleware, DrainCutMiddleware, RequestIdMiddleware, origin_allowed

ERRORS: dict[str, LivegenError] = {
    "overloaded": Overloaded("the server has 1 requests in flight, its limit; retry later"),
    "shutting-down": ShuttingDown(),
    "oom": GpuOutOfMemory(),
    "model": ModelUnavailable("no such model here"),
    "queue-full": QueueFull("the queue holds 1 requests, its limit", retry_after=5),
}


async def fail(request: Request) -> Response:
    raise ERRORS[request.path_params["name"]]


async def ok(request: Request) -> Response:
    return JSONResponse({"images": []})


async def chunked_refusal(scope: Scope, receive: Receive, send: Send) -> None:
    """An ingress refusal whose body comes in two pieces, without a Content-Length."""
    headers = [(b"content-type", b"application/json"), (b"x-fal-error-type", b"server_overloaded")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": b'{"detail": "busy", ', "more_body": True})
    await send({"type": "http.response.body", "body": b'"error_type": "server_overloaded"}'})


def client(draining: bool = False) -> TestClient:
    app = Starlette(
        routes=[Route("/fail/{name}", fail, methods=["POST"]), Route("/ok", ok, methods=["GET", "POST"])],
        exception_handlers={LivegenError: livegen_error},
    )
    return TestClient(RequestIdMiddleware(DrainCutMiddleware(app, SimpleNamespace(draining=draining))))


@pytest.mark.parametrize("name", ["overloaded", "shutting-down"])
def test_refusals_before_acceptance_look_like_fals_ingress(name: str) -> None:
    error = ERRORS[name]
    response = client().post(f"/fail/{name}")
    assert response.status_code == 503
    assert "x-fal-request-id" not in response.headers
    assert response.headers["x-fal-error-type"] == error.error_type
    assert response.headers["retry-after"] == error.headers()["Retry-After"]
    assert response.json() == {"detail": error.message, "error_type": error.error_type, "ingress": "nginx"}
    assert int(response.headers["content-length"]) == len(response.content)
    assert fal_client_retries(response)


@pytest.mark.parametrize("name", ["oom", "model"])
def test_errors_of_accepted_requests_keep_the_request_id(name: str) -> None:
    response = client().post(f"/fail/{name}")
    assert response.status_code == 503
    assert response.headers["x-fal-request-id"]
    assert set(response.json()) == {"detail", "error_type"}
    assert not fal_client_retries(response)  # not replayed: the app answered


def test_queue_full_keeps_the_request_id_and_is_retried_anyway() -> None:
    response = client().post("/fail/queue-full")
    assert response.status_code == 429 and response.headers["x-fal-request-id"]
    assert set(response.json()) == {"detail", "error_type"}
    assert fal_client_retries(response)  # fal-client retries every 429, the JS client too


def test_new_work_while_draining_is_an_ingress_refusal_and_reads_still_work() -> None:
    http = client(draining=True)
    refused = http.post("/ok")
    assert refused.status_code == 503 and "x-fal-request-id" not in refused.headers
    assert refused.json() == {"detail": ShuttingDown.public_message, "error_type": "shutting_down", "ingress": "nginx"}
    assert fal_client_retries(refused)
    read = http.get("/ok")
    assert read.status_code == 200 and read.headers["x-fal-request-id"]


def test_success_keeps_the_request_id() -> None:
    response = client().post("/ok")
    assert response.status_code == 200 and response.headers["x-fal-request-id"]
    assert response.json() == {"images": []}


def test_a_refusal_body_in_pieces_is_marked_whole() -> None:
    http = TestClient(RequestIdMiddleware(chunked_refusal))
    response = http.post("/")
    assert "x-fal-request-id" not in response.headers
    assert json.loads(response.content) == {"detail": "busy", "error_type": "server_overloaded", "ingress": "nginx"}
    assert int(response.headers["content-length"]) == len(response.content)
    assert fal_client_retries(response)


# -- CORS (the live-server checks: tests/server/routes/test_cors.py) ------------------------------


@settings(max_examples=300, deadline=None)
@example(origin="\n", requested=None, method="GET", preflight=False, allowed=["*"])  # found in CI: echoed a newline
@example(origin="http://app.example\n", requested="authorization\n,x", method="OPTIONS", preflight=True, allowed=["*"])
@given(
    origin=st.one_of(st.none(), st.text(max_size=40), st.sampled_from(["http://app.example", "null", ""])),
    requested=st.one_of(st.none(), st.text(max_size=60)),
    method=st.sampled_from(["OPTIONS", "GET", "POST"]),
    preflight=st.booleans(),
    allowed=st.sampled_from([[], ["*"], ["http://app.example"]]),
)
def test_cors_answers_any_headers_with_one_well_formed_response(
    origin: str | None, requested: str | None, method: str, preflight: bool, allowed: list[str]
) -> None:
    """Whatever Origin and Access-Control-Request-Headers hold (as latin-1, as ASGI gives them):
    one response start and one body, header values that round-trip, and CORS headers only for
    an allowed origin."""
    headers = [(b"host", b"livegen:8000")]
    if origin is not None:
        headers.append((b"origin", origin.encode("utf-8").decode("latin-1").encode("latin-1")))
    if preflight:
        headers.append((b"access-control-request-method", b"POST"))
    if requested is not None:
        headers.append((b"access-control-request-headers", requested.encode("utf-8")))
    messages: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    async def send(message: Message) -> None:
        messages.append(message)

    scope = {"type": "http", "method": method, "path": "/x", "headers": headers}
    asyncio.run(CorsMiddleware(app, allowed)(scope, receive, send))
    assert [m["type"] for m in messages] == ["http.response.start", "http.response.body"]
    answer = {k.decode("latin-1"): v for k, v in messages[0]["headers"]}
    for value in answer.values():
        assert isinstance(value, bytes) and b"\r" not in value and b"\n" not in value
    is_allowed = origin is not None and origin_allowed(origin.encode().decode("latin-1"), "livegen:8000", allowed)
    assert ("access-control-allow-origin" in answer) == is_allowed
    if method == "OPTIONS" and preflight and origin is not None:
        assert messages[0]["status"] == (204 if is_allowed else 403)
