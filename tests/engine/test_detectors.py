"""Detectors on the autojump clock: every fire and clear at an exact virtual time."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import pytest
import trio
import trio.testing

from engine.detectors import (
    AgeOfNewestDetector,
    CountInWindowDetector,
    Detector,
    DetectorKind,
    DetectorSet,
    DetectorState,
    GaugeSustainedDetector,
    Op,
    RateDetector,
    RatioDetector,
    SpikeOverBaselineDetector,
    make_detector,
)
from engine.errors import ConfigError
from engine.events import DetectorCleared, DetectorFired, Event, EventBus
from engine.metrics import Metrics

Transition = tuple[str, float, float]


def record(bus: EventBus) -> list[Transition]:
    """("fired" | "cleared", at, value) for every detector event on ``bus``."""
    seen: list[Transition] = []

    def handler(event: Event) -> None:
        assert isinstance(event, DetectorFired | DetectorCleared)
        kind = "fired" if isinstance(event, DetectorFired) else "cleared"
        seen.append((kind, event.at, event.value))

    bus.on(DetectorFired, handler)
    bus.on(DetectorCleared, handler)
    return seen


async def drive(
    end: float,
    step: float,
    *detectors: Detector,
    actions: Mapping[float, Callable[[], object]] | None = None,
) -> dict[float, DetectorState]:
    """From now to ``end`` every ``step``: run the action due, then evaluate.

    Returns the last detector's state at each tick, keyed by time.
    """
    start = trio.current_time()
    states: dict[float, DetectorState] = {}
    k = 0
    while (t := start + k * step) <= end:
        await trio.sleep_until(t)
        assert trio.current_time() == t
        if actions and t in actions:
            actions[t]()
        for detector in detectors:
            states[t] = detector.evaluate()
        k += 1
    return states


# -- rate ------------------------------------------------------------------------


async def test_rate_fires_and_clears_with_hysteresis(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = EventBus()
    seen = record(bus)
    rate = RateDetector(
        "dlr_rps",
        metric="dlr.callbacks",
        threshold=2.0,
        clear_threshold=1.0,
        window_s=4.0,
        buckets=4,
        events=bus,
    )
    states = await drive(
        7.0,
        0.25,
        rate,
        actions={
            0.0: lambda: rate.observe(9),  # 9 / 4 s = 2.25/s
            1.0: lambda: rate.observe(6),
            6.0: lambda: rate.observe(6),  # 1.5/s: between the thresholds, stays quiet
            6.5: lambda: rate.observe(3),  # 2.25/s again
        },
    )
    assert states[1.0].value == 15 / 4
    # At 4.0 the bucket of t=0 leaves the window: 1.5/s is above clear_threshold.
    assert states[3.75].value == 15 / 4
    assert states[4.0].value == 1.5 and states[4.0].firing
    assert states[4.75].firing
    assert states[5.0].value == 0.0 and not states[5.0].firing
    assert states[6.25].value == 1.5 and not states[6.25].firing
    assert seen == [("fired", 0.0, 2.25), ("cleared", 5.0, 0.0), ("fired", 6.5, 2.25)]


async def test_rate_under_reads_before_a_full_window(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rate = RateDetector("r", metric="m", threshold=1.0, window_s=10.0, buckets=5)
    await trio.sleep_until(1.0)
    rate.observe(5)
    assert rate.evaluate().value == 0.5  # divided by the whole window, never by 1 s


# -- count_in_window and the sliding window ------------------------------------------


async def test_window_forgets_at_the_exact_bucket_boundary(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = EventBus()
    seen = record(bus)
    count = CountInWindowDetector(
        "failed_sessions",
        metric="virtual_session.failed",
        threshold=1.5,
        clear_threshold=0.5,
        window_s=10.0,
        buckets=5,  # buckets [0,2), [2,4), ...
        events=bus,
        row=4,
    )
    states = await drive(
        16.0,
        0.25,
        count,
        actions={3.0: count.observe, 4.0: count.observe},
    )
    assert states[3.75].value == 1.0 and not states[3.75].firing
    assert states[4.0].value == 2.0 and states[4.0].firing
    # The observation at 3.0 sits in bucket [2,4): forgotten at 2 + 10 = 12, not 13.
    assert states[11.75].value == 2.0
    assert states[12.0].value == 1.0 and states[12.0].firing  # hysteresis holds
    # The one at 4.0 sits in bucket [4,6): forgotten at 14.
    assert states[13.75].value == 1.0
    assert states[14.0].value == 0.0 and not states[14.0].firing
    assert seen == [("fired", 4.0, 2.0), ("cleared", 14.0, 0.0)]


async def test_window_survives_a_long_gap(autojump_clock: trio.testing.MockClock) -> None:
    count = CountInWindowDetector("c", metric="m", threshold=3.0, window_s=4.0, buckets=4)
    count.observe(7)
    await trio.sleep_until(1000.5)
    assert count.evaluate().value == 0.0
    count.observe(2)
    assert count.evaluate().value == 2.0


async def test_for_s_delays_a_windowed_detector_exactly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bus = EventBus()
    seen = record(bus)
    count = CountInWindowDetector(
        "scan_backlog",
        metric="scan.queued",
        threshold=3.0,
        window_s=10.0,
        buckets=10,
        for_s=2.5,
        events=bus,
    )
    states = await drive(8.0, 0.5, count, actions={1.25 + 0.25: lambda: count.observe(5)})
    # First seen above the threshold at 1.5, so it fires at 1.5 + 2.5.
    assert states[1.5].pending_since == 1.5 and not states[1.5].firing
    assert not states[3.5].firing
    assert states[4.0].firing and states[4.0].pending_since is None
    assert seen == [("fired", 4.0, 5.0)]


# -- ratio -------------------------------------------------------------------------


async def test_ratio_below_min_volume_never_fires(autojump_clock: trio.testing.MockClock) -> None:
    bus = EventBus()
    seen = record(bus)
    errors = RatioDetector(
        "sms_primary_errors",
        metric="sms.primary.error_ratio",
        threshold=0.2,
        clear_threshold=0.1,
        window_s=60.0,
        buckets=6,
        min_volume=5,
        events=bus,
        row=1,
    )

    def outcomes(hit: bool, n: int) -> Callable[[], None]:
        def feed() -> None:
            for _ in range(n):
                errors.observe(hit)

        return feed

    def fail(n: int) -> Callable[[], None]:
        return outcomes(True, n)

    def succeed(n: int) -> Callable[[], None]:
        return outcomes(False, n)

    states = await drive(
        80.0,
        1.0,
        errors,
        actions={1.0: fail(4), 2.0: succeed(1), 70.0: succeed(4), 71.0: succeed(1)},
    )
    # Four failures out of four: a ratio of 1.0, but below min_volume.
    assert states[1.0].value == 1.0
    assert not states[1.0].evaluable and not states[1.0].firing
    assert states[2.0].value == 0.8 and states[2.0].evaluable and states[2.0].firing
    # At 60 the window is empty: the value is undefined and the detector holds.
    assert math.isnan(states[60.0].value) and states[60.0].firing
    assert not states[60.0].evaluable
    # Four successes: a healthy value, still below min_volume: holds.
    assert states[70.0].value == 0.0 and states[70.0].firing
    assert states[71.0].evaluable and not states[71.0].firing
    assert seen == [("fired", 2.0, 0.8), ("cleared", 71.0, 0.0)]


async def test_ratio_without_data_never_fires_even_with_zero_min_volume(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hits = RatioDetector(
        "cache_hits", metric="m", op="lt", threshold=0.9, window_s=10.0, buckets=10
    )
    state = hits.evaluate()
    assert math.isnan(state.value) and not state.evaluable and not state.firing


async def test_ratio_lt_cache_hit_ratio(autojump_clock: trio.testing.MockClock) -> None:
    bus = EventBus()
    seen = record(bus)
    hits = RatioDetector(
        "idempotency_cache",
        metric="redis.hit_ratio",
        op=Op.LT,
        threshold=0.9,
        clear_threshold=0.95,
        window_s=10.0,
        buckets=10,
        min_volume=10,
        events=bus,
        row=7,
    )
    states = await drive(
        3.0,
        0.5,
        hits,
        actions={
            0.0: lambda: hits.observe_ratio(10, 10),
            0.5: lambda: hits.observe_ratio(0, 2),  # 10/12
            1.0: lambda: hits.observe_ratio(8, 8),  # 18/20 = 0.9: not back to 0.95
            2.0: lambda: hits.observe_ratio(20, 20),  # 38/40 = 0.95
        },
    )
    assert not states[0.0].firing
    assert states[0.5].firing
    assert states[1.5].value == 0.9 and states[1.5].firing
    assert seen == [("fired", 0.5, 10 / 12), ("cleared", 2.0, 0.95)]


async def test_ratio_fed_from_two_sides(autojump_clock: trio.testing.MockClock) -> None:
    bounces = RatioDetector(
        "bounces", metric="m", threshold=0.05, window_s=100.0, buckets=10, min_volume=20
    )
    bounces.observe_ratio(0, 40)  # sends
    bounces.observe_ratio(1, 0)  # a bounce, later
    assert bounces.evaluate().value == 1 / 40
    bounces.observe_ratio(2, 0)
    assert bounces.evaluate().firing
    with pytest.raises(ValueError, match="increments"):
        bounces.observe_ratio(-1, 0)


# -- gauge_sustained -----------------------------------------------------------------


async def test_gauge_sustained_for_s_is_exact(autojump_clock: trio.testing.MockClock) -> None:
    bus = EventBus()
    seen = record(bus)
    queue = GaugeSustainedDetector(
        "scan_queue",
        metric="scan.queue_depth",
        threshold=1000.0,
        clear_threshold=800.0,
        for_s=15.0,
        events=bus,
        row=8,
    )
    states = await drive(
        60.0,
        0.25,
        queue,
        actions={
            2.0: lambda: queue.set(1500),
            20.0: lambda: queue.set(900),  # between the thresholds: holds
            21.0: lambda: queue.set(700),
            30.0: lambda: queue.set(1200),
            35.5: lambda: queue.set(950),  # dips under the threshold...
            35.75: lambda: queue.set(1100),  # ...and the sustain period starts over
        },
    )
    assert not states[0.0].evaluable
    assert states[16.75].pending_since == 2.0 and not states[16.75].firing
    assert states[17.0].firing
    assert states[20.0].firing
    assert states[35.75].pending_since == 35.75
    assert not states[50.5].firing
    assert seen == [
        ("fired", 17.0, 1500.0),
        ("cleared", 21.0, 700.0),
        ("fired", 50.75, 1100.0),
    ]


async def test_gauge_dip_between_evaluations_restarts_the_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gauge = GaugeSustainedDetector("g", metric="m", threshold=10.0, for_s=5.0)
    states = await drive(
        12.0,
        1.0,
        gauge,
        actions={0.0: lambda: gauge.set(20)},
    )
    assert states[5.0].firing
    gauge2 = GaugeSustainedDetector("g2", metric="m", threshold=10.0, for_s=5.0)
    gauge2.set(20)
    await trio.sleep_until(14.5)
    gauge2.set(5)  # never seen by an evaluation
    await trio.sleep_until(14.75)
    gauge2.set(20)
    await trio.sleep_until(19.5)
    assert not gauge2.evaluate().firing
    await trio.sleep_until(19.75)
    assert gauge2.evaluate().firing


async def test_one_event_per_transition(autojump_clock: trio.testing.MockClock) -> None:
    bus = EventBus()
    seen = record(bus)
    gauge = GaugeSustainedDetector(
        "wobble", metric="m", threshold=5.0, clear_threshold=2.0, events=bus
    )
    changes = []
    for i, value in enumerate([6, 4, 6, 3, 7, 5, 2, 1, 6]):
        await trio.sleep_until(float(i))
        gauge.set(value)
        for _ in range(3):  # evaluating again changes nothing
            changes.append(gauge.evaluate().changed)
    assert seen == [("fired", 0.0, 6.0), ("cleared", 6.0, 2.0), ("fired", 8.0, 6.0)]
    assert changes.count(True) == 3


# -- age_of_newest -------------------------------------------------------------------


async def test_age_of_newest_fires_and_clears(autojump_clock: trio.testing.MockClock) -> None:
    bus = EventBus()
    seen = record(bus)
    feedback = AgeOfNewestDetector(
        "push_feedback",
        metric="push.feedback_age_s",
        threshold=10.0,
        clear_threshold=5.0,
        events=bus,
        row=2,
    )  # created at 0: the age counts from here
    states = await drive(14.0, 0.5, feedback, actions={11.5: feedback.touch})
    assert states[10.0].value == 10.0 and not states[10.0].firing  # not above yet
    assert states[10.5].firing
    assert states[11.5].value == 0.0 and not states[11.5].firing
    assert seen == [("fired", 10.5, 10.5), ("cleared", 11.5, 0.0)]


async def test_age_of_oldest_pending(autojump_clock: trio.testing.MockClock) -> None:
    lag = AgeOfNewestDetector("outbox_lag", metric="outbox.lag_s", threshold=30.0)
    await trio.sleep_until(100.0)
    lag.set_oldest(None)
    assert lag.evaluate().value == 0.0
    lag.set_oldest(60.0)
    assert lag.evaluate().value == 40.0 and lag.firing
    lag.set_age(12.5)
    assert lag.evaluate().value == 12.5 and not lag.firing


def test_age_starts_at_first_contact_outside_trio() -> None:
    detector = AgeOfNewestDetector("late", metric="m", threshold=1.0)

    async def main() -> tuple[float, float]:
        await trio.sleep_until(5.0)
        first = detector.evaluate().value
        await trio.sleep_until(8.0)
        return first, detector.evaluate().value

    clock = trio.testing.MockClock(autojump_threshold=0)
    assert trio.run(main, clock=clock) == (0.0, 3.0)


# -- spike_over_baseline -----------------------------------------------------------


def spike(**overrides: object) -> SpikeOverBaselineDetector:
    spec: dict[str, object] = {
        "metric": "dlr.callbacks",
        "threshold": 10.0,
        "clear_threshold": 2.0,
        "window_s": 4.0,
        "buckets": 4,  # 1 s buckets
        "baseline_alpha": 0.5,
        "min_volume": 3,  # warm-up: three buckets folded into the baseline
    }
    spec.update(overrides)
    detector = make_detector("dlr_spike", kind="spike_over_baseline", **spec)  # type: ignore[arg-type]  # test spec
    return detector.expect(SpikeOverBaselineDetector)


async def test_spike_fires_at_ten_times_baseline(autojump_clock: trio.testing.MockClock) -> None:
    bus = EventBus()
    seen = record(bus)
    flood = spike(events=bus, row=13)
    actions: dict[float, Callable[[], object]] = {
        k + 0.5: lambda: flood.observe(2) for k in range(16)
    }
    states = await drive(10.25, 0.25, flood, actions=actions)
    # Bucket [0,1) leaves the window at 4 and seeds the baseline; warm at 6.
    assert flood.baseline == 2.0
    assert not states[3.75].evaluable and states[4.0].value == (3 * 2 / 4) / 2.0
    assert not states[5.75].evaluable and states[6.0].evaluable
    assert states[10.25].value == (6 / 4) / 2.0
    await trio.sleep_until(10.5)
    flood.observe(2)
    flood.observe(72)  # window: 2+2+2+74 = 80 → 20/s = exactly 10x: not above
    assert flood.evaluate().value == 10.0 and not flood.firing
    flood.observe(1)
    state = flood.evaluate()
    assert state.firing and state.value == 81 / 4 / 2.0
    assert flood.warm_buckets == 7  # buckets [0,1) .. [6,7)
    # The flood bucket [10,11) leaves at 14; while firing nothing is folded.
    await trio.sleep_until(10.75)
    states = await drive(14.0, 0.25, flood, actions=actions)
    assert states[13.75].firing
    assert not states[14.0].firing
    assert flood.baseline == 2.0 and flood.warm_buckets == 7
    await trio.sleep_until(15.0)
    flood.evaluate()
    assert flood.warm_buckets == 8  # quiet again: folding resumes
    assert seen == [("fired", 10.5, 81 / 8), ("cleared", 14.0, 6 / 8)]


async def test_spike_needs_warm_up(autojump_clock: trio.testing.MockClock) -> None:
    bus = EventBus()
    seen = record(bus)
    flood = spike(events=bus)
    actions: dict[float, Callable[[], object]] = {
        k + 0.5: lambda: flood.observe(2) for k in range(8)
    }
    actions[5.5] = lambda: flood.observe(502)
    states = await drive(6.0, 0.25, flood, actions=actions)
    assert flood.warm_buckets == 3
    # Two buckets folded at 5.5: the flood is visible but cannot fire yet.
    assert states[5.5].value == (2 + 2 + 2 + 502) / 4 / 2.0
    assert not states[5.5].evaluable and not states[5.5].firing
    assert states[6.0].firing  # the third bucket folds at 6: warm, and at once it fires
    assert seen == [("fired", 6.0, (2 + 2 + 502) / 4 / 2.0)]


async def test_spike_baseline_is_an_ewma(autojump_clock: trio.testing.MockClock) -> None:
    flood = spike()
    flood.observe(2)  # bucket [0,1)
    await trio.sleep_until(1.5)
    flood.observe(4)  # bucket [1,2)
    await trio.sleep_until(4.0)
    flood.evaluate()
    assert flood.baseline == 2.0  # seeded by the first bucket
    await trio.sleep_until(5.0)
    flood.evaluate()
    assert flood.baseline == 0.5 * 4 + 0.5 * 2
    await trio.sleep_until(6.0)
    flood.evaluate()
    assert flood.baseline == 0.5 * 0 + 0.5 * 3
    # A long silence decays the baseline as if every empty bucket had been folded.
    await trio.sleep_until(16.0)
    flood.evaluate()
    assert flood.baseline == 1.5 * 0.5**10
    assert flood.warm_buckets == 13


async def test_spike_with_zero_baseline_is_not_evaluable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flood = spike()
    await trio.sleep_until(10.0)
    flood.observe(100)
    state = flood.evaluate()
    assert flood.baseline == 0.0
    assert math.isnan(state.value) and not state.evaluable and not state.firing


# -- metrics -----------------------------------------------------------------------


async def test_metrics_gauges(autojump_clock: trio.testing.MockClock) -> None:
    metrics = Metrics()

    def sample(name: str) -> float | None:
        return metrics.registry.get_sample_value(name, {"detector": "sms_errors"})

    errors = RatioDetector(
        "sms_errors",
        metric="m",
        threshold=0.2,
        window_s=10.0,
        buckets=10,
        metrics=metrics,
    )
    assert sample("triage_detector_firing") == 0.0
    value = sample("triage_detector_value")
    assert value is not None and math.isnan(value)
    for outcome in (True, True, False, True, False):
        errors.observe(outcome)
    errors.evaluate()
    assert sample("triage_detector_firing") == 1.0
    assert sample("triage_detector_value") == 0.6
    await trio.sleep_until(10.0)
    for _ in range(4):
        errors.observe(False)
    errors.evaluate()
    assert sample("triage_detector_firing") == 0.0
    assert sample("triage_detector_value") == 0.0


# -- DetectorSet -------------------------------------------------------------------


async def test_detector_set_run_ticks_and_hooks(autojump_clock: trio.testing.MockClock) -> None:
    bus = EventBus()
    seen = record(bus)
    detectors = DetectorSet()
    sms = detectors.add(
        RateDetector(
            "sms_errors", metric="m", threshold=1.0, window_s=2.0, buckets=2, row=1, events=bus
        )
    )
    rooms = detectors.add(
        CountInWindowDetector(
            "room_failures", metric="m", threshold=2.0, window_s=10.0, buckets=5, row=4
        )
    )
    row1_fired: list[DetectorState] = []
    any_fired: list[str] = []
    cleared: list[tuple[str, float]] = []
    detectors.on_fire(row1_fired.append, row=1)
    stop_any = detectors.on_fire(lambda s: any_fired.append(s.name))
    detectors.on_clear(lambda s: cleared.append((s.name, s.at)))

    def broken(state: DetectorState) -> None:
        raise RuntimeError("mitigation failed")

    sms.on_fire(broken)

    async with trio.open_nursery() as nursery:
        await nursery.start(detectors.run, 0.5)
        assert detectors.ticks == 1 and trio.current_time() == 0.0
        await trio.sleep_until(1.25)
        sms.observe(3)  # 1.5/s, seen by the tick at 1.5
        await trio.sleep_until(2.25)
        assert detectors.ticks == 5  # 0, 0.5, 1, 1.5, 2
        assert [s.at for s in row1_fired] == [1.5]
        assert row1_fired[0].name == "sms_errors" and row1_fired[0].row == 1
        assert sms.hook_errors == 1
        stop_any()
        rooms.observe(3)
        await trio.sleep_until(4.25)
        assert rooms.firing
        assert any_fired == ["sms_errors"]  # unsubscribed before rooms fired
        # A detector added later gets the set's hooks too.
        late = detectors.add(GaugeSustainedDetector("late_gauge", metric="m", threshold=1.0, row=1))
        late.set(5.0)
        await trio.sleep_until(4.75)
        assert [s.name for s in row1_fired] == ["sms_errors", "late_gauge"]
        assert row1_fired[1].at == 4.5
        nursery.cancel_scope.cancel()
    # sms: bucket [1,2) leaves the 2 s window at 3.0.
    assert cleared == [("sms_errors", 3.0)]
    assert seen == [("fired", 1.5, 1.5), ("cleared", 3.0, 0.0)]
    assert detectors.ticks == 10
    assert [d.name for d in detectors.for_row(1)] == ["sms_errors", "late_gauge"]
    assert {d.name for d in detectors.firing()} == {"room_failures", "late_gauge"}
    assert "rooms" not in detectors and "room_failures" in detectors
    assert detectors["room_failures"] is rooms and len(detectors) == 3


async def test_detector_set_evaluate_all_and_names() -> None:
    a = CountInWindowDetector("a", metric="m", threshold=0.0, window_s=1.0, buckets=1)
    b = CountInWindowDetector("b", metric="m", threshold=0.0, window_s=1.0, buckets=1)
    detectors = DetectorSet([a, b])
    b.observe()
    assert [(s.name, s.firing) for s in detectors.evaluate_all()] == [("a", False), ("b", True)]
    with pytest.raises(ValueError, match="already"):
        detectors.add(
            CountInWindowDetector("a", metric="m", threshold=1.0, window_s=1.0, buckets=1)
        )
    with pytest.raises(ConfigError, match="tick_s"):
        await detectors.run(0.0)


# -- construction ------------------------------------------------------------------

FULL_SPEC: dict[str, object] = {
    "metric": "m",
    "op": "gt",
    "threshold": 1.0,
    "clear_threshold": None,
    "window_s": 60.0,
    "buckets": 6,
    "min_volume": 0,
    "for_s": 0.0,
    "baseline_alpha": 0.2,
}


@pytest.mark.parametrize(
    ("kind", "cls"),
    [
        ("rate", RateDetector),
        ("ratio", RatioDetector),
        ("count_in_window", CountInWindowDetector),
        ("age_of_newest", AgeOfNewestDetector),
        ("gauge_sustained", GaugeSustainedDetector),
        ("spike_over_baseline", SpikeOverBaselineDetector),
    ],
)
def test_make_detector_builds_every_kind(kind: str, cls: type[Detector]) -> None:
    detector = make_detector("d", kind=kind, row=3, **FULL_SPEC)  # type: ignore[arg-type]  # test spec
    assert type(detector) is cls and detector.kind == DetectorKind(kind)
    assert detector.row == 3 and detector.clear_threshold == 1.0 and not detector.firing
    assert detector.expect(cls) is detector


def test_expect_names_the_configured_kind() -> None:
    detector = make_detector(
        "bounce", kind="rate", metric="m", threshold=1.0, window_s=1, buckets=1
    )
    with pytest.raises(ConfigError, match="'bounce' is configured as kind 'rate'"):
        detector.expect(RatioDetector)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "median"}, "kind must be one of"),
        ({"op": "ge"}, "op must be one of"),
        ({"clear_threshold": 2.0}, "must not exceed threshold"),
        ({"op": "lt", "clear_threshold": 0.5}, "must not be below threshold"),
        ({"threshold": math.inf}, "threshold must be a finite"),
        ({"window_s": None}, "needs window_s > 0"),
        ({"window_s": 0.0}, "needs window_s > 0"),
        ({"buckets": 0}, "buckets >= 1"),
        ({"buckets": 2.5}, "buckets >= 1"),
        ({"min_volume": -1}, "min_volume"),
        ({"for_s": -1.0}, "for_s must be >= 0"),
        ({"kind": "spike_over_baseline", "baseline_alpha": 0.0}, "baseline_alpha"),
        ({"kind": "spike_over_baseline", "baseline_alpha": None}, "baseline_alpha"),
    ],
)
def test_bad_specs_are_config_errors(overrides: dict[str, object], message: str) -> None:
    spec = {"kind": "rate", **FULL_SPEC, **overrides}
    with pytest.raises(ConfigError, match=message):
        make_detector("bad", **spec)  # type: ignore[arg-type]  # test spec


def test_windowless_kinds_ignore_window_fields() -> None:
    gauge = make_detector("g", kind="gauge_sustained", metric="m", threshold=1.0)
    assert isinstance(gauge, GaugeSustainedDetector) and gauge.window_s is None


def test_constructor_kind_must_match_class() -> None:
    with pytest.raises(ConfigError, match="kind 'ratio' given to a rate detector"):
        RateDetector("r", kind="ratio", metric="m", threshold=1.0, window_s=1.0, buckets=1)


async def test_negative_counts_are_refused() -> None:
    rate = RateDetector("r", metric="m", threshold=1.0, window_s=1.0, buckets=1)
    with pytest.raises(ValueError, match="count"):
        rate.observe(-1)
