"""``livegen bench realtime`` as a user runs it (CPU numbers are a smoke check only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from livegen.bench.engine import variant_settings
from livegen.bench.realtime import format_report
from livegen.bench.simulated import (
    DECODE_SHARE,
    DEVICE_MS,
    I2I_EXTRA,
    SimulatedAdapter,
    SimulatedDevice,
    model_factor,
    work_factor,
)
from livegen.engine import GenerationRequest, Task
from livegen.settings import Settings
from tests.conftest import LiveServer


def test_bench_realtime_8_sessions(live_server: LiveServer) -> None:
    cmd = [sys.executable, "-m", "livegen", "bench", "realtime", "--url", live_server.base_url,
           "--key", live_server.key, "--sessions", "8", "--fps", "10", "--duration", "8", "--warmup", "2",
           "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["errors"] == 0, report["error_samples"]
    assert report["misordered"] == 0
    # about 8 counted seconds at 10 frames/s per session; the 2 s of warm-up frames are not counted
    assert 8 * 10 * 7 <= report["frames_sent"] <= 8 * (10 * 8 + 1)
    assert report["warmup_s"] == 2
    assert report["results"] > 0 and report["results"] + report["dropped"] == report["frames_sent"]
    assert report["latency_ms"]["p50"] > 0
    low, high = report["delivered_fps_session_range"]  # the least and the most served session
    assert 0 <= low <= report["delivered_fps_per_session"] <= high
    assert f"({low:.2f}-{high:.2f})" in format_report(report)
    # the breakdown: the engine's batch inside the server's span inside the client's latency
    assert len(report["server_ms"]) == 4 and len(report["inference_ms"]) == 4
    assert 0 < report["inference_ms"]["p50"] <= report["server_ms"]["p50"] <= report["latency_ms"]["p50"]
    assert "in the server ms: p50" in format_report(report)
    assert report["input_decode"] == {"decoder": "pillow"}  # a CPU server: Pillow decodes inputs
    assert "input decode (server's total): pillow" in format_report(report)
    batching = report["batching"]  # the engine's own account of how it batched the frames
    assert sum(int(n) * count for n, count in batching["batch_sizes"].items()) >= report["results"]
    assert batching["cut_batches"] >= 0 and batching["gather_s"] >= 0
    assert "engine batches (server's total)" in format_report(report)
    print(json.dumps(report, indent=2))  # shown with -s; the CPU figures go nowhere else


def test_bench_realtime_image_to_image_runs_one_step_by_default(live_server: LiveServer) -> None:
    """--image without --steps: 2 steps at the default strength 0.5, one step run. It sent 1 step,
    which runs none (int(1 x 0.5)), and every frame came back INVALID_INPUT; the README's example
    did that."""
    cmd = [sys.executable, "-m", "livegen", "bench", "realtime", "--url", live_server.base_url, "--key",
           live_server.key, "--image", "--size", "64", "--sessions", "1", "--fps", "5", "--duration", "2",
           "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["errors"] == 0 and report["results"] > 0, report["error_samples"]


def test_bench_realtime_says_in_one_line_why_it_cannot_start(live_server: LiveServer) -> None:
    """A server that cannot be reached, or that refuses the key, is one line and exit 1 (both
    were httpx tracebacks); the key is not echoed."""
    from click.testing import CliRunner

    from livegen.cli import main

    cases = (
        (["--url", "http://127.0.0.1:1", "--key", "k"], "cannot reach http://127.0.0.1:1"),
        (["--url", "no-scheme", "--key", "k"], "cannot reach no-scheme: Request URL is missing"),
        (["--url", live_server.base_url, "--key", "nope:secret-value"], "/rest/tokens/ answered 401: "),
    )
    for args, said in cases:
        result = CliRunner().invoke(main, ["bench", "realtime", *args, "--sessions", "1", "--duration", "1"])
        assert result.exit_code == 1 and said in result.output, result.output
        assert isinstance(result.exception, SystemExit) and "secret-value" not in result.output


@pytest.mark.parametrize("task", ["t2i", "i2i"])
def test_bench_realtime_null_engine_measures_the_server_alone(task: str, tmp_path: Path) -> None:
    """--null-engine: the real server with an engine that answers at once. Every frame is answered
    (none superseded, no errors), the engine's share is ~0, and the bench ends as soon as the last
    frame's result is in. (It used to wait for the server's idle TIMEOUT when the last result came
    before sending ended, and count that as an error.)"""
    cmd = [sys.executable, "-m", "livegen", "bench", "realtime", "--null-engine", "--sessions", "2", "--fps", "20",
           "--duration", "2", "--warmup", "0.5", "--size", "256", "--json"]  # fmt: skip
    if task == "i2i":
        cmd.append("--image")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(tmp_path.glob("livegen-bench-*"))  # the server's temporary data dir is gone
    report = json.loads(done.stdout)
    assert report["errors"] == 0, report["error_samples"]
    assert report["misordered"] == 0 and report["dropped"] == 0
    assert report["results"] == report["frames_sent"] >= 2 * 20 * 2 - 2
    assert report["inference_ms"]["p99"] < report["server_ms"]["p50"] <= report["latency_ms"]["p50"]


def test_bench_realtime_leaves_nothing_behind_and_synthesizes_once(tmp_path: Path) -> None:
    """The server `bench realtime` starts without --data-dir gets a temporary data dir, removed at
    the end (it used to stay in /tmp, with the checkpoints synthesized for it: gigabytes with
    --weights random). Its checkpoints are LIVEGEN_DATA_DIR's, so a second run synthesizes none."""
    tmp, configured = tmp_path / "tmp", tmp_path / "data"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "LIVEGEN_DATA_DIR": str(configured), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    cmd = [sys.executable, "-m", "livegen", "bench", "realtime", "--weights", "tiny-random", "--device", "cpu",
           "--sessions", "1", "--fps", "5", "--duration", "1", "--size", "64", "--json"]  # fmt: skip
    synthesized = configured / "synth" / "tiny-random" / "stabilityai--sd-turbo"
    made = []
    for _ in range(2):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        report = json.loads(done.stdout)
        assert report["errors"] == 0 and report["results"] > 0, report
        assert not list(tmp.glob("livegen-bench-*")), list(tmp.iterdir())
        assert (synthesized / "model_index.json").is_file()
        made.append(synthesized.stat().st_ino)
    assert made[0] == made[1]  # the second run found the first one's checkpoint, and kept it


def test_bench_realtime_simulated_device_batches_sessions_frames() -> None:
    """--simulated-device: the real server and the engine's real scheduling over a device that only
    takes time (each batch its bucket's measured time). 6 sessions at 60 frames/s offer more than
    the simulated batch-1 rate, so the engine must batch frames of several sessions (a batch of 1
    takes 8.3 ms at 512², at most 120 batches per second): every batch is counted, and results
    come in each session's order."""
    cmd = [sys.executable, "-m", "livegen", "bench", "realtime", "--simulated-device", "h200-graph",
           "--sessions", "6", "--fps", "60", "--duration", "2", "--warmup", "0.5", "--size", "512",
           "--max-batch-size", "4", "--new-prompts", "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["errors"] == 0, report["error_samples"]
    assert report["misordered"] == 0 and report["results"] > 0
    assert report["new_prompts"] is True and "a new prompt every frame" in format_report(report)
    sizes = {int(k): v for k, v in report["batching"]["batch_sizes"].items()}
    assert max(sizes) <= 4 and any(k > 1 for k in sizes), sizes
    # The engine's share is at least the simulated device's time for the smallest bucket.
    assert report["inference_ms"]["p50"] >= 8.3


def test_the_simulated_device_scales_its_times_by_the_pixels() -> None:
    """A batch of another size than the measured 512² takes the bucket's time scaled by its pixels."""
    device = SimulatedDevice(DEVICE_MS["h200-graph"])
    assert device.enqueue(3)[0] == DEVICE_MS["h200-graph"][4]
    assert device.enqueue(3, 1024 * 1024)[0] == pytest.approx(4 * DEVICE_MS["h200-graph"][4])
    assert device.enqueue(1, 256 * 256)[0] == pytest.approx(DEVICE_MS["h200-graph"][1] / 4)
    assert device.enqueue(2, work=3.0)[0] == pytest.approx(3 * DEVICE_MS["h200-graph"][2])


def _request(task: Task = Task.TEXT_TO_IMAGE, **kw: Any) -> GenerationRequest:
    base: dict[str, Any] = {"model_id": "stabilityai/sd-turbo", "task": task, "prompt": "a fox", "width": 512,
                            "height": 512, "num_inference_steps": 1, "guidance_scale": 0.0, "seed": 1}  # fmt: skip
    return GenerationRequest(**{**base, **kw})


def test_the_simulated_device_scales_other_work_by_the_unet_steps_it_runs() -> None:
    """Its times are 1-step text-to-image batches (the decoder and one UNet step). More steps repeat
    the UNet's share, guidance above 1 doubles it (classifier-free guidance: twice the rows), and
    image-to-image runs int(steps * strength) steps and adds the encoder. Before, every kind of
    batch took the 1-step time: 4-step sessions were simulated at about 3.5 times the real rate."""
    assert work_factor(_request()) == 1.0
    unet = 1 - DECODE_SHARE
    assert work_factor(_request(num_inference_steps=4, guidance_scale=1.0)) == pytest.approx(DECODE_SHARE + 4 * unet)
    assert work_factor(_request(guidance_scale=7.5)) == pytest.approx(DECODE_SHARE + 2 * unet)
    i2i = _request(Task.IMAGE_TO_IMAGE, num_inference_steps=2, strength=0.5)  # one UNet step, as realtime sends
    assert work_factor(i2i) == pytest.approx(1 + I2I_EXTRA)
    assert work_factor(_request(Task.IMAGE_TO_IMAGE, num_inference_steps=4, strength=0.6)) == pytest.approx(
        DECODE_SHARE + 2 * unet + I2I_EXTRA
    )
    # What a batch of them costs the device: its bucket's time (3 rows: bucket 4) times that.
    adapter = SimulatedAdapter("stabilityai/sd-turbo", SimulatedDevice(DEVICE_MS["h200-graph"]))
    deferred = adapter([_request(num_inference_steps=4, guidance_scale=1.0, seed=s) for s in range(3)])
    assert deferred.expected_ms == pytest.approx(DEVICE_MS["h200-graph"][4] * (DECODE_SHARE + 4 * unet))


def test_the_simulated_device_takes_sdxl_turbo_at_the_ratio_the_card_measured() -> None:
    """SDXL-Turbo's UNet is about three times SD-Turbo's: the H200 took 14.89 against 9.10 ms at
    batch 1 and 6.18 against 4.59 ms per image at batch 8. Before, its batches took SD-Turbo's time."""
    assert model_factor("stabilityai/sd-turbo", 1) == model_factor("runwayml/stable-diffusion-v1-5", 8) == 1.0
    assert model_factor("stabilityai/sdxl-turbo", 1) == pytest.approx(14.89 / 9.10)
    assert model_factor("stabilityai/sdxl-turbo", 8) == model_factor("stabilityai/sdxl-turbo", 16)
    assert model_factor("stabilityai/sdxl-turbo", 8) == pytest.approx(6.18 / 4.59)
    assert model_factor("stabilityai/sdxl-turbo", 8) < model_factor("stabilityai/sdxl-turbo", 2) < 14.89 / 9.10
    adapter = SimulatedAdapter("stabilityai/sdxl-turbo", SimulatedDevice(DEVICE_MS["h200-compile"]))
    deferred = adapter([_request(model_id="stabilityai/sdxl-turbo")])
    assert deferred.expected_ms == pytest.approx(DEVICE_MS["h200-compile"][1] * 14.89 / 9.10)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--simulated-device", "h200-graph", "--max-batch-size", "0"], "1<=x<=64"),
        (["--max-batch-size", "4"], "goes with --simulated-device"),
        (["--simulated-device", "h200-graph", "--null-engine"], "give one"),
        (["--simulated-device", "h100"], "h200-graph"),
        (["--sessions", "0"], "x>=1"),
        (["--fps", "0"], "x>0"),
        (["--duration", "0"], "x>0"),
        (["--warmup", "-1"], "x>=0"),
    ],
)
def test_bench_realtime_server_options_are_checked_before_anything_starts(args: list[str], says: str) -> None:
    """Bad server options end with click's usage error (exit 2) naming the problem, no traceback."""
    done = subprocess.run([sys.executable, "-m", "livegen", "bench", "realtime", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert says in done.stderr and "Traceback" not in done.stderr


def test_bench_engine_smoke_on_cpu(shared_data_dir: object) -> None:
    """CI's check of the engine bench: plain pipelines and the fast path (eager on a CPU) beside
    stock diffusers, every row printed. No speed assertion: CPU numbers are a smoke check."""
    cmd = [sys.executable, "-m", "livegen", "bench", "--weights", "tiny-random", "--device", "cpu", "--size", "64",
           "--batch", "1,2", "--iters", "1", "--task", "i2i", "--steps", "2", "--variant", "plain,eager", "--json",
           "--data-dir", str(shared_data_dir)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    rows = [(r["batch"], r["variant"]) for r in report["rows"]]
    assert rows == [(1, "plain"), (1, "eager"), (2, "plain"), (2, "eager")]
    for row in report["rows"]:
        assert row["livegen_ms_per_img"] > 0 and row["diffusers_ms_per_img"] > 0 and row["speedup"] > 0
        assert row["first_call_ms"] > 0 and row["pipelined_ms_per_img"] > 0
        # Where the timed batch went (one timed iteration: one batch): the worker's stages, each
        # measured, adding up to about the batch's wall time (the rest: thread hand-offs between stamps).
        st = row["stages"]
        assert st["batches"] == 1 and st["device_ms"] is None  # no CUDA events on a CPU
        parts = [st[f"{name}_ms"] for name in ("wait", "enqueue", "until_done", "encode", "finish", "handback")]
        assert min(parts) >= 0 and st["enqueue_ms"] > 0
        assert 0.8 * st["wall_ms"] <= sum(parts) <= st["wall_ms"] + 0.01
        if row["variant"] == "eager":  # the fast path's own parts of enqueue
            assert 0 < st["inputs_ms"] + st["launch_ms"] <= st["enqueue_ms"]
        else:
            assert st["inputs_ms"] is None and st["launch_ms"] is None
    assert report["warmup"]["livegen"]["first_image_s"] > 0
    assert report["variants"]["plain"]["fast_path"] is None
    assert report["variants"]["eager"]["fast_path"]["graphs"] == 0  # no CUDA graphs on a CPU
    assert "should be kept in float32" not in done.stderr  # diffusers' vacuous warnings (cli.QuietLibraryNoise)


@pytest.mark.parametrize("new_prompts", [False, True])
def test_bench_new_prompts_miss_the_embedding_cache_every_time(
    shared_data_dir: Path, monkeypatch: pytest.MonkeyPatch, new_prompts: bool
) -> None:
    """--new-prompts: every livegen request of every batch (first call, timed, two in flight) has a
    prompt the engine has not seen, so each is encoded; without it only the first call encodes."""
    from livegen.bench.engine import EngineBenchConfig, bench_livegen
    from livegen.engine.pipelines import common

    seen: list[tuple[str, bool]] = []  # (prompt, was cached)
    real = common.LruCache.get_or_create

    def spy(self: Any, key: Any, create: Any) -> Any:
        seen.append((key[0], key in self._items))
        return real(self, key, create)

    monkeypatch.setattr(common.LruCache, "get_or_create", spy)
    settings = Settings(weights="tiny-random", device="cpu", data_dir=shared_data_dir)
    config = EngineBenchConfig("stabilityai/sd-turbo", "t2i", 64, 1, (2,), iters=2, baseline=False,
                               variants=("eager",), new_prompts=new_prompts)  # fmt: skip
    bench_livegen(settings, config, "eager")
    images = 2 * (1 + 2 + 3)  # the first call, 2 timed, then 2 + 1 batches two in flight
    assert len(seen) == images
    if new_prompts:
        assert not any(cached for _, cached in seen) and len({p for p, _ in seen}) == images
    else:
        assert [cached for _, cached in seen] == [False] + [True] * (images - 1)


@pytest.mark.parametrize("task", ["t2i", "i2i"])
def test_bench_streamdiffusion_beside_livegen_on_cpu(shared_data_dir: object, task: str) -> None:
    """--streamdiffusion: StreamDiffusion's own pipeline (the PyPI release scripts/test installs)
    does the same work in the same process, one row per batch beside livegen's, and the table
    shows both. CPU numbers are a smoke check."""
    from livegen.bench.engine import format_table

    cmd = [sys.executable, "-m", "livegen", "bench", "--weights", "tiny-random", "--device", "cpu", "--size", "64",
           "--batch", "1,2", "--iters", "1", "--task", task, "--steps", "2" if task == "i2i" else "1",
           "--variant", "eager", "--no-baseline", "--streamdiffusion", "--json",
           "--data-dir", str(shared_data_dir)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["streamdiffusion"] == "0.1.1"
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["streamdiffusion_ms_per_img"] > 0 and row["speedup_vs_streamdiffusion"] > 0
        assert row["diffusers_ms_per_img"] is None
    assert report["warmup"]["streamdiffusion"]["first_image_s"] > 0
    table = format_table(report)
    assert "StreamDiffusion 0.1.1 (its PyTorch pipeline" in table and "warm-up streamdiffusion" in table


def test_bench_streamdiffusion_refuses_what_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """SDXL-Turbo (StreamDiffusion 0.1.1 has no SDXL pipeline) is a usage error before anything
    loads; without the package the message says how to install it."""
    from livegen.bench import streamdiffusion

    done = subprocess.run(
        [sys.executable, "-m", "livegen", "bench", "--weights", "tiny-random", "--model", "stabilityai/sdxl-turbo",
         "--streamdiffusion"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "stabilityai/sd-turbo only" in done.stderr, done.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "streamdiffusion", None)  # import fails
    with pytest.raises(streamdiffusion.StreamDiffusionUnavailable, match="pip install --no-deps streamdiffusion"):
        streamdiffusion.check("stabilityai/sd-turbo")


def test_bench_table_names_every_variant() -> None:
    from livegen.bench.engine import format_table

    row = {"task": "t2i", "model": "stabilityai/sd-turbo", "size": 512, "batch": 1, "livegen_ms_per_img": 5.0,
           "livegen_img_per_s": 200.0, "first_call_ms": 900.0, "diffusers_ms_per_img": 66.8,
           "diffusers_img_per_s": 15.0, "speedup": 13.36}  # fmt: skip
    fast = {"graphs": 3, "capture_s": 1.5, "compile_s": 0.0}
    report = {
        "device": "NVIDIA H100", "torch": "2.11", "diffusers": "0.42.1", "weights": "random", "steps": 1, "iters": 5,
        "rows": [{**row, "variant": "plain"}, {**row, "variant": "graph"}],
        "variants": {
            "plain": {"load_s": 3.0, "first_image_s": 0.2, "dtype": "float16", "fast_path": None,
                      "vram_model_bytes": 2 * 2**30, "vram_peak_bytes": 3 * 2**30},
            "graph": {"load_s": 3.0, "first_image_s": 0.9, "dtype": "float16", "fast_path": fast,
                      "vram_model_bytes": 2 * 2**30, "vram_peak_bytes": 3 * 2**30},
        },
        "warmup": {"diffusers": {"load_s": 2.0, "first_image_s": 0.3, "vram_peak_bytes": 4 * 2**30}},
    }  # fmt: skip
    table = format_table(report)
    assert "plain" in table and "graph" in table and "13.36x" in table
    assert "3 CUDA graphs captured in 1.5 s" in table and "VRAM model 2.00 GiB peak 3.00 GiB" in table


def test_bench_refuses_an_unknown_variant() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "livegen", "bench", "--variant", "graph+turbo", "--weights", "tiny-random"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "unknown variant" in done.stderr


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("plain", {"fast_path": "off"}),
        ("eager", {"fast_path": "on", "cuda_graphs": False}),
        ("graph+bf16", {"fast_path": "on", "cuda_graphs": True, "dtype": "bfloat16"}),
        ("graph+full-vae", {"tiny_vae": False}),
        ("graph+no-cl", {"cuda_graphs": True, "channels_last": False}),
        ("compile", {"torch_compile": "default"}),
        ("graph+cudnn-bench", {"cuda_graphs": True, "cudnn_benchmark": True}),
        ("graph+sdpa-cudnn", {"cuda_graphs": True, "sdpa_cudnn": True}),
        ("compile+dyn-batch", {"torch_compile": "default", "compile_dynamic_batch": True}),
        ("graph+nhwc-gn", {"cuda_graphs": True, "nhwc_group_norm": True}),
        ("graph+split-geglu", {"cuda_graphs": True, "split_geglu": True, "nhwc_group_norm": False}),
        ("graph+taesd-relu+no-taesd-fold", {"tiny_vae_conv_relu": True, "tiny_vae_fold_upsample": False}),
        ("graph", {"split_geglu": True, "keep_channels_last": True, "tiny_vae_conv_relu": True}),
        ("graph+no-split-geglu", {"split_geglu": False, "keep_channels_last": True}),
        (
            "graph+no-rewrites",
            dict.fromkeys(("split_geglu", "keep_channels_last", "tiny_vae_conv_relu", "tiny_vae_fold_upsample"), False),
        ),
        (
            "compile+dyn-batch+keep-cl",
            {"torch_compile": "default", "compile_dynamic_batch": True, "keep_channels_last": True},
        ),
        ("compile+fp8", {"torch_compile": "default", "fp8_linear": True}),
        (
            "eager+taesd-relu+taesd-fold",
            {"cuda_graphs": False, "tiny_vae_conv_relu": True, "tiny_vae_fold_upsample": True},
        ),
    ],
)
def test_variant_settings(variant: str, expected: dict[str, object]) -> None:
    settings = variant_settings(Settings(), variant)
    assert {k: getattr(settings, k) for k in expected} == expected


def test_bench_profile_on_cpu(shared_data_dir: object) -> None:
    """``--profile``: each row gets a breakdown; the fast path's eager rows also get its regions
    (the plain pipelines have none). On a CPU the breakdown is of ops' self time."""
    from livegen.bench.engine import EngineBenchConfig, format_table, run_engine_bench

    settings = Settings(weights="tiny-random", device="cpu", data_dir=shared_data_dir)
    config = EngineBenchConfig("stabilityai/sd-turbo", "i2i", 64, 2, (1,), iters=2, baseline=False,
                               variants=("plain", "eager"), profile=True)  # fmt: skip
    report = run_engine_bench(settings, config)
    profiles = {r["variant"]: r["profile"] for r in report["rows"]}
    for variant, p in profiles.items():
        assert p["where"] == "cpu ops" and p["batches"] == 2, variant
        assert p["total_ms"] > 0 and p["ops_per_batch"] > 100
        assert {"convolution", "gemm", "normalization"} <= set(p["by_category_ms"]), p["by_category_ms"]
        assert abs(sum(p["by_category_ms"].values()) - p["total_ms"]) < 1e-6
        assert p["top_ms"] and all(ms > 0 and calls >= 1 and gb is None for _, ms, calls, gb in p["top_ms"])
        assert p["triton_kernels"] == []  # a CPU compiles no Triton kernels
    assert profiles["plain"]["by_region_ms"] == {}
    regions = profiles["eager"]["by_region_ms"]
    assert list(regions) == ["inputs", "vae_encode", "unet", "vae_decode"]  # in the order a batch runs them
    assert all(ms > 0 for ms in regions.values())
    table = format_table(report)
    assert "profile eager 64 batch 1: cpu ops" in table and "by region: inputs" in table


# The demangled name CUPTI gives a channels_last <-> contiguous copy in fp16 (PyTorch 2.x).
COPY_KERNEL = (
    "void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
    "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda()#7}::operator()() "
    "const::{lambda(c10::Half)#1}>(at::TensorIteratorBase&, c10::Half const&)::{lambda(int)#1}>(int, "
    "at::native::gpu_kernel_impl_nocast<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}"
    "::operator()() const::{lambda()#7}::operator()() const::{lambda(c10::Half)#1}>(at::TensorIteratorBase&, "
    "c10::Half const&)::{lambda(int)#1})"
)


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1",
         "convolution"),
        ("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_f16_s16816fprop_optimized_f16_64x64_64x5_nhwc_align8>",
         "convolution"),
        ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_NNT", "gemm"),
        ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off",
         "gemm"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false>>", "attention"),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1", "attention"),
        ("cudnn_generated_oss_kernel_runtime_fusion_conv_bias_relu", "convolution"),  # a made-up runtime-fusion name
        ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half, float>", "normalization"),
        ("void at::native::elementwise_kernel<128, 4, at::native::normal_kernel<...>>", "random"),
        ("triton_per_fused_native_group_norm_silu_0", "compiled (triton)"),
        ("void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false, true>", "layout (nchw<->nhwc)"),
        ("Memcpy HtoD (Pinned -> Device)", "memcpy / memset"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel>", "elementwise / other"),
        (COPY_KERNEL, "copies (layout / dtype)"),
    ],
)  # fmt: skip
def test_kernel_category(name: str, category: str) -> None:
    from livegen.bench.profile import kernel_category

    assert kernel_category(name) == category


CUDNN_CONV = "sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize256x64x32_warpgroupsize1x1x1_g1"


@pytest.mark.parametrize(
    ("name", "label"),
    [
        (COPY_KERNEL, "elementwise_kernel [direct_copy_kernel_cuda]"),
        ("void at::native::vectorized_elementwise_kernel<8, at::native::binary_internal::MulFunctor<float>, "
         "std::array<char*, 3ul>>(int, at::native::binary_internal::MulFunctor<float>, std::array<char*, 3ul>) x" * 2,
         "vectorized_elementwise_kernel [MulFunctor]"),
        ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_NNT", "nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_NNT"),  # short: as is
        (CUDNN_CONV, CUDNN_CONV[:90]),  # long, nothing of PyTorch's inside: cut
    ],
)  # fmt: skip
def test_kernel_label_names_what_a_generic_kernel_runs(name: str, label: str) -> None:
    from livegen.bench.profile import kernel_label

    assert kernel_label(name) == label


def test_profile_summary_of_gpu_events() -> None:
    """Device events: kernels by category, annotations as regions (not counted as kernels), CPU
    events ignored; per batch."""
    from livegen.bench.profile import Event, summarize

    events = [
        Event("sm90_xmma_fprop_implicit_gemm_f16", True, 1000.0, 1000.0),
        Event("sm90_xmma_fprop_implicit_gemm_f16", True, 2000.0, 2000.0),
        Event("nvjet_hsh_128x256", True, 1000.0, 1000.0),
        Event("livegen.unet", True, 4200.0, 4200.0),  # the annotation spanning the kernels above
        Event("aten::conv2d", False, 50.0, 900.0),
        Event("cudaLaunchKernel", False, 10.0, 10.0),
    ]
    p = summarize(events, batches=2, device=True)
    assert p.where == "gpu kernels" and p.ops == 1.5
    assert p.by_category == {"convolution": 1.5, "gemm": 0.5}
    assert p.total_ms == 2.0 and p.by_region == {"unet": 2.1}
    assert p.top == [("sm90_xmma_fprop_implicit_gemm_f16", 1.5, 1.0, None), ("nvjet_hsh_128x256", 0.5, 0.5, None)]
    assert p.triton == []


def test_profile_gives_compiled_kernels_bytes_and_bandwidth() -> None:
    """With the bytes recorded per launch, each compiled kernel gets GB per batch (bytes per launch
    times launches per batch) and the bandwidth its time makes of them; other kernels get none."""
    from livegen.bench.profile import Event, format_profile, summarize

    events = [
        Event("triton_poi_fused_add_0", True, 100.0, 100.0),  # 4 launches in 2 batches, 100 MB each
        Event("triton_poi_fused_add_0", True, 100.0, 100.0),
        Event("triton_poi_fused_add_0", True, 100.0, 100.0),
        Event("triton_poi_fused_add_0", True, 100.0, 100.0),
        Event("triton_red_fused_native_group_norm_1", True, 50.0, 50.0),  # launched, never recorded
        Event("sm90_xmma_fprop_implicit_gemm_f16", True, 1000.0, 1000.0),
    ]
    p = summarize(events, batches=2, device=True, bytes_per_launch={"triton_poi_fused_add_0": 1e8})
    assert p.top[0] == ("sm90_xmma_fprop_implicit_gemm_f16", 0.5, 0.5, None)
    assert p.triton == [
        ("triton_poi_fused_add_0", 0.2, 2.0, 0.2),
        ("triton_red_fused_native_group_norm_1", 0.025, 0.5, None),
    ]
    lines = format_profile("compile 512 batch 2", p.as_dict())
    assert "    compiled kernels: 0.20 GB per batch in 0.20 ms, 1.00 TB/s (1 of 2 kernels counted)" in lines
    assert "       0.200 ms      2 x 0.100 ms  0.200 GB, 1.00 TB/s  triton_poi_fused_add_0" in lines
    assert "       0.500 ms    0.5 x 1.000 ms  sm90_xmma_fprop_implicit_gemm_f16" in lines  # no bytes: a cuDNN kernel


def test_launch_bytes_counts_each_launch_and_never_stops_one() -> None:
    """``LaunchBytes.recording`` wraps a kernel class's ``run``: each launch adds its tensors'
    bytes (in-place ones twice) under the kernel's name, runs as before, and the class is put back
    after. A kernel whose bytes cannot be counted still launches."""
    import torch

    from livegen.bench.profile import LaunchBytes

    launched: list[str] = []

    class Kernel:  # what the recorder reads of inductor's CachingAutotuner
        def __init__(self, name: str, mutated: list[str] | None) -> None:
            self.name = name
            self.inductor_meta = {"kernel_name": name, "mutated_arg_names": mutated} if mutated is not None else None

        def run(self, *args: object, stream: int) -> str:
            launched.append(self.name)
            return "ran"

    original = Kernel.run
    record = LaunchBytes()
    x = torch.zeros(4, 8, dtype=torch.float16)  # 64 bytes
    with record.recording(Kernel) as hooked:
        assert hooked
        assert Kernel("triton_poi_fused_add_0", ["in_out_ptr0"]).run(x, x, 32, stream=0) == "ran"
        assert Kernel("triton_poi_fused_add_0", ["in_out_ptr0"]).run(x[:2], x[:2], 16, stream=0) == "ran"
        assert Kernel("triton_poi_fused_relu_1", []).run(x, x, stream=0) == "ran"
        assert Kernel("no_metadata", None).run(x, stream=0) == "ran"  # uncountable: launched all the same
    assert Kernel.run is original
    assert launched == ["triton_poi_fused_add_0", "triton_poi_fused_add_0", "triton_poi_fused_relu_1", "no_metadata"]
    assert record.per_launch() == {"triton_poi_fused_add_0": (192 + 96) / 2, "triton_poi_fused_relu_1": 128}


def test_a_failing_profiler_keeps_the_timings(shared_data_dir: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUPTI may be missing or refused on a GPU machine: the row keeps its timing and says why
    it has no profile."""
    from livegen.bench import engine
    from livegen.bench.engine import EngineBenchConfig, format_table, run_engine_bench

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("CUPTI_ERROR_INSUFFICIENT_PRIVILEGES")

    monkeypatch.setattr(engine, "profile_batches", refuse)
    settings = Settings(weights="tiny-random", device="cpu", data_dir=shared_data_dir)
    config = EngineBenchConfig("stabilityai/sd-turbo", "t2i", 64, 1, (1,), iters=1, baseline=False,
                               variants=("eager",), profile=True)  # fmt: skip
    report = run_engine_bench(settings, config)
    (row,) = report["rows"]
    assert row["livegen_ms_per_img"] > 0
    assert row["profile"] == {"error": "RuntimeError: CUPTI_ERROR_INSUFFICIENT_PRIVILEGES"}
    table = format_table(report)
    assert "profile eager 64 batch 1: failed (RuntimeError: CUPTI_ERROR_INSUFFICIENT_PRIVILEGES)" in table


def test_targets_table_from_the_h200_run() -> None:
    """The issue's targets against the kept H200 results (benchmarks/2026-11-26-h200): the best
    livegen row per target, whichever variant it came from; realtime targets not run there."""
    from pathlib import Path

    from livegen.bench.targets import evaluate, format_targets

    path = Path(__file__).parent.parent / "benchmarks" / "2026-11-26-h200" / "results.jsonl"
    reports = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    realtime = {"name": "t2i-16-sessions", "args": "--sessions 16 --fps 30", "sessions": 16,
                "latency_ms": {"p50": 20.0, "p99": 45.0}, "delivered_fps_total": 410.0}  # fmt: skip
    null = {**realtime, "name": "null", "args": "--null-engine --sessions 1", "sessions": 1}
    entries = {e["target"]: e for e in evaluate([*reports, realtime, null])}
    b1 = entries["SD-Turbo t2i 1 step, batch 1"]
    assert (b1["measured"], b1["from"], b1["met"]) == (9.1, "graph, batch 1", False)
    best = entries["SD-Turbo t2i 1 step, best batch"]
    assert (best["measured"], best["from"]) == (236.26, "graph+bf16, batch 16")  # the variants run's row
    assert entries["LCM SD 1.5 4 steps, batch 1"]["measured"] == 31.57
    assert entries["realtime 16 sessions: frames/s delivered"]["met"] is True
    assert entries["realtime 16 sessions: p99 frame latency"]["met"] is True
    # the null-engine run is a breakdown, not the target's run
    assert entries["realtime 1 session: p50 frame latency"]["measured"] is None
    table = format_targets(list(entries.values()))
    assert "| SD-Turbo t2i 1 step, batch 1 | ≤ 5 ms/img | 9.1 ms/img | graph, batch 1 | **no** |" in table
    assert "| realtime 1 session: p50 frame latency | ≤ 12 ms | not run | - | - |" in table


def test_the_streamdiffusion_target_compares_rows_of_the_same_run() -> None:
    """The best livegen batch-1 row's speed-up over StreamDiffusion's time in the same report;
    a report without StreamDiffusion rows leaves it "not run"."""
    from livegen.bench.targets import evaluate, format_targets

    def row(variant: str, ours: float, theirs: float | None, batch: int = 1) -> dict[str, object]:
        return {"model": "stabilityai/sd-turbo", "task": "t2i", "size": 512, "batch": batch, "variant": variant,
                "livegen_ms_per_img": ours, "livegen_img_per_s": 1000 / ours,
                "streamdiffusion_ms_per_img": theirs}  # fmt: skip

    report = {"steps": 1, "rows": [row("eager", 30.0, 29.0), row("graph", 10.0, 29.0), row("graph", 4.0, 5.0, 16)]}
    plain = {"steps": 1, "rows": [row("compile", 5.0, None)]}  # no --streamdiffusion: not compared
    entries = {e["target"]: e for e in evaluate([report, plain])}
    t2i = entries["SD-Turbo t2i batch 1 vs StreamDiffusion (PyTorch path, same run)"]
    assert (t2i["measured"], t2i["from"], t2i["met"]) == (2.9, "graph, batch 1", True)
    assert entries["SD-Turbo i2i batch 1 vs StreamDiffusion (PyTorch path, same run)"]["measured"] is None
    assert "| ≥ 1 × | 2.9 × | graph, batch 1 | yes |" in format_targets(list(entries.values()))


def test_a_best_batch_target_takes_the_two_in_flight_throughput_a_batch_1_target_does_not() -> None:
    from livegen.bench.targets import evaluate

    def row(batch: int, ms: float, pipelined_ms: float) -> dict[str, object]:
        return {"model": "stabilityai/sd-turbo", "task": "t2i", "size": 512, "batch": batch, "variant": "graph",
                "livegen_ms_per_img": ms, "livegen_img_per_s": 1000 / ms,
                "pipelined_ms_per_img": pipelined_ms, "pipelined_img_per_s": 1000 / pipelined_ms}  # fmt: skip

    report = {"steps": 1, "rows": [row(1, 6.0, 5.0), row(16, 3.2, 2.5)]}
    entries = {e["target"]: e for e in evaluate([report])}
    b1 = entries["SD-Turbo t2i 1 step, batch 1"]
    assert (b1["measured"], b1["from"]) == (6.0, "graph, batch 1")  # latency: one batch at a time
    best = entries["SD-Turbo t2i 1 step, best batch"]
    assert (best["measured"], best["from"]) == (400.0, "graph, batch 16, 2 batches in flight")


def test_float8_rows_get_a_line_of_their_own() -> None:
    """A faster ``+fp8`` row does not stand for the target: its images are outside the fp16
    tolerance. It gets its own line, only where a run has such rows."""
    from livegen.bench.targets import evaluate

    def row(variant: str, batch: int, ms: float) -> dict[str, object]:
        return {"model": "stabilityai/sd-turbo", "task": "t2i", "size": 512, "batch": batch, "variant": variant,
                "livegen_ms_per_img": ms, "livegen_img_per_s": 1000 / ms}  # fmt: skip

    report = {"steps": 1, "rows": [row("compile", 16, 2.2), row("compile+fp8", 16, 1.9), row("compile", 1, 6.0)]}
    entries = {e["target"]: e for e in evaluate([report])}
    best = entries["SD-Turbo t2i 1 step, best batch"]
    assert (best["measured"], best["from"], best["met"]) == (454.55, "compile, batch 16", False)
    fp8 = entries["SD-Turbo t2i 1 step, best batch, float8 linears (images outside the fp16 tolerance)"]
    assert (fp8["measured"], fp8["from"], fp8["met"]) == (526.32, "compile+fp8, batch 16", True)
    assert not any("float8" in t for t in entries if t.startswith("SD-Turbo t2i 1 step, batch 1"))


def test_the_compile_variant_compiles_the_shapes_it_benches(
    shared_data_dir: object, counted_compile: list[int]
) -> None:
    """The bench's first call at each shape is its warm-up: with compiling closed after the
    engine's own (empty) warm-up, the compile variant used to time uncompiled graphs. torch.compile
    is a counting stand-in (inductor on a CPU takes minutes); which code runs is under test."""
    from livegen.bench.engine import EngineBenchConfig, format_table, run_engine_bench

    calls = counted_compile
    settings = Settings(weights="tiny-random", device="cpu", data_dir=shared_data_dir)
    config = EngineBenchConfig("stabilityai/sd-turbo", "t2i", 64, 1, (1, 2), iters=1, baseline=False,
                               variants=("compile",))  # fmt: skip
    report = run_engine_bench(settings, config)
    fast = report["variants"]["compile"]["fast_path"]
    assert calls[0] > 0
    assert fast["compiled_shapes"] == 2 and fast["uncompiled_shapes"] == 0
    assert "2 shapes compiled" in format_table(report) and "NOT COMPILED" not in format_table(report)


def test_the_compile_variant_counts_every_graph_dynamo_compiles(
    shared_data_dir: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warm-up line's "dynamo graphs" is every graph dynamo handed its backend during the
    variant, recompiles included (the fast path's own "shapes compiled" cannot see a guard that
    fails). Real dynamo tracing, with a backend that counts and runs the graphs as traced."""
    import torch

    from livegen.bench.engine import EngineBenchConfig, format_table, run_engine_bench

    graphs: list[object] = []
    real_compile = torch.compile

    def counting_backend(gm: Any, example_inputs: list[Any]) -> Any:
        graphs.append(gm)
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=counting_backend, dynamic=False))
    settings = Settings(weights="tiny-random", device="cpu", data_dir=shared_data_dir)
    config = EngineBenchConfig("stabilityai/sd-turbo", "t2i", 64, 1, (1, 2), iters=1, baseline=False,
                               variants=("compile",))  # fmt: skip
    torch._dynamo.reset()
    try:
        report = run_engine_bench(settings, config)
    finally:
        torch._dynamo.reset()
    counted = report["variants"]["compile"]["dynamo_graphs"]
    assert counted == len(graphs) >= 4  # the UNet and the decode, at batch 1 and at batch 2
    assert f", {counted} dynamo graphs" in format_table(report)


def test_a_warming_server_reports_its_progress(live_server: LiveServer) -> None:
    """While `bench realtime` waits for the server it started (a torch.compile warm-up takes
    minutes), it prints a line every 15 s from /readyz: a time box that cuts the wait then shows
    how far the warm-up got. The line is made from the real /readyz body."""
    import httpx

    from livegen.cli import _warm_up_progress

    body = httpx.get(live_server.base_url + "/readyz", timeout=10).json()
    line = _warm_up_progress(body)
    assert line.startswith("status ready")
    for model, state in body["models"].items():
        assert (f"{model} {state}" in line) == (state != "not loaded")
    fast = {"graphs": 1, "compiled_shapes": 2, "compile_s": 61.4}
    warming = {**body, "status": "loading", "models": {"stabilityai/sd-turbo": "loaded"},
               "fast_path": {"stabilityai/sd-turbo": fast}}  # fmt: skip
    assert _warm_up_progress(warming) == (
        "status loading; stabilityai/sd-turbo loaded; stabilityai/sd-turbo: 1 graphs, 2 shapes compiled (61 s)"
    )
