"""A reverse proxy that serves a livegen server under a path prefix, as nginx's
``location /livegen/ { proxy_pass http://127.0.0.1:8000/; }`` does: HTTP and WebSockets, the
prefix stripped on the way in. For tests of pages that must work behind one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from livegen.bench import free_port
from livegen.bench.null_engine import uvicorn_in_thread

HOP_BY_HOP = {"connection", "content-length", "transfer-encoding", "content-encoding", "keep-alive"}


def prefix_app(upstream: str, prefix: str) -> Starlette:
    client = httpx.AsyncClient(base_url=upstream, timeout=120)

    async def http(request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items() if k not in ("host", "content-length")]
        answer = await client.request(
            request.method,
            "/" + request.path_params["path"],
            params=request.query_params.multi_items(),
            headers=headers,
            content=await request.body(),
        )
        kept = [(k, v) for k, v in answer.headers.multi_items() if k.lower() not in HOP_BY_HOP]
        response = Response(answer.content, status_code=answer.status_code)
        response.raw_headers = [*response.raw_headers, *[(k.encode(), v.encode()) for k, v in kept]]
        return response

    async def websocket(ws: WebSocket) -> None:
        url = upstream.replace("http", "ws", 1) + "/" + ws.path_params["path"]
        if ws.url.query:
            url += "?" + ws.url.query
        # The browser's Origin is the proxy's; livegen compares it with the Host it sees, which
        # this proxy does not forward (nginx would, with proxy_set_header Host $host): leave it out.
        # Credentials (fal-client's use_jwt=False) go along.
        forwarded = {k: v for k, v in ws.headers.items() if k in ("authorization", "user-agent")}
        try:
            upstream_ws = await connect(url, max_size=None, compression=None, additional_headers=forwarded)
        except InvalidStatus as refused:  # livegen's refusal, passed on as it is
            answer = refused.response
            headers = {"content-type": answer.headers.get("content-type", "application/json")}
            await ws.send_denial_response(Response(answer.body, status_code=answer.status_code, headers=headers))
            return
        async with upstream_ws:
            await ws.accept()

            async def down() -> None:
                async for message in upstream_ws:
                    if isinstance(message, bytes):
                        await ws.send_bytes(message)
                    else:
                        await ws.send_text(message)
                with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # unless the browser left first
                    await ws.close(upstream_ws.close_code or 1000, upstream_ws.close_reason or "")

            async def up() -> None:
                with contextlib.suppress(WebSocketDisconnect):
                    while True:
                        message = await ws.receive()
                        if message["type"] == "websocket.disconnect":
                            break
                        await upstream_ws.send(message.get("bytes") or message.get("text") or b"")
                await upstream_ws.close()

            tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
            _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with client:
            yield

    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS"]
    routes = [Route(prefix + "/{path:path}", http, methods=methods), WebSocketRoute(prefix + "/{path:path}", websocket)]
    return Starlette(routes=routes, lifespan=lifespan)


@contextlib.contextmanager
def prefix_proxy(upstream: str, prefix: str, port: int | None = None) -> Iterator[str]:
    """Run the proxy on a loopback port; yields its base URL, the prefix included."""
    with uvicorn_in_thread(prefix_app(upstream, prefix), port or free_port()) as url:
        yield url + prefix
