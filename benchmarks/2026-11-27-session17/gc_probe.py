"""Garbage collections while the server serves realtime sessions (BENCHMARKS.md, session 17).

The real server and worker over the simulated H200 (compiled), in this process, with a
``gc.callbacks`` probe timing every collection: how many of each generation, how long, and when
a full one runs.

    python gc_probe.py 16            # 16 sessions of text-to-image, 20 s
    DUR=180 python gc_probe.py 16 i2i
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from livegen.bench.realtime import BenchConfig, input_image_data_url, run_bench
from livegen.bench.simulated import simulated_server

KEY = "k" * 20
pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
_started = {"at": 0.0, "t0": 0.0}


def probe(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _started["at"] = time.perf_counter()
        return
    ms = (time.perf_counter() - _started["at"]) * 1e3
    pauses[info["generation"]].append(ms)
    if info["generation"] == 2:
        print(f"full collection at +{_started['at'] - _started['t0']:.1f} s: {ms:.1f} ms", flush=True)


async def main(base: str, sessions: int, i2i: bool) -> dict[str, Any]:
    frame: dict[str, Any] = {"prompt": "a cat", "image_size": {"width": 512, "height": 512}, "num_inference_steps": 1}
    if i2i:
        frame.update(image_url=input_image_data_url(512), strength=0.5, num_inference_steps=2)
    duration = float(os.environ.get("DUR", "20"))
    config = BenchConfig(
        base_url=base, key=KEY, sessions=sessions, fps=30, duration_s=duration, warmup_s=2, frame=frame
    )
    return await run_bench(config)


if __name__ == "__main__":
    sessions, i2i = int(sys.argv[1]), sys.argv[2:3] == ["i2i"]
    with simulated_server(Path(tempfile.mkdtemp()), KEY, "h200-compile") as url:
        print("objects tracked", len(gc.get_objects()))
        _started["t0"] = time.perf_counter()
        gc.callbacks.append(probe)
        report = asyncio.run(main(url, sessions, i2i))
        gc.callbacks.remove(probe)
    for generation, ms in pauses.items():
        print(f"gen {generation}: {len(ms)} collections, max {max(ms, default=0):.1f} ms, total {sum(ms):.0f} ms")
    latency = report["latency_ms"]
    print(f"{report['delivered_fps_total']:.1f} frames/s, p50 {latency['p50']:.1f} p99 {latency['p99']:.1f} ms")
