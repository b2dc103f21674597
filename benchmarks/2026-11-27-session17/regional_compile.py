"""Cold torch.compile of SD-Turbo's UNet, whole against regional (BENCHMARKS.md, session 17).

Real architecture (or tiny), random weights, fp32 on this CPU (inductor's C++ backend), a fresh
inductor cache each run. ``regional``: each BasicTransformerBlock and ResnetBlock2D compiled on
its own (diffusers' ``compile_repeated_blocks`` idea), the rest eager.

    python regional_compile.py whole real 256
    python regional_compile.py regional real 256
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp()  # cold: before torch's compile stack reads it

import torch  # noqa: E402
import torch._dynamo.config as dynamo_config  # noqa: E402
import torch._dynamo.utils as dynamo_utils  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from livegen.engine import synth  # noqa: E402

REGIONS = {"BasicTransformerBlock", "ResnetBlock2D"}

mode, size, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)
unet = UNet2DConditionModel.from_config(synth.unet_config("stabilityai/sd-turbo", tiny=size == "tiny")).eval()
x = torch.randn(1, 4, side // 8, side // 8)
embeds = torch.randn(1, 77, unet.config.cross_attention_dim)
t = torch.tensor(999)
dynamo_config.recompile_limit = 256  # as the fast path: each block shape is a recompile of the same code
with torch.inference_mode():
    started = time.perf_counter()
    reference = unet(x, t, encoder_hidden_states=embeds).sample
    eager = time.perf_counter() - started
    if mode == "whole":
        forward = torch.compile(unet.forward, dynamic=False)
    else:
        regions = [m for m in unet.modules() if type(m).__name__ in REGIONS]
        for m in regions:
            m.compile(dynamic=False)
        print("regions", len(regions))
        forward = unet.forward
    started = time.perf_counter()
    forward(x, t, encoder_hidden_states=embeds)
    first = time.perf_counter() - started
    started = time.perf_counter()
    out = forward(x, t, encoder_hidden_states=embeds).sample
    second = time.perf_counter() - started
print(
    f"{mode}: eager {eager * 1e3:.0f} ms, first call {first:.1f} s, second {second * 1e3:.0f} ms, "
    f"max diff {(out - reference).abs().max().item():.2e}, graphs {dynamo_utils.counters['stats']['unique_graphs']}"
)
