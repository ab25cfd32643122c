"""Scenario 5, database unavailable: stop PostgreSQL under a write load, then bring it back.

The scenario owns its server: an embedded PostgreSQL (migrated, two tenants).
A :class:`~actors.db_writer.DbGateway` and its :class:`~actors.db_writer.DbWriter` run as the daemon's role with the
``breakers.postgres_primary`` profile, the ``[spool]`` section (the spool file
gets ``[spool] path``'s name, in a fresh temporary directory per run) and the
connection-error detector ``[detectors.db_connection_errors]`` of the scenario
config (chaos.toml shortens it; without that entry, catalog row 5's detector).
No replica is configured here: reads are refused while the primary is down
(the replica fallback is covered by tests/actors/test_db_writer.py).

1. Writers send spoolable ``inbox`` writes (idempotent inserts into the inbox,
   as a tenant) and non-spoolable ``direct`` writes; a reader reads; everything
   reaches the primary.
2. Trigger: the PostgreSQL process is stopped. Writes go on: ``inbox`` writes
   are accepted into the spool (fsync'd), ``direct`` writes get
   :class:`~engine.errors.DatabaseUnavailable` and are not counted as
   accepted; reads fail. The connection-error detector must fire
   (``detect_s`` counts from the stop).
3. PostgreSQL is started again. Writes go on; the spool replays in order
   through the primary; the detector must clear.

Judged from outside, as the superuser: every accepted write's key must be in
the inbox exactly once (a second row would be a duplicate) -- or still in the
spool file (``still_queued``), never lost; the spooled writes must have been
applied in the order they were accepted.
"""

from __future__ import annotations

import itertools
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import asyncpg
import trio

from actors.db_writer import (
    DbGateway,
    DbWriterStatistics,
    WriteOutcome,
    apply_inbox,
    db_writer_child,
)
from bench.chaos import timeline
from bench.chaos.fixtures import create_tenants, evaluate_every, wait_until
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from config import engine_kwargs
from engine.breaker import Breaker
from engine.clock import Clock
from engine.detectors import RateDetector, make_detector
from engine.errors import DatabaseUnavailable, LoadShed
from engine.events import BreakerStateChanged, DetectorCleared, DetectorFired, Event, EventBus
from providers.bridge import open_bridge, run
from providers.db import DAEMON_ROLE, migrate
from providers.db.pool import Pool, open_pool
from providers.db.tenancy import run_in_tenant
from providers.embedded import EmbeddedPostgres
from providers.services import postgres_url_with
from providers.spool import Spool

if TYPE_CHECKING:
    from providers.db.tenancy import Connection

__all__ = ["DETECTOR", "ROW", "SCENARIO", "run_scenario"]

ROW = 5
DETECTOR = "db_connection_errors"
SPOOLABLE = "inbox"
DIRECT = "direct"  # a write kind that may not be spooled: refused with a 503 while down
# Durability traded for speed, as in the tests: the scenario stops processes, never the OS.
FAST_POSTGRES = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


async def _inbox_rows(url: str) -> list[str]:
    """Every inbox row's key, oldest first, read as the superuser (outside the writer)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT message_key FROM inbox ORDER BY received_at, message_key")
        return [str(row["message_key"]) for row in rows]
    finally:
        await conn.close()


async def _count(conn: Connection) -> int:
    value: int = await conn.fetchval("SELECT count(*) FROM inbox")
    return value


async def _read_count(pool: Pool, tenant: str) -> int:
    return await run_in_tenant(pool, tenant, _count)


@dataclass
class _Watch:
    """What the scenario saw on the event bus (Trio times)."""

    fired_at: float | None = None
    cleared_at: float | None = None
    breaker_opened: bool = False
    events: list[str] = field(default_factory=list)

    def __call__(self, event: Event) -> None:
        match event:
            case DetectorFired(detector=name) if name == DETECTOR and self.fired_at is None:
                self.fired_at = trio.current_time()
                self.events.append(f"fired {event.value:.2f}/s")
            case DetectorCleared(detector=name) if name == DETECTOR and self.fired_at is not None:
                self.cleared_at = trio.current_time()
                self.events.append("cleared")
            case BreakerStateChanged(new="open"):
                self.breaker_opened = True


@dataclass
class _Load:
    """Spoolable and direct writes plus reads, round robin over the tenants."""

    writer: DbGateway
    tenants: Sequence[uuid.UUID]
    ledger: Ledger
    spooled_order: list[str] = field(default_factory=list)
    refused: int = 0
    full: int = 0
    reads_ok: int = 0
    reads_failed: int = 0
    _n: itertools.count[int] = field(default_factory=itertools.count)

    def _payload(self, tenant: uuid.UUID, key: str) -> dict[str, Any]:
        return {"tenant": str(tenant), "appointment": key, "source": "chaos"}

    async def step(self) -> None:
        n = next(self._n)
        tenant = self.tenants[n % len(self.tenants)]
        key = f"s-{n:06d}"
        try:
            outcome = await self.writer.write(SPOOLABLE, key, self._payload(tenant, key))
        except LoadShed:  # the spool is full: refused, not accepted
            self.full += 1
        else:
            self.ledger.accept(key)
            if outcome is WriteOutcome.SPOOLED:
                self.spooled_order.append(key)
        if n % 4 == 0:
            direct = f"d-{n:06d}"
            try:
                await self.writer.write(DIRECT, direct, self._payload(tenant, direct))
            except DatabaseUnavailable:
                self.refused += 1
            else:
                self.ledger.accept(direct)
            try:
                await self.writer.read(_read_count, str(tenant))
            except DatabaseUnavailable:
                self.reads_failed += 1
            else:
                self.reads_ok += 1

    async def run(self, count: int, pace_s: float) -> None:
        for _ in range(count):
            await self.step()
            await trio.sleep(pace_s)


def _in_order(applied: Sequence[str], spooled: Sequence[str]) -> bool:
    """The spooled keys appear in the database in the order they were accepted."""
    wanted = set(spooled)
    return [key for key in applied if key in wanted] == list(spooled)


async def run_scenario(ctx: ChaosContext) -> Outcome:
    """Scenario 5 (see the module docstring)."""
    config = ctx.config
    per_phase = 20 if ctx.quick else 200
    detector_config = config.detectors.get(DETECTOR, ctx.catalog.row(ROW).detector)
    fields = engine_kwargs(detector_config)
    window_s = float(fields.get("window_s") or 60.0)
    tick_s = config.daemon.detector_tick_s
    spool_config = config.spool

    bus = EventBus()
    watch = _Watch()
    bus.on(Event, watch)
    ledger = Ledger()
    notes: list[str] = []
    postgres = EmbeddedPostgres(settings=FAST_POSTGRES)
    with tempfile.TemporaryDirectory(prefix="triage-spool-") as state:
        spool_path = Path(state) / Path(spool_config.path).name
        spool = Spool(spool_path, max_bytes=spool_config.max_bytes, fsync=spool_config.fsync)
        try:
            await trio.to_thread.run_sync(postgres.start)
            async with open_bridge():
                await migrate(postgres.url)
                tenants = await run(create_tenants, postgres.url, 2)
                daemon_url = postgres_url_with(postgres.url, user=DAEMON_ROLE)
                async with open_pool(daemon_url, config.database, close_s=2.0) as pool:
                    breaker = Breaker(
                        "postgres_primary",
                        **engine_kwargs(config.breakers["postgres_primary"]),
                        events=bus,
                    )
                    detector = make_detector(DETECTOR, **fields, row=ROW, events=bus).expect(
                        RateDetector
                    )
                    writer = DbGateway(
                        pool,
                        breaker,
                        spool,
                        spool_config,
                        appliers={SPOOLABLE: apply_inbox, DIRECT: apply_inbox},
                        wall=Clock().wall,
                        connection_errors=detector,
                    )
                    spec, ref = db_writer_child(
                        writer,
                        mailbox=config.mailboxes["monitor"],
                        shutdown_s=config.supervisors["default"].shutdown_s,
                    )

                    def stats() -> DbWriterStatistics:
                        return cast(DbWriterStatistics, ref.statistics())

                    if SPOOLABLE not in writer.spoolable:
                        notes.append(f"[spool] spoolable_kinds lacks {SPOOLABLE!r}")
                    load = _Load(writer, tenants, ledger)
                    async with trio.open_nursery() as nursery:
                        await nursery.start(spec.start)
                        nursery.start_soon(evaluate_every, detector, tick_s)

                        # 1. steady state
                        await load.run(per_phase, 0.002)
                        notes.append(f"steady: {stats().written} written, {load.reads_ok} reads")

                        # 2. PostgreSQL stops; writes and reads go on
                        await trio.to_thread.run_sync(postgres.stop)
                        timeline.fault_started("PostgreSQL stopped")
                        stopped_at = trio.current_time()
                        with trio.move_on_after(window_s + 20):
                            while watch.fired_at is None or len(load.spooled_order) < per_phase:
                                await load.run(1, 0.01)
                        spooled_during = len(load.spooled_order)
                        durable = len(await spool.read_all())
                        notes.append(
                            f"outage: breaker opened={watch.breaker_opened},"
                            f" readiness={writer.unavailable()!r}, {spooled_during} writes"
                            f" spooled ({durable} on disk), {load.refused} direct writes"
                            f" refused (503), {load.reads_failed} reads refused (no replica)"
                        )

                        # 3. PostgreSQL is back; writes go on; the spool replays
                        await trio.to_thread.run_sync(postgres.start)
                        timeline.fault_ended("PostgreSQL stopped")
                        restarted_at = trio.current_time()
                        await load.run(per_phase, 0.002)
                        replayed = await wait_until(
                            lambda: (
                                spool.count == 0
                                and watch.cleared_at is not None
                                and writer.unavailable() is None
                            ),
                            window_s + 30,
                        )
                        notes.append(
                            f"recovery: spool drained={spool.count == 0} in"
                            f" {trio.current_time() - restarted_at:.2f}s"
                            f" ({stats().replayed} replayed), detector"
                            f" {'cleared' if watch.cleared_at is not None else 'still firing'}"
                        )
                        final = stats()
                        nursery.cancel_scope.cancel()
                await spool.aclose()
                left = [record.key for record in await spool.read_all()]
                applied = await run(_inbox_rows, postgres.url)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(postgres.close)

    for key in applied:
        ledger.receive(key)
    for key in ledger.accepted:
        if ledger.received[key]:
            ledger.settle(key)
    ledger.still_queued(left)
    in_order = _in_order(applied, load.spooled_order)
    if not in_order:
        notes.append("spooled writes applied out of order")
    stray = [key for key in applied if key not in ledger.accepted]
    if stray:
        notes.append(f"{len(stray)} rows never accepted: {stray[:5]}")
    notes.append(
        f"accepted {len(ledger.accepted)} ({final.written} direct to primary,"
        f" {final.spooled} spooled), refused {load.refused} direct writes, spool full {load.full}"
    )
    notes.append("events: " + ", ".join(watch.events))

    detected = watch.fired_at is not None
    mitigated = (
        watch.breaker_opened
        and spooled_during > 0
        and durable == spooled_during
        and load.refused > 0
        and replayed
        and final.replayed == final.spooled
        and not left
        and in_order
        and not stray
    )
    return Outcome(
        detected=detected,
        detect_s=None if watch.fired_at is None else watch.fired_at - stopped_at,
        mitigated=mitigated,
        ledger=ledger,
        notes=notes,
    )


SCENARIO = Scenario(ROW, run_scenario)
