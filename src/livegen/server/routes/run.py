"""Sync run: ``POST /{endpoint_id}`` for every endpoint, typed by the endpoint's fal schema.

Routes are registered one per endpoint so ``/openapi.json`` documents each input model.
"""

from typing import Any

from fastapi import APIRouter, Depends, Request
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

    run.__name__ = "run_" + endpoint.endpoint_id.replace("/", "_").replace("-", "_")
    return run


def router() -> APIRouter:
    r = APIRouter(dependencies=[Depends(deps.require_key)])
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
    return r
