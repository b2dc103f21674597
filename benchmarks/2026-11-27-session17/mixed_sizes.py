"""Two groups of realtime sessions of different sizes against one server over the simulated device
(BENCHMARKS.md, session 17): does either group starve?

    python mixed_sizes.py 12 512 4 768            # 12 sessions at 512², 4 at 768², graph device
    python mixed_sizes.py 8 512 8 768 h200-compile
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

from livegen.bench.realtime import BenchConfig, run_bench
from livegen.bench.simulated import simulated_server

KEY = "k" * 20


def frame(side: int) -> dict[str, Any]:
    return {"prompt": "a cat", "image_size": {"width": side, "height": side}, "num_inference_steps": 1}


async def main(base: str, groups: list[tuple[int, int]]) -> None:
    configs = [
        BenchConfig(base_url=base, key=KEY, sessions=n, fps=30, duration_s=10, warmup_s=2, frame=frame(side))
        for n, side in groups
    ]
    reports = await asyncio.gather(*(run_bench(c) for c in configs))
    for (n, side), r in zip(groups, reports, strict=True):
        print(
            f"{n} x {side}²: {r['delivered_fps_total']:.1f} frames/s (per session {r['delivered_fps_session_range']}), "
            f"p50 {r['latency_ms']['p50']:.1f} p99 {r['latency_ms']['p99']:.1f} ms; "
            f"the server's batches {r['batching']['batch_sizes']}"
        )


if __name__ == "__main__":
    a, side_a, b, side_b = map(int, sys.argv[1:5])
    device = sys.argv[5] if len(sys.argv) > 5 else "h200-graph"
    with simulated_server(Path(tempfile.mkdtemp()), KEY, device) as url:
        asyncio.run(main(url, [(a, side_a), (b, side_b)]))
