"""LCM-LoRA on SD 1.5 or SDXL: the base pipeline, the LoRA fused into its UNet, LCMScheduler.

After fusing, the UNet has its base shapes and costs nothing extra per step, so the SD and
SDXL adapters render it unchanged; only loading differs, which is what this file holds.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import LCMScheduler

from livegen.engine.pipelines import sd_turbo, sdxl_turbo
from livegen.engine.pipelines.base import PipelineAdapter
from livegen.engine.pipelines.common import Adapter

logger = logging.getLogger(__name__)

# The LoRA's file in both LCM-LoRA repositories (latent-consistency/lcm-lora-sdv1-5, -sdxl).
LORA_FILE = "pytorch_lora_weights.safetensors"


def lora_file(source: str) -> dict[str, str]:
    """``load_lora_weights``' file argument for ``source``. diffusers finds a hub repository's
    LoRA file by listing the repository, which it cannot do offline (``HF_HUB_OFFLINE``, where a
    server usually runs): there it refuses a hub id without ``weight_name``, cached or not. A
    local folder is searched as diffusers searches it."""
    return {} if Path(source).is_dir() else {"weight_name": LORA_FILE}


def load(
    model_id: str,
    source: str,
    lora_source: str,
    *,
    sdxl: bool,
    device: torch.device,
    dtype: torch.dtype,
    tiny_vae_source: str | None = None,
    prompt_cache_size: int = 256,
) -> Adapter:
    started = time.perf_counter()
    adapter: type[PipelineAdapter[Any]] = sdxl_turbo.SdxlAdapter if sdxl else sd_turbo.SdAdapter
    pipe = adapter.load_pipeline(source, device=device, dtype=dtype, tiny_vae_source=tiny_vae_source)
    pipe.load_lora_weights(lora_source, adapter_name="lcm", **lora_file(lora_source))
    pipe.fuse_lora(adapter_names=["lcm"], lora_scale=1.0)
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    logger.info("fused LCM-LoRA into %s in %.1f s", model_id, time.perf_counter() - started)
    return adapter(model_id, pipe, prompt_cache_size=prompt_cache_size)
