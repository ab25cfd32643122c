"""Live tuning (a config reload): breakers and detectors change thresholds and windows in
place and keep their state and counts; on the autojump clock with exact counts."""

from __future__ import annotations

import pytest
import trio

from engine.breaker import CircuitState
from engine.detectors import CountInWindowDetector, RatioDetector
from engine.errors import ConfigError
from tests.engine.test_breaker import fail_n, make


async def test_a_lower_fail_max_takes_effect_with_the_failures_already_counted() -> None:
    breaker = make(fail_max=5)
    await fail_n(breaker, 3)
    assert breaker.state is CircuitState.CLOSED
    assert breaker.retune(fail_max=4) == ["breaker sms: fail_max 5 -> 4"]
    await fail_n(breaker, 1)  # the fourth failure: counted with the three before the reload
    assert breaker.state is CircuitState.OPEN


async def test_a_half_open_breaker_stays_half_open_and_invalid_values_change_nothing() -> None:
    breaker = make(fail_max=1, reset_timeout_s=10.0)
    await fail_n(breaker, 1)
    await trio.sleep(10.0)
    assert breaker.state is CircuitState.HALF_OPEN
    assert breaker.retune(fail_max=3, reset_timeout_s=20.0, reset_timeout_max_s=80.0) == [
        "breaker sms: fail_max 1 -> 3",
        "breaker sms: reset_timeout_s 10.0 -> 20.0",
        "breaker sms: reset_timeout_max_s 60.0 -> 80.0",
    ]
    assert breaker.state is CircuitState.HALF_OPEN
    before = breaker.settings()
    with pytest.raises(ValueError, match="fail_max must be >= 1"):
        breaker.retune(fail_max=0, minimum_calls=3)
    with pytest.raises(ValueError, match="not tunable: name"):
        breaker.retune(name="x")
    assert breaker.settings() == before
    assert breaker.retune(fail_max=3) == []  # nothing changed, nothing said


async def test_a_resized_rate_window_keeps_its_calls() -> None:
    breaker = make(failure_rate_threshold=0.5, minimum_calls=4, fail_max=100)
    await fail_n(breaker, 3)
    [line] = breaker.retune(rate_window_s=20.0)
    assert (
        line
        == "breaker sms: rate_window_s 10.0 -> 20.0 (the 3 calls in the window kept, spread over 20.0s)"
    )
    await fail_n(breaker, 1)  # 4 calls, 4 failures in the window: the rate rule trips
    assert breaker.state is CircuitState.OPEN


async def test_a_detector_threshold_changes_with_its_window_counts_kept() -> None:
    count = CountInWindowDetector("c", metric="m", threshold=10.0, window_s=60.0, buckets=6)
    count.observe(8)
    assert not count.evaluate().firing
    assert count.retune(threshold=5.0) == [
        "detector c: threshold 10.0 -> 5.0",
        "detector c: clear_threshold 10.0 -> 5.0",
    ]
    state = count.evaluate()
    assert state.firing and state.value == 8.0
    # Firing stays firing across a reload that raises the threshold again (hysteresis
    # decides at the next evaluation, as with any value).
    count.retune(threshold=20.0, clear_threshold=7.0)
    assert count.firing
    assert count.evaluate().firing is True  # 8 > clear 7: not cleared yet


async def test_a_reshaped_window_moves_its_counts_by_time() -> None:
    count = CountInWindowDetector("c", metric="m", threshold=100.0, window_s=60.0, buckets=6)
    await trio.sleep(5.0)
    count.observe(3)  # bucket [0, 10)
    await trio.sleep(30.0)
    count.observe(4)  # bucket [30, 40)
    await trio.sleep(15.0)  # now 50
    changes = count.retune(window_s=30.0, buckets=3)
    assert changes[-1] == (
        "detector c: window reshaped to 30.0s in 3 buckets; 4 of 7 counted events kept"
    )
    assert count.evaluate().value == 4.0
    await trio.sleep(20.0)  # now 70: the [30, 40) bucket leaves the 30 s window
    assert count.evaluate().value == 0.0


async def test_kind_or_metric_changes_need_a_restart() -> None:
    ratio = RatioDetector("r", metric="m_ratio", threshold=0.5, window_s=10.0, buckets=10,
                          min_volume=5)  # fmt: skip
    with pytest.raises(ConfigError, match="metric 'm_ratio' -> 'other_ratio' needs a restart"):
        ratio.retune(metric="other_ratio")
    with pytest.raises(ConfigError, match="clear_threshold"):
        ratio.retune(clear_threshold=0.9)  # above the threshold with op gt
    assert ratio.retune(min_volume=20, kind="ratio") == ["detector r: min_volume 5 -> 20"]
