"""``/healthz`` (the process answers) and ``/readyz`` (models loaded, ready for work)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    engine = request.app.state.engine
    body: dict[str, Any] = {"status": "ready" if engine.ready else "loading", **engine.status()}
    fatal = getattr(request.app.state, "fatal_error", None)
    if fatal:
        body["status"] = "failed"
        body["error"] = fatal
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)
