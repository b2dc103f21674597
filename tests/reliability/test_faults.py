"""Faults: SIGKILL at random points, SIGTERM's drain, a webhook receiver that is down, a full
disk and a read-only data dir. Each test drives real ``livegen serve`` processes (tiny random
weights, one model) and prints its figures as ``FIGURE`` lines (``pytest -s`` shows them)."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import resource
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fal_client.client import _should_retry_response as fal_client_retries
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.conftest import LiveServer, free_port, png_bytes, start_server, stop_server

APP = "fal-ai/fast-turbo-diffusion"
MODEL = "stabilityai/sd-turbo"
ARGS = ("--weights", "tiny-random", "--device", "cpu", "--models", MODEL)
SMALL = {"prompt": "x", "model_name": MODEL, "image_size": {"width": 64, "height": 64}, "num_inference_steps": 1}
# Slow on a CPU, so they are still in flight when SIGTERM comes (timed on a fast 2-core VM): MEDIUM
# about 2.3 s, SLOW about 15 s (4 images, ~0.3 s a step). SLOW must outlast the 1 s sleep and the
# 1 s drain timeout by far: at 512², 25 steps, 1 image (today's MEDIUM) it finished inside the
# drain (a 200 where the cut's 503 was expected).
MEDIUM = {**SMALL, "image_size": {"width": 512, "height": 512}, "num_inference_steps": 25}
SLOW = {**SMALL, "image_size": {"width": 512, "height": 512}, "num_inference_steps": 50, "num_images": 4}


_started: list[LiveServer] = []


def serve(data_dir: Path, *args: str, **kwargs: Any) -> LiveServer:
    """``start_server`` with this file's arguments; the process is reaped after the test."""
    server = start_server(data_dir, *ARGS, *args, **kwargs)
    _started.append(server)
    return server


@pytest.fixture(autouse=True)
def _reap_servers() -> Iterator[None]:
    """Servers a failed test leaves behind are killed (by pid), not left to load the machine."""
    yield
    while _started:
        process = _started.pop().process
        if process.poll() is None:
            process.kill()
            process.wait()


def figure(name: str, **values: Any) -> None:
    print(f"FIGURE {name}: {json.dumps(values, sort_keys=True)}")


def port_of(server: LiveServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def db_rows(data_dir: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the server's database from outside, read-only (the server may be running or dead)."""
    conn = sqlite3.connect(f"file:{data_dir / 'livegen.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def integrity(data_dir: Path) -> str:
    return str(db_rows(data_dir, "PRAGMA integrity_check")[0][0])


def wait_completed(http: httpx.Client, ids: list[str], timeout: float) -> set[str]:
    """Poll until every request is COMPLETED; the ones that are not, at the deadline."""
    pending = set(ids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for rid in list(pending):
            if http.get(f"/queue/{APP}/requests/{rid}/status").json()["status"] == "COMPLETED":
                pending.discard(rid)
        time.sleep(0.2)
    return pending


def assert_storage_error(response: httpx.Response, what: str) -> dict[str, Any]:
    """A storage fault answers 507 (full) or 503 (unwritable) with fal's error body, never a bare 500."""
    assert response.status_code in (503, 507), f"{what}: {response.status_code} {response.text[:300]}"
    body: dict[str, Any] = response.json()
    assert body["error_type"] in ("storage_full", "storage_unavailable"), body
    assert response.headers["x-fal-error-type"] == body["error_type"]
    assert response.headers.get("x-fal-request-id")
    assert int(response.headers["retry-after"]) >= 1
    assert "nothing was stored" in body["detail"], body
    return body


# -- 1. SIGKILL at random points -------------------------------------------------------------


def _chaos_round(server: LiveServer, rng: random.Random, tag: str) -> tuple[dict[str, dict[str, Any]], float]:
    """Submit 6-10 small jobs with random parameters and SIGKILL the server at a random moment
    (during the submits or while jobs run). The submits that were answered 200, and the delay."""
    plans = []
    for i in range(rng.randint(6, 10)):
        side = rng.choice((64, 96, 128))
        body = {**SMALL, "prompt": f"{tag} job {i}", "seed": rng.randrange(2**31), "sync_mode": False}
        body.update(image_size={"width": side, "height": side}, num_inference_steps=rng.randint(1, 3))
        plans.append((body, rng.uniform(0.0, 0.2)))
    kill_after = rng.uniform(0.2, 3.0)
    accepted: dict[str, dict[str, Any]] = {}

    def submit_all() -> None:
        with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Key {server.key}"}, timeout=10) as h:
            for body, pause in plans:
                try:
                    response = h.post(f"/queue/{APP}", json=body)
                except httpx.HTTPError:
                    return  # the server died under this submit: not accepted
                if response.status_code == 200:
                    accepted[response.json()["request_id"]] = body
                time.sleep(pause)

    submitter = threading.Thread(target=submit_all)
    submitter.start()
    time.sleep(kill_after)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    submitter.join(30)
    return accepted, kill_after


def test_sigkill_at_random_points_loses_no_accepted_job(tmp_path: Path, shared_data_dir: Path) -> None:
    """Three seeded rounds on one data dir: submit, SIGKILL at a random point, restart (which
    itself gets killed by the next round while it re-runs the survivors). At the end every
    accepted job is COMPLETED with its own result, once."""
    env = {"LIVEGEN_MAX_RUNNING_JOBS": "2"}
    server = serve(tmp_path, env=env, synth_from=shared_data_dir)
    port = port_of(server)
    accepted: dict[str, dict[str, Any]] = {}
    for seed in (11, 23, 37):
        got, kill_after = _chaos_round(server, random.Random(seed), f"seed {seed}")
        ids = list(got)
        marks = ",".join("?" * len(ids))
        states = dict(
            db_rows(
                tmp_path, f"SELECT state, COUNT(*) FROM jobs WHERE request_id IN ({marks}) GROUP BY state", tuple(ids)
            )
        )
        figure("sigkill_round", seed=seed, kill_after_s=round(kill_after, 2), accepted=len(got), states_at_kill=states)
        accepted.update(got)
        server = serve(tmp_path, env=env, synth_from=shared_data_dir, port=port)
    try:
        with server.client() as http:
            pending = wait_completed(http, list(accepted), timeout=240)
            assert not pending, f"{len(pending)} of {len(accepted)} accepted jobs never completed"
            urls = []
            for rid, body in accepted.items():
                result = http.get(f"/queue/{APP}/requests/{rid}")
                assert result.status_code == 200, result.text[:300]
                out = result.json()
                assert (out["seed"], out["prompt"]) == (body["seed"], body["prompt"])  # its own result
                assert len(out["images"]) == 1
                assert (out["images"][0]["width"], out["images"][0]["height"]) == tuple(body["image_size"].values())
                image = httpx.get(out["images"][0]["url"])
                assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"
                urls.append(out["images"][0]["url"])
            assert len(set(urls)) == len(urls)  # no result shared or duplicated
        rows = db_rows(tmp_path, "SELECT request_id, state, attempts FROM jobs")
        unknown = [r for r in rows if r[0] not in accepted]  # committed, but the 200 never reached the client
        assert all(state == "succeeded" for _, state, _ in rows)
        assert integrity(tmp_path) == "ok"
        figure(
            "sigkill_total",
            accepted=len(accepted),
            completed=len(accepted) - len(pending),
            rerun_after_kill=sum(1 for r in rows if r[2] > 1),
            committed_but_unanswered=len(unknown),
        )
    finally:
        stop_server(server)


# -- 2. SIGTERM: drain, realtime close, drain timeout ------------------------------------------


def test_sigterm_drains_then_a_cut_request_gets_503(tmp_path: Path, shared_data_dir: Path) -> None:
    drain_s = 300.0
    env = {"LIVEGEN_MAX_RUNNING_JOBS": "1", "LIVEGEN_DRAIN_TIMEOUT_S": str(drain_s)}
    server = serve(tmp_path, env=env, synth_from=shared_data_dir)
    port = port_of(server)
    http = server.client()
    ws_url = f"{server.base_url.replace('http', 'ws', 1)}/{APP}/realtime"
    ws = connect(ws_url, additional_headers={"Authorization": f"Key {server.key}"}, max_size=None)
    ws.send(msgpack.packb({**SMALL, "sync_mode": True}))
    assert isinstance(ws.recv(timeout=60), bytes)  # the session is live

    outcome: dict[str, httpx.Response] = {}
    slow = threading.Thread(target=lambda: outcome.setdefault("sync", http.post(f"/{APP}", json=MEDIUM)))
    slow.start()
    time.sleep(0.2)  # in the engine first: realtime and sync work go ahead of queued jobs
    queued = [http.post(f"/queue/{APP}", json={**SMALL, "seed": i}).json()["request_id"] for i in range(4)]
    assert "sync" not in outcome, "the slow request finished before SIGTERM; make it slower"

    sent = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    ready_answers: list[tuple[float, int | str]] = []
    with httpx.Client(timeout=2) as probe:  # a fresh connection per probe, as a load balancer's
        while time.monotonic() - sent < 1.0:
            try:
                status: int | str = probe.get(server.base_url + "/readyz", headers={"Connection": "close"}).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            ready_answers.append((time.monotonic() - sent, status))
            if status != 503:
                break
    first_delay, first_status = ready_answers[0]
    assert 200 not in [s for _, s in ready_answers], ready_answers  # never "ready" again after SIGTERM
    # 503 "draining" until uvicorn closes the listening socket (~0.1 s later), then refused.
    assert first_status == 503 or isinstance(first_status, str), ready_answers

    try:
        while True:
            ws.recv(timeout=10)  # a result or timings still in flight
    except ConnectionClosed as closed:
        close_delay = time.monotonic() - sent
        assert closed.rcvd is not None
        close = (closed.rcvd.code, closed.rcvd.reason)
    assert close == (1012, "server shutting down; reconnect"), close

    slow.join(180)
    assert outcome["sync"].status_code == 200, outcome["sync"].text[:300]
    assert server.process.wait(drain_s) == 0
    exit_s = time.monotonic() - sent
    http.close()
    marks = ",".join("?" * len(queued))
    sql = f"SELECT state, COUNT(*) FROM jobs WHERE request_id IN ({marks}) GROUP BY state"
    jobs_at_exit = dict(db_rows(tmp_path, sql, tuple(queued)))
    assert sum(jobs_at_exit.values()) == len(queued) and "running" not in jobs_at_exit
    figure(
        "sigterm_drain",
        readyz_first=[round(first_delay * 1000, 1), first_status],
        readyz_503_answers=sum(1 for _, s in ready_answers if s == 503),
        readyz_last=[round(ready_answers[-1][0] * 1000, 1), ready_answers[-1][1]],
        ws_close=list(close),
        ws_close_ms=round(close_delay * 1000, 1),
        exit_code=0,
        exit_s=round(exit_s, 2),
        drain_timeout_s=drain_s,
        queue_jobs_at_exit=jobs_at_exit,
    )

    # Restart with a 1 s drain timeout: the queued jobs survived, and a request the timeout cuts
    # gets fal's 503 (not uvicorn's bare 500).
    env["LIVEGEN_DRAIN_TIMEOUT_S"] = "1"
    server = serve(tmp_path, env=env, synth_from=shared_data_dir, port=port)
    try:
        with server.client() as http:
            assert not wait_completed(http, queued, timeout=120)
            for rid in queued:
                assert http.get(f"/queue/{APP}/requests/{rid}").status_code == 200
            outcome.clear()
            slow = threading.Thread(target=lambda: outcome.setdefault("sync", http.post(f"/{APP}", json=SLOW)))
            slow.start()
            time.sleep(1.0)
            assert "sync" not in outcome
            sent = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            slow.join(60)
        cut = outcome["sync"]
        assert cut.status_code == 503, cut.text[:300]
        assert cut.json() == {
            "detail": "The server is shutting down; retry the request",
            "error_type": "shutting_down",
            "ingress": "nginx",
        }
        assert cut.headers["x-fal-error-type"] == "shutting_down" and cut.headers["retry-after"] == "5"
        # fal's ingress shape (no request id), so fal-client retries it as the JS client does
        assert "x-fal-request-id" not in cut.headers and fal_client_retries(cut)
        assert server.process.wait(30) == 0
        figure("drain_cut", status=cut.status_code, answer_s=round(time.monotonic() - sent, 2), drain_timeout_s=1)
        assert "Exception in ASGI application" not in server.log()
    finally:
        if server.process.poll() is None:
            stop_server(server)


# -- 3. A webhook receiver that is down for a while ---------------------------------------------


class Receiver:
    """A loopback webhook receiver: refuses connections until ``up()``, then answers 500 to the
    first ``fail`` posts and 200 after. Records every post it sees."""

    def __init__(self, fail: int) -> None:
        self.port = free_port()
        self.fail = fail
        self.posts: list[tuple[float, int, dict[str, str], bytes]] = []
        self._server: ThreadingHTTPServer | None = None

    def up(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                status = 500 if len(receiver.posts) < receiver.fail else 200
                receiver.posts.append((time.time(), status, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def test_webhooks_reach_a_receiver_that_was_down(tmp_path: Path, shared_data_dir: Path) -> None:
    env = {"LIVEGEN_WEBHOOK_BACKOFF_BASE_S": "0.25", "LIVEGEN_WEBHOOK_MAX_ATTEMPTS": "10"}
    server = serve(tmp_path, "--allow-private-urls", env=env, synth_from=shared_data_dir)
    receiver = Receiver(fail=2)
    try:
        with server.client() as http:
            hook = f"http://127.0.0.1:{receiver.port}/hook"
            submitted = time.time()
            ids = [
                http.post(f"/queue/{APP}", params={"fal_webhook": f"{hook}?n={i}"}, json={**SMALL, "seed": i}).json()[
                    "request_id"
                ]
                for i in range(3)
            ]
            assert not wait_completed(http, ids, timeout=120)
            time.sleep(2.0)  # a few attempts meet a closed port
            assert not receiver.posts
            receiver.up()
            came_up = time.time()
            deadline = time.monotonic() + 60
            while len([p for p in receiver.posts if p[1] == 200]) < len(ids) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # anything still to come (a duplicate) would come now
            jwks = httpx.get(server.base_url + "/rest/.well-known/jwks.json").json()["keys"]
            results = {rid: http.get(f"/queue/{APP}/requests/{rid}").json() for rid in ids}
        keys = [Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(k["x"] + "==")) for k in jwks]
        delivered: dict[str, int] = {}
        for _, status, headers, body in receiver.posts:
            rid = headers["x-fal-webhook-request-id"]
            message = "\n".join(
                [
                    rid,
                    headers["x-fal-webhook-user-id"],
                    headers["x-fal-webhook-timestamp"],
                    hashlib.sha256(body).hexdigest(),
                ]
            ).encode()
            signature = bytes.fromhex(headers["x-fal-webhook-signature"])
            assert any(_verifies(k, signature, message) for k in keys), "bad signature"
            assert abs(int(headers["x-fal-webhook-timestamp"]) - time.time()) < 300
            payload = json.loads(body)
            assert payload == {"request_id": rid, "gateway_request_id": rid, "status": "OK", "payload": results[rid]}
            if status == 200:
                delivered[rid] = delivered.get(rid, 0) + 1
        assert delivered == {rid: 1 for rid in ids}, delivered  # each exactly once after recovery
        attempts = db_rows(tmp_path, "SELECT request_id, attempts, delivered_at, last_error FROM webhook_deliveries")
        assert sorted(r[0] for r in attempts) == sorted(ids) and all(r[2] is not None for r in attempts)
        last_delivery = max(p[0] for p in receiver.posts if p[1] == 200)
        figure(
            "webhooks_down",
            jobs=len(ids),
            attempts_per_delivery=sorted(r[1] for r in attempts),
            receiver_posts=len(receiver.posts),
            answered_500=sum(1 for p in receiver.posts if p[1] == 500),
            delivered_200=sum(delivered.values()),
            duplicates=sum(delivered.values()) - len(ids),
            down_s=round(came_up - submitted, 1),
            all_delivered_s_after_up=round(last_delivery - came_up, 2),
        )
    finally:
        receiver.down()
        stop_server(server)


def _verifies(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except Exception:  # noqa: BLE001 - cryptography's InvalidSignature
        return False
    return True


# -- 4. A full disk, and a read-only data dir ----------------------------------------------------


def cdn_upload(http: httpx.Client, data: bytes) -> httpx.Response:
    token = http.post("/rest/storage/auth/token", params={"storage_type": "fal-cdn-v3"}, json={})
    assert token.status_code == 200, token.text
    headers = {
        "Authorization": f"Bearer {token.json()['token']}",
        "Content-Type": "image/png",
        "X-Fal-File-Name": "a.png",
    }
    return http.post("/cdn/files/upload", content=data, headers=headers)


def _result_files(http: httpx.Client, request_id: str) -> set[str]:
    """The stored file ids of a request's result, if it has one yet."""
    result = http.get(f"/queue/{APP}/requests/{request_id}")
    if result.status_code != 200:
        return set()
    return {image["url"].split("/cdn/files/")[1].split("/")[0] for image in result.json()["images"]}


def _storage_fault_scenario(
    server: LiveServer, break_storage: Callable[[], None], repair: Callable[[], None], name: str
) -> None:
    """Before, during and after a storage fault: clear errors, nothing half-stored, stored data
    still served, the server up, the database intact, and everything working once repaired."""
    data_dir = server.data_dir
    with server.client() as http:
        png = png_bytes(64, 64)
        before_upload = cdn_upload(http, png)
        assert before_upload.status_code == 200
        before_job = http.post(f"/queue/{APP}", json={**SMALL, "seed": 1, "sync_mode": False}).json()["request_id"]
        assert not wait_completed(http, [before_job], timeout=60)
        before_result = http.get(f"/queue/{APP}/requests/{before_job}").json()
        # A job running (or about to start) when the fault hits: its outcome cannot be stored.
        inflight_body = {**SMALL, "seed": 4, "sync_mode": False, "image_size": {"width": 128, "height": 128}}
        inflight = http.post(f"/queue/{APP}", json={**inflight_body, "num_inference_steps": 10}).json()["request_id"]
        jobs_before = db_rows(data_dir, "SELECT COUNT(*) FROM jobs")[0][0]
        files_before = sorted(os.listdir(data_dir / "files"))

        break_storage()
        try:
            outcomes: dict[str, Any] = {}
            outcomes["upload"] = assert_storage_error(cdn_upload(http, png), "upload")["error_type"]
            run = http.post(f"/{APP}", json={**SMALL, "sync_mode": False})  # the result must be written
            outcomes["run_stored"] = assert_storage_error(run, "sync run, stored result")["error_type"]
            submit = http.post(f"/queue/{APP}", json={**SMALL, "seed": 2})
            outcomes["submit"] = assert_storage_error(submit, "queue submit")["error_type"]
            inline = http.post(f"/{APP}", json={**SMALL, "sync_mode": True})  # nothing to store: still works
            outcomes["run_inline"] = inline.status_code
            assert inline.status_code == 200, inline.text[:300]
            assert http.get("/healthz").status_code == 200
            assert httpx.get(before_upload.json()["access_url"]).content == png
            assert http.get(f"/queue/{APP}/requests/{before_job}").json() == before_result
            assert httpx.get(before_result["images"][0]["url"]).status_code == 200
        finally:
            repair()
        assert db_rows(data_dir, "SELECT COUNT(*) FROM jobs")[0][0] == jobs_before  # no half-accepted job
        assert set(os.listdir(data_dir / "files")) <= set(files_before) | _result_files(
            http, inflight
        )  # no partial file
        assert integrity(data_dir) == "ok"
        assert not wait_completed(http, [inflight], timeout=120)  # neither lost nor stuck RUNNING
        inflight_result = http.get(f"/queue/{APP}/requests/{inflight}")
        assert inflight_result.status_code == 200, inflight_result.text[:300]
        assert httpx.get(inflight_result.json()["images"][0]["url"]).status_code == 200
        outcomes["inflight_attempts"] = db_rows(
            data_dir, "SELECT attempts FROM jobs WHERE request_id = ?", (inflight,)
        )[0][0]

        after_upload = cdn_upload(http, png)
        assert after_upload.status_code == 200, after_upload.text[:300]
        after_job = http.post(f"/queue/{APP}", json={**SMALL, "seed": 3}).json()["request_id"]
        assert not wait_completed(http, [after_job], timeout=60)  # the dispatcher survived the fault
        assert http.get(f"/queue/{APP}/requests/{after_job}").status_code == 200
        stored = http.post(f"/{APP}", json={**SMALL, "sync_mode": False})
        assert stored.status_code == 200 and httpx.get(stored.json()["images"][0]["url"]).status_code == 200
    port = port_of(server)
    stop_server(server)
    assert server.process.returncode == 0
    assert integrity(data_dir) == "ok"
    restarted = serve(data_dir, synth_from=None, port=port)
    try:
        with restarted.client() as http:
            assert http.get(f"/queue/{APP}/requests/{before_job}").json() == before_result
            assert httpx.get(before_upload.json()["access_url"]).content == png
            assert httpx.get(after_upload.json()["access_url"]).content == png
    finally:
        stop_server(restarted)
    assert integrity(data_dir) == "ok"
    assert "Traceback" not in server.log(), server.log()[-3000:]
    figure(name, outcomes=outcomes, integrity="ok", jobs=jobs_before)


@pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs Linux prlimit")
def test_full_disk_gives_clear_errors_and_corrupts_nothing(tmp_path: Path, shared_data_dir: Path) -> None:
    """The disk fills up: simulated without root by lowering the server's RLIMIT_FSIZE to 0 (every
    write to a file fails with EFBIG; Python ignores SIGXFSZ), then raising it again."""
    server = serve(tmp_path, synth_from=shared_data_dir)
    pid = server.process.pid
    original = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    _storage_fault_scenario(
        server,
        lambda: resource.prlimit(pid, resource.RLIMIT_FSIZE, (0, original[1])),
        lambda: resource.prlimit(pid, resource.RLIMIT_FSIZE, original),
        "disk_full",
    )


def test_storage_faults_in_process_read_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same guarantees below HTTP, for any user (root ignores chmod, so a read-only data dir
    is simulated here): SQLite made read-only (``query_only``) or full (``max_page_count``), and
    file writes failing with EROFS/ENOSPC, give StorageUnavailable/StorageFull, leave nothing
    behind, and everything works again afterwards."""
    from livegen.protocol.errors import StorageFull, StorageUnavailable
    from livegen.protocol.status import JobState
    from livegen.server.db import Database
    from livegen.server.jobs.store import Job, SqliteJobStore
    from livegen.server.storage import FileStore

    def job(rid: str) -> Job:
        return Job(rid, APP, APP, "k", {"prompt": "x"}, JobState.QUEUED, 0, time.time(), "http://x")

    with Database.open(tmp_path / "db.sqlite3") as db:
        store, files = SqliteJobStore(db), FileStore(db, tmp_path / "files")
        kept = files.put(b"kept", "text/plain", "kept.txt")
        store.insert(job("a"))
        conn = db._require()
        conn.execute("PRAGMA query_only = ON")
        with pytest.raises(StorageUnavailable) as raised:
            store.insert(job("b"))
        assert raised.value.http_status == 503 and "nothing was stored" in raised.value.wire_message
        with pytest.raises(StorageUnavailable):
            store.transition(store.get("a"), JobState.RUNNING, started_at=time.time())
        assert store.get("a").state is JobState.QUEUED  # rolled back, and the connection still usable
        with pytest.raises(StorageUnavailable):  # the file is written, its row is refused: no orphan
            files.put(b"new", "text/plain", "new.txt")
        conn.execute("PRAGMA query_only = OFF")

        real_write = Path.write_bytes

        def fail(errno_: int) -> Callable[..., int]:
            def write_bytes(self: Path, data: bytes) -> int:
                real_write(self, data[:1])  # partly written, then the fault
                raise OSError(errno_, os.strerror(errno_))

            return write_bytes

        monkeypatch.setattr(Path, "write_bytes", fail(errno.EROFS))
        with pytest.raises(StorageUnavailable) as unavailable:
            files.put(b"new", "text/plain", "new.txt")
        assert type(unavailable.value) is StorageUnavailable
        monkeypatch.setattr(Path, "write_bytes", fail(errno.ENOSPC))
        with pytest.raises(StorageFull) as full:
            files.put(b"new", "text/plain", "new.txt")
        assert full.value.http_status == 507 and full.value.error_type == "storage_full"
        monkeypatch.undo()
        assert sorted(os.listdir(tmp_path / "files")) == [kept.file_id]  # nothing partial kept

        # A real SQLITE_FULL: the database may not grow past its current pages.
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        big = Job("big", APP, APP, "k", {"prompt": "x" * 200_000}, JobState.QUEUED, 0, time.time(), "http://x")
        with pytest.raises(StorageFull) as sqlite_full:
            store.insert(big)
        assert sqlite_full.value.http_status == 507 and "disk is full" in sqlite_full.value.wire_message
        conn.execute("PRAGMA max_page_count = 1073741823")
        assert [r[0] for r in db.query("SELECT request_id FROM jobs")] == ["a"]  # nothing half-accepted

        store.insert(job("b"))
        assert store.transition(store.get("a"), JobState.RUNNING, started_at=time.time()).state is JobState.RUNNING
        assert files.put(b"new", "text/plain", "new.txt").path.read_bytes() == b"new"
        assert db.query("PRAGMA integrity_check") == [("ok",)]
