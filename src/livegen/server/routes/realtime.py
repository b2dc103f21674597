"""``WS /{endpoint_id}/realtime``: fal's realtime protocol (msgpack frames both ways).

Everything is checked before the handshake is accepted, and a refusal is an HTTP answer with
fal's error body (403 for credentials and origins, 503 when the server is full or shutting down, 422 for a bad
``max_buffering``), not an accepted socket closed with an unexplained code. Credentials: the
``fal_jwt_token`` query parameter (from ``POST /rest/tokens/``, scoped to the app's alias) or
an ``Authorization: Key`` handshake header (fal-client's ``use_jwt=False``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.websockets import WebSocket

from livegen.protocol.apps import ENDPOINTS, Endpoint, Task
from livegen.protocol.errors import (
    Forbidden,
    InvalidInput,
    LivegenError,
    ModelUnavailable,
    ServerFull,
    ShuttingDown,
    Unauthorized,
    error_body,
)
from livegen.protocol.schemas import LcmRealtime, TurboRealtime
from livegen.server.auth import KeyStore
from livegen.server.deps import key_or_token
from livegen.server.middleware import origin_allowed
from livegen.server.sessions import Session
from livegen.settings import Settings

logger = logging.getLogger(__name__)
T = TypeVar("T")

REALTIME_MODELS: dict[str, type[BaseModel]] = {
    "fal-ai/fast-turbo-diffusion": TurboRealtime,
    "fal-ai/fast-lcm-diffusion": LcmRealtime,
}


SHUTDOWN_CLOSE = (1012, "server shutting down; reconnect")  # 1012: service restart
TOKEN_EXPIRED_CLOSE = (1000, "token expired; reconnect with a new token")
TOKEN_EXPIRY_FINISH_S = 10.0  # at token expiry, the frame being rendered still gets its result within this
KEY_REVOKED_CLOSE = (1008, "the API key this session was opened with has been revoked")  # 1008: policy


class Connection(Protocol):
    """An accepted WebSocket connection, run to its end and stoppable from outside: a realtime
    ``Session``, or an HTTP-over-WebSocket connection (``routes/ws.py``)."""

    async def run(self) -> None: ...

    def stop(self, code: int, reason: str) -> None: ...


class SessionSlots:
    """Counts open WebSocket connections (realtime sessions and HTTP over WebSocket) against
    ``max_sessions``, and knows them (to close them at shutdown)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        self.sessions: set[Connection] = set()

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.open >= self.limit:
            raise ServerFull()
        self.open += 1
        try:
            yield
        finally:
            self.open -= 1


def input_model(endpoint: Endpoint) -> type[BaseModel]:
    """Base apps take an optional image (then image-to-image); subpaths keep their schema."""
    if endpoint.task is Task.TEXT_TO_IMAGE:
        return REALTIME_MODELS[endpoint.app_id]
    return endpoint.input_model


def authenticate(websocket: WebSocket, endpoint: Endpoint) -> tuple[str, float | None]:
    """Check the credentials: the API key's id (a token's: the key it was issued for) and how
    many seconds they stay valid (a token's remaining lifetime), or None for an API key, which
    does not expire."""
    token, authorization = websocket.query_params.get("fal_jwt_token"), websocket.headers.get("authorization")
    return key_or_token(websocket.app.state, token, authorization, app=endpoint.alias)


def check_origin(websocket: WebSocket, settings: Settings) -> None:
    """Browsers send Origin: allow the server's own origin and the configured ones."""
    origin = websocket.headers.get("origin")
    if origin is None or origin_allowed(origin, websocket.headers.get("host", ""), settings.allowed_origins):
        return
    raise Forbidden(f"origin {origin} is not allowed; add it to --allowed-origins", public=True)


def max_buffering(websocket: WebSocket, settings: Settings) -> int:
    raw = websocket.query_params.get("max_buffering")
    if raw is None:
        return settings.default_max_buffering
    if not raw.isdigit() or not 1 <= int(raw) <= 60:
        raise InvalidInput(f"max_buffering must be an integer in 1..60, got {raw!r}", loc=("query", "max_buffering"))
    return int(raw)


async def deny(websocket: WebSocket, exc: LivegenError) -> None:
    headers = {"X-Fal-Error-Type": exc.error_type, **exc.headers()}
    # fal refuses bad credentials on the WebSocket with 403 (PROTOCOL.md §8.1); the body says why.
    status = 403 if isinstance(exc, Unauthorized) else exc.http_status
    response = JSONResponse(error_body(exc), status_code=status, headers=headers)
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # a server without the denial-response extension: a bare 403
        await websocket.close(1008, exc.wire_message[:120])


def check_handshake(websocket: WebSocket, endpoint: Endpoint) -> tuple[str, float | None]:
    """What every WebSocket here checks before it is accepted (a ``LivegenError`` to ``refuse``
    otherwise): the credentials (``authenticate``), the browser origin, the server's state."""
    state = websocket.app.state
    key_id, valid_for = authenticate(websocket, endpoint)
    check_origin(websocket, state.settings)
    if getattr(state, "fatal_error", None):
        raise ModelUnavailable(f"the server failed to start: {state.fatal_error}")
    if state.draining:
        raise ShuttingDown()
    return key_id, valid_for


async def refuse(websocket: WebSocket, endpoint: Endpoint, exc: LivegenError, kind: str) -> None:
    logger.info("%s refused endpoint=%s status=%d %s", kind, endpoint.endpoint_id, exc.http_status, exc.error_type)
    await deny(websocket, exc)


@dataclass
class Admitted(Generic[T]):
    """A WebSocket that passed ``admit``: its credentials' key and lifetime (``check_handshake``),
    what the route's own check returned, and its ``--max-sessions`` slot, held until ``slot`` is
    closed (``with admitted.slot:`` around the connection's life)."""

    key_id: str
    valid_for: float | None
    checked: T
    slot: contextlib.ExitStack


async def admit(websocket: WebSocket, endpoint: Endpoint, kind: str, check: Callable[[], T]) -> Admitted[T] | None:
    """Everything a WebSocket route does before it accepts: ``check_handshake``, the route's own
    ``check`` (its query or headers), then a ``--max-sessions`` slot. The first ``LivegenError``
    refuses the handshake (``refuse``) and gives None."""
    state = websocket.app.state
    with contextlib.ExitStack() as stack:
        try:
            key_id, valid_for = check_handshake(websocket, endpoint)
            checked = check()
            stack.enter_context(state.realtime_slots.take())
        except LivegenError as exc:
            await refuse(websocket, endpoint, exc, kind)
            return None
        return Admitted(key_id, valid_for, checked, stack.pop_all())


def http_base_url(websocket: WebSocket, settings: Settings) -> str:
    """The base URL that file URLs in answers start with, as ``deps.base_url`` gives HTTP routes."""
    return settings.public_url.rstrip("/") or str(websocket.base_url).replace("ws", "http", 1).rstrip("/")


async def run_connection(
    state: Any, connection: Connection, *, key_id: str, valid_for: float | None, on_expiry: Callable[[], None]
) -> None:
    """Run an accepted connection to its end: known to the server (``close_sessions`` stops it at
    shutdown), stopped by ``on_expiry`` when its token expires (``valid_for`` seconds; None: a
    key, which does not) and when its key is revoked."""
    state.realtime_slots.sessions.add(connection)
    expiry = None
    if valid_for is not None:
        expiry = asyncio.get_running_loop().call_later(max(0.0, valid_for), on_expiry)
    # `livegen keys revoke` (another process) only changes the database: watch it.
    watch = asyncio.create_task(watch_key(connection, state.keys, key_id, state.settings.key_check_s))
    try:
        await connection.run()
    finally:
        if expiry is not None:
            expiry.cancel()
        watch.cancel()
        state.realtime_slots.sessions.discard(connection)


def _handler(endpoint: Endpoint) -> Any:
    model = input_model(endpoint)

    async def realtime(websocket: WebSocket) -> None:
        state = websocket.app.state
        settings: Settings = state.settings
        admitted = await admit(websocket, endpoint, "realtime", lambda: max_buffering(websocket, settings))
        if admitted is None:
            return
        with admitted.slot:
            session = Session(
                websocket,
                endpoint,
                model,
                state.generation,
                settings,
                state.metrics,
                max_buffering=admitted.checked,
                base_url=http_base_url(websocket, settings),
            )
            # A session lives no longer than its token. 1000 with a reason: fal's JS client then
            # fetches a new token and reconnects on its next send without calling onError, and
            # fal-client's recv() returns None (PROTOCOL.md §8.4). A frame being rendered then is
            # still answered before the close (frames still waiting are dropped).
            on_expiry = functools.partial(session.stop, *TOKEN_EXPIRED_CLOSE, finish_frame_s=TOKEN_EXPIRY_FINISH_S)
            await run_connection(
                state, session, key_id=admitted.key_id, valid_for=admitted.valid_for, on_expiry=on_expiry
            )

    realtime.__name__ = "realtime_" + endpoint.slug
    return realtime


async def watch_key(session: Connection, keys: KeyStore, key_id: str, interval_s: float) -> None:
    """Close ``session`` (1008 and why) once its API key is revoked, checking every ``interval_s``."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            active = keys.is_active(key_id)
        except Exception:  # noqa: BLE001 - a storage hiccup is no reason to drop a session; check again
            logger.warning("realtime key check failed; the session stays open", exc_info=True)
            continue
        if not active:
            logger.info("realtime session closed: its API key was revoked")
            session.stop(*KEY_REVOKED_CLOSE)
            return


async def close_sessions(app: FastAPI, timeout_s: float = 2.0) -> int:
    """Close every open session with 1012 and a reason (server shutdown, before uvicorn closes
    the sockets with a bare 1012); waits up to ``timeout_s`` for them to go (an HTTP-over-WebSocket
    connection first answers the request it is on). How many there were."""
    slots: SessionSlots = app.state.realtime_slots
    sessions = list(slots.sessions)
    for session in sessions:
        session.stop(*SHUTDOWN_CLOSE)
    deadline = time.monotonic() + timeout_s
    while slots.sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    if sessions:
        logger.info("realtime sessions closed for shutdown count=%d", len(sessions))
    return len(sessions)


def install(app: FastAPI, settings: Settings) -> None:
    app.state.realtime_slots = SessionSlots(settings.max_sessions)
    for endpoint in ENDPOINTS:
        app.add_api_websocket_route(f"/{endpoint.endpoint_id}/realtime", _handler(endpoint))
