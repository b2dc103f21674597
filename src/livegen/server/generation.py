"""GenerationService: from a validated fal input to fal's output.

It fetches and decodes input images (off the event loop), decides the output size, resolves
the seed, hands one ``GenerationRequest`` to the engine, awaits it, and renders the images as
data URLs (``sync_mode: true``) or as stored files served back by URL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import secrets
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import anyio
from PIL import Image
from pydantic import BaseModel

from livegen.engine import Engine, GenerationRequest, GenerationResult, Priority
from livegen.engine.imaging import decode_image, fit_size, to_data_url
from livegen.protocol.apps import BY_ID, Endpoint, Task
from livegen.protocol.errors import InvalidInput, NotFound, PayloadTooLarge
from livegen.protocol.schemas import MAX_SIDE, resolve_image_size
from livegen.server.storage import FileStore
from livegen.server.urlfetch import FetchPolicy, fetch_bytes
from livegen.settings import Settings

logger = logging.getLogger(__name__)


class GenerationService:
    def __init__(self, settings: Settings, engine: Engine, files: FileStore) -> None:
        self._settings = settings
        self._engine = engine
        self._files = files
        self._fetch_policy = FetchPolicy(
            allow_private=settings.allow_private_urls,
            max_bytes=settings.max_input_image_bytes,
            timeout_s=settings.fetch_timeout_s,
        )

    async def run(
        self,
        endpoint: Endpoint,
        body: BaseModel,
        *,
        base_url: str,
        priority: Priority = Priority.SYNC,
        cancel: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Generate for one validated input and return fal's output."""
        started = time.perf_counter()
        request, result = await self.generate(endpoint, body, base_url=base_url, priority=priority, cancel=cancel)
        output = await self.render(result, body, base_url=base_url)
        logger.info(
            "run endpoint=%s model=%s size=%dx%d steps=%d images=%d batch=%d ms=%.1f",
            endpoint.endpoint_id,
            request.model_id,
            request.width,
            request.height,
            request.num_inference_steps,
            request.num_images,
            result.batch_size,
            (time.perf_counter() - started) * 1e3,
        )
        return output

    async def generate(
        self,
        endpoint: Endpoint,
        body: BaseModel,
        *,
        base_url: str,
        priority: Priority,
        cancel: threading.Event | None = None,
    ) -> tuple[GenerationRequest, GenerationResult]:
        request = await self.build_request(endpoint, body, base_url=base_url, priority=priority)
        if cancel is not None:
            request = dataclasses.replace(request, cancel=cancel)
        self._engine.check(request)
        return request, await self._await(request)

    async def _await(self, request: GenerationRequest) -> GenerationResult:
        future = self._engine.submit(request)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # the client went away: drop the work if it has not started
            raise

    async def build_request(
        self, endpoint: Endpoint, body: BaseModel, *, base_url: str, priority: Priority
    ) -> GenerationRequest:
        fields = body.model_dump()
        task = endpoint.task
        if task is Task.TEXT_TO_IMAGE and (fields.get("image_url") or fields.get("image_bytes")):
            task = Task.IMAGE_TO_IMAGE  # a realtime frame on a base app that carries an image
        image = mask = None
        crop_to = None
        if task is Task.TEXT_TO_IMAGE:
            width, height = resolve_image_size(body.image_size or default_image_size(endpoint.app_id))
        else:
            image = await self._load_image(
                fields.get("image_url"), "image_url", base_url, raw=fields.get("image_bytes")
            )
            width, height, crop_to = output_size(
                image.size,
                body.image_size,
                preserve_aspect_ratio=fields["preserve_aspect_ratio"],
                crop_output=fields["crop_output"],
            )
            image = image.resize((width, height), Image.Resampling.LANCZOS) if image.size != (width, height) else image
            if task is Task.INPAINTING:
                raw_mask = await self._load_image(fields["mask_url"], "mask_url", base_url)
                mask = raw_mask.convert("L").resize((width, height), Image.Resampling.NEAREST)
        seed = fields["seed"] if fields["seed"] is not None else secrets.randbelow(2**32)
        return GenerationRequest(
            model_id=fields["model_name"],
            task=task,
            prompt=fields["prompt"],
            negative_prompt=fields["negative_prompt"],
            width=width,
            height=height,
            num_inference_steps=fields["num_inference_steps"],
            guidance_scale=fields["guidance_scale"],
            guidance_rescale=fields.get("guidance_rescale", 0.0),
            seed=seed,
            num_images=fields["num_images"],
            strength=fields.get("strength", 1.0),
            image=image,
            mask=mask,
            output_format=fields["format"],
            crop_to=crop_to,
            priority=priority,
        )

    async def _load_image(self, url: str | None, field: str, base_url: str, *, raw: bytes | None = None) -> Image.Image:
        if raw is not None:
            data: bytes | None = raw
            field = "image_bytes"
            if len(raw) > self._settings.max_input_image_bytes:
                raise PayloadTooLarge(f"image_bytes is larger than {self._settings.max_input_image_bytes} bytes")
        else:
            assert url is not None
            data = await anyio.to_thread.run_sync(self._local_file, url, base_url, field)
        if data is None:
            assert url is not None
            data = await fetch_bytes(url, self._fetch_policy, field=field)
        return await anyio.to_thread.run_sync(
            lambda: decode_image(data, max_pixels=self._settings.max_input_image_pixels, field=field)
        )

    def _local_file(self, url: str, base_url: str, field: str) -> bytes | None:
        """Bytes of a file this server serves, read from disk instead of over the network
        (under the same size cap as a download)."""
        base = urlsplit(base_url)
        target = urlsplit(url)
        prefix = base.path.rstrip("/") + "/cdn/files/"
        if target.scheme not in ("http", "https") or target.netloc != base.netloc:
            return None
        if not target.path.startswith(prefix):
            return None
        file_id = target.path[len(prefix) :].split("/", 1)[0]
        try:
            stored = self._files.get(file_id)
        except NotFound:
            return None
        if stored.size > self._settings.max_input_image_bytes:
            raise PayloadTooLarge(f"{field} is larger than the {self._settings.max_input_image_bytes}-byte limit")
        return stored.path.read_bytes()

    async def render(
        self, result: GenerationResult, body: BaseModel, *, base_url: str, as_bytes: bool = False
    ) -> dict[str, Any]:
        """fal's output. ``as_bytes``: images as raw ``content`` (realtime frames that came as
        ``image_bytes``) instead of URLs."""
        images: list[dict[str, Any]] = []
        for encoded in result.images:
            ext = encoded.content_type.split("/")[-1]
            file_name = f"{uuid.uuid4().hex}.{ext}"
            if as_bytes:
                images.append(
                    {
                        "content": encoded.data,
                        "width": encoded.width,
                        "height": encoded.height,
                        "content_type": encoded.content_type,
                    }
                )
                continue
            if body.sync_mode:  # type: ignore[attr-defined]
                url = to_data_url(encoded.data, encoded.content_type)
            else:
                stored = await anyio.to_thread.run_sync(self._files.put, encoded.data, encoded.content_type, file_name)
                url = f"{base_url}/cdn/files/{stored.file_id}/{stored.file_name}"
            images.append(
                {
                    "url": url,
                    "width": encoded.width,
                    "height": encoded.height,
                    "content_type": encoded.content_type,
                    "file_name": file_name,
                    "file_size": len(encoded.data),
                }
            )
        output: dict[str, Any] = {
            "images": images,
            "timings": result.timings,
            "seed": result.seed,
            "has_nsfw_concepts": result.has_nsfw_concepts,
            "prompt": body.prompt,
        }
        if getattr(body, "request_id", ""):
            output["request_id"] = body.request_id
        return output


def default_image_size(app_id: str) -> Any:
    """The ``image_size`` default of the app's text-to-image schema (``square`` / ``square_hd``)."""
    return BY_ID[app_id].input_model.model_fields["image_size"].default


def output_size(
    input_size: tuple[int, int],
    image_size: Any,
    *,
    preserve_aspect_ratio: bool,
    crop_output: bool,
) -> tuple[int, int, tuple[int, int] | None]:
    """(width, height) to generate at, and the size to crop the result to (if any).

    No ``image_size``: the input's own size, scaled down to fit ``MAX_SIDE`` and snapped to a
    multiple of 8. With ``image_size``: that size; with ``preserve_aspect_ratio`` the input's
    aspect ratio at about that area (multiples of 32), or, with ``crop_output`` too, the
    smallest such size covering ``image_size``, center-cropped back to it afterwards.
    """
    in_w, in_h = input_size
    if image_size is None:
        scale = min(1.0, MAX_SIDE / max(in_w, in_h))
        w, h = fit_size((max(8, int(in_w * scale)), max(8, int(in_h * scale))), 8)
        return w, h, None
    w, h = resolve_image_size(image_size)
    if not preserve_aspect_ratio:
        return w, h, None
    if crop_output:
        scale = max(w / in_w, h / in_h)
        gen_w, gen_h = (
            min(MAX_SIDE, math.ceil(in_w * scale / 32) * 32),
            min(MAX_SIDE, math.ceil(in_h * scale / 32) * 32),
        )
        return gen_w, gen_h, (min(w, gen_w), min(h, gen_h))
    ratio = in_w / in_h
    area = w * h
    gen_w = max(32, min(MAX_SIDE, round(math.sqrt(area * ratio) / 32) * 32))
    gen_h = max(32, min(MAX_SIDE, round(math.sqrt(area / ratio) / 32) * 32))
    if gen_w < 64 or gen_h < 64:
        raise InvalidInput(
            "the input image's aspect ratio is too extreme for preserve_aspect_ratio",
            loc=("body", "image_url"),
        )
    return gen_w, gen_h, None
