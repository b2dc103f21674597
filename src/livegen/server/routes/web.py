"""The browser playground: ``GET /`` and ``GET /static/{name}``, served from the package.

The files live in ``livegen/web/`` (package data, no build step) and are read once through
``importlib.resources``. Only the names in ``STATIC`` are reachable, so nothing else in the
package can be fetched by a crafted path. Every answer carries ``nosniff``, ``no-referrer`` and
a Content-Security-Policy: scripts, styles and fetches from this origin only, images also from
``data:``/``blob:`` (results), and WebSockets only to this host.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from livegen.protocol.errors import NotFound

router = APIRouter(include_in_schema=False)

STATIC = {
    "app.js": "text/javascript; charset=utf-8",
    "realtime.js": "text/javascript; charset=utf-8",
    "msgpack.js": "text/javascript; charset=utf-8",
    "sources.js": "text/javascript; charset=utf-8",
    "ui.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


@functools.cache
def _read(name: str) -> bytes:
    return (resources.files("livegen") / "web" / name).read_bytes()


def content_security_policy(host: str | None) -> str:
    """'self' covers ws:/wss: to the same host only in CSP level 3 browsers; naming the host
    keeps older ones working without allowing WebSockets to anywhere else."""
    sockets = f" ws://{host} wss://{host}" if host and _HOST.match(host) else ""
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        f"media-src 'self' blob: mediastream:; connect-src 'self'{sockets}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _headers(request: Request) -> dict[str, str]:
    return {
        "Content-Security-Policy": content_security_policy(request.headers.get("host")),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


@router.api_route("/", methods=["GET", "HEAD"])
async def index(request: Request) -> Response:
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=_headers(request))


@router.api_route("/static/{name}", methods=["GET", "HEAD"])
async def static(name: str, request: Request) -> Response:
    content_type = STATIC.get(name)
    if content_type is None:
        raise NotFound(f"no static file {name!r}")
    return Response(_read(name), media_type=content_type, headers=_headers(request))
