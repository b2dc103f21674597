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


# Checkpoints whose hub repository went away, by the name fal's API (and livegen) use for them,
# and where the same files are now. RunwayML deleted runwayml/stable-diffusion-v1-5 in 2024;
# stable-diffusion-v1-5/stable-diffusion-v1-5 is the re-upload diffusers' docs now load.
MOVED_ON_THE_HUB = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def hub_repo(repo_id: str) -> str:
    """Where ``repo_id``'s files are on the hub: a moved repository's new home, unless the old one
    is in the local hub cache (downloaded before it went away), which loads as it always did."""
    moved = MOVED_ON_THE_HUB.get(repo_id)
    if moved is None:
        return repo_id
    from huggingface_hub import try_to_load_from_cache

    return repo_id if isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str) else moved


def resolve_source(repo_id: str, settings: Settings) -> str:
    """What to hand to ``from_pretrained`` for ``repo_id`` under ``settings.weights``.

    Synthesizes the checkpoint first for ``random`` / ``tiny-random`` (cached in the data dir).
    """
    weights = settings.weights
    if weights == "hub":
        return hub_repo(repo_id)
    if weights in ("random", "tiny-random"):
        from livegen.engine import synth

        path = synth.ensure_synthesized(repo_id, settings.synth_dir, tiny=weights == "tiny-random")
        return str(path)
    root = Path(weights)
    names = [repo_id] + ([MOVED_ON_THE_HUB[repo_id]] if repo_id in MOVED_ON_THE_HUB else [])
    # Whole names before short ones: PATH/stable-diffusion-v1-5/ may be the re-upload's owner folder.
    forms = [*names] + [n.replace("/", "--") for n in names] + [n.split("/")[-1] for n in names]
    looked = list(dict.fromkeys(forms))
    for candidate in looked:
        if (root / candidate).is_dir():
            return str(root / candidate)
    raise ModelUnavailable(
        f"Checkpoint {repo_id} not found under {root} (looked for {', '.join(f'{c}/' for c in looked)}). "
        f"{alternatives_hint(repo_id)}"
    )
