"""ASGI middleware: request ids and ingress-style refusals (below), the request body cap, the
drain cut, and CORS for the browser origins in ``--allowed-origins``.

Every response the app produces carries ``x-fal-request-id``: fal-client (Python) takes its
presence to mean "the app answered", and never retries such a 502/503/504. A request refused
before livegen accepted it (``server_overloaded``, ``shutting_down``) is what fal's ingress
would refuse, so it is answered the way fal's ingress (nginx) answers: no ``x-fal-request-id``,
and the body, still fal's ``{"detail", "error_type"}``, gains ``"ingress": "nginx"``. fal-client
1.0.3 retries a 502/503/504 only without the header *and* with ``nginx`` in the body
(``_is_ingress_error``; up to 10 attempts, 0.1 s doubling); the JS client retries 503 either
way. 429s (``queue_full``, rate limits) keep the header: both clients retry them regardless.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import re
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from livegen.protocol.errors import Forbidden, LivegenError, Overloaded, PayloadTooLarge, ShuttingDown, error_body

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

# Refusals of requests livegen has not accepted (no work done, nothing stored), or abandoned
# unanswered (the drain cut): answered like fal's ingress so that both official clients retry
# them. Only 502/503/504 need it; errors of accepted requests (e.g. ``gpu_out_of_memory``,
# ``model_unavailable``) keep the header and are not replayed by fal-client.
INGRESS_REFUSALS = frozenset({Overloaded.error_type, ShuttingDown.error_type})
INGRESS_STATUSES = frozenset({502, 503, 504})
INGRESS_MARK = ("ingress", "nginx")  # fal-client looks for "nginx" in the body text


def is_ingress_refusal(status: int, headers: list[tuple[bytes, bytes]]) -> bool:
    if status not in INGRESS_STATUSES:
        return False
    error_type = next((v for k, v in headers if k.lower() == b"x-fal-error-type"), b"")
    return error_type.decode("latin-1") in INGRESS_REFUSALS


def mark_ingress_body(body: bytes) -> bytes:
    """``body`` (fal's JSON error) with ``"ingress": "nginx"`` added; other bodies unchanged."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body
    if not isinstance(parsed, dict):
        return body
    key, value = INGRESS_MARK
    parsed.setdefault(key, value)
    return json.dumps(parsed, ensure_ascii=False, separators=(",", ":")).encode()


async def send_error(send: Send, error: LivegenError) -> None:
    """Answer ``error`` in fal's format (``{"detail", "error_type"}``, ``X-Fal-Error-Type``) from
    middleware, where no exception handler runs."""
    body = json.dumps(error_body(error)).encode()
    headers = [(b"content-type", b"application/json"), (b"x-fal-error-type", error.error_type.encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        held: Message | None = None  # an ingress refusal's start, sent with its rewritten body
        chunks: list[bytes] = []

        async def send_with_id(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if is_ingress_refusal(message["status"], headers):
                    keep = [(k, v) for k, v in headers if k.lower() not in (b"x-fal-request-id", b"content-length")]
                    held = {**message, "headers": keep}
                    return
                if not any(name.lower() == b"x-fal-request-id" for name, _ in headers):
                    headers.append((b"x-fal-request-id", request_id.encode()))
                    message = {**message, "headers": headers}
            elif message["type"] == "http.response.body" and held is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = mark_ingress_body(b"".join(chunks))
                start, held = held, None
                start["headers"].append((b"content-length", str(len(body)).encode()))
                await send(start)
                message = {"type": "http.response.body", "body": body}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes`` on the JSON routes, before they are read in
    full: a too-large ``Content-Length`` is refused without reading anything, and a chunked
    body is cut off as soon as it passes the cap. Upload routes (``/cdn/``, ``/rest/storage/``)
    stream to disk under their own, larger limits."""

    EXEMPT = ("/cdn/", "/rest/storage/")

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.EXEMPT):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, self._error())
            return
        seen = 0
        refused = False

        async def counted_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes and not refused:
                    # Answer now and tell the app the client left: frameworks turn exceptions
                    # raised while reading a body into their own 400s.
                    refused = True
                    await send_error(send, self._error())
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # after our 413, whatever the app still sends is dropped
                await send(message)

        await self.app(scope, counted_receive, guarded_send)

    def _error(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"the request body is larger than the {self.max_bytes}-byte limit")


class DrainCutMiddleware:
    """A request still running when SIGTERM's drain timeout ends is cancelled by uvicorn, which
    would answer a bare text 500: answer fal's 503 ``ShuttingDown`` (with ``Retry-After``)
    instead, so clients see a retryable error and not an app failure. New work after SIGTERM is
    refused the same way before it reaches the app. Both pass ``RequestIdMiddleware`` as ingress
    refusals, so both official clients retry them (against another server behind a balancer, or
    this one once restarted). ``state.draining`` is set by ``livegen serve`` on SIGTERM; a
    cancellation at any other time propagates as before."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if getattr(self.state, "draining", False) and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            await send_error(send, ShuttingDown())  # new work, after SIGTERM: go elsewhere
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if started or not getattr(self.state, "draining", False) or task is None:
                raise
            task.uncancel()  # the cancellation is answered here; the task ends normally
            await send_error(send, ShuttingDown())


# What a page's fetch may read besides the CORS-safelisted headers: both clients read the request
# id and the timeout type; the error type and Retry-After are for callers of their own.
CORS_EXPOSED = b"x-fal-request-id, x-fal-request-timeout-type, x-fal-error-type, retry-after"
CORS_METHODS = b"GET, HEAD, POST, PUT, DELETE, OPTIONS"
CORS_MAX_AGE = b"600"
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # an HTTP token (fullmatch)
_ORIGIN = re.compile(r"[!-~]+")  # printable ASCII, no spaces (fullmatch)


def origin_allowed(origin: str, host: str, allowed: list[str]) -> bool:
    """Whether a browser page at ``origin`` may use this server: the server's own origin (the
    request's ``Host``), or one in ``--allowed-origins`` (``*``: any). Origins are compared as
    browsers send them, ``scheme://host[:port]`` in lower case; a value no browser sends
    (whitespace, control or non-ASCII characters) is never allowed, so it is never echoed back
    in a header."""
    if not _ORIGIN.fullmatch(origin):
        return False
    return "*" in allowed or origin in allowed or origin.split("://", 1)[-1] == host.lower()


class CorsMiddleware:
    """CORS for pages on the origins in ``--allowed-origins`` (the same list that admits them on
    the realtime WebSocket), so that ``@fal-ai/client`` in a browser app served from elsewhere (a
    dev server on another port, a site in front of livegen) can read livegen's answers.

    A preflight from an allowed origin is answered 204 with the methods and the request headers it
    asked for: fal's clients send ``Authorization``, ``Content-Type`` and ``x-fal-*`` headers, and a
    newer client may add more. From any other origin it is refused with fal's 403, without CORS
    headers, so the browser refuses the request it was about to send. Responses to an allowed
    origin carry ``Access-Control-Allow-Origin`` (that origin), the headers the clients read, and
    ``Vary: Origin``; no cookies are involved (the clients authenticate with headers), so
    credentials are not allowed. Outermost, so that every answer gets the headers: refusals from
    the other middleware too, whose status (a retryable 503, a 413) the client must be able to
    read. WebSockets check ``Origin`` themselves (``routes/realtime.py``)."""

    def __init__(self, app: ASGIApp, allowed_origins: list[str]) -> None:
        self.app = app
        self.allowed = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get(b"origin")
        if origin is None:
            await self.app(scope, receive, send)
            return
        allowed = origin_allowed(origin, headers.get(b"host", ""), self.allowed)
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            await self._preflight(send, origin, allowed, headers)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [(b"vary", b"Origin")]
                if allowed:
                    extra += [
                        (b"access-control-allow-origin", origin.encode("latin-1")),
                        (b"access-control-expose-headers", CORS_EXPOSED),
                    ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(self, send: Send, origin: str, allowed: bool, headers: dict[bytes, str]) -> None:
        if not allowed:
            refusal = Forbidden(f"origin {origin} is not allowed; add it to --allowed-origins", public=True)
            await send_error(send, refusal)
            return
        requested = [h.strip() for h in headers.get(b"access-control-request-headers", "").split(",")]
        answer = [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-methods", CORS_METHODS),
            (b"access-control-max-age", CORS_MAX_AGE),
            (b"vary", b"Origin"),
        ]
        names = [h for h in requested if _HEADER_NAME.fullmatch(h)]
        if names:
            answer.append((b"access-control-allow-headers", ", ".join(names).encode("latin-1")))
        # Chrome's Private Network Access: a page on a public site asking for a server on this network.
        if headers.get(b"access-control-request-private-network", "").lower() == "true":
            answer.append((b"access-control-allow-private-network", b"true"))
        await send({"type": "http.response.start", "status": 204, "headers": answer})
        await send({"type": "http.response.body", "body": b""})
