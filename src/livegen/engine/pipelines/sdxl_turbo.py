"""SDXL-Turbo (and any SDXL checkpoint) over diffusers' SDXL pipelines.

Same shape as ``sd_turbo.py``; SDXL adds the pooled text embedding of its second encoder,
which is cached and stacked alongside the per-token embeddings.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import (
    AutoencoderTiny,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from livegen.engine import GenerationRequest
from livegen.engine.pipelines import common
from livegen.engine.pipelines.base import PipelineAdapter

logger = logging.getLogger(__name__)

# (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)
XlEmbeds = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


def load_pipeline(
    source: str, *, device: torch.device, dtype: torch.dtype, tiny_vae_source: str | None
) -> StableDiffusionXLPipeline:
    """``from_pretrained`` by hub id or folder. No invisible watermark (it needs another package)."""
    pipe = common.from_pretrained(StableDiffusionXLPipeline, source, dtype=dtype, add_watermarker=False)
    if tiny_vae_source is not None:
        pipe.vae = AutoencoderTiny.from_pretrained(tiny_vae_source, dtype=dtype)
    return pipe.to(device)


class SdxlAdapter(PipelineAdapter[XlEmbeds]):
    """An SDXL checkpoint ready to render batches."""

    i2i_pipeline = StableDiffusionXLImg2ImgPipeline
    inpaint_pipeline = StableDiffusionXLInpaintPipeline
    load_pipeline = staticmethod(load_pipeline)

    def _encode_prompt(self, prompt: str, negative: str, cfg: bool) -> XlEmbeds:
        pe, npe, ppe, nppe = self.t2i.encode_prompt(
            prompt,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=cfg,
            negative_prompt=negative or None,
        )
        return pe, npe, ppe, nppe

    def _embeddings(self, encoded: Sequence[XlEmbeds], batch: Sequence[GenerationRequest], cfg: bool) -> dict[str, Any]:
        rows = common.repeat_rows
        return {
            "embeds": rows([e[0] for e in encoded], batch),
            "negative_embeds": rows([e[1] for e in encoded], batch) if cfg else None,  # type: ignore[misc]
            "pooled": rows([e[2] for e in encoded], batch),
            "negative_pooled": rows([e[3] for e in encoded], batch) if cfg else None,  # type: ignore[misc]
        }

    def _pipeline_embeddings(self, fields: dict[str, Any]) -> dict[str, Any]:
        kwargs = {"prompt_embeds": fields["embeds"], "pooled_prompt_embeds": fields["pooled"]}
        if fields["negative_embeds"] is not None:
            kwargs["negative_prompt_embeds"] = fields["negative_embeds"]
            kwargs["negative_pooled_prompt_embeds"] = fields["negative_pooled"]
        return kwargs
