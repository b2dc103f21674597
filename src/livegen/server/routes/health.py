"""``/healthz`` (the process answers), ``/readyz`` (models loaded, ready for work) and
``/metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


# HEAD too: some load balancers and uptime monitors probe with it. Two routes, not one with both
# methods, which would give both the same OpenAPI operationId.
@router.get("/healthz")
@router.head("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
@router.head("/readyz")
async def readyz(request: Request) -> JSONResponse:
    engine = request.app.state.engine
    body: dict[str, Any] = {"status": "ready" if engine.ready else "loading", **engine.status()}
    if request.app.state.draining:
        body["status"] = "draining"
    fatal = getattr(request.app.state, "fatal_error", None)
    if fatal:
        body["status"] = "failed"
        body["error"] = fatal
    return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {}}}}},
)
async def metrics(request: Request) -> Response:
    # In a worker thread: the collectors read SQLite (queue depth, stored files).
    body = await anyio.to_thread.run_sync(generate_latest, request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
