"""``livegen bench realtime``: N sessions at F frames/s for D seconds, as the clients do it.

Each session gets a token from ``POST /rest/tokens/``, opens the realtime WebSocket and sends
msgpack frames (``request_id`` = a per-session counter) at the requested rate, while a reader
times each result against the send time of the frame it answers. At the end it waits briefly
for stragglers and reports latency percentiles, delivered frames/s, frames the server dropped
(superseded by newer ones: latest wins), error frames and misordered results (a result whose
``request_id`` is lower than one already seen in that session; must be 0).

Where a frame's time goes, from what the server sends with each result: ``timings.inference``
(the engine's batch, device work and encoding) and the ``x-fal-message`` timing that follows it
(the server's own span, frame received to result queued). The rest of the client's latency is
the transport, the server's send and the client itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgpack
import websockets


@dataclass
class SessionStats:
    sent: int = 0
    results: int = 0
    errors: int = 0
    misordered: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    inference_ms: list[float] = field(default_factory=list)  # the result's timings.inference
    server_ms: list[float] = field(default_factory=list)  # the x-fal-message timing after it
    error_reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BenchConfig:
    base_url: str
    key: str
    app: str = "fal-ai/fast-turbo-diffusion"
    sessions: int = 8
    fps: float = 10.0
    duration_s: float = 10.0
    frame: dict[str, Any] = field(default_factory=dict)
    max_buffering: int | None = None
    drain_s: float = 10.0
    warmup_s: float = 0.0  # the same load first, not counted: first-use captures, connection set-up
    new_prompts: bool = False  # every frame's prompt one the server has not seen (no cached embeddings)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def input_image_data_url(size: int, fmt: str = "jpeg") -> str:
    """A size x size gradient, as a webcam client sends it (JPEG q80) or as PNG."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))], -1)
    img = Image.fromarray(rgb.astype(np.uint8))
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, "PNG")
    else:
        img.save(buf, "JPEG", quality=80)
    return f"data:image/{fmt};base64," + base64.b64encode(buf.getvalue()).decode()


class BenchSetupError(Exception):
    """The sessions could not start: the server unreachable, or its token endpoint refused the key
    (a one-line message, without the key)."""


async def _token(client: httpx.AsyncClient, config: BenchConfig) -> str:
    alias = config.app.split("/")[1]
    url = f"{config.base_url}/rest/tokens/"
    try:
        r = await client.post(
            url,
            json={"allowed_apps": [alias], "token_expiration": 3600},
            headers={"Authorization": f"Key {config.key}"},
        )
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # refused, no such host, a URL httpx cannot use
        raise BenchSetupError(f"cannot reach {config.base_url}: {exc or type(exc).__name__}") from None
    if not r.is_success:
        try:
            detail = r.json().get("detail")
        except (ValueError, AttributeError):
            detail = r.text[:200]
        raise BenchSetupError(f"POST {url} answered {r.status_code}: {detail}")
    token: str = r.json()
    return token


async def _session(config: BenchConfig, token: str, index: int, stats: SessionStats, start_at: float) -> None:
    ws_base = config.base_url.replace("http", "ws", 1)
    url = f"{ws_base}/{config.app}/realtime?fal_jwt_token={token}"
    if config.max_buffering:
        url += f"&max_buffering={config.max_buffering}"
    sent_at: dict[int, float] = {}
    first_counted = 1 << 62  # the first frame sent after the warm-up; until then nothing counts
    last = -1  # the newest request_id answered
    timed = -1  # the newest request_id whose x-fal-message timing came too (it follows the result)
    answered = asyncio.Event()  # set on each result and timing: the sender's drain waits on it
    async with websockets.connect(url, max_size=None) as ws:

        async def reader() -> None:
            nonlocal last, timed
            timing_for_counted = False  # the next x-fal-message timing follows a counted result
            while True:
                try:
                    message = await ws.recv()
                except websockets.ConnectionClosed:
                    return
                now = time.perf_counter()
                if isinstance(message, str):
                    control = json.loads(message)
                    if control.get("type") == "x-fal-error":
                        stats.errors += 1
                        stats.error_reasons.append(f"{control.get('error')}: {control.get('reason')}")
                    elif control.get("action") == "timings":
                        timed = last
                        answered.set()
                        if timing_for_counted:
                            stats.server_ms.append(float(control.get("timing", 0.0)) * 1e3)
                    timing_for_counted = False
                    continue
                result = msgpack.unpackb(message, raw=False)
                seq = int(result.get("request_id", -1))
                if seq < last:
                    stats.misordered += 1
                last = max(last, seq)
                answered.set()
                timing_for_counted = seq >= first_counted
                if seq < first_counted:
                    continue  # a warm-up frame's result
                stats.results += 1
                inference = (result.get("timings") or {}).get("inference")
                if isinstance(inference, int | float):
                    stats.inference_ms.append(float(inference) * 1e3)
                if seq in sent_at:
                    stats.latencies_ms.append((now - sent_at[seq]) * 1e3)

        read_task = asyncio.create_task(reader())
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()) + index * (1 / config.fps) / config.sessions)
        interval = 1.0 / config.fps
        counted_from = time.perf_counter() + config.warmup_s
        deadline = counted_from + config.duration_s
        next_send = time.perf_counter()
        seq = 0
        while time.perf_counter() < deadline:
            frame = {**config.frame, "request_id": str(seq), "seed": index * 1_000_000 + seq}
            if config.new_prompts:  # as a prompt that follows its user's typing, one that changes every frame
                frame["prompt"] = f"{frame.get('prompt', '')}, session {index} frame {seq}"
            sent_at[seq] = time.perf_counter()
            if sent_at[seq] >= counted_from and first_counted > seq:
                first_counted = seq
            await ws.send(msgpack.packb(frame, use_bin_type=True))
            if seq >= first_counted:
                stats.sent += 1
            seq += 1
            next_send += interval
            await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
        # Drain: the newest frame is always answered (older ones may be superseded), so wait for
        # its result and the timing message that follows it, or drain_s without either.
        while timed < seq - 1 and not read_task.done():
            answered.clear()
            try:
                await asyncio.wait_for(answered.wait(), config.drain_s)
            except TimeoutError:
                break
        read_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await read_task


async def run_bench(config: BenchConfig) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=30) as client:
        tokens = [await _token(client, config) for _ in range(config.sessions)]
        stats = [SessionStats() for _ in range(config.sessions)]
        start_at = time.perf_counter() + 0.2
        started = time.perf_counter()
        await asyncio.gather(*(_session(config, tokens[i], i, stats[i], start_at) for i in range(config.sessions)))
        report = summarize(config, stats, time.perf_counter() - started)
        with contextlib.suppress(httpx.HTTPError, ValueError):
            ready = (await client.get(f"{config.base_url}/readyz")).json()
            # Which decoder took the input images (Pillow, or nvjpeg on a CUDA server), and how many.
            if (decode := ready.get("input_decode")) is not None:
                report["input_decode"] = decode
            # How the engine batched the frames (the server's totals, warm-up included).
            if "batch_sizes" in ready:
                kept = ("batch_sizes", "gather_s", "cut_batches", "priority_yields", "stages")
                report["batching"] = {k: ready.get(k) for k in kept}
    return report


def summarize(config: BenchConfig, stats: list[SessionStats], wall_s: float) -> dict[str, Any]:
    latencies = [v for s in stats for v in s.latencies_ms]
    results = sum(s.results for s in stats)
    sent = sum(s.sent for s in stats)
    errors = sum(s.errors for s in stats)
    return {
        "sessions": config.sessions,
        "fps_requested": config.fps,
        "duration_s": config.duration_s,
        "warmup_s": config.warmup_s,
        "new_prompts": config.new_prompts,
        "frames_sent": sent,
        "results": results,
        "dropped": sent - results - errors,
        "errors": errors,
        "misordered": sum(s.misordered for s in stats),
        "latency_ms": _percentiles(latencies),
        "server_ms": _percentiles([v for s in stats for v in s.server_ms]),
        "inference_ms": _percentiles([v for s in stats for v in s.inference_ms]),
        "delivered_fps_total": results / config.duration_s,
        "delivered_fps_per_session": results / config.duration_s / config.sessions,
        # the least and the most served session: an even split of the frames, or some starved
        "delivered_fps_session_range": [
            min(s.results for s in stats) / config.duration_s,
            max(s.results for s in stats) / config.duration_s,
        ],
        "wall_s": wall_s,
        "error_samples": sorted({r for s in stats for r in s.error_reasons})[:5],
    }


def _percentiles(values: list[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values) if values else float("nan"),
    }


def format_report(report: dict[str, Any]) -> str:
    def quantiles(q: dict[str, float]) -> str:
        return f"p50 {q['p50']:.1f}  p95 {q['p95']:.1f}  p99 {q['p99']:.1f}  mean {q['mean']:.1f}"

    low_high = report.get("delivered_fps_session_range")  # reports from before session 16 lack it
    spread = "" if low_high is None else f" ({low_high[0]:.2f}-{low_high[1]:.2f})"
    lines = [
        f"sessions {report['sessions']} x {report['fps_requested']:g} frames/s for {report['duration_s']:g} s"
        + (", a new prompt every frame" if report.get("new_prompts") else ""),
        f"frames sent {report['frames_sent']}, results {report['results']}, dropped (superseded) "
        f"{report['dropped']}, errors {report['errors']}, misordered {report['misordered']}",
        f"latency ms: {quantiles(report['latency_ms'])}",
    ]
    for label, key in (("in the server", "server_ms"), ("of which the engine", "inference_ms")):
        if key in report:
            lines.append(f"  {label} ms: {quantiles(report[key])}")
    lines += [
        f"delivered frames/s: total {report['delivered_fps_total']:.1f}, "
        f"per session {report['delivered_fps_per_session']:.2f}{spread}",
    ]
    if decode := report.get("input_decode"):
        counts = f": {decode['images']} images, {decode['fallbacks']} to Pillow" if "images" in decode else ""
        lines.append(f"input decode (server's total): {decode['decoder']}{counts}")
    if batching := report.get("batching"):
        sizes = ", ".join(
            f"{k}: {v}" for k, v in sorted((batching.get("batch_sizes") or {}).items(), key=lambda kv: int(kv[0]))
        )
        lines.append(
            f"engine batches (server's total), images: count {{{sizes}}}; held back {batching.get('gather_s')} s "
            f"to gather, {batching.get('cut_batches')} cut to a bucket"
            + (f", {n} ahead of higher-priority work" if (n := batching.get("priority_yields")) else "")
        )
        if (stages := batching.get("stages") or {}).get("batches"):
            parts = ", ".join(f"{k.removesuffix('_ms')} {v}" for k, v in stages.items() if k.endswith("_ms"))
            lines.append(f"engine batch stages, ms (medians of the server's last {stages['batches']} batches): {parts}")
    for sample in report["error_samples"]:
        lines.append(f"error: {sample}")
    return "\n".join(lines)
