"""Server CPU per refused sync request (admission full) vs per cheap request, on loopback.

A slot is held by a sync request whose image_url points at a loopback server that stalls, so the
held request costs no CPU. Then closed-loop clients send refused requests; the server's CPU time
(utime+stime from /proc) per request is the figure.
"""

import asyncio
import http.server
import json
import os
import shutil
import socketserver
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: tests.conftest
from tests.conftest import free_port, start_server, stop_server

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid):
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK


class Stall(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        time.sleep(600)

    def log_message(self, *a):
        pass


def main():
    port = free_port()
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", port), Stall)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    data = Path(tempfile.mkdtemp(prefix="livegen-refusal-"))
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
            "LIVEGEN_MAX_PENDING_SYNC": "1",
            "LIVEGEN_ALLOW_PRIVATE_URLS": "1",
            "LIVEGEN_FETCH_TIMEOUT_S": "600",
            "LIVEGEN_LOG_LEVEL": "warning",
        },
    )
    pid = server.process.pid
    H = {"Authorization": f"Key {server.key}"}
    turbo = "fal-ai/fast-turbo-diffusion/image-to-image"
    hold = {"prompt": "hold", "model_name": "stabilityai/sd-turbo", "image_url": f"http://127.0.0.1:{port}/x.png"}
    body_t2i = {
        "prompt": "overload",
        "model_name": "stabilityai/sd-turbo",
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 1,
    }
    import base64
    import io

    import numpy as np
    from PIL import Image

    def i2i(image):
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=95)
        return {
            "prompt": "overload",
            "model_name": "stabilityai/sd-turbo",
            "image_url": "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(),
        }

    body_i2i = i2i(Image.new("RGB", (512, 512), (120, 30, 200)))
    body_big = i2i(Image.fromarray(np.random.default_rng(0).integers(0, 255, (1024, 1024, 3), dtype=np.uint8)))
    print("i2i body bytes", len(json.dumps(body_i2i)), "big", len(json.dumps(body_big)))

    async def loop(method, path, body, duration=8.0, conc=4, headers=H):
        statuses = {}
        n = 0
        async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=60) as c:
            end = time.perf_counter() + duration

            async def w():
                nonlocal n
                while time.perf_counter() < end:
                    r = await (c.post(path, json=body) if method == "POST" else c.get(path))
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    n += 1

            c0 = cpu_s(pid)
            t0 = time.perf_counter()
            await asyncio.gather(*(w() for _ in range(conc)))
            dt = time.perf_counter() - t0
            dc = cpu_s(pid) - c0
        return n, statuses, dt, dc

    async def run_all():
        async with httpx.AsyncClient(base_url=server.base_url, headers=H, timeout=700) as c:
            holder = asyncio.create_task(c.post(f"/{turbo}", json=hold))
            await asyncio.sleep(1.0)
            cases = [
                ("GET /healthz", "GET", "/healthz", None, H),
                ("POST t2i refused", "POST", "/fal-ai/fast-turbo-diffusion", body_t2i, H),
                ("POST i2i 512 refused", "POST", f"/{turbo}", body_i2i, H),
                ("POST i2i 1024 noise refused", "POST", f"/{turbo}", body_big, H),
                (
                    "POST t2i bad key 401",
                    "POST",
                    "/fal-ai/fast-turbo-diffusion",
                    body_t2i,
                    {"Authorization": "Key nope:nope"},
                ),
            ]
            for _ in range(2):
                for name, m, p, b, h in cases:
                    n, st, dt, dc = await loop(m, p, b, headers=h)
                    print(
                        f"{name:28s} n={n:5d} {st} {n / dt:7.1f} req/s  "
                        f"server cpu {dc * 1e3 / n:6.2f} ms/req ({dc / dt * 100:.0f}% of a core)"
                    )
            holder.cancel()

    try:
        asyncio.run(run_all())
    finally:
        stop_server(server)
        shutil.rmtree(data, ignore_errors=True)


main()
