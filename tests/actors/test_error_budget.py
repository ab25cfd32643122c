"""The error budget: its arithmetic (exact, on hand-made counts) and the actor on real
PostgreSQL, counting what the dispatches trigger sampled."""

from __future__ import annotations

import math
from datetime import date, datetime, timedelta
from functools import partial

import msgspec
import pytest
import trio
from prometheus_client import CollectorRegistry

from actors.error_budget import BudgetFrozen, ErrorBudget, budget_report, check_freeze
from config.schema import SloConfig
from engine.actor import actor_child
from engine.supervisor import Supervisor
from providers.db.pool import DbPool
from providers.db.slo import AppliedConfig, DayCount, WindowCount
from tests.providers.test_slo_db import World, _dispatch, world  # noqa: F401 (fixture)

TODAY = date(2026, 12, 3)


def _day(days_ago: int, good: int, bad: int, slo: str = "dispatch_success") -> DayCount:
    return DayCount(slo, TODAY - timedelta(days=days_ago), good, bad)


def _success(config: SloConfig, *days: DayCount, windows: tuple[WindowCount, ...] = ()):  # type: ignore[no-untyped-def]
    report = budget_report(config, days, windows, today=TODAY)
    return report, next(s for s in report.slos if s.slo == "dispatch_success")


def test_no_events_no_budget_no_burn() -> None:
    report, s = _success(SloConfig())
    assert (s.events, s.budget, s.burned, s.worst_window_burned) == (0, 0.0, 0.0, 0.0)
    assert not report.frozen and report.reasons() == []
    assert s.burn_rates == dict.fromkeys([300, 1800, 3600, 7200, 21600, 86400, 259200], 0.0)


def test_the_worst_seven_days_decide_the_freeze() -> None:
    config = SloConfig()
    # 10,000 events at 99.5%: 50 bad allowed. Days 20..14 ago hold 26 bad: 52% of it.
    days = [_day(0, 5000, 0)] + [_day(20 - k, 700, 26 if k == 3 else 0) for k in range(7)]
    days.append(_day(29, 100, 0))
    report, s = _success(config, *days)
    assert s.events == 5000 + 7 * 700 + 26 + 100 == 10_026
    assert s.budget == pytest.approx(0.005 * 10_026)
    assert s.worst_window_bad == 26
    # The first window holding day 17 ends on day 17 itself (the earliest end wins ties).
    assert s.worst_window_end == TODAY - timedelta(days=17)
    assert s.worst_window_burned == pytest.approx(26 / (0.005 * 10_026))
    assert report.frozen
    [reason] = report.reasons()
    assert reason == (
        "dispatch_success burned 52% of its 30-day error budget in the 7 days to 2026-11-16"
        " (the policy freezes adapter changes above 50%)"
    )
    # At exactly the limit: not frozen (more than half freezes).
    _, at_limit = _success(config, _day(0, 9_900, 25), _day(10, 75, 0))
    assert at_limit.worst_window_burned == pytest.approx(0.5) and not at_limit.frozen


def test_days_outside_the_window_are_ignored_and_disabled_never_freezes() -> None:
    config = SloConfig()
    report, s = _success(config, _day(30, 0, 1_000), _day(0, 100, 0))
    assert (s.events, s.bad) == (100, 0) and not report.frozen
    off = msgspec.structs.replace(config, enabled=False)
    report, s = _success(off, _day(0, 100, 100))
    assert s.worst_window_burned == pytest.approx(100 / (0.005 * 200)) and not report.frozen


def test_burn_rates_and_an_all_bad_window() -> None:
    windows = (
        WindowCount("dispatch_success", 3600.0, 990, 10),
        WindowCount("dispatch_success", 300.0, 0, 3),
    )
    _, s = _success(SloConfig(), _day(0, 990, 13), windows=windows)
    assert s.burn_rates[3600] == pytest.approx(0.01 / 0.005)
    assert s.burn_rates[300] == pytest.approx(1 / 0.005)
    assert s.burn_rates[86400] == 0.0
    # Bad events with no budget at all (a window of bad events only, target < 1): finite.
    assert math.isfinite(s.burn_rates[300])


def test_check_freeze_names_each_changed_section() -> None:
    config = SloConfig()
    report, _ = _success(config, _day(0, 90, 10))
    last = AppliedConfig(
        applied_at=datetime(2026, 12, 1, 9, 30),
        digest="x",
        sections={"providers": "a", "channels": "b"},
        source="old.toml",
        override=None,
    )
    assert check_freeze(report, None, {"providers": "z"}, source="n.toml", break_glass=None) == []
    same = {"providers": "a", "channels": "b"}
    assert check_freeze(report, last, same, source="n.toml", break_glass=None) == []
    both = {"providers": "c", "channels": "d"}
    with pytest.raises(BudgetFrozen) as refused:
        check_freeze(report, last, both, source="n.toml", break_glass=None)
    assert [p.path for p in refused.value.problems] == ["$.providers", "$.channels"]
    assert "Start with the [providers] last applied (2026-12-01 09:30 UTC, from old.toml)" in str(
        refused.value
    )
    assert check_freeze(report, last, both, source="n.toml", break_glass="INC-1") == [
        "providers",
        "channels",
    ]


async def test_the_actor_counts_the_samples_once_and_keeps_the_gauges(world: World) -> None:  # noqa: F811
    registry = CollectorRegistry()
    config = msgspec.structs.replace(SloConfig(), rollup_interval_s=0.05, budget_interval_s=0.05)
    db: DbPool = world.db
    spec, _ = actor_child(
        "error_budget", partial(ErrorBudget, db, config, registry=registry),
        capacity=10, shutdown_s=1.0,
    )  # fmt: skip
    await _dispatch(world, ("dispatched", None), ("delivered", None), sent_after_s=1)
    await _dispatch(world, ("dispatched", None), ("failed", "rejected"), sent_after_s=45)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    async with trio.open_nursery() as nursery:
        await nursery.start(Supervisor("test", [spec]).run)
        for _ in range(200):  # up to 10 s: a rollup and a recompute after the first
            rolled = sample("triage_slo_events_total", slo="send_latency", outcome="bad")
            burned = sample("triage_slo_budget_burned_ratio", slo="dispatch_success")
            if rolled == 1.0 and burned:
                break
            await trio.sleep(0.05)
        assert sample("triage_slo_events_total", slo="dispatch_success", outcome="good") == 1.0
        assert sample("triage_slo_events_total", slo="dispatch_success", outcome="bad") == 1.0
        assert sample("triage_slo_events_total", slo="send_latency", outcome="good") == 1.0
        # 1 bad of 2 at 99.5%: 100 times the budget of 0.01 events.
        assert sample("triage_slo_budget_burned_ratio", slo="dispatch_success") == pytest.approx(
            100
        )
        assert sample("triage_slo_budget_frozen") == 1.0
        # Rolled up once: more turns count nothing again.
        await trio.sleep(0.3)
        assert sample("triage_slo_events_total", slo="dispatch_success", outcome="bad") == 1.0
        nursery.cancel_scope.cancel()
