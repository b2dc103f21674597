"""What fusing LCM-LoRA into the UNet saves (BENCHMARKS.md, session 23): aten ops and FLOPs of one
UNet call at 512², batch 1, for SD 1.5 and SDXL with the LCM-LoRA unfused (peft's LoRA layers, as
`load_lora_weights` leaves them) and fused (`fuse_lora` + `unload_lora_weights`, as
livegen.engine.pipelines.lcm loads it: the plain UNet). Real architectures on the meta device (no
data, no arithmetic), counted by a dispatch mode and torch's FLOP counter. On a GPU each aten op is
at most one kernel, so the difference is what an unfused UNet would launch more per step.

    PYTHONPATH=src python benchmarks/2026-11-28-session23/lora_fusion_ops.py
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import meta_unet  # noqa: E402  (benchmarks/meta_unet.py)

from livegen.engine import synth  # noqa: E402


class Count(TorchDispatchMode):
    """Aten ops by name, views included (they launch nothing; counted apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice", "select",
         "split", "chunk", "alias", "detach", "reshape", "as_strided", "unbind", "split_with_sizes"}  # fmt: skip


def measure(unet: Any, config: dict[str, Any]) -> tuple[int, int, float, Counter[str]]:
    counter = Count()
    flops = FlopCounterMode(display=False)
    with flops, counter:
        meta_unet.call(unet, config, 1, 512)
    ops = sum(counter.ops.values())
    launching = sum(n for name, n in counter.ops.items() if name not in VIEWS)
    return ops, launching, flops.get_total_flops() / 1e9, counter.ops


def main() -> None:
    for base in (synth.LCM_LORA_SD15, synth.LCM_LORA_SDXL):  # unet_config gives their base UNets
        unet, config = meta_unet.build(base)
        fused = measure(unet, config)
        with torch.device("meta"):
            unet.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=synth._LCM_TARGETS))
        unet.half().eval()
        adapted = sum(1 for name, _ in unet.named_modules() if name.endswith(".lora_A"))
        unfused = measure(unet, config)
        print(f"{base} UNet, 512² batch 1, LCM-LoRA rank 64 on {adapted} layers:")
        for label, (ops, launching, gflop, _) in (("fused (livegen)", fused), ("unfused (peft layers)", unfused)):
            print(f"  {label:22s} {ops:5d} aten ops, {launching:5d} not views, {gflop:7.1f} GFLOP")
        more = unfused[3] - fused[3]
        print("  more when unfused, by op:", ", ".join(f"{k} {v}" for k, v in more.most_common(8)))


if __name__ == "__main__":
    main()
