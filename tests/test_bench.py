"""``livegen bench realtime`` as a user runs it (CPU numbers are a smoke check only)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import LiveServer


def test_bench_realtime_8_sessions(live_server: LiveServer) -> None:
    cmd = [sys.executable, "-m", "livegen", "bench", "realtime", "--url", live_server.base_url,
           "--key", live_server.key, "--sessions", "8", "--fps", "10", "--duration", "10", "--json"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["errors"] == 0, report["error_samples"]
    assert report["misordered"] == 0
    assert report["frames_sent"] >= 8 * 10 * 9  # about 10 s at 10 frames/s per session
    assert report["results"] > 0 and report["results"] + report["dropped"] == report["frames_sent"]
    assert report["latency_ms"]["p50"] > 0
    print(json.dumps(report, indent=2))  # shown with -s; the CPU figures go nowhere else


def test_bench_engine_smoke_on_cpu(shared_data_dir: object) -> None:
    cmd = [sys.executable, "-m", "livegen", "bench", "--weights", "tiny-random", "--device", "cpu", "--size", "64",
           "--batch", "1,2", "--iters", "1", "--task", "i2i", "--steps", "2", "--json",
           "--data-dir", str(shared_data_dir)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert [r["batch"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["livegen_ms_per_img"] > 0 and row["diffusers_ms_per_img"] > 0 and row["speedup"] > 0
    assert report["warmup"]["livegen"]["first_image_s"] > 0
