"""Synthesized random-weight folders: real-size configs match the published parameter counts, tiny folders
load through the same ``from_pretrained`` paths as real checkpoints and generate, and the cache is atomic."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderTiny,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from livegen.engine import synth
from livegen.engine.synth import (
    LCM_LORA_SD15,
    LCM_LORA_SDXL,
    SD15,
    SD_TURBO,
    SDXL_BASE,
    SDXL_TURBO,
    SUPPORTED,
    TAESD,
    TAESDXL,
    ensure_synthesized,
    synthesize,
    unet_config,
)

Build = Callable[[str], Path]

# ARCHITECTURES.md §9
REAL_PARAMS: dict[str, dict[str, int]] = {
    SD_TURBO: {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    SD15: {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    SDXL_TURBO: {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
    SDXL_BASE: {
        "unet": 2_567_463_684,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
        "text_encoder_2": 694_659_840,
    },
    TAESD: {"": 2_445_063},
    TAESDXL: {"": 2_445_063},
}
PIPELINE_CLASS = {
    SD_TURBO: StableDiffusionPipeline,
    SD15: StableDiffusionPipeline,
    SDXL_TURBO: StableDiffusionXLPipeline,
    SDXL_BASE: StableDiffusionXLPipeline,
}
DEFAULT_SIZE = {SD_TURBO: 512, SD15: 512, SDXL_TURBO: 512, SDXL_BASE: 1024}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synth-cache")


@pytest.fixture(scope="module")
def build(cache_root: Path) -> Build:
    return lambda repo_id: ensure_synthesized(repo_id, cache_root, tiny=True)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _generate(
    pipe: StableDiffusionPipeline | StableDiffusionXLPipeline, size: int = 512, guidance_scale: float = 0.0
) -> np.ndarray:
    image = pipe(
        "a photo of a cat",
        num_inference_steps=1,
        guidance_scale=guidance_scale,
        height=size,
        width=size,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, size, size, 3)
    assert np.isfinite(image).all()
    return image


def test_unknown_repo_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot synthesize"):
        synthesize("someone/else", tmp_path, tiny=True)
    with pytest.raises(ValueError, match="no UNet"):
        unet_config(TAESD, tiny=True)


@pytest.mark.parametrize("repo_id", list(REAL_PARAMS))
def test_real_size_configs_have_published_parameter_counts(repo_id: str) -> None:
    counts = {}
    for name, (cls, cfg) in synth._model_configs(repo_id, tiny=False).items():
        with init_empty_weights():
            counts[name] = _params(synth._instantiate(cls, cfg))
    assert counts == REAL_PARAMS[repo_id]
    if "unet" in counts:
        assert synth._model_configs(repo_id, tiny=False)["unet"][1] == unet_config(repo_id, tiny=False)


def test_real_unet_config_values() -> None:
    xl = unet_config(SDXL_TURBO, tiny=False)
    assert (xl["cross_attention_dim"], xl["projection_class_embeddings_input_dim"]) == (2048, 2816)
    assert unet_config(SD_TURBO, tiny=False)["cross_attention_dim"] == 1024
    assert unet_config(SD15, tiny=False)["cross_attention_dim"] == 768
    assert unet_config(SDXL_BASE, tiny=False)["sample_size"] == 128
    assert unet_config(LCM_LORA_SDXL, tiny=False) == unet_config(SDXL_BASE, tiny=False)


@pytest.mark.parametrize(
    ("repo_id", "params", "modules"), [(LCM_LORA_SD15, 67_252_224, 278), (LCM_LORA_SDXL, 196_751_360, 788)]
)
def test_real_lcm_lora_shapes(repo_id: str, params: int, modules: int) -> None:
    shapes = synth._lora_shapes(repo_id, tiny=False)
    assert sum(s.numel() for s in shapes.values()) == params  # ARCHITECTURES.md §9 (analytic)
    assert len(shapes) == 2 * modules
    assert {s[0] for k, s in shapes.items() if "lora_A" in k} == {64}


@pytest.mark.parametrize("repo_id", [SD_TURBO, SD15, SDXL_TURBO, SDXL_BASE])
def test_tiny_unet_keeps_real_structure(repo_id: str) -> None:
    real, tiny = unet_config(repo_id, tiny=False), unet_config(repo_id, tiny=True)
    same = [
        "down_block_types",
        "up_block_types",
        "mid_block_type",
        "sample_size",
        "addition_embed_type",
        "use_linear_projection",
        "in_channels",
        "out_channels",
    ]
    assert {k: tiny.get(k) for k in same} == {k: real.get(k) for k in same}
    assert max(tiny["block_out_channels"]) <= 64
    if repo_id in (SDXL_TURBO, SDXL_BASE):
        assert tiny["cross_attention_dim"] == 32 + 32
        assert tiny["projection_class_embeddings_input_dim"] == 32 + 6 * tiny["addition_time_embed_dim"]


def test_real_size_taesd_is_written_in_fp16_and_loads(tmp_path: Path) -> None:
    folder = synthesize(TAESD, tmp_path / "taesd", tiny=False)
    vae = AutoencoderTiny.from_pretrained(folder)
    assert _params(vae) == 2_445_063
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}


def test_tokenizers_are_the_real_clip_bpe(build: Build) -> None:
    turbo = CLIPTokenizer.from_pretrained(build(SD_TURBO) / "tokenizer")
    sd15 = CLIPTokenizer.from_pretrained(build(SD15) / "tokenizer")
    ids = [49406, 320, 1125, 539, 320, 2368, 49407]
    for tok, pad in ((turbo, 0), (sd15, 49407)):
        assert tok("a photo of a cat").input_ids == ids
        padded = tok("a photo of a cat", padding="max_length", max_length=tok.model_max_length).input_ids
        assert padded == ids + [pad] * (77 - len(ids))
    xl = build(SDXL_TURBO)
    assert CLIPTokenizer.from_pretrained(xl / "tokenizer").pad_token_id == 49407
    assert CLIPTokenizer.from_pretrained(xl / "tokenizer_2").pad_token_id == 0
    assert (xl / "tokenizer" / "vocab.json").is_file() and (xl / "tokenizer" / "merges.txt").is_file()


@pytest.mark.parametrize("repo_id", list(PIPELINE_CLASS))
def test_tiny_pipeline_loads_and_generates(build: Build, repo_id: str) -> None:
    folder = build(repo_id)
    pipe = PIPELINE_CLASS[repo_id].from_pretrained(folder)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == DEFAULT_SIZE[repo_id]
    assert pipe.vae_scale_factor == 8
    assert dict(pipe.unet.config) == {**dict(pipe.unet.config), **unet_config(repo_id, tiny=True)}
    _generate(pipe)


def test_lcm_lora_fuses_into_tiny_sd15_and_taesd_swaps_in(build: Build) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(build(SD15))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_lora_weights(build(LCM_LORA_SD15))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any("to_q" in k for k in changed) and any("conv1" in k for k in changed)
    pipe.vae = AutoencoderTiny.from_pretrained(build(TAESD))
    _generate(pipe, guidance_scale=1.0)


def test_lcm_lora_sdxl_and_taesdxl_fit_tiny_sdxl(build: Build) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(build(SDXL_BASE))
    attn = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    before = (pipe.unet.conv_in.weight.clone(), attn.to_k.weight.clone())
    pipe.load_lora_weights(build(LCM_LORA_SDXL))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert torch.equal(before[0], pipe.unet.conv_in.weight)  # not a LoRA target
    assert not torch.equal(before[1], attn.to_k.weight)  # cross-attention over the 64-d (te1 + te2) context
    pipe.vae = AutoencoderTiny.from_pretrained(build(TAESDXL))
    _generate(pipe, size=64)


def _weights(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}


def test_same_seed_gives_identical_bytes(build: Build, tmp_path: Path) -> None:
    for repo_id in (SD_TURBO, LCM_LORA_SD15):
        again = synthesize(repo_id, tmp_path / repo_id.replace("/", "--"), tiny=True, seed=0)
        assert _weights(again) == _weights(build(repo_id))
    other = synthesize(TAESD, tmp_path / "seed1", tiny=True, seed=1)
    assert _weights(other) != _weights(build(TAESD))


def test_ensure_synthesized_reuses_the_cached_folder(build: Build, cache_root: Path) -> None:
    folder = build(TAESD)
    assert folder == cache_root / "tiny-random" / "madebyollin--taesd"
    marker = folder / synth.MARKER
    stamp = marker.stat().st_mtime_ns
    assert build(TAESD) == folder
    assert marker.stat().st_mtime_ns == stamp


def test_ensure_synthesized_replaces_an_incomplete_folder(tmp_path: Path) -> None:
    final = tmp_path / "tiny-random" / "madebyollin--taesd"
    final.mkdir(parents=True)
    (final / "junk").write_text("half-written")
    assert ensure_synthesized(TAESD, tmp_path, tiny=True) == final
    assert not (final / "junk").exists()
    assert AutoencoderTiny.from_pretrained(final).config.latent_channels == 4
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # no temp dirs left over


def test_ensure_synthesized_loser_of_a_race_discards_its_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    final = tmp_path / "tiny-random" / "madebyollin--taesd"
    real_synthesize = synth.synthesize

    def racing(repo_id: str, dest: Path, *, tiny: bool, seed: int = 0) -> Path:
        real_synthesize(repo_id, final, tiny=tiny, seed=seed)  # another process finishes first
        return real_synthesize(repo_id, dest, tiny=tiny, seed=seed)

    monkeypatch.setattr(synth, "synthesize", racing)
    assert ensure_synthesized(TAESD, tmp_path, tiny=True) == final
    stamp_before = (final / synth.MARKER).stat().st_mtime_ns
    assert [p.name for p in final.parent.iterdir()] == [final.name]
    monkeypatch.setattr(synth, "synthesize", real_synthesize)
    assert ensure_synthesized(TAESD, tmp_path, tiny=True) == final
    assert (final / synth.MARKER).stat().st_mtime_ns == stamp_before


def test_supported_ids() -> None:
    assert set(SUPPORTED) == set(REAL_PARAMS) | {LCM_LORA_SD15, LCM_LORA_SDXL}
