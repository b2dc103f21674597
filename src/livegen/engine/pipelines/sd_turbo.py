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
from PIL import Image

from livegen.engine import GenerationRequest, Task
from livegen.engine.fastpath import FastPath, VaeChoice
from livegen.engine.pipelines import common
from livegen.protocol.errors import InvalidInput

logger = logging.getLogger(__name__)

Embeds = tuple[torch.Tensor, torch.Tensor | None]


class SdAdapter:
    """A Stable Diffusion (non-XL) checkpoint ready to render batches."""

    def __init__(self, model_id: str, pipe: StableDiffusionPipeline, *, prompt_cache_size: int) -> None:
        self.model_id = model_id
        pipe.set_progress_bar_config(disable=True)
        self.t2i = pipe
        self.i2i = StableDiffusionImg2ImgPipeline.from_pipe(pipe, vae=pipe.vae, dtype=pipe.dtype)
        self.inpaint = StableDiffusionInpaintPipeline.from_pipe(pipe, vae=pipe.vae, dtype=pipe.dtype)
        for p in (self.i2i, self.inpaint):
            p.set_progress_bar_config(disable=True)
        self.device = pipe.device
        self.fast: FastPath | None = None
        self.default_vae: VaeChoice = "full"
        self.embeds: common.LruCache[Embeds] = common.LruCache(prompt_cache_size)

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
    ) -> SdAdapter:
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

    def _encode(self, prompt: str, negative: str, cfg: bool) -> Embeds:
        def create() -> Embeds:
            with torch.inference_mode():
                pe, npe = self.t2i.encode_prompt(prompt, self.device, 1, cfg, negative_prompt=negative or None)
            return pe, npe

        return self.embeds.get_or_create((prompt, negative, cfg), create)

    def __call__(self, batch: Sequence[GenerationRequest]) -> common.Outputs:
        first = batch[0]
        cfg = first.guidance_scale > 1.0 and self.t2i.unet.config.time_cond_proj_dim is None
        encoded = [self._encode(r.prompt, r.negative_prompt, cfg) for r in batch]
        if self.fast is not None and common.fast_eligible(self.fast, batch):
            return self._call_fast(batch, encoded, cfg)
        kwargs: dict[str, Any] = {
            "prompt_embeds": common.repeat_rows([e[0] for e in encoded], batch),
            "num_inference_steps": first.num_inference_steps,
            "guidance_scale": first.guidance_scale,
            "generator": common.generators(self.device, batch),
            "output_type": "pil",
            "callback_on_step_end": common.interrupt_callback(batch),
        }
        if cfg:
            kwargs["negative_prompt_embeds"] = common.repeat_rows([e[1] for e in encoded], batch)  # type: ignore[misc]
        if first.guidance_rescale:
            kwargs["guidance_rescale"] = first.guidance_rescale
        with torch.inference_mode():
            images = self._run(first.task, batch, kwargs)
        return common.split_outputs(images, batch)

    def _call_fast(self, batch: Sequence[GenerationRequest], encoded: list[Embeds], cfg: bool) -> common.Outputs:
        assert self.fast is not None
        job = common.fast_job(
            self.fast,
            batch,
            self.default_vae,
            embeds=common.repeat_rows([e[0] for e in encoded], batch),
            negative_embeds=common.repeat_rows([e[1] for e in encoded], batch) if cfg else None,  # type: ignore[misc]
        )
        return common.render_fast(self.fast, job, batch)

    def _run(self, task: Task, batch: Sequence[GenerationRequest], kwargs: dict[str, Any]) -> list[Image.Image]:
        first = batch[0]
        if task is Task.TEXT_TO_IMAGE:
            out = self.t2i(height=first.height, width=first.width, **kwargs)
        elif task is Task.IMAGE_TO_IMAGE:
            kwargs.pop("guidance_rescale", None)  # not a parameter of the img2img pipeline
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
) -> StableDiffusionPipeline:
    """``from_pretrained`` by hub id or folder; the safety checker is not loaded (see /readyz)."""
    pipe = StableDiffusionPipeline.from_pretrained(
        source, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    if tiny_vae_source is not None:
        pipe.vae = AutoencoderTiny.from_pretrained(tiny_vae_source, dtype=dtype)
    return pipe.to(device)
