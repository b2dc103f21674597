"""One place that turns exceptions into fal's error responses (see ``protocol/errors.py``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from livegen.protocol.errors import LivegenError, error_body
from livegen.server.disk import storage_error

logger = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    """fal's error body: ``detail`` is a list for validation errors (422), else a message, with
    ``error_type`` naming the category (also in the ``X-Fal-Error-Type`` header)."""

    model_config = ConfigDict(extra="allow")

    detail: str | list[ErrorDetail]
    error_type: str | None = None


# Every operation documents this as its ``default`` response, so /openapi.json covers the
# errors every route can answer (401, 404, 413, 429, 503, ...), not only FastAPI's 422.
RESPONSES: dict[int | str, dict[str, Any]] = {
    "default": {"model": ErrorBody, "description": "An error, in fal's shape (PROTOCOL.md §7.1)"}
}


def _response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


# fal's answer as (status, body, headers): the HTTP handlers below and HTTP over WebSocket
# (``routes/ws.py``, which sends the same three in its start and body messages) build from these.
Answer = tuple[int, Any, dict[str, str]]
INTERNAL_ERROR: Answer = (500, {"detail": "Internal Server Error"}, {})


def error_answer(exc: LivegenError) -> Answer:
    if exc.http_status >= 500 and type(exc) is LivegenError:
        logger.error("request failed: %s", exc.message)
    return exc.http_status, error_body(exc), {"X-Fal-Error-Type": exc.error_type, **exc.headers()}


def validation_answer(errors: Sequence[dict[str, Any]]) -> Answer:
    return 422, {"detail": [clean_validation_error(e) for e in errors]}, {"X-Fal-Error-Type": "validation_error"}


async def livegen_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LivegenError)
    return _response(*error_answer(exc))


def clean_validation_error(error: dict[str, Any]) -> dict[str, Any]:
    # Never echo the input back: it may be a data URL of many megabytes, or a secret.
    out: dict[str, Any] = {
        "loc": list(error.get("loc", ())),
        "msg": str(error.get("msg", "")),
        "type": str(error.get("type", "")),
    }
    ctx = error.get("ctx")
    if isinstance(ctx, dict):
        out["ctx"] = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in ctx.items()}
    return out


async def validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _response(*validation_answer(exc.errors()))


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        detail: Any = f"Path {request.url.path} not found"
    elif exc.status_code == 405:
        detail = f"Method {request.method} not allowed on {request.url.path}"
    else:
        detail = exc.detail
    return _response(exc.status_code, {"detail": detail}, dict(exc.headers or {}))


async def os_error(request: Request, exc: Exception) -> JSONResponse:
    """A write to the data dir that failed (full disk, read-only): 507/503, not a bare 500."""
    mapped = storage_error(exc)
    if mapped is None:
        return await unhandled_error(request, exc)
    logger.error("storage fault on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
    return await livegen_error(request, mapped)


async def unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _response(*INTERNAL_ERROR)


def install(app: FastAPI) -> None:
    app.add_exception_handler(LivegenError, livegen_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(OSError, os_error)
    app.add_exception_handler(Exception, unhandled_error)
