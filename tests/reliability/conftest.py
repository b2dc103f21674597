"""Reliability tests: load, overload and fuzzing against real ``livegen serve`` processes.

Default runs are short (CI). Longer runs are for people, by hand:

    pytest tests/reliability --soak              # 10-minute realtime soak
    pytest tests/reliability --soak-seconds 1800
    LIVEGEN_SOAK=600 pytest tests/reliability    # the same through the environment ("1": 600 s)

(pytest reads ``--soak`` only when it is given ``tests/reliability`` or a file in it; from
``pytest tests`` use ``LIVEGEN_SOAK``.) The figures each test measures are printed (``-s``)
and written to ``artifacts/reliability-*.json``. Timings on a shared CPU are noisy: tests
assert counts and invariants, never latencies, except against generous deadlines.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import msgpack
import pytest
from websockets.sync.client import ClientConnection, connect

from tests.conftest import LiveServer

DEFAULT_SOAK_S = 600
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

# torch's CPU thread pool spins: with several processes on a small machine, one intra-op
# thread per server is many times faster than one per core (tens of ms per tiny image, not
# seconds).
SERVER_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("livegen reliability")
    group.addoption("--soak", action="store_true", default=False, help=f"long realtime soak ({DEFAULT_SOAK_S} s)")
    group.addoption("--soak-seconds", type=float, default=None, help="soak duration in seconds (implies --soak)")


@pytest.fixture(scope="session")
def soak_seconds(pytestconfig: pytest.Config) -> float:
    """0 for the short default run, else the soak duration in seconds."""
    seconds = pytestconfig.getoption("--soak-seconds", default=None)
    if seconds:
        return float(seconds)
    if pytestconfig.getoption("--soak", default=False):
        return float(DEFAULT_SOAK_S)
    env = os.environ.get("LIVEGEN_SOAK", "").strip().lower()
    if env in ("", "0", "false", "no"):
        return 0.0
    if env in ("1", "true", "yes"):
        return float(DEFAULT_SOAK_S)
    return float(env)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def scrape(server: LiveServer) -> dict[str, float]:
    """``/metrics`` as ``{'name{labels}': value}`` (labels as written by the server)."""
    import httpx

    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def frames(metrics: dict[str, float], outcome: str) -> float:
    return metrics.get(f'livegen_realtime_frames_total{{outcome="{outcome}"}}', 0.0)


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from ``/proc/<pid>/status`` (VmRSS, KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def record(name: str, figures: dict[str, Any]) -> None:
    """Print the figures and keep them in ``artifacts/reliability-<name>.json``."""
    text = json.dumps(figures, indent=2, sort_keys=True, default=str)
    print(f"\n[{name}]\n{text}")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / f"reliability-{name}.json").write_text(text + "\n")


def open_session(server: LiveServer, endpoint: str = "fal-ai/fast-turbo-diffusion") -> ClientConnection:
    """A realtime session authenticated with the key header (no token to expire)."""
    url = server.base_url.replace("http", "ws", 1) + f"/{endpoint}/realtime"
    return connect(url, additional_headers={"Authorization": f"Key {server.key}"}, max_size=None, open_timeout=30)


def next_answer(ws: ClientConnection) -> dict[str, Any]:
    """The next result (a msgpack map) or x-fal-error (a JSON dict), skipping timings."""
    while True:
        message = ws.recv(timeout=60)
        if isinstance(message, bytes):
            result: dict[str, Any] = msgpack.unpackb(message, raw=False)
            return result
        control: dict[str, Any] = json.loads(message)
        if control.get("type") == "x-fal-error":
            return control
        assert control.get("type") == "x-fal-message", control
