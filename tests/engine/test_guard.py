"""The Guard's composition (bulkhead → breaker → deadline → retry) and its timeout mapping."""

from __future__ import annotations

from typing import Any, NoReturn

import pytest
import tenacity
import trio
import trio.testing

from engine.breaker import Breaker, CircuitState
from engine.bulkhead import Bulkhead
from engine.clock import Chance
from engine.errors import (
    BulkheadFull,
    CircuitOpen,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimitExceeded,
    Rejected,
)
from engine.guard import Guard
from engine.metrics import Metrics
from engine.ratelimit import RateLimiter
from engine.retry import RetryPolicy


def make(
    *,
    timeout_s: float = 2.0,
    fail_max: int = 100,
    max_attempts: int = 1,
    capacity: int = 2,
    max_wait_s: float = 1.0,
    rate_limiter: RateLimiter | None = None,
    metrics: Metrics | None = None,
    **guard: Any,
) -> Guard:
    breaker = Breaker(
        "sms",
        fail_max=fail_max,
        reset_timeout_s=30.0,
        reset_timeout_max_s=30.0,
        reset_backoff_multiplier=1.0,
        failure_rate_threshold=0.99,
        rate_window_s=60.0,
        minimum_calls=10,
        slow_call_s=60.0,
        slow_call_rate_threshold=2.0,
        half_open_max_calls=1,
        metrics=metrics,
    )
    bulkhead = Bulkhead(
        "sms",
        capacity=capacity,
        max_wait_s=max_wait_s,
        max_partitions=10,
        partition_capacity=capacity,
    )
    retry = RetryPolicy(
        "sms",
        max_attempts=max_attempts,
        time_budget_s=60.0,
        backoff_initial_s=1.0,
        backoff_max_s=1.0,
        backoff_multiplier=1.0,
        jitter=0.0,
        chance=Chance(0),
    )
    return Guard(
        "sms",
        breaker=breaker,
        bulkhead=bulkhead,
        retry=retry,
        timeout_s=timeout_s,
        rate_limiter=rate_limiter,
        metrics=metrics,
        **guard,
    )


def state(breaker: Breaker) -> CircuitState:
    """The breaker's state, read fresh (a call mypy will not narrow across awaits)."""
    return breaker.state


class Provider:
    """Answers after ``delay`` seconds, raising the queued errors first."""

    def __init__(self, *errors: BaseException, delay: float = 0.0) -> None:
        self.errors = list(errors)
        self.delay = delay
        self.calls: list[float] = []

    async def send(self, text: str) -> str:
        self.calls.append(trio.current_time())
        await trio.sleep(self.delay)
        if self.errors:
            raise self.errors.pop(0)
        return f"sent {text}"


def idle(guard: Guard) -> bool:
    return guard.bulkhead.statistics().in_use == 0


async def test_success_passes_every_layer(autojump_clock: trio.testing.MockClock) -> None:
    guard = make()
    provider = Provider(delay=1.0)
    assert await guard.call(provider.send, "hi", key="tenant-a") == "sent hi"
    assert trio.current_time() == 1.0
    assert idle(guard)
    assert state(guard.breaker) is CircuitState.CLOSED
    assert guard.bulkhead.partition_keys() == ["tenant-a"]


async def test_success_path_has_no_checkpoint_and_no_tenacity(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("tenacity was used")

    monkeypatch.setattr(tenacity, "AsyncRetrying", explode)

    async def instant() -> int:
        return 7

    for transport in (False, True):
        guard = make(max_attempts=3, deadline_enforced_by_transport=transport)
        with trio.testing.assert_no_checkpoints():
            assert await guard.call(instant) == 7


async def test_timeout_becomes_provider_timeout(autojump_clock: trio.testing.MockClock) -> None:
    guard = make(timeout_s=2.0)
    with pytest.raises(ProviderTimeout) as raised:
        await guard.call(Provider(delay=10.0).send, "hi")
    assert trio.current_time() == 2.0
    assert isinstance(raised.value.__cause__, trio.TooSlowError)
    assert guard.breaker.statistics().consecutive_failures == 1
    assert idle(guard)


async def test_timeouts_are_retried_and_trip_the_breaker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    guard = make(timeout_s=2.0, max_attempts=3, fail_max=3)
    provider = Provider(delay=10.0)
    with pytest.raises(ProviderTimeout):
        await guard.call(provider.send, "hi")
    # Attempts at 0, 3, 6 (2 s deadline, then 1 s backoff); the third trips the breaker.
    assert provider.calls == [0.0, 3.0, 6.0]
    assert trio.current_time() == 8.0
    assert state(guard.breaker) is CircuitState.OPEN
    assert idle(guard)


async def test_a_breaker_opening_mid_retry_ends_the_retries(
    autojump_clock: trio.testing.MockClock,
) -> None:
    guard = make(max_attempts=5, fail_max=2)
    provider = Provider(*[ProviderUnavailable("down") for _ in range(5)])
    with pytest.raises(CircuitOpen):
        await guard.call(provider.send, "hi")
    assert provider.calls == [0.0, 1.0]
    assert trio.current_time() == 2.0
    assert idle(guard)


async def test_transient_failure_then_success(autojump_clock: trio.testing.MockClock) -> None:
    guard = make(max_attempts=3)
    provider = Provider(ProviderUnavailable("blip"), delay=0.5)
    assert await guard.call(provider.send, "hi") == "sent hi"
    assert provider.calls == [0.0, 1.5]
    assert guard.breaker.statistics().consecutive_failures == 0


async def test_permanent_error_is_raised_at_once(autojump_clock: trio.testing.MockClock) -> None:
    guard = make(max_attempts=3)
    provider = Provider(Rejected("bad number"))
    with pytest.raises(Rejected):
        await guard.call(provider.send, "hi")
    assert provider.calls == [0.0]
    assert idle(guard)


async def test_open_breaker_refuses_and_returns_the_permit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    guard = make(max_attempts=3)
    guard.breaker.force_open("drill")
    provider = Provider()
    with pytest.raises(CircuitOpen):
        await guard.call(provider.send, "hi")
    assert provider.calls == []
    assert idle(guard)


async def test_outer_cancellation_is_not_a_failure(autojump_clock: trio.testing.MockClock) -> None:
    guard = make(timeout_s=5.0, max_attempts=3, fail_max=1)
    with trio.move_on_after(1.0) as scope:
        await guard.call(Provider(delay=10.0).send, "hi")
    assert scope.cancelled_caught
    assert trio.current_time() == 1.0
    assert state(guard.breaker) is CircuitState.CLOSED
    assert guard.breaker.statistics().window_calls == 0
    assert idle(guard)


async def test_outer_cancellation_wins_over_a_simultaneous_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    guard = make(timeout_s=2.0, max_attempts=3)
    with trio.move_on_after(2.0) as scope:
        await guard.call(Provider(delay=10.0).send, "hi")
    assert scope.cancelled_caught  # a Cancelled reached the caller's scope, not ProviderTimeout
    assert trio.current_time() == 2.0
    # The outermost cancelled scope takes the Cancelled: nothing counted as a failure.
    assert guard.breaker.statistics().consecutive_failures == 0
    assert idle(guard)


async def test_cancelled_half_open_probe_through_the_guard(
    autojump_clock: trio.testing.MockClock,
) -> None:
    guard = make(fail_max=1, timeout_s=10.0)
    with pytest.raises(ProviderUnavailable):
        await guard.call(Provider(ProviderUnavailable("down")).send, "hi")
    await guard.breaker.wait_until_half_open()
    with trio.move_on_after(1.0):
        await guard.call(Provider(delay=5.0).send, "probe")
    assert state(guard.breaker) is CircuitState.HALF_OPEN
    assert await guard.call(Provider().send, "probe") == "sent probe"
    assert state(guard.breaker) is CircuitState.CLOSED


async def test_full_bulkhead_refuses_without_touching_the_breaker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    guard = make(capacity=1, max_wait_s=1.5, max_attempts=3, timeout_s=10.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(guard.call, Provider(delay=5.0).send, "long")
        await trio.testing.wait_all_tasks_blocked()
        provider = Provider()
        with pytest.raises(BulkheadFull):
            await guard.call(provider.send, "hi")
        assert trio.current_time() == 1.5
        assert provider.calls == []
    assert guard.breaker.statistics().window_calls == 1  # only the long call


async def test_rate_limit_is_checked_per_key(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter("sms", rate_per_s=1.0, burst=1, max_keys=10)
    guard = make(rate_limiter=limiter)
    provider = Provider()
    await guard.call(provider.send, "a", key="tenant-a")
    await guard.call(provider.send, "b", key="tenant-b")
    with pytest.raises(RateLimitExceeded) as refused:
        await guard.call(provider.send, "a", key="tenant-a")
    assert refused.value.retry_after_s == 1.0
    assert len(provider.calls) == 2
    await guard.call(provider.send, "x")  # no key: the guard's own bucket
    assert limiter.available("sms") == 0.0


async def test_transport_enforced_deadline_skips_the_scope(
    autojump_clock: trio.testing.MockClock,
) -> None:
    guard = make(timeout_s=2.0, deadline_enforced_by_transport=True)
    assert await guard.call(Provider(delay=5.0).send, "hi") == "sent hi"
    assert trio.current_time() == 5.0


async def test_call_duration_is_observed_when_asked(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = Metrics()
    guard = make(metrics=metrics)
    await guard.call(Provider(delay=0.25).send, "hi")
    with pytest.raises(ProviderTimeout):
        await guard.call(Provider(delay=5.0).send, "hi")
    registry = metrics.registry
    assert registry.get_sample_value("triage_call_seconds_count", {"guard": "sms"}) == 2
    assert registry.get_sample_value("triage_call_seconds_sum", {"guard": "sms"}) == 2.25
