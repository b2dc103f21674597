"""A discrete-event model of realtime sessions feeding the engine's batcher on one GPU.

Not a measurement: it predicts what a batching policy does to frames/s and latency from the
per-batch device times of a real run (the H200 CUDA-graph rows in BENCHMARKS.md), so that a
policy can be chosen before a GPU is at hand and checked against `livegen bench realtime` when
one is. Needs `pip install simpy`; not part of the test suite.

    python benchmarks/batching_model.py --sessions 1 4 8 16 --max-batch 16

Each session sends a frame every 1/fps s into a ``--buffering``-deep inbox (default 2, the
server's default max_buffering; the oldest frame is taken first), keeps up to ``--depth``
frames in the engine at a time (results sent in order), and pays a server cost before and after
each. With ``--late`` a frame waiting in the engine, not yet in a batch, counts toward the
session's buffer, so newer frames supersede it there too. The device runs one batch at a time,
padded to its bucket. Policies (the worker's, engine/worker.py):

- ``before``: the worker until session 6. The device thread takes whatever is pending the
  moment it is there, enqueues it, then waits for one of two slots: up to three batches are
  queued on the device, and a request that arrives alone goes alone. With ``--old-jpeg`` a
  batch of two or more images also waits for the batch queued after it (torchvision's encoder
  synchronized the default stream before each image).
- ``slot``: a slot first, then take what is pending.
- ``slot+gather``: as ``slot``, but while the device is busy the batch is formed just before
  the device runs out of work, or when a full batch waits.
- ``+last``: with ``gather``, the batch is formed just before the device runs out of work even
  when a full batch waits (with ``--late``, its frames are then the newest).
- ``+cut``: a batch filling less than ``--fill`` of its bucket is cut to the largest bucket it
  fills; the rest goes next.
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
from collections.abc import Generator
from typing import Any

import simpy

BUCKETS = (1, 2, 4, 8, 16)
# ms per batch by bucket, SD-Turbo 512², on an H200 (BENCHMARKS.md). Session 5's CUDA-graph rows
# (ms/img × batch, one batch at a time: the host's share included):
T2I = {1: 9.10, 2: 13.8, 4: 20.8, 8: 36.7, 16: 68.2}
I2I = {1: 11.99, 2: 17.9, 4: 26.6, 8: 48.4, 16: 88.8}  # 2 steps x strength 0.5
# Session 8's device time per batch (CUDA events; the host's share overlaps the previous batch
# when two are in flight): graphs, and torch.compile (buckets 1 and 16 measured; 2, 4 and 8
# interpolated per image between them, as the graph rows are).
T2I_DEVICE = {1: 8.30, 2: 11.8, 4: 18.98, 8: 33.92, 16: 63.55}
T2I_COMPILE_DEVICE = {1: 5.27, 2: 7.6, 4: 12.4, 8: 22.2, 16: 41.9}
COSTS = {"t2i": T2I, "i2i": I2I, "t2i-device": T2I_DEVICE, "t2i-compile-device": T2I_COMPILE_DEVICE}


def bucket(n: int) -> int:
    return next(b for b in BUCKETS if b >= n)


class Frame:
    """A frame handed to the engine: when it was received (``sent``; with ``--late`` a newer frame
    of the same session can take its place until it is taken into a batch) and its result."""

    def __init__(self, sent: float, done: simpy.Event) -> None:
        self.sent, self.done, self.taken = sent, done, False


class Model:
    def __init__(self, policy: str, sessions: int, args: argparse.Namespace, seed: int) -> None:
        self.env = simpy.Environment()
        self.policy, self.args = policy, args
        self.cost = COSTS[args.task]
        self.pre_ms = 2.0 if args.task == "i2i" else 0.5  # server work before the engine
        self.rng = random.Random(seed)
        self.pending: list[Frame] = []
        self.pending_changed = self.env.event()
        self.slots = simpy.Resource(self.env, capacity=2)
        self.gpu = simpy.Resource(self.env, capacity=1)
        self.device_free_at = 0.0
        self.last_end: simpy.Event | None = None
        self.warmup_ms = 2000.0
        self.latencies: list[float] = []
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.padded = 0
        self.superseded = 0
        for _ in range(sessions):
            self.env.process(self.session())
        self.env.process(self.device_thread())

    def jitter(self, ms: float, lo: float = 0.5, hi: float = 2.0) -> float:
        return ms * self.rng.uniform(lo, hi)

    def session(self) -> Generator[Any, Any, None]:
        inbox: collections.deque[float] = collections.deque()
        waiting: list[Frame] = []  # --late: this session's frames in the engine not yet in a batch
        arrived = [self.env.event()]
        interval = 1000.0 / self.args.fps

        def client() -> Generator[Any, Any, None]:
            yield self.env.timeout(self.rng.uniform(0, interval))
            while True:
                waiting[:] = [f for f in waiting if not f.taken]
                if len(inbox) + len(waiting) >= self.args.buffering:  # full: the oldest is superseded
                    if waiting:  # the oldest waits in the engine: it takes the next frame's place
                        for older, newer in zip(waiting, waiting[1:], strict=False):
                            older.sent = newer.sent
                        waiting[-1].sent = inbox.popleft() if inbox else self.env.now
                        self.superseded += 1
                        if not inbox and waiting[-1].sent == self.env.now:
                            yield self.env.timeout(self.jitter(interval, 0.9, 1.1))
                            continue
                    else:
                        inbox.popleft()
                inbox.append(self.env.now)
                if not arrived[0].triggered:
                    arrived[0].succeed()
                yield self.env.timeout(self.jitter(interval, 0.9, 1.1))

        self.env.process(client())
        in_engine = simpy.Resource(self.env, capacity=self.args.depth)
        previous_sent: simpy.Event = self.env.event().succeed()
        while True:
            slot = in_engine.request()
            yield slot
            while not inbox:
                arrived[0] = self.env.event()
                yield arrived[0]
            frame = Frame(inbox.popleft(), self.env.event())
            yield self.env.timeout(self.jitter(self.pre_ms))
            if self.args.late:
                waiting.append(frame)
            self.pending.append(frame)
            if not self.pending_changed.triggered:
                self.pending_changed.succeed()
            result_sent = self.env.event()
            self.env.process(self.send_in_order(frame, previous_sent, result_sent, in_engine, slot))
            previous_sent = result_sent

    def send_in_order(
        self, frame: Frame, previous: simpy.Event, result_sent: simpy.Event, in_engine: Any, slot: Any
    ) -> Generator[Any, Any, None]:
        """A frame's result goes out after the session's earlier frames' results (fal's order)."""
        yield frame.done
        yield previous
        yield self.env.timeout(self.jitter(0.5))  # packing and sending the result
        if frame.sent >= self.warmup_ms:
            self.latencies.append(self.env.now - frame.sent)
        result_sent.succeed()
        in_engine.release(slot)

    def wait_pending(self) -> Generator[Any, Any, None]:
        while not self.pending:
            self.pending_changed = self.env.event()
            yield self.pending_changed

    def take(self) -> list[Frame]:
        n = min(len(self.pending), self.args.max_batch)
        if "cut" in self.policy and n < bucket(n) and n < self.args.fill * bucket(n):
            n = max(b for b in BUCKETS if b <= n)
        batch, self.pending = self.pending[:n], self.pending[n:]
        for frame in batch:
            frame.taken = True
        return batch

    def device_thread(self) -> Generator[Any, Any, None]:
        enqueue_ms = 0.5
        while True:
            if self.policy == "before":
                yield from self.wait_pending()
                batch = self.take()
                yield self.env.timeout(enqueue_ms)
                slot = self.slots.request()
                self.env.process(self.on_device(batch, slot))
                yield slot
                continue
            slot = self.slots.request()
            yield slot
            yield from self.wait_pending()
            if "gather" in self.policy:
                while len(self.pending) < self.args.max_batch or "last" in self.policy:
                    left = self.device_free_at - self.env.now - enqueue_ms - 1.0
                    if left <= 0:
                        break
                    self.pending_changed = self.env.event()
                    yield self.env.any_of([self.pending_changed, self.env.timeout(left)])
            batch = self.take()
            yield self.env.timeout(enqueue_ms)
            self.env.process(self.on_device(batch, slot))

    def on_device(self, batch: list[Frame], slot: Any) -> Generator[Any, Any, None]:
        b = bucket(len(batch))
        self.batch_sizes[len(batch)] += 1
        self.padded += b - len(batch)
        self.device_free_at = max(self.env.now, self.device_free_at) + self.cost[b]
        end = self.env.event()
        self.last_end = end
        with self.gpu.request() as gpu:
            yield gpu
            yield self.env.timeout(self.jitter(self.cost[b], 0.97, 1.03))
        end.succeed()
        yield slot  # the worker finishes a batch only once the device thread's acquire() returned
        if self.args.old_jpeg and len(batch) >= 2 and self.last_end is not end:
            yield self.last_end
        yield self.env.timeout(self.jitter(0.5))  # the encode pool: sync, JPEG, results
        self.slots.release(slot)
        for frame in batch:
            frame.done.succeed()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--task", choices=list(COSTS), default="t2i")
    ap.add_argument("--buffering", type=int, default=2, help="the inbox's size (max_buffering)")
    ap.add_argument("--depth", type=int, default=1, help="frames per session in the engine at once")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--fill", type=float, default=1.0)  # the server's default (LIVEGEN_BATCH_FILL) since session 16
    ap.add_argument("--old-jpeg", action="store_true")
    ap.add_argument(
        "--late",
        action="store_true",
        help="a frame waiting in the engine (not in a batch yet) counts toward the session's buffer",
    )
    ap.add_argument("--policies", nargs="+", default=["before", "slot", "slot+cut", "slot+gather+cut"])
    args = ap.parse_args()
    print(
        f"{args.task}, {args.fps:g} frames/s per session, max batch {args.max_batch}, "
        f"{args.depth} frame(s) per session in the engine; mean of 3 seeds"
    )
    for sessions in args.sessions:
        for policy in args.policies:
            rows = []
            for seed in range(3):
                m = Model(policy, sessions, args, seed)
                m.env.run(until=m.warmup_ms + args.seconds * 1000)
                lat = sorted(m.latencies)
                images = sum(k * v for k, v in m.batch_sizes.items())
                rows.append((len(lat) / args.seconds, lat[len(lat) // 2], lat[int(len(lat) * 0.99)],
                             images / sum(m.batch_sizes.values()), m.padded / images))  # fmt: skip
            fps, p50, p99, mean_batch, padding = (statistics.mean(r[i] for r in rows) for i in range(5))
            print(
                f"sessions {sessions:2d}  {policy:16s} frames/s {fps:6.1f}  latency p50 {p50:6.1f} ms "
                f"p99 {p99:6.1f} ms  mean batch {mean_batch:5.2f}  padded rows {padding:5.1%}"
            )


if __name__ == "__main__":
    main()
