"""Sync goodput at 3x capacity, open loop (a new request every 1/rate s whatever the answers), with
the reliability test's own load generators (tests/reliability/test_load.py: ``measure_capacity``,
``offer``): admitted runs/s and the engine's mean batch size, by LIVEGEN_MAX_PENDING_SYNC.
Usage: python open_loop.py 8 32"""

import asyncio
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: tests.*
from tests.conftest import start_server, stop_server
from tests.reliability.conftest import SERVER_ENV, scrape
from tests.reliability.test_load import SYNC_BODY, TURBO, measure_capacity, offer


def batches(server):
    """The engine's batch-size histogram so far: (sum of sizes, count of batches)."""
    metrics = scrape(server)
    return metrics["livegen_engine_batch_size_sum"], metrics["livegen_engine_batch_size_count"]


for limit in sys.argv[1:]:
    data = Path(tempfile.mkdtemp(prefix="livegen-openloop-"))
    env = {**SERVER_ENV, "LIVEGEN_MAX_PENDING_SYNC": limit, "LIVEGEN_LOG_LEVEL": "warning"}
    server = start_server(
        data, "--weights", "tiny-random", "--device", "cpu", "--models", "stabilityai/sd-turbo", env=env
    )
    try:
        for _ in range(5):
            httpx.post(f"{server.base_url}/{TURBO}", json=SYNC_BODY, headers={"Authorization": f"Key {server.key}"})
        s0, n0 = batches(server)
        cap = asyncio.run(measure_capacity(server, int(limit), 8.0))
        s1, n1 = batches(server)
        started = time.perf_counter()  # until the last answer: admitted runs finish after the 15 s
        st = Counter(outcome for outcome, _, _ in asyncio.run(offer(server, 3 * cap, 15.0)))
        dur = time.perf_counter() - started
        s2, n2 = batches(server)
        print(
            f"limit {limit:>3}: capacity {cap:6.1f}/s (mean batch {(s1 - s0) / (n1 - n0):.2f}); "
            f"offered {3 * cap:6.1f}/s for 15 s: "
            f"{dict(st)} -> admitted {st['200'] / dur:6.1f}/s, mean batch {(s2 - s1) / (n2 - n1):.2f}",
            flush=True,
        )
    finally:
        stop_server(server)
        shutil.rmtree(data, ignore_errors=True)
