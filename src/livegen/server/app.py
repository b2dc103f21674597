"""The ASGI application: routers, error handlers and the lifespan that opens the services.

    app = create_app(Settings(weights="tiny-random"))
    uvicorn.run(app)

The lifespan opens the database, the key and file stores, and the engine worker, and closes
them in reverse. Models load in the background while the server already answers: ``/readyz``
is 503 until they are loaded. If a model named in ``--models`` cannot be loaded, the error is
logged with the model's name and the alternatives, and ``on_fatal`` is called (``livegen
serve`` then exits non-zero).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from livegen import __version__
from livegen.engine import Engine, freeze_heap
from livegen.server import errors
from livegen.server.auth import KeyStore
from livegen.server.db import Database
from livegen.server.generation import GenerationService
from livegen.server.jobs.service import JobService
from livegen.server.jobs.store import Job, SqliteJobStore
from livegen.server.jobs.webhooks import WebhookSender, WebhookSigner
from livegen.server.metrics import Metrics, MetricsMiddleware
from livegen.server.middleware import BodyLimitMiddleware, CorsMiddleware, DrainCutMiddleware, RequestIdMiddleware
from livegen.server.ratelimit import RateLimiter
from livegen.server.routes import files, health, proxy, queue, realtime, rest, run, uploads, web, ws
from livegen.server.storage import FileStore
from livegen.server.tokens import TokenSigner, load_secret
from livegen.server.uploads import UploadService
from livegen.settings import Settings

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    on_fatal: Callable[[str], None] | None = None,
) -> FastAPI:
    """Build the app. ``engine`` replaces the torch worker (tests pass fakes)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            db = stack.enter_context(Database.open(settings.db_path))
            app.state.keys = KeyStore(db, settings.api_keys)
            app.state.files = FileStore(db, settings.files_dir, ttl_s=settings.files_ttl_s)
            app.state.uploads = await stack.enter_async_context(UploadService(db, app.state.files, settings))
            app.state.tokens = TokenSigner(load_secret(settings.secret_path))
            eng = engine if engine is not None else stack.enter_context(_start_worker(settings))
            app.state.engine = eng
            app.state.generation = GenerationService(settings, eng, app.state.files)
            app.state.fatal_error = None
            await _open_jobs(app, settings, db, stack)
            watcher = asyncio.create_task(_watch_startup(app, eng, on_fatal))
            stack.callback(watcher.cancel)
            yield

    app = FastAPI(
        title="livegen",
        version=__version__,
        description="Real-time image generation speaking fal.ai's model API protocol",
        lifespan=lifespan,
        responses=errors.RESPONSES,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.rate_limiter = RateLimiter(settings.rate_limit_per_key, settings.rate_limit_burst)
    app.state.draining = False
    errors.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    app.add_middleware(proxy.FalProxyMiddleware)  # /api/fal/proxy; inside RequestIdMiddleware
    app.add_middleware(DrainCutMiddleware, state=app.state)  # 503, not 500, when the drain timeout cuts
    app.add_middleware(RequestIdMiddleware)
    app.add_middleware(CorsMiddleware, allowed_origins=settings.allowed_origins)  # outermost: every answer
    app.include_router(health.router)
    app.include_router(web.router)
    app.include_router(files.router)
    app.include_router(uploads.router)
    app.include_router(rest.router)
    app.include_router(queue.router())
    app.include_router(run.router())
    realtime.install(app, settings)
    ws.install(app)
    return app


async def _open_jobs(app: FastAPI, settings: Settings, db: Database, stack: AsyncExitStack) -> None:
    store = SqliteJobStore(db)
    signer = WebhookSigner.load(settings.webhook_key_path)
    sender = WebhookSender(
        store,
        signer,
        allow_private=settings.allow_private_urls,
        max_attempts=settings.webhook_max_attempts,
        backoff_base_s=settings.webhook_backoff_base_s,
        timeout_s=settings.webhook_timeout_s,
        on_attempt=lambda ok: app.state.metrics.webhooks.labels("delivered" if ok else "failed").inc(),
    )
    metrics: Metrics = app.state.metrics

    def on_terminal(job: Job) -> None:
        metrics.jobs.labels(job.state.value).inc()
        sender.wake()

    jobs = JobService(settings, store, app.state.generation, on_terminal=on_terminal)
    metrics.watch(app.state.engine.status, store.counts)
    metrics.watch_files(app.state.files.usage)
    app.state.webhook_signer = signer
    app.state.jobs = jobs
    sender.start()
    stack.push_async_callback(sender.stop)
    await jobs.start()
    stack.push_async_callback(jobs.stop)


def connection_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's connection options for this app.

    WebSocket frames are size-checked by the realtime session (a clear error frame) and HTTP
    over WebSocket (a 413 answer, at ``max_request_bytes`` as on HTTP); uvicorn's cap is a
    backstop above both; permessage-deflate as ``ws_compression`` says. Idle HTTP keep-alive connections stay
    open ``keep_alive_timeout_s``: longer than the pools of the clients in front of us (httpx,
    which fal-client uses, expires idle connections after 5 s; nginx upstreams after 60 s), so the
    client always closes first. With uvicorn's own 5 s both sides close together, and a request
    sent on a connection the server has just closed fails with a connection reset."""
    return {
        "ws": "websockets-sansio",
        "ws_max_size": max(2 * settings.max_ws_message_bytes, settings.max_request_bytes),
        "ws_per_message_deflate": settings.ws_compression,
        "timeout_keep_alive": settings.keep_alive_timeout_s,
    }


def _start_worker(settings: Settings) -> Any:
    from livegen.engine.worker import Worker  # torch is imported here, not at import time

    return Worker.start(settings)


async def _watch_startup(app: FastAPI, engine: Engine, on_fatal: Callable[[str], None] | None) -> None:
    startup = getattr(engine, "startup", None)
    if startup is None:  # an engine that is ready at once (the bench's NullEngine): freeze here
        if app.state.settings.gc_freeze:
            freeze_heap("start-up")
        return
    try:
        await asyncio.wrap_future(startup)
    except Exception as exc:  # noqa: BLE001 - reported, then the server stops
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        app.state.fatal_error = message
        logger.critical("start-up failed: %s", message)
        if on_fatal is not None:
            on_fatal(message)
        return
    status = engine.status()
    logger.info(
        "ready: %s; safety checker: %s",
        ", ".join(m for m, s in status["models"].items() if s == "loaded") or "no models preloaded",
        status.get("safety_checker", "unknown"),
    )
