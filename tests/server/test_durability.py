"""Accepted queue jobs survive a crash: SIGKILL mid-queue, restart, every job completes."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx

from tests.conftest import start_server, stop_server

APP = "fal-ai/fast-turbo-diffusion"
ARGS = ("--weights", "tiny-random", "--device", "cpu", "--models", "stabilityai/sd-turbo")


def test_sigkill_mid_queue_loses_nothing(tmp_path: Path, shared_data_dir: Path) -> None:
    server = start_server(tmp_path, *ARGS, synth_from=shared_data_dir, env={"LIVEGEN_MAX_RUNNING_JOBS": "2"})
    headers = {"Authorization": f"Key {server.key}"}
    body = {"prompt": "durable", "model_name": "stabilityai/sd-turbo", "num_inference_steps": 2, "sync_mode": False}
    body["image_size"] = {"width": 256, "height": 256}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=30) as http:
        ids = [http.post(f"/queue/{APP}", json={**body, "seed": i}).json()["request_id"] for i in range(50)]
        assert len(set(ids)) == 50

        def completed() -> int:
            states = [http.get(f"/queue/{APP}/requests/{rid}/status").json()["status"] for rid in ids]
            return states.count("COMPLETED")

        deadline = time.monotonic() + 120
        while completed() < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()

    port = int(server.base_url.rsplit(":", 1)[1])  # the same address, as a restarted service has
    restarted = start_server(tmp_path, *ARGS, synth_from=shared_data_dir, port=port)
    try:
        with httpx.Client(base_url=restarted.base_url, headers=headers, timeout=30) as http:
            deadline = time.monotonic() + 300
            pending = set(ids)
            while pending and time.monotonic() < deadline:
                for rid in list(pending):
                    if http.get(f"/queue/{APP}/requests/{rid}/status").json()["status"] == "COMPLETED":
                        pending.discard(rid)
                time.sleep(0.2)
            assert not pending, f"{len(pending)} of 50 jobs never completed after the restart"
            for i, rid in enumerate(ids):
                result = http.get(f"/queue/{APP}/requests/{rid}")
                assert result.status_code == 200, result.text[:200]
                assert result.json()["seed"] == i
                image = httpx.get(result.json()["images"][0]["url"])
                assert image.status_code == 200 and image.content[:2] == b"\xff\xd8"
        assert "requeued" in restarted.log()  # jobs were running when the process died
    finally:
        stop_server(restarted)
