"""Session 20: sync dependencies in FastAPI's thread pool, under concurrency.

The real app with ``NullEngine`` (no generation) in its own process (``--serve``: uvicorn on a free
loopback port, one event loop, FastAPI's default 40-thread pool), and ``CLIENTS`` closed-loop
clients in this process (a thread and an httpx connection each) for ``SECONDS`` seconds after a
warm-up. Two requests: ``POST`` text-to-image at 64x64, and ``GET`` the status of a finished queue
job (what fal-client's ``subscribe`` polls). Prints requests per second and latency percentiles.

    python benchmarks/2026-11-27-session20/concurrent_requests.py   # the livegen on sys.path is measured
"""

from __future__ import annotations

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
CLIENTS = 16
SECONDS = 8.0
APP = "fal-ai/fast-turbo-diffusion"
BODY = json.dumps({"prompt": "a fox", "image_size": {"width": 64, "height": 64}})


def serve() -> None:
    from livegen.bench.null_engine import null_server

    with tempfile.TemporaryDirectory() as tmp, null_server(Path(tmp), KEY) as url:
        print(url, flush=True)
        sys.stdin.read()  # until the parent closes it


def load(url: str, path: str, method: str) -> tuple[float, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = threading.Event()
    measuring = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Key {KEY}"}, timeout=30) as http:
            mine = []
            while not stop.is_set():
                start = time.perf_counter()
                if method == "POST":
                    r = http.post(path, content=BODY, headers={"content-type": "application/json"})
                else:
                    r = http.get(path)
                assert r.status_code == 200, r.text[:200]
                if measuring.is_set():
                    mine.append(time.perf_counter() - start)
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # warm-up
    measuring.set()
    started = time.perf_counter()
    time.sleep(SECONDS)
    measuring.clear()
    elapsed = time.perf_counter() - started
    stop.set()
    for t in threads:
        t.join()
    return len(latencies) / elapsed, sorted(latencies)


def main() -> None:
    import livegen

    print(f"livegen from {Path(livegen.__file__).parent}; {CLIENTS} clients, {SECONDS:g} s per row")
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None and server.stdin is not None
    url = server.stdout.readline().strip()
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Key {KEY}"}) as http:
            request_id = http.post(f"/queue/{APP}", content=BODY, headers={"content-type": "application/json"}).json()[
                "request_id"
            ]
            status = f"/queue/{APP}/requests/{request_id}/status"
            while http.get(status).status_code != 200:
                time.sleep(0.01)
        for name, path, method in (("POST t2i 64x64", f"/{APP}", "POST"), ("GET queue status", status, "GET")):
            rate, lat = load(url, path, method)
            p50, p99 = statistics.median(lat) * 1e3, lat[int(len(lat) * 0.99)] * 1e3
            print(f"  {name:<18} {rate:7.0f} req/s   p50 {p50:6.2f} ms   p99 {p99:6.2f} ms")
    finally:
        server.stdin.close()
        server.wait(30)


if __name__ == "__main__":
    serve() if sys.argv[1:] == ["--serve"] else main()
