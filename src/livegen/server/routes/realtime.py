"""``WS /{endpoint_id}/realtime``: fal's realtime protocol (msgpack frames both ways).

Everything is checked before the handshake is accepted, and a refusal is an HTTP answer with
fal's error body (403 for credentials and origins, 503 when the server is full, 422 for a bad
``max_buffering``), not an accepted socket closed with an unexplained code. Credentials: the
``fal_jwt_token`` query parameter (from ``POST /rest/tokens/``, scoped to the app's alias) or
an ``Authorization: Key`` handshake header (fal-client's ``use_jwt=False``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

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
    Unauthorized,
    error_body,
)
from livegen.protocol.schemas import LcmRealtime, TurboRealtime
from livegen.server.auth import KeyStore, parse_authorization
from livegen.server.sessions import Session
from livegen.server.tokens import REALTIME, TokenSigner
from livegen.settings import Settings

logger = logging.getLogger(__name__)

REALTIME_MODELS: dict[str, type[BaseModel]] = {
    "fal-ai/fast-turbo-diffusion": TurboRealtime,
    "fal-ai/fast-lcm-diffusion": LcmRealtime,
}


class SessionSlots:
    """Counts open sessions against ``max_sessions``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

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


def authenticate(websocket: WebSocket, endpoint: Endpoint) -> str:
    token = websocket.query_params.get("fal_jwt_token")
    if token:
        signer: TokenSigner = websocket.app.state.tokens
        return signer.verify(token, REALTIME, app=endpoint.alias).key_id
    if websocket.headers.get("authorization"):
        keys: KeyStore = websocket.app.state.keys
        return keys.verify(parse_authorization(websocket.headers.get("authorization")))
    raise Unauthorized("pass ?fal_jwt_token= (from POST /rest/tokens/) or an 'Authorization: Key' header", public=True)


def check_origin(websocket: WebSocket, settings: Settings) -> None:
    """Browsers send Origin: allow the server's own origin and the configured ones."""
    origin = websocket.headers.get("origin")
    if origin is None or "*" in settings.allowed_origins or origin in settings.allowed_origins:
        return
    host = websocket.headers.get("host", "")
    if origin.split("://", 1)[-1] == host:
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


def _handler(endpoint: Endpoint) -> Any:
    model = input_model(endpoint)

    async def realtime(websocket: WebSocket) -> None:
        state = websocket.app.state
        settings: Settings = state.settings
        try:
            authenticate(websocket, endpoint)
            check_origin(websocket, settings)
            buffering = max_buffering(websocket, settings)
            if getattr(state, "fatal_error", None):
                raise ModelUnavailable(f"the server failed to start: {state.fatal_error}")
            slot = state.realtime_slots.take()
            slot.__enter__()
        except LivegenError as exc:
            logger.info(
                "realtime refused endpoint=%s status=%d %s", endpoint.endpoint_id, exc.http_status, exc.error_type
            )
            await deny(websocket, exc)
            return
        try:
            base_url = settings.public_url.rstrip("/") or str(websocket.base_url).replace("ws", "http", 1).rstrip("/")
            session = Session(
                websocket,
                endpoint,
                model,
                state.generation,
                settings,
                state.metrics,
                max_buffering=buffering,
                base_url=base_url,
            )
            await session.run()
        finally:
            slot.__exit__(None, None, None)

    realtime.__name__ = "realtime_" + endpoint.slug
    return realtime


def install(app: FastAPI, settings: Settings) -> None:
    app.state.realtime_slots = SessionSlots(settings.max_sessions)
    for endpoint in ENDPOINTS:
        app.add_api_websocket_route(f"/{endpoint.endpoint_id}/realtime", _handler(endpoint))
