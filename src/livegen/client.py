"""Point the official clients at a livegen server.

    from livegen.client import point_fal_client
    point_fal_client("http://127.0.0.1:8000")
    import fal_client
    fal_client.run("fal-ai/fast-turbo-diffusion", {"prompt": "a red fox"})

This module imports neither torch nor the server.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def point_fal_client(base_url: str) -> None:
    """Redirect the official ``fal_client`` (written against 1.0.3) to a livegen server.

    Call once, before the first request or upload; works for ``http://`` and ``https://``
    and for base URLs with a path prefix. The API key is still taken from ``FAL_KEY`` (or
    passed to ``SyncClient``/``AsyncClient``). It rebinds the module constants that fal_client
    formats its URLs from, at call time, for run, queue, realtime, tokens, storage and CDN.
    """
    import fal_client.client as fcc

    base = base_url.rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
    ws_base = ("wss" if parts.scheme == "https" else "ws") + "://" + parts.netloc + parts.path
    fcc.RUN_URL_FORMAT = base + "/"
    fcc.QUEUE_URL_FORMAT = base + "/queue/"
    fcc.REALTIME_URL_FORMAT = ws_base + "/"
    fcc.REST_URL = base + "/rest"  # tokens + storage; copied by CDNTokenManager on first upload
    fcc.CDN_URL = base + "/cdn"
