"""GenerationService: from a validated fal input to fal's output.

It fetches and decodes input images (off the event loop), decides the output size, resolves
the seed, hands one ``GenerationRequest`` to the engine, awaits it, and renders the images as
data URLs (``sync_mode: true``) or as stored files served back by URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any
from urllib.parse import urlsplit

import anyio
from PIL import Image
from pydantic import BaseModel

from livegen.engine import DeviceImage, Engine, GenerationRequest, GenerationResult, Priority
from livegen.engine.imaging import (
    check_data_url_size,
    decode_image,
    decode_opened,
    device_decodable,
    fit_size,
    open_image,
    parse_data_url,
    to_data_url,
)
from livegen.protocol.apps import BY_ID, Endpoint, Task
from livegen.protocol.errors import FetchRefused, InvalidInput, NotFound, PayloadTooLarge
from livegen.protocol.schemas import MAX_SIDE, MIN_SIDE, resolve_image_size
from livegen.server.admission import SyncAdmission
from livegen.server.storage import FileStore
from livegen.server.urlfetch import FetchPolicy, fetch_bytes
from livegen.settings import Settings

logger = logging.getLogger(__name__)


def abandon(future: Future[GenerationResult], request: GenerationRequest) -> None:
    """The caller went away: drop the work if it has not started, or stop it at its next step."""
    future.cancel()
    if request.cancel is not None:
        request.cancel.set()


class GenerationService:
    def __init__(self, settings: Settings, engine: Engine, files: FileStore) -> None:
        self._settings = settings
        self._engine = engine
        self._files = files
        self.admission = SyncAdmission(settings.max_pending_sync)
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
        file_ttl_s: float | None = None,
    ) -> dict[str, Any]:
        """Generate for one validated input and return fal's output. Sync requests count against
        ``max_pending_sync`` until they finish (``Overloaded`` beyond it, before any work).
        ``file_ttl_s``: how long stored images are served (``storage.requested_ttl``)."""
        started = time.perf_counter()
        with self.admission.take() if priority is Priority.SYNC else contextlib.nullcontext():
            request, result = await self.generate(endpoint, body, base_url=base_url, priority=priority, cancel=cancel)
            output = await self.render(result, body, base_url=base_url, file_ttl_s=file_ttl_s)
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
        request = await self.prepare(endpoint, body, base_url=base_url, priority=priority, cancel=cancel)
        return request, await self._await(request)

    async def prepare(
        self,
        endpoint: Endpoint,
        body: BaseModel,
        *,
        base_url: str,
        priority: Priority,
        cancel: threading.Event | None = None,
    ) -> GenerationRequest:
        """The engine's request for one validated input, checked against what the engine can do."""
        request = await self.build_request(endpoint, body, base_url=base_url, priority=priority)
        # Every request can be stopped between denoising steps: a queue job by its cancel, a
        # sync request or realtime frame when its caller goes away (or a drain timeout cuts it).
        request = dataclasses.replace(request, cancel=cancel or threading.Event())
        self._engine.check(request)
        return request

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        return self._engine.submit(request)

    def replace(self, future: Future[GenerationResult], request: GenerationRequest) -> Future[GenerationResult] | None:
        """``request`` in the place of ``future``'s work if that is still waiting for a batch
        (``Engine.replace``): the new future, or None."""
        return self._engine.replace(future, request)

    async def _await(self, request: GenerationRequest) -> GenerationResult:
        future = self._engine.submit(request)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            abandon(future, request)
            raise

    async def build_request(
        self, endpoint: Endpoint, body: BaseModel, *, base_url: str, priority: Priority
    ) -> GenerationRequest:
        self.check_limits(endpoint, body)
        fields = body.model_dump()
        task = endpoint.task
        has_image = fields.get("image_url") is not None or fields.get("image_bytes") is not None
        if task is Task.TEXT_TO_IMAGE and has_image:
            # A realtime frame on a base app that carries an image, even an empty one (refused
            # as such below rather than quietly answered with text-to-image).
            task = Task.IMAGE_TO_IMAGE
        image = mask = None
        crop_to = None
        if task is Task.TEXT_TO_IMAGE:
            width, height = resolve_image_size(getattr(body, "image_size", None) or default_image_size(endpoint.app_id))
        else:
            size_for = functools.partial(
                output_size,
                image_size=getattr(body, "image_size", None),
                preserve_aspect_ratio=fields["preserve_aspect_ratio"],
                crop_output=fields["crop_output"],
                field="image_bytes" if fields.get("image_bytes") is not None else "image_url",
                max_side=min(MAX_SIDE, self._settings.max_image_side),
            )

            def needs_no_resize(size: tuple[int, int]) -> bool:
                try:
                    return size_for(size)[:2] == size
                except InvalidInput:
                    return False  # raised again below, from the decoded image's size

            loaded = await self._load_image(
                fields.get("image_url"),
                "image_url",
                base_url,
                raw=fields.get("image_bytes"),
                # The engine decodes on its device only what it takes as is: a realtime frame
                # sent at the output size. Inpainting runs on the plain pipelines (Pillow's).
                on_device=needs_no_resize if task is Task.IMAGE_TO_IMAGE else None,
            )
            width, height, crop_to = size_for(loaded.size)
            if loaded.size != (width, height):  # off the event loop: a LANCZOS resize takes milliseconds
                pil = loaded.to_pil() if isinstance(loaded, DeviceImage) else loaded
                loaded = await anyio.to_thread.run_sync(pil.resize, (width, height), Image.Resampling.LANCZOS)
            image = loaded
            if task is Task.INPAINTING:
                raw_mask = await self._load_image(fields["mask_url"], "mask_url", base_url)
                assert isinstance(raw_mask, Image.Image)  # no on_device: always Pillow's
                mask = await anyio.to_thread.run_sync(
                    lambda: raw_mask.convert("L").resize((width, height), Image.Resampling.NEAREST)
                )
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

    def check_limits(self, endpoint: Endpoint, body: BaseModel) -> None:
        """This server's own caps, which may be set below the schema's bounds
        (``LIVEGEN_MAX_INFERENCE_STEPS``, ``LIVEGEN_MAX_NUM_IMAGES``, ``LIVEGEN_MAX_IMAGE_SIDE``):
        InvalidInput (422) naming the field; and inline images over ``max_input_image_bytes``
        (PayloadTooLarge, 413). Cheap, so the queue checks it at submit."""
        limits = self._settings
        for name in ("image_url", "mask_url"):
            value = getattr(body, name, None)
            if isinstance(value, str):
                check_data_url_size(value, max_bytes=limits.max_input_image_bytes, field=name)
        steps: int = getattr(body, "num_inference_steps", 1)
        if steps > limits.max_inference_steps:
            raise InvalidInput(
                f"num_inference_steps may be at most {limits.max_inference_steps} on this server, got {steps}",
                loc=("body", "num_inference_steps"),
            )
        count: int = getattr(body, "num_images", 1)
        if count > limits.max_num_images:
            raise InvalidInput(
                f"num_images may be at most {limits.max_num_images} on this server, got {count}",
                loc=("body", "num_images"),
            )
        size = getattr(body, "image_size", None)
        has_image = getattr(body, "image_url", None) is not None or getattr(body, "image_bytes", None) is not None
        if size is None and endpoint.task is Task.TEXT_TO_IMAGE and not has_image:
            size = default_image_size(endpoint.app_id)
        if size is not None:
            width, height = resolve_image_size(size)
            if max(width, height) > limits.max_image_side:
                raise InvalidInput(
                    f"image_size may be at most {limits.max_image_side} pixels a side on this server, "
                    f"got {width}×{height}",
                    loc=("body", "image_size"),
                )

    async def _load_image(
        self,
        url: str | None,
        field: str,
        base_url: str,
        *,
        raw: bytes | None = None,
        on_device: Callable[[tuple[int, int]], bool] | None = None,
    ) -> Image.Image | DeviceImage:
        """The input image, decoded off the event loop. ``on_device``: given the image's size,
        may the engine's ``input_decoder`` decode it (if the engine has one)?"""
        if raw is not None:
            data = raw
            field = "image_bytes"
            if len(raw) > self._settings.max_input_image_bytes:
                raise PayloadTooLarge(f"image_bytes is larger than {self._settings.max_input_image_bytes} bytes")
        else:
            assert url is not None
            if url[:5].lower() == "data:":  # base64 and the decode together, off the event loop
                return await anyio.to_thread.run_sync(self._decode_data_url, url, field, on_device)
            if (file_id := self._local_file_id(url, base_url)) is not None:  # string checks only: no thread
                data = await anyio.to_thread.run_sync(self._local_file, file_id, field)
            else:
                data = await fetch_bytes(url, self._fetch_policy, field=field)
        return await anyio.to_thread.run_sync(self._decode, data, field, on_device)

    def _decode_data_url(
        self, url: str, field: str, on_device: Callable[[tuple[int, int]], bool] | None = None
    ) -> Image.Image | DeviceImage:
        data = parse_data_url(url, max_bytes=self._settings.max_input_image_bytes, field=field)[1]
        return self._decode(data, field, on_device)

    def _decode(
        self, data: bytes, field: str, on_device: Callable[[tuple[int, int]], bool] | None = None
    ) -> Image.Image | DeviceImage:
        """Pillow's decode, or the engine's input decoder's for a JPEG it decodes the same."""
        max_pixels = self._settings.max_input_image_pixels
        decoder = self._engine.input_decoder
        if decoder is None or on_device is None:
            return decode_image(data, max_pixels=max_pixels, field=field)
        with open_image(data, max_pixels=max_pixels, field=field) as header:  # the same 422s
            if device_decodable(header, data) and on_device(header.size) and (decoded := decoder(data)) is not None:
                return decoded
            return decode_opened(header, field=field)

    @staticmethod
    def _local_file_id(url: str, base_url: str) -> str | None:
        """The file id when ``url`` is one of this server's own files (``…/cdn/files/ID/…``)."""
        base = urlsplit(base_url)
        target = urlsplit(url)
        prefix = base.path.rstrip("/") + "/cdn/files/"
        if target.scheme not in ("http", "https") or target.netloc != base.netloc:
            return None
        if not target.path.startswith(prefix):
            return None
        return target.path[len(prefix) :].split("/", 1)[0]

    def _local_file(self, file_id: str, field: str) -> bytes:
        """Bytes of a file this server serves, read from disk instead of over the network
        (under the same size cap as a download). One it no longer serves is the 422 a download
        of it would end in, said plainly: fetching our own URL would be refused as a loopback
        address on a local server, which misleads."""
        try:
            stored = self._files.get(file_id)
            if stored.size > self._settings.max_input_image_bytes:
                raise PayloadTooLarge(f"{field} is larger than the {self._settings.max_input_image_bytes}-byte limit")
            return stored.path.read_bytes()
        except (NotFound, FileNotFoundError) as exc:
            why = exc.message if isinstance(exc, NotFound) else "file not found"  # deleted since get()
            message = f"{field} could not be read from this server's files: {why}"
            raise FetchRefused(message, loc=("body", field)) from exc

    async def render(
        self,
        result: GenerationResult,
        body: BaseModel,
        *,
        base_url: str,
        as_bytes: bool = False,
        file_ttl_s: float | None = None,
    ) -> dict[str, Any]:
        """fal's output. ``as_bytes``: images as raw ``content`` (realtime frames that came as
        ``image_bytes``) instead of URLs."""
        images: list[dict[str, Any]] = []
        for encoded in result.images:
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
            file_name = f"{uuid.uuid4().hex}.{encoded.content_type.split('/')[-1]}"
            if body.sync_mode:  # type: ignore[attr-defined]
                url = to_data_url(encoded.data, encoded.content_type)
            else:
                stored = await anyio.to_thread.run_sync(
                    functools.partial(self._files.put, encoded.data, encoded.content_type, file_name, ttl_s=file_ttl_s)
                )
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
            "prompt": getattr(body, "prompt", ""),
        }
        if request_id := getattr(body, "request_id", ""):
            output["request_id"] = request_id
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
    field: str = "image_url",
    max_side: int = MAX_SIDE,
) -> tuple[int, int, tuple[int, int] | None]:
    """(width, height) to generate at, and the size to crop the result to (if any).

    No ``image_size``: the input's own size, snapped to a multiple of 8 and kept within the
    bounds an explicit ``image_size`` has (``MIN_SIDE``..``max_side`` a side) by scaling it
    down, or up when a side is shorter than ``MIN_SIDE``, keeping its aspect ratio; an input
    more elongated than ``max_side:MIN_SIDE`` (e.g. a 1×100000 strip) is refused. With
    ``image_size``: that size; with ``preserve_aspect_ratio`` the input's aspect ratio at
    about that area (multiples of 32), or, with ``crop_output`` too, the smallest such size
    covering ``image_size``, center-cropped back to it afterwards.
    """
    in_w, in_h = input_size
    if image_size is None:
        scale = min(1.0, max_side / max(in_w, in_h))
        if min(in_w, in_h) * scale < MIN_SIDE:
            scale = MIN_SIDE / min(in_w, in_h)
            if round(max(in_w, in_h) * scale) > max_side:
                raise InvalidInput(
                    f"{field} is {in_w}×{in_h}: its aspect ratio is too extreme for an output of "
                    f"{MIN_SIDE}..{max_side} pixels a side; crop it, or pass image_size to resize it",
                    loc=("body", field),
                )
        sides = [min(max_side, max(MIN_SIDE, round(side * scale))) for side in (in_w, in_h)]
        w, h = fit_size((sides[0], sides[1]), 8)
        return w, h, None
    w, h = resolve_image_size(image_size)
    if not preserve_aspect_ratio:
        return w, h, None
    if crop_output:
        scale = max(w / in_w, h / in_h)
        gen_w, gen_h = (
            min(max_side, math.ceil(in_w * scale / 32) * 32),
            min(max_side, math.ceil(in_h * scale / 32) * 32),
        )
        return gen_w, gen_h, (min(w, gen_w), min(h, gen_h))
    ratio = in_w / in_h
    area = w * h
    gen_w = max(32, min(max_side, round(math.sqrt(area * ratio) / 32) * 32))
    gen_h = max(32, min(max_side, round(math.sqrt(area / ratio) / 32) * 32))
    if gen_w < 64 or gen_h < 64:
        raise InvalidInput(
            "the input image's aspect ratio is too extreme for preserve_aspect_ratio",
            loc=("body", field),
        )
    return gen_w, gen_h, None
