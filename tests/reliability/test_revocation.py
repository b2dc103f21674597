"""Revoking an API key ends the realtime sessions (and HTTP-over-WebSocket connections) it
opened, whether opened with the key itself (``Authorization: Key``) or with a token issued for
it: ``livegen keys revoke`` (another process) only marks the key in the database, and each open
session re-checks its key every ``LIVEGEN_KEY_CHECK_S`` seconds, then closes with 1008 and the
reason. Sessions of other keys carry on."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from click.testing import CliRunner
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from livegen.cli import main
from tests.conftest import LiveServer, start_server, stop_server
from tests.reliability.conftest import next_answer

TURBO = "fal-ai/fast-turbo-diffusion"
FRAME = {"prompt": "a fox", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}
CHECK_S = 0.3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("revocation-server")


@pytest.fixture(scope="module")
def managed_key(data_dir: Path) -> str:
    created = CliRunner().invoke(main, ["keys", "create", "--name", "to-revoke", "--data-dir", str(data_dir)])
    assert created.exit_code == 0, created.output
    return created.stdout.strip().splitlines()[0]


@pytest.fixture(scope="module")
def server(data_dir: Path, managed_key: str, shared_data_dir: Path) -> Iterator[LiveServer]:
    srv = start_server(
        data_dir, "--weights", "tiny-random", "--device", "cpu", "--models", "stabilityai/sd-turbo",
        env={"LIVEGEN_KEY_CHECK_S": str(CHECK_S), "OMP_NUM_THREADS": "1"}, synth_from=shared_data_dir,
    )  # fmt: skip
    yield srv
    stop_server(srv)


def _connect(
    server: LiveServer, *, key: str | None = None, token: str | None = None, path: str = "/realtime"
) -> ClientConnection:
    """A realtime session, or with ``path=""`` an HTTP-over-WebSocket connection."""
    url = server.base_url.replace("http", "ws", 1) + f"/{TURBO}{path}"
    if token:
        return connect(f"{url}?fal_jwt_token={token}", max_size=None, open_timeout=30)
    return connect(url, additional_headers={"Authorization": f"Key {key}"}, max_size=None, open_timeout=30)


def _frame(ws: ClientConnection, request_id: str) -> dict[str, Any]:
    ws.send(msgpack.packb({**FRAME, "request_id": request_id}, use_bin_type=True))
    answer = next_answer(ws)
    assert answer.get("request_id") == request_id and answer.get("images"), answer
    return answer


def _closed(ws: ClientConnection, timeout_s: float = 30) -> ConnectionClosed:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        except ConnectionClosed as exc:
            return exc
        except TimeoutError:
            break
    pytest.fail(f"the session was still open {timeout_s} s after its key was revoked")


def test_revoking_a_key_closes_its_sessions_and_only_those(
    server: LiveServer, data_dir: Path, managed_key: str
) -> None:
    token_r = httpx.post(
        server.base_url + "/rest/tokens/",
        json={"allowed_apps": ["fast-turbo-diffusion"], "token_expiration": 3600},
        headers={"Authorization": f"Key {managed_key}"},
    )
    assert token_r.status_code == 200, token_r.text
    with (
        _connect(server, key=managed_key) as by_key,
        _connect(server, token=token_r.json()) as by_token,
        _connect(server, key=server.key) as other,
        _connect(server, key=managed_key, path="") as http_over_ws,
    ):
        for i, ws in enumerate((by_key, by_token, other)):
            _frame(ws, f"before-{i}")
        http_over_ws.send(json.dumps(FRAME))
        assert json.loads(http_over_ws.recv(timeout=30))["status"] == 200
        http_over_ws.recv(timeout=30), http_over_ws.recv(timeout=30)  # the output, the end
        time.sleep(4 * CHECK_S)  # several checks pass while the key is valid: nothing closes
        _frame(by_key, "still-open")

        revoked = CliRunner().invoke(main, ["keys", "revoke", managed_key.split(":")[0], "--data-dir", str(data_dir)])
        assert revoked.exit_code == 0, revoked.output
        for ws in (by_key, by_token, http_over_ws):
            closed = _closed(ws)
            assert closed.rcvd is not None and closed.rcvd.code == 1008, closed
            assert "revoked" in closed.rcvd.reason

        _frame(other, "after")  # the static key's session is untouched
    assert "API key was revoked" in server.log()
    assert managed_key not in server.log()
