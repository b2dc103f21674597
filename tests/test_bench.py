"""``livegen bench realtime`` as a user runs it (CPU numbers are a smoke check only)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from livegen.bench.engine import variant_settings
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
    print(json.dumps(report, indent=2))  # shown with -s; the CPU figures go nowhere else


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
        assert row["first_call_ms"] > 0
    assert report["warmup"]["livegen"]["first_image_s"] > 0
    assert report["variants"]["plain"]["fast_path"] is None
    assert report["variants"]["eager"]["fast_path"]["graphs"] == 0  # no CUDA graphs on a CPU


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
    ],
)
def test_variant_settings(variant: str, expected: dict[str, object]) -> None:
    settings = variant_settings(Settings(), variant)
    assert {k: getattr(settings, k) for k in expected} == expected
