"""The bytes each GroupNorm of a UNet reads and writes, per input shape: a lower bound for the
compiled GroupNorm (+ SiLU) kernels a GPU profile shows.

Not a measurement: shapes only (meta tensors, no data, seconds on a CPU). Each GroupNorm's output
is one read of its input and one write of its output, in fp16; the statistics' own read of the
input is not counted. Session 12 compared the total with session 8's compiled batch-16 profile
(BENCHMARKS.md).

    python benchmarks/group_norm_traffic.py [--model stabilityai/sd-turbo] [--batch 16] [--size 512]
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import torch


def main() -> None:
    import meta_unet

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="stabilityai/sd-turbo")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--tb-per-s", type=float, default=3.5, help="memory bandwidth for the time column")
    args = ap.parse_args()

    unet, config = meta_unet.build(args.model)
    shapes: collections.Counter[tuple[int, ...]] = collections.Counter()

    def count(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: Any) -> None:
        shapes[tuple(inputs[0].shape[1:])] += 1

    for module in unet.modules():
        if isinstance(module, torch.nn.GroupNorm):
            module.register_forward_hook(count)
    meta_unet.call(unet, config, args.batch, args.size)

    def moved(item: tuple[tuple[int, ...], int]) -> int:
        shape, calls = item
        return 2 * 2 * args.batch * calls * int(torch.tensor(shape).prod())  # read + write, fp16

    total = 0
    print(f"{args.model} {args.size}² batch {args.batch}: GroupNorm inputs (C, H, W), calls, GB read + written")
    for item in sorted(shapes.items(), key=moved, reverse=True):
        total += moved(item)
        print(f"  {str(item[0]):18s} {item[1]:3d}  {moved(item) / 1e9:6.3f}")
    print(f"{sum(shapes.values())} GroupNorms, {total / 1e9:.2f} GB: {total / (args.tb_per_s * 1e9):.2f} ms at "
          f"{args.tb_per_s} TB/s")  # fmt: skip


if __name__ == "__main__":
    main()
