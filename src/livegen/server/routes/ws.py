"""``WS /{endpoint_id}``: fal's HTTP over WebSocket (``wss://ws.fal.run/{endpoint_id}``).

The same requests and answers as ``POST /{endpoint_id}``, over one connection that carries many
of them (PROTOCOL.md §12, fal's "HTTP over WebSockets" page). The client sends a request body
as one JSON message (text, or UTF-8 bytes); the server answers it with three text messages:

* ``{"type": "start", "request_id", "status", "headers"}``: the HTTP status and headers the
  ``POST`` would have had (``content-type``, ``x-fal-request-id``, ``x-fal-error-type`` ...);
* the body: fal's output, or fal's error body, as one JSON text message;
* ``{"type": "end", "request_id", "status", "time_to_first_byte_seconds"}``;

then reads the next request. One request at a time per connection, in order: a client may send
ahead, and the server holds at most two of its messages besides the one it is on (a client that
sends far ahead is held back by TCP, not by a growing buffer here). A client that goes away has
the request in progress abandoned at once, unless it had sent ahead: then its departure is seen
behind the messages it sent, and at most the next one is started in vain. Errors are answers, not closes: a body
that is not JSON is a 422 like the ``POST``'s, a rate-limited key a 429, and the connection stays
open.

The handshake is checked like the realtime one (``routes/realtime.py``: an ``Authorization: Key``
header or a realtime token for the app in ``?fal_jwt_token=``, the browser origin, the server's
state), refusals are HTTP answers, and connections count against ``--max-sessions``. fal's
lifecycle headers on the handshake apply to the files the requests store. A connection lives no
longer than its token or its key: at a token's expiry, a revocation or shutdown, the request in
progress is still answered (for up to ``FINISH_S``), then the socket closes with the code and
reason realtime sessions get. ``fal_client.ws_connect(app)`` (fal-client's raw WebSocket, whose
default path is the app itself) lands here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from typing import Any

from fastapi import FastAPI
from pydantic import ValidationError
from starlette.types import Message
from starlette.websockets import WebSocket, WebSocketDisconnect

from livegen.protocol.apps import ENDPOINTS, Endpoint
from livegen.protocol.errors import LivegenError, PayloadTooLarge, ShuttingDown
from livegen.protocol.schemas import Output
from livegen.server.disk import storage_error
from livegen.server.errors import INTERNAL_ERROR, Answer, error_answer, validation_answer
from livegen.server.metrics import Metrics
from livegen.server.middleware import request_id_var
from livegen.server.routes.realtime import TOKEN_EXPIRED_CLOSE, admit, http_base_url, run_connection
from livegen.server.storage import requested_ttl
from livegen.settings import Settings

logger = logging.getLogger(__name__)

# At a stop (token expiry, revocation, shutdown) the request in progress still gets its answer
# if it is done within this many seconds; messages not yet started are not read.
FINISH_S = 10.0
JSON_HEADERS = {"content-type": "application/json"}


class HttpOverWs:
    """One connection: read a request, answer it, repeat, until the client or a ``stop`` ends it."""

    def __init__(
        self,
        websocket: WebSocket,
        endpoint: Endpoint,
        *,
        key_id: str,
        base_url: str,
        file_ttl_s: float | None,
    ) -> None:
        state = websocket.app.state
        self._ws = websocket
        self._endpoint = endpoint
        self._state = state
        self._settings: Settings = state.settings
        self._metrics: Metrics = state.metrics
        self._key_id = key_id
        self._base_url = base_url
        self._file_ttl_s = file_ttl_s
        self._route = f"/{endpoint.endpoint_id}"
        self._stopping: tuple[int, str] | None = None
        self._stopped = asyncio.Event()  # close now: no request in progress, or out of time
        self._busy = False
        self._deadline: asyncio.TimerHandle | None = None  # a stop's limit for the request in progress

    def stop(self, code: int, reason: str, *, finish_frame_s: float = FINISH_S) -> None:
        """Close with ``code`` and ``reason`` once the request in progress is answered (within
        ``finish_frame_s``), or at once if there is none. Messages not yet started are not read."""
        if self._stopping is not None:
            return
        self._stopping = (code, reason)
        if not self._busy:
            self._stopped.set()
        else:
            self._deadline = asyncio.get_running_loop().call_later(finish_frame_s, self._stopped.set)

    async def run(self) -> None:
        await self._ws.accept()
        # The reader hands over one message at a time: with one in the inbox and one in its hand
        # it stops reading, and TCP holds back a client that sends far ahead.
        inbox: asyncio.Queue[Message] = asyncio.Queue(maxsize=1)
        gone = asyncio.Event()
        reader = asyncio.create_task(self._read(inbox, gone))
        try:
            while self._stopping is None:
                incoming = asyncio.create_task(inbox.get())
                if not await _first(incoming, gone, self._stopped):
                    break  # the client went, or a stop, while idle
                self._busy = True
                answer = asyncio.create_task(self._answer(incoming.result()))
                try:
                    if not await _first(answer, gone, self._stopped):
                        break  # the engine's work for it is abandoned (GenerationService._await)
                    answer.result()
                finally:
                    self._busy = False
            if self._stopping is not None and not gone.is_set():
                await self._ws.close(*self._stopping)
        except WebSocketDisconnect:
            pass  # the client went while we sent
        finally:
            reader.cancel()
            if self._deadline is not None:  # the answer came in time: nothing left to cut short
                self._deadline.cancel()

    async def _read(self, inbox: asyncio.Queue[Message], gone: asyncio.Event) -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while (message := await self._ws.receive())["type"] != "websocket.disconnect":
                await inbox.put(message)
        gone.set()

    async def _answer(self, message: Message) -> None:
        request_id = str(uuid.uuid4())
        token = request_id_var.set(request_id)  # the id in this request's log lines, as on HTTP
        started = time.perf_counter()
        try:
            status, body, headers = await self._respond(message)
        finally:
            request_id_var.reset(token)
        ttfb = time.perf_counter() - started
        self._metrics.http_requests.labels(self._route, "WS", str(status)).inc()
        self._metrics.http_latency.labels(self._route, "WS").observe(ttfb)
        meta = {"request_id": request_id, "status": status}
        headers = {**JSON_HEADERS, "x-fal-request-id": request_id, **{k.lower(): v for k, v in headers.items()}}
        await self._ws.send_text(json.dumps({"type": "start", **meta, "headers": headers}))
        await self._ws.send_text(json.dumps(body, ensure_ascii=False))
        await self._ws.send_text(json.dumps({"type": "end", **meta, "time_to_first_byte_seconds": round(ttfb, 6)}))

    async def _respond(self, message: Message) -> Answer:
        """What ``POST /{endpoint_id}`` would answer to this message's body: status, body, headers."""
        try:
            return 200, await self._run(message), {}
        except LivegenError as exc:
            return error_answer(exc)
        except ValidationError as exc:
            return validation_answer([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
        except _BodyNotJson as exc:
            return validation_answer([exc.error])
        except OSError as exc:
            if (mapped := storage_error(exc)) is None:
                return self._internal_error()
            logger.error("storage fault on WS %s: %s: %s", self._route, type(exc).__name__, exc)
            return error_answer(mapped)
        except Exception:  # noqa: BLE001 - a bug is a 500 answer, as on HTTP; the connection goes on
            return self._internal_error()

    def _internal_error(self) -> Answer:
        logger.exception("unhandled error on WS %s", self._route)
        return INTERNAL_ERROR

    async def _run(self, message: Message) -> dict[str, Any]:
        if self._state.draining:
            raise ShuttingDown()
        self._state.rate_limiter.check(self._key_id)
        data = message.get("text")
        raw = data.encode() if data is not None else message.get("bytes") or b""
        if len(raw) > self._settings.max_request_bytes:
            raise PayloadTooLarge(f"the request body is larger than {self._settings.max_request_bytes} bytes")
        try:
            payload = json.loads(raw)
        except ValueError as exc:  # FastAPI's words for a POST body that is not JSON
            position, why = (exc.pos, exc.msg) if isinstance(exc, json.JSONDecodeError) else (0, str(exc))
            error = {"type": "json_invalid", "loc": ("body", position), "msg": "JSON decode error"}
            raise _BodyNotJson({**error, "ctx": {"error": why}}) from None
        body = self._endpoint.input_model.model_validate(payload)
        service = self._state.generation
        output = await service.run(self._endpoint, body, base_url=self._base_url, file_ttl_s=self._file_ttl_s)
        dumped: dict[str, Any] = Output.model_validate(output).model_dump(mode="json", exclude_none=True, by_alias=True)
        return dumped


async def _first(task: asyncio.Task[Any], *events: asyncio.Event) -> bool:
    """Wait for ``task`` or any of ``events``: whether ``task`` finished (if not, it is cancelled)."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait({task, *waiters}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if task.done():
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False


class _BodyNotJson(Exception):
    """A message that is not JSON: the 422 FastAPI gives a ``POST`` body that is not."""

    def __init__(self, error: dict[str, Any]) -> None:
        self.error = error


def _handler(endpoint: Endpoint) -> Any:
    async def http_over_ws(websocket: WebSocket) -> None:
        state = websocket.app.state
        admitted = await admit(websocket, endpoint, "ws", lambda: requested_ttl(websocket.headers))
        if admitted is None:
            return
        with admitted.slot:
            key_id, base_url = admitted.key_id, http_base_url(websocket, state.settings)
            connection = HttpOverWs(websocket, endpoint, key_id=key_id, base_url=base_url, file_ttl_s=admitted.checked)
            on_expiry = functools.partial(connection.stop, *TOKEN_EXPIRED_CLOSE)
            await run_connection(state, connection, key_id=key_id, valid_for=admitted.valid_for, on_expiry=on_expiry)

    http_over_ws.__name__ = "ws_" + endpoint.slug
    return http_over_ws


def install(app: FastAPI) -> None:
    for endpoint in ENDPOINTS:
        app.add_api_websocket_route(f"/{endpoint.endpoint_id}", _handler(endpoint))
