"""Session 19's two CPU measurements, as run for the closing note.

1. What the CORS middleware adds to an HTTP request: direct ASGI calls around a trivial app,
   without an Origin header, with an allowed one and with another one (200,000 calls each).
2. File expiry at 200,000 stored files: opening the store (migration check, capping, index),
   one sweep (``expire``) and the ``/metrics`` figures (``usage``).

    python benchmarks/2026-11-27-session19/middleware_and_files.py
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from livegen.server.db import Database
from livegen.server.middleware import CorsMiddleware
from livegen.server.storage import FileStore

CALLS = 200_000
ROWS = 200_000


async def app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b""}


async def ignore(message: Any) -> None:
    pass


def scope(origin: bytes | None) -> dict[str, Any]:
    headers = [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"x"), (b"authorization", b"Key abc"),
               (b"content-type", b"application/json"), (b"accept", b"*/*"), (b"content-length", b"100")]  # fmt: skip
    if origin:
        headers.append((b"origin", origin))
    return {"type": "http", "method": "POST", "path": "/fal-ai/x", "headers": headers}


async def per_call_us(target: Any, sc: dict[str, Any]) -> float:
    start = time.perf_counter()
    for _ in range(CALLS):
        await target(sc, receive, ignore)
    return (time.perf_counter() - start) / CALLS * 1e6


async def middleware() -> None:
    cors = CorsMiddleware(app, ["http://app.example:5173"])
    for run in (1, 2):
        bare = await per_call_us(app, scope(None))
        none = await per_call_us(cors, scope(None))
        allowed = await per_call_us(cors, scope(b"http://app.example:5173"))
        other = await per_call_us(cors, scope(b"http://evil.example"))
        print(f"run {run}: bare app {bare:.2f} us; CORS, no Origin {none:.2f}, allowed {allowed:.2f}, "
              f"other {other:.2f}")  # fmt: skip


def files() -> None:
    root = Path(tempfile.mkdtemp(prefix="livegen-files-"))
    with Database.open(root / "db.sqlite") as db:
        FileStore(db, root / "files")
        now = time.time()
        rows = [(secrets.token_hex(16), now - i, now - i + 7 * 86400) for i in range(ROWS)]
        with db.transaction() as conn:
            conn.executemany("INSERT INTO files VALUES (?, 'image/jpeg', 1000, 'x.jpeg', ?, ?)", rows)
    for run in (1, 2):
        with Database.open(root / "db.sqlite") as db:
            t = time.perf_counter()
            store = FileStore(db, root / "files")
            opened = time.perf_counter() - t
            t = time.perf_counter()
            store.expire()
            swept = time.perf_counter() - t
            t = time.perf_counter()
            store.usage()
            usage = time.perf_counter() - t
        print(f"run {run}, {ROWS} rows: open {opened * 1e3:.1f} ms, expire {swept * 1e3:.2f} ms, "
              f"usage {usage * 1e3:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(middleware())
    files()
