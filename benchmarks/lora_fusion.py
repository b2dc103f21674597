"""LCM-LoRA fused into the UNet or not: one UNet call's time at 512², batch 1 (and 4), on the device.

livegen loads LCM-LoRA with `fuse_lora` + `unload_lora_weights` (engine/pipelines/lcm.py): the UNet
it runs is the base architecture with merged weights. Unfused, as `load_lora_weights` alone leaves
it, peft's LoRA layers wrap 278 of SD 1.5's layers (788 of SDXL's) and each adds its own two small
matmuls or convolutions, a scale and an add: counted on the meta device, 834 -> 2224 ops that
launch and 803 -> 898 GFLOP per SD 1.5 call (benchmarks/2026-11-28-session23/lora_fusion_ops.py).
This times both, eager and as a CUDA graph (the fast path's way), with random weights at the real
architecture (or the tiny one on a CPU, to check the script). No engine, no server: the UNet alone,
its inputs from meta_unet.inputs, graphed by the fast path's own _Graph (inputs copied in, replay).

    python benchmarks/lora_fusion.py [--model sd15|sdxl] [--batch 1,4] [--iters 20]
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import meta_unet  # benchmarks/meta_unet.py, beside this file
import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from livegen.engine import synth
from livegen.engine.fastpath import _Graph

MODELS = {"sd15": synth.LCM_LORA_SD15, "sdxl": synth.LCM_LORA_SDXL}


def _time(fn: Callable[[], Any], iters: int, device: torch.device) -> float:
    """Median ms per call of ``fn`` (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="sd15")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    tiny = not cuda  # a CPU only checks the script
    config = synth.unet_config(MODELS[args.model], tiny=tiny)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).to(device, dtype).eval()
    if cuda:
        unet = unet.to(memory_format=torch.channels_last)
    size = 64 if tiny else args.size
    batches = [int(b) for b in args.batch.split(",")]
    rows: list[dict[str, Any]] = []

    def forward(**kw: torch.Tensor) -> torch.Tensor:
        """The UNet over flat tensors (the fast path's graphs take a flat dict): SDXL's two added
        conditions travel as their own keys."""
        added = {k: kw.pop(k) for k in ("text_embeds", "time_ids") if k in kw}
        return unet(**kw, added_cond_kwargs=added or None, return_dict=False)[0]

    def run(label: str) -> None:
        for batch in batches:
            kw = meta_unet.inputs(config, batch, size, device, dtype)
            flat = {**{k: v for k, v in kw.items() if k != "added_cond_kwargs"}, **kw.get("added_cond_kwargs", {})}

            def call(flat: dict[str, torch.Tensor] = flat) -> Any:
                with torch.inference_mode():
                    return forward(**flat)

            row: dict[str, Any] = {"model": args.model, "unet": label, "batch": batch,
                                   "eager_ms": round(_time(call, args.iters, device), 3)}  # fmt: skip
            if cuda:  # as the fast path replays a shape: its _Graph, inputs copied in, then the replay
                replay = functools.partial(_Graph(forward, flat, None, 2).replay, flat)
                with torch.inference_mode():
                    row["graph_ms"] = round(_time(replay, args.iters, device), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)

    run("fused")  # the base architecture: what a fused LoRA leaves
    rank = 4 if tiny else 64
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=synth._LCM_TARGETS, init_lora_weights=False))
    unet.to(device, dtype)
    layers = sum(1 for name, _ in unet.named_modules() if name.endswith(".lora_A"))
    print(f"peft LoRA rank {rank} on {layers} layers", flush=True)
    run("unfused")
    by = {(r["unet"], r["batch"]): r for r in rows}
    for batch in batches:
        f, u = by[("fused", batch)], by[("unfused", batch)]
        how = [k for k in ("eager_ms", "graph_ms") if k in f]
        print(f"{args.model} batch {batch}: " + ", ".join(
            f"{k[:-3]} {u[k]:.2f} unfused -> {f[k]:.2f} fused ms ({u[k] / f[k]:.2f}x)" for k in how))  # fmt: skip


if __name__ == "__main__":
    main()
