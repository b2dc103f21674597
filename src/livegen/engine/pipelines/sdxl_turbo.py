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
from PIL import Image

from livegen.engine import GenerationRequest, Task
from livegen.engine.fastpath import FastPath, VaeChoice
from livegen.engine.pipelines import common
from livegen.protocol.errors import InvalidInput

logger = logging.getLogger(__name__)

# (prompt_embeds, negative_prompt_embeds, pooled, negative_pooled)
XlEmbeds = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


class SdxlAdapter:
    """An SDXL checkpoint ready to render batches."""

    def __init__(self, model_id: str, pipe: StableDiffusionXLPipeline, *, prompt_cache_size: int) -> None:
        self.model_id = model_id
        pipe.set_progress_bar_config(disable=True)
        self.t2i = pipe
        self.i2i = StableDiffusionXLImg2ImgPipeline.from_pipe(pipe, vae=pipe.vae, dtype=pipe.dtype)
        self.inpaint = StableDiffusionXLInpaintPipeline.from_pipe(pipe, vae=pipe.vae, dtype=pipe.dtype)
        for p in (self.i2i, self.inpaint):
            p.set_progress_bar_config(disable=True)
        self.device = pipe.device
        self.fast: FastPath | None = None
        self.default_vae: VaeChoice = "full"
        self.embeds: common.LruCache[XlEmbeds] = common.LruCache(prompt_cache_size)

    @classmethod
    def load(
        cls,
        model_id: str,
        source: str,
        *,
        device: torch.device,
        dtype: torch.dtype,
        tiny_vae_source: str | None = None,
        prompt_cache_size: int = 256,
    ) -> SdxlAdapter:
        pipe = load_pipeline(source, device=device, dtype=dtype, tiny_vae_source=tiny_vae_source)
        return cls(model_id, pipe, prompt_cache_size=prompt_cache_size)

    def enable_fast(self, fast: FastPath, default_vae: VaeChoice) -> None:
        """Render eligible batches on the fast path (see engine/fastpath.py) from now on."""
        self.fast, self.default_vae = fast, default_vae

    def check_inputs(self, request: GenerationRequest) -> None:
        common.check_common(request, vae_scale_factor=self.t2i.vae_scale_factor)
        if request.guidance_rescale and request.guidance_scale <= 1:
            raise InvalidInput(
                "guidance_rescale needs guidance_scale > 1 (classifier-free guidance)",
                loc=("body", "guidance_rescale"),
            )

    def _encode(self, prompt: str, negative: str, cfg: bool) -> XlEmbeds:
        def create() -> XlEmbeds:
            with torch.inference_mode():
                pe, npe, ppe, nppe = self.t2i.encode_prompt(
                    prompt,
                    device=self.device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=cfg,
                    negative_prompt=negative or None,
                )
            return pe, npe, ppe, nppe

        return self.embeds.get_or_create((prompt, negative, cfg), create)

    def __call__(self, batch: Sequence[GenerationRequest]) -> common.Outputs:
        first = batch[0]
        cfg = first.guidance_scale > 1.0 and self.t2i.unet.config.time_cond_proj_dim is None
        encoded = [self._encode(r.prompt, r.negative_prompt, cfg) for r in batch]
        if self.fast is not None and common.fast_eligible(self.fast, batch):
            return self._call_fast(batch, encoded, cfg)
        kwargs: dict[str, Any] = {
            "prompt_embeds": common.repeat_rows([e[0] for e in encoded], batch),
            "pooled_prompt_embeds": common.repeat_rows([e[2] for e in encoded], batch),
            "num_inference_steps": first.num_inference_steps,
            "guidance_scale": first.guidance_scale,
            "generator": common.generators(self.device, batch),
            "output_type": "pil",
            "callback_on_step_end": common.interrupt_callback(batch),
        }
        if cfg:
            kwargs["negative_prompt_embeds"] = common.repeat_rows([e[1] for e in encoded], batch)  # type: ignore[misc]
            kwargs["negative_pooled_prompt_embeds"] = common.repeat_rows([e[3] for e in encoded], batch)  # type: ignore[misc]
        if first.guidance_rescale:
            kwargs["guidance_rescale"] = first.guidance_rescale
        with torch.inference_mode():
            images = self._run(first.task, batch, kwargs)
        return common.split_outputs(images, batch)

    def _call_fast(self, batch: Sequence[GenerationRequest], encoded: list[XlEmbeds], cfg: bool) -> common.Outputs:
        assert self.fast is not None
        rows = common.repeat_rows
        job = common.fast_job(
            self.fast,
            batch,
            self.default_vae,
            embeds=rows([e[0] for e in encoded], batch),
            negative_embeds=rows([e[1] for e in encoded], batch) if cfg else None,  # type: ignore[misc]
            pooled=rows([e[2] for e in encoded], batch),
            negative_pooled=rows([e[3] for e in encoded], batch) if cfg else None,  # type: ignore[misc]
        )
        return common.render_fast(self.fast, job, batch)

    def _run(self, task: Task, batch: Sequence[GenerationRequest], kwargs: dict[str, Any]) -> list[Image.Image]:
        first = batch[0]
        if task is Task.TEXT_TO_IMAGE:
            out = self.t2i(height=first.height, width=first.width, **kwargs)
        elif task is Task.IMAGE_TO_IMAGE:
            out = self.i2i(
                image=common.repeat_images([r.image for r in batch], batch), strength=first.strength, **kwargs
            )
        else:
            out = self.inpaint(
                image=common.repeat_images([r.image for r in batch], batch),
                mask_image=common.repeat_images([r.mask for r in batch], batch),
                strength=first.strength,
                height=first.height,
                width=first.width,
                **kwargs,
            )
        return list(out.images)


def load_pipeline(
    source: str, *, device: torch.device, dtype: torch.dtype, tiny_vae_source: str | None
) -> StableDiffusionXLPipeline:
    """``from_pretrained`` by hub id or folder. No invisible watermark (it needs another package)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(source, dtype=dtype, add_watermarker=False)
    if tiny_vae_source is not None:
        pipe.vae = AutoencoderTiny.from_pretrained(tiny_vae_source, dtype=dtype)
    return pipe.to(device)
