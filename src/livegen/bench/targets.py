"""The GPU fast-path issue's targets against a run's reports (``scripts/gpu-bench``'s results.jsonl).

    python -m livegen.bench.targets results.jsonl      # a markdown table, one row per target

Each engine target takes the best livegen row that matches it (any variant: the table names
which; variants with float8 linears, ``+fp8``, get a line of their own, their images being outside
the fp16 fast path's tolerance), at 512², against the issue's bound: a batch-1 target the row's time with one batch at a
time (its latency), a best-batch target the row's images/s either so or with two batches in
flight (a server's throughput under steady load; the table says which). Each realtime target
takes the matching realtime report.
The mission's "faster than StreamDiffusion on the same card" is read off the reports of
``livegen bench --streamdiffusion`` (its PyTorch pipeline in the same process, no TensorRT): the
best livegen row's speed-up over StreamDiffusion's row at the same batch 1.
A target no report covers says so ("not run") rather than passing or failing.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

SD_TURBO = "stabilityai/sd-turbo"
SDXL_TURBO = "stabilityai/sdxl-turbo"
SD15 = "runwayml/stable-diffusion-v1-5"


@dataclass(frozen=True)
class EngineTarget:
    what: str
    model: str
    task: str
    steps: int
    batch1: bool  # True: ms/img at batch 1 (at most ``bound``); False: best img/s (at least ``bound``)
    bound: float
    size: int = 512


@dataclass(frozen=True)
class RealtimeTarget:
    what: str
    sessions: int
    metric: Callable[[dict[str, Any]], float]
    unit: str
    at_most: bool
    bound: float


ENGINE_TARGETS = (
    EngineTarget("SD-Turbo t2i 1 step, batch 1", SD_TURBO, "t2i", 1, True, 5.0),
    EngineTarget("SD-Turbo t2i 1 step, best batch", SD_TURBO, "t2i", 1, False, 500.0),
    EngineTarget("SD-Turbo i2i 1 effective step, batch 1", SD_TURBO, "i2i", 2, True, 6.0),
    EngineTarget("SD-Turbo i2i 1 effective step, best batch", SD_TURBO, "i2i", 2, False, 400.0),
    EngineTarget("SDXL-Turbo t2i 1 step, batch 1", SDXL_TURBO, "t2i", 1, True, 10.0),
    EngineTarget("SDXL-Turbo t2i 1 step, best batch", SDXL_TURBO, "t2i", 1, False, 200.0),
    EngineTarget("LCM SD 1.5 4 steps, batch 1", SD15, "t2i", 4, True, 15.0),
)
REALTIME_TARGETS = (
    RealtimeTarget("realtime 1 session: p50 frame latency", 1, lambda r: r["latency_ms"]["p50"], "ms", True, 12.0),
    RealtimeTarget("realtime 16 sessions: frames/s delivered", 16, lambda r: r["delivered_fps_total"], "frames/s",
                   False, 400.0),
    RealtimeTarget("realtime 16 sessions: p99 frame latency", 16, lambda r: r["latency_ms"]["p99"], "ms", True, 50.0),
)  # fmt: skip


# (what, task, steps): livegen's best batch-1 row against StreamDiffusion's in the same report.
STREAMDIFFUSION_TARGETS = (
    ("SD-Turbo t2i batch 1 vs StreamDiffusion (PyTorch path, same run)", "t2i", 1),
    ("SD-Turbo i2i batch 1 vs StreamDiffusion (PyTorch path, same run)", "i2i", 2),
)


def _engine_rows(reports: Iterable[dict[str, Any]]) -> Iterable[tuple[dict[str, Any], dict[str, Any]]]:
    for report in reports:
        for row in report.get("rows", []):
            yield report, row


def _realtime_ok(report: dict[str, Any]) -> bool:
    """A realtime report of the real engine, text-to-image (the null-engine and i2i runs are
    breakdowns, not the targets' runs)."""
    args = str(report.get("args", ""))
    return "latency_ms" in report and "--null-engine" not in args and "--image" not in args


def evaluate(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per target: what, bound, best measured value, where it came from, met."""
    out: list[dict[str, Any]] = []
    for t in ENGINE_TARGETS:
        unit = "ms/img" if t.batch1 else "img/s"
        out.append(_entry(t.what, t.batch1, t.bound, unit, _best_engine_row(reports, t, fp8=False)))
        # Float8 linears change the images beyond the fp16 fast path's tolerance: their rows get
        # a line of their own, shown only where a run has them.
        if (fp8 := _best_engine_row(reports, t, fp8=True)) is not None:
            out.append(_entry(f"{t.what}, float8 linears (images outside the fp16 tolerance)", t.batch1, t.bound,
                              unit, fp8))  # fmt: skip
    for what, task, steps in STREAMDIFFUSION_TARGETS:
        best = None
        for report, row in _engine_rows(reports):
            if (row["model"], row["task"], row["size"], report.get("steps"), row["batch"]) != (
                SD_TURBO,
                task,
                512,
                steps,
                1,
            ) or not row.get("streamdiffusion_ms_per_img"):
                continue
            speedup = row["streamdiffusion_ms_per_img"] / row["livegen_ms_per_img"]
            best = _better(best, speedup, f"{row.get('variant', 'default')}, batch 1", False)
        out.append(_entry(what, False, 1.0, "×", best))
    for rt in REALTIME_TARGETS:
        best = None
        for report in reports:
            if not _realtime_ok(report) or report.get("sessions") != rt.sessions:
                continue
            value = float(rt.metric(report))
            if math.isnan(value):
                continue
            best = _better(best, value, str(report.get("name", "")), rt.at_most)
        out.append(_entry(rt.what, rt.at_most, rt.bound, rt.unit, best))
    return out


def _best_engine_row(reports: list[dict[str, Any]], t: EngineTarget, *, fp8: bool) -> tuple[float, str] | None:
    """The best row for ``t`` among the variants with float8 linears (``+fp8``) or without."""
    best: tuple[float, str] | None = None
    for report, row in _engine_rows(reports):
        if (row["model"], row["task"], row["size"], report.get("steps")) != (t.model, t.task, t.size, t.steps):
            continue
        variant = str(row.get("variant", "default"))
        if (t.batch1 and row["batch"] != 1) or ("fp8" in variant.split("+")) != fp8:
            continue
        where = f"{variant}, batch {row['batch']}"
        if t.batch1:  # a batch's latency: one batch at a time
            best = _better(best, row["livegen_ms_per_img"], where, True)
            continue
        best = _better(best, row["livegen_img_per_s"], where, False)
        if row.get("pipelined_img_per_s"):  # throughput under steady load: two batches in flight
            best = _better(best, row["pipelined_img_per_s"], f"{where}, 2 batches in flight", False)
    return best


def _better(best: tuple[float, str] | None, value: float, where: str, lower: bool) -> tuple[float, str]:
    """``(value, where)`` if it beats ``best`` (lower or higher is better), else ``best``."""
    if best is None or (value < best[0] if lower else value > best[0]):
        return value, where
    return best


def _entry(what: str, at_most: bool, bound: float, unit: str, best: tuple[float, str] | None) -> dict[str, Any]:
    met = None if best is None else (best[0] <= bound if at_most else best[0] >= bound)
    return {
        "target": what,
        "bound": f"{'≤' if at_most else '≥'} {bound:g} {unit}",
        "measured": None if best is None else round(best[0], 2),
        "unit": unit,
        "from": None if best is None else best[1],
        "met": met,
    }


def format_targets(entries: list[dict[str, Any]]) -> str:
    lines = ["| target | bound | best measured | from | met |", "|---|---|---|---|---|"]
    for e in entries:
        measured = "not run" if e["measured"] is None else f"{e['measured']:g} {e['unit']}"
        met = "-" if e["met"] is None else ("yes" if e["met"] else "**no**")
        lines.append(f"| {e['target']} | {e['bound']} | {measured} | {e['from'] or '-'} | {met} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m livegen.bench.targets RESULTS.jsonl", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        reports = [json.loads(line) for line in f if line.strip()]
    print(format_targets(evaluate(reports)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
