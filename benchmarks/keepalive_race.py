"""The keep-alive race, measured: clients reuse a pooled connection just as the server's idle
timeout closes it (RELIABILITY.md, session 10).

    python benchmarks/keepalive_race.py SERVER_KEEP_ALIVE_S CLIENT_IDLE_S TRIALS

Starts the real app (a null engine) in this process with ``keep_alive_timeout_s`` =
SERVER_KEEP_ALIVE_S. 16 threads, each with its own httpx client, send ``GET /readyz``, wait
CLIENT_IDLE_S ± 4 ms, and send another on the same pooled connection; TRIALS pairs each. Prints
how many pairs succeeded and the transport errors met. With the server's timeout equal to the
client's idle time, some requests meet a connection the server is closing."""

from __future__ import annotations

import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from livegen.bench.null_engine import NullEngine, serve_in_thread
from livegen.settings import Settings

THREADS = 16


def main() -> None:
    server_keep_alive, idle, trials = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    errors: dict[str, int] = {}
    done = [0]
    lock = threading.Lock()

    def worker(url: str) -> None:
        # The client keeps idle connections longer than it waits, as httpx's 5 s pool does
        # against uvicorn's default 5 s once a response reaches the client late.
        with httpx.Client(base_url=url, limits=httpx.Limits(keepalive_expiry=idle + 1)) as client:
            for _ in range(trials):
                try:
                    client.get("/readyz")
                    time.sleep(idle + random.uniform(-0.004, 0.004))
                    client.get("/readyz")
                    with lock:
                        done[0] += 1
                except httpx.TransportError as exc:
                    with lock:
                        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), api_keys="k", models=[], keep_alive_timeout_s=server_keep_alive)
        with serve_in_thread(settings, NullEngine()) as url:  # type: ignore[arg-type]
            threads = [threading.Thread(target=worker, args=(url,)) for _ in range(THREADS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    print(f"server keep-alive {server_keep_alive} s, client reuses after ~{idle} s: {done[0]} ok, errors {errors}")


if __name__ == "__main__":
    main()
