"""The worker: the single owner of the device.

One thread takes work items off a priority queue (realtime, then sync, then queued; FIFO
within a priority; work that has waited ``priority_wait_s`` behind higher-priority work goes
ahead of it, one batch at a time, ``_head``), gathers the compatible ones behind the head
(same model, task, size, steps, guidance and strength) into one batch of at most
``max_batch_size`` images, and runs it through the model's pipeline adapter. Encoding the
results to JPEG/PNG happens on a small thread pool so the device thread can start the next
batch. The event loop never runs torch: it awaits the ``Future`` that ``submit`` returns.

Fast-path batches (CUDA) are enqueued on the device and finished on that pool; at most two
are on the device at once, one running and one queued. The device thread takes a slot before
it forms a batch, and while the device is busy it forms the batch just before the device
needs it (``_gather``, from the fast path's measured device times), so that requests arriving
meanwhile join it rather than each going alone the moment it arrives. A batch that fills less
than ``batch_fill`` of the bucket it would be padded to is cut to the largest bucket it fills
(``_cut_to_bucket``). ``benchmarks/batching_model.py`` models what these choices do.

    with Worker.start(settings) as engine:
        result = engine.submit(request).result()
"""

from __future__ import annotations

import enum
import itertools
import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from livegen.engine import EncodedImage, GenerationRequest, GenerationResult, Priority, fastpath, freeze_heap
from livegen.engine.device_decode import JpegDecoder
from livegen.engine.fastpath import Deferred, FastOptions, FastPath
from livegen.engine.imaging import content_type_for, encode_image
from livegen.engine.pipelines import common, lcm
from livegen.engine.pipelines.common import Adapter
from livegen.engine.pipelines.sd_turbo import SdAdapter
from livegen.engine.pipelines.sdxl_turbo import SdxlAdapter
from livegen.engine.registry import MODELS, ModelSpec, alternatives_hint, resolve_source, spec_for
from livegen.engine.warmup import warmup_batches
from livegen.protocol.errors import GpuOutOfMemory, LivegenError, ModelUnavailable, RequestCancelled
from livegen.settings import Settings

logger = logging.getLogger(__name__)


# Forming the next batch while the device is busy (``_gather``): stop waiting this long before
# the device is expected to run out of work, on top of the measured time to enqueue a batch;
# and never hold a batch back longer than MAX_GATHER_S, whatever the estimate says.
GATHER_MARGIN_S = 0.001
MAX_GATHER_S = 0.25
ENQUEUE_SMOOTHING = 0.2  # weight of the newest batch in the enqueue-time average


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    CLOSED = "closed"


@dataclass(order=True)
class _Pending:
    sort_key: tuple[int, int]
    request: GenerationRequest = field(compare=False)
    future: Future[GenerationResult] = field(compare=False)
    submitted: float = field(compare=False, default_factory=time.perf_counter)


# Where a batch's wall time goes, stage by stage (``BatchStages``), in the order they happen.
STAGES = ("wait", "enqueue", "until_done", "encode", "finish")
STAGES_KEPT = 1024  # the most recent batches whose stages the worker keeps


@dataclass
class BatchStages:
    """Where one batch's wall time went, in seconds, from ``perf_counter`` stamps on the worker's
    threads (a few per batch). Their sum is the time from the batch's newest request being
    submitted to the last of its futures resolved."""

    images: int
    wait: float  # newest request submitted -> the device thread starts the batch (slot, gathering, wake-up)
    enqueue: float  # the adapter's call: embeddings, inputs, launching the device work (on a CPU: all of it)
    until_done: float  # enqueued -> the encode pool sees the device done (device time left, wake-ups)
    encode: float  # device done -> the batch's images ready (GPU JPEG and copies to the host)
    finish: float  # -> every future resolved (PIL encodes, results)
    device: float | None = None  # the device's own time for the batch (CUDA events), when measured
    inputs: float | None = None  # fast path, within enqueue: building the batch's tensors
    launch: float | None = None  # fast path, within enqueue: launching its device work (graph replay)
    resolved_at: float = 0.0


def stage_summary(records: Sequence[BatchStages]) -> dict[str, Any]:
    """Medians, in ms per batch, of each stage over ``records`` (and of the device time, where
    measured), with the batch count."""
    if not records:
        return {"batches": 0}
    out: dict[str, Any] = {"batches": len(records)}
    for name in STAGES:
        out[f"{name}_ms"] = round(statistics.median(getattr(r, name) for r in records) * 1e3, 3)
    for name in ("device", "inputs", "launch"):
        values = [v for r in records if (v := getattr(r, name)) is not None]
        out[f"{name}_ms"] = round(statistics.median(values) * 1e3, 3) if values else None
    return out


@dataclass
class Stats:
    batches: int = 0
    images: int = 0
    multi_request_batches: int = 0
    busy_s: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    gather_s: float = 0.0  # time the device thread held back a batch while the device was busy
    cut_batches: int = 0  # batches cut to a bucket they fill (the rest left for the next one)
    priority_yields: int = 0  # batches that went ahead of waiting higher-priority work (_head)


class _Trace:
    """A batch's stamps on its way through the worker (``BatchStages`` once its last future is
    resolved: several encode threads may finish its requests)."""

    def __init__(self, runnable: list[_Pending], started: float) -> None:
        self.images = sum(p.request.num_images for p in runnable)
        self.submitted = max(p.submitted for p in runnable)
        self.started = started
        self.enqueued = time.perf_counter()
        self.done = self.ready = self.enqueued  # device work seen done; outputs ready (a fast batch moves them)
        self.marks: dict[str, float] = {}  # the fast path's (Deferred.marks)
        self._left = len(runnable)
        self._lock = threading.Lock()

    @property
    def elapsed(self) -> float:
        """The batch's time in the engine: the adapter's call until its outputs are ready."""
        return self.ready - self.started

    def resolved(self) -> BatchStages | None:
        """One more of the batch's futures is resolved: the stages, when it was the last."""
        with self._lock:
            self._left -= 1
            if self._left:
                return None
        now = time.perf_counter()
        return BatchStages(
            images=self.images,
            wait=self.started - self.submitted,
            enqueue=self.enqueued - self.started,
            until_done=self.done - self.enqueued,
            encode=self.ready - self.done,
            finish=now - self.ready,
            device=self.marks.get("device_s"),
            inputs=self.marks.get("inputs_s"),
            launch=self.marks.get("launch_s"),
            resolved_at=now,
        )


def _quiet_progress_bars() -> None:
    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return {"auto": torch.float16, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(choice, torch.float32)


def fast_path_enabled(choice: str, device: torch.device) -> bool:
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def input_decoder(settings: Settings, device: torch.device, fast: bool) -> JpegDecoder | None:
    """nvjpeg for input JPEGs when asked for (``gpu_jpeg_decode``), the fast path runs on CUDA
    and torchvision imports; else None, and the server decodes with Pillow."""
    if not (settings.gpu_jpeg_decode and fast and device.type == "cuda"):
        return None
    decoder = JpegDecoder.nvjpeg(device)
    if decoder is None:
        logger.info("torchvision is not importable: input JPEGs are decoded by Pillow on the CPU")
    return decoder


def use_compile_cache(path: Path) -> None:
    """Keep inductor's compiled code (FX graphs, kernels, autotuning) under ``path``, so a restart
    reuses it: compiling costs ~100 s per shape on an H100. Inductor reads its cache location
    from ``TORCHINDUCTOR_CACHE_DIR`` each time it needs it, but importing torch's compile stack
    already writes its default (``/tmp/torchinductor_<user>``) there, so a plain ``setdefault``
    never took (the cache went to /tmp, which a reboot or a new container empties). A location
    the user set themselves is kept."""
    import torch._inductor.config as inductor_config

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(_inductor_default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    inductor_config.fx_graph_cache = True


def _inductor_default_cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    except ImportError:  # older torch: the same rule, written out
        import getpass
        import tempfile

        return os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    return default_cache_dir()


def _vram() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


class Worker:
    """The engine implementation (see ``livegen.engine.Engine``)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.fast = fast_path_enabled(settings.fast_path, self.device)
        self.input_decoder = input_decoder(settings, self.device, self.fast)
        self.stats = Stats()
        self.timings: dict[str, float] = {}  # load_s, warmup_s, time_to_ready_s
        self.stages: deque[BatchStages] = deque(maxlen=STAGES_KEPT)  # the latest batches' stages
        self._vram: dict[str, int] = {}  # bytes allocated on the device by each model's load
        # At most two batches on the device at a time: one running, one queued behind it. A
        # slot is taken before a batch is formed, so requests arriving while both are busy
        # join the next batch instead of each becoming a batch of one.
        self._inflight = threading.Semaphore(2)
        # The fast path's batches on the device (under _cond), and when the last of them should
        # be done (perf_counter seconds; None: not known, a shape without a measured time).
        self._on_device = 0
        self._device_free_at: float | None = None
        self._yielded_at = -float("inf")  # when the last batch that went ahead was done (_head)
        self._enqueue_s = 0.0  # the device thread's time to enqueue a fast batch (moving average)
        # Done when the configured models are loaded and warmed up (or failed to). Running from the
        # start, so that a waiter cannot cancel it: the server's start-up watcher is cancelled when
        # the server stops during a load (a port already in use, Ctrl-C during a warm-up), and
        # ``asyncio.wrap_future`` passes that on to the future it wraps.
        self.startup: Future[None] = Future()
        self.startup.set_running_or_notify_cancel()
        self._state = State.NEW
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._seq = itertools.count()
        self._adapters: dict[str, Adapter] = {}
        self._model_state: dict[str, str] = {m: "not loaded" for m in MODELS}
        self._thread = threading.Thread(target=self._main, name="livegen-engine", daemon=True)
        self._post = ThreadPoolExecutor(max_workers=2, thread_name_prefix="livegen-encode")

    @classmethod
    @contextmanager
    def start(cls, settings: Settings) -> Iterator[Worker]:
        worker = cls(settings)
        worker.open()
        try:
            yield worker
        finally:
            worker.close()

    def open(self) -> None:
        if self._state is not State.NEW:
            raise RuntimeError(f"worker is {self._state.value}; open it once")
        _quiet_progress_bars()
        for model_id in self.settings.models:
            spec_for(model_id)  # unknown names fail here, before any thread starts
        self._state = State.RUNNING
        self._thread.start()

    def close(self) -> None:
        if self._state is State.CLOSED:
            return
        with self._cond:
            self._state = State.CLOSED
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for p in pending:
            if p.future.set_running_or_notify_cancel():  # not when its caller cancelled it already
                p.future.set_exception(ModelUnavailable("the server is shutting down"))
        if self._thread.is_alive():
            self._thread.join(timeout=60)
        self._post.shutdown(wait=True)

    @property
    def ready(self) -> bool:
        return self.startup.done() and self.startup.exception() is None

    # -- the Engine protocol ------------------------------------------------------------------

    def check(self, request: GenerationRequest) -> None:
        spec_for(request.model_id)
        adapter = self._adapters.get(request.model_id)
        if adapter is None and not self.settings.load_on_demand and request.model_id not in self.settings.models:
            raise ModelUnavailable(
                f"Model {request.model_id} is not loaded on this server; start it with "
                f"--models including {request.model_id} (or enable loading on demand)"
            )
        if adapter is not None:
            adapter.check_inputs(request)
        else:
            common.check_common(request)

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[GenerationRequest]) -> list[Future[GenerationResult]]:
        """Submit several requests at once: the device thread sees all of them or none, so
        compatible ones go in one batch (``livegen bench`` times batches of an exact size)."""
        futures: list[Future[GenerationResult]] = []
        with self._cond:
            if self._state is not State.RUNNING:
                raise ModelUnavailable("the engine is not running")
            for request in requests:
                future: Future[GenerationResult] = Future()
                self._pending.append(_Pending((int(request.priority), next(self._seq)), request, future))
                futures.append(future)
            self._cond.notify()
        return futures

    def replace(self, future: Future[GenerationResult], request: GenerationRequest) -> Future[GenerationResult] | None:
        """Put ``request`` in the place of the work whose future is ``future``, if that work is
        still waiting for a batch: it keeps its place in line, and ``future`` is cancelled (a
        realtime session's newer frame superseding its frame that waits). Returns the new work's
        future, or None when the old work is in a batch already, done or unknown (``future`` is
        then untouched)."""
        with self._cond:
            for p in self._pending:
                if p.future is future:
                    break
            else:
                return None
            if not future.cancel():
                return None
            p.request, p.future, p.submitted = request, Future(), time.perf_counter()
            self._cond.notify()
            return p.future

    def run_here(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Render ``requests`` as one batch on the calling thread, past the queue, and wait for
        the results: the same code as the device thread runs. For ``livegen bench --profile``
        (torch's profiler records CPU ops only on its own thread); submit nothing meanwhile."""
        batch = [_Pending((int(r.priority), next(self._seq)), r, Future()) for r in requests]
        for p in batch:
            p.future.set_running_or_notify_cancel()
        self._inflight.acquire()
        if not self._run_batch(batch):
            self._inflight.release()
        return [p.future.result() for p in batch]

    def status(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights": self.settings.weights,
            "models": dict(self._model_state),
            "safety_checker": "not loaded: has_nsfw_concepts is always false",
            "queued": len(self._pending),
            "batches": self.stats.batches,
            "images": self.stats.images,
            "multi_request_batches": self.stats.multi_request_batches,
            "busy_s": round(self.stats.busy_s, 3),
            "batch_sizes": dict(self.stats.batch_sizes),
            "gather_s": round(self.stats.gather_s, 3),
            "cut_batches": self.stats.cut_batches,
            "priority_yields": self.stats.priority_yields,
            "stages": stage_summary(list(self.stages)),
            "fast_path": {m: dict(vars(f.stats)) for m, a in self._adapters.items() if (f := _fast_of(a)) is not None},
            "input_decode": self.input_decoder.status() if self.input_decoder is not None else {"decoder": "pillow"},
            "timings": dict(self.timings),
            **self._memory(),
        }

    def _memory(self) -> dict[str, Any]:
        if self.device.type != "cuda":
            return {}
        return {
            "vram_bytes_by_model": dict(self._vram),
            "vram_allocated_bytes": torch.cuda.memory_allocated(),
            "vram_peak_bytes": torch.cuda.max_memory_allocated(),
        }

    # -- the device thread --------------------------------------------------------------------

    def _main(self) -> None:
        started = time.perf_counter()
        try:
            for model_id in self.settings.models:
                self._adapter(model_id)
            self.timings["load_s"] = time.perf_counter() - started
            self._warm_up()
            if self.settings.gc_freeze:
                freeze_heap("start-up")
        except BaseException as exc:  # noqa: BLE001 - reported through the startup future
            self.startup.set_exception(exc)
            return
        self.timings["time_to_ready_s"] = time.perf_counter() - started
        logger.info(
            "engine ready in %.1f s (load %.1f s, warm-up %.1f s)",
            self.timings["time_to_ready_s"],
            self.timings["load_s"],
            self.timings.get("warmup_s", 0.0),
        )
        self.startup.set_result(None)
        while True:
            with self._cond:
                while not self._pending and self._state is State.RUNNING:
                    self._cond.wait()
                if self._state is not State.RUNNING:
                    return
            self._inflight.acquire()  # a slot first: meanwhile, more requests can join this batch
            batch: list[_Pending] = []
            with self._cond:
                if self._state is State.RUNNING and self._pending:
                    self._gather()
                if self._state is State.RUNNING and self._pending:  # close() may have come meanwhile
                    batch = self._take_batch()
            if not (batch and self._run_batch(batch)):
                self._inflight.release()

    def _warm_up(self) -> None:
        """Fast path only: render the configured shapes once (captures graphs, picks kernels)."""
        started = time.perf_counter()
        for model_id in self.settings.models:
            adapter = self._adapters[model_id]
            if (fast := _fast_of(adapter)) is None:
                continue
            batches = warmup_batches(spec_for(model_id), self.settings)
            if not batches:  # no warm-up sizes or buckets configured
                continue
            if fast.options.compile != "off":  # minutes of silence otherwise, on a first start
                logger.info(
                    "warm-up of %s: %d shapes, compiled by torch.compile (%s). A first start compiles "
                    "each, about a minute per shape on a GPU; later starts read inductor's cache (%s)",
                    model_id,
                    len(batches),
                    fast.options.compile,
                    os.environ.get("TORCHINDUCTOR_CACHE_DIR", "its default location"),
                )
            model_started, graphs, compiled = time.perf_counter(), fast.stats.graphs, fast.stats.compiled_shapes
            for batch in batches:
                out = adapter(batch)
                if isinstance(out, Deferred):
                    out.result()
            logger.info(
                "warm-up of %s: %d shapes in %.1f s (CUDA graphs captured: %d, shapes compiled: %d)",
                model_id,
                len(batches),
                time.perf_counter() - model_started,
                fast.stats.graphs - graphs,
                fast.stats.compiled_shapes - compiled,
            )
        for adapter in self._adapters.values():
            if (fast := _fast_of(adapter)) is not None:
                fast.compile_new_shapes = self.settings.compile_on_demand  # the warm-up shapes are compiled
        if self.input_decoder is not None:
            self.input_decoder.warm_up()
        if self.fast:
            self.timings["warmup_s"] = time.perf_counter() - started

    def _gather(self) -> None:
        """With ``_cond`` held: while the device is busy, wait to form the next batch until just
        before the device runs out of work (the measured device time of what is on it, less the
        time to enqueue a batch), or until a full batch of work that cannot change is waiting.
        What arrives meanwhile joins the batch. Realtime frames can change until they are in a
        batch (a session's newer frame takes its waiting frame's place, ``replace``), so a full
        batch of them waits too: it then goes with the newest frames. Nothing waits when the
        device is idle or its work's duration is not known."""
        if not self.settings.batch_gather:
            return
        started = time.perf_counter()
        limit = started + MAX_GATHER_S
        while self._state is State.RUNNING and self._pending and self._on_device:
            free_at = self._device_free_at
            if free_at is None:
                break
            now = time.perf_counter()
            wait = min(free_at - self._enqueue_s - GATHER_MARGIN_S, limit) - now
            head = self._head()
            if wait <= 0 or (
                self._images_like(head) >= self.settings.max_batch_size
                and head.request.priority is not Priority.REALTIME
            ):
                break
            self._cond.wait(wait)
        self.stats.gather_s += time.perf_counter() - started

    def _head(self) -> _Pending:
        """The work the next batch is formed around: the first in line (realtime frames, then
        sync requests, then queued jobs; oldest first), except that work which has waited
        ``priority_wait_s`` behind work of a higher priority goes ahead of it: one batch, then
        none until ``priority_wait_s`` after that batch is done. Realtime sessions (or a stream
        of sync requests) that keep the device busy would otherwise hold everything below them
        back for as long as they run."""
        self._pending.sort()
        head = self._pending[0]
        now, wait = time.perf_counter(), self.settings.priority_wait_s
        if now - self._yielded_at < wait:
            return head
        rank = head.request.priority
        overdue = (p for p in self._pending if p.request.priority > rank and now - p.submitted >= wait)
        return next(overdue, head)

    def _yield_done(self, _: Future[GenerationResult]) -> None:
        self._yielded_at = time.perf_counter()  # whichever thread resolved it; one float store

    def _images_like(self, head: _Pending) -> int:
        key = head.request.batch_key()
        return sum(p.request.num_images for p in self._pending if p.request.batch_key() == key)

    def _take_batch(self) -> list[_Pending]:
        head = self._head()
        line = self._pending  # in order: _head sorted it
        if head is not line[0]:  # ahead of higher-priority work
            # None other until this one is done, then priority_wait_s later: however long a batch
            # that goes ahead takes, the work it went ahead of gets the device for that long.
            self._yielded_at = float("inf")
            head.future.add_done_callback(self._yield_done)
            self.stats.priority_yields += 1
            # its own kind (and lower) fills this batch first; higher-priority work, the room left
            rank = head.request.priority
            line = sorted(line, key=lambda p: p.request.priority < rank)
        key = head.request.batch_key()
        chosen, images = [head], head.request.num_images
        for p in line:
            if (
                p is head
                or p.request.batch_key() != key
                or images + p.request.num_images > self.settings.max_batch_size
            ):
                continue
            chosen.append(p)
            images += p.request.num_images
        chosen = self._cut_to_bucket(chosen)
        taken = set(map(id, chosen))
        self._pending = [p for p in self._pending if id(p) not in taken]
        return [p for p in chosen if p.future.set_running_or_notify_cancel()]

    def _cut_to_bucket(self, chosen: list[_Pending]) -> list[_Pending]:
        """A fast-path batch that fills less than ``batch_fill`` of the bucket it would be padded
        to is cut to the largest bucket it fills (requests whole, in order; the head always):
        the rest is the next batch, instead of padding rows computed for nothing."""
        adapter = self._adapters.get(chosen[0].request.model_id)
        fast = _fast_of(adapter) if adapter is not None else None
        if fast is None or not common.fast_eligible(fast, [p.request for p in chosen]):
            return chosen
        images = sum(p.request.num_images for p in chosen)
        bucket = fast.bucket(images)
        if images >= bucket or images >= self.settings.batch_fill * bucket:
            return chosen
        fits = max((b for b in fast.options.buckets if b <= images), default=images)
        kept: list[_Pending] = []
        total = 0
        for p in chosen:
            if kept and total + p.request.num_images > fits:
                break
            kept.append(p)
            total += p.request.num_images
        if len(kept) < len(chosen):
            self.stats.cut_batches += 1
        return kept

    def _run_batch(self, batch: list[_Pending]) -> bool:
        """Run ``batch`` with a batch slot held. True when the slot went with a fast-path batch
        still on the device (``_complete`` gives it back); False: the caller gives it back."""
        model_id = batch[0].request.model_id
        try:
            adapter = self._adapter(model_id)
        except LivegenError as exc:
            for p in batch:
                p.future.set_exception(exc)
            return False
        runnable = []
        for p in batch:
            if p.request.cancel is not None and p.request.cancel.is_set():
                p.future.set_exception(RequestCancelled())
                continue
            try:
                adapter.check_inputs(p.request)
                runnable.append(p)
            except LivegenError as exc:
                p.future.set_exception(exc)
        if not runnable:
            return False
        requests = [p.request for p in runnable]
        started = time.perf_counter()
        try:
            outputs = adapter(requests)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            logger.warning("out of device memory on a batch of %d images", common.total_images(requests))
            self._fail(runnable, GpuOutOfMemory(str(exc)))
            return False
        except LivegenError as exc:
            self._fail(runnable, exc)
            return False
        except Exception as exc:
            logger.exception("batch failed model=%s", model_id)
            self._fail(runnable, LivegenError(f"generation failed: {type(exc).__name__}"))
            return False
        trace = _Trace(runnable, started)
        if isinstance(outputs, Deferred):
            self._enqueued(outputs, trace.enqueued - started)
            self._post.submit(self._complete, runnable, outputs, trace)
            return True
        self._count(requests, trace.elapsed)
        for p, images in zip(runnable, outputs, strict=True):
            self._post.submit(self._finish, p, images, len(requests), trace)
        return False

    def _enqueued(self, outputs: Deferred[Any], enqueue_s: float) -> None:
        """A fast-path batch is on the device: when will the device be done with all it has?"""
        with self._cond:
            now = time.perf_counter()
            expected = outputs.expected_ms
            if expected is not None:  # a shape run before: not a first run (graph capture, compile)
                self._enqueue_s += ENQUEUE_SMOOTHING * (enqueue_s - self._enqueue_s)
            if self._on_device == 0:
                self._device_free_at = now
            if self._device_free_at is not None and expected is not None:
                self._device_free_at = max(now, self._device_free_at) + expected / 1e3
            else:
                self._device_free_at = None  # unknown until the device is idle again
            self._on_device += 1

    def _left_device(self) -> None:
        with self._cond:
            self._on_device -= 1  # at 0, _gather stops waiting and _enqueued starts afresh
            self._cond.notify_all()

    def _complete(self, runnable: list[_Pending], deferred: Deferred[list[list[Any]]], trace: _Trace) -> None:
        """On the encode pool: wait for a fast-path batch's device work, then finish each request."""
        requests = [p.request for p in runnable]
        try:
            outputs = deferred.result()
            trace.ready = time.perf_counter()
            trace.done = deferred.marks.get("device_done", trace.ready)
            trace.marks = deferred.marks
        except torch.cuda.OutOfMemoryError as exc:
            self._fail(runnable, GpuOutOfMemory(str(exc)))
            return
        except Exception as exc:
            logger.exception("batch failed model=%s", requests[0].model_id)
            self._fail(runnable, LivegenError(f"generation failed: {type(exc).__name__}"))
            return
        finally:
            self._left_device()
            self._inflight.release()
        self._count(requests, trace.elapsed)
        for p, images in zip(runnable, outputs, strict=True):
            self._finish(p, images, len(requests), trace)

    @staticmethod
    def _fail(batch: list[_Pending], exc: LivegenError) -> None:
        for p in batch:
            p.future.set_exception(exc)

    def _count(self, requests: list[GenerationRequest], elapsed: float) -> None:
        n = common.total_images(requests)
        self.stats.batches += 1
        self.stats.images += n
        self.stats.busy_s += elapsed
        self.stats.batch_sizes[n] = self.stats.batch_sizes.get(n, 0) + 1
        if len(requests) > 1:
            self.stats.multi_request_batches += 1
        logger.debug(
            "batch model=%s requests=%d images=%d ms=%.1f",
            requests[0].model_id,
            len(requests),
            n,
            elapsed * 1e3,
        )

    def _finish(self, pending: _Pending, images: list[Any], batch_size: int, trace: _Trace) -> None:
        try:
            self._resolve(pending, images, trace.elapsed, batch_size)
        finally:
            if (stages := trace.resolved()) is not None:
                self.stages.append(stages)

    def _resolve(self, pending: _Pending, images: list[Any], elapsed: float, batch_size: int) -> None:
        request = pending.request
        if request.cancel is not None and request.cancel.is_set():
            pending.future.set_exception(RequestCancelled())
            return
        try:
            encoded = [
                im
                if isinstance(im, EncodedImage)  # the fast path encoded it on the GPU
                else EncodedImage(
                    data=encode_image(im, request.output_format, quality=self.settings.jpeg_quality),
                    width=im.width,
                    height=im.height,
                    content_type=content_type_for(request.output_format),
                )
                for im in images
            ]
        except Exception as exc:
            logger.exception("encoding failed")
            pending.future.set_exception(LivegenError(f"encoding failed: {type(exc).__name__}"))
            return
        pending.future.set_result(
            GenerationResult(
                images=encoded,
                seed=request.seed,
                has_nsfw_concepts=[False] * len(encoded),
                timings={"inference": elapsed},
                batch_size=batch_size,
            )
        )

    def _adapter(self, model_id: str) -> Adapter:
        adapter = self._adapters.get(model_id)
        if adapter is not None:
            return adapter
        if not self.settings.load_on_demand and model_id not in self.settings.models:
            raise ModelUnavailable(f"Model {model_id} is not loaded on this server")
        self._model_state[model_id] = "loading"
        started = time.perf_counter()
        before = _vram()
        try:
            adapter = self._load(model_id)
        except LivegenError as exc:
            self._model_state[model_id] = f"failed: {exc.message}"
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:400]
            self._model_state[model_id] = f"failed: {reason}"
            raise ModelUnavailable(
                f"Could not load {model_id} with --weights {self.settings.weights}: {reason}. "
                f"{alternatives_hint(model_id)}"
            ) from exc
        self._adapters[model_id] = adapter
        self._model_state[model_id] = "loaded"
        self._vram[model_id] = _vram() - before
        logger.info(
            "loaded %s on %s in %.1f s (%s, %.2f GiB on the device)",
            model_id,
            self.device,
            time.perf_counter() - started,
            "fast path" if _fast_of(adapter) is not None else "plain diffusers",
            self._vram[model_id] / 2**30,
        )
        if self.settings.gc_freeze and self.startup.done():  # a load on first use, while serving
            freeze_heap(f"loading {model_id}")
        return adapter

    def _load(self, model_id: str) -> Adapter:
        spec = spec_for(model_id)
        source = resolve_source(spec.base_repo, self.settings)
        # The plain pipelines decode with whatever VAE they hold; the fast path keeps the full VAE
        # in the pipeline and the tiny one beside it, so a request can pick either.
        plain_tiny = bool(self.settings.tiny_vae) and not self.fast
        tiny_vae = resolve_source(spec.tiny_vae_repo, self.settings) if plain_tiny or self.fast else None
        options: dict[str, Any] = {
            "device": self.device,
            "dtype": self.dtype,
            "tiny_vae_source": tiny_vae if plain_tiny else None,
            "prompt_cache_size": self.settings.prompt_cache_size,
        }
        adapter: SdAdapter | SdxlAdapter
        if spec.lora_repo is not None:
            lora = resolve_source(spec.lora_repo, self.settings)
            adapter = lcm.load(model_id, source, lora, sdxl=spec.sdxl, **options)  # type: ignore[assignment]
        elif spec.sdxl:
            adapter = SdxlAdapter.load(model_id, source, **options)
        else:
            adapter = SdAdapter.load(model_id, source, **options)
        if self.fast and tiny_vae is not None:
            self._enable_fast(adapter, spec, tiny_vae)
        return adapter

    def _enable_fast(self, adapter: SdAdapter | SdxlAdapter, spec: ModelSpec, tiny_vae_source: str) -> None:
        from diffusers import AutoencoderTiny

        reason = FastPath.unsupported_reason(adapter.t2i)
        if reason is not None:
            logger.warning("%s stays on the plain diffusers path: %s", spec.model_id, reason)
            return
        settings = self.settings
        if settings.torch_compile != "off":
            use_compile_cache(settings.compile_cache_dir / "inductor")
        if self.device.type == "cuda":
            fastpath.enable_gpu_jpeg(self.device)
        try:
            tiny = AutoencoderTiny.from_pretrained(tiny_vae_source, dtype=self.dtype).to(self.device)
        except Exception as exc:
            if settings.tiny_vae:  # asked for explicitly: a load failure is the model's failure
                raise
            logger.warning("%s: no tiny VAE (%s); the fast path decodes with the full VAE", spec.model_id, exc)
            tiny = None
        options = FastOptions(
            cuda_graphs=settings.cuda_graphs,
            channels_last=settings.channels_last,
            nhwc_group_norm=settings.nhwc_group_norm,
            keep_channels_last=settings.keep_channels_last,
            split_geglu=settings.split_geglu,
            fp8_linear=settings.fp8_linear,
            fp8_geglu_kernel=settings.fp8_geglu_kernel,
            tiny_vae_conv_relu=settings.tiny_vae_conv_relu,
            tiny_vae_fold_upsample=settings.tiny_vae_fold_upsample,
            compile=settings.torch_compile,
            compile_tuning=settings.compile_tuning,
            compile_dynamic_batch=settings.compile_dynamic_batch,
            inductor_options=tuple(sorted(settings.inductor_options.items())),
            fuse_qkv=settings.fuse_qkv,
            cudnn_benchmark=settings.cudnn_benchmark,
            sdpa_cudnn=settings.sdpa_cudnn,
            buckets=tuple(sorted(settings.batch_buckets)),
            jpeg_quality=settings.jpeg_quality,
            text_encoder_graph=settings.text_encoder_graph,
        )
        fast = FastPath(
            adapter.t2i, sdxl=spec.sdxl, tiny_vae=tiny, device=self.device, dtype=self.dtype, options=options
        )
        if self.startup.done():  # loaded on demand after start: no warm-up of its own
            fast.compile_new_shapes = settings.compile_on_demand
        adapter.enable_fast(fast, "full" if settings.tiny_vae is False or tiny is None else "tiny")


def _fast_of(adapter: Adapter) -> FastPath | None:
    return getattr(adapter, "fast", None)
