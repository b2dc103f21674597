"""Admission control for sync requests (``POST /{endpoint}`` and its ``/stream``).

A sync request holds its HTTP connection until its images are ready, and the engine's queue
has no bound of its own: under overload every caller would wait longer and longer until its
client timed out. So at most ``limit`` sync requests are admitted and unfinished at once
(input fetching and decoding included); beyond that a request is refused at once with
``Overloaded`` (503 ``server_overloaded``, ``Retry-After``), before any work is done for it.
That refusal is answered like fal's ingress (no ``x-fal-request-id``; see ``middleware.py``),
so both official clients retry it on their own: fal-client up to 10 attempts over about 50 s
(0.1 s doubling, ±50 % jitter), the JS client 3 retries (``run``: 0.5, 1, 2 s ±25 %). Neither
reads ``Retry-After``.
Queue jobs have their own cap (``max_queued``, ``max_running_jobs``) and realtime sessions
theirs (``max_sessions``, latest frame wins).

    admission = SyncAdmission(64)
    with admission.take():
        ...  # generate
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from livegen.protocol.errors import Overloaded


class SyncAdmission:
    """Counts admitted, unfinished sync requests against ``limit`` (event-loop only, no lock)."""

    def __init__(self, limit: int, *, retry_after: float = 1.0) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.retry_after = retry_after
        self.pending = 0
        self.refused = 0

    @contextlib.contextmanager
    def take(self) -> Iterator[None]:
        if self.pending >= self.limit:
            self.refused += 1
            raise Overloaded(
                f"the server has {self.pending} requests in flight, its limit; retry later",
                retry_after=self.retry_after,
            )
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1
