"""Token buckets per key, refilled lazily from Trio time.

Each key owns a bucket of at most ``burst`` tokens that refills at ``rate_per_s``
tokens a second. Nothing runs in the background: a bucket is brought up to date
when it is next asked, from ``trio.current_time()``, so the arithmetic is exact on
``MockClock``. A new key starts with a full bucket.

At most ``max_keys`` buckets are kept, least recently used evicted first. An
evicted key comes back with a full bucket, so size ``max_keys`` above the number
of keys that are active within ``burst / rate_per_s`` seconds.

- :meth:`RateLimiter.try_acquire` answers at once, True or False;
- :meth:`RateLimiter.acquire_or_raise` raises
  :class:`~engine.errors.RateLimitExceeded` with the exact ``retry_after_s``;
- :meth:`RateLimiter.acquire` waits until the tokens are there.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from engine.errors import RateLimitExceeded

if TYPE_CHECKING:
    from prometheus_client import Counter

    from engine.metrics import Metrics

__all__ = ["RateLimiter", "RateLimiterStatistics"]

# Refill is floating-point: a bucket this close to enough tokens counts as enough,
# and a waiter sleeps at least _MIN_SLEEP_S, so it never spins on a sleep too short
# for the clock to represent.
_EPSILON = 1e-9
_MIN_SLEEP_S = 1e-6


@dataclass(frozen=True, slots=True)
class RateLimiterStatistics:
    keys: int
    max_keys: int
    rejected: int


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class RateLimiter:
    """A token bucket per key, ``rate_per_s`` refill, ``burst`` capacity, LRU-bounded."""

    def __init__(
        self,
        name: str,
        *,
        rate_per_s: float,
        burst: float,
        max_keys: int,
        metrics: Metrics | None = None,
    ) -> None:
        if not rate_per_s > 0 or not burst >= 1 or max_keys < 1:
            raise ValueError(
                f"rate limiter {name!r}: rate_per_s must be > 0, burst >= 1, max_keys >= 1"
            )
        self.name = name
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._rejected = 0
        self._m_rejected: Counter | None = None
        if metrics is not None:
            self._m_rejected = metrics.ratelimit_rejected.labels(metrics.label("limiter", name))

    def try_acquire(self, key: str, tokens: float = 1) -> bool:
        """Take ``tokens`` from ``key``'s bucket if they are there; never waits."""
        if self._take(key, tokens) == 0.0:
            return True
        self._count_rejection()
        return False

    def acquire_or_raise(self, key: str, tokens: float = 1) -> None:
        """Take ``tokens`` or raise RateLimitExceeded saying when they will be there."""
        wait = self._take(key, tokens)
        if wait:
            self._count_rejection()
            raise RateLimitExceeded(self.name, key, retry_after_s=wait)

    async def acquire(self, key: str, tokens: float = 1) -> None:
        """Take ``tokens``, sleeping until the bucket has refilled enough.

        Always checkpoints. Waiters on one key are not queued: each wakes when its
        tokens should be there and takes them if nobody was faster.
        """
        await trio.lowlevel.checkpoint()
        while True:
            wait = self._take(key, tokens)
            if not wait:
                return
            # Each wake recomputes: another task may have taken the refill first.
            await trio.sleep(max(wait, _MIN_SLEEP_S))

    def available(self, key: str) -> float:
        """Tokens ``key`` could take now (``burst`` for an unknown key); takes nothing."""
        bucket = self._buckets.get(key)
        if bucket is None:
            return float(self.burst)
        elapsed = trio.current_time() - bucket.stamp
        return min(self.burst, bucket.tokens + elapsed * self.rate_per_s)

    def statistics(self) -> RateLimiterStatistics:
        return RateLimiterStatistics(
            keys=len(self._buckets), max_keys=self.max_keys, rejected=self._rejected
        )

    def _take(self, key: str, tokens: float) -> float:
        """Take the tokens and return 0.0, or take nothing and return the seconds to wait."""
        if tokens > self.burst:
            raise ValueError(
                f"rate limiter {self.name!r}: {tokens} tokens can never fit a burst of {self.burst}"
            )
        now = trio.current_time()
        buckets = self._buckets
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = _Bucket(self.burst, now)
            if len(buckets) > self.max_keys:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(key)
            if now > bucket.stamp:
                refilled = bucket.tokens + (now - bucket.stamp) * self.rate_per_s
                bucket.tokens = refilled if refilled < self.burst else self.burst
                bucket.stamp = now
        if bucket.tokens + _EPSILON >= tokens:
            left = bucket.tokens - tokens
            bucket.tokens = left if left > 0.0 else 0.0
            return 0.0
        return (tokens - bucket.tokens) / self.rate_per_s

    def _count_rejection(self) -> None:
        self._rejected += 1
        if self._m_rejected is not None:
            self._m_rejected.inc()
