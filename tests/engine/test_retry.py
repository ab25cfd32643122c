"""Retry schedules, budgets and refusals, on the autojump clock with exact times."""

from __future__ import annotations

import random
from typing import Any, NoReturn

import pytest
import tenacity
import trio
import trio.testing

from engine.clock import Chance
from engine.errors import (
    CircuitOpen,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    Rejected,
)
from engine.metrics import Metrics
from engine.retry import RetryPolicy

DEFAULTS: dict[str, Any] = {
    "max_attempts": 6,
    "time_budget_s": 100.0,
    "backoff_initial_s": 1.0,
    "backoff_max_s": 5.0,
    "backoff_multiplier": 2.0,
    "jitter": 0.0,
}


def make(**overrides: Any) -> RetryPolicy:
    return RetryPolicy("sms", **{**DEFAULTS, **overrides})


class Flaky:
    """Fails with the given errors in turn, then succeeds; records attempt times."""

    def __init__(self, *errors: BaseException, duration: float = 0.0) -> None:
        self.errors = list(errors)
        self.times: list[float] = []
        self.duration = duration

    async def __call__(self, value: str) -> str:
        self.times.append(trio.current_time())
        await trio.sleep(self.duration)
        if self.errors:
            raise self.errors.pop(0)
        return value


def unavailable(n: int) -> list[BaseException]:
    return [ProviderUnavailable(f"down {i + 1}") for i in range(n)]


async def test_exponential_schedule_with_cap(autojump_clock: trio.testing.MockClock) -> None:
    fn = Flaky(*unavailable(5))
    assert await make().call(fn, "sent") == "sent"
    assert fn.times == [0.0, 1.0, 3.0, 7.0, 12.0, 17.0]  # waits 1, 2, 4, 5, 5


async def test_jitter_comes_from_the_seeded_chance(autojump_clock: trio.testing.MockClock) -> None:
    fn = Flaky(*unavailable(4))
    policy = make(jitter=0.5, chance=Chance(1234))
    await policy.call(fn, "sent")
    draws = random.Random(1234)
    expected = [0.0]
    for base in (1.0, 2.0, 4.0, 5.0):
        expected.append(expected[-1] + base * (1 - 0.5 * draws.random()))
    assert fn.times == expected
    # The same seed gives the same schedule.
    again = Flaky(*unavailable(4))
    await make(jitter=0.5, chance=Chance(1234)).call(again, "sent")
    start = again.times[0]
    assert [t - start for t in again.times] == pytest.approx(expected, rel=1e-12, abs=1e-9)


async def test_attempt_budget_reraises_the_last_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    errors = unavailable(5)
    fn = Flaky(*errors)
    with pytest.raises(ProviderUnavailable) as raised:
        await make(max_attempts=3).call(fn, "x")
    assert raised.value is errors[2]
    assert fn.times == [0.0, 1.0, 3.0]


async def test_time_budget_stops_before_an_attempt_past_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fn = Flaky(*unavailable(5), duration=0.5)
    with pytest.raises(ProviderUnavailable, match="down 3"):
        await make(time_budget_s=7.5).call(fn, "x")
    # Attempts at 0, 1.5, 4 (each takes 0.5 s); the next would start at 8.5 >= 7.5.
    assert fn.times == [0.0, 1.5, 4.0]
    assert trio.current_time() == 4.5


async def test_an_attempt_exactly_at_the_budget_is_not_made(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fn = Flaky(*unavailable(5))
    with pytest.raises(ProviderUnavailable):
        await make(time_budget_s=3.0).call(fn, "x")
    assert fn.times == [0.0, 1.0]


async def test_retry_after_is_honoured(autojump_clock: trio.testing.MockClock) -> None:
    fn = Flaky(RateLimited("slow down", retry_after_s=30.0), ProviderTimeout("t"))
    assert await make().call(fn, "ok") == "ok"
    assert fn.times == [0.0, 30.0, 32.0]


async def test_permanent_errors_and_load_shed_are_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    for error in (Rejected("bad number"), CircuitOpen("sms", retry_after_s=1.0)):
        fn = Flaky(error)
        with pytest.raises(type(error)):
            await make().call(fn, "x")
        assert fn.times == [0.0]


async def test_a_permanent_error_on_a_retry_ends_it(autojump_clock: trio.testing.MockClock) -> None:
    fn = Flaky(ProviderUnavailable("down"), Rejected("bad"), ProviderUnavailable("down"))
    with pytest.raises(Rejected):
        await make().call(fn, "x")
    assert fn.times == [0.0, 1.0]


async def test_cancellation_is_never_retried(autojump_clock: trio.testing.MockClock) -> None:
    fn = Flaky(duration=10.0)
    with trio.move_on_after(2.0) as scope:
        await make().call(fn, "x")
    assert scope.cancelled_caught
    assert fn.times == [0.0]
    # Cancelled during a retry attempt: it propagates unchanged, nothing more is tried.
    fn = Flaky(ProviderUnavailable("down"), duration=2.0)
    with trio.move_on_after(4.0) as scope:
        await make().call(fn, "x")
    assert scope.cancelled_caught
    assert fn.times == [2.0, 5.0]  # first attempt 2..4 fails, retry at 5 is cut at 6
    assert trio.current_time() == 6.0


async def test_cancellation_during_backoff_propagates(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fn = Flaky(*unavailable(3))
    with trio.move_on_after(2.0) as scope:
        await make(backoff_initial_s=10.0, backoff_max_s=10.0).call(fn, "x")
    assert scope.cancelled_caught
    assert fn.times == [0.0]
    assert trio.current_time() == 2.0


async def test_success_path_never_touches_tenacity(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: object, **kwargs: object) -> NoReturn:
        raise AssertionError("tenacity was used")

    monkeypatch.setattr(tenacity, "AsyncRetrying", explode)
    policy = make()
    assert await policy.call(Flaky(), "fast") == "fast"
    # And the patch is live: a failure does reach tenacity.
    with pytest.raises(AssertionError, match="tenacity was used"):
        await policy.call(Flaky(ProviderUnavailable("down")), "slow")


async def test_retries_are_counted(autojump_clock: trio.testing.MockClock) -> None:
    metrics = Metrics()
    policy = make(metrics=metrics)
    await policy.call(Flaky(*unavailable(2)), "x")
    await policy.call(Flaky(), "x")
    value = metrics.registry.get_sample_value("triage_retry_attempts_total", {"policy": "sms"})
    assert value == 2


async def test_single_attempt_policy_never_retries(autojump_clock: trio.testing.MockClock) -> None:
    fn = Flaky(ProviderUnavailable("down"))
    with pytest.raises(ProviderUnavailable):
        await make(max_attempts=1).call(fn, "x")
    assert fn.times == [0.0]


async def test_is_transient_is_configurable(autojump_clock: trio.testing.MockClock) -> None:
    fn = Flaky(KeyError("flaky lookup"))
    policy = make(is_transient=lambda exc: isinstance(exc, KeyError))
    assert await policy.call(fn, "x") == "x"
    assert fn.times == [0.0, 1.0]


def test_backoff_and_validation() -> None:
    policy = make()
    assert [policy.backoff_s(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    with pytest.raises(ValueError):
        make(jitter=1.5)
    with pytest.raises(ValueError):
        make(max_attempts=0)
