"""Prometheus metrics (``GET /metrics``), one registry per app.

Counters and histograms are updated where things happen (HTTP middleware, job completion,
webhook attempts); gauges that mirror state (queue depth, engine batches, device busy time)
are read from their owners at scrape time by ``_StateCollector``. prometheus_client's standard
``process_*`` and ``python_gc_*`` families come with them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, GCCollector, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "livegen_http_requests", "HTTP requests by route and status", ["route", "method", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.http_latency = Histogram(
            "livegen_http_request_duration_seconds", "HTTP request latency", ["route", "method"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )  # fmt: skip
        self.realtime_frames = Counter(
            "livegen_realtime_frames", "Realtime frames by what became of them", ["outcome"], registry=self.registry
        )
        self.jobs = Counter("livegen_jobs", "Queue jobs finished, by outcome", ["outcome"], registry=self.registry)
        self.webhooks = Counter(
            "livegen_webhook_deliveries", "Webhook delivery attempts, by result", ["result"], registry=self.registry
        )
        # The process (CPU seconds, resident memory, open files) and Python's collector (collections
        # per generation: generation 2 is the one that stops everything, see engine.freeze_heap).
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def watch(self, engine_status: Callable[[], dict[str, Any]], queue_depth: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_StateCollector(engine_status, queue_depth))

    def watch_files(self, usage: Callable[[], tuple[int, int, int]]) -> None:
        """``usage``: the stored files now, their bytes, and how many have expired (deleted) so far."""
        self.registry.register(_FilesCollector(usage))


class _FilesCollector(Collector):
    def __init__(self, usage: Callable[[], tuple[int, int, int]]) -> None:
        self._usage = usage

    def collect(self) -> Iterator[Any]:
        count, size, expired = self._usage()
        yield GaugeMetricFamily(
            "livegen_stored_files", "Files served back (uploads, sync_mode false outputs) until they expire", count
        )
        yield GaugeMetricFamily("livegen_stored_bytes", "Bytes of the stored files", size)
        yield CounterMetricFamily("livegen_files_expired", "Stored files deleted at the end of their time", expired)


class _StateCollector(Collector):
    def __init__(self, engine_status: Callable[[], dict[str, Any]], queue_depth: Callable[[], dict[str, int]]) -> None:
        self._engine_status = engine_status
        self._queue_depth = queue_depth

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily("livegen_queue_jobs", "Queue jobs by state", labels=["state"])
        for state, n in self._queue_depth().items():
            depth.add_metric([state], n)
        yield depth
        status = self._engine_status()
        yield CounterMetricFamily("livegen_engine_batches", "Pipeline calls", value=status.get("batches", 0))
        yield CounterMetricFamily("livegen_engine_images", "Images generated", value=status.get("images", 0))
        yield CounterMetricFamily(
            "livegen_engine_multi_request_batches",
            "Pipeline calls that served more than one request",
            value=status.get("multi_request_batches", 0),
        )
        yield CounterMetricFamily(
            "livegen_engine_busy_seconds", "Time the device spent in pipeline calls", value=status.get("busy_s", 0.0)
        )
        sizes: dict[int, int] = status.get("batch_sizes", {})
        if sizes:
            bounds = [1, 2, 4, 8, 16, 32, 64]
            buckets = [(str(b), sum(n for size, n in sizes.items() if size <= b)) for b in bounds]
            buckets.append(("+Inf", sum(sizes.values())))
            total = sum(size * n for size, n in sizes.items())
            family = HistogramMetricFamily("livegen_engine_batch_size", "Images per pipeline call")
            family.add_metric([], buckets, sum_value=total)
            yield family
        yield GaugeMetricFamily(
            "livegen_engine_queued", "Work items waiting for the device", value=status.get("queued", 0)
        )
        if "vram_allocated_bytes" in status:  # CUDA only
            yield GaugeMetricFamily(
                "livegen_engine_vram_allocated_bytes", "Device memory held by tensors", status["vram_allocated_bytes"]
            )
            yield GaugeMetricFamily(
                "livegen_engine_vram_peak_bytes", "Peak device memory held by tensors", status["vram_peak_bytes"]
            )
            by_model = GaugeMetricFamily(
                "livegen_engine_model_vram_bytes", "Device memory taken by loading each model", labels=["model"]
            )
            for model, n in status.get("vram_bytes_by_model", {}).items():
                by_model.add_metric([model], n)
            yield by_model


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (never the raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope.get("method", "")
            self.metrics.http_requests.labels(route, method, str(status)).inc()
            self.metrics.http_latency.labels(route, method).observe(time.perf_counter() - started)
