"""Two rewrites of the tiny VAE (TAESD / TAESDXL, diffusers' ``AutoencoderTiny``) that compute
the same function with less memory traffic. Both are off by default until measured on a GPU.

TAESD is all 3x3 convolutions with 64 channels: its decoder is ~141 GFLOP per 512² image
against the UNet's ~804, but at 256² and 512² its convolutions are close to memory-bound, and
each ReLU, residual add and nearest upsample between them is one more pass over a 64-channel
full-resolution tensor (BENCHMARKS.md, session 9: plausibly a fifth of a compiled batch of 16).

- ``fuse_conv_relu``: each residual block (``conv, relu, conv, relu, conv, + x, relu``) as three
  cuDNN calls with the ReLU and the residual add in the convolution's epilogue
  (``torch.cudnn_convolution_relu`` / ``torch.cudnn_convolution_add_relu``): three convolutions
  instead of three convolutions and three elementwise passes. Under ``torch.compile`` inductor
  fuses the add into the ReLU but cannot fuse either into cuDNN's convolution, so this saves
  passes there too. The calls go through ``livegen::`` custom ops, which give dynamo the output's
  shape and layout (aten has no meta kernel for them).
- ``fold_upsample_convs``: the decoder's ``Upsample(x2, nearest) -> Conv2d(3x3)`` as one
  transposed convolution (stride 2, 4x4 kernel) over the small input. Nearest upsampling
  repeats each pixel in a 2x2 square, so each output phase sees only 2x2 distinct input pixels:
  the 3x3 taps that land on the same one add up (``fold_kernel``). 16 instead of 36
  multiply-adds per output pixel and channel pair, and the upsampled tensor (4x the input) is
  never written or read.

On a CPU both compute the unfused arithmetic in another order (the custom ops run the plain
convolution and ReLU), which is what the CPU tests check; the GPU suite checks the cuDNN path.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from livegen.engine.fastpath import replace_forwards

# Nearest x2 upsampling then a 3x3 convolution (padding 1), along one axis, as a stride-2
# transposed convolution with 4 taps: tap k takes the 3x3 kernel's taps FOLD[k] (summed).
# Output 2m takes input m-1 through w[0] and input m through w[1] + w[2] (taps 3 and 1);
# output 2m+1 takes input m through w[0] + w[1] and input m+1 through w[2] (taps 2 and 0).
_FOLD = ((0, 0, 1), (0, 1, 1), (1, 1, 0), (1, 0, 0))

logger = logging.getLogger(__name__)


def fold_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The ``conv_transpose2d`` weight (in, out, 4, 4), stride 2, padding 1, equal to nearest x2
    upsampling followed by ``conv2d(weight, padding=1)`` with ``weight`` (out, in, 3, 3); summed in
    float32 at least, returned in ``weight``'s dtype."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    fold = torch.tensor(_FOLD, dtype=dtype, device=weight.device)
    kernel = torch.einsum("ky,oiyx,lx->iokl", fold, weight.to(dtype), fold)
    return kernel.to(weight.dtype)


class FoldedUpsampleConv(torch.nn.Module):
    """``conv(upsample(x))`` for a nearest x2 ``upsample`` and a 3x3, padding-1 ``conv``, as one
    transposed convolution over ``x``. Keeps ``conv`` (its weights are the source of truth)."""

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        kernel = fold_kernel(conv.weight.detach())
        if conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous():
            kernel = kernel.contiguous(memory_format=torch.channels_last)
        self.kernel: torch.Tensor
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.kernel, self.conv.bias, stride=2, padding=1)


def fold_upsample_convs(module: torch.nn.Module) -> int:
    """Replace each ``Upsample(x2, nearest), Conv2d(3x3, padding 1)`` pair in ``module``'s
    ``nn.Sequential``s (TAESD's decoder has three) with ``FoldedUpsampleConv`` and an Identity,
    keeping the positions. Call it after the module is on its device, dtype and memory format.
    Returns the pairs folded."""
    folded = 0
    for seq in [m for m in module.modules() if isinstance(m, torch.nn.Sequential)]:
        for i in range(len(seq) - 1):
            up, conv = seq[i], seq[i + 1]
            if _is_nearest_x2(up) and isinstance(conv, torch.nn.Conv2d) and _is_plain_3x3(conv):
                seq[i] = FoldedUpsampleConv(conv)
                seq[i + 1] = torch.nn.Identity()
                folded += 1
    return folded


def _is_nearest_x2(m: torch.nn.Module) -> bool:
    return (
        isinstance(m, torch.nn.Upsample)
        and m.mode == "nearest"
        and m.size is None
        and m.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0))
    )


def _is_plain_3x3(conv: torch.nn.Conv2d) -> bool:
    return (
        conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


# -- convolution + ReLU (+ residual) in one cuDNN call ------------------------------------------


def _output_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The layout cuDNN gives a convolution's output (``cudnn_conv_suggest_memory_format``):
    channels_last when the input or the weight is."""
    if any(t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous() for t in (x, weight)):
        return torch.channels_last
    return torch.contiguous_format


_cudnn_failure: list[str] = []  # set once cuDNN refused a fused call: the plain ops from then on


def _fused_on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda and not _cudnn_failure and torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled


def _refused(exc: RuntimeError) -> None:
    """cuDNN could not run a fused convolution here (no engine for this GPU, dtype or layout):
    say so once and compute these blocks unfused. The first call of each shape runs eagerly
    (warm-up) before any CUDA graph is captured, so this happens outside a capture."""
    _cudnn_failure.append(str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__)
    logger.warning(
        "the tiny VAE's fused convolutions fall back to plain ones: cuDNN refused them (%s)", _cudnn_failure[0]
    )


def _conv3x3_relu(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor | None = None
) -> torch.Tensor:
    """``relu(conv2d(x, weight, bias, padding=1) [+ z])``; one cuDNN call on CUDA."""
    fmt = _output_format(x, weight)
    out = None
    if _fused_on_cuda(x):
        try:
            if z is None:
                out = torch.cudnn_convolution_relu(x, weight, bias, (1, 1), (1, 1), (1, 1), 1)
            else:
                out = torch.cudnn_convolution_add_relu(x, weight, z, 1.0, bias, (1, 1), (1, 1), (1, 1), 1)
        except RuntimeError as exc:
            _refused(exc)
    if out is None:
        out = F.conv2d(x, weight, bias, padding=1)
        out = F.relu(out if z is None else out + z)
    return out.contiguous(memory_format=fmt)


@torch.library.custom_op("livegen::conv3x3_relu", mutates_args=())
def conv3x3_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _conv3x3_relu(x, weight, bias)


@torch.library.custom_op("livegen::conv3x3_add_relu", mutates_args=())
def conv3x3_add_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
    return _conv3x3_relu(x, weight, bias, z)


def _fake_output(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    return x.new_empty((n, weight.shape[0], h, w)).contiguous(memory_format=_output_format(x, weight))


@conv3x3_relu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _fake_output(x, weight)


@conv3x3_add_relu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, z: torch.Tensor) -> torch.Tensor:
    return _fake_output(x, weight)


def fuse_conv_relu(module: torch.nn.Module) -> int:
    """Make each TAESD residual block in ``module`` (``AutoencoderTinyBlock`` with ReLUs, 3x3
    convolutions and no skip convolution: all of TAESD's and TAESDXL's) run as three fused
    convolutions (``tiny_block_fused``). Returns the blocks changed."""
    from diffusers.models.unets.unet_2d_blocks import AutoencoderTinyBlock

    return replace_forwards(module, lambda m: isinstance(m, AutoencoderTinyBlock) and _fusable(m), tiny_block_fused)


def _fusable(block: Any) -> bool:
    layers = list(block.conv)
    return (
        len(layers) == 5
        and all(isinstance(c, torch.nn.Conv2d) and _is_plain_3x3(c) for c in layers[0::2])
        and all(isinstance(a, torch.nn.ReLU) for a in layers[1::2])
        and isinstance(block.skip, torch.nn.Identity)
        and isinstance(block.fuse, torch.nn.ReLU)
    )


def tiny_block_fused(block: Any, x: torch.Tensor) -> torch.Tensor:
    """``AutoencoderTinyBlock.forward`` (``relu(conv(relu(conv(relu(conv(x))))) + x)``) as three
    convolutions with their ReLU (and the last with the residual add) fused. With autograd on it
    runs the block as diffusers does. Under ``torch.compile`` the custom ops; eagerly (and when a
    CUDA graph is captured) the functions themselves, without the custom op's dispatch cost."""
    if torch.is_grad_enabled():
        return block.fuse(block.conv(x) + block.skip(x))  # type: ignore[no-any-return]
    compiling = torch.compiler.is_compiling()
    relu = conv3x3_relu if compiling else _conv3x3_relu
    add_relu = conv3x3_add_relu if compiling else _conv3x3_relu
    c0, c1, c2 = block.conv[0], block.conv[2], block.conv[4]
    h = relu(x, c0.weight, c0.bias)
    h = relu(h, c1.weight, c1.bias)
    return add_relu(h, c2.weight, c2.bias, x)  # type: ignore[no-any-return]
