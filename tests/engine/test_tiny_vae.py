"""The tiny VAE's rewrites (engine/tiny_vae.py) compute what diffusers' AutoencoderTiny computes.

On a CPU the fused convolutions run as plain convolution + ReLU through the same code and custom
ops, and the folded upsampling runs as it would on a GPU (a transposed convolution), so these
tests check the arithmetic, the module surgery, and that torch.compile traces the custom ops
(their fake kernels); tests/gpu/test_fastpath_gpu.py checks the cuDNN calls on CUDA."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny

from livegen.engine import Task
from livegen.engine.tiny_vae import FoldedUpsampleConv, fold_kernel, fold_upsample_convs, fuse_conv_relu
from livegen.engine.worker import Worker
from livegen.settings import Settings
from tests.engine.test_fastpath import SD, SDXL, assert_close, pixels, req


@pytest.mark.parametrize(("h", "w", "bias"), [(7, 6, False), (1, 1, True), (16, 16, True)])
def test_the_folded_kernel_is_nearest_upsampling_then_the_convolution(h: int, w: int, bias: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, h, w, dtype=torch.float64)
    weight = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    b = torch.randn(4, dtype=torch.float64) if bias else None
    expected = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, b, padding=1)
    folded = F.conv_transpose2d(x, fold_kernel(weight), b, stride=2, padding=1)
    assert folded.shape == expected.shape == (2, 4, 2 * h, 2 * w)
    assert (folded - expected).abs().max().item() < 1e-12


def taesd() -> AutoencoderTiny:
    """TAESD's real architecture (diffusers' defaults are madebyollin/taesd's config), random weights."""
    torch.manual_seed(3)
    return AutoencoderTiny().eval()


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_rewritten_taesd_decodes_and_encodes_as_diffusers_does(channels_last: bool) -> None:
    stock = taesd()
    fast = copy.deepcopy(stock)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    fast.to(memory_format=fmt)
    assert fold_upsample_convs(fast) == 3  # the decoder's three upsamplings; the encoder has none
    assert fuse_conv_relu(fast) == 20  # 10 residual blocks in the decoder, 10 in the encoder
    assert fold_upsample_convs(fast) == 0 and fuse_conv_relu(fast) == 0  # once only
    folded = [m for m in fast.modules() if isinstance(m, FoldedUpsampleConv)]
    assert not any(isinstance(m, torch.nn.Upsample) for m in fast.modules())
    assert all(m.kernel.is_contiguous(memory_format=fmt) for m in folded)

    torch.manual_seed(4)
    latents = torch.randn(2, 4, 16, 16).contiguous(memory_format=fmt)
    image = (torch.rand(2, 3, 64, 64) * 2 - 1).contiguous(memory_format=fmt)
    with torch.inference_mode():
        expected, got = stock.decode(latents).sample, fast.decode(latents).sample
        assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
        assert got.is_contiguous(memory_format=fmt)
        expected, got = stock.encode(image).latents, fast.encode(image).latents
        assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()

    # With autograd on, the blocks run as diffusers' own (the custom ops have no backward).
    out = fast.decode(latents).sample
    out.sum().backward()
    assert fast.decoder.layers[0].weight.grad is not None


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_rewritten_taesd_compiles_in_one_graph(backend: str) -> None:
    """The custom ops' fake kernels give dynamo and inductor the outputs' shapes and layouts;
    inductor checks the real strides against them when the compiled code runs."""
    stock = taesd().to(memory_format=torch.channels_last)
    fast = copy.deepcopy(stock)
    fold_upsample_convs(fast)
    fuse_conv_relu(fast)
    latents = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    decode = torch.compile(lambda z: fast.decode(z).sample, backend=backend, fullgraph=True)
    with torch.inference_mode():
        expected = stock.decode(latents).sample
        got = decode(latents)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


@pytest.mark.parametrize("model", [SD, SDXL])
def test_the_settings_give_the_same_images(shared_data_dir: Path, model: str) -> None:
    """``LIVEGEN_TINY_VAE_CONV_RELU`` and ``LIVEGEN_TINY_VAE_FOLD_UPSAMPLE`` (on by default): the
    fast path's images with them match those without (CPU, fp32), text-to-image and image-to-image
    (the encoder)."""
    settings = Settings(weights="tiny-random", device="cpu", data_dir=shared_data_dir, fast_path="on")
    neither = {"tiny_vae_conv_relu": False, "tiny_vae_fold_upsample": False}
    plain = Worker(settings.model_copy(update=neither))._load(model)
    rewritten = Worker(settings)._load(model)
    assert any(isinstance(m, FoldedUpsampleConv) for m in rewritten.fast.tiny_vae.modules())
    assert not any(isinstance(m, FoldedUpsampleConv) for m in plain.fast.tiny_vae.modules())
    batch = [
        req(model, seed=5, vae="tiny"),
        req(model, seed=6, vae="tiny", task=Task.IMAGE_TO_IMAGE, num_inference_steps=2, strength=0.5),
    ]
    for request in batch:
        assert_close(pixels(rewritten([request])), pixels(plain([request])))


def test_a_refused_fused_convolution_falls_back_to_plain_ones(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where cuDNN has no engine for the fused call (here: a CPU tensor sent down the CUDA path,
    which PyTorch refuses), the blocks compute unfused from then on, with one warning."""
    from livegen.engine import tiny_vae

    monkeypatch.setattr(tiny_vae, "_cudnn_failure", [])
    monkeypatch.setattr(tiny_vae, "_fused_on_cuda", lambda x: not tiny_vae._cudnn_failure)
    stock = taesd()
    fast = copy.deepcopy(stock)
    fuse_conv_relu(fast)
    latents = torch.randn(1, 4, 8, 8)
    with torch.inference_mode(), caplog.at_level("WARNING", logger="livegen.engine.tiny_vae"):
        expected = stock.decode(latents).sample
        for _ in range(2):
            got = fast.decode(latents).sample
            assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    assert len(tiny_vae._cudnn_failure) == 1 and "cudnn_convolution_relu" in tiny_vae._cudnn_failure[0]
    warnings = [r.message for r in caplog.records if r.name == "livegen.engine.tiny_vae"]
    assert len(warnings) == 1 and "fall back to plain ones" in warnings[0]
