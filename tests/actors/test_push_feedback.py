"""Row 2: push feedback, the stall watchdog's forced refresh under a supervisor, the stale sweep."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import trio
from prometheus_client import CollectorRegistry

from actors.push_feedback import (
    FeedbackHistory,
    FeedbackStallAlert,
    FeedbackState,
    FeedbackStatistics,
    Sweep,
    SweepStatistics,
    push_feedback_child,
    stale_sweep_child,
)
from engine.actor import Overflow
from engine.clock import Clock
from engine.detectors import AgeOfNewestDetector
from engine.errors import ConfigError, ProviderUnavailable
from engine.events import ActorCrashed, ActorRestarted, Event, EventBus
from engine.metrics import Metrics
from engine.runtime import Runtime
from engine.supervisor import ChildSpec, Supervisor
from providers.bridge import run
from providers.channel import DeliveryState, Receipt
from providers.db import DAEMON_ROLE, migrate
from providers.db.dispatches import STALE_REASON, mark_stale_unknown_async
from providers.db.migrate import migrate_async
from providers.services import postgres_url_with

WALL = 1_800_000_000.0  # the injected wall clock's epoch time at Trio time 0


def _receipt(ref: str, occurred_at: float | None = None) -> Receipt:
    return Receipt(
        provider="fcm", state=DeliveryState.DELIVERED, client_ref=ref, occurred_at=occurred_at
    )


class FakeSource:
    """A feedback session: ``pending`` receipts until acked; a reset opens a new session
    that brings ``after_reset`` (the backlog a fresh session delivers)."""

    def __init__(self, log: list[tuple[str, Any]], pending: Sequence[Receipt] = ()) -> None:
        self.log = log
        self.pending: dict[str, Receipt] = {r.client_ref or "": r for r in pending}
        self.after_reset: list[Receipt] = []
        self.resets = 0

    async def pull(self) -> tuple[Sequence[Receipt], Sequence[str]]:
        await trio.lowlevel.checkpoint()
        return list(self.pending.values()), list(self.pending)

    async def ack(self, ack_ids: list[str]) -> None:
        await trio.lowlevel.checkpoint()
        self.log.append(("ack", sorted(ack_ids)))
        for ack_id in ack_ids:
            self.pending.pop(ack_id, None)

    async def reset(self) -> None:
        await trio.lowlevel.checkpoint()
        self.resets += 1
        self.log.append(("reset", trio.current_time()))
        self.pending = {r.client_ref or "": r for r in self.after_reset}
        self.after_reset = []


class FakeSink:
    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.log = log
        self.fail = 0  # fail this many applies

    async def apply(self, receipts: Sequence[Receipt]) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail:
            self.fail -= 1
            self.log.append(("apply failed", len(receipts)))
            raise ProviderUnavailable("postgres: unavailable (test)")
        self.log.append(("apply", sorted(r.client_ref or "" for r in receipts)))


class Outstanding:
    def __init__(self, count: int) -> None:
        self.count = count
        self.calls = 0

    async def __call__(self) -> int:
        await trio.lowlevel.checkpoint()
        self.calls += 1
        return self.count


@dataclass
class World:
    spec: ChildSpec
    ref: Any
    source: FakeSource
    sink: FakeSink
    probe: Outstanding
    log: list[tuple[str, Any]]
    runtime: Runtime
    registry: CollectorRegistry

    def stats(self) -> FeedbackStatistics:
        stats = self.ref.statistics()
        assert isinstance(stats, FeedbackStatistics)
        return stats


def _world(
    outstanding: int,
    pending: Sequence[Receipt] = (),
    *,
    detector: AgeOfNewestDetector | None = None,
    **knobs: Any,
) -> World:
    log: list[tuple[str, Any]] = []
    source, sink, probe = FakeSource(log, pending), FakeSink(log), Outstanding(outstanding)
    registry = CollectorRegistry()
    clock = Clock(lambda: WALL + trio.current_time())
    runtime = Runtime(events=EventBus(), metrics=Metrics(registry), clock=clock)
    fields: dict[str, Any] = dict(
        poll_interval_s=1.0, batch_size=2, stall_after_s=600.0, watchdog_interval_s=60.0
    )
    fields.update(knobs)
    spec, ref = push_feedback_child(
        sources=[source], sink=sink, outstanding=probe, history=FeedbackHistory(),
        severity="ticket", capacity=16, overflow=Overflow.WAIT, shutdown_s=1.0,
        detector=detector, events=runtime.events, registry=registry, clock=runtime.clock,
        **fields,
    )  # fmt: skip
    return World(spec, ref, source, sink, probe, log, runtime, registry)


def _events(runtime: Runtime) -> list[Event]:
    seen: list[Event] = []
    runtime.events.on(Event, seen.append)
    return seen


async def test_stall_forces_a_restart_with_a_fresh_session(autojump_clock: trio.abc.Clock) -> None:
    t0 = trio.current_time()
    detector = AgeOfNewestDetector("row2", metric="triage_push_feedback_last_timestamp_seconds",
                                   threshold=600.0)  # fmt: skip
    w = _world(
        outstanding=3,
        pending=[_receipt("d1", WALL - 5), _receipt("d2", WALL - 2), _receipt("d3")],
        detector=detector,
    )
    source, log, runtime, registry = w.source, w.log, w.runtime, w.registry
    seen = _events(runtime)
    source.after_reset = [_receipt("d4", WALL + 590)]
    sup = Supervisor("push", [w.spec], max_restarts=3, period_s=60.0, runtime=runtime)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(1)
        # Applied in batches of 2, acked only afterwards, once.
        assert log == [("apply", ["d1", "d2"]), ("apply", ["d3"]), ("ack", ["d1", "d2", "d3"])]
        # The newest feedback: d3 says no occurred_at, so the wall clock when it came.
        assert registry.get_sample_value("triage_push_feedback_last_timestamp_seconds") == WALL + t0
        assert w.stats().state is FeedbackState.WAITING  # the round after found nothing
        await trio.sleep(598.5)  # t0 + 599.5
        assert source.resets == 0 and not detector.evaluate().firing
        await trio.sleep(0.6)  # t0 + 600.1: the watchdog restarted it
        assert source.resets == 1
        await trio.sleep(599.8)  # t0 + 1199.9
        assert source.resets == 1
        await trio.sleep(0.2)  # t0 + 1200.1: stalled again (the fresh session brought d4 only)
        assert source.resets == 2
        stats = w.stats()  # the numbers span the incarnations
        nursery.cancel_scope.cancel()

    stalls = [e for e in seen if isinstance(e, FeedbackStallAlert)]
    assert [
        (e.at - t0, e.silent_s, e.outstanding, e.refreshes, e.severity, e.row) for e in stalls
    ] == [
        (600.0, 600.0, 3, 1, "ticket", 2),
        (1200.0, 600.0, 3, 2, "ticket", 2),
    ]
    crashes = [e for e in seen if isinstance(e, ActorCrashed)]
    assert [(e.at - t0, e.child) for e in crashes] == [
        (600.0, "push_feedback"),
        (1200.0, "push_feedback"),
    ]
    assert all(e.error.startswith("FeedbackStalled(") for e in crashes)  # typed, not a group
    restarts = [e for e in seen if isinstance(e, ActorRestarted)]
    assert [(e.at - t0, e.child) for e in restarts] == [
        (600.0, "push_feedback"),
        (1200.0, "push_feedback"),
    ]
    assert [entry for entry in log if entry[0] == "reset"] == [
        ("reset", t0 + 600.0),
        ("reset", t0 + 1200.0),
    ]
    assert ("ack", ["d4"]) in log
    assert (stats.starts, stats.resets, stats.refreshes, stats.applied, stats.acked) == (
        3, 2, 2, 4, 4,
    )  # fmt: skip
    assert stats.last_feedback_wall == WALL + 590
    assert registry.get_sample_value("triage_push_feedback_refreshes_total") == 2.0
    assert registry.get_sample_value("triage_push_feedback_last_timestamp_seconds") == WALL + 590
    assert w.probe.calls > 0


async def test_an_idle_system_is_not_stalled(autojump_clock: trio.abc.Clock) -> None:
    t0 = trio.current_time()
    detector = AgeOfNewestDetector(
        "row2", metric="triage_push_feedback_last_timestamp_seconds", threshold=600.0,
        window_s=60.0,
    )  # fmt: skip
    w = _world(outstanding=0, detector=detector)
    seen = _events(w.runtime)
    sup = Supervisor("push", [w.spec], max_restarts=3, period_s=60.0, runtime=w.runtime)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(3630)  # an hour with nothing outstanding: no stall
        assert w.stats().refreshes == 0 and w.probe.calls == 60
        # Nothing waited for feedback, so none is overdue: the row-2 age counts from the
        # last idle check (t0 + 3600), not from the last feedback (never).
        assert detector.evaluate().value == 30.0 and not detector.firing
        w.probe.count = 2  # the last idle check was at t0 + 3600
        await trio.sleep(600)  # t0 + 4230
        nursery.cancel_scope.cancel()
    assert [(e.at - t0, e.silent_s, e.outstanding) for e in seen
            if isinstance(e, FeedbackStallAlert)] == [(4200.0, 600.0, 2)]  # fmt: skip
    assert [e.at - t0 for e in seen if isinstance(e, ActorCrashed)] == [4200.0]
    assert w.source.resets == 1  # the restart at t0 + 4200 opened a fresh session


async def test_feedback_whose_apply_failed_is_not_acked(autojump_clock: trio.abc.Clock) -> None:
    w = _world(outstanding=1, pending=[_receipt("d1")])
    w.sink.fail = 1
    sup = Supervisor("push", [w.spec], runtime=w.runtime)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(0.5)
        assert w.stats().state is FeedbackState.DEGRADED
        await trio.sleep(1.0)  # the next round, poll_interval_s later
        stats = w.stats()
        nursery.cancel_scope.cancel()
    assert w.log == [("apply failed", 1), ("apply", ["d1"]), ("ack", ["d1"])]
    assert (stats.failures, stats.applied, stats.acked, stats.received) == (1, 1, 1, 2)
    assert stats.state is FeedbackState.WAITING


def test_bad_knobs_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        _world(outstanding=0, batch_size=0)
    with pytest.raises(ConfigError, match="stall_after_s"):
        _world(outstanding=0, stall_after_s=-1)
    with pytest.raises(ConfigError, match="overflow must be 'wait'"):
        stale_sweep_child(
            sweeper=_never, stale_after_s=1.0, sweep_interval_s=1.0, sweep_limit=1,
            capacity=1, overflow=Overflow.REJECT, shutdown_s=1.0,
        )  # fmt: skip


async def _never(channel: str, older_than_s: float, limit: int) -> int:
    raise AssertionError("not called")  # pragma: no cover


# -- the stale sweep -----------------------------------------------------------------------


async def test_sweep_cadence(autojump_clock: trio.abc.Clock) -> None:
    calls: list[tuple[float, str, float, int]] = []
    backlog = [3]

    async def sweeper(channel: str, older_than_s: float, limit: int) -> int:
        await trio.lowlevel.checkpoint()
        calls.append((trio.current_time(), channel, older_than_s, limit))
        marked = min(backlog[0], limit)
        backlog[0] -= marked
        return marked

    registry = CollectorRegistry()
    spec, ref = stale_sweep_child(
        sweeper=sweeper, stale_after_s=900.0, sweep_interval_s=30.0, sweep_limit=2,
        capacity=16, overflow=Overflow.WAIT, shutdown_s=1.0, registry=registry,
    )  # fmt: skip
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(Supervisor("sweep", [spec]).run)
        await trio.sleep(61)
        stats = ref.statistics()
        nursery.cancel_scope.cancel()
    # A full batch (2 of 2) is followed at once by another call; then every 30 s.
    assert [(at - t0, ch, age, lim) for at, ch, age, lim in calls] == [
        (0.0, "push", 900.0, 2),
        (0.0, "push", 900.0, 2),
        (30.0, "push", 900.0, 2),
        (60.0, "push", 900.0, 2),
    ]
    assert stats == SweepStatistics(sweeps=3, marked=3, failures=0)
    assert registry.get_sample_value("triage_push_stale_unknown_total") == 3.0


_SEED = [
    # (name, channel, final status, dispatched this many seconds ago)
    ("old push 1", "push", "dispatched", 3600),
    ("old push 2", "push", "dispatched", 1200),
    ("fresh push", "push", "dispatched", 60),
    ("old sms", "sms", "dispatched", 3600),
    ("old delivered", "push", "delivered", 3600),
    ("queued push", "push", "queued", None),
]


async def _seed(url: str) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('t') RETURNING id")
        ids = {}
        for name, channel, status, age in _SEED:
            ids[name] = await conn.fetchval(
                "INSERT INTO dispatches (tenant_id, channel, template, recipient)"
                " VALUES ($1, $2, 'reminder', 'r') RETURNING id",
                tenant,
                channel,
            )
            if age is not None:
                await conn.execute(
                    "UPDATE dispatches SET status = 'dispatched',"
                    " dispatched_at = now() - make_interval(secs => $2) WHERE id = $1",
                    ids[name],
                    float(age),
                )
            if status == "delivered":
                await conn.execute(
                    "UPDATE dispatches SET status = 'delivered' WHERE id = $1", ids[name]
                )
        return ids
    finally:
        await conn.close()


async def _statuses(url: str) -> dict[Any, tuple[str, str | None]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT id, status::text AS status, reason FROM dispatches")
        return {r["id"]: (r["status"], r["reason"]) for r in rows}
    finally:
        await conn.close()


@pytest.fixture
async def relay_pool(
    bridge: object, postgres_url: str
) -> AsyncIterator[asyncpg.Pool[asyncpg.Record]]:
    await migrate(postgres_url)
    create = functools.partial(
        asyncpg.create_pool, postgres_url_with(postgres_url, user=DAEMON_ROLE), min_size=1,
        max_size=2,
    )  # fmt: skip
    pool = await run(create)
    try:
        yield pool
    finally:
        await run(pool.close)


def test_shipped_migration_lets_the_relay_mark_stale(postgres_url: str) -> None:
    async def main() -> int:
        await migrate_async(postgres_url)
        await _seed(postgres_url)
        pool = await asyncpg.create_pool(
            postgres_url_with(postgres_url, user=DAEMON_ROLE), min_size=1, max_size=1
        )
        try:
            return len(await mark_stale_unknown_async(pool, "push", 600.0, 10))
        finally:
            await pool.close()

    assert asyncio.run(main()) == 2


async def test_stale_sweep_marks_only_old_dispatched_rows(
    relay_pool: asyncpg.Pool[asyncpg.Record], postgres_url: str
) -> None:
    ids = await run(_seed, postgres_url)

    async def sweeper(channel: str, older_than_s: float, limit: int) -> int:
        marked = await run(mark_stale_unknown_async, relay_pool, channel, older_than_s, limit,
                           service="postgres")  # fmt: skip
        return len(marked)

    spec, ref = stale_sweep_child(
        sweeper=sweeper, stale_after_s=600.0, sweep_interval_s=3600.0, sweep_limit=1,
        capacity=16, overflow=Overflow.WAIT, shutdown_s=1.0,
    )  # fmt: skip

    async def swept(count: int) -> SweepStatistics:
        with trio.fail_after(10):
            while (stats := ref.statistics()) is None or stats.sweeps < count:  # noqa: ASYNC110  # waits for the sweep task
                await trio.sleep(0.01)
        assert isinstance(stats, SweepStatistics)
        return stats

    async with trio.open_nursery() as nursery:
        await nursery.start(Supervisor("sweep", [spec]).run)
        assert (await swept(1)).marked == 2  # the sweep at start, one row per call
        statuses = {name: (await run(_statuses, postgres_url))[ids[name]] for name, *_ in _SEED}
        assert statuses == {
            "old push 1": ("unknown", STALE_REASON),
            "old push 2": ("unknown", STALE_REASON),
            "fresh push": ("dispatched", None),
            "old sms": ("dispatched", None),
            "old delivered": ("delivered", None),
            "queued push": ("queued", None),
        }
        await ref.tell(Sweep())
        assert await swept(2) == SweepStatistics(sweeps=2, marked=2, failures=0)  # idempotent
        nursery.cancel_scope.cancel()
