"""Random-weight stand-ins for the checkpoints livegen serves.

livegen cannot download weights in CI or on air-gapped benchmark boxes, yet the engine must be exercised
through the very same ``from_pretrained`` code path that loads real checkpoints. This module writes
diffusers-format folders with seeded random weights:

* ``tiny=False`` ("random"): the exact architectures of the public checkpoints (configs from
  shared/ARCHITECTURES.md, identical parameter counts), saved as fp16 safetensors, for GPU benchmarks;
* ``tiny=True`` ("tiny-random"): the same structure (block types, SDXL's text-time embedding, the 8x VAE
  downscale, the LCM-LoRA target modules, ``sample_size`` and hence default resolutions) at toy widths, for
  CPU tests.

Tokenizers are the real CLIP BPE tokenizer, rebuilt offline from the vendored OpenAI/OpenCLIP merges file.
Weights are the models' default initialisation under ``torch.manual_seed``: a seed always gives the same
bytes.
"""

from __future__ import annotations

import functools
import gc
import gzip
import importlib.resources
import json
import logging
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

logger = logging.getLogger(__name__)

SD_TURBO, SDXL_TURBO = "stabilityai/sd-turbo", "stabilityai/sdxl-turbo"
SD15, SDXL_BASE = "runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-xl-base-1.0"
LCM_LORA_SD15, LCM_LORA_SDXL = "latent-consistency/lcm-lora-sdv1-5", "latent-consistency/lcm-lora-sdxl"
TAESD, TAESDXL = "madebyollin/taesd", "madebyollin/taesdxl"
SUPPORTED: tuple[str, ...] = (
    SD_TURBO,
    SDXL_TURBO,
    SD15,
    SDXL_BASE,
    LCM_LORA_SD15,
    LCM_LORA_SDXL,
    TAESD,
    TAESDXL,
)

MARKER = ".livegen-synth-complete"
_SDXL = (SDXL_TURBO, SDXL_BASE)
_PIPELINES = (SD_TURBO, SDXL_TURBO, SD15, SDXL_BASE)
_LORA_BASE = {LCM_LORA_SD15: SD15, LCM_LORA_SDXL: SDXL_BASE}

# ---- configs (ARCHITECTURES.md; keys changing neither shapes nor numerics stay at diffusers defaults) ----

_UNET_COMMON: dict[str, Any] = {
    "act_fn": "silu",
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "sample_size": 64,
    "upcast_attention": None,
    "time_embedding_type": "positional",
    "addition_embed_type_num_heads": 64,
}
_SD_BLOCKS: dict[str, Any] = {
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
_UNET: dict[str, dict[str, Any]] = {
    SD15: {**_SD_BLOCKS, "attention_head_dim": 8, "cross_attention_dim": 768, "use_linear_projection": False},
    SD_TURBO: {
        **_SD_BLOCKS,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
    },
    SDXL_TURBO: {
        "block_out_channels": [320, 640, 1280],
        "attention_head_dim": [5, 10, 20],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10],
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}
_UNET[SDXL_BASE] = {**_UNET[SDXL_TURBO], "sample_size": 128}

_VAE_COMMON: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
_VAE: dict[str, dict[str, Any]] = {
    SD15: {**_VAE_COMMON, "sample_size": 512, "scaling_factor": 0.18215},
    SD_TURBO: {**_VAE_COMMON, "sample_size": 768, "scaling_factor": 0.18215, "force_upcast": True},
    SDXL_TURBO: {**_VAE_COMMON, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
}
_VAE[SDXL_BASE] = _VAE[SDXL_TURBO]

_TAESD: dict[str, Any] = {  # the real file also has block_out_channels [64]*4, which AutoencoderTiny ignores
    "act_fn": "relu",
    "encoder_block_out_channels": [64] * 4,
    "decoder_block_out_channels": [64] * 4,
    "force_upcast": False,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "latent_magnitude": 3,
    "latent_shift": 0.5,
    "num_encoder_blocks": [1, 3, 3, 3],
    "num_decoder_blocks": [3, 3, 3, 1],
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "upsample_fn": "nearest",
    "upsampling_scaling_factor": 2,
}

_CLIP_COMMON: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "pad_token_id": 1,
    "vocab_size": 49408,
}
_CLIP_L = {
    **_CLIP_COMMON,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
}
_OPENCLIP_H = {
    **_CLIP_COMMON,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
}
_OPENCLIP_BIGG = {
    **_CLIP_COMMON,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
}
_TINY_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "projection_dim": 32,
}
# (component, model class, config, tokenizer pad token) per pipeline
_TEXT: dict[str, list[tuple[str, type, dict[str, Any], str]]] = {
    SD15: [("text_encoder", CLIPTextModel, _CLIP_L, "<|endoftext|>")],
    SD_TURBO: [("text_encoder", CLIPTextModel, _OPENCLIP_H, "!")],
    SDXL_TURBO: [
        ("text_encoder", CLIPTextModel, _CLIP_L, "<|endoftext|>"),
        ("text_encoder_2", CLIPTextModelWithProjection, _OPENCLIP_BIGG, "!"),
    ],
}
_TEXT[SDXL_BASE] = _TEXT[SDXL_TURBO]

_BETAS: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}
_EULER: dict[str, Any] = {
    **_BETAS,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_type": "discrete",
    "sigma_min": None,
    "sigma_max": None,
}
_SCHEDULER: dict[str, tuple[Any, dict[str, Any]]] = {
    SD15: (PNDMScheduler, {**_BETAS, "skip_prk_steps": True, "set_alpha_to_one": False}),
    SD_TURBO: (EulerDiscreteScheduler, {**_EULER, "timestep_spacing": "trailing"}),
    SDXL_TURBO: (EulerAncestralDiscreteScheduler, {**_BETAS, "timestep_spacing": "trailing"}),
    SDXL_BASE: (EulerDiscreteScheduler, {**_EULER, "timestep_spacing": "leading"}),
}
_NULL = [None, None]
_MODEL_INDEX_EXTRAS: dict[str, dict[str, Any]] = {
    SD15: {
        "safety_checker": _NULL,
        "feature_extractor": _NULL,
        "image_encoder": _NULL,
        "requires_safety_checker": False,
    },
    SD_TURBO: {
        "safety_checker": _NULL,
        "feature_extractor": _NULL,
        "image_encoder": _NULL,
        "requires_safety_checker": True,
    },
    SDXL_TURBO: {"feature_extractor": _NULL, "image_encoder": _NULL, "force_zeros_for_empty_prompt": True},
    SDXL_BASE: {
        "feature_extractor": _NULL,
        "image_encoder": _NULL,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": None,
    },
}
_LCM_TARGETS = [  # train_lcm_distill_lora_sd(xl)_wds.py defaults
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
]


def _check(repo_id: str) -> None:
    if repo_id not in SUPPORTED:
        raise ValueError(f"cannot synthesize {repo_id!r}; supported: {', '.join(SUPPORTED)}")


def _text_encoder_config(cfg: dict[str, Any], *, tiny: bool) -> dict[str, Any]:
    return {**cfg, **_TINY_CLIP} if tiny else dict(cfg)


def unet_config(repo_id: str, *, tiny: bool) -> dict:
    """The UNet config synthesized for `repo_id` (for an LCM-LoRA repo: the UNet of its base model)."""
    _check(repo_id)
    repo_id = _LORA_BASE.get(repo_id, repo_id)
    if repo_id not in _UNET:
        raise ValueError(f"{repo_id!r} has no UNet")
    cfg = {**_UNET_COMMON, **_UNET[repo_id]}
    if tiny:
        widths = [32, 32, 64, 64] if len(cfg["block_out_channels"]) == 4 else [32, 64, 64]
        heads = cfg["attention_head_dim"]
        cfg |= {
            "block_out_channels": widths,
            "layers_per_block": 1,
            "norm_num_groups": 8,
            "attention_head_dim": 2 if isinstance(heads, int) else [w // 16 for w in widths],
        }
        if isinstance(cfg.get("transformer_layers_per_block"), list):
            cfg["transformer_layers_per_block"] = [min(d, 2) for d in cfg["transformer_layers_per_block"]]
        if cfg.get("addition_time_embed_dim"):
            cfg["addition_time_embed_dim"] = 8
    # Conditioning widths follow the text encoders (and equal the published values at full size).
    encoders = [_text_encoder_config(c, tiny=tiny) for _, _, c, _ in _TEXT[repo_id]]
    cfg["cross_attention_dim"] = sum(c["hidden_size"] for c in encoders)
    if cfg.get("addition_embed_type") == "text_time":
        cfg["projection_class_embeddings_input_dim"] = (
            encoders[-1]["projection_dim"] + 6 * cfg["addition_time_embed_dim"]
        )
    return cfg


def _vae_config(repo_id: str, *, tiny: bool) -> dict[str, Any]:
    cfg = dict(_VAE[repo_id])
    if tiny:  # four levels kept: 8x spatial downscale like the real VAE
        cfg |= {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8}
    return cfg


def _taesd_config(*, tiny: bool) -> dict[str, Any]:
    cfg = dict(_TAESD)
    if tiny:
        cfg |= {
            "encoder_block_out_channels": [8] * 4,
            "decoder_block_out_channels": [8] * 4,
            "num_encoder_blocks": [1] * 4,
            "num_decoder_blocks": [1] * 4,
        }
    return cfg


def _model_configs(repo_id: str, *, tiny: bool) -> dict[str, tuple[type, dict[str, Any]]]:
    """Component sub-folder ("" = the folder itself) -> (model class, config) of every weight file written."""
    _check(repo_id)
    if repo_id in (TAESD, TAESDXL):
        return {"": (AutoencoderTiny, _taesd_config(tiny=tiny))}
    if repo_id in _LORA_BASE:
        return {}
    models = {
        "unet": (UNet2DConditionModel, unet_config(repo_id, tiny=tiny)),
        "vae": (AutoencoderKL, _vae_config(repo_id, tiny=tiny)),
    }
    for name, cls, cfg, _ in _TEXT[repo_id]:
        models[name] = (cls, _text_encoder_config(cfg, tiny=tiny))
    return models


def _instantiate(cls: Any, cfg: dict[str, Any]) -> Any:
    if issubclass(cls, CLIPTextModel | CLIPTextModelWithProjection):
        return cls(CLIPTextConfig(**cfg))
    return cls.from_config(cfg)


@contextmanager
def _seeded(seed: int, name: str) -> Iterator[None]:
    """Seed torch's global RNG per component (independent of build order); the caller's RNG is restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        yield


# ---- tokenizers (ARCHITECTURES.md §8.2) ----


def _bytes_to_unicode() -> dict[int, str]:
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


@functools.cache
def _clip_bpe() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """vocab and merges of the CLIP tokenizer, from the vendored OpenAI BPE file (runs once per process)."""
    gz = importlib.resources.files("livegen.engine") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(gz.read_bytes()).decode("utf-8").split("\n")
    merges = tuple((a, b) for a, b in (line.split() for line in lines[1 : 49152 - 256 - 2 + 1]))
    tokens = list(_bytes_to_unicode().values())
    tokens += [t + "</w>" for t in tokens]
    tokens += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


@functools.cache
def _vocab_files() -> tuple[str, str]:
    """vocab.json / merges.txt as in the hub repos (read by transformers 4.x's slow CLIPTokenizer)."""
    vocab, merges = _clip_bpe()
    return json.dumps(vocab, ensure_ascii=False), "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)


def _write_tokenizer(dest: Path, pad_token: str) -> None:
    vocab, merges = _clip_bpe()
    tok = CLIPTokenizer(
        dict(vocab),
        list(merges),
        pad_token=pad_token,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        model_max_length=77,
    )
    tok.save_pretrained(dest)
    vocab_json, merges_txt = _vocab_files()
    (dest / "vocab.json").write_text(vocab_json, encoding="utf-8")
    (dest / "merges.txt").write_text(merges_txt, encoding="utf-8")


# ---- writers ----


def _write_model(cls: type, cfg: dict[str, Any], dest: Path, *, tiny: bool, seed: int, name: str) -> None:
    with _seeded(seed, name):
        model = _instantiate(cls, cfg)
    if not tiny:
        model.half()
    model.save_pretrained(dest, safe_serialization=True)
    del model
    if not tiny:  # free gigabytes before the next component (a full collection costs ~0.3 s)
        gc.collect()


def _write_pipeline(repo_id: str, dest: Path, *, tiny: bool, seed: int) -> None:
    pipe_cls = StableDiffusionXLPipeline if repo_id in _SDXL else StableDiffusionPipeline
    index: dict[str, Any] = {
        "_class_name": pipe_cls.__name__,
        "_diffusers_version": diffusers.__version__,
        **_MODEL_INDEX_EXTRAS[repo_id],
    }
    for name, (cls, cfg) in _model_configs(repo_id, tiny=tiny).items():
        _write_model(cls, cfg, dest / name, tiny=tiny, seed=seed, name=name)
        library = "diffusers" if cls.__module__.startswith("diffusers") else "transformers"
        index[name] = [library, cls.__name__]
    for enc_name, _, _, pad in _TEXT[repo_id]:
        tok_name = enc_name.replace("text_encoder", "tokenizer")
        _write_tokenizer(dest / tok_name, pad)
        index[tok_name] = ["transformers", "CLIPTokenizer"]
    sched_cls, sched_cfg = _SCHEDULER[repo_id]
    sched_cls.from_config(sched_cfg).save_pretrained(dest / "scheduler")
    index["scheduler"] = ["diffusers", sched_cls.__name__]
    (dest / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")


def _lora_shapes(repo_id: str, *, tiny: bool) -> dict[str, torch.Size]:
    """peft-format LoRA keys -> shapes of an LCM-LoRA: rank 64 / alpha 64 (tiny: 4 / 4) on the training
    script's target modules, found by adapting the base UNet built on the meta device (no storage)."""
    from accelerate import init_empty_weights
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    rank = 4 if tiny else 64
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_config(_LORA_BASE[repo_id], tiny=tiny))
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=_LCM_TARGETS))
    return {k: v.shape for k, v in sorted(get_peft_model_state_dict(unet).items())}


def _write_lora(repo_id: str, dest: Path, *, tiny: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    layers: dict[str, torch.Tensor] = {}
    for key, shape in _lora_shapes(repo_id, tiny=tiny).items():
        # A at a default-like scale for its fan-in; B small but non-zero (peft would start it at zero, making
        # the fused LoRA a no-op): the fused update is ~10% of a weight's scale whatever the rank.
        std = (1.0 if "lora_A" in key else 0.1) / shape[1:].numel() ** 0.5
        layers[key] = (torch.randn(shape, generator=gen) * std).to(torch.float32 if tiny else torch.float16)
    pipe_cls = StableDiffusionXLPipeline if _LORA_BASE[repo_id] in _SDXL else StableDiffusionPipeline
    pipe_cls.save_lora_weights(dest, unet_lora_layers=layers)


def synthesize(repo_id: str, dest: Path, *, tiny: bool, seed: int = 0) -> Path:
    """Write a diffusers-format folder for `repo_id` into `dest` (created). Returns dest."""
    _check(repo_id)
    start = time.perf_counter()
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if repo_id in _LORA_BASE:
        _write_lora(repo_id, dest, tiny=tiny, seed=seed)
    elif repo_id in _PIPELINES:
        _write_pipeline(repo_id, dest, tiny=tiny, seed=seed)
    else:
        ((cls, cfg),) = _model_configs(repo_id, tiny=tiny).values()
        _write_model(cls, cfg, dest, tiny=tiny, seed=seed, name=repo_id)
    # Written last: its presence means the folder is complete.
    (dest / MARKER).write_text(json.dumps(_marker(repo_id, tiny=tiny, seed=seed)) + "\n")
    logger.info(
        "synthesized %s weights for %s (seed %d) in %.1f s into %s",
        "tiny-random" if tiny else "random",
        repo_id,
        seed,
        time.perf_counter() - start,
        dest,
    )
    return dest


def _marker(repo_id: str, *, tiny: bool, seed: int) -> dict[str, Any]:
    return {"repo_id": repo_id, "tiny": tiny, "seed": seed}


def _is_complete(folder: Path, expected: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()) == expected
    except (OSError, ValueError):
        return False


def ensure_synthesized(repo_id: str, cache_root: Path, *, tiny: bool, seed: int = 0) -> Path:
    """Cached `synthesize`: cache_root/{tiny-random|random}/<repo_id with '/' -> '--'>.

    Built in a temp dir beside the target and renamed into place, so a crash never leaves a half folder and
    two racing processes are safe (the loser discards its copy). A folder built with another seed is rebuilt
    (so processes wanting different seeds should not share a cache_root).
    """
    _check(repo_id)
    final = Path(cache_root) / ("tiny-random" if tiny else "random") / repo_id.replace("/", "--")
    expected = _marker(repo_id, tiny=tiny, seed=seed)
    if _is_complete(final, expected):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        synthesize(repo_id, tmp, tiny=tiny, seed=seed)
        for _ in range(3):
            try:
                os.replace(tmp, final)
                return final
            except OSError:  # target exists: a racing process won, or a stale/other-seed folder is in the way
                if _is_complete(final, expected):
                    return final
                _discard(final)
        raise RuntimeError(f"could not move synthesized weights into {final}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _discard(folder: Path) -> None:
    """Rename aside, then delete: the target path is never seen half-deleted."""
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
    try:
        os.replace(folder, trash / folder.name)
    except FileNotFoundError:
        pass
    shutil.rmtree(trash, ignore_errors=True)
