"""Load: a realtime soak (with a client that stops reading) and sync HTTP overload at 3× capacity.

One dedicated server (sd-turbo, tiny random weights, CPU, one torch thread) serves both tests.

Realtime accounting. Every frame a client sends ends in exactly one of: a result, an error
frame, or a drop (superseded in its session's latest-wins inbox, counted by the server as
``livegen_realtime_frames_total{outcome="dropped"}``). A frame is **lost** when it is none of
these: ``lost = sent - results - errors - dropped``, with results and errors counted by the
clients and drops by the server. The client waits for its last frame's answer (the newest
frame is never superseded), so at the end nothing is still in flight. The server's own
``received`` and ``result`` counters must also equal what the clients sent and received.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
import websockets
from fal_client.client import _should_retry_response as fal_client_retries

from livegen.bench.realtime import BenchConfig, percentile, run_bench
from livegen.protocol.errors import Overloaded, error_body
from livegen.server.admission import SyncAdmission
from tests.conftest import LiveServer, start_server, stop_server
from tests.reliability.conftest import SERVER_ENV, frames, record, rss_kib, scrape

TURBO = "fal-ai/fast-turbo-diffusion"
MAX_PENDING_SYNC = 8
SESSIONS = 16
FPS = 10.0
SIZE = 128  # realtime frames: small enough that a 2-core CPU renders a good share of 160 frames/s
FRAME = {
    "prompt": "a lighthouse in a storm",
    "model_name": "stabilityai/sd-turbo",
    "image_size": {"width": SIZE, "height": SIZE},
    "num_inference_steps": 1,
}
# The client that stops reading asks for big PNGs, so its unread results fill the socket
# buffers (a few MB on loopback) after a handful of frames.
STUCK_FRAME = {**FRAME, "image_size": {"width": 256, "height": 256}, "format": "png"}
SYNC_BODY = {
    "prompt": "overload",
    "model_name": "stabilityai/sd-turbo",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 1,
}
# Sync requests: the client's deadline. Admitted requests must finish well within it.
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def load_server(tmp_path_factory: pytest.TempPathFactory, shared_data_dir: Path) -> Iterator[LiveServer]:
    server = start_server(
        tmp_path_factory.mktemp("load-server"),
        "--weights", "tiny-random", "--device", "cpu", "--models", "stabilityai/sd-turbo",
        env={**SERVER_ENV, "LIVEGEN_MAX_PENDING_SYNC": str(MAX_PENDING_SYNC)},
        synth_from=shared_data_dir,
    )  # fmt: skip
    yield server
    stop_server(server)


def bench(server: LiveServer, duration_s: float) -> BenchConfig:
    return BenchConfig(
        base_url=server.base_url,
        key=server.key,
        app=TURBO,
        sessions=SESSIONS,
        fps=FPS,
        duration_s=duration_s,
        frame=FRAME,
        drain_s=60.0,
    )


def deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {o: int(frames(after, o) - frames(before, o)) for o in ("received", "result", "dropped", "error")}


def phase_figures(report: dict[str, Any], server: dict[str, int]) -> dict[str, Any]:
    lat = report["latency_ms"]
    return {
        "frames_sent": report["frames_sent"],
        "results": report["results"],
        "errors": report["errors"],
        "misordered": report["misordered"],
        "server": server,
        "latency_ms": {k: round(lat[k], 1) for k in ("p50", "p95", "p99")},
        "delivered_fps_total": round(report["delivered_fps_total"], 1),
        "error_samples": report["error_samples"],
    }


# -- the client that stops reading ------------------------------------------------------------


class StuckReader:
    """A raw WebSocket client that sends ``STUCK_FRAME`` at ``FPS`` and never reads.

    Its receive buffer is made small and websockets' own queue holds one message, so the
    server's writes back up after a few results."""

    def __init__(self, server: LiveServer, token: str) -> None:
        self.url = f"{server.base_url.replace('http', 'ws', 1)}/{TURBO}/realtime?fal_jwt_token={token}"
        self.host, port = server.base_url.rsplit("//", 1)[1].split(":")
        self.port = int(port)
        self.sent = 0
        self.stop = asyncio.Event()
        self.closed: str | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (self.host, self.port))
        # No keepalive pings: a client that reads nothing never sees the pongs.
        ws = await websockets.connect(
            self.url, sock=sock, max_size=None, max_queue=1, close_timeout=1, ping_interval=None
        )
        try:
            while not self.stop.is_set():
                await ws.send(msgpack.packb({**STUCK_FRAME, "request_id": str(self.sent)}, use_bin_type=True))
                self.sent += 1
                await asyncio.sleep(1 / FPS)
        except websockets.ConnectionClosed as exc:
            self.closed = f"{exc.rcvd or exc.sent}"  # the server gave up on it (e.g. its keepalive)
        finally:
            ws.transport.abort()  # no close handshake behind megabytes nobody reads


async def wait_until_blocked(server: LiveServer, stuck: StuckReader, *, quiet_s: float = 3.0) -> int:
    """Results rendered for ``stuck`` (the only session) before the server stopped rendering
    for it: no new result for ``quiet_s`` while it keeps sending."""
    start = await asyncio.to_thread(scrape, server)
    last, last_change = frames(start, "result"), time.monotonic()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = frames(await asyncio.to_thread(scrape, server), "result")
        if now != last:
            last, last_change = now, time.monotonic()
        elif now > frames(start, "result") and time.monotonic() - last_change >= quiet_s:
            return int(now - frames(start, "result"))
    raise AssertionError("the server kept rendering for a client that reads nothing")


async def token_for(server: LiveServer) -> str:
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.post(
            server.base_url + "/rest/tokens/",
            json={"allowed_apps": ["fast-turbo-diffusion"], "token_expiration": 3600},
            headers={"Authorization": f"Key {server.key}"},
        )
        r.raise_for_status()
        token: str = r.json()
        return token


# -- the soak ----------------------------------------------------------------------------------


def test_realtime_soak_with_a_stuck_reader(load_server: LiveServer, soak_seconds: float) -> None:
    soak_s = soak_seconds or 25.0
    stuck_s = min(soak_s, 60.0) if soak_seconds else 20.0
    pid = load_server.process.pid

    # Warm-up: every shape the test uses (batches of 1..8 at 128, a 256 PNG), then the baseline RSS.
    asyncio.run(run_bench(bench(load_server, 6.0)))
    with load_server.client() as client:
        assert client.post(f"/{TURBO}", json={**STUCK_FRAME, "prompt": "warm-up"}).status_code == 200
    rss_warm = rss_kib(pid)

    # Phase A: the soak.
    m0 = scrape(load_server)
    soak = asyncio.run(run_bench(bench(load_server, soak_s)))
    m1 = scrape(load_server)
    rss_soak = rss_kib(pid)
    server_a = deltas(m0, m1)

    # Phase B: a client that stops reading, then the same 16 sessions beside it.
    async def with_stuck_reader() -> tuple[dict[str, Any], int, StuckReader, dict[str, float], dict[str, float]]:
        stuck = StuckReader(load_server, await token_for(load_server))
        task = asyncio.create_task(stuck.run())
        try:
            rendered_before_block = await wait_until_blocked(load_server, stuck)
            before = await asyncio.to_thread(scrape, load_server)
            report = await run_bench(bench(load_server, stuck_s))
            after = await asyncio.to_thread(scrape, load_server)
        finally:
            stuck.stop.set()
            await task
        return report, rendered_before_block, stuck, before, after

    stuck_report, rendered_before_block, stuck, m2, m3 = asyncio.run(with_stuck_reader())
    rss_end = rss_kib(pid)
    server_b = deltas(m2, m3)
    stuck_frames_in_b = server_b["received"] - stuck_report["frames_sent"]

    figures = {
        "machine": "2-core CPU VM shared with other work: timings are noisy",
        "sessions": SESSIONS,
        "fps_per_session": FPS,
        "frame": f"{SIZE}x{SIZE} jpeg, 1 step, sd-turbo tiny-random",
        "soak": {"duration_s": soak_s, **phase_figures(soak, server_a)},
        "stuck_reader": {
            "duration_s": stuck_s,
            "others": phase_figures(stuck_report, server_b),
            "stuck_frames_sent_total": stuck.sent,
            "stuck_closed_by_server": stuck.closed,
            "stuck_results_rendered_before_blocking": rendered_before_block,
            "stuck_frames_received_during_phase": stuck_frames_in_b,
            "p99_ms_without_stuck": round(soak["latency_ms"]["p99"], 1),
            "p99_ms_with_stuck": round(stuck_report["latency_ms"]["p99"], 1),
            "p99_ratio": round(stuck_report["latency_ms"]["p99"] / soak["latency_ms"]["p99"], 3),
        },
        "rss_kib": {"after_warm_up": rss_warm, "after_soak": rss_soak, "end": rss_end},
        "rss_growth_pct": round(100 * (max(rss_soak, rss_end) - rss_warm) / rss_warm, 2),
    }
    record("soak", figures)

    # Phase A: nothing lost, nothing out of order, no errors; drops are the server's.
    assert soak["errors"] == 0 and server_a["error"] == 0, soak["error_samples"]
    assert soak["misordered"] == 0
    assert server_a["received"] == soak["frames_sent"]
    assert server_a["result"] == soak["results"]
    lost = soak["frames_sent"] - soak["results"] - soak["errors"] - server_a["dropped"]
    assert lost == 0, figures
    assert soak["results"] > 0

    # Phase B: the stuck session is bounded: nothing more is rendered for it, and each frame
    # it sends supersedes one in its full inbox. The others lose nothing and keep getting results.
    assert server_b["result"] == stuck_report["results"], "the server rendered for a client that reads nothing"
    assert stuck_frames_in_b > 0
    others_dropped = server_b["dropped"] - stuck_frames_in_b
    assert stuck_report["errors"] == 0 and server_b["error"] == 0, stuck_report["error_samples"]
    assert stuck_report["misordered"] == 0
    assert stuck_report["frames_sent"] - stuck_report["results"] - others_dropped == 0, figures
    assert stuck_report["results"] > 0

    # Memory: bounded after warm-up, stuck reader included. Plus 64 MiB of allocator noise: on a
    # faster VM (~2,700 results per phase instead of ~800) RSS grew 1.0, 7.9 and 8.1 % in three runs
    # of session 10's code, 4.2 and 6.4 % with session 11's, and once 12.0 % (62 MB, a CI run).
    # Keeping each frame's decoded input (~200 KB) would add hundreds of MB.
    assert max(rss_soak, rss_end) < 1.10 * rss_warm + 64 * 1024, figures


# -- sync overload -----------------------------------------------------------------------------


async def measure_capacity(server: LiveServer, concurrency: int, duration_s: float) -> float:
    """Sync requests/s completed by ``concurrency`` clients that send as soon as answered."""
    done = 0
    deadline = time.perf_counter() + duration_s
    headers = {"Authorization": f"Key {server.key}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=headers, timeout=DEADLINE_S) as client:

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                r = await client.post(f"/{TURBO}", json=SYNC_BODY)
                assert r.status_code == 200, r.text
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - started)


async def offer(server: LiveServer, rate: float, duration_s: float) -> list[tuple[str, float, httpx.Response | None]]:
    """Open loop: a new request every ``1/rate`` s whatever the answers; (outcome, s, response)."""
    headers = {"Authorization": f"Key {server.key}"}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=200)
    async with httpx.AsyncClient(
        base_url=server.base_url, headers=headers, timeout=DEADLINE_S, limits=limits
    ) as client:

        async def one() -> tuple[str, float, httpx.Response | None]:
            started = time.perf_counter()
            try:
                r = await client.post(f"/{TURBO}", json=SYNC_BODY)
            except httpx.TimeoutException:
                return "timeout", time.perf_counter() - started, None
            except httpx.TransportError as exc:
                return f"transport:{type(exc).__name__}", time.perf_counter() - started, None
            return str(r.status_code), time.perf_counter() - started, r

        tasks = []
        start = time.perf_counter()
        n = 0
        while (now := time.perf_counter()) < start + duration_s:
            due = start + n / rate
            if now < due:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.create_task(one()))
            n += 1
        return list(await asyncio.gather(*tasks))


def server_side_shares(before: dict[str, float], after: dict[str, float], route: str) -> dict[str, float]:
    """Share of the route's requests the server answered within each histogram bucket."""
    prefix = 'livegen_http_request_duration_seconds_bucket{le="'
    suffix = f'",method="POST",route="{route}"}}'
    shares: dict[str, float] = {}
    total = after.get(f"{prefix}+Inf{suffix}", 0) - before.get(f"{prefix}+Inf{suffix}", 0)
    for le in ("0.1", "0.5", "1.0", "2.5", "5.0", "10.0"):
        n = after.get(f"{prefix}{le}{suffix}", 0) - before.get(f"{prefix}{le}{suffix}", 0)
        shares[le] = round(n / total, 3) if total else float("nan")
    return shares


def test_sync_overload_is_shed_with_503_and_retry_after(load_server: LiveServer) -> None:
    with load_server.client() as client:  # warm-up
        assert client.post(f"/{TURBO}", json=SYNC_BODY).status_code == 200
    capacity = asyncio.run(measure_capacity(load_server, MAX_PENDING_SYNC, 8.0))
    offered = 3 * capacity
    duration_s = 15.0
    before = scrape(load_server)
    outcomes = asyncio.run(offer(load_server, offered, duration_s))
    after = scrape(load_server)

    statuses = Counter(outcome for outcome, _, _ in outcomes)
    admitted = [s for outcome, s, _ in outcomes if outcome == "200"]
    refused = [r for outcome, _, r in outcomes if outcome in ("429", "503")]
    refused_s = [s for outcome, s, _ in outcomes if outcome in ("429", "503")]
    figures = {
        "machine": "2-core CPU VM shared with other work: timings are noisy",
        "request": "sync run, 64x64 jpeg, 1 step, sd-turbo tiny-random",
        "max_pending_sync": MAX_PENDING_SYNC,
        "capacity_rps": round(capacity, 1),
        "offered_rps": round(offered, 1),
        "duration_s": duration_s,
        "requests": len(outcomes),
        "statuses": dict(statuses),
        "admitted_latency_s": {q: round(percentile(admitted, q), 3) for q in (50, 95, 99)},
        "refused_latency_s": {q: round(percentile(refused_s, q), 3) for q in (50, 99)},
        "deadline_s": DEADLINE_S,
        # Measured inside the server (request parsed -> response sent), all statuses together:
        # the gap to the client's figures is connection set-up and the client's own loop.
        "server_side_share_within_s": server_side_shares(before, after, f"/{TURBO}"),
    }
    record("overload", figures)

    # Only 200, 429 and 503: no 500s, no resets, no request past its deadline.
    assert set(statuses) <= {"200", "429", "503"}, figures
    assert admitted and refused, figures  # 3× capacity was offered: some shed, some served
    for r in refused:
        assert r is not None
        assert int(r.headers["retry-after"]) >= 1
        body = r.json()
        assert r.headers["x-fal-error-type"] == body["error_type"] and isinstance(body["detail"], str)
        if r.status_code == 503:  # refused before acceptance: fal's ingress shape, which both clients retry
            assert body == {"detail": body["detail"], "error_type": "server_overloaded", "ingress": "nginx"}
            assert "x-fal-request-id" not in r.headers
        else:  # 429 queue_full: the app's answer; both clients retry 429 anyway
            assert set(body) == {"detail", "error_type"} and r.headers["x-fal-request-id"]
        assert fal_client_retries(r)
    assert {r.json()["error_type"] for r in refused if r is not None} <= {"server_overloaded", "queue_full"}
    # Within the deadline as the server measured it (parsed -> answered). The client-side figures
    # are recorded, not asserted: on a shared 2-core VM the load generator in this process starves
    # run to run (the same code gave an admitted p50 of 0.37 s in one run and 11 s in the next,
    # with the server answering everything within 1 s in both), so they measure the client.
    assert figures["server_side_share_within_s"]["10.0"] == 1.0, figures

    # Afterwards every slot is free again: a full burst is admitted.
    async def burst() -> list[int]:
        headers = {"Authorization": f"Key {load_server.key}"}
        async with httpx.AsyncClient(base_url=load_server.base_url, headers=headers, timeout=DEADLINE_S) as client:
            rs = await asyncio.gather(*(client.post(f"/{TURBO}", json=SYNC_BODY) for _ in range(MAX_PENDING_SYNC)))
            return [r.status_code for r in rs]

    assert asyncio.run(burst()) == [200] * MAX_PENDING_SYNC


# -- admission, without a server ---------------------------------------------------------------


def test_sync_admission_refuses_beyond_its_limit_and_frees_slots() -> None:
    admission = SyncAdmission(2)
    with admission.take(), admission.take():
        assert admission.pending == 2
        with pytest.raises(Overloaded) as info, admission.take():
            pass
    assert admission.pending == 0 and admission.refused == 1
    with pytest.raises(RuntimeError), admission.take():  # a failure inside frees the slot too
        raise RuntimeError("boom")
    assert admission.pending == 0
    exc = info.value
    assert exc.http_status == 503
    assert exc.headers() == {"Retry-After": "1"}
    body = error_body(exc)
    assert body["error_type"] == "server_overloaded" and "in flight" in body["detail"]
    assert json.loads(json.dumps(body)) == body
