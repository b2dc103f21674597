"""The fal endpoints livegen serves, and which schema and task each one has."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pydantic import BaseModel

from livegen.protocol import schemas


class Task(enum.Enum):
    TEXT_TO_IMAGE = "text-to-image"
    IMAGE_TO_IMAGE = "image-to-image"
    INPAINTING = "inpainting"


@dataclass(frozen=True)
class Endpoint:
    endpoint_id: str  # e.g. "fal-ai/fast-lcm-diffusion/image-to-image"
    app_id: str  # owner/alias: "fal-ai/fast-lcm-diffusion"
    task: Task
    input_model: type[BaseModel]
    summary: str

    @property
    def slug(self) -> str:
        """The id as a Python identifier, for handler (and OpenAPI operation) names."""
        return self.endpoint_id.replace("/", "_").replace("-", "_")

    @property
    def alias(self) -> str:
        return self.app_id.split("/", 1)[1]


TURBO = "fal-ai/fast-turbo-diffusion"
LCM = "fal-ai/fast-lcm-diffusion"

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(TURBO, TURBO, Task.TEXT_TO_IMAGE, schemas.TurboTextToImage, "SD-Turbo / SDXL-Turbo text-to-image"),
    Endpoint(
        f"{TURBO}/image-to-image",
        TURBO,
        Task.IMAGE_TO_IMAGE,
        schemas.TurboImageToImage,
        "SD-Turbo / SDXL-Turbo image-to-image",
    ),
    Endpoint(
        f"{TURBO}/inpainting",
        TURBO,
        Task.INPAINTING,
        schemas.TurboInpainting,
        "SD-Turbo / SDXL-Turbo inpainting",
    ),
    Endpoint(LCM, LCM, Task.TEXT_TO_IMAGE, schemas.LcmTextToImage, "LCM-LoRA (SD 1.5 / SDXL) text-to-image"),
    Endpoint(f"{LCM}/image-to-image", LCM, Task.IMAGE_TO_IMAGE, schemas.LcmImageToImage, "LCM-LoRA image-to-image"),
    Endpoint(f"{LCM}/inpainting", LCM, Task.INPAINTING, schemas.LcmInpainting, "LCM-LoRA inpainting"),
)

BY_ID: dict[str, Endpoint] = {e.endpoint_id: e for e in ENDPOINTS}
