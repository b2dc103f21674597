"""The ``livegen`` command as a user runs it."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from livegen.cli import QuietLibraryNoise, main
from livegen.engine import synth
from tests.conftest import LiveServer, copy_checkpoint, hub_cache, start_server, stop_server, write_fp16_files


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(main, ["keys", "create", "--name", "ci", "--data-dir", str(tmp_path)])
    assert created.exit_code == 0, created.output
    key = created.stdout.strip().splitlines()[0]
    key_id = key.split(":")[0]
    listed = runner.invoke(main, ["keys", "list", "--data-dir", str(tmp_path)])
    assert key_id in listed.stdout and "active" in listed.stdout and "ci" in listed.stdout
    assert key.split(":")[1] not in listed.stdout  # the secret is never shown again
    assert runner.invoke(main, ["keys", "revoke", key_id, "--data-dir", str(tmp_path)]).exit_code == 0
    assert "revoked" in runner.invoke(main, ["keys", "list", "--data-dir", str(tmp_path)]).stdout
    again = runner.invoke(main, ["keys", "revoke", key_id, "--data-dir", str(tmp_path)])
    assert again.exit_code != 0 and "no active key" in again.output


def test_serve_creates_a_key_once_and_honours_managed_keys(tmp_path: Path) -> None:
    no_static = {"LIVEGEN_API_KEYS": ""}
    server = start_server(tmp_path, "--weights", "tiny-random", "--models", "", env=no_static)
    try:
        log = server.log()
        assert log.count("FAL_KEY=") == 1
        key = log.split("FAL_KEY=")[1].split()[0]
        ok = httpx.post(
            server.base_url + "/fal-ai/fast-turbo-diffusion", json={}, headers={"Authorization": f"Key {key}"}
        )
        assert ok.status_code == 422  # authenticated; the body is what is wrong
    finally:
        stop_server(server)
    key_id = key.split(":")[0]
    assert CliRunner().invoke(main, ["keys", "revoke", key_id, "--data-dir", str(tmp_path)]).exit_code == 0
    created = CliRunner().invoke(main, ["keys", "create", "--data-dir", str(tmp_path)])
    new_key = created.stdout.strip().splitlines()[0]
    server = start_server(tmp_path, "--weights", "tiny-random", "--models", "", env=no_static)
    try:
        assert "FAL_KEY=" not in server.log()[len(log) :]
        headers = {"Authorization": f"Key {key}"}
        assert httpx.post(server.base_url + "/fal-ai/fast-turbo-diffusion", json={}, headers=headers).status_code == 401
        headers = {"Authorization": f"Key {new_key}"}
        assert httpx.post(server.base_url + "/fal-ai/fast-turbo-diffusion", json={}, headers=headers).status_code == 422
    finally:
        stop_server(server)


def test_hub_without_the_checkpoint_exits_with_a_clear_message(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "LIVEGEN_API_KEYS": "k"}
    cmd = [
        sys.executable,
        "-m",
        "livegen",
        "serve",
        "--weights",
        "hub",
        "--models",
        "stabilityai/sd-turbo",
        "--data-dir",
        str(tmp_path / "data"),
        "--port",
        "0",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "stabilityai/sd-turbo" in done.stderr
    assert "--weights random" in done.stderr and "--weights PATH" in done.stderr


def test_a_port_in_use_stops_the_server_with_uvicorns_message_and_no_traceback(tmp_path: Path) -> None:
    """The port is found taken only after start-up began, while the engine loads its models. The
    stop cancelled the start-up watcher, which cancelled the engine's startup future, and the
    engine thread then died on setting its result (a traceback after the message)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "LIVEGEN_API_KEYS": "k", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "livegen", "serve", "--weights", "tiny-random", "--device", "cpu",
               "--data-dir", str(tmp_path), "--port", str(port)]  # fmt: skip
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "address already in use" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]


def test_unknown_model_in_models_is_a_usage_error(tmp_path: Path) -> None:
    env = {**os.environ, "LIVEGEN_API_KEYS": "k"}
    cmd = [
        sys.executable,
        "-m",
        "livegen",
        "serve",
        "--weights",
        "tiny-random",
        "--models",
        "acme/nope",
        "--data-dir",
        str(tmp_path),
        "--port",
        "0",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "acme/nope" in done.stderr and "stabilityai/sd-turbo" in done.stderr


def test_bad_weights_value_is_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["serve", "--weights", "/no/such/folder"])
    assert result.exit_code == 2 and "--weights must be" in result.output


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["serve", "--port", "99999"], "port: Input should be less than or equal to 65535"),
        (["serve", "--port", "-1"], "port: Input should be greater than or equal to 0"),
        (["bench", "--batch", "0"], "Invalid value for '--batch': 0 is not within 1..64"),
        (["bench", "--batch", "1,abc"], "'1,abc' is not a comma-separated list of integers"),
        (["bench", "--batch", ","], "give at least one number"),
        (["bench", "--size", "63"], "63 is not within 64..2048 and a multiple of 8"),
        (["bench", "--steps", "0"], "Invalid value for '--steps'"),
        (["bench", "--task", "i2i", "--strength", "0"], "Invalid value for '--strength'"),
        (["bench", "--iters", "0"], "Invalid value for '--iters'"),
        (["bench", "realtime", "--size", "100"], "100 is not within 64..2048 and a multiple of 8"),
        (["bench", "realtime", "--steps", "51"], "Invalid value for '--steps'"),
        (["bench", "realtime", "--max-buffering", "0"], "Invalid value for '--max-buffering'"),
        (["bench", "realtime", "--image", "--steps", "1"], "--steps 1 at --strength 0.5 runs no step"),
        (["bench", "realtime", "--image", "--strength", "0.01"], "--steps 50 at --strength 0.01 runs no step"),
    ],
)
def test_bad_serve_and_bench_values_are_usage_errors(args: list[str], said: str) -> None:
    """Checked before anything loads: a usage error naming the flag, not a traceback from the
    engine (``--batch abc`` was a ValueError, ``--batch 0`` an IndexError inside diffusers)."""
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and said in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"LIVEGEN_BATCH_BUCKETS": "0,4"}, "batch_buckets: Value error, batch sizes from 1 to 64"),
        ({"LIVEGEN_WARMUP_BUCKETS": "1,128"}, "warmup_buckets: Value error, batch sizes from 1 to 64"),
        ({"LIVEGEN_PUBLIC_URL": "gen.example.com"}, "--public-url must be an absolute http(s) URL"),
        ({"LIVEGEN_ALLOWED_ORIGINS": "http://localhost:5173/app"}, "an allowed origin is * or scheme://host[:port]"),
        ({"LIVEGEN_ALLOWED_ORIGINS": "localhost:5173"}, "an allowed origin is * or scheme://host[:port]"),
    ],
)
def test_bad_settings_are_usage_errors(env: dict[str, str], said: str) -> None:
    """Values that were accepted and then never worked: a bucket of 0, a public URL without a
    scheme (every file URL returned broken), an origin no browser sends (never matched)."""
    result = CliRunner().invoke(main, ["serve"], env=env)
    assert result.exit_code == 2 and said in result.output, result.output


def test_every_serve_flag_in_the_readme_exists() -> None:
    """The README's flag table is what a newcomer types: each flag there must be one ``livegen
    serve`` takes (``--allowed-origins`` and ``--max-sessions`` were documented, never accepted)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("| flag | default |") :].split("\n\n", 1)[0]
    documented = set(re.findall(r"`(--[a-z][a-z-]*)", table))
    assert len(documented) >= 10, documented
    help_text = CliRunner().invoke(main, ["serve", "--help"], terminal_width=200).output
    accepted = set(re.findall(r"(--[a-z][a-z-]*)", help_text))
    assert documented <= accepted, f"in the README, not in livegen serve: {sorted(documented - accepted)}"


def test_origins_and_session_limit_flags_reach_the_settings(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["serve", "--data-dir", str(tmp_path), "--allowed-origins", "http://a.example", "--max-sessions", "0"]
    )
    assert result.exit_code == 2 and "--max-sessions" in result.output
    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path), "--allowed-origins", "a.example"])
    assert result.exit_code == 2 and "an allowed origin is * or scheme://host[:port]" in result.output


def test_allowed_origins_are_written_as_browsers_send_them(tmp_path: Path) -> None:
    from livegen.settings import Settings

    settings = Settings(data_dir=tmp_path, allowed_origins="HTTP://LocalHost:5173/, https://app.example.com,*")
    assert settings.allowed_origins == ["http://localhost:5173", "https://app.example.com", "*"]
    assert Settings(data_dir=tmp_path, public_url=" https://gen.example.com/prefix ").public_url == (
        "https://gen.example.com/prefix"
    )


def test_work_the_engine_refuses_is_a_usage_error_in_bench(tmp_path: Path, shared_data_dir: Path) -> None:
    """i2i at 1 step x strength 0.5 runs no step: bench says so as the server would, without a
    traceback."""
    args = ["bench", "--weights", "tiny-random", "--device", "cpu", "--size", "64", "--batch", "1", "--iters", "1",
            "--task", "i2i", "--steps", "1", "--strength", "0.5", "--no-baseline",
            "--data-dir", str(shared_data_dir)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "1 x 0.5 runs none; raise num_inference_steps or strength" in result.output


@pytest.mark.parametrize("command", [["serve"], ["keys", "list"], ["keys", "create"], ["bench"]])
def test_an_unusable_data_dir_is_a_clear_error(command: list[str], tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    folder = tmp_path / "a-file" / "data"
    result = CliRunner().invoke(main, [*command, "--data-dir", str(folder)])
    assert result.exit_code == 1, result.output
    assert f"cannot use the data dir {folder}: Not a directory" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_device_cuda_without_cuda_is_a_usage_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    for command in (["serve"], ["bench"]):
        result = CliRunner().invoke(main, [*command, "--device", "cuda", "--weights", "tiny-random"])
        assert result.exit_code == 2 and "--device cuda, but torch" in result.output, result.output
        assert "sees no CUDA device; use --device cpu or auto" in result.output


def test_bad_inductor_options_are_a_usage_error() -> None:
    """LIVEGEN_INDUCTOR_OPTIONS gets torch.compile's own check of names and types at start, not
    in the first compile."""
    for value, said in (('{"no_such_knob": true}', "inductor has no such setting"),
                        ('{"split_reductions": 3}', "should be bool"),
                        ("split_reductions=false", "must be a JSON object")):  # fmt: skip
        result = CliRunner().invoke(main, ["serve"], env={"LIVEGEN_INDUCTOR_OPTIONS": value})
        assert result.exit_code == 2 and said in result.output, result.output


def test_weights_path_loads_a_local_folder(tmp_path: Path, shared_data_dir: Path) -> None:
    # A folder of diffusers folders, laid out as a user would mirror them (PATH/org/name).
    from livegen.engine import synth

    mirror = tmp_path / "mirror"
    for repo in ("stabilityai/sd-turbo",):
        synth.synthesize(repo, mirror / repo, tiny=True)
    server = start_server(
        tmp_path / "data", "--weights", str(mirror), "--models", "stabilityai/sd-turbo", "--no-load-on-demand"
    )
    try:
        client = server.client()
        ok = client.post("/fal-ai/fast-turbo-diffusion", json={"prompt": "x", "model_name": "stabilityai/sd-turbo"})
        assert ok.status_code == 200
        refused = client.post("/fal-ai/fast-turbo-diffusion", json={"prompt": "x"})  # sdxl-turbo: not loaded
        assert refused.status_code == 503
        assert "stabilityai/sdxl-turbo" in refused.json()["detail"]
    finally:
        stop_server(server)


@pytest.mark.parametrize("module", ["livegen.client", "livegen.cli", "livegen.server.app"])
def test_light_modules_do_not_import_torch(module: str) -> None:
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_serve_fast_path_flag() -> None:
    runner = CliRunner()
    assert "--fast-path [auto|on|off]" in runner.invoke(main, ["serve", "--help"]).output
    refused = runner.invoke(main, ["serve", "--fast-path", "maybe"])
    assert refused.exit_code == 2 and "'maybe' is not one of" in refused.output


def test_a_model_load_logs_no_library_noise(live_server: LiveServer) -> None:
    """diffusers' from_pipe casts the img2img and inpaint views to their own dtype, and each
    cast warned that modules "should be kept in float32: []" (four lines per load, about
    nothing); without torchvision, transformers warned about an image processor livegen never
    builds. The server drops both; a float32 warning that names modules still shows."""
    log = live_server.log()
    assert "loaded stabilityai/sd-turbo" in log
    assert "should be kept in float32" not in log
    assert "requires torchvision" not in log


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("There are modules in UNet2DConditionModel that should be kept in float32: []. Casting …", False),
        ("There are modules in UNet2DConditionModel that should be kept in float32: ['norm_out']. Casting …", True),
        ("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` …", False),
        ("Could not reach the Hub (offline mode is enabled). Using cached commit hash", True),
    ],
)
def test_the_library_noise_filter_keeps_real_warnings(message: str, shown: bool) -> None:
    record = logging.LogRecord("diffusers.models.modeling_utils", logging.WARNING, __file__, 1, message, (), None)
    assert QuietLibraryNoise().filter(record) is shown


def test_serve_from_the_hub_cache_offline(tmp_path: Path) -> None:
    """The quickstart's `livegen serve` (hub weights) with no network, from the hub cache as
    downloads leave it: SD-Turbo with only its fp16 files (what the model card's
    `variant="fp16"` fetches), SD 1.5 under the re-upload RunwayML's deleted repository moved
    to, and the LCM-LoRA. Both generate over HTTP."""
    built = tmp_path / "synth"
    sd_turbo = copy_checkpoint(synth.ensure_synthesized(synth.SD_TURBO, built, tiny=True), tmp_path / "sd-turbo")
    for component in ("unet", "vae", "text_encoder"):
        write_fp16_files(sd_turbo / component, keep_plain=False)
    hf = tmp_path / "hf"
    hub_cache(hf, synth.SD_TURBO, sd_turbo)
    hub_cache(hf, "stable-diffusion-v1-5/stable-diffusion-v1-5", synth.ensure_synthesized(synth.SD15, built, tiny=True))
    for repo in (synth.LCM_LORA_SD15, synth.TAESD):
        hub_cache(hf, repo, synth.ensure_synthesized(repo, built, tiny=True))

    models = f"{synth.SD_TURBO},{synth.SD15}"
    server = start_server(tmp_path / "data", "--weights", "hub", "--models", models, env={"HF_HOME": str(hf)})
    try:
        with server.client() as client:
            for app, model in (("fast-turbo-diffusion", synth.SD_TURBO), ("fast-lcm-diffusion", synth.SD15)):
                body = {"prompt": "a fox", "model_name": model, "image_size": {"width": 64, "height": 64}}
                answer = client.post(f"/fal-ai/{app}", json=body)
                assert answer.status_code == 200, answer.text
                assert answer.json()["images"][0]["width"] == 64
        assert "should be kept in float32" not in server.log()
    finally:
        stop_server(server)
