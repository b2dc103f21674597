"""Sync goodput at 3x capacity, open loop (a new request every 1/rate s whatever the answers), as
tests/reliability/test_load.py offers it: admitted runs/s and the engine's mean batch size, by
LIVEGEN_MAX_PENDING_SYNC. Usage: python open_loop.py 8 32"""

import asyncio
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: tests.conftest
from tests.conftest import start_server, stop_server

BODY = {
    "prompt": "overload",
    "model_name": "stabilityai/sd-turbo",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 1,
}
PATH = "/fal-ai/fast-turbo-diffusion"


def batches(server):
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    s = float(re.search(r"^livegen_engine_batch_size_sum (\S+)", text, re.M).group(1))
    n = float(re.search(r"^livegen_engine_batch_size_count (\S+)", text, re.M).group(1))
    return s, n


async def closed(server, conc, dur):
    done = 0
    async with httpx.AsyncClient(
        base_url=server.base_url, headers={"Authorization": f"Key {server.key}"}, timeout=60
    ) as c:
        end = time.perf_counter() + dur

        async def w():
            nonlocal done
            while time.perf_counter() < end:
                if (await c.post(PATH, json=BODY)).status_code == 200:
                    done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(w() for _ in range(conc)))
        return done / (time.perf_counter() - t0)


async def open_loop(server, rate, dur):
    lim = httpx.Limits(max_connections=None, max_keepalive_connections=200)
    async with httpx.AsyncClient(
        base_url=server.base_url, headers={"Authorization": f"Key {server.key}"}, timeout=60, limits=lim
    ) as c:

        async def one():
            return (await c.post(PATH, json=BODY)).status_code

        tasks = []
        start = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) < start + dur:
            due = start + n / rate
            if now < due:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.create_task(one()))
            n += 1
        return Counter(await asyncio.gather(*tasks)), time.perf_counter() - start


for limit in sys.argv[1:]:
    data = Path(tempfile.mkdtemp(prefix="livegen-openloop-"))
    server = start_server(
        data,
        "--weights",
        "tiny-random",
        "--device",
        "cpu",
        "--models",
        "stabilityai/sd-turbo",
        env={
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "LIVEGEN_MAX_PENDING_SYNC": limit,
            "LIVEGEN_LOG_LEVEL": "warning",
        },
    )
    try:
        for _ in range(5):
            httpx.post(server.base_url + PATH, json=BODY, headers={"Authorization": f"Key {server.key}"}, timeout=60)
        s0, n0 = batches(server)
        cap = asyncio.run(closed(server, int(limit), 8.0))
        s1, n1 = batches(server)
        st, dur = asyncio.run(open_loop(server, 3 * cap, 15.0))
        s2, n2 = batches(server)
        print(
            f"limit {limit:>3}: capacity {cap:6.1f}/s (mean batch {(s1 - s0) / (n1 - n0):.2f}); "
            f"offered {3 * cap:6.1f}/s for 15 s: "
            f"{dict(st)} -> admitted {st[200] / dur:6.1f}/s, mean batch {(s2 - s1) / (n2 - n1):.2f}",
            flush=True,
        )
    finally:
        stop_server(server)
        shutil.rmtree(data, ignore_errors=True)
