"""Small pieces every pipeline adapter uses: an LRU for prompt embeddings, seeded generators,
and turning a batch's outputs back into per-request image lists."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, Protocol, TypeVar

import torch
from PIL import Image

from livegen.engine import DeviceImage, GenerationRequest, Task, unet_steps
from livegen.engine.fastpath import Deferred, FastPath, Job, Output, VaeChoice
from livegen.protocol.errors import InvalidInput

logger = logging.getLogger(__name__)

V = TypeVar("V")
InputImage = TypeVar("InputImage", bound="Image.Image | DeviceImage")


Outputs = list[list[Image.Image]] | Deferred[list[list[Output]]]


class Adapter(Protocol):
    """One loaded model: validates requests and runs batches of compatible ones.

    A batch's outputs are one list of images per request; the fast path returns them as a
    ``Deferred`` (device work enqueued, ``result()`` waits), possibly already JPEG-encoded."""

    model_id: str

    def check_inputs(self, request: GenerationRequest) -> None: ...

    def __call__(self, batch: Sequence[GenerationRequest]) -> Outputs: ...


def from_pretrained(cls: Any, source: str, *, dtype: torch.dtype, **kwargs: Any) -> Any:
    """``cls.from_pretrained(source, dtype=dtype, **kwargs)`` from the checkpoint's half-precision
    files (``variant="fp16"``) when the model runs in float16, as SD-Turbo's and SDXL-Turbo's
    model cards load them: on the hub that is half the download of the float32 files diffusers
    reads by default, for the same float16 weights. Per component, one without fp16 files reads
    its plain ones. The other way round too: a checkpoint with none (a folder of float32 files,
    livegen's synthesized ones) loads its plain files, and one with only fp16 files (a hub cache
    filled by the model card's code) loads those whatever the dtype. Any other error is raised
    as is; when neither set of files is there, the first attempt's error."""
    first: Exception | None = None
    for variant in ("fp16", None) if dtype == torch.float16 else (None, "fp16"):
        try:
            return cls.from_pretrained(source, dtype=dtype, variant=variant, **kwargs)
        except (ValueError, OSError) as exc:
            if not _no_such_files(exc):
                raise
            logger.debug("%s has no %s files: trying the others", source, variant or "plain")
            first = first or exc
    assert first is not None
    raise first


def _no_such_files(exc: Exception) -> bool:
    """diffusers' errors for a checkpoint without the asked-for files: a variant missing from
    every component (ValueError), or a component with only other files (OSError)."""
    message = str(exc)
    if isinstance(exc, ValueError):
        return "no such modeling files" in message
    return message.startswith("Error no file named")


class LruCache(Generic[V]):
    """Prompt embeddings by (prompt, negative prompt, cfg): a repeated prompt is not re-encoded."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Hashable, V] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_or_create(self, key: Hashable, create: Callable[[], V]) -> V:
        if key in self._items:
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key]
        self.misses += 1
        value = create()
        if self.capacity > 0:
            self._items[key] = value
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


def check_common(request: GenerationRequest, *, vae_scale_factor: int = 8) -> None:
    """Checks every family shares; each adapter adds its own."""
    if request.width % vae_scale_factor or request.height % vae_scale_factor:
        raise InvalidInput(
            f"image size must be a multiple of {vae_scale_factor}, got {request.width}x{request.height}",
            loc=("body", "image_size"),
        )
    if request.task is not Task.TEXT_TO_IMAGE:
        if unet_steps(request.task, request.num_inference_steps, request.strength) < 1:
            raise InvalidInput(
                f"num_inference_steps x strength must be at least 1 (diffusers runs "
                f"int(steps * strength) steps): {request.num_inference_steps} x {request.strength} "
                f"runs none; raise num_inference_steps or strength",
                loc=("body", "strength"),
            )
        if request.image is None:
            raise InvalidInput("an input image is required", loc=("body", "image_url"))
    if request.task is Task.INPAINTING and request.mask is None:
        raise InvalidInput("a mask image is required", loc=("body", "mask_url"))


def generators(device: torch.device, batch: Sequence[GenerationRequest]) -> list[torch.Generator]:
    """One generator per image: image i of a request uses seed + i."""
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    return [torch.Generator(gen_device).manual_seed(r.seed + i) for r in batch for i in range(r.num_images)]


def repeat_rows(rows: Sequence[torch.Tensor], batch: Sequence[GenerationRequest]) -> torch.Tensor:
    """Stack each request's (1, ...) tensor num_images times, in batch order."""
    return torch.cat([row.expand(r.num_images, *row.shape[1:]) for row, r in zip(rows, batch, strict=True)])


def repeat_images(
    images: Sequence[Image.Image | DeviceImage | None], batch: Sequence[GenerationRequest]
) -> list[Image.Image]:
    """Each request's input image num_images times, as Pillow images (the plain pipelines')."""
    return repeat_inputs([im.to_pil() if isinstance(im, DeviceImage) else im for im in images], batch)


def repeat_inputs(images: Sequence[InputImage | None], batch: Sequence[GenerationRequest]) -> list[InputImage]:
    """Each request's input image num_images times, as they are (the fast path takes images
    decoded on its device)."""
    out: list[InputImage] = []
    for image, r in zip(images, batch, strict=True):
        assert image is not None
        out.extend([image] * r.num_images)
    return out


def split_outputs(images: Sequence[Image.Image], batch: Sequence[GenerationRequest]) -> list[list[Image.Image]]:
    out: list[list[Image.Image]] = []
    start = 0
    for r in batch:
        chunk = list(images[start : start + r.num_images])
        start += r.num_images
        if r.crop_to is not None:
            chunk = [center_crop(im, *r.crop_to) for im in chunk]
        out.append(chunk)
    return out


def center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    left = max(0, (image.width - width) // 2)
    top = max(0, (image.height - height) // 2)
    return image.crop((left, top, left + min(width, image.width), top + min(height, image.height)))


def interrupt_callback(batch: Sequence[GenerationRequest]) -> Callable[..., dict[str, Any]] | None:
    """A ``callback_on_step_end`` that stops the denoising loop once every request of the batch
    is cancelled (a batch shared with live requests runs on; the cancelled result is dropped)."""
    events = [r.cancel for r in batch if r.cancel is not None]
    if len(events) != len(batch):
        return None

    def callback(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if all(e.is_set() for e in events):
            pipe._interrupt = True
        return kwargs

    return callback


def total_images(batch: Sequence[GenerationRequest]) -> int:
    return sum(r.num_images for r in batch)


def fast_eligible(fast: FastPath | None, batch: Sequence[GenerationRequest]) -> bool:
    """The fast path renders text- and image-to-image without guidance_rescale; the rest goes
    through the plain pipeline."""
    first = batch[0]
    return fast is not None and first.task is not Task.INPAINTING and not first.guidance_rescale


def vae_choice(request: GenerationRequest, default: VaeChoice, fast: FastPath) -> VaeChoice:
    choice: VaeChoice = default if request.vae == "default" else request.vae
    return "full" if choice == "tiny" and fast.tiny_vae is None else choice


def fast_job(
    fast: FastPath,
    batch: Sequence[GenerationRequest],
    default_vae: VaeChoice,
    embeds: torch.Tensor,
    negative_embeds: torch.Tensor | None,
    pooled: torch.Tensor | None = None,
    negative_pooled: torch.Tensor | None = None,
) -> Job:
    """One fast-path Job for a batch of compatible requests (rows: request x num_images)."""
    first = batch[0]
    i2i = first.task is Task.IMAGE_TO_IMAGE
    return Job(
        task=first.task,
        width=first.width,
        height=first.height,
        steps=first.num_inference_steps,
        strength=first.strength,
        guidance_scale=first.guidance_scale,
        vae=vae_choice(first, default_vae, fast),
        embeds=embeds,
        generators=generators(fast.device, batch),
        negative_embeds=negative_embeds,
        pooled=pooled,
        negative_pooled=negative_pooled,
        images=repeat_inputs([r.image for r in batch], batch) if i2i else None,
        crops=[r.crop_to for r in batch for _ in range(r.num_images)],
        formats=[r.output_format for r in batch for _ in range(r.num_images)],
    )


def group_rows(rows: Sequence[V], batch: Sequence[GenerationRequest]) -> list[list[V]]:
    """Per-image rows back into one list per request."""
    out: list[list[V]] = []
    start = 0
    for r in batch:
        out.append(list(rows[start : start + r.num_images]))
        start += r.num_images
    return out


def render_fast(fast: FastPath, job: Job, batch: Sequence[GenerationRequest]) -> Deferred[list[list[Output]]]:
    return fast.render(job).then(lambda rows: group_rows(rows, batch))
