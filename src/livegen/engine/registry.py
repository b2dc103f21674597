"""Which checkpoints each servable model is made of, and where their weights come from.

A *model* is what a request's ``model_name`` names. Each one is a base checkpoint, optionally
an LCM-LoRA fused into its UNet at load, and a tiny VAE used when ``--tiny-vae`` is on.
Weights come from ``--weights``: the Hugging Face hub (or its local cache), a local folder of
diffusers folders, or checkpoints synthesized by ``engine.synth`` with random weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from livegen.protocol.errors import ModelUnavailable
from livegen.settings import Settings

Family = Literal["sd_turbo", "sdxl_turbo", "lcm"]


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    family: Family
    base_repo: str
    tiny_vae_repo: str
    lora_repo: str | None = None
    sdxl: bool = False


MODELS: dict[str, ModelSpec] = {
    s.model_id: s
    for s in (
        ModelSpec("stabilityai/sd-turbo", "sd_turbo", "stabilityai/sd-turbo", "madebyollin/taesd"),
        ModelSpec("stabilityai/sdxl-turbo", "sdxl_turbo", "stabilityai/sdxl-turbo", "madebyollin/taesdxl", sdxl=True),
        ModelSpec(
            "runwayml/stable-diffusion-v1-5",
            "lcm",
            "runwayml/stable-diffusion-v1-5",
            "madebyollin/taesd",
            lora_repo="latent-consistency/lcm-lora-sdv1-5",
        ),
        ModelSpec(
            "stabilityai/stable-diffusion-xl-base-1.0",
            "lcm",
            "stabilityai/stable-diffusion-xl-base-1.0",
            "madebyollin/taesdxl",
            lora_repo="latent-consistency/lcm-lora-sdxl",
            sdxl=True,
        ),
    )
}


def spec_for(model_id: str) -> ModelSpec:
    try:
        return MODELS[model_id]
    except KeyError:
        raise ModelUnavailable(f"Unknown model {model_id!r}; livegen serves: {', '.join(MODELS)}") from None


def alternatives_hint(model_id: str) -> str:
    return (
        f"To serve {model_id} offline, download it elsewhere and pass --weights PATH (a folder holding "
        f"one diffusers folder per checkpoint, e.g. PATH/{model_id}), or use --weights random to try "
        f"the API with random weights (images are noise), or leave it out of --models."
    )


def resolve_source(repo_id: str, settings: Settings) -> str:
    """What to hand to ``from_pretrained`` for ``repo_id`` under ``settings.weights``.

    Synthesizes the checkpoint first for ``random`` / ``tiny-random`` (cached in the data dir).
    """
    weights = settings.weights
    if weights == "hub":
        return repo_id
    if weights in ("random", "tiny-random"):
        from livegen.engine import synth

        path = synth.ensure_synthesized(repo_id, settings.synth_dir, tiny=weights == "tiny-random")
        return str(path)
    root = Path(weights)
    for candidate in (root / repo_id, root / repo_id.replace("/", "--"), root / repo_id.split("/")[-1]):
        if candidate.is_dir():
            return str(candidate)
    raise ModelUnavailable(
        f"Checkpoint {repo_id} not found under {root} (looked for {repo_id}/, "
        f"{repo_id.replace('/', '--')}/ and {repo_id.split('/')[-1]}/). {alternatives_hint(repo_id)}"
    )
