"""Matmul and convolution FLOPs of SD-Turbo's and SDXL-Turbo's UNets per batch of 16 at 512² (64² latents),
counted by forward hooks on a meta-device forward (no weights, no compute), split into the linears
engine/fp8.py converts and the rest. Session 21, BENCHMARKS.md.

    python benchmarks/2026-11-27-session21/flops.py
"""
import torch
from diffusers import UNet2DConditionModel
from livegen.engine import fp8
from livegen.engine.synth import unet_config
for repo, ctxdim, size in (("stabilityai/sd-turbo", 1024, 64), ("stabilityai/sdxl-turbo", 2048, 64)):
    cfg = unet_config(repo, tiny=False)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg).eval()
    conv_names = set(fp8.fp8_linears(unet))
    tot = {"lin_conv": 0, "lin_other": 0, "conv": 0}
    def hook(name):
        def h(m, inp, out):
            x = inp[0]
            if isinstance(m, torch.nn.Linear):
                f = 2 * x.numel() // x.shape[-1] * m.in_features * m.out_features
                tot["lin_conv" if name in conv_names else "lin_other"] += f
            else:
                f = 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                tot["conv"] += f
        return h
    for n, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            m.register_forward_hook(hook(n))
    kw = {}
    if "xl" in repo:
        kw["added_cond_kwargs"] = {"text_embeds": torch.zeros(16, 1280, device="meta"), "time_ids": torch.zeros(16, 6, device="meta")}
    with torch.no_grad():
        unet(torch.zeros(16, 4, size, size, device="meta"), torch.tensor([999]*16, device="meta"), torch.zeros(16, 77, ctxdim, device="meta"), **kw)
    print(repo, {k: f"{v/1e12:.2f} TFLOP" for k, v in tot.items()}, "per batch of 16")
