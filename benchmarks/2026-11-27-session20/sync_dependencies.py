"""Session 20: the cost of FastAPI running sync dependencies in its thread pool.

The real app with ``NullEngine`` in a uvicorn thread on loopback; httpx in the same process,
sequential requests on one kept-alive connection. Three requests: ``POST`` text-to-image at
64x64 (the sync run), ``GET /queue/.../status`` of a finished job (what fal-client's
``subscribe`` polls) and ``GET /healthz`` (no dependencies: the floor). Each is timed in
``REPEATS`` alternating blocks of ``ROUNDS``; the table gives the median of the block medians.

    python benchmarks/2026-11-27-session20/sync_dependencies.py   # run from the checkout to measure
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

import livegen
from livegen.bench.null_engine import null_server

KEY = "bench:" + "k" * 32
ROUNDS = 1000
REPEATS = 5
APP = "fal-ai/fast-turbo-diffusion"


def block_p50_us(one: Callable[[], object]) -> float:
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        one()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main() -> None:
    print(f"livegen from {Path(livegen.__file__).parent}")
    body = json.dumps({"prompt": "a fox", "image_size": {"width": 64, "height": 64}})
    json_headers = {"content-type": "application/json"}
    with tempfile.TemporaryDirectory() as tmp, null_server(Path(tmp), KEY) as url:
        http = httpx.Client(base_url=url, headers={"Authorization": f"Key {KEY}"}, timeout=30)
        request_id = http.post(f"/queue/{APP}", content=body, headers=json_headers).json()["request_id"]
        status_path = f"/queue/{APP}/requests/{request_id}/status"
        while http.get(status_path).status_code != 200:
            time.sleep(0.01)

        def post() -> None:
            assert http.post(f"/{APP}", content=body, headers=json_headers).status_code == 200

        def status() -> None:
            assert http.get(status_path).status_code == 200

        def healthz() -> None:
            assert http.get("/healthz").status_code == 200

        cases = {"POST t2i 64x64": post, "GET queue status": status, "GET /healthz": healthz}
        for one in cases.values():  # warm-up
            for _ in range(200):
                one()
        blocks: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(REPEATS):
            for name, one in cases.items():
                blocks[name].append(block_p50_us(one))
        for name, values in blocks.items():
            spread = ", ".join(f"{v:.0f}" for v in values)
            print(f"  {name:<18} p50 {statistics.median(values):6.0f} us   (blocks: {spread})")
        http.close()


if __name__ == "__main__":
    main()
