"""16 realtime sessions over the simulated compiled H200 with every bucket's time scaled: what a
kernel-time saving would give end to end (BENCHMARKS.md, session 17).

    python scaled_device.py 0.85 16        # 15 % less device time, 16 sessions, max batch 8
    python scaled_device.py 0.85 16 16     # max batch 16
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from livegen.bench import simulated
from livegen.bench.realtime import BenchConfig, run_bench

KEY = "k" * 20

if __name__ == "__main__":
    scale, sessions = float(sys.argv[1]), int(sys.argv[2])
    max_batch = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    simulated.DEVICE_MS["scaled"] = {b: ms * scale for b, ms in simulated.DEVICE_MS["h200-compile"].items()}
    frame = {"prompt": "a cat", "image_size": {"width": 512, "height": 512}, "num_inference_steps": 1}
    config = BenchConfig(base_url="", key=KEY, sessions=sessions, fps=30, duration_s=10, warmup_s=2, frame=frame)
    with simulated.simulated_server(Path(tempfile.mkdtemp()), KEY, "scaled", max_batch_size=max_batch) as url:
        r = asyncio.run(run_bench(BenchConfig(**{**config.__dict__, "base_url": url})))
    latency = r["latency_ms"]
    print(
        f"scale {scale}, {sessions} sessions, max batch {max_batch}: {r['delivered_fps_total']:.1f} frames/s, "
        f"p50 {latency['p50']:.1f} p99 {latency['p99']:.1f} ms; batches {r['batching']['batch_sizes']}"
    )
