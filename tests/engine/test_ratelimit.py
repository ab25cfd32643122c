"""Token buckets: exact lazy refill on the autojump clock, waits, LRU-bounded keys."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from engine.errors import RateLimitExceeded
from engine.metrics import Metrics
from engine.ratelimit import RateLimiter


def make(
    *, rate_per_s: float = 4.0, burst: float = 2, max_keys: int = 3, metrics: Metrics | None = None
) -> RateLimiter:
    return RateLimiter(
        "dlr", rate_per_s=rate_per_s, burst=burst, max_keys=max_keys, metrics=metrics
    )


async def test_burst_then_exact_refill(autojump_clock: trio.testing.MockClock) -> None:
    limiter = make(rate_per_s=4.0, burst=2)
    assert limiter.try_acquire("sms-a")
    assert limiter.try_acquire("sms-a")
    assert not limiter.try_acquire("sms-a")
    assert limiter.available("sms-a") == 0.0
    await trio.sleep(0.125)
    assert limiter.available("sms-a") == 0.5
    assert not limiter.try_acquire("sms-a")
    await trio.sleep(0.125)
    assert limiter.try_acquire("sms-a")
    await trio.sleep(10)  # refill stops at the burst
    assert limiter.available("sms-a") == 2.0
    assert limiter.try_acquire("sms-a", tokens=2)


async def test_keys_have_their_own_buckets(autojump_clock: trio.testing.MockClock) -> None:
    limiter = make(burst=1)
    assert limiter.try_acquire("a")
    assert not limiter.try_acquire("a")
    assert limiter.try_acquire("b")


async def test_acquire_or_raise_says_when_to_retry(autojump_clock: trio.testing.MockClock) -> None:
    metrics = Metrics()
    limiter = make(rate_per_s=4.0, burst=2, metrics=metrics)
    limiter.acquire_or_raise("k")
    limiter.acquire_or_raise("k")
    await trio.sleep(0.125)
    with pytest.raises(RateLimitExceeded) as refused:
        limiter.acquire_or_raise("k")
    assert refused.value.retry_after_s == 0.125
    assert refused.value.key == "k"
    assert not limiter.try_acquire("k")
    assert limiter.statistics().rejected == 2
    value = metrics.registry.get_sample_value("triage_ratelimit_rejected_total", {"limiter": "dlr"})
    assert value == 2


async def test_acquire_waits_exactly_for_the_refill(autojump_clock: trio.testing.MockClock) -> None:
    limiter = make(rate_per_s=4.0, burst=1)
    times = []
    for _ in range(4):
        await limiter.acquire("k")
        times.append(trio.current_time())
    assert times == [0.0, 0.25, 0.5, 0.75]


async def test_concurrent_waiters_share_the_refill(autojump_clock: trio.testing.MockClock) -> None:
    limiter = make(rate_per_s=2.0, burst=1)
    assert limiter.try_acquire("k")
    times: list[float] = []

    async def take() -> None:
        await limiter.acquire("k")
        times.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(take)
    assert times == [0.5, 1.0, 1.5]


async def test_least_recently_used_key_is_evicted(autojump_clock: trio.testing.MockClock) -> None:
    limiter = make(burst=1, max_keys=2)
    assert limiter.try_acquire("a")
    assert limiter.try_acquire("b")
    assert not limiter.try_acquire("a")  # touches a: b is now the oldest
    assert limiter.try_acquire("c")  # evicts b
    assert limiter.statistics().keys == 2
    assert limiter.available("b") == 1.0  # forgotten: a full bucket again
    assert limiter.available("a") == 0.0


async def test_more_tokens_than_the_burst_is_an_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limiter = make(burst=2)
    with pytest.raises(ValueError, match="never fit"):
        limiter.try_acquire("k", tokens=3)


def test_constructor_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        make(rate_per_s=0.0)
    with pytest.raises(ValueError):
        make(max_keys=0)
