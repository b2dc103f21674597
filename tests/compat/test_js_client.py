"""The official JS client (@fal-ai/client 1.10.1, pinned in tests/js) against a live server.

Runs ``node --test tests/js/`` with LIVEGEN_BASE_URL and FAL_KEY pointing at the session's
server; the Node tests use the shipped helper ``clients/js/livegen.mjs`` in both of its modes
(requestMiddleware and the /api/fal/proxy route). ``scripts/test`` installs tests/js's packages.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import LiveServer

ROOT = Path(__file__).resolve().parents[2]
JS_TESTS = ROOT / "tests" / "js"


def test_js_client(request: pytest.FixtureRequest) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node (>= 20) is not on PATH; the JS compatibility tests need it")
    if not (JS_TESTS / "node_modules" / "@fal-ai" / "client" / "package.json").is_file():
        pytest.fail(
            "tests/js/node_modules is missing: run scripts/test, which installs it (or: npm ci --prefix tests/js)"
        )
    live_server: LiveServer = request.getfixturevalue("live_server")  # after the checks: it takes a while
    env = {**os.environ, "LIVEGEN_BASE_URL": live_server.base_url, "FAL_KEY": live_server.key}
    for inherited in ("FAL_KEY_ID", "FAL_KEY_SECRET"):
        env.pop(inherited, None)
    try:
        proc = subprocess.run(
            [node, "--test", "--test-reporter=spec", str(JS_TESTS)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired as exc:
        partial = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        pytest.fail(f"node --test still running after {exc.timeout} s:\n{partial[-20000:]}")
    output = proc.stdout + proc.stderr
    print(output)  # shown with -rP / -s: which Node tests ran, and which were skipped as pending
    assert proc.returncode == 0, f"node --test exited with {proc.returncode}:\n{output[-20000:]}"
