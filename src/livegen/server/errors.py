"""One place that turns exceptions into fal's error responses (see ``protocol/errors.py``)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from livegen.protocol.errors import LivegenError, error_body

logger = logging.getLogger(__name__)


def _response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


async def livegen_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LivegenError)
    if exc.http_status >= 500 and type(exc) is LivegenError:
        logger.error("request failed: %s", exc.message)
    headers = {"X-Fal-Error-Type": exc.error_type, **exc.headers()}
    return _response(exc.http_status, error_body(exc), headers)


def _clean(error: dict[str, Any]) -> dict[str, Any]:
    # Never echo the input back: it may be a data URL of many megabytes, or a secret.
    out = {
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
    detail = [_clean(e) for e in exc.errors()]
    return _response(422, {"detail": detail}, {"X-Fal-Error-Type": "validation_error"})


async def http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        detail: Any = f"Path {request.url.path} not found"
    elif exc.status_code == 405:
        detail = f"Method {request.method} not allowed on {request.url.path}"
    else:
        detail = exc.detail
    return _response(exc.status_code, {"detail": detail}, dict(exc.headers or {}))


async def unhandled_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _response(500, {"detail": "Internal Server Error"})


def install(app: FastAPI) -> None:
    app.add_exception_handler(LivegenError, livegen_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unhandled_error)
