"""GenerationService.build_request: the work it does per request stays off the event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from livegen.bench.null_engine import NullEngine
from livegen.engine import Priority
from livegen.protocol.apps import BY_ID
from livegen.protocol.schemas import TurboInpainting
from livegen.server import generation
from livegen.server.db import Database
from livegen.server.generation import GenerationService
from livegen.server.storage import FileStore
from livegen.settings import Settings
from tests.conftest import data_url, png_bytes


def test_input_images_are_decoded_and_resized_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data URL's base64 (megabytes for a large PNG) and a webcam frame's resize to the output
    size (LANCZOS: ~9 ms for 640x480 -> 512², ~50 ms from 1080p on a small CPU) must not stall
    every other session on the event loop."""
    threads: list[int] = []
    parsed: list[int] = []
    resize = Image.Image.resize
    parse = generation.parse_data_url

    def spy(self: Image.Image, *args: Any, **kwargs: Any) -> Image.Image:
        threads.append(threading.get_ident())
        return resize(self, *args, **kwargs)

    def parse_spy(*args: Any, **kwargs: Any) -> Any:
        parsed.append(threading.get_ident())
        return parse(*args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    monkeypatch.setattr(generation, "parse_data_url", parse_spy)
    body = TurboInpainting(
        prompt="a fox",
        image_url=data_url(png_bytes(640, 480)),
        mask_url=data_url(png_bytes(640, 480, (255, 255, 255))),
        image_size={"width": 512, "height": 512},  # type: ignore[arg-type]
    )
    settings = Settings(data_dir=tmp_path)
    with Database.open(tmp_path / "db.sqlite") as db:
        service = GenerationService(settings, NullEngine(), FileStore(db, tmp_path / "files"))

        async def build() -> tuple[int, Any]:
            request = await service.build_request(
                BY_ID["fal-ai/fast-turbo-diffusion/inpainting"], body, base_url="http://x", priority=Priority.SYNC
            )
            return threading.get_ident(), request

        loop_thread, request = asyncio.run(build())
    assert request.image.size == (512, 512) and request.mask.size == (512, 512)
    assert len(threads) == 2 and loop_thread not in threads
    assert len(parsed) == 2 and loop_thread not in parsed
