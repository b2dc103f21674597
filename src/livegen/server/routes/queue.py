"""``{BASE}/queue/...`` (fal's queue.fal.run): submit, status, status stream, result, cancel.

Submit takes the full endpoint id (with any subpath); the other routes take ``owner/alias``.
"""

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from livegen.protocol.apps import ENDPOINTS, Endpoint
from livegen.protocol.errors import InvalidInput, NotFound
from livegen.server import deps
from livegen.server.jobs.service import JobService, urls
from livegen.server.jobs.store import Job
from livegen.server.urlfetch import check_target

KEEPALIVE_S = 15.0


class CancelStatus(BaseModel):
    """fal's cancel answer (PROTOCOL.md §6.5): 202 CANCELLATION_REQUESTED, 400 ALREADY_COMPLETED,
    404 NOT_FOUND."""

    status: str


CANCEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": CancelStatus, "description": what}
    for code, what in ((202, "Cancellation requested"), (400, "Already completed"), (404, "No such request"))
}


async def logs_flag(logs: Annotated[str | None, Query()] = None) -> bool:
    """``?logs=``: Python sends true/false, JS 1/0."""
    return (logs or "").strip().lower() in ("1", "true", "yes")


LogsFlag = Annotated[bool, Depends(logs_flag)]


def job_for_request(owner: str, alias: str, request_id: str, jobs: deps.JobsDep, key_id: deps.KeyDep) -> Job:
    return jobs.get(f"{owner}/{alias}", request_id, key_id=key_id)


JobDep = Annotated[Job, Depends(job_for_request)]


def _parse_timeout(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise InvalidInput(f"X-Fal-Request-Timeout must be a positive number of seconds, got {value!r}",
                           loc=("header", "x-fal-request-timeout"))  # fmt: skip
    return seconds


def _submit_handler(endpoint: Endpoint) -> Any:
    input_model = endpoint.input_model

    async def submit(
        body: input_model,  # type: ignore[valid-type]
        key_id: deps.RateLimitedKeyDep,
        jobs: deps.JobsDep,
        settings: deps.SettingsDep,
        base_url: deps.BaseUrlDep,
        file_ttl_s: deps.FileTtlDep,
        fal_webhook: Annotated[str | None, Query()] = None,
        x_fal_queue_priority: Annotated[str | None, Header()] = None,
        x_fal_request_timeout: Annotated[str | None, Header()] = None,
    ) -> JSONResponse:
        assert isinstance(body, BaseModel)
        if fal_webhook:
            where = ("query", "fal_webhook")  # a query parameter, not a body field
            await check_target(fal_webhook, allow_private=settings.allow_private_urls, field="fal_webhook", loc=where)
        job = jobs.submit(
            endpoint,
            body,
            key_id=key_id,
            base_url=base_url,
            priority=x_fal_queue_priority,
            start_timeout=_parse_timeout(x_fal_request_timeout),
            webhook_url=fal_webhook,
            file_ttl_s=file_ttl_s,
        )
        content = {
            "status": "IN_QUEUE",
            "request_id": job.request_id,
            "gateway_request_id": job.request_id,
            "queue_position": jobs.status(job, base_url=base_url, with_logs=False).get("queue_position", 0),
            **urls(base_url, job),
        }
        return JSONResponse(content, headers={"x-fal-request-id": job.request_id})

    submit.__name__ = "submit_" + endpoint.slug
    return submit


def router() -> APIRouter:
    r = APIRouter(prefix="/queue", tags=["queue"], dependencies=[Depends(deps.require_key)])
    for endpoint in ENDPOINTS:
        r.add_api_route(
            f"/{endpoint.endpoint_id}",
            _submit_handler(endpoint),
            methods=["POST"],
            summary=f"Queue: {endpoint.summary}",
        )
    r.add_api_route("/{owner}/{alias}/requests/{request_id}/status", status, methods=["GET"])
    r.add_api_route(
        "/{owner}/{alias}/requests/{request_id}/status/stream",
        status_stream,
        methods=["GET"],
        response_class=StreamingResponse,
        responses={200: {"description": "Server-sent events", "content": {"text/event-stream": {}}}},
    )
    r.add_api_route("/{owner}/{alias}/requests/{request_id}", result, methods=["GET"])
    r.add_api_route(
        "/{owner}/{alias}/requests/{request_id}/cancel",
        cancel,
        methods=["PUT"],
        status_code=202,
        responses=CANCEL_RESPONSES,
    )
    return r


async def status(job: JobDep, jobs: deps.JobsDep, base_url: deps.BaseUrlDep, logs: LogsFlag) -> JSONResponse:
    body = jobs.status(job, base_url=base_url, with_logs=logs)
    return JSONResponse(body, status_code=200 if job.state.terminal else 202)


async def status_stream(
    request: Request, job: JobDep, jobs: deps.JobsDep, base_url: deps.BaseUrlDep, logs: LogsFlag
) -> StreamingResponse:
    async def events() -> AsyncIterator[str]:
        last: dict[str, Any] | None = None
        current = job
        while True:
            body = jobs.status(current, base_url=base_url, with_logs=logs)
            if body != last:
                yield f"data: {json.dumps(body)}\n\n"
                last = body
            if current.state.terminal or await request.is_disconnected():
                return
            if not await jobs.wait_for_change(KEEPALIVE_S):
                yield ": keep-alive\n\n"
            current = jobs.get(job.app_id, job.request_id)

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def result(job: JobDep, jobs: deps.JobsDep) -> JSONResponse:
    code, body, headers = jobs.result(job)
    return JSONResponse(body, status_code=code, headers=headers)


async def cancel(owner: str, alias: str, request_id: str, jobs: deps.JobsDep, key_id: deps.KeyDep) -> JSONResponse:
    try:
        job = jobs.get(f"{owner}/{alias}", request_id, key_id=key_id)
    except NotFound:
        return JSONResponse({"status": "NOT_FOUND"}, status_code=404)
    code, body = jobs.cancel(job)
    return JSONResponse(body, status_code=code)


__all__ = ["JobService", "router"]
