"""The queue over real HTTP against ``livegen serve --weights tiny-random``: where a refused
``fal_webhook`` is reported, and polls that never read a job's stored input."""

from __future__ import annotations

import sqlite3

import httpx
import pytest
from click.testing import CliRunner

from livegen.cli import main
from tests.conftest import LiveServer
from tests.reliability.test_faults import APP, SMALL, wait_completed


@pytest.fixture(scope="module")
def http(live_server: LiveServer) -> httpx.Client:
    return live_server.client()


@pytest.mark.parametrize(
    ("hook", "said"),
    [
        ("http://127.0.0.1:9/hook", "private or loopback"),
        ("ftp://example.com/hook", "only http(s)"),
        ("http:///hook", "without a host"),
    ],
)
def test_a_refused_fal_webhook_is_reported_in_the_query(http: httpx.Client, hook: str, said: str) -> None:
    r = http.post(f"/queue/{APP}", json=SMALL, params={"fal_webhook": hook})
    assert r.status_code == 422, r.text
    assert r.headers["x-fal-request-id"]
    [detail] = r.json()["detail"]
    assert detail["loc"] == ["query", "fal_webhook"], detail
    assert detail["type"] == "file_download_error" and said in detail["msg"], detail
    assert "request_id" not in r.text  # refused at submit: no job


def test_polls_never_read_the_stored_input(http: httpx.Client, live_server: LiveServer) -> None:
    """Status, status stream, result and cancel answer from everything but the job's input (up to
    ~20 MB): with the stored input made unreadable, they still answer as before."""
    submitted = http.post(f"/queue/{APP}", json=SMALL)
    assert submitted.status_code == 200, submitted.text
    rid = submitted.json()["request_id"]
    assert not wait_completed(http, [rid], timeout=120)
    before = http.get(f"/queue/{APP}/requests/{rid}")
    assert before.status_code == 200 and before.json()["images"], before.text[:300]

    conn = sqlite3.connect(live_server.data_dir / "livegen.sqlite3", timeout=10)
    try:
        with conn:
            changed = conn.execute("UPDATE jobs SET input_json = '{not json' WHERE request_id = ?", (rid,)).rowcount
        assert changed == 1
    finally:
        conn.close()

    root = f"/queue/{APP}/requests/{rid}"
    status = http.get(f"{root}/status", params={"logs": "1"})
    assert status.status_code == 200, status.text[:300]
    assert status.json()["status"] == "COMPLETED" and status.json()["logs"]
    stream = http.get(f"{root}/status/stream")
    assert stream.status_code == 200 and '"status": "COMPLETED"' in stream.text, stream.text[:300]
    result = http.get(root)
    assert result.status_code == 200 and result.json() == before.json()
    cancel = http.put(f"{root}/cancel")
    assert cancel.status_code == 400 and cancel.json() == {"status": "ALREADY_COMPLETED"}


def test_a_job_is_seen_and_cancelled_only_with_the_key_that_submitted_it(
    http: httpx.Client, live_server: LiveServer
) -> None:
    """Request ids are private to their API key, as on fal: another key gets 404 for status,
    status stream, result and cancel, and its cancel changes nothing."""
    created = CliRunner().invoke(main, ["keys", "create", "--name", "other", "--data-dir", str(live_server.data_dir)])
    assert created.exit_code == 0, created.output
    other = httpx.Client(
        base_url=live_server.base_url, headers={"Authorization": f"Key {created.stdout.split()[0]}"}, timeout=60
    )
    with other:
        mine = http.post(f"/queue/{APP}", json=SMALL).json()["request_id"]
        theirs = other.post(f"/queue/{APP}", json=SMALL).json()["request_id"]
        for client, rid in ((other, mine), (http, theirs)):
            root = f"/queue/{APP}/requests/{rid}"
            for method, path in (("GET", "/status"), ("GET", "/status/stream"), ("GET", ""), ("PUT", "/cancel")):
                r = client.request(method, root + path)
                assert r.status_code == 404, (method, path, r.status_code, r.text[:200])
        assert not wait_completed(http, [mine], timeout=120)
        assert not wait_completed(other, [theirs], timeout=120)
        for client, rid in ((http, mine), (other, theirs)):
            done = client.get(f"/queue/{APP}/requests/{rid}")
            assert done.status_code == 200 and done.json()["images"], done.text[:300]  # not cancelled by the other
