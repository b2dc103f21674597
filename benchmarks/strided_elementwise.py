"""Which elementwise ops of the fast path's channels_last UNet run on strided (non-dense) tensors?

Not a measurement: shapes and strides only (meta tensors, no data, a few seconds on a CPU). On
CUDA, PyTorch runs an elementwise op whose operands cannot be viewed as one dense block with a
generic kernel (``elementwise_kernel`` with an offset calculator: one fp16 element per load, no
vectorized loads), much slower per byte than its vectorized kernels. Session 6's H100 profile of
the CUDA-graph UNet at batch 16 had two such kernels on top, 12.1 and 9.0 ms of 69.7 ms. This
lists, for SD-Turbo's real UNet at 512², the ops whose operands are strided and the bytes they
move, so a change can be aimed at them before a GPU is at hand.

    python benchmarks/strided_elementwise.py --batch 16                 # as the fast path serves
    python benchmarks/strided_elementwise.py --batch 16 --split-geglu   # with LIVEGEN_SPLIT_GEGLU

CUDA's GroupNorm returns NCHW whatever its input (pytorch/pytorch#111824); the meta kernel keeps
the input's layout, so the script makes GroupNorm's output contiguous as CUDA does
(``--nhwc-gn``: as with LIVEGEN_NHWC_GROUP_NORM, layout kept). Layout copies made inside cuDNN's
convolutions are not visible here.
"""

from __future__ import annotations

import argparse
import collections
import traceback
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

COPIES = (torch.ops.aten.copy_.default, torch.ops.aten.clone.default, torch.ops.aten._to_copy.default)


def dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


def same_layout(t: torch.Tensor, out: torch.Tensor) -> bool:
    if t.is_contiguous() and out.is_contiguous():
        return True
    cl = torch.channels_last
    return t.dim() == 4 and t.is_contiguous(memory_format=cl) and out.is_contiguous(memory_format=cl)


class StridedOps(TorchDispatchMode):
    """Bytes moved by elementwise ops (and copies) whose operands are not laid out like their output."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.calls: collections.Counter[tuple[str, str]] = collections.Counter()
        self.strides: dict[tuple[str, str], list[tuple[int, ...]]] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not isinstance(out, torch.Tensor) or not (torch.Tag.pointwise in func.tags or func in COPIES):
            return out
        operands = [a for a in args if isinstance(a, torch.Tensor) and a.numel() == out.numel()]
        if all(same_layout(t, out) for t in operands) and dense(out):
            return out
        where = next(
            (f"{f.filename.split('site-packages/')[-1]}:{f.lineno}" for f in reversed(traceback.extract_stack())
             if "diffusers/" in f.filename or "livegen/" in f.filename),
            "?",
        )  # fmt: skip
        key = (func.__name__, where)
        self.bytes[key] += sum(t.numel() * t.element_size() for t in operands) + out.numel() * out.element_size()
        self.calls[key] += 1
        self.strides[key] = [tuple(t.stride()) for t in operands][:2] + [tuple(out.stride())]
        return out


def main() -> None:
    import meta_unet

    from livegen.engine.fastpath import split_geglu

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="stabilityai/sd-turbo")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--nhwc-gn", action="store_true")
    ap.add_argument("--split-geglu", action="store_true")
    args = ap.parse_args()

    unet, config = meta_unet.build(args.model)
    unet = unet.to(memory_format=torch.channels_last)
    if args.split_geglu:
        split_geglu(unet)
    real_group_norm = torch.nn.functional.group_norm

    def cuda_group_norm(x: torch.Tensor, *a: Any, **k: Any) -> torch.Tensor:
        out = real_group_norm(x, *a, **k)
        return out if args.nhwc_gn else out.contiguous()

    torch.nn.functional.group_norm = cuda_group_norm  # type: ignore[assignment]
    mode = StridedOps()
    with mode:
        meta_unet.call(unet, config, args.batch, args.size)
    total = sum(mode.bytes.values())
    flags = " ".join(f for f, on in (("--nhwc-gn", args.nhwc_gn), ("--split-geglu", args.split_geglu)) if on)
    print(f"{args.model} {args.size}² batch {args.batch} {flags}: {total / 1e9:.2f} GB moved by "
          f"{sum(mode.calls.values())} strided elementwise calls")  # fmt: skip
    for key, n in mode.bytes.most_common(12):
        print(f"  {n / 1e9:7.3f} GB {mode.calls[key]:4d} calls  {key[0]:24s} {key[1]:48s} strides {mode.strides[key]}")


if __name__ == "__main__":
    main()
