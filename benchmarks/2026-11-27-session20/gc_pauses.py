"""Session 20: the garbage collector's pauses in a serving process, with and without gc.freeze().

A full (generation 2) collection walks every tracked object, and a serving process holds the
objects of torch, diffusers, transformers, FastAPI and pydantic (half a million after imports). It
holds the GIL throughout: the event loop and the engine thread both stop.

Each variant runs in a fresh process: ``livegen serve``'s app with its real engine (tiny-random
weights on the CPU, so the same modules are imported as on a GPU) in a uvicorn thread, with
``gc_freeze`` off (as before session 20) or on (the engine's ``freeze_heap`` once it is ready, the
default since); then ``CLIENTS`` closed-loop clients send ``POST``
text-to-image 64x64 for ``SECONDS`` s. ``gc.callbacks`` times every collection. Prints the
collections per generation, generation 2's pauses (one made mid-run with ``gc.collect()``,
standing in for the one CPython starts on its own every ~60,000 requests here), and the requests'
latency.

    python benchmarks/2026-11-27-session20/gc_pauses.py
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

KEY = "bench:" + "k" * 32
CLIENTS = 4
SECONDS = 30.0
BODY = json.dumps({"prompt": "a fox", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 1})


def variant(freeze: bool) -> None:
    from livegen.bench.null_engine import serve_in_thread
    from livegen.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), api_keys=KEY, weights="tiny-random", device="cpu", gc_freeze=freeze)
        with serve_in_thread(settings, None) as url:
            http = httpx.Client(base_url=url, headers={"Authorization": f"Key {KEY}"}, timeout=60)
            while http.get("/readyz").status_code != 200:
                time.sleep(0.1)
            for _ in range(20):  # warm-up: the first batches of a shape are slow
                http.post("/fal-ai/fast-turbo-diffusion", content=BODY, headers={"content-type": "application/json"})
            gc.collect()
            tracked = len(gc.get_objects())
            old_before = len(gc.get_objects(generation=2))
            pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
            started: list[float] = [0.0]

            def timer(phase: str, info: dict[str, int]) -> None:
                if phase == "start":
                    started[0] = time.perf_counter()
                else:
                    pauses[info["generation"]].append(time.perf_counter() - started[0])

            latencies: list[float] = []
            stop = threading.Event()

            def client() -> None:
                with httpx.Client(base_url=url, headers={"Authorization": f"Key {KEY}"}, timeout=60) as c:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        r = c.post(
                            "/fal-ai/fast-turbo-diffusion", content=BODY, headers={"content-type": "application/json"}
                        )
                        assert r.status_code == 200, r.text[:200]
                        latencies.append(time.perf_counter() - t0)

            gc.callbacks.append(timer)
            threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
            for t in threads:
                t.start()
            time.sleep(SECONDS / 2)
            # The full collection CPython would start on its own after ~60,000 requests (below),
            # made now: how long it stops everything.
            t0 = time.perf_counter()
            gc.collect()
            forced = time.perf_counter() - t0
            time.sleep(SECONDS / 2)
            stop.set()
            for t in threads:
                t.join()
            gc.callbacks.remove(timer)
            promoted = len(gc.get_objects(generation=2)) - old_before
            http.close()
    lat = sorted(latencies)
    full = pauses[2][:-1] if pauses[2] else []  # the automatic ones (the last one is ours)
    # CPython starts a full collection once the objects promoted since the last one exceed a
    # quarter of those that survived it (gc module docs, "threshold" and long-lived objects).
    per_request = promoted / len(lat)
    every = f"~{(tracked / 4) / per_request:,.0f}" if per_request > 0 and tracked > 0 else "n/a: few tracked"
    print(
        f"{'gc_freeze' if freeze else 'no freeze':<10} tracked objects {tracked:>8,}; "
        f"collections gen0 {len(pauses[0])}, gen1 {len(pauses[1])}, gen2 {len(full)}"
        + (f" (pauses max {max(full) * 1e3:.1f} ms, total {sum(full) * 1e3:.0f} ms)" if full else "")
        + f"; the full collection made mid-run: {forced * 1e3:.1f} ms"
        + f"; gen1 pauses max {max(pauses[1], default=0) * 1e3:.1f} ms"
        + f"; {per_request:.1f} objects/request stay (a full collection every {every} requests)"
        + f"; {len(lat) / SECONDS:.1f} req/s, p50 {statistics.median(lat) * 1e3:.1f} ms,"
        f" p99 {lat[int(len(lat) * 0.99)] * 1e3:.1f} ms, max {lat[-1] * 1e3:.1f} ms",
        flush=True,
    )


def main() -> None:
    for _ in range(2):
        for flag in ("--no-freeze", "--freeze"):
            subprocess.run([sys.executable, __file__, flag], check=True)


if __name__ == "__main__":
    if sys.argv[1:] in (["--freeze"], ["--no-freeze"]):
        variant(sys.argv[1] == "--freeze")
    else:
        main()
