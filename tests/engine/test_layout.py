"""engine/layout.py: a channels_last UNet's activations kept channels_last (``LIVEGEN_KEEP_CHANNELS_LAST``).

What a GPU run would time is checked here as layout and values: the transformer blocks' outputs
come back channels_last with the same values, and inductor's post-grad pass pins concatenations
(real inductor on a CPU, for a small graph) without changing what the graph computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from livegen.engine import layout
from livegen.engine.fastpath import compile_options
from livegen.engine.worker import Worker
from livegen.settings import Settings
from tests.engine.test_fastpath import SD, assert_close, pixels, req, tiny_unet

CL = torch.channels_last


@pytest.mark.parametrize("linear_projection", [True, False], ids=["linear-proj", "conv-proj"])
def test_transformer_blocks_stop_copying_their_output_to_nchw(
    linear_projection: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a (tiny) channels_last UNet, for both projection kinds (SD 2.x/XL's linear, SD 1.5's 1x1
    convolution): each transformer block's output used to be copied to NCHW (``.contiguous()`` on
    its channels_last view); after the rewrite those copies are gone at batch 2 and kept at batch
    1, a second call changes nothing, and the UNet's output is unchanged. (Whether the add after it then comes out NCHW
    depends on the device's rule for mixed layouts: on a CPU it does not, in inductor's traced
    graph for CUDA it does; the compile test below checks what inductor is handed.)"""
    from diffusers import UNet2DConditionModel

    config = {**tiny_unet().config, "use_linear_projection": linear_projection}
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval().to(memory_format=CL)
    blocks = sum(1 for m in unet.modules() if type(m).__name__ == "Transformer2DModel")
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 16, 16).to(memory_format=CL)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim)
    copies: list[tuple[int, ...]] = []
    real = torch.Tensor.contiguous

    def counting(t: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = real(t, *args, **kwargs)
        if out is not t and t.dim() == 4:
            copies.append(tuple(t.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "contiguous", counting)
    with torch.inference_mode():
        before = unet(latents, 999, encoder_hidden_states=embeds).sample
        copied = len(copies)
        assert copied >= blocks > 0
        copies.clear()
        assert layout.transformer_outputs_channels_last(unet) == blocks
        assert layout.transformer_outputs_channels_last(unet) == 0
        after = unet(latents, 999, encoder_hidden_states=embeds).sample
        assert len(copies) == copied - blocks
        copies.clear()
        one = unet(latents[:1], 999, encoder_hidden_states=embeds[:1]).sample  # batch 1: diffusers' copies
    assert len(copies) == copied
    assert (before - after).abs().max().item() <= 1e-5 * before.abs().max().item()
    assert (before[:1] - one).abs().max().item() <= 1e-5 * before.abs().max().item()


class SkipBlock(torch.nn.Module):
    """An up block's resnet input in small: a concatenation of two channels_last activations, then
    a GroupNorm + SiLU + convolution beside a 1x1 shortcut convolution of the same concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 32)
        self.conv = torch.nn.Conv2d(32, 16, 3, padding=1)
        self.shortcut = torch.nn.Conv2d(32, 16, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.a(x), skip * 0.5], dim=1)
        return self.conv(torch.nn.functional.silu(self.norm(h))) + self.shortcut(h)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic-batch"])
def test_cat_pass_pins_channels_last_cats_and_computes_the_same(dynamic: bool, tmp_path: Path) -> None:
    """Real inductor (CPU, C++ kernels): the post-grad pass pins the block's channels_last cat, with a
    static or a dynamic batch, and the compiled block computes what the eager one does. An NCHW cat
    is left alone."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    block = SkipBlock().eval().to(memory_format=CL)
    torch.manual_seed(2)
    x = torch.randn(3, 8, 8, 8).to(memory_format=CL)
    skip = torch.randn(3, 16, 8, 8).to(memory_format=CL)
    if dynamic:
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(skip, 0)
    cat_pass = layout.channels_last_cat_pass()
    options = compile_options("default", {"post_grad_custom_post_pass": cat_pass})
    torch._dynamo.reset()
    try:
        with inductor_config.patch(force_disable_caches=True), torch.inference_mode():
            expected = block(x, skip)
            compiled = torch.compile(block.forward, dynamic=dynamic, options=options)
            got = compiled(x, skip)
            assert cat_pass.pinned == 1
            nchw = torch.compile(block.forward, options=options)
            nchw(x.contiguous(), skip.contiguous())
            assert cat_pass.pinned == 1  # traced NCHW: nothing to pin
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_channels_last_strides_are_read_without_guessing() -> None:
    """The pass pins only what is channels_last and not NCHW at once (C or H*W of 1 is both), and
    only batches of more than one image."""
    strides = layout._channels_last_strides
    assert strides(torch.empty(2, 6, 4, 5).to(memory_format=CL)) == [120, 1, 30, 6]
    assert strides(torch.empty(2, 6, 4, 5)) is None
    assert strides(torch.empty(2, 1, 4, 5).to(memory_format=CL)) is None
    assert strides(torch.empty(2, 6, 1, 1).to(memory_format=CL)) is None
    assert strides(torch.empty(6, 4, 5)) is None
    assert strides(torch.empty(1, 6, 4, 5).to(memory_format=CL)) is None  # a batch of one is left as traced


def test_compile_options_keep_the_mode_and_add_the_pass() -> None:
    cat_pass = layout.channels_last_cat_pass()
    extra = {"post_grad_custom_post_pass": cat_pass, "split_reductions": False}
    assert compile_options("default", extra) == extra
    assert compile_options("reduce-overhead", extra)["triton.cudagraphs"] is True
    assert compile_options("reduce-overhead", extra)["split_reductions"] is False
    assert cat_pass.uuid() == layout.PASS_VERSION


def test_keep_channels_last_setting_gives_the_same_images_and_compiles_with_the_pass(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``LIVEGEN_KEEP_CHANNELS_LAST`` (on by default): the transformer blocks are rewritten (not without
    channels_last) and the fast path's images match those without it (CPU, fp32); with
    torch_compile the UNet and the decodes are compiled with inductor's mode options plus the pass
    (torch.compile is recorded, not run)."""
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    plain = Worker(settings.model_copy(update={"keep_channels_last": False}))._load(SD)
    kept = Worker(settings)._load(SD)
    blocks = [m for m in kept.fast.unet.modules() if isinstance(m, Transformer2DModel)]
    assert blocks and all("_get_output_for_continuous_inputs" in vars(m) for m in blocks)
    batch = [req(SD, seed=s, vae="tiny") for s in (5, 6)]
    assert_close(pixels(kept(batch)), pixels(plain(batch)))
    nchw = Worker(settings.model_copy(update={"keep_channels_last": True, "channels_last": False}))._load(SD)
    assert not any("_get_output_for_continuous_inputs" in vars(m) for m in nchw.fast.unet.modules())

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(kw) or fn)
    compiled = Worker(settings.model_copy(update={"keep_channels_last": True, "torch_compile": "reduce-overhead"}))
    fast = compiled._load(SD).fast
    fast._compile()
    assert len(calls) >= 2 and all("mode" not in kw for kw in calls)
    passes = {id(kw["options"]["post_grad_custom_post_pass"]) for kw in calls}
    assert passes == {id(fast._cat_pass)} and all(kw["options"]["triton.cudagraphs"] for kw in calls)


@pytest.fixture(scope="module")
def settings(shared_data_dir: Path) -> Settings:
    return Settings(weights="tiny-random", device="cpu", data_dir=shared_data_dir, fast_path="on")
