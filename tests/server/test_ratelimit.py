"""Per-key rate limits, with an injected clock."""

from __future__ import annotations

import pytest

from livegen.protocol.errors import QueueFull
from livegen.server.ratelimit import RateLimiter


def test_burst_then_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(QueueFull) as info:
        limiter.check("a")
    assert info.value.http_status == 429
    assert info.value.headers() == {"Retry-After": "1"}  # 0.5 s, rounded up to the header's 1 s
    limiter.check("b")  # other keys have their own bucket
    now[0] = 0.5
    limiter.check("a")  # one token refilled
    with pytest.raises(QueueFull):
        limiter.check("a")
    now[0] = 100.0
    for _ in range(3):  # refills up to the burst, not beyond
        limiter.check("a")
    with pytest.raises(QueueFull):
        limiter.check("a")


def test_zero_rate_means_unlimited() -> None:
    limiter = RateLimiter(rate=0.0, burst=1)
    for _ in range(100):
        limiter.check("a")
