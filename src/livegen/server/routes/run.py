"""Sync run: ``POST /{endpoint_id}`` for every endpoint, typed by the endpoint's fal schema.

Routes are registered one per endpoint so ``/openapi.json`` documents each input model.
"""

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from livegen.protocol.apps import ENDPOINTS, Endpoint
from livegen.protocol.schemas import Output
from livegen.server import deps


def _handler(endpoint: Endpoint) -> Any:
    input_model = endpoint.input_model

    async def run(
        request: Request,
        body: input_model,  # type: ignore[valid-type]
        service: deps.GenerationDep,
        base_url: deps.BaseUrlDep,
    ) -> dict[str, Any]:
        assert isinstance(body, BaseModel)
        return await service.run(endpoint, body, base_url=base_url)

    run.__name__ = "run_" + endpoint.slug
    return run


def _stream_handler(endpoint: Endpoint) -> Any:
    input_model = endpoint.input_model

    async def stream(
        body: input_model,  # type: ignore[valid-type]
        service: deps.GenerationDep,
        base_url: deps.BaseUrlDep,
    ) -> StreamingResponse:
        """Server-sent events: one ``data:`` event holding the output (these models produce
        their images all at once). Errors before generation ends are plain fal error responses."""
        assert isinstance(body, BaseModel)
        output = await service.run(endpoint, body, base_url=base_url)

        async def events() -> AsyncIterator[str]:
            yield f"data: {json.dumps(output)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    stream.__name__ = "stream_" + endpoint.slug
    return stream


def router() -> APIRouter:
    r = APIRouter(dependencies=[Depends(deps.rate_limited_key)])
    for endpoint in ENDPOINTS:
        r.add_api_route(
            f"/{endpoint.endpoint_id}",
            _handler(endpoint),
            methods=["POST"],
            response_model=Output,
            response_model_exclude_none=True,
            summary=endpoint.summary,
            tags=[endpoint.app_id],
        )
        r.add_api_route(
            f"/{endpoint.endpoint_id}/stream",
            _stream_handler(endpoint),
            methods=["POST"],
            summary=f"{endpoint.summary} (server-sent events)",
            tags=[endpoint.app_id],
        )
    return r
