"""How far engine/fp8.py's float8 linears move the real SD-Turbo UNet's prediction (random
weights, fp32, on a CPU: torch's CPU _scaled_mm computes the same per-row product as a GPU's),
and how many layers and parameters it converts in SD-Turbo and SDXL-Turbo. Session 21, BENCHMARKS.md.

    python benchmarks/2026-11-27-session21/unet_error.py
"""

import copy
import time

import torch
from diffusers import UNet2DConditionModel

from livegen.engine import fp8
from livegen.engine.synth import unet_config

torch.manual_seed(0)
for repo in ("stabilityai/sd-turbo", "stabilityai/sdxl-turbo"):
    cfg = unet_config(repo, tiny=False)
    unet = UNet2DConditionModel.from_config(cfg).eval()
    names = fp8.fp8_linears(unet)
    linears = [m for m in unet.modules() if isinstance(m, torch.nn.Linear)]
    converted = sum(unet.get_submodule(n).weight.numel() for n in names)
    print(
        f"{repo}: {len(names)} of {len(linears)} linears converted, {converted / 1e6:.0f} M parameters of the "
        f"linears' {sum(m.weight.numel() for m in linears) / 1e6:.0f} M, the UNet's "
        f"{sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M"
    )
    if "sdxl" in repo:
        break  # SDXL's forward on this CPU is slow; its count is what the table needs
    x, t, ctx = torch.randn(1, 4, 32, 32), torch.tensor([999]), torch.randn(1, 77, cfg["cross_attention_dim"])
    with torch.no_grad():
        reference = unet(x, t, ctx).sample
        quantized = copy.deepcopy(unet)
        fp8.convert(quantized, fp8.Recipe(True, None))
        start = time.perf_counter()
        out = quantized(x, t, ctx).sample
    error = (out - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0)
    print(f"  noise prediction at t=999, 32x32 latents: {error.item():.2%} RMS from fp32, cosine {cosine.item():.4f}")
