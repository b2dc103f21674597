"""SD-Turbo (and any Stable Diffusion 1.x/2.x checkpoint) over diffusers' SD pipelines.

One loaded checkpoint serves text-to-image, image-to-image and inpainting: the three diffusers
pipelines share the same modules (``from_pipe``). Prompt embeddings are encoded once per
distinct prompt and cached, then stacked so one pipeline call renders a whole batch of
requests with different prompts, seeds and input images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import (
    AutoencoderTiny,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)

from livegen.engine import GenerationRequest
from livegen.engine.pipelines import common
from livegen.engine.pipelines.base import PipelineAdapter

logger = logging.getLogger(__name__)

Embeds = tuple[torch.Tensor, torch.Tensor | None]


def load_pipeline(
    source: str, *, device: torch.device, dtype: torch.dtype, tiny_vae_source: str | None
) -> StableDiffusionPipeline:
    """``from_pretrained`` by hub id or folder; the safety checker is not loaded (see /readyz)."""
    pipe = common.from_pretrained(
        StableDiffusionPipeline,
        source,
        dtype=dtype,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if tiny_vae_source is not None:
        pipe.vae = AutoencoderTiny.from_pretrained(tiny_vae_source, dtype=dtype)
    return pipe.to(device)


class SdAdapter(PipelineAdapter[Embeds]):
    """A Stable Diffusion (non-XL) checkpoint ready to render batches."""

    i2i_pipeline = StableDiffusionImg2ImgPipeline
    inpaint_pipeline = StableDiffusionInpaintPipeline
    load_pipeline = staticmethod(load_pipeline)
    i2i_guidance_rescale = False

    def _encode_prompt(self, prompt: str, negative: str, cfg: bool) -> Embeds:
        pe, npe = self.t2i.encode_prompt(prompt, self.device, 1, cfg, negative_prompt=negative or None)
        return pe, npe

    def _embeddings(self, encoded: Sequence[Embeds], batch: Sequence[GenerationRequest], cfg: bool) -> dict[str, Any]:
        rows = common.repeat_rows
        return {
            "embeds": rows([e[0] for e in encoded], batch),
            "negative_embeds": rows([e[1] for e in encoded], batch) if cfg else None,  # type: ignore[misc]
        }

    def _pipeline_embeddings(self, fields: dict[str, Any]) -> dict[str, Any]:
        kwargs = {"prompt_embeds": fields["embeds"]}
        if fields["negative_embeds"] is not None:
            kwargs["negative_prompt_embeds"] = fields["negative_embeds"]
        return kwargs
