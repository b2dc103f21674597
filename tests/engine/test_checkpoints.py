"""Where a checkpoint's files come from: the fp16 files a model card loads, a checkpoint with only
one kind of files, SD 1.5's moved hub repository, and folders under ``--weights PATH``.

Checkpoints are livegen's tiny synthesized ones, rewritten into the layouts the hub has."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from livegen.engine import registry, synth
from livegen.engine.pipelines import sd_turbo
from livegen.protocol.errors import ModelUnavailable
from livegen.settings import Settings
from tests.conftest import copy_checkpoint, hub_cache, write_fp16_files

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_sd_turbo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.ensure_synthesized(synth.SD_TURBO, tmp_path_factory.mktemp("synth"), tiny=True)


def unet_weight(pipe: object, name: str = "conv_in.weight") -> torch.Tensor:
    return pipe.unet.state_dict()[name]  # type: ignore[attr-defined, no-any-return]


def test_float16_reads_the_fp16_files_and_float32_the_plain_ones(tiny_sd_turbo: Path, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_sd_turbo, tmp_path / "sd-turbo")
    plain = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"]
    fp16 = write_fp16_files(folder / "unet", keep_plain=True, offset=1.0)["conv_in.weight"]

    half = sd_turbo.load_pipeline(str(folder), device=CPU, dtype=torch.float16, tiny_vae_source=None)
    assert torch.equal(unet_weight(half), fp16)
    # The text encoder has no fp16 file here: its plain one, cast.
    text_plain = load_file(folder / "text_encoder" / "model.safetensors")
    name = next(k for k, v in text_plain.items() if v.is_floating_point())
    assert torch.equal(half.text_encoder.state_dict()[name], text_plain[name].half())

    full = sd_turbo.load_pipeline(str(folder), device=CPU, dtype=torch.float32, tiny_vae_source=None)
    assert torch.equal(unet_weight(full), plain)


def test_a_checkpoint_without_fp16_files_loads_in_float16(tiny_sd_turbo: Path) -> None:
    pipe = sd_turbo.load_pipeline(str(tiny_sd_turbo), device=CPU, dtype=torch.float16, tiny_vae_source=None)
    plain = load_file(tiny_sd_turbo / "unet" / "diffusion_pytorch_model.safetensors")["conv_in.weight"]
    assert pipe.unet.dtype == torch.float16 and torch.equal(unet_weight(pipe), plain.half())


def test_a_checkpoint_with_only_fp16_files_loads_in_float32(tiny_sd_turbo: Path, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_sd_turbo, tmp_path / "sd-turbo")
    fp16 = {c: write_fp16_files(folder / c, keep_plain=False) for c in ("unet", "vae", "text_encoder")}
    pipe = sd_turbo.load_pipeline(str(folder), device=CPU, dtype=torch.float32, tiny_vae_source=None)
    assert pipe.unet.dtype == torch.float32
    assert torch.equal(unet_weight(pipe), fp16["unet"]["conv_in.weight"].float())


def test_a_checkpoint_missing_a_components_weights_says_which_file(tiny_sd_turbo: Path, tmp_path: Path) -> None:
    folder = copy_checkpoint(tiny_sd_turbo, tmp_path / "sd-turbo")
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model"):
        sd_turbo.load_pipeline(str(folder), device=CPU, dtype=torch.float32, tiny_vae_source=None)


def test_sd15_comes_from_its_re_upload_unless_the_old_repository_is_cached(
    tiny_sd_turbo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = Settings(weights="hub")
    assert registry.resolve_source(synth.SD15, hub) == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert registry.resolve_source(synth.SD_TURBO, hub) == synth.SD_TURBO

    hub_cache(tmp_path, synth.SD15, tiny_sd_turbo)  # downloaded before RunwayML deleted it
    assert registry.resolve_source(synth.SD15, hub) == synth.SD15


@pytest.mark.parametrize(
    "layout",
    [
        "runwayml/stable-diffusion-v1-5",
        "runwayml--stable-diffusion-v1-5",
        "stable-diffusion-v1-5/stable-diffusion-v1-5",  # the re-upload, under its owner's folder
        "stable-diffusion-v1-5--stable-diffusion-v1-5",
        "stable-diffusion-v1-5",  # e.g. `hf download ... --local-dir PATH/stable-diffusion-v1-5`
    ],
)
def test_weights_path_finds_sd15_under_either_name(tmp_path: Path, layout: str) -> None:
    (tmp_path / layout).mkdir(parents=True)
    (tmp_path / layout / "model_index.json").write_text("{}")
    found = registry.resolve_source(synth.SD15, Settings(weights=str(tmp_path)))
    assert found == str(tmp_path / layout)


def test_weights_path_without_the_checkpoint_lists_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable) as caught:
        registry.resolve_source(synth.SD15, Settings(weights=str(tmp_path)))
    message = str(caught.value)
    for name in ("runwayml/stable-diffusion-v1-5/", "stable-diffusion-v1-5/stable-diffusion-v1-5/"):
        assert name in message
