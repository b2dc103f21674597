"""ASGI middleware: request ids (every HTTP response carries ``x-fal-request-id``; fal-client
uses its presence to tell an app's error from a gateway's, which it would retry) and the
request body cap."""

from __future__ import annotations

import asyncio
import contextvars
import json
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from livegen.protocol.errors import LivegenError, PayloadTooLarge, ShuttingDown, error_body

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


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

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == b"x-fal-request-id" for name, _ in headers):
                    headers.append((b"x-fal-request-id", request_id.encode()))
                    message = {**message, "headers": headers}
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
            await self._refuse(send)
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
                    await self._refuse(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:  # after our 413, whatever the app still sends is dropped
                await send(message)

        await self.app(scope, counted_receive, guarded_send)

    def _message(self) -> str:
        return f"the request body is larger than the {self.max_bytes}-byte limit"

    async def _refuse(self, send: Send) -> None:
        error = PayloadTooLarge(self._message())
        body = json.dumps(error_body(error)).encode()
        headers = [(b"content-type", b"application/json"), (b"x-fal-error-type", error.error_type.encode())]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class DrainCutMiddleware:
    """A request still running when SIGTERM's drain timeout ends is cancelled by uvicorn, which
    would answer a bare text 500: answer fal's 503 ``ShuttingDown`` (with ``Retry-After``)
    instead, so clients see a retryable error and not an app failure. ``state.draining`` is set
    by ``livegen serve`` on SIGTERM; a cancellation at any other time propagates as before."""

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if getattr(self.state, "draining", False) and scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            await self._answer(send, ShuttingDown())  # new work, after SIGTERM: go elsewhere
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
            await self._answer(send, ShuttingDown())

    @staticmethod
    async def _answer(send: Send, error: LivegenError) -> None:
        body = json.dumps(error_body(error)).encode()
        headers = [(b"content-type", b"application/json"), (b"x-fal-error-type", error.error_type.encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers().items()]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
