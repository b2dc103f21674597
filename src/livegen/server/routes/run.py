"""Sync run: ``POST /{endpoint_id}`` for every endpoint, typed by the endpoint's fal schema.

Routes are registered one per endpoint so ``/openapi.json`` documents each input model.
"""

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from livegen.protocol.apps import ENDPOINTS, Endpoint
from livegen.protocol.schemas import Output
from livegen.server import deps

SSE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Server-sent events", "content": {"text/event-stream": {}}}
}


def _handler(endpoint: Endpoint) -> Any:
    input_model = endpoint.input_model

    async def run(
        request: Request,
        body: input_model,  # type: ignore[valid-type]
        service: deps.GenerationDep,
        base_url: deps.BaseUrlDep,
        file_ttl_s: deps.FileTtlDep,
    ) -> dict[str, Any]:
        assert isinstance(body, BaseModel)
        return await service.run(endpoint, body, base_url=base_url, file_ttl_s=file_ttl_s)

    run.__name__ = "run_" + endpoint.slug
    return run


def _query_value(values: list[str]) -> Any:
    """One query parameter's value. ``URLSearchParams`` flattens everything to strings: numbers and
    booleans are left to pydantic's lax parsing, a JSON object or array is parsed, a repeated key is a list."""
    parsed: list[Any] = []
    for value in values:
        if value[:1] in ("{", "["):
            try:
                parsed.append(json.loads(value))
                continue
            except ValueError:
                pass
        parsed.append(value)
    return parsed[0] if len(parsed) == 1 else parsed


def _get_handler(endpoint: Endpoint) -> Any:
    input_model = endpoint.input_model

    async def run_get(
        request: Request,
        service: deps.GenerationDep,
        base_url: deps.BaseUrlDep,
        file_ttl_s: deps.FileTtlDep,
    ) -> dict[str, Any]:
        """The same run with the input in the query string: what ``fal.run(id, {method: "get"})`` sends."""
        raw = {key: _query_value(request.query_params.getlist(key)) for key in request.query_params.keys()}
        try:
            body = input_model.model_validate(raw)
        except ValidationError as exc:
            errors = [{**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_url=False, include_input=False)]
            raise RequestValidationError(errors) from None
        return await service.run(endpoint, body, base_url=base_url, file_ttl_s=file_ttl_s)

    run_get.__name__ = "run_get_" + endpoint.slug
    return run_get


def _stream_caller(endpoint: Endpoint) -> Any:
    def stream_caller(
        request: Request,
        fal_jwt_token: Annotated[
            str | None,
            Query(description="A token from POST /rest/tokens/ for this app, instead of 'Authorization: Key'"),
        ] = None,
    ) -> str:
        """An API key, or a realtime token for this endpoint's app in ``?fal_jwt_token=``: what
        ``fal.stream(id, {connectionMode: "client"})`` sends (a browser with a token and no key);
        then the key's rate limit."""
        state = request.app.state
        key_id, _ = deps.key_or_token(state, fal_jwt_token, request.headers.get("authorization"), app=endpoint.alias)
        state.rate_limiter.check(key_id)
        return key_id

    return stream_caller


def _stream_handler(endpoint: Endpoint) -> Any:
    input_model = endpoint.input_model

    async def stream(
        body: input_model,  # type: ignore[valid-type]
        service: deps.GenerationDep,
        base_url: deps.BaseUrlDep,
        file_ttl_s: deps.FileTtlDep,
    ) -> StreamingResponse:
        """Server-sent events: one ``data:`` event holding the output (these models produce
        their images all at once). Errors before generation ends are plain fal error responses."""
        assert isinstance(body, BaseModel)
        output = await service.run(endpoint, body, base_url=base_url, file_ttl_s=file_ttl_s)

        async def events() -> AsyncIterator[str]:
            yield f"data: {json.dumps(output)}\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    stream.__name__ = "stream_" + endpoint.slug
    return stream


def router() -> APIRouter:
    r = APIRouter()
    keyed = [Depends(deps.rate_limited_key)]
    for endpoint in ENDPOINTS:
        r.add_api_route(
            f"/{endpoint.endpoint_id}",
            _handler(endpoint),
            methods=["POST"],
            response_model=Output,
            response_model_exclude_none=True,
            summary=endpoint.summary,
            tags=[endpoint.app_id],
            dependencies=keyed,
        )
        r.add_api_route(
            f"/{endpoint.endpoint_id}",
            _get_handler(endpoint),
            methods=["GET"],
            response_model=Output,
            response_model_exclude_none=True,
            summary=f"{endpoint.summary} (input in the query string)",
            tags=[endpoint.app_id],
            dependencies=keyed,
        )
        r.add_api_route(
            f"/{endpoint.endpoint_id}/stream",
            _stream_handler(endpoint),
            methods=["POST"],
            response_class=StreamingResponse,
            responses=SSE_RESPONSES,
            summary=f"{endpoint.summary} (server-sent events)",
            tags=[endpoint.app_id],
            dependencies=[Depends(_stream_caller(endpoint))],
        )
    return r
