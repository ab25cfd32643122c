"""The SLO ledger on real PostgreSQL (migration 0010): the trigger's samples, the rollup
as the daemon's role, the window counts, the applied configs, and the freeze at start."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import msgspec
import pytest

import config as config_module
from actors.error_budget import BudgetFrozen, enforce_freeze, read_report
from config.schema import DatabaseConfig, GhasiConfig, ProvidersConfig, SloConfig, TriageConfig
from providers.bridge import run
from providers.db import DAEMON_ROLE, migrate
from providers.db.pool import DbPool, open_pool
from providers.db.slo import (
    DayCount,
    Rolled,
    WindowCount,
    last_applied_async,
    rollup_async,
    window_counts_async,
)
from providers.services import postgres_url_with

DB_CONFIG = DatabaseConfig(pool_min=1, pool_max=2, connect_timeout_s=2.0, command_timeout_s=2.0)
DAY_S = 86_400.0


@dataclass(frozen=True)
class World:
    admin_url: str
    db: DbPool
    tenant: str


async def admin(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return await run(go)


@pytest.fixture
async def world(bridge: object, postgres_url: str) -> AsyncIterator[World]:
    await migrate(postgres_url)
    [row] = await admin(postgres_url, "INSERT INTO tenants (name) VALUES ('a') RETURNING id::text")
    daemon = postgres_url_with(postgres_url, user=DAEMON_ROLE)
    async with open_pool(daemon, DB_CONFIG, close_s=2.0) as db:
        yield World(postgres_url, db, row["id"])


async def _dispatch(world: World, *moves: tuple[str, str | None], sent_after_s: float) -> str:
    """A dispatch accepted ``sent_after_s`` before the provider took it, then ``moves``."""
    [row] = await admin(
        world.admin_url,
        "INSERT INTO dispatches (tenant_id, channel, template, recipient, created_at)"
        " VALUES ($1::uuid, 'sms', 't', '+15550100', now() - make_interval(secs => $2))"
        " RETURNING id",
        world.tenant,
        sent_after_s,
    )
    for status, reason in moves:
        await admin(
            world.admin_url,
            "UPDATE dispatches SET status = $2::dispatch_status, reason = $3,"
            " dispatched_at = CASE WHEN $2 = 'dispatched' THEN now() ELSE dispatched_at END"
            " WHERE id = $1",
            row["id"],
            status,
            reason,
        )
    return str(row["id"])


async def _samples(world: World) -> list[tuple[str, bool | None, float | None]]:
    rows = await admin(world.admin_url, "SELECT slo, good, latency_s FROM slo_samples ORDER BY id")
    return [(r["slo"], r["good"], r["latency_s"]) for r in rows]


async def test_every_first_end_and_every_send_leaves_one_sample(world: World) -> None:
    await _dispatch(world, ("dispatched", None), ("delivered", None), sent_after_s=5)
    await _dispatch(world, ("dispatched", None), ("failed", "rejected"), sent_after_s=60)
    await _dispatch(world, ("dispatched", None), ("undeliverable", "gone"), sent_after_s=1)
    # unknown, then delivered late: counted once, bad (not confirmed within the deadline)
    await _dispatch(
        world, ("dispatched", None), ("unknown", "stale"), ("delivered", None), sent_after_s=2
    )
    await _dispatch(world, ("failed", "template_not_found"), sent_after_s=0)  # never sent
    samples = await _samples(world)
    success = [good for slo, good, _ in samples if slo == "dispatch_success"]
    latency = sorted(round(s or 0) for slo, _, s in samples if slo == "send_latency")
    assert sorted(success) == [False, False, False, True]  # failed, unknown, queued->failed
    assert latency == [1, 2, 5, 60]
    # A claim that moves no status leaves nothing.
    await admin(world.admin_url, "UPDATE dispatches SET claimed_until = now()")
    assert len(await _samples(world)) == len(samples)


async def test_the_rollup_judges_latency_buckets_and_forgets_the_samples(world: World) -> None:
    await _dispatch(world, ("dispatched", None), ("delivered", None), sent_after_s=5)
    await _dispatch(world, ("dispatched", None), ("failed", "rejected"), sent_after_s=60)
    await _dispatch(world, ("dispatched", None), ("delivered", None), sent_after_s=29)
    rolled = await world.db.run_unit(rollup_async, 30.0, 1000, 31 * DAY_S)
    assert sorted(rolled, key=lambda r: r.slo) == [
        Rolled("dispatch_success", 2, 1),
        Rolled("send_latency", 2, 1),
    ]
    assert await _samples(world) == []
    assert await world.db.run_unit(rollup_async, 30.0, 1000, 31 * DAY_S) == []
    # Counted again into the same minute: the bucket adds up.
    await _dispatch(world, ("dispatched", None), ("delivered", None), sent_after_s=1)
    await world.db.run_unit(rollup_async, 30.0, 1000, 31 * DAY_S)
    days, windows = await world.db.run_unit(window_counts_async, 30, [300.0, 3600.0])
    today = datetime.now(UTC).date()
    assert sorted(days, key=lambda d: d.slo) == [
        DayCount("dispatch_success", today, 3, 1),
        DayCount("send_latency", today, 3, 1),
    ]
    assert sorted(windows, key=lambda w: (w.slo, w.seconds)) == [
        WindowCount("dispatch_success", 300.0, 3, 1),
        WindowCount("dispatch_success", 3600.0, 3, 1),
        WindowCount("send_latency", 300.0, 3, 1),
        WindowCount("send_latency", 3600.0, 3, 1),
    ]


async def test_the_rollup_takes_at_most_its_batch_and_drops_old_buckets(world: World) -> None:
    for _ in range(3):
        await _dispatch(world, ("dispatched", None), sent_after_s=1)
    await admin(
        world.admin_url,
        "INSERT INTO slo_buckets (minute, slo, good, bad)"
        " VALUES (date_trunc('minute', now()) - interval '40 days', 'send_latency', 7, 7)",
    )
    assert await world.db.run_unit(rollup_async, 30.0, 2, 31 * DAY_S) == [
        Rolled("send_latency", 2, 0)
    ]
    assert len(await _samples(world)) == 1
    rows = await admin(world.admin_url, "SELECT sum(good) AS g FROM slo_buckets")
    assert rows[0]["g"] == 2  # the 40-day-old bucket is gone


def _burned_config() -> TriageConfig:
    return config_module.load_config(config_module.default_path("default.toml"))


async def _seed_burn(world: World, *, good: int, bad: int, days_ago: int = 0) -> None:
    await admin(
        world.admin_url,
        "INSERT INTO slo_buckets (minute, slo, good, bad) VALUES"
        " (date_trunc('minute', now()) - make_interval(days => $3), 'dispatch_success', $1, $2)",
        good,
        bad,
        days_ago,
    )


async def test_a_start_with_changed_adapters_is_refused_while_frozen(world: World) -> None:
    config = _burned_config()
    today = datetime.now(UTC).date()
    # The first start records its adapters, frozen or not.
    await enforce_freeze(world.db, config, source="a.toml", today=today, break_glass=None)
    first = await world.db.run_unit(last_applied_async)
    assert first is not None and first.source == "a.toml" and first.override is None
    # 1000 events at 99.5%: a budget of 5 bad ones; 10 bad burned 200% of it this week.
    await _seed_burn(world, good=990, bad=10)
    report = await read_report(world.db, config.slo, today=today)
    [success] = [s for s in report.slos if s.slo == "dispatch_success"]
    assert (success.budget, success.worst_window_bad, success.worst_window_burned) == (
        pytest.approx(5.0),
        10,
        pytest.approx(2.0),
    )
    assert report.frozen
    # The same adapters: allowed, nothing new recorded.
    await enforce_freeze(world.db, config, source="a.toml", today=today, break_glass=None)
    assert await world.db.run_unit(last_applied_async) == first
    changed = msgspec.structs.replace(
        config,
        providers=ProvidersConfig(ghasi=GhasiConfig(base_url="http://127.0.0.1:9/")),
    )
    with pytest.raises(BudgetFrozen) as refused:
        await enforce_freeze(world.db, changed, source="b.toml", today=today, break_glass=None)
    [problem] = refused.value.problems
    assert (problem.source, problem.path) == ("b.toml", "$.providers")
    assert "dispatch_success burned 200% of its 30-day error budget in the 7 days to" in str(
        problem
    )
    assert "TRIAGE_BREAK_GLASS" in problem.message
    assert await world.db.run_unit(last_applied_async) == first  # refused: nothing recorded
    # Break glass: let through, recorded with its reason.
    await enforce_freeze(
        world.db, changed, source="b.toml", today=today, break_glass="INC-42 vendor outage"
    )
    after = await world.db.run_unit(last_applied_async)
    assert after is not None and after.override == "INC-42 vendor outage"
    assert after.sections["providers"] != first.sections["providers"]
    assert after.sections["channels"] == first.sections["channels"]


async def test_an_old_burn_outside_the_freeze_window_does_not_freeze(world: World) -> None:
    config = SloConfig()
    today = datetime.now(UTC).date()
    # 3 bad spread thinly: day 20 and day 10 ago; a 7-day window holds at most 1 of budget 5.
    await _seed_burn(world, good=1000, bad=0)
    await _seed_burn(world, good=0, bad=2, days_ago=20)
    await _seed_burn(world, good=0, bad=1, days_ago=10)
    report = await read_report(world.db, config, today=today)
    [success] = [s for s in report.slos if s.slo == "dispatch_success"]
    assert success.bad == 3 and success.worst_window_bad == 2
    assert not report.frozen
