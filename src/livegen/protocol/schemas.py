"""fal's model schemas: input and output models with fal's field names and defaults.

Sources: PROTOCOL.md §11 (``@fal-ai/client`` 1.10.1 ``endpoints.d.ts``, and the 2024-11
``fast-turbo-diffusion`` schema). fal publishes no numeric ranges; the bounds below are
livegen's own, chosen so every accepted request can run, and they appear in ``/openapi.json``.
Unknown input fields are ignored, as fal's apps do.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ImageSizePreset = Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"]

IMAGE_SIZE_PRESETS: dict[str, tuple[int, int]] = {
    "square_hd": (1024, 1024),
    "square": (512, 512),
    "portrait_4_3": (768, 1024),
    "portrait_16_9": (576, 1024),
    "landscape_4_3": (1024, 768),
    "landscape_16_9": (1024, 576),
}

MIN_SIDE = 64
MAX_SIDE = 2048
MAX_STEPS = 50
MAX_IMAGES = 8
MAX_PROMPT_CHARS = 4000
# 2**53 - 1, the largest integer a JSON number (an IEEE double) holds exactly: /openapi.json writes
# bounds as doubles (FastAPI types them float), JS clients parse seeds as doubles, and the engine's
# generators take seed + i (image i) up to 2**64 - 1. 2**63 - 1 was documented as 2**63.
MAX_SEED = 2**53 - 1

TurboModel = Literal["stabilityai/sdxl-turbo", "stabilityai/sd-turbo"]
LcmModel = Literal["stabilityai/stable-diffusion-xl-base-1.0", "runwayml/stable-diffusion-v1-5"]


class ImageSize(BaseModel):
    width: int = Field(default=512, ge=MIN_SIDE, le=MAX_SIDE, description="A multiple of 8")
    height: int = Field(default=512, ge=MIN_SIDE, le=MAX_SIDE, description="A multiple of 8")

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8, got {v}")
        return v


def resolve_image_size(size: ImageSizePreset | ImageSize) -> tuple[int, int]:
    """(width, height) of a preset name or an explicit size."""
    if isinstance(size, ImageSize):
        return size.width, size.height
    return IMAGE_SIZE_PRESETS[size]


class _Input(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int = Field(ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(ge=0.0, le=20.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED, description="Random when absent; echoed")
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES)
    sync_mode: bool = Field(default=True, description="true: images come back inline as data URLs; false: as file URLs")
    enable_safety_checker: bool = Field(
        default=True,
        description="Run the safety checker when the server has one loaded (see /readyz); "
        "otherwise has_nsfw_concepts is false for every image",
    )
    expand_prompt: bool = Field(default=False, description="Accepted for compatibility; not applied")
    format: Literal["jpeg", "png"] = "jpeg"
    request_id: str = Field(default="", max_length=256)


class TurboTextToImage(_Input):
    model_name: TurboModel = "stabilityai/sdxl-turbo"
    image_size: ImageSizePreset | ImageSize = "square"
    num_inference_steps: int = Field(default=2, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(default=1.0, ge=0.0, le=20.0)


class LcmTextToImage(_Input):
    model_name: LcmModel = "stabilityai/stable-diffusion-xl-base-1.0"
    image_size: ImageSizePreset | ImageSize = "square_hd"
    num_inference_steps: int = Field(default=6, ge=1, le=MAX_STEPS)
    guidance_scale: float = Field(default=1.5, ge=0.0, le=20.0)
    guidance_rescale: float = Field(default=0.0, ge=0.0, le=1.0)
    safety_checker_version: Literal["v1", "v2"] = "v1"


class _ImageInput(BaseModel):
    image_url: str = Field(min_length=1, description="http(s) URL or data URI of the input image (PNG, JPEG or WebP)")
    strength: float = Field(
        default=0.95, gt=0.0, le=1.0, description="How much the result departs from the input image"
    )
    # Without image_size the output takes the input image's size, snapped to a multiple of 8.
    image_size: ImageSizePreset | ImageSize | None = None  # type: ignore[assignment]
    preserve_aspect_ratio: bool = Field(
        default=False, description="Keep the input's aspect ratio within image_size's area (multiples of 32)"
    )
    crop_output: bool = Field(
        default=False, description="With preserve_aspect_ratio: center-crop the result to image_size"
    )


class _MaskInput(_ImageInput):
    mask_url: str = Field(min_length=1, description="Mask image: white = repaint, black = keep")


class TurboImageToImage(_ImageInput, TurboTextToImage):
    image_size: ImageSizePreset | ImageSize | None = None  # type: ignore[assignment]


class LcmImageToImage(_ImageInput, LcmTextToImage):
    image_size: ImageSizePreset | ImageSize | None = None  # type: ignore[assignment]


class TurboInpainting(_MaskInput, TurboTextToImage):
    image_size: ImageSizePreset | ImageSize | None = None  # type: ignore[assignment]


class LcmInpainting(_MaskInput, LcmTextToImage):
    image_size: ImageSizePreset | ImageSize | None = None  # type: ignore[assignment]


class Image(BaseModel):
    url: str
    width: int
    height: int
    content_type: str
    file_name: str | None = None
    file_size: int | None = None


class Output(BaseModel):
    images: list[Image]
    timings: dict[str, float]
    seed: int
    has_nsfw_concepts: list[bool]
    prompt: str
    request_id: str | None = None


class _RealtimeImage(BaseModel):
    """What realtime frames add to the text-to-image schema: an optional input image, as a URL
    (fal's quickstart sends a data URL) or as raw bytes (fal's camera demos). With an image the
    frame is image-to-image, without one text-to-image."""

    image_url: str | None = Field(default=None, min_length=1)
    image_bytes: bytes | None = Field(default=None, description="Raw PNG/JPEG/WebP bytes (msgpack bin)")
    strength: float = Field(default=0.95, gt=0.0, le=1.0)
    image_size: ImageSizePreset | ImageSize | None = None  # type: ignore[assignment]
    preserve_aspect_ratio: bool = False
    crop_output: bool = False

    @property
    def has_image(self) -> bool:
        return self.image_url is not None or self.image_bytes is not None


class TurboRealtime(_RealtimeImage, TurboTextToImage):
    image_size: ImageSizePreset | ImageSize | None = None  # type: ignore[assignment]


class LcmRealtime(_RealtimeImage, LcmTextToImage):
    image_size: ImageSizePreset | ImageSize | None = None  # type: ignore[assignment]
