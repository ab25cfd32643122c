"""Breaker rules and transitions, on the autojump clock with exact times."""

from __future__ import annotations

import math
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pybreaker
import pytest
import trio
import trio.testing

from engine.breaker import Breaker, CircuitState
from engine.errors import (
    BulkheadFull,
    CircuitOpen,
    ProviderUnavailable,
    Rejected,
)
from engine.events import BreakerStateChanged, EventBus
from engine.metrics import Metrics

DEFAULTS: dict[str, Any] = {
    "fail_max": 3,
    "reset_timeout_s": 10.0,
    "reset_timeout_max_s": 60.0,
    "reset_backoff_multiplier": 2.0,
    "failure_rate_threshold": 2.0,  # off unless a test turns it on
    "rate_window_s": 10.0,
    "minimum_calls": 10,
    "slow_call_s": 5.0,
    "slow_call_rate_threshold": 2.0,  # off unless a test turns it on
    "half_open_max_calls": 1,
}


def make(name: str = "sms", **overrides: Any) -> Breaker:
    return Breaker(name, **{**DEFAULTS, **overrides})


def state(breaker: Breaker) -> CircuitState:
    """The breaker's state, read fresh (a call mypy will not narrow across awaits)."""
    return breaker.state


async def ok(after: float = 0.0) -> str:
    await trio.sleep(after)
    return "ok"


async def down(after: float = 0.0) -> str:
    await trio.sleep(after)
    raise ProviderUnavailable("down")


async def fail_n(breaker: Breaker, n: int, after: float = 0.0) -> None:
    for _ in range(n):
        with pytest.raises(ProviderUnavailable):
            await breaker.call(down, after)


async def test_consecutive_failures_open_the_breaker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make(fail_max=3)
    await fail_n(breaker, 2)
    assert state(breaker) is CircuitState.CLOSED
    assert breaker.statistics().consecutive_failures == 2
    await trio.sleep(1)
    await fail_n(breaker, 1)
    assert state(breaker) is CircuitState.OPEN
    assert trio.current_time() == 1.0
    assert breaker.half_open_at() == 11.0
    await trio.sleep(4)
    with pytest.raises(CircuitOpen) as refused:
        await breaker.call(ok)
    assert refused.value.retry_after_s == 6.0
    assert refused.value.breaker == "sms"


async def test_a_success_resets_the_consecutive_count(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make(fail_max=3)
    await fail_n(breaker, 2)
    assert await breaker.call(ok) == "ok"
    assert breaker.statistics().consecutive_failures == 0
    await fail_n(breaker, 2)
    assert state(breaker) is CircuitState.CLOSED


async def test_failure_rate_needs_minimum_volume(autojump_clock: trio.testing.MockClock) -> None:
    breaker = make(fail_max=100, failure_rate_threshold=0.5, minimum_calls=10)
    # Nine failures in a row: a 100% failure rate, but below the minimum volume.
    await fail_n(breaker, 9)
    assert state(breaker) is CircuitState.CLOSED
    assert breaker.statistics().window_failures == 9
    # The tenth call of the window is a failure too: 10/10 >= 0.5 with volume.
    await fail_n(breaker, 1)
    assert state(breaker) is CircuitState.OPEN
    assert "failure rate 10/10" in breaker.reason


async def test_failure_rate_trips_at_the_threshold(autojump_clock: trio.testing.MockClock) -> None:
    breaker = make(fail_max=100, failure_rate_threshold=0.5, minimum_calls=10)
    for _ in range(6):
        await breaker.call(ok)
    await fail_n(breaker, 4)  # 4/10 < 0.5
    assert state(breaker) is CircuitState.CLOSED
    await fail_n(breaker, 1)  # 5/11 < 0.5
    assert state(breaker) is CircuitState.CLOSED
    await fail_n(breaker, 1)  # 6/12 >= 0.5
    assert state(breaker) is CircuitState.OPEN


async def test_failures_leave_the_rate_window(autojump_clock: trio.testing.MockClock) -> None:
    breaker = make(fail_max=100, failure_rate_threshold=0.5, minimum_calls=4, rate_window_s=10.0)
    await fail_n(breaker, 3)
    await trio.sleep(10)  # a whole window later the three failures are gone
    assert trio.current_time() == 10.0
    await fail_n(breaker, 1)
    assert breaker.statistics().window_calls == 1
    assert state(breaker) is CircuitState.CLOSED
    # Within one window they add up: 4 failures of 4 calls.
    await trio.sleep(3)
    await fail_n(breaker, 3)
    assert state(breaker) is CircuitState.OPEN


async def test_slow_calls_open_the_breaker(autojump_clock: trio.testing.MockClock) -> None:
    breaker = make(slow_call_s=2.0, slow_call_rate_threshold=0.5, minimum_calls=4, rate_window_s=60)
    await breaker.call(ok, 0.5)
    await breaker.call(ok, 0.5)
    await breaker.call(ok, 2.0)  # slow: 1 of 3, below the volume anyway
    assert state(breaker) is CircuitState.CLOSED
    assert breaker.statistics().window_slow == 1
    await breaker.call(ok, 1.999)  # fast: 1/4 < 0.5
    assert state(breaker) is CircuitState.CLOSED
    await breaker.call(ok, 3.0)  # slow: 2/5 < 0.5
    assert state(breaker) is CircuitState.CLOSED
    await breaker.call(ok, 2.0)  # slow: 3/6 >= 0.5
    assert state(breaker) is CircuitState.OPEN
    assert "slow-call rate 3/6" in breaker.reason
    assert trio.current_time() == 0.5 + 0.5 + 2 + 1.999 + 3 + 2


async def test_slow_failures_count_as_slow_too(autojump_clock: trio.testing.MockClock) -> None:
    breaker = make(fail_max=100, slow_call_s=1.0, slow_call_rate_threshold=1.0, minimum_calls=2)
    await fail_n(breaker, 2, after=1.0)
    assert state(breaker) is CircuitState.OPEN
    assert "slow-call" in breaker.reason


async def test_open_turns_half_open_after_exactly_reset_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make(fail_max=1, reset_timeout_s=10.0)
    await trio.sleep(2)
    await fail_n(breaker, 1)
    assert breaker.half_open_at() == 12.0
    await trio.sleep_until(12.0 - 1e-9)
    assert state(breaker) is CircuitState.OPEN
    await trio.sleep_until(12.0)
    assert state(breaker) is CircuitState.HALF_OPEN
    assert breaker.half_open_at() is None


async def test_wait_until_half_open_wakes_at_the_half_open_moment(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make(fail_max=1, reset_timeout_s=7.0)
    await fail_n(breaker, 1)
    await breaker.wait_until_half_open()
    assert trio.current_time() == 7.0
    assert state(breaker) is CircuitState.HALF_OPEN
    # Not open: returns at once.
    await breaker.wait_until_half_open()
    assert trio.current_time() == 7.0


async def test_wait_until_half_open_waits_out_forced_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make()
    breaker.force_open("incident 42")
    woke: list[float] = []

    async def waiter() -> None:
        await breaker.wait_until_half_open()
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(30)
        assert woke == []
        breaker.reset()
    assert woke == [30.0]


async def test_open_interval_grows_and_is_capped(autojump_clock: trio.testing.MockClock) -> None:
    breaker = make(
        fail_max=1, reset_timeout_s=1.0, reset_backoff_multiplier=3.0, reset_timeout_max_s=20.0
    )
    await fail_n(breaker, 1)
    intervals = []
    for _ in range(5):
        opened = trio.current_time()
        await breaker.wait_until_half_open()
        intervals.append(trio.current_time() - opened)
        await fail_n(breaker, 1)  # the probe fails: open again, for longer
    assert intervals == [1.0, 3.0, 9.0, 20.0, 20.0]
    assert breaker.statistics().trips == 6
    # A successful close starts the interval over.
    await breaker.wait_until_half_open()
    assert await breaker.call(ok) == "ok"
    assert state(breaker) is CircuitState.CLOSED
    await fail_n(breaker, 1)
    assert breaker.half_open_at() == trio.current_time() + 1.0


async def test_half_open_admits_n_probes_and_closes_when_all_succeed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make(fail_max=1, half_open_max_calls=2)
    await fail_n(breaker, 1)
    await breaker.wait_until_half_open()
    results: list[str] = []

    async def probe() -> None:
        results.append(await breaker.call(ok, 1.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(probe)
        nursery.start_soon(probe)
        await trio.testing.wait_all_tasks_blocked()
        assert breaker.statistics().probes_in_use == 2
        with pytest.raises(CircuitOpen) as refused:
            await breaker.call(ok)  # the third caller, while two probes are out
        assert refused.value.retry_after_s is None
    assert results == ["ok", "ok"]
    assert state(breaker) is CircuitState.CLOSED
    assert "2 probes succeeded" in breaker.reason


async def test_half_open_closes_only_after_all_probes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make(fail_max=1, half_open_max_calls=2)
    await fail_n(breaker, 1)
    await breaker.wait_until_half_open()
    await breaker.call(ok)
    assert state(breaker) is CircuitState.HALF_OPEN
    await breaker.call(ok)
    assert state(breaker) is CircuitState.CLOSED


async def test_a_failing_probe_reopens(autojump_clock: trio.testing.MockClock) -> None:
    breaker = make(fail_max=1, half_open_max_calls=3, reset_timeout_s=5.0)
    await fail_n(breaker, 1)
    await breaker.wait_until_half_open()
    await breaker.call(ok)
    await fail_n(breaker, 1)
    assert state(breaker) is CircuitState.OPEN
    assert breaker.reason.startswith("probe failed: ProviderUnavailable")
    assert breaker.half_open_at() == 5.0 + 10.0  # second trip: interval doubled


async def test_cancellation_never_counts_as_failure(autojump_clock: trio.testing.MockClock) -> None:
    breaker = make(fail_max=1, failure_rate_threshold=0.5, slow_call_rate_threshold=0.5)
    with trio.move_on_after(1.0) as scope:
        await breaker.call(down, 5.0)  # would fail, and trip, at t=5
    assert scope.cancelled_caught  # Cancelled came through unchanged
    assert trio.current_time() == 1.0
    assert state(breaker) is CircuitState.CLOSED
    stats = breaker.statistics()
    assert stats.consecutive_failures == 0
    assert stats.window_calls == 0


async def test_cancelled_probe_frees_its_slot_and_decides_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make(fail_max=1, half_open_max_calls=1)
    await fail_n(breaker, 1)
    await breaker.wait_until_half_open()
    with trio.move_on_after(1.0) as scope:
        await breaker.call(ok, 5.0)
    assert scope.cancelled_caught
    assert state(breaker) is CircuitState.HALF_OPEN
    assert breaker.statistics().probes_in_use == 0
    # The slot is free again: the next probe gets through and closes the breaker.
    assert await breaker.call(ok) == "ok"
    assert state(breaker) is CircuitState.CLOSED


async def test_load_shed_from_an_inner_layer_is_ignored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make(fail_max=1, half_open_max_calls=1)

    async def shed() -> None:
        raise BulkheadFull("inner", capacity=1, waited_s=0.0)

    with pytest.raises(BulkheadFull):
        await breaker.call(shed)
    assert state(breaker) is CircuitState.CLOSED
    await fail_n(breaker, 1)
    await breaker.wait_until_half_open()
    with pytest.raises(BulkheadFull):
        await breaker.call(shed)
    # Neither closed nor reopened; the probe slot is free.
    assert state(breaker) is CircuitState.HALF_OPEN
    assert breaker.statistics().probes_in_use == 0


async def test_is_failure_is_configurable(autojump_clock: trio.testing.MockClock) -> None:
    breaker = make(fail_max=1, is_failure=lambda exc: not isinstance(exc, Rejected))

    async def rejected() -> None:
        raise Rejected("bad number")

    for _ in range(3):
        with pytest.raises(Rejected):
            await breaker.call(rejected)
    assert state(breaker) is CircuitState.CLOSED
    await fail_n(breaker, 1)
    assert state(breaker) is CircuitState.OPEN


async def test_a_call_from_before_the_trip_is_not_a_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make(fail_max=1, reset_timeout_s=2.0, half_open_max_calls=1)
    outcome: list[str] = []

    async def long_call() -> None:
        outcome.append(await breaker.call(ok, 5.0))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_call)  # admitted at t=0 while CLOSED, done at t=5
        await trio.testing.wait_all_tasks_blocked()
        await fail_n(breaker, 1)  # trips at t=0; half-open at t=2
        await trio.sleep(3)
        assert state(breaker) is CircuitState.HALF_OPEN
        assert trio.current_time() == 3.0
    assert outcome == ["ok"]
    assert trio.current_time() == 5.0
    # The old call succeeding in HALF_OPEN did not close the breaker.
    assert state(breaker) is CircuitState.HALF_OPEN


async def test_forced_open_refuses_until_reset(autojump_clock: trio.testing.MockClock) -> None:
    breaker = make()
    breaker.force_open("provider asked us to stop")
    assert state(breaker) is CircuitState.FORCED_OPEN
    assert breaker.half_open_at() is None
    await trio.sleep(1000)
    with pytest.raises(CircuitOpen) as refused:
        await breaker.call(ok)
    assert refused.value.retry_after_s is None
    breaker.reset()
    assert await breaker.call(ok) == "ok"


async def test_disabled_passes_everything_and_records_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make(fail_max=1)
    breaker.disable()
    await fail_n(breaker, 5)
    assert state(breaker) is CircuitState.DISABLED
    assert breaker.statistics().window_calls == 0
    assert breaker.statistics().consecutive_failures == 0
    breaker.force_closed()
    assert state(breaker) is CircuitState.DISABLED


async def test_metrics_only_records_but_never_opens(autojump_clock: trio.testing.MockClock) -> None:
    metrics = Metrics()
    breaker = make(fail_max=1, failure_rate_threshold=0.1, minimum_calls=1, metrics=metrics)
    breaker.metrics_only()
    await fail_n(breaker, 4)
    await breaker.call(ok)
    assert state(breaker) is CircuitState.METRICS_ONLY
    stats = breaker.statistics()
    assert (stats.window_calls, stats.window_failures) == (5, 4)
    assert _sample(metrics, "triage_breaker_calls_total", outcome="failure") == 4
    assert _sample(metrics, "triage_breaker_state") == 5
    breaker.reset()
    assert breaker.statistics().window_calls == 0


async def test_state_changes_emit_events(autojump_clock: trio.testing.MockClock) -> None:
    bus = EventBus()
    seen: list[BreakerStateChanged] = []
    bus.on(BreakerStateChanged, lambda event: seen.append(event))  # type: ignore[arg-type]  # handler takes the subclass
    breaker = make(fail_max=2, reset_timeout_s=4.0, events=bus)
    await trio.sleep(1)
    await fail_n(breaker, 2)
    await breaker.wait_until_half_open()
    await breaker.call(ok)
    breaker.force_open("drill")
    breaker.metrics_only()
    breaker.disable()
    breaker.reset()
    assert [(e.old, e.new, e.at) for e in seen] == [
        ("closed", "open", 1.0),
        ("open", "half-open", 5.0),
        ("half-open", "closed", 5.0),
        ("closed", "forced-open", 5.0),
        ("forced-open", "metrics-only", 5.0),
        ("metrics-only", "disabled", 5.0),
        ("disabled", "closed", 5.0),
    ]
    assert seen[0].breaker == "sms"
    assert seen[0].reason == "2 consecutive failures, last ProviderUnavailable"
    assert seen[3].reason == "drill"


async def test_metrics_follow_state_and_count_rejections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = Metrics()
    breaker = make(fail_max=2, metrics=metrics, slow_call_s=1.0, slow_call_rate_threshold=1.0)
    assert _sample(metrics, "triage_breaker_state") == 0
    await breaker.call(ok, 1.0)
    await fail_n(breaker, 2)
    assert _sample(metrics, "triage_breaker_state") == 1
    for _ in range(3):
        with pytest.raises(CircuitOpen):
            await breaker.call(ok)
    assert _sample(metrics, "triage_breaker_calls_total", outcome="rejected") == 3
    assert _sample(metrics, "triage_breaker_calls_total", outcome="failure") == 2
    assert _sample(metrics, "triage_breaker_calls_total", outcome="slow") == 1
    assert _sample(metrics, "triage_breaker_transitions_total", to="open") == 1
    await breaker.wait_until_half_open()
    assert _sample(metrics, "triage_breaker_state") == 2
    breaker.force_open("x")
    assert _sample(metrics, "triage_breaker_state") == 3
    breaker.disable()
    assert _sample(metrics, "triage_breaker_state") == 4


async def test_pybreaker_holds_the_classic_state_and_tells_its_listeners(
    autojump_clock: trio.testing.MockClock,
) -> None:
    changes: list[tuple[str, str]] = []

    class Listener(pybreaker.CircuitBreakerListener):
        def state_change(
            self,
            cb: pybreaker.CircuitBreaker,
            old_state: pybreaker.CircuitBreakerState | None,
            new_state: pybreaker.CircuitBreakerState,
        ) -> None:
            changes.append((old_state.name if old_state else "", new_state.name))

    breaker = make(fail_max=2)
    breaker.circuit.add_listener(Listener())
    await fail_n(breaker, 1)
    assert breaker.circuit.fail_counter == 1
    await fail_n(breaker, 1)
    assert breaker.circuit.current_state == pybreaker.STATE_OPEN
    await breaker.wait_until_half_open()
    await breaker.call(ok)
    breaker.force_open("x")
    assert changes == [
        ("closed", "open"),
        ("open", "half-open"),
        ("half-open", "closed"),
        ("closed", "open"),
    ]


async def test_inline_api_matches_call(autojump_clock: trio.testing.MockClock) -> None:
    breaker = make(fail_max=1)
    start = breaker.before_call()
    assert start == 0.0
    await trio.sleep(1)
    breaker.on_success(start)
    start = breaker.before_call()
    breaker.on_failure(trio.Cancelled._create(), start)  # a Cancelled is never counted
    assert state(breaker) is CircuitState.CLOSED
    breaker.on_failure(ProviderUnavailable("x"), start)
    assert state(breaker) is CircuitState.OPEN
    with pytest.raises(CircuitOpen):
        breaker.before_call()


def test_constructor_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="fail_max"):
        make(fail_max=0)
    with pytest.raises(ValueError, match="reset_timeout_max_s"):
        make(reset_timeout_s=10.0, reset_timeout_max_s=5.0)
    with pytest.raises(ValueError, match="thresholds"):
        make(failure_rate_threshold=0.0)


def test_state_outside_trio_does_not_need_a_clock() -> None:
    breaker = make()
    assert state(breaker) is CircuitState.CLOSED
    assert breaker.half_open_at() is None
    assert breaker.statistics().half_open_at is None
    assert not math.isnan(breaker.open_interval_s(3))


def _sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"breaker": "sms", **labels})


async def test_a_long_call_lands_in_the_current_bucket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make(fail_max=100, failure_rate_threshold=0.9, minimum_calls=100, rate_window_s=10)

    async def long_call() -> None:
        await breaker.call(ok, 5.0)  # starts at t=0, succeeds at t=5

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_call)
        await fail_n(breaker, 1)
        await trio.sleep(4)
        await fail_n(breaker, 1)  # the window has moved on to t=4's bucket
    stats = breaker.statistics()
    assert (stats.window_calls, stats.window_failures) == (3, 2)


async def test_with_both_rate_rules_off_the_window_stays_empty(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make(fail_max=3)
    await breaker.call(ok)
    await fail_n(breaker, 2)
    await breaker.call(ok)
    assert breaker.statistics().window_calls == 0
    assert breaker.statistics().consecutive_failures == 0


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    steps=st.lists(st.tuples(st.integers(min_value=0, max_value=30), st.booleans()), max_size=60)
)
def test_window_counts_match_a_reference_model(steps: list[tuple[int, bool]]) -> None:
    """Bucketed window vs. brute force: calls whose bucket is within the last 10."""

    async def main() -> tuple[int, int, int, int]:
        breaker = make(failure_rate_threshold=0.5, rate_window_s=10.0)
        breaker.metrics_only()  # records everything, never trips
        seen: list[tuple[int, bool]] = []
        for gap, failed in steps:
            await trio.sleep(gap / 4)  # quarter-second steps, bucket width is 1 s
            start = breaker.before_call()
            if failed:
                breaker.on_failure(ProviderUnavailable("x"), start)
            else:
                breaker.on_success(start)
            seen.append((int(trio.current_time()), failed))
        stats = breaker.statistics()
        current = seen[-1][0] if seen else 0
        live = [failed for epoch, failed in seen if epoch > current - 10]
        return stats.window_calls, stats.window_failures, len(live), sum(live)

    calls, failures, want_calls, want_failures = trio.run(
        main, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    assert (calls, failures) == (want_calls, want_failures)


async def test_reset_of_a_closed_breaker_clears_its_counts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make(fail_max=3, failure_rate_threshold=0.9)
    await fail_n(breaker, 2)
    breaker.reset("operator")
    stats = breaker.statistics()
    assert (stats.consecutive_failures, stats.window_calls) == (0, 0)
    assert breaker.reason == "operator"
    await fail_n(breaker, 2)
    assert state(breaker) is CircuitState.CLOSED


async def test_failure_of_a_call_from_before_the_last_close_is_stale(
    autojump_clock: trio.testing.MockClock,
) -> None:
    breaker = make(fail_max=1, reset_timeout_s=1.0)

    async def long_failure() -> None:
        with pytest.raises(ProviderUnavailable):
            await breaker.call(down, 5.0)  # admitted at t=0, fails at t=5

    async with trio.open_nursery() as nursery:
        nursery.start_soon(long_failure)
        await trio.testing.wait_all_tasks_blocked()
        await fail_n(breaker, 1)  # trips at t=0
        await breaker.wait_until_half_open()
        await breaker.call(ok)  # closes at t=1
    assert trio.current_time() == 5.0
    assert state(breaker) is CircuitState.CLOSED
