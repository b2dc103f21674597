"""``livegen bench realtime --simulated-device NAME``: the real server and the real engine's
scheduling over a device that only takes time.

Everything but the device is livegen's own: the WebSocket sessions (inbox, superseding, order),
the worker's batch slots, gathering, cutting to buckets and priorities, the encode pool. Each batch
"runs" on one simulated device, one after another, for the time a real card took for a batch of
its bucket (the device times below, from ``BENCHMARKS.md``), then returns a ready-made JPEG per
image. Those times are for SD-Turbo text-to-image at 512², 1 step. Other work is a model, not a
measurement: a batch of another size takes them scaled by its pixel count (so that a 1024² job
costs about what it would beside 512² frames); other step counts, classifier-free guidance and
image-to-image scale the UNet's share of them and add the encoder's (``work_factor``); SDXL-Turbo
takes the ratio the same card measured against SD-Turbo (``model_factor``).
So a change to how frames become batches can be measured end to end on any machine, and compared
with what the card did; it says nothing about the card's own speed.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from livegen.bench.null_engine import flat_jpeg, serve_in_thread
from livegen.engine import EncodedImage, GenerationRequest, Task, unet_steps
from livegen.engine.fastpath import Deferred
from livegen.engine.pipelines import common
from livegen.engine.registry import spec_for
from livegen.engine.worker import Worker
from livegen.settings import Settings

# Device milliseconds per batch by bucket: SD-Turbo text-to-image 512², 1 step, on the H200 of
# session 8 (BENCHMARKS.md; CUDA events around each batch). The compiled rows at buckets 2-8 are
# interpolated per image between the measured 1 and 16, as in benchmarks/batching_model.py.
DEVICE_MS: dict[str, dict[int, float]] = {
    "h200-graph": {1: 8.30, 2: 11.8, 4: 18.98, 8: 33.92, 16: 63.55},
    "h200-compile": {1: 5.27, 2: 7.6, 4: 12.4, 8: 22.2, 16: 41.9},
}
MEASURED_PIXELS = 512 * 512
# The tiny VAE decoder's share of a 1-step text-to-image batch: 141.4 of its 945.7 GFLOP per image
# (session 9's count over the real architectures); the rest is the UNet's one step.
DECODE_SHARE = 0.15
# Image-to-image at one UNet step over text-to-image: the tiny VAE's encoder and the input's upload
# and conversion. The H200's CUDA-graph rows of session 2 (SD-Turbo 512², 2 steps x 0.5 against 1
# step): 1.32, 1.28, 1.32 and 1.30 times at batch 1, 4, 8 and 16.
I2I_EXTRA = 0.30
# SDXL-Turbo's per-image time over SD-Turbo's, the H200's CUDA-graph rows of session 2 (512², 1 step):
# 14.89 against 9.10 ms at batch 1, 6.18 against 4.59 ms at batch 8. SD 1.5 (LCM) counts as SD-Turbo:
# its UNet is the same size (860M against 865M parameters) and was not measured beside it.
SDXL_FACTOR = {1: 14.89 / 9.10, 8: 6.18 / 4.59}


def work_factor(request: GenerationRequest) -> float:
    """A batch of ``request``'s kind in units of the measured 1-step text-to-image batch: the decoder
    once, the UNet once per step it runs (twice as many rows with classifier-free guidance), plus
    the encoder for image-to-image. A model: against session 2's H200 rows it gives LCM's 4 steps at
    batch 1 3.55 times the 1-step time, measured 3.47 (31.57 against 9.10 ms)."""
    steps = unet_steps(request.task, request.num_inference_steps, request.strength)
    cfg = 2 if request.guidance_scale > 1.0 else 1
    extra = I2I_EXTRA if request.task is not Task.TEXT_TO_IMAGE else 0.0
    return DECODE_SHARE + (1 - DECODE_SHARE) * max(steps, 1) * cfg + extra


def model_factor(model_id: str, bucket: int) -> float:
    """A batch of ``model_id`` in units of SD-Turbo's at the same bucket: 1, or for SDXL-Turbo the
    measured ratio at batch 1 and 8, between them by the bucket's log2, above 8 as at 8 (a model)."""
    if not spec_for(model_id).sdxl:
        return 1.0
    at_1, at_8 = SDXL_FACTOR[1], SDXL_FACTOR[8]
    return at_1 + (at_8 - at_1) * min(math.log2(bucket), 3.0) / 3.0


class SimulatedDevice:
    """One device: batches run one after another, each for its bucket's time."""

    def __init__(self, device_ms: dict[int, float]) -> None:
        self.device_ms = device_ms
        self.options = SimpleNamespace(buckets=tuple(sorted(device_ms)), compile="off")
        self.tiny_vae = None
        # the worker's warm-up reads graphs and compiled_shapes (none here), /readyz all of them
        self.stats = SimpleNamespace(batches=0, images=0, busy_s=0.0, graphs=0, compiled_shapes=0)
        self._free_at = 0.0
        self._lock = threading.Lock()

    def bucket(self, rows: int) -> int:
        return next((b for b in self.options.buckets if b >= rows), max(self.options.buckets))

    def enqueue(
        self, rows: int, pixels: int = MEASURED_PIXELS, work: float = 1.0, model_id: str = "stabilityai/sd-turbo"
    ) -> tuple[float, float]:
        """Queue a batch of ``rows`` images of ``pixels`` each, ``work`` times a 1-step text-to-image
        batch (``work_factor``) of ``model_id``: (its device ms, when it will be done, perf_counter s)."""
        bucket = self.bucket(rows)
        ms = self.device_ms[bucket] * pixels / MEASURED_PIXELS * work * model_factor(model_id, bucket)
        with self._lock:
            done_at = max(time.perf_counter(), self._free_at) + ms / 1e3
            self._free_at = done_at
            self.stats.batches += 1
            self.stats.images += rows
            self.stats.busy_s += ms / 1e3
        return ms, done_at


class SimulatedAdapter:
    """What the worker asks of a loaded model, answered by a ``SimulatedDevice``."""

    def __init__(self, model_id: str, device: SimulatedDevice) -> None:
        self.model_id = model_id
        self.fast = device

    def check_inputs(self, request: GenerationRequest) -> None:
        common.check_common(request)

    @staticmethod
    def _jpeg(width: int, height: int) -> EncodedImage:
        return EncodedImage(data=flat_jpeg(width, height), width=width, height=height, content_type="image/jpeg")

    def __call__(self, batch: Sequence[GenerationRequest]) -> Deferred[list[list[EncodedImage]]]:
        rows, largest = common.total_images(batch), max(self.fast.options.buckets)
        pixels = batch[0].width * batch[0].height  # one batch: one size, task, step count
        work = work_factor(batch[0])
        ms = done_at = 0.0
        for start in range(0, rows, largest):  # past the largest bucket: in chunks, as the fast path
            chunk_ms, done_at = self.fast.enqueue(min(rows - start, largest), pixels, work, self.model_id)
            ms += chunk_ms

        def finish() -> list[list[EncodedImage]]:
            time.sleep(max(0.0, done_at - time.perf_counter()))
            marks["device_done"] = time.perf_counter()
            return [[self._jpeg(r.width, r.height)] * r.num_images for r in batch]

        marks: dict[str, float] = {"device_s": ms / 1e3}
        return Deferred(finish, ms, marks)


class SimulatedWorker(Worker):
    """The engine's worker with every model on one ``SimulatedDevice``."""

    def __init__(self, settings: Settings, device_ms: dict[int, float]) -> None:
        super().__init__(settings)
        self.simulated = SimulatedDevice(device_ms)

    def _load(self, model_id: str) -> SimulatedAdapter:  # type: ignore[override]
        return SimulatedAdapter(model_id, self.simulated)

    def status(self) -> dict[str, Any]:
        status = super().status()
        status["device"] = "simulated"
        return status


@contextmanager
def simulated_server(data_dir: Path, key: str, device: str, **settings: Any) -> Iterator[str]:
    """The real app and worker over a ``SimulatedDevice`` (``DEVICE_MS[device]``), on a free
    loopback port in a thread; yields its URL."""
    config = Settings(data_dir=data_dir, api_keys=key, models=["stabilityai/sd-turbo"], device="cpu", **settings)  # type: ignore[arg-type]
    worker = SimulatedWorker(config, DEVICE_MS[device])
    worker.open()
    try:
        worker.startup.result(timeout=60)
        with serve_in_thread(config, worker) as url:
            yield url
    finally:
        worker.close()
