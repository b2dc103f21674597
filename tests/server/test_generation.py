"""GenerationService.build_request: the work it does per request stays off the event loop."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from livegen.bench.null_engine import NullEngine
from livegen.engine import DeviceImage, Priority
from livegen.engine.device_decode import JpegDecoder
from livegen.engine.imaging import decode_image
from livegen.protocol.apps import BY_ID
from livegen.protocol.errors import InvalidImage
from livegen.protocol.schemas import TurboImageToImage, TurboInpainting
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


def jpeg_bytes(width: int, height: int, *, mode: str = "RGB", **save: Any) -> bytes:
    rng = np.random.default_rng(width * height)
    pixels = (rng.random((height, width, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85, **save)
    return buf.getvalue()


def pillow_stand_in(data: bytes) -> torch.Tensor:
    """The nvjpeg decoder's contract (uint8 (3, H, W) RGB on the engine's device), on a CPU."""
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)


class DecodingEngine(NullEngine):
    """The null engine with an input decoder, as a CUDA worker has (nvjpeg there)."""

    def __init__(self, decode: Any = pillow_stand_in) -> None:
        super().__init__()
        self.input_decoder = JpegDecoder(torch.device("cpu"), decode, "stand-in")  # type: ignore[assignment]


def build(engine: NullEngine, tmp_path: Path, app: str, body: Any) -> Any:
    with Database.open(tmp_path / "db.sqlite") as db:
        service = GenerationService(Settings(data_dir=tmp_path), engine, FileStore(db, tmp_path / "files"))
        return asyncio.run(service.build_request(BY_ID[app], body, base_url="http://x", priority=Priority.REALTIME))


I2I = "fal-ai/fast-turbo-diffusion/image-to-image"
SIZE = {"width": 512, "height": 512}


@pytest.mark.parametrize(
    "save",
    [pytest.param({}, id="baseline"), pytest.param({"progressive": True}, id="progressive"),
     pytest.param({"mode": "L"}, id="grayscale")],
)  # fmt: skip
def test_a_frame_at_the_output_size_is_decoded_by_the_engines_decoder(tmp_path: Path, save: dict[str, Any]) -> None:
    data = jpeg_bytes(512, 512, **save)
    engine = DecodingEngine()
    request = build(engine, tmp_path, I2I, TurboImageToImage(prompt="a fox", image_url=data_url(data, "image/jpeg")))
    assert isinstance(request.image, DeviceImage) and request.image.size == (512, 512)
    assert (request.width, request.height) == (512, 512)
    assert engine.input_decoder.status() == {"decoder": "stand-in", "device": "cpu", "images": 1, "fallbacks": 0}
    # the same pixels Pillow's decode gives
    assert np.array_equal(np.asarray(request.image.to_pil()), np.asarray(decode_image(data)))


def exif_rotated(data: bytes) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    img = Image.open(io.BytesIO(data))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("app", "image", "extra"),
    [
        pytest.param(I2I, jpeg_bytes(640, 480), {"image_size": SIZE}, id="needs-a-resize"),
        pytest.param(I2I, jpeg_bytes(512, 512), {"image_size": {"width": 768, "height": 768}}, id="other-size"),
        pytest.param(I2I, png_bytes(512, 512), {}, id="png"),
        pytest.param(I2I, exif_rotated(jpeg_bytes(512, 384)), {"image_size": {"width": 384, "height": 512}},
                     id="exif-rotated"),
        pytest.param(I2I, jpeg_bytes(512, 512, mode="CMYK"), {}, id="cmyk"),
        pytest.param("fal-ai/fast-turbo-diffusion/inpainting", jpeg_bytes(512, 512), {"mask_url": "MASK"},
                     id="inpainting"),
    ],
)  # fmt: skip
def test_what_the_engines_decoder_does_not_take_is_decoded_by_pillow(
    tmp_path: Path, app: str, image: bytes, extra: dict[str, Any]
) -> None:
    """Only a JPEG that decodes the same either way and needs no resize goes to the device; the
    rest is Pillow's, as on a server without one (an EXIF-rotated frame is rotated, a resize is
    LANCZOS on the CPU)."""
    if extra.get("mask_url") == "MASK":
        extra = {**extra, "mask_url": data_url(png_bytes(512, 512, (255, 255, 255)))}
    schema = BY_ID[app].input_model
    body = schema(prompt="a fox", image_url=data_url(image, "image/jpeg"), **extra)
    engine = DecodingEngine()
    request = build(engine, tmp_path, app, body)
    reference = build(NullEngine(), tmp_path, app, body)
    assert isinstance(request.image, Image.Image) and engine.input_decoder.images == 0
    assert request.image.size == reference.image.size == (request.width, request.height)
    assert np.array_equal(np.asarray(request.image), np.asarray(reference.image))


def test_a_frame_the_engines_decoder_fails_on_is_decoded_by_pillow(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(data: bytes) -> torch.Tensor:
        raise RuntimeError("nvjpeg: unsupported marker")

    engine = DecodingEngine(broken)
    data = jpeg_bytes(512, 512)
    with caplog.at_level(logging.DEBUG, logger="livegen.engine.device_decode"):
        request = build(engine, tmp_path, I2I, TurboImageToImage(prompt="x", image_url=data_url(data, "image/jpeg")))
        build(engine, tmp_path, I2I, TurboImageToImage(prompt="x", image_url=data_url(data, "image/jpeg")))
    assert isinstance(request.image, Image.Image)
    assert np.array_equal(np.asarray(request.image), np.asarray(decode_image(data)))
    assert engine.input_decoder.status()["fallbacks"] == 2
    levels = [r.levelno for r in caplog.records if "unsupported marker" in r.getMessage()]
    assert levels == [logging.WARNING, logging.DEBUG]  # said once, loudly


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(jpeg_bytes(512, 512)[:20000], id="truncated"),
        pytest.param(b"\xff\xd8\xff" + b"\0" * 100, id="header-only"),
        pytest.param(jpeg_bytes(512, 512)[:-2] + b"\0\0", id="no-end-marker"),
    ],
)
def test_broken_jpegs_get_pillows_errors_not_the_decoders(tmp_path: Path, data: bytes) -> None:
    """A truncated JPEG never reaches the engine's decoder (a GPU decoder may fill in the rest
    instead of refusing it): Pillow decodes it, and refuses it with a 422 naming the field."""
    calls: list[int] = []

    def decode(data: bytes) -> torch.Tensor:
        calls.append(len(data))
        return pillow_stand_in(data)

    engine = DecodingEngine(decode)
    body = TurboImageToImage(prompt="x", image_url=data_url(data, "image/jpeg"))
    with pytest.raises(InvalidImage, match="truncated or corrupt") as info:
        build(engine, tmp_path, I2I, body)
    assert info.value.loc == ("body", "image_url")
    assert calls == []


def test_the_decoders_warm_up_is_not_counted_and_a_failure_is_said(caplog: pytest.LogCaptureFixture) -> None:
    """The worker warms the decoder up at start (nvjpeg's first call sets up its state)."""
    engine = DecodingEngine()
    engine.input_decoder.warm_up()
    assert engine.input_decoder.status()["images"] == 0

    def broken(data: bytes) -> torch.Tensor:
        raise RuntimeError("no nvjpeg here")

    with caplog.at_level(logging.WARNING, logger="livegen.engine.device_decode"):
        DecodingEngine(broken).input_decoder.warm_up()
    assert any("failed its warm-up decode (no nvjpeg here)" in r.getMessage() for r in caplog.records)
