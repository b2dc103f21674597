"""The worker's scheduling, with a fake adapter standing in for diffusers."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import pytest
from PIL import Image

from livegen.engine import GenerationRequest, GenerationResult, Priority, Task
from livegen.engine.pipelines.common import check_common
from livegen.engine.worker import Worker
from livegen.protocol.errors import InvalidInput, ModelUnavailable
from livegen.settings import Settings


class FakeAdapter:
    def __init__(self, model_id: str, gate: threading.Event) -> None:
        self.model_id = model_id
        self.gate = gate
        self.batches: list[list[str]] = []

    def check_inputs(self, request: GenerationRequest) -> None:
        check_common(request)
        if request.prompt == "bad":
            raise InvalidInput("bad prompt", loc=("body", "prompt"))

    def __call__(self, batch: Sequence[GenerationRequest]) -> list[list[Image.Image]]:
        self.gate.wait(10)
        self.batches.append([r.prompt for r in batch])
        return [[Image.new("RGB", (r.width, r.height))] * r.num_images for r in batch]


class FakeWorker(Worker):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.gate = threading.Event()
        self.adapter = FakeAdapter("stabilityai/sd-turbo", self.gate)

    def _load(self, model_id: str) -> FakeAdapter:  # type: ignore[override]
        if model_id != "stabilityai/sd-turbo":
            raise ModelUnavailable(f"no fake for {model_id}")
        return self.adapter


def req(prompt: str, **kw: object) -> GenerationRequest:
    base: dict[str, object] = dict(
        model_id="stabilityai/sd-turbo",
        task=Task.TEXT_TO_IMAGE,
        prompt=prompt,
        width=64,
        height=64,
        num_inference_steps=1,
        guidance_scale=0.0,
        seed=1,
    )
    base.update(kw)
    return GenerationRequest(**base)  # type: ignore[arg-type]


@pytest.fixture
def worker(tmp_path: Path) -> FakeWorker:
    w = FakeWorker(Settings(data_dir=tmp_path, models=["stabilityai/sd-turbo"], max_batch_size=4, device="cpu"))
    w.open()
    w.startup.result(10)
    yield w  # type: ignore[misc]
    w.gate.set()
    w.close()


def _block(worker: FakeWorker) -> Future[GenerationResult]:
    """Occupy the device thread so the next submissions pile up."""
    blocker = worker.submit(req("blocker"))
    while not blocker.running():
        threading.Event().wait(0.01)
    return blocker


def test_compatible_requests_share_a_batch_up_to_the_limit(worker: FakeWorker) -> None:
    _block(worker)
    futures = [worker.submit(req(f"p{i}")) for i in range(6)]
    worker.gate.set()
    results = [f.result(10) for f in futures]
    assert worker.adapter.batches[1:] == [["p0", "p1", "p2", "p3"], ["p4", "p5"]]
    assert results[0].batch_size == 4 and results[5].batch_size == 2
    assert worker.stats.multi_request_batches == 2


def test_incompatible_requests_do_not_mix(worker: FakeWorker) -> None:
    _block(worker)
    a = worker.submit(req("a"))
    b = worker.submit(req("b", width=128))
    c = worker.submit(req("c", num_inference_steps=2))
    d = worker.submit(req("d"))
    worker.gate.set()
    for f in (a, b, c, d):
        f.result(10)
    assert worker.adapter.batches[1:] == [["a", "d"], ["b"], ["c"]]


def test_priority_realtime_before_sync_before_queued(worker: FakeWorker) -> None:
    _block(worker)
    q = worker.submit(req("queued", priority=Priority.QUEUED, width=72))
    s = worker.submit(req("sync", priority=Priority.SYNC, width=80))
    r = worker.submit(req("realtime", priority=Priority.REALTIME, width=88))
    worker.gate.set()
    for f in (q, s, r):
        f.result(10)
    assert worker.adapter.batches[1:] == [["realtime"], ["sync"], ["queued"]]


def test_num_images_counts_against_the_batch_limit(worker: FakeWorker) -> None:
    _block(worker)
    a = worker.submit(req("a", num_images=3))
    b = worker.submit(req("b", num_images=2))
    worker.gate.set()
    assert len(a.result(10).images) == 3 and len(b.result(10).images) == 2
    assert worker.adapter.batches[1:] == [["a"], ["b"]]


def test_a_bad_request_fails_alone(worker: FakeWorker) -> None:
    _block(worker)
    good, bad = worker.submit(req("good")), worker.submit(req("bad"))
    worker.gate.set()
    assert good.result(10).images
    with pytest.raises(InvalidInput):
        bad.result(10)


def test_cancelled_before_start_never_runs(worker: FakeWorker) -> None:
    _block(worker)
    gone = worker.submit(req("gone"))
    assert gone.cancel()
    kept = worker.submit(req("kept"))
    worker.gate.set()
    kept.result(10)
    assert ["gone"] not in worker.adapter.batches and all("gone" not in b for b in worker.adapter.batches)


def test_unloadable_model_fails_its_requests(worker: FakeWorker) -> None:
    worker.gate.set()
    with pytest.raises(ModelUnavailable, match="sdxl-turbo"):
        worker.submit(req("x", model_id="stabilityai/sdxl-turbo")).result(10)


def test_close_fails_pending_work_and_refuses_more(tmp_path: Path) -> None:
    w = FakeWorker(Settings(data_dir=tmp_path, models=["stabilityai/sd-turbo"], device="cpu"))
    w.open()
    w.startup.result(10)
    _block(w)
    pending = w.submit(req("pending"))
    w.gate.set()
    w.close()
    assert pending.done()
    with pytest.raises(ModelUnavailable):
        w.submit(req("late"))
    with pytest.raises(RuntimeError):
        w.open()
