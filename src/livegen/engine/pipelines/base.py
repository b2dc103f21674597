"""What the SD and SDXL adapters share: three diffusers pipelines over one set of modules, the
prompt-embedding cache, the checks, and one batch call that goes to the fast path or to the
plain pipeline. Each family says how it encodes a prompt and which embeddings it hands on."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Generic, Self, TypeVar

import torch
from PIL import Image

from livegen.engine import GenerationRequest, Task
from livegen.engine.fastpath import FastPath, VaeChoice
from livegen.engine.pipelines import common
from livegen.protocol.errors import InvalidInput

E = TypeVar("E", bound=tuple[Any, ...])  # one prompt's cached embeddings


class PipelineAdapter(Generic[E]):
    """One loaded checkpoint serving text-to-image, image-to-image and inpainting (the img2img and
    inpaint pipelines are ``from_pipe`` views of the text-to-image one: no second copy)."""

    i2i_pipeline: ClassVar[Any]
    inpaint_pipeline: ClassVar[Any]
    load_pipeline: ClassVar[Callable[..., Any]]  # (source, *, device, dtype, tiny_vae_source) -> pipeline
    # Does the img2img pipeline take guidance_rescale? (SD's does not, SDXL's does.)
    i2i_guidance_rescale: ClassVar[bool] = True

    def __init__(self, model_id: str, pipe: Any, *, prompt_cache_size: int) -> None:
        self.model_id = model_id
        pipe.set_progress_bar_config(disable=True)
        self.t2i = pipe
        self.i2i = self.i2i_pipeline.from_pipe(pipe, vae=pipe.vae, dtype=pipe.dtype)
        self.inpaint = self.inpaint_pipeline.from_pipe(pipe, vae=pipe.vae, dtype=pipe.dtype)
        for p in (self.i2i, self.inpaint):
            p.set_progress_bar_config(disable=True)
        self.device = pipe.device
        self.fast: FastPath | None = None
        self.default_vae: VaeChoice = "full"
        self.embeds: common.LruCache[E] = common.LruCache(prompt_cache_size)

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
    ) -> Self:
        pipe = cls.load_pipeline(source, device=device, dtype=dtype, tiny_vae_source=tiny_vae_source)
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

    # -- what each family defines ---------------------------------------------------------------

    def _encode_prompt(self, prompt: str, negative: str, cfg: bool) -> E:
        """The prompt's embeddings, positive first, then negative (None without CFG)."""
        raise NotImplementedError

    def _embeddings(self, encoded: Sequence[E], batch: Sequence[GenerationRequest], cfg: bool) -> dict[str, Any]:
        """The batch's embeddings as the fast path's ``Job`` fields (embeds, negative_embeds, ...)."""
        raise NotImplementedError

    def _pipeline_embeddings(self, fields: dict[str, Any]) -> dict[str, Any]:
        """The same as the diffusers pipelines' keyword arguments (None values left out)."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------------------

    def _encode(self, prompt: str, negative: str, cfg: bool) -> E:
        def create() -> E:
            with torch.inference_mode():
                return self._encode_prompt(prompt, negative, cfg)

        return self.embeds.get_or_create((prompt, negative, cfg), create)

    def __call__(self, batch: Sequence[GenerationRequest]) -> common.Outputs:
        first = batch[0]
        cfg = first.guidance_scale > 1.0 and self.t2i.unet.config.time_cond_proj_dim is None
        encoded = [self._encode(r.prompt, r.negative_prompt, cfg) for r in batch]
        fields = self._embeddings(encoded, batch, cfg)
        if self.fast is not None and common.fast_eligible(self.fast, batch):
            job = common.fast_job(self.fast, batch, self.default_vae, **fields)
            return common.render_fast(self.fast, job, batch)
        kwargs: dict[str, Any] = {
            **self._pipeline_embeddings(fields),
            "num_inference_steps": first.num_inference_steps,
            "guidance_scale": first.guidance_scale,
            "generator": common.generators(self.device, batch),
            "output_type": "pil",
            "callback_on_step_end": common.interrupt_callback(batch),
        }
        if first.guidance_rescale:
            kwargs["guidance_rescale"] = first.guidance_rescale
        with torch.inference_mode():
            images = self._run(first.task, batch, kwargs)
        return common.split_outputs(images, batch)

    def _run(self, task: Task, batch: Sequence[GenerationRequest], kwargs: dict[str, Any]) -> list[Image.Image]:
        first = batch[0]
        if task is Task.TEXT_TO_IMAGE:
            out = self.t2i(height=first.height, width=first.width, **kwargs)
        elif task is Task.IMAGE_TO_IMAGE:
            if not self.i2i_guidance_rescale:
                kwargs.pop("guidance_rescale", None)
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
