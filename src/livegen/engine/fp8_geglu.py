"""Float8's GEGLU feed-forwards in one Triton kernel per call: ``value * gelu(gate)`` and its per-row
float8 quantization, each row read once (``LIVEGEN_FP8_GEGLU_KERNEL``, with ``LIVEGEN_FP8_LINEAR``).

Why: with float8 linears (engine/fp8.py), the feed-forward's output layer quantizes the GEGLU's
output per row. Inductor fuses GEGLU and quantization into one kernel, but as a looped reduction
that reads and computes each row twice, because rows of 1280 and 2560 values are over the 1024 of
its persistent reductions. On an H200 the compiled SD-Turbo batch 16 spent 3.29 ms in those two
kernels at 0.95 TB/s, which took back what float8's matmuls gained (BENCHMARKS.md, session 22).
Here one program holds a whole row (up to 8192 values) in registers: it loads both halves once,
computes the GELU (exact, erf), the product and the row's largest magnitude, and stores the float8
row and its scale.

The arithmetic is ``fp8.geglu_quantize_rows``': the GELU and the product rounded to the input's
16-bit type as PyTorch computes them, then the row scaled so its largest magnitude is ~440. The one
difference: the scale is applied in float32 where the PyTorch ops apply it in 16 bits, so a value
may round to the neighbouring float8 number (``within_a_step`` bounds it, at load and in tests/gpu).

Registered as a ``torch.library.triton_op``: torch.compile puts the kernel into its graph as it is,
CUDA graphs capture its launch. Imported only where Triton is (a CPU build of torch has none);
``check`` says whether it can serve.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from livegen.engine import fp8

MAX_WIDTH = 8192  # one row in registers: 8 warps x 32 threads x 32 values


@triton.jit
def _geglu_quantize_kernel(
    src, dst, scales, width, src_stride, dst_stride,
    TARGET: tl.constexpr, FLOOR: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    start = src + row * src_stride
    value = tl.load(start + cols, mask=mask, other=0.0)
    gate = tl.load(start + width + cols, mask=mask, other=0.0).to(tl.float32)
    # F.gelu(gate) in 16 bits (computed in float32, rounded), then the product in 16 bits
    gelu = (0.5 * gate * (1.0 + tl.math.erf(gate * 0.7071067811865476))).to(value.dtype)
    out = (value * gelu).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(out), axis=0), FLOOR)
    quantized = (out * (TARGET / amax)).to(tl.float8e4nv)
    tl.store(dst + row * dst_stride + cols, quantized, mask=mask)
    tl.store(scales + row, amax / TARGET)


@triton_op("livegen::geglu_quantize_rows", mutates_args=())
def geglu_quantize_rows(projected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8.geglu_quantize_rows`` as one kernel: ``projected`` is 2-D, each row a GEGLU
    projection's output (value half, then gate half), rows contiguous."""
    rows, twice = projected.shape
    width = twice // 2
    quantized = torch.empty((rows, width), device=projected.device, dtype=fp8.FP8)
    scales = torch.empty((rows, 1), device=projected.device, dtype=torch.float32)
    block = triton.next_power_of_2(width)
    wrap_triton(_geglu_quantize_kernel)[(rows,)](
        projected, quantized, scales, width, projected.stride(0), quantized.stride(0),
        TARGET=fp8.TARGET, FLOOR=fp8.FLOOR, BLOCK=block, num_warps=max(1, min(8, block // 256)),
    )  # fmt: skip
    return quantized, scales


def quantize(projected: torch.Tensor) -> fp8.Quantized:
    """``fp8.geglu_quantize_rows`` by the kernel where a row fits it (``MAX_WIDTH``), else by the
    PyTorch ops: what ``fp8.fuse_geglu_quantization`` is given on CUDA."""
    if projected.shape[-1] // 2 <= MAX_WIDTH:
        return geglu_quantize_rows(projected)
    return fp8.geglu_quantize_rows(projected)


def check(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot serve here (None: it can): float16 rows on CUDA only (Triton's
    interpreter, the CPU stand-in, rounds float8 differently, and bfloat16 is not checked), and it
    must compile and agree with the PyTorch ops on a few rows at load."""
    if device.type != "cuda" or dtype != torch.float16:
        return f"it runs float16 rows on CUDA, not {str(dtype).removeprefix('torch.')} on {device.type}"
    try:
        gen = torch.Generator(device).manual_seed(0)  # not the global generator: load leaves it as it was
        projected = torch.randn(64, 2 * 1280, device=device, generator=gen).mul(3).to(dtype)
        quantized, scales = geglu_quantize_rows(projected)
        expected, expected_scales = fp8.geglu_quantize_rows(projected)
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - any failure to build or run it: the PyTorch ops instead
        return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
    if not torch.allclose(scales, expected_scales, rtol=1e-3) or not within_a_step(quantized, expected):
        return "its results differ from the PyTorch ops' by more than one float8 step"
    return None


def within_a_step(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether two float8 tensors differ by at most one float8 step anywhere. The kernel applies the
    scale in float32, the PyTorch ops in 16 bits: a value may round once more there (e4m3's step at
    a magnitude in [2^k, 2^(k+1)) is 2^(k-3), its subnormals' 2^-9)."""
    a, b = got.float(), expected.float()
    return bool(((a - b).abs() <= torch.maximum(a.abs(), b.abs()) / 8 + 2.0**-9).all())
