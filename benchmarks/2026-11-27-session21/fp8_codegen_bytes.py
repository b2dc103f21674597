"""Bytes the compiled UNet's Triton kernels move, with and without float8 linears, read from the
wrapper inductor writes (benchmarks/inductor_codegen.py, no GPU; livegen.bench.kernel_access does the
reading). Splits the float8 wrapper's kernels into those that quantize a linear's input (their names
carry ``linalg_vector_norm``: the row maxima) and the rest, and lists the quantizing ones by what they
fuse. Session 21, BENCHMARKS.md.

    PYTHONPATH=src /tmp/cuda-torch/bin/python benchmarks/inductor_codegen.py --batch 16 --dynamic-batch \\
        --keep-cl [--fp8] [--fuse-qkv] --out /tmp/unet[-fp8][-qkv].py
    python benchmarks/2026-11-27-session21/fp8_codegen_bytes.py /tmp/unet.py /tmp/unet-fp8.py ...
"""

import re
import sys
from collections import defaultdict

from livegen.bench.kernel_access import launches

SIZES = {f"s{i}": 16 for i in range(200)}  # the dynamic batch at 16


def main(paths: list[str]) -> None:
    for path in paths:
        with open(path) as f:
            source = f.read()
        groups: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0, 0.0])
        kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for launch in launches(source, SIZES):
            quantizing = "vector_norm" in launch.kernel
            g = groups["quantizing" if quantizing else "other"]
            g[0] += 1
            for a in launch.accesses:
                if a.full_size and a.efficiency:
                    moved = launch.iterations * a.element_bytes
                    g[1] += moved
                    g[2 if a.kind == "load" else 3] += moved
            if quantizing:
                looped = "looped" if launch.kernel.startswith("triton_red") else "persistent"
                what = re.sub(r"^triton_(red|per)_fused_|_\d+$", "", launch.kernel)
                k = kinds[f"{looped:10s} {what[:100]}"]
                k[0] += 1
                k[1] += launch.bytes()[0]
        total = sum(g[1] for g in groups.values())
        print(f"{path}: {sum(g[0] for g in groups.values()):.0f} launches, {total / 1e9:.2f} GB moved")
        for name, (n, moved, loads, stores) in groups.items():
            print(f"  {name:10s} {n:4.0f} launches {moved / 1e9:6.2f} GB (loads {loads / 1e9:.2f}, stores {stores / 1e9:.2f})")
        for name, (n, moved) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
            print(f"    {moved / 1e9:6.2f} GB {n:3.0f}x {name}")


if __name__ == "__main__":
    main(sys.argv[1:])
