"""A model's real UNet on meta tensors (shapes and strides, no data), and one call of it at a batch
and image size: what the counting scripts beside this one (strided_elementwise.py,
group_norm_traffic.py) run under their hooks."""

from __future__ import annotations

from typing import Any

import torch


def build(model: str) -> tuple[Any, dict[str, Any]]:
    """The UNet of ``model`` (real architecture, fp16, on the meta device, in eval mode) and its config."""
    from diffusers import UNet2DConditionModel

    from livegen.engine.synth import unet_config

    config = unet_config(model, tiny=False)
    with torch.device("meta"):
        # eval(), as from_pretrained leaves it: from_config builds a module in training mode, where
        # diffusers' ResnetBlock2D copies its shortcut's input with .contiguous() (an NCHW copy of a
        # channels_last tensor) and dropout is live, neither of which the served UNet does
        unet = UNet2DConditionModel.from_config(config).half().eval()
    return unet, config


def call(unet: Any, config: dict[str, Any], batch: int, size: int) -> None:
    """One step of ``unet`` at ``batch`` images of ``size``², as the fast path calls it (t = 999)."""
    side = size // 8
    latents = torch.empty(batch, 4, side, side, device="meta", dtype=torch.half)
    embeds = torch.empty(batch, 77, config["cross_attention_dim"], device="meta", dtype=torch.half)
    added = None
    if config.get("addition_embed_type") == "text_time":
        added = {"text_embeds": torch.empty(batch, 1280, device="meta", dtype=torch.half),
                 "time_ids": torch.empty(batch, 6, device="meta", dtype=torch.half)}  # fmt: skip
    with torch.inference_mode():
        unet(latents, torch.tensor(999, device="meta"), encoder_hidden_states=embeds, added_cond_kwargs=added)
