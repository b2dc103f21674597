"""The engine's contract with the server: work items in, futures out. No torch here.

The server builds ``GenerationRequest`` objects (inputs already validated and images already
decoded), hands them to an ``Engine`` and awaits the returned future. ``engine.worker`` holds
the implementation, the single owner of the device.
"""

from __future__ import annotations

import enum
import gc
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from livegen.protocol.apps import Task

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image as PILImage

    from livegen.engine.device_decode import JpegDecoder

__all__ = [
    "DeviceImage", "Engine", "EncodedImage", "GenerationRequest", "GenerationResult", "Priority", "Task", "freeze_heap",
    "unet_steps",
]  # fmt: skip

logger = logging.getLogger(__name__)


def unet_steps(task: Task, steps: int, strength: float) -> int:
    """The UNet steps a request runs: every one for text-to-image; for image-to-image and
    inpainting the last ``int(steps * strength)``, as the diffusers pipelines (at most ``steps``)."""
    if task is Task.TEXT_TO_IMAGE:
        return steps
    return min(int(steps * strength), steps)


class Priority(enum.IntEnum):
    """Lower runs first: realtime frames, then sync requests, then queued jobs."""

    REALTIME = 0
    SYNC = 1
    QUEUED = 2


@dataclass(frozen=True, eq=False)
class DeviceImage:
    """An input image already decoded where the engine runs (``Engine.input_decoder``):
    uint8, (3, height, width), RGB."""

    pixels: torch.Tensor

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as ``PIL.Image.size``."""
        return int(self.pixels.shape[2]), int(self.pixels.shape[1])

    def to_pil(self) -> PILImage:
        """For the plain pipelines (inpainting, guidance_rescale, models without the fast path)."""
        from PIL import Image

        return Image.fromarray(self.pixels.permute(1, 2, 0).cpu().numpy())


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    model_id: str
    task: Task
    prompt: str
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    negative_prompt: str = ""
    num_images: int = 1
    strength: float = 1.0
    guidance_rescale: float = 0.0
    # RGB, already width x height; a DeviceImage when the engine's input_decoder decoded it.
    image: PILImage | DeviceImage | None = None
    mask: PILImage | None = None  # L, already width x height
    output_format: Literal["jpeg", "png"] = "jpeg"
    # Center-crop each result to this (width, height) after generation.
    crop_to: tuple[int, int] | None = None
    priority: Priority = Priority.SYNC
    # Which VAE decodes: "default" is the server's choice (the tiny VAE on the fast path unless
    # --full-vae); honoured by the fast path, the plain pipelines decode with the loaded VAE.
    vae: Literal["default", "tiny", "full"] = "default"
    # Set by the caller to stop the work: dropped before it starts, interrupted at the next
    # denoising step when every request of its batch is cancelled.
    cancel: threading.Event | None = None

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys can share one pipeline call."""
        return (
            self.model_id,
            self.task,
            self.width,
            self.height,
            self.num_inference_steps,
            self.guidance_scale,
            self.guidance_rescale,
            self.strength if self.task is not Task.TEXT_TO_IMAGE else None,
            self.vae,
        )


@dataclass(frozen=True)
class EncodedImage:
    data: bytes
    width: int
    height: int
    content_type: str


@dataclass(frozen=True)
class GenerationResult:
    images: list[EncodedImage]
    seed: int
    has_nsfw_concepts: list[bool]
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1


class Engine(Protocol):
    """What the server needs from the engine."""

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]: ...

    def replace(self, future: Future[GenerationResult], request: GenerationRequest) -> Future[GenerationResult] | None:
        """``request`` in the place of ``future``'s work if that has not started (its place in
        line kept, ``future`` cancelled): the new future; None when it has started or is done."""
        ...

    def check(self, request: GenerationRequest) -> None:
        """Raise ``InvalidInput`` / ``ModelUnavailable`` for work this engine cannot do."""
        ...

    def status(self) -> dict[str, Any]: ...

    @property
    def ready(self) -> bool: ...

    @property
    def input_decoder(self) -> JpegDecoder | None:
        """Decodes input JPEGs where the engine runs (nvjpeg on CUDA); None: the server uses Pillow."""
        ...


def freeze_heap(after: str) -> None:
    """Collect once, then take every object alive out of the collector's reach (``gc.freeze``).

    A serving process holds the objects of torch, diffusers, transformers, FastAPI and the loaded
    models: ~550,000 tracked objects. Each full collection walks them all with the GIL held,
    stopping the event loop and the engine for ~330 ms on a 2-core VM (BENCHMARKS.md session 20),
    and CPython starts one every ~60,000-90,000 requests. These objects live as long as the process
    (models are never unloaded), so later collections need not look at them: they then take ~2 ms.
    Objects made afterwards are collected as usual."""
    started = time.perf_counter()
    gc.collect()  # the garbage of loading goes first, not into the frozen set
    gc.freeze()
    logger.info(
        "gc: %d objects frozen after %s (%.0f ms)", gc.get_freeze_count(), after, (time.perf_counter() - started) * 1e3
    )
