"""Other work while realtime sessions keep the device busy (BENCHMARKS.md, session 16).

16 sessions x 30 frames/s of 512² text-to-image for 12 s over the simulated H200 (graphs; the real
server and worker, ``livegen.bench.simulated``). During them:

- ``mixed``: at 3 s a sync request of the sessions' shape, at 3.5 s a sync 768² request, at 4 s a
  queued 768x512 job; how long each takes.
- ``backlog N [SIDE]``: at 3 s, N queued SIDE² jobs at once (512²; the simulated device scales its
  512² times by the pixels); when the first and the last completes.

Then what the sessions got. Run from a checkout (``PYTHONPATH=OTHER/src`` for another one)::

    python other_work.py mixed
    python other_work.py backlog 20
    python other_work.py backlog 20 1024
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from livegen.bench.realtime import BenchConfig, run_bench
from livegen.bench.simulated import simulated_server

APP = "fal-ai/fast-turbo-diffusion"
KEY = "k" * 20
HEADERS = {"Authorization": f"Key {KEY}"}


def body(prompt: str, width: int, height: int) -> dict[str, Any]:
    return {"prompt": prompt, "image_size": {"width": width, "height": height}}


async def sync(client: httpx.AsyncClient, base: str, label: str, payload: dict[str, Any], delay: float) -> None:
    await asyncio.sleep(delay)
    started = time.perf_counter()
    r = await client.post(f"{base}/{APP}", json=payload, headers=HEADERS)
    print(f"{label}: sync {r.status_code} after {time.perf_counter() - started:.2f} s", flush=True)


async def queued(client: httpx.AsyncClient, base: str, payloads: list[dict[str, Any]], delay: float) -> list[float]:
    """Submit ``payloads`` as queued jobs at once; seconds from submitting to each COMPLETED."""
    await asyncio.sleep(delay)
    started = time.perf_counter()
    urls = []
    for payload in payloads:
        r = await client.post(f"{base}/queue/{APP}", json=payload, headers=HEADERS)
        r.raise_for_status()
        urls.append(r.json()["status_url"])
    done: dict[str, float] = {}
    while len(done) < len(urls) and time.perf_counter() - started < 60:
        for url in urls:
            if url not in done and (await client.get(url, headers=HEADERS)).json()["status"] == "COMPLETED":
                done[url] = time.perf_counter() - started
        await asyncio.sleep(0.1)
    return sorted(done.values())


async def main(base: str, mode: str, jobs: int, side: int) -> None:
    frame = {**body("a cat", 512, 512), "num_inference_steps": 1}
    config = BenchConfig(base_url=base, key=KEY, sessions=16, fps=30, duration_s=12, frame=frame)
    sessions = asyncio.create_task(run_bench(config))
    async with httpx.AsyncClient(timeout=120) as client:
        if mode == "mixed":
            _, _, times = await asyncio.gather(
                sync(client, base, "512² (the sessions' shape)", body("same shape", 512, 512), 3.0),
                sync(client, base, "768²", body("other shape", 768, 768), 3.5),
                queued(client, base, [body("queued", 768, 512)], 4.0),
            )
            print(f"768x512 queued job: completed after {times[0]:.2f} s" if times else "queued job: not done in 60 s")
        else:
            times = await queued(client, base, [body(f"job {i}", side, side) for i in range(jobs)], 3.0)
            first_last = f"the first after {times[0]:.2f} s, the last {times[-1]:.2f} s" if times else "none in 60 s"
            print(f"{jobs} queued {side}² jobs: {len(times)} completed, {first_last}")
    r = await sessions
    batching = r["batching"]
    print(
        f"realtime: {r['delivered_fps_total']:.1f} frames/s, p50 {r['latency_ms']['p50']:.1f} ms, "
        f"p99 {r['latency_ms']['p99']:.1f} ms; batches {batching['batch_sizes']}, "
        f"ahead of realtime frames: {batching.get('priority_yields')}"
    )


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "mixed"
    with simulated_server(Path(tempfile.mkdtemp()), KEY, "h200-graph") as url:
        numbers = [int(a) for a in sys.argv[2:]]
        asyncio.run(main(url, mode, *(numbers + [20, 512][len(numbers) :])))
