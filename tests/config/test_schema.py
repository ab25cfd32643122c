"""The schema on its own: constraints and cross-field rules, decoded with msgspec."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from config import (
    BreakerConfig,
    BulkheadConfig,
    DetectorConfig,
    MailboxConfig,
    RetryConfig,
    SupervisorConfig,
    TriageConfig,
    engine_kwargs,
)

BREAKER: dict[str, Any] = {
    "fail_max": 5,
    "reset_timeout_s": 30,
    "reset_timeout_max_s": 300,
    "reset_backoff_multiplier": 2,
    "failure_rate_threshold": 0.5,
    "rate_window_s": 60,
    "minimum_calls": 20,
    "slow_call_s": 5,
    "slow_call_rate_threshold": 0.8,
    "half_open_max_calls": 1,
}


def test_integers_are_accepted_for_float_fields() -> None:
    breaker = msgspec.convert(BREAKER, BreakerConfig)
    assert breaker.reset_timeout_s == 30.0
    assert isinstance(breaker.reset_timeout_s, float)
    assert breaker.base is None


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("fail_max", 0, "Expected `int` >= 1"),
        ("reset_timeout_s", 0, "Expected `float` > 0.0"),
        ("reset_backoff_multiplier", 0.5, "Expected `float` >= 1.0"),
        ("failure_rate_threshold", 1.5, "Expected `float` <= 1.0"),
        ("failure_rate_threshold", 0, "Expected `float` > 0.0"),
        ("half_open_max_calls", True, "Expected `int`, got `bool`"),
        ("minimum_calls", 2.5, "Expected `int`, got `float`"),
    ],
)
def test_breaker_constraints(key: str, value: object, expected: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=expected):
        msgspec.convert({**BREAKER, key: value}, BreakerConfig)


def test_breaker_reset_cap_below_interval_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"^reset_timeout_max_s: must be >="):
        msgspec.convert({**BREAKER, "reset_timeout_max_s": 10}, BreakerConfig)


def test_unknown_field_is_refused() -> None:
    with pytest.raises(msgspec.ValidationError, match="unknown field `fail_maxx`"):
        msgspec.convert({**BREAKER, "fail_maxx": 1}, BreakerConfig)


def test_structs_are_frozen_and_keyword_only() -> None:
    mailbox = MailboxConfig(capacity=10, overflow="wait")
    with pytest.raises(AttributeError):
        mailbox.capacity = 5  # type: ignore[misc]  # proving the struct is frozen
    with pytest.raises(TypeError):
        MailboxConfig(10, "wait")  # type: ignore[call-arg, arg-type]  # proving the struct is keyword-only


def test_bulkhead_partition_cannot_exceed_capacity() -> None:
    raw = {"capacity": 4, "max_wait_s": 0, "max_partitions": 10, "partition_capacity": 5}
    with pytest.raises(msgspec.ValidationError, match=r"^partition_capacity: must be <= capacity"):
        msgspec.convert(raw, BulkheadConfig)


def test_retry_and_supervisor_backoff_bounds() -> None:
    retry = {
        "max_attempts": 3,
        "time_budget_s": 10,
        "backoff_initial_s": 1,
        "backoff_max_s": 0.5,
        "backoff_multiplier": 2,
        "jitter": 0,
    }
    with pytest.raises(msgspec.ValidationError, match=r"^backoff_max_s: "):
        msgspec.convert(retry, RetryConfig)
    supervisor = {
        "strategy": "one_for_one",
        "max_restarts": 0,
        "period_s": 5,
        "backoff_min_s": 2,
        "backoff_max_s": 1,
        "backoff_random_factor": 0,
        "backoff_reset_s": 10,
        "max_children": 1,
        "shutdown_s": 1,
    }
    with pytest.raises(msgspec.ValidationError, match=r"^backoff_max_s: "):
        msgspec.convert(supervisor, SupervisorConfig)
    supervisor["backoff_max_s"] = 2
    assert msgspec.convert(supervisor, SupervisorConfig).max_restarts == 0


DETECTOR: dict[str, Any] = {"kind": "ratio", "metric": "m_ratio", "threshold": 0.2, "window_s": 60}


def test_detector_defaults() -> None:
    detector = msgspec.convert(DETECTOR, DetectorConfig)
    assert detector.op == "gt"
    assert detector.clear_threshold is None
    assert detector.effective_clear_threshold == 0.2
    assert (detector.min_volume, detector.for_s, detector.baseline_alpha, detector.buckets) == (
        0,
        0.0,
        0.1,
        60,
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"clear_threshold": 0.3}, "^clear_threshold: must be <= threshold"),
        ({"op": "lt", "clear_threshold": 0.1}, "^clear_threshold: must be >= threshold"),
        ({"threshold": 1.5}, "^threshold: a ratio must be within"),
        ({"kind": "rate", "threshold": -1}, "^threshold: must be >= 0"),
        ({"kind": "age_of_newest", "op": "lt"}, "^op: age_of_newest only supports"),
        ({"kind": "spike_over_baseline", "threshold": 0}, "^threshold: a spike factor"),
        ({"kind": "rate", "min_volume": 3}, "^min_volume: only ratio and spike_over_baseline"),
        ({"kind": "latency"}, "Invalid enum value 'latency'"),
        ({"baseline_alpha": 0}, "Expected `float` > 0.0"),
        ({"buckets": 0}, "Expected `int` >= 1"),
    ],
)
def test_detector_rules(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert({**DETECTOR, **extra}, DetectorConfig)


def test_detector_hysteresis_in_the_right_direction_is_accepted() -> None:
    low = msgspec.convert({**DETECTOR, "clear_threshold": 0.1}, DetectorConfig)
    assert low.effective_clear_threshold == 0.1
    high = msgspec.convert({**DETECTOR, "op": "lt", "clear_threshold": 0.3}, DetectorConfig)
    assert high.effective_clear_threshold == 0.3


def test_engine_kwargs_drop_the_profile_base() -> None:
    breaker = msgspec.convert({**BREAKER, "base": "default"}, BreakerConfig)
    kwargs = engine_kwargs(breaker)
    assert "base" not in kwargs
    assert kwargs["fail_max"] == 5
    assert set(kwargs) == set(BREAKER)


def test_root_defaults() -> None:
    daemon = {"drain_s": 25, "max_label_values": 10, "detector_tick_s": 1}
    config = msgspec.convert({"daemon": daemon}, TriageConfig)
    assert (config.daemon.host, config.daemon.port, config.daemon.log_level) == (
        "127.0.0.1",
        8080,
        "info",
    )
    assert config.catalog == "failures.toml"
    assert config.services.postgres_url is None
    assert config.breakers == {}
