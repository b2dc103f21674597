"""Per-key rate limits for generation requests: a token bucket per API key.

``rate`` requests per second sustained, ``burst`` at once. Over the limit, ``QueueFull``
(429) with ``Retry-After`` set to when the next request would be admitted; fal's clients
retry 429s on their own. Status polls are not limited (fal-client polls at 10 Hz).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from livegen.protocol.errors import QueueFull


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def check(self, key_id: str) -> None:
        """Take one token for ``key_id`` or raise ``QueueFull``. A rate of 0 turns limiting off."""
        if self.rate <= 0:
            return
        now = self._clock()
        bucket = self._buckets.setdefault(key_id, _Bucket(float(self.burst), now))
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1:
            wait = (1 - bucket.tokens) / self.rate
            raise QueueFull(f"rate limit of {self.rate:g} requests/s for this key exceeded", retry_after=wait)
        bucket.tokens -= 1
