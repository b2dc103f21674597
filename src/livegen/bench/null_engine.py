"""``livegen bench realtime --null-engine``: the server's own cost per frame, without generation.

The server runs in this process (a uvicorn thread, loopback) with an engine that answers every
request at once with a ready-made JPEG of the requested size. Everything else is the real
server: token check, msgpack, the frame's validation, the input image's decode (image-to-image),
the result's packing and the WebSocket. What the bench then measures is the floor that
generation adds to: on a GPU, frame latency ≈ this + the engine's time.
"""

from __future__ import annotations

import functools
import io
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from livegen.engine import EncodedImage, GenerationRequest, GenerationResult

if TYPE_CHECKING:
    from livegen.settings import Settings


@functools.lru_cache(maxsize=16)
def flat_jpeg(width: int, height: int) -> bytes:
    """A flat ``width`` x ``height`` JPEG (q90), made once per size."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (96, 128, 160)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


class NullEngine:
    """An engine that renders nothing: a flat JPEG per (width, height), made once."""

    ready = True
    input_decoder = None  # the server decodes inputs with Pillow, as on a CPU

    def __init__(self) -> None:
        self.requests = 0

    def check(self, request: GenerationRequest) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {
            "device": "none (null engine)",
            "models": {},
            "requests": self.requests,
            "input_decode": {"decoder": "pillow"},
        }

    def replace(self, future: Future[GenerationResult], request: GenerationRequest) -> Future[GenerationResult] | None:
        return None  # every request is answered as it is submitted: none ever waits

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        started = time.perf_counter()
        self.requests += 1
        image = EncodedImage(
            data=flat_jpeg(request.width, request.height),
            width=request.width,
            height=request.height,
            content_type="image/jpeg",
        )
        future: Future[GenerationResult] = Future()
        future.set_result(
            GenerationResult(
                images=[image] * request.num_images,
                seed=request.seed,
                has_nsfw_concepts=[False] * request.num_images,
                timings={"inference": time.perf_counter() - started},
                batch_size=1,
            )
        )
        return future


@contextmanager
def null_server(data_dir: Path, key: str) -> Iterator[str]:
    """The real app with a ``NullEngine``, on a free loopback port in a thread; yields its URL."""
    from livegen.settings import Settings

    with serve_in_thread(Settings(data_dir=data_dir, api_keys=key, models=[]), NullEngine()) as url:  # type: ignore[arg-type]
        yield url


@contextmanager
def serve_in_thread(settings: Settings, engine: Any) -> Iterator[str]:
    """The real app over ``engine``, on a free loopback port in a thread; yields its URL."""
    from livegen.bench import free_port
    from livegen.server.app import connection_options, create_app

    port = free_port()
    settings = settings.model_copy(update={"port": port})
    app = create_app(settings, engine=engine)
    with uvicorn_in_thread(app, port, access_log=False, **connection_options(settings)) as url:
        yield url


@contextmanager
def uvicorn_in_thread(app: Any, port: int, **options: Any) -> Iterator[str]:
    """uvicorn serving ``app`` on loopback ``port`` in a thread, until the block ends; yields its URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="livegen-bench-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
