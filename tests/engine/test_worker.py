"""The worker's scheduling, with a fake adapter standing in for diffusers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from livegen.engine import GenerationRequest, GenerationResult, Priority, Task
from livegen.engine.fastpath import Deferred, FastStats
from livegen.engine.pipelines.common import check_common
from livegen.engine.worker import STAGES, Worker
from livegen.protocol.errors import InvalidInput, ModelUnavailable
from livegen.settings import Settings
from tests.conftest import wait_for


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


def test_a_waiter_cancelled_during_the_load_leaves_startup_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's start-up watcher awaits ``startup`` through ``asyncio.wrap_future``, and is
    cancelled when the server stops during the load: that must not cancel the future the engine
    thread will set (it died there with InvalidStateError), and the engine still comes up."""
    died: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args.exc_value))
    loading = threading.Event()

    class SlowWorker(FakeWorker):
        def _load(self, model_id: str) -> FakeAdapter:  # type: ignore[override]
            loading.wait(10)
            return super()._load(model_id)

    w = SlowWorker(Settings(data_dir=tmp_path, models=["stabilityai/sd-turbo"], device="cpu"))
    w.open()
    try:

        async def watch_then_stop() -> None:
            watcher = asyncio.ensure_future(asyncio.wrap_future(w.startup))
            await asyncio.sleep(0.05)
            watcher.cancel()
            with pytest.raises(asyncio.CancelledError):
                await watcher

        asyncio.run(watch_then_stop())
        assert not w.startup.cancelled()
        loading.set()
        assert w.startup.result(10) is None and w.ready
        w.gate.set()
        assert w.submit(req("after")).result(10).images
    finally:
        loading.set()
        w.gate.set()
        w.close()
    assert died == []


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


def test_requests_submitted_together_are_one_batch(worker: FakeWorker) -> None:
    worker.gate.set()
    futures = worker.submit_all([req(f"p{i}") for i in range(4)])
    assert {f.result(10).batch_size for f in futures} == {4}
    assert worker.adapter.batches == [["p0", "p1", "p2", "p3"]]


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


# -- batches on the device: slots, buckets, gathering ---------------------------------------------


class FakeFast:
    """What the worker asks of a fast path: its buckets, and at warm-up its compile mode and counts."""

    def __init__(self) -> None:
        self.options = SimpleNamespace(buckets=(1, 2, 4, 8), compile="off")
        self.stats = FastStats()
        self.tiny_vae = None

    def bucket(self, rows: int) -> int:
        return next((b for b in self.options.buckets if b >= rows), rows)


class FakeFastAdapter(FakeAdapter):
    """Returns each batch as a ``Deferred`` whose device work ends when the test says so."""

    def __init__(self, model_id: str, gate: threading.Event, expected_ms: float | None) -> None:
        super().__init__(model_id, gate)
        self.fast = FakeFast()
        self.expected_ms = expected_ms
        self.done: list[threading.Event] = []
        self.held = False  # the worker's warm-up batches end at once and are not recorded

    def __call__(self, batch: Sequence[GenerationRequest]) -> Deferred[list[list[Image.Image]]]:  # type: ignore[override]
        done = threading.Event()
        if self.held:
            self.batches.append([r.prompt for r in batch])
            self.done.append(done)
        else:
            done.set()

        def finish() -> list[list[Image.Image]]:
            done.wait(10)
            return [[Image.new("RGB", (r.width, r.height))] * r.num_images for r in batch]

        return Deferred(finish, self.expected_ms)


class FastWorker(FakeWorker):
    adapter: FakeFastAdapter

    def __init__(self, settings: Settings, expected_ms: float | None = None) -> None:
        super().__init__(settings)
        self.adapter = FakeFastAdapter("stabilityai/sd-turbo", self.gate, expected_ms)


@contextmanager
def fast_worker(tmp_path: Path, expected_ms: float | None = None, **kw: object) -> Iterator[FastWorker]:
    s = Settings(data_dir=tmp_path, models=["stabilityai/sd-turbo"], device="cpu", **kw)  # type: ignore[arg-type]
    w = FastWorker(s, expected_ms)
    w.open()
    w.startup.result(10)
    w.adapter.held = True
    try:
        yield w
    finally:
        for done in w.adapter.done:
            done.set()
        w.close()


def test_a_batch_is_formed_when_a_slot_frees_not_before(tmp_path: Path) -> None:
    """Two batches may be on the device. What arrives while both are there waits for a slot and
    then goes as one batch; it is not taken, one request at a time, the moment it arrives."""
    with fast_worker(tmp_path, max_batch_size=8, batch_gather=False) as w:
        first = w.submit(req("a"))
        wait_for(lambda: len(w.adapter.batches) == 1)
        second = w.submit(req("b"))
        wait_for(lambda: len(w.adapter.batches) == 2)
        later = [w.submit(req(p)) for p in ("c", "d", "e", "f")]
        time.sleep(0.1)
        assert len(w.adapter.batches) == 2 and not any(f.running() for f in later)
        w.adapter.done[0].set()
        first.result(10)
        wait_for(lambda: len(w.adapter.batches) == 3)
        for done in w.adapter.done:
            done.set()
        for f in (second, *later):
            f.result(10)
        assert w.adapter.batches == [["a"], ["b"], ["c", "d", "e", "f"]]


@pytest.mark.parametrize(
    ("fill", "waiting", "batches"),
    [
        (0.75, 5, [["p0", "p1", "p2", "p3"], ["p4"]]),  # 5 of 8: cut to 4, the fifth goes next
        (0.75, 6, [["p0", "p1", "p2", "p3", "p4", "p5"]]),  # 6 of 8 fills 0.75 of it: padded
        (0.75, 3, [["p0", "p1", "p2"]]),  # 3 of 4: padded
        # the default (1): every batch is a whole bucket, the rest goes next
        (None, 6, [["p0", "p1", "p2", "p3"], ["p4", "p5"]]),
        (None, 7, [["p0", "p1", "p2", "p3"], ["p4", "p5"], ["p6"]]),
        (None, 8, [["p0", "p1", "p2", "p3", "p4", "p5", "p6", "p7"]]),
        (0.5, 5, [["p0", "p1", "p2", "p3", "p4"]]),  # 0.5 or less: always padded
    ],
)
def test_a_batch_filling_little_of_its_bucket_is_cut_to_a_full_one(
    tmp_path: Path, fill: float | None, waiting: int, batches: list[list[str]]
) -> None:
    options = {} if fill is None else {"batch_fill": fill}
    with fast_worker(tmp_path, max_batch_size=8, batch_gather=False, **options) as w:
        blockers = []
        for n, prompt in enumerate(("x", "y"), 1):  # both batch slots taken
            blockers.append(w.submit(req(prompt)))
            wait_for(lambda n=n: len(w.adapter.batches) == n)  # type: ignore[misc]
        futures = [w.submit(req(f"p{i}")) for i in range(waiting)]
        for done in w.adapter.done[:2]:
            done.set()
        for f in blockers:
            f.result(10)

        def all_taken() -> bool:  # each batch ends once formed, so a third can take a slot
            for done in list(w.adapter.done):
                done.set()
            return sum(map(len, w.adapter.batches[2:])) == waiting

        wait_for(all_taken)
        for f in futures:
            f.result(10)
        assert w.adapter.batches[2:] == batches
        assert w.stats.cut_batches == len(batches) - 1


@pytest.mark.parametrize(("high", "low"), [(Priority.REALTIME, Priority.SYNC), (Priority.SYNC, Priority.QUEUED)])
def test_work_waiting_behind_higher_priority_work_goes_after_priority_wait_s(
    tmp_path: Path, high: Priority, low: Priority
) -> None:
    """Realtime frames go first, but a sync request that has waited ``priority_wait_s`` behind
    them takes the next batch. Then none goes ahead until ``priority_wait_s`` after that batch is
    done, however long it took: sessions that keep the device busy do not hold other requests
    back for as long as they run, nor lose the device to them. The same for a queued job behind
    a stream of sync requests."""
    with fast_worker(tmp_path, max_batch_size=8, batch_gather=False, priority_wait_s=1.0) as w:
        for n, prompt in enumerate(("x", "y"), 1):  # both batch slots taken
            w.submit(req(prompt, priority=high))
            wait_for(lambda n=n: len(w.adapter.batches) == n)  # type: ignore[misc]
        futures = [
            w.submit(req("s1", priority=low, width=80)),
            w.submit(req("s2", priority=low, width=96)),
            w.submit(req("r1", priority=high)),
        ]

        def next_batch(done: int, then: str | None = None, wait: float = 0.0) -> None:
            """Submit ``then`` (high), sleep ``wait``, end batch ``done``: a slot frees, a batch forms."""
            if then is not None:
                futures.append(w.submit(req(then, priority=high)))
            time.sleep(wait)
            batches = len(w.adapter.batches)
            w.adapter.done[done].set()
            wait_for(lambda: len(w.adapter.batches) == batches + 1)

        next_batch(0)  # s1 has waited less than 1 s: r1 goes first
        next_batch(1, "r2", 1.0)  # now s1 has waited: it goes ahead of r2
        next_batch(2)  # r2: s2 has waited too, but s1's batch is still running
        next_batch(3, "r3", 1.0)  # s1's batch ends now, 2 s after it went: r3 goes, s2 waits 1 s more
        next_batch(4, "r4", 1.0)  # a second after s1's batch ended: s2 goes ahead of r4

        def all_done() -> bool:  # each batch ends once formed
            for done in list(w.adapter.done):
                done.set()
            return all(f.done() for f in futures)

        wait_for(all_done)
        assert w.adapter.batches[2:] == [["r1"], ["s1"], ["r2"], ["r3"], ["s2"], ["r4"]]
        assert w.stats.priority_yields == 2 and w.status()["priority_yields"] == 2


def test_a_batch_that_goes_ahead_of_realtime_frames_takes_its_kind_first(tmp_path: Path) -> None:
    """The batch that goes ahead of realtime frames fills with the other work that waits, and
    realtime frames of the same shape take the room left."""
    with fast_worker(tmp_path, max_batch_size=4, batch_gather=False, priority_wait_s=0.2) as w:
        for n, prompt in enumerate(("x", "y"), 1):
            w.submit(req(prompt, priority=Priority.REALTIME))
            wait_for(lambda n=n: len(w.adapter.batches) == n)  # type: ignore[misc]
        futures = [w.submit(req(p, priority=Priority.REALTIME)) for p in ("r1", "r2", "r3")]
        futures += [w.submit(req(p, priority=Priority.SYNC)) for p in ("s1", "s2", "s3")]
        time.sleep(0.3)
        w.adapter.done[0].set()
        wait_for(lambda: len(w.adapter.batches) == 3)

        def all_done() -> bool:  # each batch ends once formed
            for done in list(w.adapter.done):
                done.set()
            return all(f.done() for f in futures)

        wait_for(all_done)
        assert w.adapter.batches[2] == ["s1", "s2", "s3", "r1"]
        assert sorted(sum(w.adapter.batches[3:], [])) == ["r2", "r3"]


def test_the_next_batch_gathers_while_the_device_is_busy(tmp_path: Path) -> None:
    """With a measured device time, the next batch is formed just before the device runs out of
    work, or when a full batch is waiting: a request that arrives while a batch runs is not sent
    alone the moment it arrives."""
    with fast_worker(tmp_path, expected_ms=3000.0, max_batch_size=4) as w:
        first = w.submit(req("a"))
        wait_for(lambda: len(w.adapter.batches) == 1)
        second = w.submit(req("b"))
        time.sleep(0.2)
        assert not second.running() and len(w.adapter.batches) == 1  # held back: the device is busy
        rest = [w.submit(req(p)) for p in ("c", "d", "e")]  # now a full batch waits: it goes
        wait_for(lambda: len(w.adapter.batches) == 2)
        for done in w.adapter.done:
            done.set()
        for f in (first, second, *rest):
            f.result(10)
        assert w.adapter.batches == [["a"], ["b", "c", "d", "e"]]
        assert w.stats.gather_s >= 0.2


def test_a_full_batch_of_realtime_frames_waits_until_the_device_is_nearly_free(tmp_path: Path) -> None:
    """Realtime frames can still be replaced by newer ones until they are in a batch, so a full
    batch of them is not formed the moment it waits (as other work is, above): it is formed just
    before the device runs out of work, with whatever frames are newest by then."""
    with fast_worker(tmp_path, expected_ms=240.0, max_batch_size=2) as w:
        first = w.submit(req("a", priority=Priority.REALTIME))
        wait_for(lambda: len(w.adapter.batches) == 1)
        started = time.perf_counter()
        waiting = [w.submit(req(p, priority=Priority.REALTIME)) for p in ("b", "c")]  # a full batch
        time.sleep(0.1)
        assert len(w.adapter.batches) == 1  # held back although full
        newer = w.replace(waiting[1], req("c2", priority=Priority.REALTIME))
        assert newer is not None and waiting[1].cancelled()
        wait_for(lambda: len(w.adapter.batches) == 2)
        assert time.perf_counter() - started >= 0.15  # formed near the end of the 240 ms batch
        for done in w.adapter.done:
            done.set()
        for f in (first, waiting[0], newer):
            f.result(10)
        assert w.adapter.batches == [["a"], ["b", "c2"]]


def test_replace_keeps_the_place_in_line_until_the_work_is_in_a_batch(worker: FakeWorker) -> None:
    """A request replaced while it waits takes over its place (ahead of what came after it), and
    the old future is cancelled; once in a batch, or for a future the worker does not hold,
    replace changes nothing."""
    blocker = _block(worker)
    old = worker.submit(req("old", priority=Priority.REALTIME))
    after = worker.submit(req("after", priority=Priority.REALTIME))
    new = worker.replace(old, req("new", priority=Priority.REALTIME))
    assert new is not None and old.cancelled() and not after.cancelled()
    assert worker.replace(old, req("again")) is None  # the old future is gone from the line
    assert worker.replace(Future(), req("stranger")) is None
    worker.gate.set()
    for f in (blocker, new, after):
        f.result(10)
    assert [b for b in worker.adapter.batches[1:]] == [["new", "after"]]
    assert worker.replace(new, req("late")) is None  # done: nothing to replace


def test_nothing_gathers_when_the_device_time_is_unknown(tmp_path: Path) -> None:
    with fast_worker(tmp_path, expected_ms=None, max_batch_size=4) as w:
        w.submit(req("a"))
        wait_for(lambda: len(w.adapter.batches) == 1)
        w.submit(req("b"))
        wait_for(lambda: len(w.adapter.batches) == 2)  # the second slot: taken at once
        assert w.adapter.batches == [["a"], ["b"]]


# -- where a batch's time goes -----------------------------------------------------------------


def test_a_batch_records_its_stages_once_all_its_requests_are_resolved(worker: FakeWorker) -> None:
    worker.gate.set()
    worker.stages.clear()
    futures = worker.submit_all([req("a"), req("b", num_images=2)])
    for f in futures:
        f.result(10)
    wait_for(lambda: len(worker.stages) == 1)
    time.sleep(0.05)
    assert len(worker.stages) == 1  # one record per batch, not per request
    st = worker.stages[0]
    assert st.images == 3
    assert all(getattr(st, name) >= 0 for name in STAGES)
    assert st.until_done == st.encode == 0  # the plain path renders inside the adapter's call
    assert st.device is None
    summary = worker.status()["stages"]
    assert summary["batches"] == 1 and summary["enqueue_ms"] == round(st.enqueue * 1e3, 3)


def test_a_fast_batch_records_the_wait_for_its_device_work(tmp_path: Path) -> None:
    with fast_worker(tmp_path, expected_ms=5.0) as w:
        w.stages.clear()
        future = w.submit(req("a"))
        wait_for(lambda: len(w.adapter.done) == 1)
        time.sleep(0.1)  # the device works
        w.adapter.done[0].set()
        future.result(10)
        wait_for(lambda: len(w.stages) == 1)
        st = w.stages[0]
        assert st.until_done >= 0.09  # enqueued -> the encode pool saw the device done
        assert st.enqueue < 0.09 and st.wait < 0.09
        total = sum(getattr(st, name) for name in STAGES)
        assert total >= st.until_done and st.resolved_at > 0


def test_the_bench_pipelined_timing_runs_batches_of_exactly_its_size(tmp_path: Path) -> None:
    """``livegen bench``'s two-in-flight timing: two waiting batches of 1 are not merged into a
    batch of 2, though the worker's limit would allow it (the bench's worker takes its largest
    batch as the limit)."""
    from livegen.bench.engine import _pipelined

    with fast_worker(tmp_path, expected_ms=1.0, max_batch_size=4) as w:
        w.adapter.held = False  # the device work ends at once
        before = dict(w.stats.batch_sizes)
        seconds = _pipelined(w, [req("a")], iters=6)
        assert seconds > 0
        wait_for(lambda: sum(w.stats.batch_sizes.values()) - sum(before.values()) == 7)
        assert {k: v - before.get(k, 0) for k, v in w.stats.batch_sizes.items()} == {1: 7}
        assert w.settings.max_batch_size == 4  # put back
