"""BENCHMARKS.md's session-16 table from results.jsonl: frames/s, p50 / p99 ms, and the batch
sizes each run settled into (those making more than 15 % of its batches), per session count."""

import collections
import json
from pathlib import Path

rows = collections.defaultdict(list)
for line in (Path(__file__).parent / "results.jsonl").read_text().splitlines():
    r = json.loads(line)
    tag, _, device, sessions, _run = r["run"].split("-")
    if tag not in ("base", "fill1"):  # the max-batch-16 and fill-0.8 runs: BENCHMARKS.md's last rows
        continue
    sizes = r["batching"]["batch_sizes"]
    settled = "+".join(k for k, v in sorted(sizes.items(), key=lambda kv: -kv[1]) if v > 0.15 * sum(sizes.values()))
    lat = r["latency_ms"]
    rows[(int(sessions), device, tag)].append(
        f"{r['delivered_fps_total']:.1f}, {lat['p50']:.1f} / {lat['p99']:.1f} ({settled})"
    )
for n in sorted({key[0] for key in rows}):
    columns = [(device, tag) for device in ("graph", "compile") for tag in ("base", "fill1")]
    cells = ["; ".join(rows.get((n, *column), ["—"])) for column in columns]
    print(f"| {n} | " + " | ".join(cells) + " |")
