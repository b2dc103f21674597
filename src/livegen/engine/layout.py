"""Keeping a channels_last UNet's activations channels_last, end to end (``LIVEGEN_KEEP_CHANNELS_LAST``).

The fast path keeps its UNet's weights in channels_last (NHWC) on CUDA, where cuDNN's convolutions
are fastest. Two places still produce NCHW activations, and under ``torch.compile`` every one costs
a Triton kernel that reads or writes across the layouts: one 2-byte element per 32-byte memory
sector, 1/16 of the bandwidth (counted from inductor's generated code: ``livegen.bench.kernel_access``,
BENCHMARKS.md session 13):

1. diffusers' ``Transformer2DModel`` returns ``(b, h*w, c) -> (b, h, w, c) -> permute -> .contiguous()``:
   an NCHW copy of a tensor whose permuted view is already channels_last. In the graph inductor
   is handed, its residual add then comes out NCHW, and so do the up blocks' ``torch.cat`` of
   skip connections that take it in.
   ``transformer_outputs_channels_last`` drops the copy: the same values, as the channels_last view.
2. Inductor lowers such a ``cat`` as a fused pointwise node whose memory layout is left open; the
   GroupNorm after it reshapes it to ``(n, groups, -1)``, which fixes it as NCHW, and the 1x1
   shortcut convolution beside it then needs a second, channels_last copy. ``ChannelsLastCat``, a
   post-grad pass, pins each channels_last ``cat`` to channels_last strides first
   (``prims.inductor_force_stride_order``: no copy when the layout is free, as here).

Layout only: the values are the same (a GroupNorm's sums may add up in another order).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

PASS_VERSION = "livegen-channels-last-cat-1"  # part of inductor's cache key: change it with the pass


def transformer_outputs_channels_last(module: torch.nn.Module) -> int:
    """Make every continuous-input ``Transformer2DModel`` in ``module`` return its output as a
    channels_last view instead of diffusers' NCHW copy (``transformer_output``). Returns how many
    were changed (a second call changes none)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    changed = 0
    for m in module.modules():
        if (
            isinstance(m, Transformer2DModel)
            and getattr(m, "is_input_continuous", False)
            and "_get_output_for_continuous_inputs" not in vars(m)
        ):
            m._get_output_for_continuous_inputs = functools.partial(transformer_output, m)  # type: ignore[method-assign]
            changed += 1
    return changed


def transformer_output(
    block: Any,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    batch_size: int,
    height: int,
    width: int,
    inner_dim: int,
) -> torch.Tensor:
    """diffusers' ``Transformer2DModel._get_output_for_continuous_inputs`` without its
    ``.contiguous()``: ``(b, h*w, c)`` rows reshaped to ``(b, h, w, c)`` and permuted to
    ``(b, c, h, w)`` are already a channels_last tensor, so the projection (a 1x1 convolution) or
    the residual add reads them where they are.

    A batch of one keeps diffusers' NCHW copy (and ``ChannelsLastCat`` leaves its concatenations
    alone). There inductor splits each GroupNorm's reduction into short pieces, and in
    channels_last a piece reads 10 channels of each pixel, half of every sector: SD-Turbo's and
    SD 1.5's generated code at batch 1 have 9 launches and ~0.15 GB of sectors more in
    channels_last, and save nothing (BENCHMARKS.md, session 13).
    Under torch.compile the batch size is known when the graph is traced (a dynamic batch is at
    least 2), so this choice costs nothing at run time."""
    if batch_size == 1:
        return type(block)._get_output_for_continuous_inputs(
            block, hidden_states, residual, batch_size, height, width, inner_dim
        )
    return channels_last_output(block, hidden_states, residual, batch_size, height, width, inner_dim)


def channels_last_output(
    block: Any,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    batch_size: int,
    height: int,
    width: int,
    inner_dim: int,
) -> torch.Tensor:
    """The transformer block's output as a channels_last view, at any batch size."""
    if not block.use_linear_projection:
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
        hidden_states = block.proj_out(hidden_states)
    else:
        hidden_states = block.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2)
    return hidden_states + residual


def _channels_last_strides(val: Any) -> list[int] | None:
    """``val``'s strides if it is a 4-D channels_last tensor of more than one image that is not
    also NCHW-contiguous; else None. Decided from static sizes only: a dynamic batch leaves c, h, w and the strides
    (dim 0's is h*w*c) static, and anything symbolic there is left alone rather than guarded."""
    if not isinstance(val, torch.Tensor) or val.dim() != 4:
        return None
    if isinstance(val.shape[0], int) and val.shape[0] == 1:  # a batch of one: see transformer_output
        return None
    return channels_last_layout(val)


def channels_last_layout(val: torch.Tensor) -> list[int] | None:
    """A 4-D ``val``'s strides if it is channels_last and not also NCHW-contiguous, at any batch
    size; else None (static sizes only, as ``_channels_last_strides``)."""
    size, stride = val.shape, val.stride()
    c, h, w = size[1], size[2], size[3]
    if not all(isinstance(v, int) for v in (c, h, w, *stride[1:])):
        return None
    if c == 1 or h * w == 1:  # both layouts at once: nothing to pin
        return None
    if (stride[1], stride[2], stride[3]) != (1, w * c, c) or stride[0] != h * w * c:
        return None
    return list(stride)


def channels_last_cat_pass(stats: Any = None) -> Any:
    """The post-grad pass (an inductor ``CustomGraphPass``: it needs torch._inductor, imported
    only when compiling). ``stats``: a ``FastStats`` whose ``channels_last_cats`` it counts in."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class ChannelsLastCat(CustomGraphPass):
        """Pins each 4-D ``aten.cat`` whose traced result is channels_last to those strides, so
        inductor realizes it channels_last rather than leaving the choice to its first reader."""

        def __init__(self) -> None:
            self.pinned = 0  # cats pinned, over every graph this pass has run on

        def __call__(self, graph: torch.fx.Graph) -> None:
            import torch._inductor.inductor_prims  # noqa: F401  (registers prims.inductor_force_stride_order)

            force = torch.ops.prims.inductor_force_stride_order.default
            for node in list(graph.nodes):
                if node.op != "call_function" or node.target is not torch.ops.aten.cat.default:
                    continue
                stride = _channels_last_strides(node.meta.get("val"))
                if stride is None or any(u.target is force for u in node.users):
                    continue
                with graph.inserting_after(node):
                    pinned = graph.call_function(force, (node, stride))
                pinned.meta.update(node.meta)
                node.replace_all_uses_with(pinned, delete_user_cb=lambda user, p=pinned: user is not p)
                self.pinned += 1
                if stats is not None:
                    stats.channels_last_cats += 1

        def uuid(self) -> str:
            return PASS_VERSION

    return ChannelsLastCat()
