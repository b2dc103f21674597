"""The UNet's transformer linears in float8 (engine/fp8.py), on a CPU: torch's CPU ``_scaled_mm``
computes what the GPU's does (per-row float8 operands, float32 accumulation), slowly. The speed is
a GPU question (BENCHMARKS.md); here: that each layer computes exactly its quantized product, which
layers change, and that a server with the setting renders images near the 16-bit ones."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from livegen.engine import GenerationRequest, Task, fp8
from livegen.engine.fastpath import Deferred
from livegen.engine.worker import Worker
from livegen.settings import Settings

SD = "stabilityai/sd-turbo"


def linear(in_features: int = 64, out_features: int = 48, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(0)
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight[3] *= 40  # an output channel with large weights: it gets its own scale
    return layer


def quantized(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` rounded to float8_e4m3fn and back, in float64."""
    return (x / scale).to(torch.float8_e4m3fn).double() * scale.double()


def test_a_float8_layer_computes_its_quantized_product_exactly() -> None:
    """The output is the float32 product of the float8 input rows and the float8 weight rows, each
    rescaled by its own scale, plus the bias: nothing else rounds (up to float32 summation)."""
    layer = linear()
    x = torch.randn(2, 5, 64)
    x[0, 1] *= 100  # a loud token: its row's scale is its own
    q = fp8.Fp8Linear(layer, fp8.Recipe(bias_in_matmul=True, out_dtype=None))
    out = q(x)
    assert out.shape == (2, 5, 48) and out.dtype == torch.float32
    rows = x.reshape(-1, 64)
    amax = rows.abs().amax(dim=1, keepdim=True)
    weight = quantized(layer.weight.detach(), layer.weight.detach().abs().amax(dim=1, keepdim=True) / fp8.FP8_MAX)
    expected = quantized(rows, amax / 440.0) @ weight.T + layer.bias.detach().double()
    torch.testing.assert_close(out.reshape(-1, 48).double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q.dequantized_weight().double(), weight, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "recipe",
    [
        fp8.Recipe(True, None),
        fp8.Recipe(False, None),
        fp8.Recipe(True, torch.bfloat16),
        fp8.Recipe(False, torch.bfloat16),
    ],
)
def test_every_recipe_is_a_few_percent_from_the_full_precision_layer(recipe: fp8.Recipe) -> None:
    """e4m3 rounds each operand by up to 1/16 of its value; over 64-term sums the errors average
    out to ~2 % of the output's spread. Each way of calling the matmul gives that (the bfloat16
    output rounds once more, to 1/256)."""
    layer = linear()
    x = torch.randn(4, 7, 64)
    with torch.no_grad():
        reference = layer(x)
        out = fp8.Fp8Linear(layer, recipe)(x)
    assert out.dtype == x.dtype
    relative = ((out - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()
    assert 1e-4 < relative < 0.05, relative  # rounded (not the same layer), and not by much


def test_rows_of_zeros_and_a_layer_without_bias() -> None:
    """A zero row (padding) keeps a finite scale and gives zeros; without a bias, nothing is added."""
    layer = linear(bias=False)
    q = fp8.Fp8Linear(layer, fp8.Recipe(True, None))
    x = torch.zeros(3, 64)
    x[1] = torch.randn(64)
    out = q(x)
    assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros(48)) and torch.equal(out[2], torch.zeros(48))
    assert (out[1] != 0).any()


def test_half_precision_rows_near_the_scale_floor_stay_finite() -> None:
    """In float16 the input's scale is applied as one multiply by ``440 / amax``, which must stay
    within float16's range: a row of tiny values takes the floor scale and still quantizes."""
    layer = linear().half()
    x = torch.full((2, 64), 1e-4, dtype=torch.float16)
    x[1] = torch.randn(64).half() * 1e-3
    with torch.no_grad():
        out = fp8.Fp8Linear(layer, fp8.Recipe(True, None))(x)
        reference = layer.float()(x.float())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.02)


@pytest.mark.parametrize(
    ("dtype", "max_differing"), [(torch.float32, 0.0), (torch.float16, 0.01), (torch.bfloat16, 0.05)]
)
def test_the_compiled_row_quantizer_gives_the_ops_result(dtype: torch.dtype, max_differing: float) -> None:
    """``RowQuantizer`` (``quantize_rows`` under torch.compile: inductor's C++ here, Triton on a GPU)
    gives the same float8 rows and scales; a new row count reuses the compile (the rows are
    dynamic), a new width compiles once more. In 16 bits inductor computes the multiply in float32
    and casts once, where the PyTorch ops round it to 16 bits first: some values land one float8
    step apart (measured: 3.1 % in bfloat16, whose 8-bit mantissa rounds coarsely; fewer in float16)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    quantizer = fp8.RowQuantizer()
    for rows, width in ((64, 320), (192, 320), (128, 640), (64, 640), (96, 1280)):
        x = (torch.randn(rows, width) * torch.linspace(0.01, 30, rows)[:, None]).to(dtype)
        (q, scale), (q_ops, scale_ops) = quantizer(x), fp8.quantize_rows(x)
        assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (rows, 1)
        torch.testing.assert_close(scale, scale_ops, rtol=0, atol=0)
        differ = (q.view(torch.uint8) != q_ops.view(torch.uint8)).float().mean().item()
        assert differ <= max_differing, differ
        torch.testing.assert_close(q.float(), q_ops.float(), rtol=0.125, atol=2**-9)  # one e4m3 step at most
    assert not quantizer.failure
    # One per width, whatever the rows: the widths stay static (dynamo's automatic dynamic shapes
    # would have made the second width symbolic and compiled twice in all).
    assert counters["stats"]["unique_graphs"] == 3


def test_a_quantizer_that_cannot_compile_falls_back_to_the_ops(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_compiler(fn: Any, **kwargs: Any) -> Any:
        def fail(*args: Any) -> Any:
            raise RuntimeError("Cannot find a working triton installation")

        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    quantizer = fp8.RowQuantizer()
    x = torch.randn(32, 64)
    with caplog.at_level("WARNING"):
        q, scale = quantizer(x)
        quantizer(x)
    q_ops, scale_ops = fp8.quantize_rows(x)
    assert torch.equal(q.view(torch.uint8), q_ops.view(torch.uint8)) and torch.equal(scale, scale_ops)
    assert "triton" in quantizer.failure and caplog.text.count("compiling it failed") == 1


def test_module_to_leaves_the_float8_weight_alone() -> None:
    """``Module.to(dtype)`` converts floating-point tensors, float8 among them: the weight is kept
    as bytes, so a later ``.to(torch.float16)`` of the model cannot undo it (the scales stay float32
    where the matmul needs them)."""
    q = fp8.Fp8Linear(linear(), fp8.Recipe(True, None))
    before = q.weight.clone()
    q.to(torch.float16)
    assert q.weight.dtype == torch.float8_e4m3fn and torch.equal(q.weight.view(torch.uint8), before.view(torch.uint8))
    assert q(torch.randn(2, 64, dtype=torch.float16)).dtype == torch.float16


def tiny_unet(**kw: Any) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48,
        attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), **kw,
    ).eval()  # fmt: skip


def test_which_layers_run_in_float8() -> None:
    """Every linear of the transformer blocks but the cross-attention keys and values (their input
    is the text encoder's output); proj_in/proj_out where they are linear; nothing outside the
    transformers (the time embedding); a layer whose side is not a multiple of 16 stays."""
    unet = tiny_unet(use_linear_projection=True)
    names = set(fp8.fp8_linears(unet))
    block = "down_blocks.0.attentions.0"
    assert f"{block}.proj_in" in names and f"{block}.proj_out" in names
    for layer in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
                  "ff.net.0.proj", "ff.net.2"):  # fmt: skip
        assert f"{block}.transformer_blocks.0.{layer}" in names
    assert not any(n.endswith(("attn2.to_k", "attn2.to_v")) for n in names)
    assert not any(n.startswith("time_embedding") for n in names)
    assert len(names) == 4 * 10  # four transformers (one down, one in the middle, two up), ten linears each
    odd = tiny_unet(use_linear_projection=True)
    odd.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2] = torch.nn.Linear(128, 40)
    assert f"{block}.transformer_blocks.0.ff.net.2" not in fp8.fp8_linears(odd)


def test_a_converted_unet_predicts_near_the_16_bit_one_and_holds_half_the_bytes() -> None:
    unet = tiny_unet(use_linear_projection=True)
    converted = copy.deepcopy(unet)
    n = fp8.convert(converted, fp8.Recipe(True, None))
    assert n == len(fp8.fp8_linears(unet)) and fp8.convert(converted, fp8.Recipe(True, None)) == 0
    assert all(isinstance(converted.get_submodule(name), fp8.Fp8Linear) for name in fp8.fp8_linears(unet))
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), torch.randn(2, 77, 48)
    with torch.no_grad():
        reference, out = unet(x, t, ctx).sample, converted(x, t, ctx).sample
    cosine = torch.nn.functional.cosine_similarity(out.flatten(), reference.flatten(), dim=0).item()
    assert 0.99 < cosine < 1.0, cosine
    torch._dynamo.reset()
    compiled = copy.deepcopy(unet)
    quantizer = fp8.RowQuantizer()  # what CUDA graphs use: the same rows, one kernel per input width
    fp8.convert(compiled, fp8.Recipe(True, None), quantizer)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, ctx).sample, out, rtol=1e-5, atol=1e-5)
    assert not quantizer.failure


def test_fused_projections_share_one_float8_copy() -> None:
    """With fused Q/K/V (``fastpath.fuse_qkv``) the separate projections, which the fused attention
    does not call, become views of the fused layer's float8 rows: the same bytes their own
    quantization gives (scales are per output channel), one copy in memory."""
    from livegen.engine.fastpath import fuse_qkv

    unet = tiny_unet(use_linear_projection=True)
    fuse_qkv(unet)
    separate = {n: fp8.Fp8Linear(unet.get_submodule(n), fp8.Recipe(True, None)) for n in fp8.fp8_linears(unet)
                if n.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v"))}  # fmt: skip
    assert len(separate) == 4 * 3
    quantized = fp8.convert(unet, fp8.Recipe(True, None))
    assert quantized == len(fp8.fp8_linears(tiny_unet(use_linear_projection=True))) - 4 * 2  # 3 layers -> 1
    for name, alone in separate.items():
        part = unet.get_submodule(name)
        joint = unet.get_submodule(name.rpartition(".")[0] + ".to_qkv")
        assert part.weight_bytes.untyped_storage().data_ptr() == joint.weight_bytes.untyped_storage().data_ptr()
        assert torch.equal(part.weight_bytes, alone.weight_bytes) and torch.equal(part.weight_scale, alone.weight_scale)
    x = torch.randn(2, 5, 32)
    block = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    torch.testing.assert_close(torch.cat([block.to_q(x), block.to_k(x), block.to_v(x)], -1), block.to_qkv(x))
    assert fp8.convert(unet, fp8.Recipe(True, None)) == 0


def test_a_fused_geglu_quantization_gives_the_unfused_feed_forward() -> None:
    """``fuse_geglu_quantization``: each float8 GEGLU feed-forward hands its projection to one
    quantizing call (here the PyTorch ops, ``geglu_quantize_rows``; on CUDA fp8_geglu's kernel) and
    multiplies what it returns: the same float8 rows, so the same output, bit for bit."""
    from diffusers.models.attention import FeedForward

    unet = tiny_unet(use_linear_projection=True)
    fp8.convert(unet, fp8.Recipe(True, None))
    fused = copy.deepcopy(unet)
    calls: list[tuple[int, ...]] = []

    def geglu_quantize(projected: torch.Tensor) -> fp8.Quantized:
        calls.append(tuple(projected.shape))
        return fp8.geglu_quantize_rows(projected)

    feed_forwards = [m for m in unet.modules() if isinstance(m, FeedForward)]
    assert fp8.fuse_geglu_quantization(fused, geglu_quantize) == len(feed_forwards) > 0
    assert fp8.fuse_geglu_quantization(fused, geglu_quantize) == 0  # once
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([999, 999]), torch.randn(2, 77, 48)
    with torch.no_grad():
        assert torch.equal(fused(x, t, ctx).sample, unet(x, t, ctx).sample)
    assert len(calls) == len(feed_forwards) and all(len(shape) == 2 and shape[1] % 2 == 0 for shape in calls)
    # a feed-forward whose output layer stayed 16-bit (say, a width cuBLAS cannot take) is left alone
    mixed = copy.deepcopy(unet)
    mixed.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[2] = torch.nn.Linear(128, 32)
    assert fp8.fuse_geglu_quantization(mixed, geglu_quantize) == len(feed_forwards) - 1


def test_the_geglu_kernel_is_for_cuda_and_a_cpu_says_so(
    shared_data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``LIVEGEN_FP8_GEGLU_KERNEL`` (on by default with float8): on a CPU (no Triton, no CUDA) the
    GEGLUs stay PyTorch ops, with one warning, and the images are those without the setting."""
    settings = Settings(weights="tiny-random", device="cpu", data_dir=shared_data_dir, fast_path="on", fp8_linear=True)
    with caplog.at_level("WARNING", logger="livegen.engine.fastpath"):
        worker = Worker(settings)._load(SD)
    assert worker.fast.stats.fp8_linears > 0 and worker.fast.stats.fp8_geglus == 0
    assert [r.message for r in caplog.records if "float8 GEGLUs run as PyTorch ops" in r.message]
    assert not any("forward" in vars(m) for m in worker.fast.unet.modules() if type(m).__name__ == "FeedForward")


def test_probe_finds_the_full_recipe_on_a_cpu() -> None:
    assert fp8.unsupported_reason(torch.device("cpu")) is None
    assert fp8.probe(torch.device("cpu"), torch.float32) == fp8.Recipe(True, None)


def test_probe_takes_a_bfloat16_output_where_per_row_scales_need_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's CUTLASS per-row kernel (sm90 without cuBLAS 12.9) takes only a bfloat16 output:
    the probe then multiplies into bfloat16 with the bias, and the layer casts to its dtype."""
    real = torch._scaled_mm

    def bf16_only(*args: Any, out_dtype: torch.dtype | None = None, **kwargs: Any) -> torch.Tensor:
        if out_dtype != torch.bfloat16:
            raise RuntimeError("Only bf16 high precision output types are supported for row-wise scaling.")
        return real(*args, out_dtype=out_dtype, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", bf16_only)
    recipe = fp8.probe(torch.device("cpu"), torch.float16)
    assert recipe == fp8.Recipe(True, torch.bfloat16)
    layer = linear().half()
    out = fp8.Fp8Linear(layer, recipe)(torch.randn(4, 64).half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_a_device_without_float8_matmuls_keeps_16_bit_layers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where the probe finds no way to call the matmul, the fast path warns and leaves the UNet."""
    import types

    from diffusers import AutoencoderKL, EulerDiscreteScheduler

    from livegen.engine.fastpath import FastOptions, FastPath

    def refuse(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("Only bf16 high precision output types are supported for row-wise scaling.")

    monkeypatch.setattr(torch, "_scaled_mm", refuse)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4)  # fmt: skip
    pipe = types.SimpleNamespace(unet=tiny_unet(), vae=vae, scheduler=EulerDiscreteScheduler())
    with caplog.at_level("WARNING"):
        fast = FastPath(pipe, sdxl=False, tiny_vae=None, device=torch.device("cpu"), dtype=torch.float32,
                        options=FastOptions(fp8_linear=True))  # fmt: skip
    assert fast.stats.fp8_linears == 0
    assert not any(isinstance(m, fp8.Fp8Linear) for m in fast.unet.modules())
    assert "stay in float32" in caplog.text and "row-wise scaling" in caplog.text


def pixels(outputs: Any) -> list[np.ndarray]:
    if isinstance(outputs, Deferred):
        outputs = outputs.result()
    return [np.asarray(im).astype(np.float64) for images in outputs for im in images]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("extra", [{}, {"fuse_qkv": True, "split_geglu": True}], ids=["alone", "with-fused-qkv"])
def test_the_setting_renders_near_the_16_bit_images(shared_data_dir: Path, extra: dict[str, Any]) -> None:
    """``LIVEGEN_FP8_LINEAR`` on the tiny random SD-Turbo (CPU, fp32): the fast path converts the
    UNet's linears and renders images that differ from the full-precision ones, but not by much
    (measured: PSNR 61.1-61.7 dB, at most 2 levels of 255; the bound leaves room for other CPUs and
    fails on a wrong scale: with the inputs' scale doubled, 43.9 dB and 20 levels). With fused QKV
    and split GEGLU too: the fused projections convert, and the GEGLUs keep one (float8) projection."""
    from diffusers.models.activations import GEGLU

    settings = Settings(weights="tiny-random", device="cpu", data_dir=shared_data_dir, fast_path="on", **extra)
    full = Worker(settings)._load(SD)
    eight = Worker(settings.model_copy(update={"fp8_linear": True}))._load(SD)
    unet = eight.fast.unet
    converted = [m for m in unet.modules() if isinstance(m, fp8.Fp8Linear)]
    weights = {m.weight_bytes.untyped_storage().data_ptr() for m in converted}  # fused Q/K/V: views of one
    assert converted and eight.fast.stats.fp8_linears == len(weights)
    assert eight.t2i.unet is unet  # the plain pipeline shares it: the setting changes the model
    assert all(m.quantize is fp8.quantize_rows for m in converted)  # RowQuantizer: CUDA graphs only
    if extra:
        assert any(isinstance(getattr(m, "to_qkv", None), fp8.Fp8Linear) for m in unet.modules())
        assert not any("forward" in vars(m) for m in unet.modules() if isinstance(m, GEGLU))
    batch = [
        GenerationRequest(model_id=SD, task=Task.TEXT_TO_IMAGE, prompt="a fox in the snow", width=64, height=64,
                          num_inference_steps=1, guidance_scale=0.0, seed=s, output_format="png", vae="tiny")
        for s in (1, 2)
    ]  # fmt: skip
    for a, b in zip(pixels(eight(batch)), pixels(full(batch)), strict=True):
        value = psnr(a, b)
        print(f"fp8 {extra} psnr {value:.1f} dB max {np.abs(a - b).max():.0f}")
        assert 45.0 < value < float("inf") and np.abs(a - b).max() <= 8, value
