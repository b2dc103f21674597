"""A model's real UNet on meta tensors (shapes and strides, no data), and one call of it at a batch
and image size: what the counting scripts beside this one (strided_elementwise.py,
group_norm_traffic.py) run under their hooks. ``inputs`` also serves lora_fusion.py, on a device."""

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


def inputs(
    config: dict[str, Any], batch: int, size: int, device: str | torch.device = "meta", dtype: torch.dtype = torch.half
) -> dict[str, Any]:
    """One step's keyword arguments for a UNet of ``config`` at ``batch`` images of ``size``², as
    the fast path calls it (t = 999): random values off the meta device."""

    def tensor(*shape: int) -> torch.Tensor:
        empty = torch.empty(*shape, device=device, dtype=dtype)
        return empty if empty.is_meta else empty.normal_()

    side = size // 8
    kw: dict[str, Any] = {
        "sample": tensor(batch, 4, side, side),
        "timestep": torch.tensor(999, device=device),
        "encoder_hidden_states": tensor(batch, 77, config["cross_attention_dim"]),
    }
    if config.get("addition_embed_type") == "text_time":  # SDXL: pooled text embeds and the 6 time ids
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        kw["added_cond_kwargs"] = {"text_embeds": tensor(batch, pooled), "time_ids": tensor(batch, 6)}
    return kw


def call(unet: Any, config: dict[str, Any], batch: int, size: int) -> None:
    """One step of ``unet`` at ``batch`` images of ``size``², as the fast path calls it (t = 999)."""
    with torch.inference_mode():
        unet(**inputs(config, batch, size))
