"""Scenario 6, NATS unavailable: stop the NATS process under the outbox relay, then bring it back.

The scenario owns its servers: an embedded PostgreSQL (migrated, three tenants)
and an embedded NATS with JetStream on disk. The relay runs as the daemon's
role with the ``[relay]`` section, the ``breakers.nats_publish`` profile and the
lag detector ``[detectors.outbox_lag]`` of the scenario config (chaos.toml
shortens its threshold; without that entry, catalog row 6's detector is used).

1. Writers commit events for several aggregates of several tenants; the relay
   publishes them (lag back to nothing).
2. Trigger: the NATS server process is stopped. Writers keep committing. The
   publish breaker opens and events stay in the outbox; the lag detector must
   fire (``detect_s`` counts from the stop).
3. NATS is started again (same port, same JetStream directory). Writers keep
   committing; the relay replays the backlog; the detector must clear.

Judged from outside: a JetStream consumer reads the whole stream back; every
committed outbox id must be there exactly once (duplicates counted by
``Nats-Msg-Id``), in seq order per aggregate, and marked published in the
database -- or still pending in the outbox (``still_queued``), never lost.
"""

from __future__ import annotations

import functools
import itertools
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import asyncpg
import trio

from actors.outbox_relay import RelayState, RelayStatistics, relay_child
from bench.chaos import timeline
from bench.chaos.fixtures import create_tenants, evaluate_every, wait_until
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from config import TriageConfig, engine_kwargs
from config.schema import DetectorConfig
from engine.breaker import Breaker
from engine.detectors import AgeOfNewestDetector, make_detector
from engine.events import BreakerStateChanged, DetectorCleared, DetectorFired, Event, EventBus
from providers import jetstream
from providers.bridge import open_bridge, run
from providers.db import DAEMON_ROLE, migrate
from providers.db.outbox import HEADER_AGGREGATE, HEADER_SEQ, HEADER_TENANT, NewEvent, enqueue_async
from providers.embedded import EmbeddedNats, EmbeddedPostgres
from providers.services import postgres_url_with

if TYPE_CHECKING:
    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "ROW",
    "SCENARIO",
    "Backbone",
    "Writer",
    "check_order",
    "lag_detector_config",
    "open_backbone",
    "run_scenario",
]

ROW = 6
LAG_DETECTOR = "outbox_lag"
# Durability traded for speed, as in the tests: the scenario stops processes, never the OS.
FAST_POSTGRES = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


# -- servers and clients ----------------------------------------------------------------


@dataclass
class Backbone:
    """Embedded PostgreSQL + NATS, a daemon-role pool and a JetStream client (inside a bridge)."""

    postgres: EmbeddedPostgres
    nats: EmbeddedNats
    pool: Pool
    client: jetstream.JetStreamClient
    tenants: list[uuid.UUID]


async def _pending_ids(url: str) -> list[int]:
    """Outbox ids not published yet, read as the superuser (outside the relay)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT id FROM outbox WHERE published_at IS NULL ORDER BY id")
        return [int(row["id"]) for row in rows]
    finally:
        await conn.close()


@asynccontextmanager
async def open_backbone(*, tenants: int, pool_max: int = 4) -> AsyncIterator[Backbone]:
    """Start both servers, migrate, create tenants, open the clients; stop everything at exit."""
    postgres = EmbeddedPostgres(settings=FAST_POSTGRES)
    nats_server = EmbeddedNats()
    try:
        await trio.to_thread.run_sync(postgres.start)
        await trio.to_thread.run_sync(nats_server.start)
        async with open_bridge():
            await migrate(postgres.url)
            tenant_ids = await run(create_tenants, postgres.url, tenants)
            daemon_url = postgres_url_with(postgres.url, user=DAEMON_ROLE)
            create = functools.partial(
                asyncpg.create_pool, daemon_url, min_size=1, max_size=pool_max
            )
            pool: Pool = await run(create, service="postgres")
            try:
                client = await run(jetstream.connect, nats_server.url, service="nats")
                try:
                    yield Backbone(postgres, nats_server, pool, client, tenant_ids)
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await run(jetstream.close, client)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await run(pool.close)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(nats_server.close)
            await trio.to_thread.run_sync(postgres.close)


# -- writers and verification -------------------------------------------------------------


@dataclass
class Writer:
    """Commits one event per transaction, round robin over the aggregates of every tenant."""

    pool: Pool
    tenants: Sequence[uuid.UUID]
    aggregates_per_tenant: int
    ledger: Ledger
    written: int = 0
    by_aggregate: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def __post_init__(self) -> None:
        self._targets = itertools.cycle(
            [(t, f"a{k}") for k in range(self.aggregates_per_tenant) for t in self.tenants]
        )

    async def write(self, count: int, *, pace_s: float = 0.0) -> None:
        for _ in range(count):
            tenant, aggregate = next(self._targets)
            event = NewEvent(
                aggregate_type="appointment",
                aggregate_id=aggregate,
                subject="triage.events.appointment",
                payload={"n": self.written, "tenant": str(tenant), "aggregate": aggregate},
            )
            [(outbox_id, seq)] = await run(enqueue_async, self.pool, tenant, [event])
            self.ledger.accept(str(outbox_id))  # committed: the relay owes it to the stream
            self.written += 1
            self.by_aggregate[(str(tenant), aggregate)] = seq
            if pace_s:
                await trio.sleep(pace_s)


def check_order(messages: Sequence[jetstream.StoredMessage]) -> list[str]:
    """Problems with the order per aggregate: first deliveries must run 1, 2, 3 ... with no gap."""
    last: dict[tuple[str, str], int] = {}
    seen: set[str] = set()
    problems: list[str] = []
    for message in messages:
        if message.msg_id in seen:
            continue  # a duplicate: counted by the ledger, not an order problem
        seen.add(message.msg_id)
        key = (message.headers.get(HEADER_TENANT, ""), message.headers.get(HEADER_AGGREGATE, ""))
        seq = int(message.headers.get(HEADER_SEQ, "0"))
        expected = last.get(key, 0) + 1
        if seq != expected:
            problems.append(f"{key[1]}@{key[0][:8]}: seq {seq} after {expected - 1}")
        last[key] = seq
    return problems


def lag_detector_config(config: TriageConfig, catalog_detector: DetectorConfig) -> DetectorConfig:
    """The scenario config's ``[detectors.outbox_lag]``, else catalog row 6's detector."""
    return config.detectors.get(LAG_DETECTOR, catalog_detector)


# -- the scenario -------------------------------------------------------------------------


@dataclass
class _Watch:
    """What the scenario saw on the event bus."""

    fired_at: float | None = None
    cleared_at: float | None = None
    breaker_opened: bool = False
    events: list[str] = field(default_factory=list)

    def __call__(self, event: Event) -> None:
        match event:
            case DetectorFired(detector=name) if name == LAG_DETECTOR and self.fired_at is None:
                self.fired_at = event.at
                self.events.append(f"fired {event.value:.2f}s")
            case DetectorCleared(detector=name) if name == LAG_DETECTOR:
                self.cleared_at = event.at
                self.events.append("cleared")
            case BreakerStateChanged(new="open"):
                self.breaker_opened = True


async def run_scenario(ctx: ChaosContext) -> Outcome:
    """Scenario 6 (see the module docstring)."""
    config = ctx.config
    quick = ctx.quick
    per_phase = 20 if quick else 200
    aggregates = 2 if quick else 4
    detector_config = lag_detector_config(config, ctx.catalog.row(ROW).detector)
    fields = engine_kwargs(detector_config)
    threshold = float(fields["threshold"])
    tick_s = config.daemon.detector_tick_s

    bus = EventBus()
    watch = _Watch()
    bus.on(Event, watch)
    ledger = Ledger()
    notes: list[str] = []

    async with open_backbone(tenants=3) as backbone:
        breaker = Breaker(
            "nats_publish", **engine_kwargs(config.breakers["nats_publish"]), events=bus
        )
        detector = make_detector(LAG_DETECTOR, **fields, row=ROW, events=bus).expect(
            AgeOfNewestDetector
        )
        spec, ref = relay_child(
            pool=backbone.pool,
            client=backbone.client,
            config=config.relay,
            breaker=breaker,
            mailbox=config.mailboxes["relay"],
            shutdown_s=config.supervisors["relay"].shutdown_s,
            lag=detector,
        )

        def relay() -> RelayStatistics:
            return cast(RelayStatistics, ref.statistics())

        writer = Writer(backbone.pool, backbone.tenants, aggregates, ledger)
        retained = 0
        async with trio.open_nursery() as nursery:
            await nursery.start(spec.start)
            nursery.start_soon(evaluate_every, detector, tick_s)

            # 1. steady state
            await writer.write(per_phase, pace_s=0.002)
            drained = await wait_until(
                lambda: relay().lag_s is None and relay().published >= writer.written, 15
            )
            notes.append(f"steady: {relay().published}/{writer.written} published")
            if not drained:
                notes.append("steady state never drained")

            # 2. NATS stops; writes go on
            await trio.to_thread.run_sync(backbone.nats.stop)
            timeline.fault_started("NATS stopped")
            stopped_at = trio.current_time()
            with trio.move_on_after(threshold + 20):
                while watch.fired_at is None:
                    await writer.write(1, pace_s=0.02)
            retained = len(await run(_pending_ids, backbone.postgres.url))
            notes.append(
                f"outage: breaker opened={watch.breaker_opened}, relay {relay().state.value},"
                f" {retained} events retained in the outbox"
            )
            blocked = relay().state is RelayState.BLOCKED

            # 3. NATS is back; writes go on; the backlog replays
            await trio.to_thread.run_sync(backbone.nats.start)
            timeline.fault_ended("NATS stopped")
            restarted_at = trio.current_time()
            await writer.write(per_phase, pace_s=0.002)
            replayed = await wait_until(
                lambda: (
                    relay().lag_s is None
                    and relay().published >= writer.written
                    and not detector.firing
                ),
                30,
            )
            notes.append(
                f"recovery: replayed={replayed} in {trio.current_time() - restarted_at:.2f}s,"
                f" detector {'cleared' if watch.cleared_at is not None else 'still firing'}"
            )
            nursery.cancel_scope.cancel()

        stored = await run(jetstream.read_stream, backbone.client, config.relay.stream)
        pending = await run(_pending_ids, backbone.postgres.url)
    for message in stored:
        ledger.receive(message.msg_id)
    pending_keys = {str(i) for i in pending}
    for key in ledger.accepted:
        if ledger.received[key] and key not in pending_keys:
            ledger.settle(key)
    ledger.still_queued(pending_keys)
    order_problems = check_order(stored)
    if order_problems:
        notes.append("order broken: " + ", ".join(order_problems[:5]))
    notes.append(f"stream holds {len(stored)} messages for {len(ledger.accepted)} events")
    notes.append("events: " + ", ".join(watch.events))

    detected = watch.fired_at is not None
    mitigated = (
        watch.breaker_opened
        and blocked
        and retained > 0
        and replayed
        and watch.cleared_at is not None
        and not order_problems
        and not pending
    )
    return Outcome(
        detected=detected,
        detect_s=None if watch.fired_at is None else watch.fired_at - stopped_at,
        mitigated=mitigated,
        ledger=ledger,
        notes=notes,
    )


SCENARIO = Scenario(ROW, run_scenario)
