"""Per-caller rate limits: one token bucket per API key (or per client address), kept in memory.

A bucket holds at most ``burst`` tokens and refills at ``rate`` tokens per second; each request
takes one. A caller can therefore send ``burst`` requests at once and ``rate`` per second for ever,
and never more than ``burst + rate * T`` in any window of ``T`` seconds. The state is per process
(one ``reid serve`` process per GPU); a bucket that has not been used for long is full again, so
forgetting the least recently used ones when there are too many loses nothing.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """``burst`` tokens at most, refilled continuously at ``rate`` per second; starts full."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.updated = now

    def take(self, now: float) -> float:
        """Take one token: 0.0 when granted, else the seconds until one will be available."""
        if now > self.updated:
            self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
            self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """Token buckets by key (``key:<id>`` or ``ip:<address>``), least recently used ones forgotten.

    Used from the event loop only (the request guard), so it needs no lock.

    Args:
        rate: requests per second each caller may sustain.
        burst: requests a caller may send at once.
        max_buckets: most callers remembered; the least recently seen is forgotten first.
        clock: monotonic time in seconds (a parameter so tests can drive it).
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_buckets: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate limits need rate > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate = rate
        self.burst = burst
        self.max_buckets = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def acquire(self, key: str) -> float:
        """Charge one request to ``key``: 0.0 when allowed, else seconds to wait (the Retry-After)."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.max_buckets:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
