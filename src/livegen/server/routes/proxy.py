"""``/api/fal/proxy``: the ``@fal-ai/server-proxy`` protocol, answered by livegen's own routes.

The JS client configured with ``proxyUrl`` sends every request here, with its method and body,
and the URL it would have called in ``x-fal-target-url``. That URL is mapped onto livegen's
layout (``fal.run/X`` → ``/X``, ``queue.fal.run/X`` → ``/queue/X``, ``rest.fal.ai/X`` →
``/rest/X``, query kept) and the request goes on *as that request*: this is an ASGI middleware
that rewrites the scope's path, query and headers, so routing, auth, error handlers, request
ids and streamed bodies (SSE) are exactly those of a direct call. Nothing is forwarded to the
network; other hosts are refused with 400.

Only ``authorization``, ``content-type``, ``accept`` and ``x-fal-*`` (plus the headers that
frame the request) reach the target route. livegen holds no key of its own to inject, so a
caller without ``Authorization`` gets the target route's 401.
"""

from __future__ import annotations

import logging
from typing import Final
from urllib.parse import quote, unquote, urlsplit

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from livegen.protocol.errors import BadRequest, LivegenError
from livegen.server import errors

logger = logging.getLogger(__name__)

PROXY_PATH: Final = "/api/fal/proxy"
TARGET_URL_HEADER: Final = "x-fal-target-url"
METHODS: Final = ("GET", "POST", "PUT")
HOST_PREFIXES: Final = {"fal.run": "", "queue.fal.run": "/queue", "rest.fal.ai": "/rest"}

# Headers the target route sees besides x-fal-*: the ones the protocol names, and the ones
# that describe the request itself (origin for absolute URLs in responses, body framing).
_FORWARDED: Final = frozenset(
    {b"authorization", b"content-type", b"accept", b"host", b"content-length", b"transfer-encoding", b"user-agent"}
)
# RFC 3986 characters that may stay as they are in a path or query; everything else is escaped.
_PATH_SAFE: Final = "/%:@!$&'()*+,;=-._~"
_QUERY_SAFE: Final = _PATH_SAFE + "?"


def target_path(target_url: str) -> tuple[str, str]:
    """livegen's (percent-encoded path, query) for a URL on one of fal's hosts.

    >>> target_path("https://queue.fal.run/fal-ai/x/requests/1/status?logs=1")
    ('/queue/fal-ai/x/requests/1/status', 'logs=1')
    """
    try:
        parts = urlsplit(target_url.strip())
        host = parts.hostname
    except ValueError as exc:
        raise BadRequest(f"{TARGET_URL_HEADER} is not a URL") from exc
    if parts.scheme not in ("http", "https") or host not in HOST_PREFIXES:
        raise BadRequest(
            f"{TARGET_URL_HEADER} must be a URL on {', '.join(HOST_PREFIXES)}: livegen serves "
            f"those itself and forwards nothing to other hosts (got {host or target_url[:100]!r})"
        )
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    return HOST_PREFIXES[host] + path, quote(parts.query, safe=_QUERY_SAFE)


def _route_path(scope: Scope) -> str:
    # The path below the app's root_path (uvicorn --root-path), as Starlette's router sees it.
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root + "/") else path


def _proxied_scope(scope: Scope) -> Scope:
    if scope["method"] not in METHODS:
        raise HTTPException(405, headers={"Allow": ", ".join(METHODS)})
    targets = [v for k, v in scope["headers"] if k.lower() == TARGET_URL_HEADER.encode()]
    if len(targets) != 1:
        raise BadRequest(f"send the URL to call in exactly one {TARGET_URL_HEADER} header")
    path, query = target_path(targets[0].decode("latin-1"))
    root: str = scope.get("root_path", "")
    headers = [
        (k, v)
        for k, v in scope["headers"]
        if k.lower() in _FORWARDED or (k.lower().startswith(b"x-fal-") and k.lower() != TARGET_URL_HEADER.encode())
    ]
    logger.debug("proxy %s %s", scope["method"], path)  # no query: it may hold fal_jwt_token
    return {
        **scope,
        "path": root + unquote(path),
        "raw_path": (quote(root) + path).encode("ascii"),
        "query_string": query.encode("ascii"),
        "headers": headers,
    }


class FalProxyMiddleware:
    """Serves ``GET/POST/PUT {BASE}/api/fal/proxy`` by re-dispatching to the wrapped app.

    Install it inside ``RequestIdMiddleware`` so a proxied call carries one request id.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _route_path(scope) != PROXY_PATH:
            await self.app(scope, receive, send)
            return
        try:
            proxied = _proxied_scope(scope)
        except (LivegenError, HTTPException) as exc:
            response = await _render(Request(scope), exc)
            await response(scope, receive, send)
            return
        await self.app(proxied, receive, send)


async def _render(request: Request, exc: LivegenError | HTTPException) -> Response:
    # The app's own handlers, called directly: this middleware sits outside the router's
    # exception handling, but the wire shape must be the same.
    if isinstance(exc, LivegenError):
        return await errors.livegen_error(request, exc)
    return await errors.http_error(request, exc)
