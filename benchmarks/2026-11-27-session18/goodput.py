"""Where does sync goodput go under overload? Admitted runs/s by 8 closed-loop clients while a
separate process floods at a fixed rate: refused POSTs, 401s, /healthz, or another server."""

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: tests.conftest
from tests.conftest import start_server, stop_server

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


BODY = {
    "prompt": "overload",
    "model_name": "stabilityai/sd-turbo",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 1,
}
FLOOD = r"""
import asyncio, sys, time, httpx, json
base, path, method, key = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[6]
rate, dur = float(sys.argv[4]), float(sys.argv[5])
body = json.loads(sys.argv[7])
async def main():
    lim = httpx.Limits(max_connections=None, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Key {key}"}, timeout=60, limits=lim) as c:
        async def one():
            try:
                r = await (c.post(path, json=body) if method == "POST" else c.get(path))
                return r.status_code
            except Exception as e:
                return type(e).__name__
        tasks = []; start = time.perf_counter(); n = 0
        while (now := time.perf_counter()) < start + dur:
            due = start + n / rate
            if now < due: await asyncio.sleep(due - now)
            tasks.append(asyncio.create_task(one())); n += 1
        res = await asyncio.gather(*tasks)
        from collections import Counter
        print(json.dumps({str(k): v for k, v in Counter(res).items()}))
asyncio.run(main())
"""


def main():
    tmp = Path(tempfile.mkdtemp(prefix="livegen-goodput-"))
    data = tmp / "a"
    data.mkdir()
    extra = sys.argv[1:]  # e.g. env overrides k=v
    env = {
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "LIVEGEN_MAX_PENDING_SYNC": "8",
        "LIVEGEN_LOG_LEVEL": "warning",
    }
    env.update(dict(a.split("=", 1) for a in extra))
    server = start_server(
        data, "--weights", "tiny-random", "--device", "cpu", "--models", "stabilityai/sd-turbo", env=env
    )
    other = start_server(
        tmp / "b",
        "--weights",
        "tiny-random",
        "--device",
        "cpu",
        "--models",
        "stabilityai/sd-turbo",
        env=env,
        synth_from=data,
    )
    pid = server.process.pid
    H = {"Authorization": f"Key {server.key}"}
    flood = tmp / "flood.py"
    flood.write_text(FLOOD)

    async def capacity(dur=10.0):
        done = 0
        refused = 0
        async with httpx.AsyncClient(base_url=server.base_url, headers=H, timeout=60) as c:
            end = time.perf_counter() + dur

            async def w():
                nonlocal done, refused
                while time.perf_counter() < end:
                    r = await c.post("/fal-ai/fast-turbo-diffusion", json=BODY)
                    if r.status_code == 200:
                        done += 1
                    else:
                        refused += 1
                        await asyncio.sleep(0.1)

            t0 = time.perf_counter()
            c0 = cpu_s(pid)
            await asyncio.gather(*(w() for _ in range(8)))
            print("  capacity clients refused", refused, end=" ")
            return done / (time.perf_counter() - t0), (cpu_s(pid) - c0) / (time.perf_counter() - t0)

    with httpx.Client(base_url=server.base_url, headers=H, timeout=60) as c:
        for _ in range(5):
            c.post("/fal-ai/fast-turbo-diffusion", json=BODY)
    rate = float(os.environ.get("FLOOD_RATE", "80"))
    cases = [
        ("none", None),
        ("refused POST", (server.base_url, "/fal-ai/fast-turbo-diffusion", "POST", server.key)),
        ("401 POST", (server.base_url, "/fal-ai/fast-turbo-diffusion", "POST", "bad:key")),
        ("GET /healthz", (server.base_url, "/healthz", "GET", server.key)),
        ("other server 401", (other.base_url, "/fal-ai/fast-turbo-diffusion", "POST", "bad:key")),
    ]
    try:
        for _ in range(2):
            for name, spec in cases:
                proc = None
                if spec:
                    base, path, method, key = spec
                    proc = subprocess.Popen(
                        [sys.executable, str(flood), base, path, method, str(rate), "11", key, json.dumps(BODY)],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    time.sleep(0.5)
                cap, cpu = asyncio.run(capacity())
                st = proc.communicate()[0].strip() if proc else ""
                print(f"{name:18s} admitted {cap:5.1f}/s  server cpu {cpu * 100:4.0f}% core  flood {st}", flush=True)
    finally:
        stop_server(server)
        stop_server(other)
        shutil.rmtree(tmp, ignore_errors=True)


main()
