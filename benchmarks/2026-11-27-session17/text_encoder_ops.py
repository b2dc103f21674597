"""Aten ops per prompt of the real text encoders, and of SD-Turbo's UNet and TAESD's decoder at
512² batch 1 (BENCHMARKS.md, session 17): random weights, this CPU, a dispatch-mode counter. On a
GPU each op is at least one kernel launch, which is what an eager encoder costs per new prompt.

    python text_encoder_ops.py
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import AutoencoderTiny, UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode

from livegen.engine import synth


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def count(fn: Callable[[], Any]) -> int:
    with torch.inference_mode(), Count() as counter:
        fn()
    return counter.ops


def main() -> None:
    for repo in ("stabilityai/sd-turbo", "stabilityai/sdxl-turbo"):
        for name, (cls, cfg) in synth._model_configs(repo, tiny=False).items():
            if name.startswith("text_encoder"):
                encoder = synth._instantiate(cls, cfg).eval()
                ids = torch.randint(0, 49407, (1, 77))
                ops = count(lambda encoder=encoder, ids=ids: encoder(ids))
                print(f"{repo} {name} ({cfg['num_hidden_layers']} layers): {ops} aten ops")
    unet = UNet2DConditionModel.from_config(synth.unet_config("stabilityai/sd-turbo", tiny=False)).eval()
    latents, embeds = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 1024)
    ops = count(lambda: unet(latents, torch.tensor(999), encoder_hidden_states=embeds))
    print(f"SD-Turbo UNet, 512² batch 1: {ops} aten ops")
    taesd = AutoencoderTiny.from_config(synth._taesd_config(tiny=False)).eval()
    print(f"TAESD decoder, 512² batch 1: {count(lambda: taesd.decode(torch.randn(1, 4, 64, 64)))} aten ops")


if __name__ == "__main__":
    main()
