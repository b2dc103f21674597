"""Session 20: what a request costs the server over HTTP and over HTTP-over-WebSocket.

The real app with ``NullEngine`` (no generation: a ready-made JPEG) in a uvicorn thread on
loopback, and the client in the same process, so each figure is a whole round trip of client and
server CPU work on this machine. Sequential requests on one kept-alive connection, each way timed
in 5 alternating blocks of 500 requests (the figures: medians over the blocks):

* ``POST`` with httpx (what fal-client does underneath, without its retry wrapper);
* ``fal_client.SyncClient.run`` (the official client, pointed at the server);
* ``WS /{endpoint}``, one request, then its three answer messages, then the next;
* ``WS /{endpoint}`` pipelined: 8 requests sent ahead, then their 24 answer messages;

and, as a floor for HTTP (httpx's own cost plus the middleware stack), ``GET /healthz``.

Two bodies: text-to-image at 64x64 (a ~1 kB answer) and image-to-image at 512x512 with a JPEG data
URL in (~70 kB up) and a data URL out (the NullEngine's flat JPEG).

    python benchmarks/2026-11-27-session20/http_over_ws.py
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from websockets.sync.client import connect

from livegen.bench.null_engine import null_server

KEY = "bench:" + "k" * 32
ROUNDS = 500
REPEATS = 5
PIPELINE = 8


def photo_like(width: int, height: int) -> str:
    """A JPEG data URL with some detail (a gradient with noise), as a camera frame would be."""
    img = Image.effect_noise((width, height), 64).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def timed(cases: dict[str, tuple[Callable[[], object], int]]) -> None:
    """Each case (a call and how many requests it makes) in ``REPEATS`` alternating blocks of
    ``ROUNDS`` requests after a warm-up; prints the median over blocks of each block's p50 and p99."""
    for one, _ in cases.values():
        for _ in range(50):
            one()
    blocks: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(REPEATS):
        for name, (one, per) in cases.items():
            samples = []
            for _ in range(ROUNDS // per):
                start = time.perf_counter()
                one()
                samples.append((time.perf_counter() - start) / per)
            samples.sort()
            blocks[name].append((samples[len(samples) // 2], samples[int(len(samples) * 0.99)]))
    for name, values in blocks.items():
        p50 = statistics.median(v[0] for v in values) * 1e3
        p99 = statistics.median(v[1] for v in values) * 1e3
        print(f"  {name:<34} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms")


def compare(name: str, endpoint: str, body: dict[str, Any], http: httpx.Client, fal: Any, ws_base: str) -> None:
    text = json.dumps(body)
    print(f"{name} ({len(text)} bytes up):")
    headers = {"Authorization": f"Key {KEY}"}
    with connect(f"{ws_base}/{endpoint}", additional_headers=headers, max_size=None) as ws:

        def post() -> None:
            response = http.post(f"/{endpoint}", content=text, headers={"content-type": "application/json"})
            assert response.status_code == 200, response.text[:200]

        def over_ws() -> None:
            ws.send(text)
            start, _, _ = (ws.recv() for _ in range(3))
            assert json.loads(start)["status"] == 200

        def pipelined() -> None:
            for _ in range(PIPELINE):
                ws.send(text)
            for _ in range(PIPELINE * 3):
                ws.recv()

        timed(
            {
                "POST (httpx, keep-alive)": (post, 1),
                "fal_client.SyncClient.run": (lambda: fal.run(endpoint, body), 1),
                "WS, one at a time": (over_ws, 1),
                f"WS, {PIPELINE} sent ahead (per request)": (pipelined, PIPELINE),
            }
        )


def main() -> None:
    import fal_client

    from livegen.client import point_fal_client

    bodies = {
        "t2i 64x64": ("fal-ai/fast-turbo-diffusion", {"prompt": "a fox", "image_size": {"width": 64, "height": 64}}),
        "i2i 512x512, data URL in": (
            "fal-ai/fast-turbo-diffusion/image-to-image",
            {"prompt": "a fox", "image_url": photo_like(512, 512), "strength": 1.0},
        ),
    }
    with tempfile.TemporaryDirectory() as tmp, null_server(Path(tmp), KEY) as url:
        point_fal_client(url)
        fal = fal_client.SyncClient(key=KEY)
        http = httpx.Client(base_url=url, headers={"Authorization": f"Key {KEY}"}, timeout=30)
        ws_base = url.replace("http", "ws", 1)
        print("floor: GET /healthz (no auth, no body, no generation):")
        timed({"GET /healthz (httpx, keep-alive)": (lambda: http.get("/healthz"), 1)})
        for name, (endpoint, body) in bodies.items():
            compare(name, endpoint, body, http, fal, ws_base)
        http.close()


if __name__ == "__main__":
    main()
