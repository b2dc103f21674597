"""The UNet's transformer matmuls in 8-bit floating point (``LIVEGEN_FP8_LINEAR``, off by default).

Why: on an H200 the compiled SD-Turbo UNet at batch 16 spends 23 % of its device time in cuBLAS's
fp16 matmuls (8.1 of 35.5 ms, BENCHMARKS.md session 20), and Hopper's tensor cores run float8
matmuls at twice the fp16 rate. The convolutions (42 %) have no float8 kernels in PyTorch.

What: every ``nn.Linear`` inside the UNet's ``Transformer2DModel``s (attention projections, the
GEGLU feed-forwards, ``proj_in``/``proj_out`` where they are linear) becomes an ``Fp8Linear``:

- its weight in ``float8_e4m3fn`` with one float32 scale per output channel (the row's largest
  magnitude maps to 448, e4m3's largest finite value), quantized once at load;
- each call quantizes its input the same way per row (per token), with the scale computed on the
  device from the row itself (no host sync: CUDA graphs capture it), and multiplies with
  ``torch._scaled_mm``, which rescales the float32 accumulators by both scales and adds the bias.

This is the "dynamic activation, per-row" float8 recipe of torchao's inference quantization,
written out here so the GPU machine needs no extra wheel. e4m3 keeps 3 mantissa bits: each
operand is rounded by up to 1/16 of its value, so a layer's output moves by a few percent of its
spread. The output is therefore *not* within the fast path's fp16 tolerance of the plain pipeline;
the GPU suite measures how far it moves (``tests/gpu``) and this stays a setting to choose.

Left in 16 bits: the cross-attention key/value projections (their input is the text encoder's
output, whose few huge channels would set every token's scale and round the rest of the row away;
they are 77 rows per image anyway), the time and class embeddings (one row per image), and any
layer whose sides are not multiples of 16 (cuBLAS's float8 requirement). The text encoders and
VAEs are untouched.

The plain diffusers pipelines share the UNet with the fast path, so with the setting on they
run these layers in float8 too: the setting changes the model, not one code path. The 16-bit
weights are released (a float8 copy is half their size). With fused Q/K/V (``fastpath.fuse_qkv``,
applied first), the separate projections diffusers keeps become views of the fused one's rows.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
# A row's largest magnitude is mapped to this, a little under FP8_MAX: the input's scale is applied
# in the input's dtype (one multiply), whose rounding may push the largest value a hair past it.
TARGET = 440.0
# Rows of zeros keep a finite scale; the floor keeps 1/scale within float16's range (65504).
FLOOR = TARGET / 60000.0
ALIGN = 16  # cuBLAS's float8 matmuls need both sides of the weight to be multiples of 16


@dataclass(frozen=True)
class Recipe:
    """How ``torch._scaled_mm`` is called on a device (``probe``): not every build takes a bias
    or a float16 output with per-row scales."""

    bias_in_matmul: bool
    out_dtype: torch.dtype | None  # None: the input's dtype


class Fp8Linear(torch.nn.Module):
    """``nn.Linear`` with a float8 weight and per-row float8 inputs (the module docstring)."""

    in_features: int
    out_features: int
    weight_bytes: torch.Tensor  # buffers, registered in __init__
    weight_scale: torch.Tensor

    def __init__(
        self, linear: torch.nn.Linear, recipe: Recipe, quantize: Callable[[torch.Tensor], Quantized] | None = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.recipe = recipe
        self.quantize = quantize or quantize_rows
        weight = linear.weight.detach()
        amax = torch.linalg.vector_norm(weight, ord=float("inf"), dim=1, keepdim=True, dtype=torch.float32)
        scale = amax.clamp_min(1e-12) / FP8_MAX
        quantized = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        # Stored as bytes: Module.to(dtype) converts floating-point tensors, and float8 counts as one.
        self.register_buffer("weight_bytes", quantized.view(torch.uint8))
        self.register_buffer("weight_scale", scale.reshape(1, -1))  # (1, out): one per output channel
        bias = linear.bias
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        """The float8 weight, ``(out_features, in_features)``."""
        return self.weight_bytes.view(FP8)

    def share_rows(self, joint: Fp8Linear, start: int) -> None:
        """Make this layer's weight, scales and bias views of rows ``start..`` of ``joint``'s, a
        fused projection quantized from the same 16-bit rows (per output channel, so the bytes are
        the same): one copy in memory, as ``fastpath.fuse_qkv`` keeps one in 16 bits."""
        stop = start + self.out_features
        self.weight_bytes = joint.weight_bytes[start:stop]
        self.weight_scale = joint.weight_scale[:, start:stop]
        if self.bias is not None and joint.bias is not None:
            self.bias = torch.nn.Parameter(joint.bias.detach()[start:stop], requires_grad=False)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float32 (for tests and error measurements)."""
        return self.weight.float() * self.weight_scale.reshape(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantized, scale = self.quantize(x.reshape(-1, self.in_features).contiguous())
        return self.multiply(quantized, scale, x.dtype).reshape(*x.shape[:-1], self.out_features)

    def multiply(self, quantized: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer's output for inputs already quantized per row (float8 rows and their scales),
        as 2-D rows in ``dtype``."""
        out_dtype = self.recipe.out_dtype or dtype
        bias: torch.Tensor | None = self.bias if self.recipe.bias_in_matmul else None
        if bias is not None and bias.dtype != out_dtype:
            bias = bias.to(out_dtype)
        out = torch._scaled_mm(
            quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale.float(), bias=bias,
            out_dtype=out_dtype, use_fast_accum=True,
        )  # fmt: skip
        if out.dtype != dtype:
            out = out.to(dtype)
        if self.bias is not None and not self.recipe.bias_in_matmul:
            out = out + self.bias.to(dtype)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn"


Quantized = tuple[torch.Tensor, torch.Tensor]  # float8 rows, and each row's float32 scale (rows, 1)


def quantize_rows(rows: torch.Tensor) -> Quantized:
    """Each row of ``rows`` (2-D, row-major) in float8, its largest magnitude mapped to ~440, and the
    scale that undoes it. As PyTorch ops these are three passes over ``rows`` (the row maxima, the
    multiply, the cast); under torch.compile, one fused kernel (``RowQuantizer``)."""
    amax = torch.linalg.vector_norm(rows, ord=float("inf"), dim=1, keepdim=True, dtype=torch.float32)
    amax = amax.clamp_min(FLOOR)
    return (rows * (TARGET / amax).to(rows.dtype)).to(FP8), amax / TARGET


def geglu_rows(projected: torch.Tensor) -> torch.Tensor:
    """diffusers' GEGLU after its projection: each row's value half times the GELU of its gate half."""
    value, gate = projected.chunk(2, dim=-1)
    return value * F.gelu(gate)


def geglu_quantize_rows(projected: torch.Tensor) -> Quantized:
    """The GEGLU of each row of ``projected`` (2-D: value half, then gate half), quantized per row
    as ``quantize_rows`` does: what a float8 feed-forward's output layer multiplies. As PyTorch ops;
    on CUDA ``fp8_geglu.geglu_quantize_rows`` does it in one kernel."""
    return quantize_rows(geglu_rows(projected))


class RowQuantizer:
    """``quantize_rows`` compiled (torch.compile, inductor): one kernel that reads each row once
    (twice for rows over 1024 values, beyond inductor's persistent reductions) and writes its
    float8 bytes, where the three PyTorch ops read it three times and write it twice. For CUDA
    graphs without a compiled UNet (a compiled UNet fuses ``quantize_rows`` into its own
    kernels). The row count is dynamic, so the batch buckets share one compile per input
    width; the width stays static (``dynamic=False``: torch's automatic dynamic shapes would make
    it symbolic at the second width, and a reduction of unknown length reads its row twice).
    SD 1.5/2.x have 5 widths, SDXL 4 of the same: within dynamo's 8 compiles per function, ~1-2 s
    each, during warm-up. Should compiling fail (no Triton, say), a warning and the PyTorch ops
    from then on."""

    def __init__(self) -> None:
        self._compiled: Callable[[torch.Tensor], Quantized] | None = None
        self.failure = ""

    def __call__(self, rows: torch.Tensor) -> Quantized:
        if self.failure or torch.compiler.is_compiling():
            return quantize_rows(rows)
        if self._compiled is None:
            self._compiled = torch.compile(quantize_rows, fullgraph=True, dynamic=False)
        torch._dynamo.maybe_mark_dynamic(rows, 0)
        try:
            return self._compiled(rows)
        except Exception as exc:  # noqa: BLE001 - any compile failure: the same arithmetic, uncompiled
            self.failure = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            logger.warning("float8 input quantization runs as PyTorch ops: compiling it failed (%s)", self.failure)
            return quantize_rows(rows)


def unsupported_reason(device: torch.device) -> str | None:
    """Why float8 matmuls cannot run on ``device`` (None: they can). CUDA needs compute
    capability 8.9 (Ada) or 9.0+ (Hopper); a CPU runs them (slowly: for tests)."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} has no torch._scaled_mm"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            return f"compute capability {major}.{minor} (float8 matmuls need 8.9 or 9.0+)"
    return None


def probe(device: torch.device, dtype: torch.dtype) -> Recipe:
    """The first way of calling ``torch._scaled_mm`` with per-row scales that ``device`` takes for
    ``dtype`` activations: with the bias and the output in ``dtype``, then the bias added after,
    then the output in bfloat16 (cast after) with the bias, then without. Some builds take per-row
    scales only with a bfloat16 output (PyTorch's CUTLASS kernel, used where cuBLAS cannot).
    Raises RuntimeError when none works."""
    a = torch.ones(16, 32, device=device).to(FP8)
    b = torch.ones(16, 32, device=device).to(FP8)
    scale_a, scale_b = torch.ones(16, 1, device=device), torch.ones(1, 16, device=device)
    bias = torch.ones(16, device=device, dtype=dtype)
    errors = []
    recipes = (Recipe(True, None), Recipe(False, None), Recipe(True, torch.bfloat16), Recipe(False, torch.bfloat16))
    for recipe in recipes:
        out_dtype = recipe.out_dtype or dtype
        try:
            out = torch._scaled_mm(
                a, b.t(), scale_a=scale_a, scale_b=scale_b, bias=bias.to(out_dtype) if recipe.bias_in_matmul else None,
                out_dtype=out_dtype, use_fast_accum=True,
            )  # fmt: skip
            expected = 33.0 if recipe.bias_in_matmul else 32.0
            if out.shape == (16, 16) and bool((out.float() == expected).all()):
                return recipe
            errors.append("a wrong result")
        except (RuntimeError, NotImplementedError) as exc:
            errors.append(str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    distinct = " | ".join(dict.fromkeys(errors))  # the ways tried mostly fail for one reason
    raise RuntimeError(f"torch._scaled_mm takes no per-row float8 call here ({len(recipes)} ways tried): {distinct}")


def fp8_linears(unet: torch.nn.Module) -> list[str]:
    """The names of the ``nn.Linear`` layers in ``unet`` that ``convert`` would change."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    names = []
    for block_name, block in unet.named_modules():
        if not isinstance(block, Transformer2DModel):
            continue
        for name, module in block.named_modules():
            if type(module) is not torch.nn.Linear:  # not a subclass: LoRA layers and the like stay
                continue
            if module.in_features % ALIGN or module.out_features % ALIGN:
                continue
            parent_name, _, leaf = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            if isinstance(parent, Attention) and parent.is_cross_attention and leaf in ("to_k", "to_v", "to_kv"):
                continue
            names.append(f"{block_name}.{name}" if block_name else name)
    return names


def convert(unet: torch.nn.Module, recipe: Recipe, quantize: Callable[[torch.Tensor], Quantized] | None = None) -> int:
    """Replace ``unet``'s transformer linears (``fp8_linears``) by ``Fp8Linear``s that quantize
    their inputs with ``quantize`` (default ``quantize_rows``). Where Q, K and V were fused
    (``fastpath.fuse_qkv``), the separate projections become views of the fused one's float8 rows.
    Returns how many weights were quantized (a second call quantizes none)."""
    from diffusers.models.attention_processor import Attention

    names = fp8_linears(unet)
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, leaf, Fp8Linear(getattr(parent, leaf), recipe, quantize))
    shared = 0
    for module in unet.modules():
        joint = getattr(module, "to_qkv", None)
        if isinstance(module, Attention) and module.fused_projections and isinstance(joint, Fp8Linear):
            start, storage = 0, joint.weight_bytes.untyped_storage().data_ptr()
            for part in (module.to_q, module.to_k, module.to_v):
                if isinstance(part, Fp8Linear) and part.weight_bytes.untyped_storage().data_ptr() != storage:
                    part.share_rows(joint, start)
                    shared += 1
                start += part.out_features
    return len(names) - shared


def fuse_geglu_quantization(unet: torch.nn.Module, geglu_quantize: Callable[[torch.Tensor], Quantized]) -> int:
    """Make each feed-forward of ``unet`` whose GEGLU projection and output layer are both
    ``Fp8Linear`` compute its GEGLU and the output layer's input quantization with one call of
    ``geglu_quantize`` (``geglu_quantize_rows``' arithmetic; on CUDA ``fp8_geglu``'s kernel) instead
    of the GEGLU's PyTorch ops and the output layer's own quantization. The dropout between them
    is skipped: the fast path runs in eval mode, where it does nothing. Returns how many changed."""
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention import FeedForward

    def forward(self: FeedForward, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        geglu, output = self.net[0], self.net[2]
        projected = geglu.proj(hidden_states)
        quantized, scale = geglu_quantize(projected.reshape(-1, projected.shape[-1]).contiguous())
        out = output.multiply(quantized, scale, projected.dtype).reshape(*projected.shape[:-1], output.out_features)
        for module in self.net[3:]:  # diffusers' final dropout, where configured
            out = module(out)
        return out

    changed = 0
    for module in unet.modules():
        if not isinstance(module, FeedForward) or "forward" in vars(module) or len(module.net) < 3:
            continue
        geglu, output = module.net[0], module.net[2]
        if isinstance(geglu, GEGLU) and isinstance(geglu.proj, Fp8Linear) and isinstance(output, Fp8Linear):
            module.forward = types.MethodType(forward, module)
            changed += 1
    return changed
