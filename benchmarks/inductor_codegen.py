"""The Triton code inductor generates for a UNet on a CUDA GPU, generated on a machine without one.

The real architecture's UNet or tiny VAE decoder (livegen's synthesized configs, fp16, channels_last
weights, as the fast path holds them) on fake CUDA tensors is exported and handed to inductor, which lowers it and
writes its wrapper module (every Triton kernel's source and the launches) for an H100/H200-class
device (132 SMs, sm_90). The run stops there: nothing is compiled or launched. Read the result
with ``python -m livegen.bench.kernel_access OUT``.

Needs a CUDA build of torch (its convolution meta functions pick cuDNN's layouts only when
cuDNN is present) and triton; no GPU. What the project measured with (session 13):

    python -m venv /tmp/cuda-torch && /tmp/cuda-torch/bin/pip install torch==2.11.0 \\
        diffusers==0.42.1 transformers==5.24.0     # torch 2.11.0+cu130 from PyPI, ~3 GB with CUDA libs
    PYTHONPATH=src /tmp/cuda-torch/bin/python benchmarks/inductor_codegen.py --batch 16 [--dynamic-batch] \\
        [--keep-cl] --out /tmp/unet.py

Where the trace is made to match torch.compile in the server (session 14): the modules are in
eval mode (from_pretrained's; from_config builds them in training mode), the latents arrive
NCHW-contiguous (fastpath._forward, _decode), and convolutions trace cuDNN's output layouts
(torch.export switches cuDNN off while it traces; dynamo does not).

Where this differs from a GPU run's code, and why:
- attention: without a device, ``scaled_dot_product_attention`` would pick its math kernel
  (which inductor decomposes into softmax and transpose kernels), so the script calls the op the
  device picks directly (``--attention``, default cuDNN's, as session 8's H200 profile shows).
- inductor's pattern-matcher replacements are traced on the CPU (they trace on the input's
  device); uniform-value constant folding and matmul padding (both benchmark on the device) are
  off. No autotuning: launch configurations (block sizes) are chosen on the GPU at run time.
"""

from __future__ import annotations

import argparse
import ast
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

H200 = types.SimpleNamespace(
    name="NVIDIA H200", major=9, minor=0, multi_processor_count=132, regs_per_multiprocessor=65536,
    max_threads_per_multi_processor=2048, max_threads_per_block=1024, warp_size=32,
    total_memory=150 * 2**30, L2_cache_size=50 * 2**20, shared_memory_per_block_optin=232448, gcnArchName="",
)  # fmt: skip


def force_keep_cl_at_batch_1() -> None:
    """layout.py as if it treated a batch of one like any other: the transformer outputs as
    channels_last views and the concatenations pinned at every batch size."""
    from livegen.engine import layout

    def any_batch(val: Any) -> list[int] | None:
        return layout.channels_last_layout(val) if isinstance(val, torch.Tensor) and val.dim() == 4 else None

    layout.transformer_output = layout.channels_last_output
    layout._channels_last_strides = any_batch


class Generated(Exception):
    """Raised once inductor has written the wrapper: stops before anything compiles."""


def pretend_a_device(attention: str) -> list[str]:
    """Point torch's device queries at an H200-class GPU and keep inductor's on-device steps
    (pattern tracing, benchmarks) off it; ``scaled_dot_product_attention`` runs ``attention``'s
    kernel (cudnn, flash or math), as it would pick on the device. Returns the wrapper sources,
    filled as inductor writes them."""
    if attention != "math":  # without a device, torch's own choice is its math kernel
        math_attention = torch.nn.functional.scaled_dot_product_attention

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Any = None, **kw: Any) -> Any:
            if attn_mask is not None or kw.get("dropout_p") or kw.get("is_causal") or kw.get("enable_gqa"):
                return math_attention(q, k, v, attn_mask=attn_mask, **kw)
            if attention == "cudnn":
                out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, scale=kw.get("scale"))
            else:
                out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=kw.get("scale"))
            return out[0]

        torch.nn.functional.scaled_dot_product_attention = sdpa
    import torch._inductor.config as inductor
    import torch._inductor.fx_passes.joint_graph as joint_graph
    import torch._inductor.fx_passes.post_grad as post_grad
    import torch._inductor.graph as graph
    import torch.utils._triton as triton_utils
    from torch._dynamo import device_interface

    torch.cuda.get_device_properties = lambda device=None: H200
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 1
    cuda = device_interface.CudaInterface
    cuda.get_device_properties = staticmethod(lambda device=None: H200)
    cuda.get_compute_capability = staticmethod(lambda device=None: 90)
    cuda.current_device = staticmethod(lambda: 0)
    cuda.device_count = staticmethod(lambda: 1)
    cuda.is_available = staticmethod(lambda: True)
    triton_utils.triton_hash_with_backend = lambda: "no-device"
    inductor.force_disable_caches = True
    inductor.shape_padding = False
    inductor.compile_threads = 1
    joint_init, post_init = joint_graph.lazy_init, post_grad.lazy_init
    joint_graph.lazy_init = lambda input_device=None: joint_init(torch.device("cpu"))
    post_grad.lazy_init = lambda input_device=None: post_init(torch.device("cpu"))
    joint_graph.constant_fold_uniform_value = lambda gm: None
    select_conv_backend = torch._C._select_conv_backend

    def conv_backend(*args: Any, **kwargs: Any) -> Any:
        # torch.export traces with cuDNN switched off (export/_trace.py, _ignore_backend_decomps),
        # so its convolutions pick the CPU's backend and trace NCHW outputs where torch.compile on
        # the device sees cuDNN's channels_last (inductor's own lowering asks again, with cuDNN
        # on). Code that looks at strides (.contiguous(), reshape, group_norm_nhwc) must see what
        # it sees on the GPU, so the trace gets cuDNN's answer too.
        with torch.backends.cudnn.flags(enabled=True):
            return select_conv_backend(*args, **kwargs)

    torch._C._select_conv_backend = conv_backend

    sources: list[str] = []
    codegen = graph.GraphLowering.codegen

    def capture(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = codegen(self, *args, **kwargs)
        code = out[0]
        sources.append(getattr(code, "value", code))
        raise Generated

    graph.GraphLowering.codegen = capture
    return sources


def fake_cuda_module(module: torch.nn.Module, mode: Any) -> None:
    """Replace ``module``'s (meta) parameters and buffers with fake CUDA tensors, 4-D weights in
    channels_last."""
    with mode:
        for m in module.modules():
            for name, p in list(m.named_parameters(recurse=False)):
                t = torch.empty(p.shape, device="cuda", dtype=p.dtype)
                if t.dim() == 4:
                    t = t.to(memory_format=torch.channels_last)
                setattr(m, name, torch.nn.Parameter(t, requires_grad=False))
            for name, b in list(m.named_buffers(recurse=False)):
                m._buffers[name] = torch.empty(b.shape, device="cuda", dtype=b.dtype)


class Step(torch.nn.Module):
    """The UNet call the fast path compiles: latents, a timestep, text embeddings (SDXL: pooled
    embeddings and time ids)."""

    def __init__(self, unet: torch.nn.Module, sdxl: bool) -> None:
        super().__init__()
        self.unet = unet
        self.sdxl = sdxl

    def forward(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> Any:
        extra = {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}} if self.sdxl else {}
        return self.unet(latents, t, encoder_hidden_states=embeds, return_dict=False, **extra)[0]


class Decode(torch.nn.Module):
    """The tiny VAE's decode the fast path compiles: latents to pixels."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> Any:
        return self.vae.decode(latents, return_dict=False)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="stabilityai/sd-turbo")
    ap.add_argument("--part", default="unet", choices=["unet", "taesd"], help="the UNet, or the tiny VAE's decoder")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--dynamic-batch", action="store_true", help="as LIVEGEN_COMPILE_DYNAMIC_BATCH compiles it")
    ap.add_argument("--keep-cl", action="store_true", help="with LIVEGEN_KEEP_CHANNELS_LAST (engine/layout.py)")
    ap.add_argument(
        "--keep-cl-at-batch-1",
        action="store_true",
        help="--keep-cl without layout.py's batch-1 exceptions (what session 13 decided against)",
    )
    ap.add_argument("--split-geglu", action="store_true", help="with LIVEGEN_SPLIT_GEGLU (fastpath.split_geglu)")
    ap.add_argument("--nhwc-gn", action="store_true", help="with LIVEGEN_NHWC_GROUP_NORM (fastpath.group_norm_nhwc)")
    ap.add_argument("--fuse-qkv", action="store_true", help="with LIVEGEN_FUSE_QKV (fastpath.fuse_qkv)")
    ap.add_argument(
        "--fp8",
        action="store_true",
        help="with LIVEGEN_FP8_LINEAR (engine/fp8.py: the transformer linears in float8, bias in the matmul)",
    )
    ap.add_argument(
        "--fp8-geglu-kernel",
        action="store_true",
        help="with --fp8: LIVEGEN_FP8_GEGLU_KERNEL (engine/fp8_geglu.py: GEGLU and quantization in one kernel)",
    )
    ap.add_argument(
        "--taesd-rewrites",
        action="store_true",
        help="with --part taesd: LIVEGEN_TINY_VAE_FOLD_UPSAMPLE and LIVEGEN_TINY_VAE_CONV_RELU (engine/tiny_vae.py)",
    )
    ap.add_argument("--out", required=True, help="where to write inductor's wrapper module")
    ap.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an inductor config setting (Python literal), e.g. triton.tile_reductions=True; repeatable",
    )
    ap.add_argument(
        "--attention",
        default="cudnn",
        choices=["cudnn", "flash", "math"],
        help="the kernel scaled_dot_product_attention picks (session 8's H200 profile: cuDNN's)",
    )
    args = ap.parse_args()
    if args.keep_cl_at_batch_1:
        args.keep_cl = True
        force_keep_cl_at_batch_1()
    if torch.version.cuda is None or not torch.backends.cudnn.is_available():
        sys.exit("needs a CUDA build of torch with cuDNN (no GPU): see this script's docstring")

    import meta_unet
    import torch._inductor.config as inductor
    from torch._dynamo.source import ConstantSource
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv

    from livegen.engine import layout

    sources = pretend_a_device(args.attention)
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env)
    config: dict[str, Any] = {}
    step: torch.nn.Module
    if args.part == "taesd":
        from diffusers import AutoencoderTiny

        from livegen.engine.synth import _taesd_config

        with torch.device("meta"):
            step = Decode(AutoencoderTiny.from_config(_taesd_config(tiny=False)).half().eval())
    else:
        unet, config = meta_unet.build(args.model)
        if args.fuse_qkv:  # before fp8, as the fast path orders them (it fuses 16-bit weights)
            from livegen.engine.fastpath import fuse_qkv

            print(f"{fuse_qkv(unet)} attention layers' projections fused")
        if args.fp8:  # before split_geglu, as the fast path orders them (a float8 GEGLU keeps one matmul)
            from livegen.engine import fp8

            print(f"{fp8.convert(unet, fp8.Recipe(bias_in_matmul=True, out_dtype=None))} linears in float8")
            if args.fp8_geglu_kernel:
                from livegen.engine import fp8_geglu

                fused = fp8.fuse_geglu_quantization(unet, fp8_geglu.geglu_quantize_rows)
                print(f"{fused} float8 GEGLUs in livegen's kernel")
        if args.split_geglu:
            from livegen.engine.fastpath import split_geglu

            split_geglu(unet)
        if args.keep_cl:
            layout.transformer_outputs_channels_last(unet)
        if args.nhwc_gn:
            from livegen.engine.fastpath import keep_channels_last_in_group_norms

            keep_channels_last_in_group_norms(unet)
        step = Step(unet, config.get("addition_embed_type") == "text_time")
    if args.keep_cl:
        inductor.post_grad_custom_post_pass = layout.channels_last_cat_pass()
    for setting in args.inductor:
        key, _, value = setting.partition("=")
        *path, name = key.split(".")
        section: Any = inductor
        for part in path:
            section = getattr(section, part)
        if not hasattr(section, name):
            sys.exit(f"inductor has no setting {key!r}")
        setattr(section, name, ast.literal_eval(value))
    sdxl = config.get("addition_embed_type") == "text_time"
    fake_cuda_module(step, mode)
    if args.part == "taesd" and args.taesd_rewrites:
        from livegen.engine.tiny_vae import fold_upsample_convs, fuse_conv_relu

        with mode:  # in the fast path's order: fold, then fuse
            fold_upsample_convs(step)
            fuse_conv_relu(step)

    def inputs(batch: Any) -> list[torch.Tensor]:
        # NCHW-contiguous latents, as the fast path hands them to its compiled UNet and decode
        # (fastpath._forward and _decode: one layout for every call)
        side = args.size // 8
        with mode:
            latents = torch.empty(batch, 4, side, side, device="cuda", dtype=torch.half)
            if args.part == "taesd":
                return [latents]
            out = [
                latents,
                torch.empty(1, device="cuda", dtype=torch.long),
                torch.empty(batch, 77, config["cross_attention_dim"], device="cuda", dtype=torch.half),
            ]
            if sdxl:
                out += [torch.empty(batch, 1280, device="cuda", dtype=torch.half),
                        torch.empty(batch, 6, device="cuda", dtype=torch.half)]  # fmt: skip
        return out

    started = time.perf_counter()
    example = inputs(args.batch)
    dims: Any = None
    if args.dynamic_batch:
        b = torch.export.Dim("batch", min=2, max=16)  # the batch buckets above 1
        dims = ({0: b},) if args.part == "taesd" else ({0: b}, None, {0: b}, *([{0: b}] * (2 if sdxl else 0)))
    with mode, torch.no_grad():
        exported = torch.export.export(step, tuple(example), dynamic_shapes=dims)
    if args.dynamic_batch:  # the compile sees a symbolic batch, as dynamo's mark_dynamic gives it
        symbol = env.create_symbol(args.batch, ConstantSource("batch"), dynamic_dim=DimDynamic.DYNAMIC)
        example = inputs(env.create_symintnode(symbol, hint=args.batch))
    try:
        with mode, torch.no_grad():
            compile_fx(exported.module(), example)
    except Exception as exc:  # inductor wraps what its code generation raises
        if not isinstance(getattr(exc, "inner_exception", exc), Generated):
            raise
    if not sources:
        sys.exit("inductor wrote no wrapper")
    Path(args.out).write_text(sources[-1])
    kernels = sources[-1].count("async_compile.triton(")
    print(f"{args.out}: {kernels} Triton kernels, generated in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
