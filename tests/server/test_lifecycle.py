"""Rate limits over HTTP, and a graceful stop: SIGTERM lets in-flight work finish."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

from fal_client.client import _should_retry_response as fal_client_retries

from tests.conftest import start_server, stop_server

APP = "/fal-ai/fast-turbo-diffusion"
SMALL = {"prompt": "x", "model_name": "stabilityai/sd-turbo", "image_size": {"width": 64, "height": 64}}
ARGS = ("--weights", "tiny-random", "--device", "cpu", "--models", "stabilityai/sd-turbo")


def test_rate_limit_per_key_and_sigterm_drain(tmp_path: Path, shared_data_dir: Path) -> None:
    # One token per 5 s, two in the bucket. The two submits take both at once (a queue submit
    # answers before generating); a sync run first would let a slow machine refill one meanwhile.
    env = {"LIVEGEN_RATE_LIMIT_PER_KEY": "0.2", "LIVEGEN_RATE_LIMIT_BURST": "2", "LIVEGEN_DRAIN_TIMEOUT_S": "300"}
    server = start_server(tmp_path, *ARGS, env=env, synth_from=shared_data_dir)
    try:
        http = server.client()
        for _ in range(2):
            assert http.post(f"/queue{APP}", json=SMALL).status_code == 200
        limited = http.post(APP, json=SMALL)
        assert limited.status_code == 429
        retry_after = int(limited.headers["retry-after"])
        assert 1 <= retry_after <= 5
        assert limited.json()["error_type"] == "queue_full" and "rate limit" in limited.json()["detail"]
        for _ in range(5):  # status polls are not limited
            assert http.get("/readyz").status_code == 200
        time.sleep(retry_after + 0.2)  # as the 429 said: a token is back, the run below is admitted

        # A slow request in flight when SIGTERM arrives still gets its answer, then exit 0.
        outcome: dict[str, int] = {}
        slow = {**SMALL, "image_size": "square", "num_inference_steps": 50}

        def slow_request() -> None:
            outcome["status"] = http.post(APP, json=slow).status_code

        worker = threading.Thread(target=slow_request)
        worker.start()
        time.sleep(1.0)  # the request is in the engine (50 steps at 512x512: ~4 s on a fast 2-core VM)
        assert "status" not in outcome
        server.process.send_signal(signal.SIGTERM)
        worker.join(180)
        assert outcome.get("status") == 200
        assert server.process.wait(60) == 0
        assert "Waiting for application shutdown" in server.log()
    finally:
        if server.process.poll() is None:
            stop_server(server)


def test_sigterm_with_a_drain_grace_refuses_new_work_while_still_listening(
    tmp_path: Path, shared_data_dir: Path
) -> None:
    """With LIVEGEN_DRAIN_GRACE_S the socket stays open after SIGTERM: /readyz answers 503
    ``draining`` (what a load balancer probes), new work gets fal's 503 ``shutting_down`` with
    Retry-After, reads still work; then the server drains and exits 0."""
    env = {"LIVEGEN_DRAIN_GRACE_S": "4"}
    server = start_server(tmp_path, *ARGS, env=env, synth_from=shared_data_dir)
    try:
        http = server.client()
        submitted = http.post(f"/queue{APP}", json=SMALL).json()
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        for path in (APP, f"/queue{APP}"):
            refused = http.post(path, json=SMALL)
            assert refused.status_code == 503, refused.text[:200]
            assert refused.json()["error_type"] == "shutting_down"
            assert int(refused.headers["retry-after"]) >= 1
            # fal's ingress shape, so both official clients retry it (middleware.py)
            assert "x-fal-request-id" not in refused.headers and refused.json()["ingress"] == "nginx"
            assert fal_client_retries(refused)
        assert http.get("/healthz").status_code == 200
        # reads still work: 202 while the job runs, 200 once it is done (both are answers, not 503)
        assert http.get(submitted["status_url"].removeprefix(server.base_url)).status_code in (200, 202)
        assert server.process.wait(60) == 0
        assert "refusing new work for 4.0 s" in server.log()
    finally:
        if server.process.poll() is None:
            stop_server(server)
