"""Scenario 16, clock skew: NTP drift on a host; the monitor sees it, receipts stay in order.

The scenario owns its server: an embedded PostgreSQL, migrated, one tenant with
a thread and two participants. The clock monitor runs with ``[clock]`` and row
16's detector (``[detectors.clock_skew]`` if set: chaos.toml shortens ``for_s``)
against that real database, through the daemon's role; only its wall clock is
shifted (:class:`ShiftedWall`, what ``runtime.clock.wall`` is in the daemon).

1. Trigger, drift: the host's wall clock runs 800 ms fast. The monitor's
   readings (smallest round trip of ``samples``) prove skew beyond
   ``max_offset_s``: the detector must fire (``detect_s`` from the shift), its
   ``DetectorFired`` being the alert, and the board must say skewed.
2. Meanwhile two daemons -- one on the skewed host, one on a good one -- write
   read receipts in turn, each after the previous one committed. A host-clock
   stamp would put them out of order (counted: the trigger is real); the
   database stamps them (``clock_timestamp()``, migration 0011), and the thread's
   receipts must come back in exactly the order they were written.
3. The clock is fixed (shift 0): the detector must clear (below 250 ms).
4. The warn case: a second monitor whose host is 450 ms fast, on a slow link
   (the clock query sleeps ``SLOW_LINK_S`` on each side of ``clock_timestamp()``,
   server-side, so the round trip is wide and symmetric). Its error bars
   straddle the limit: it must warn (``triage_clock_skew_uncertain_total``) and
   never fire.

Judged from outside: detected = fired on proven skew, not on the straddling
readings, which warned; mitigated = the receipts in the database are in write
order, the alert cleared once the clock was fixed. ``lost``: receipts written
and not found; ``duplicates``: a receipt found twice.
"""

from __future__ import annotations

import functools
import itertools
import time
import uuid

import asyncpg
import msgspec
import trio
from prometheus_client import CollectorRegistry

from actors.clock_monitor import (
    ROW,
    ClockBoard,
    ClockMonitorMessage,
    ClockMonitorStatistics,
    DatabaseClock,
    Verdict,
    clock_monitor_child,
    detector_config,
)
from actors.thread_service import Participant, ThreadService
from bench.chaos.fixtures import create_tenants, evaluate_every, wait_until
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from bench.chaos.scenario_db import FAST_POSTGRES
from config import TriageConfig, engine_kwargs
from config.catalog import alert_name
from config.schema import ClockConfig
from engine.actor import ActorRef
from engine.clock import Clock
from engine.detectors import GaugeSustainedDetector, make_detector
from engine.events import DetectorCleared, DetectorFired, Event, EventBus
from providers.bridge import open_bridge, run
from providers.db import DAEMON_ROLE, migrate
from providers.db.pool import DbPool, open_pool
from providers.embedded import EmbeddedPostgres
from providers.services import postgres_url_with

__all__ = ["ROW", "SCENARIO", "ShiftedWall", "run_scenario"]

SKEW_S = 0.8
WARN_SKEW_S = 0.45
#: Server-side delay on each side of the clock reading in the warn case (rtt ~ 2x this).
SLOW_LINK_S = 0.1
SLOW_CLOCK = f"SELECT chaos_slow_clock({SLOW_LINK_S})"

_SLOW_CLOCK_FUNCTION = """
CREATE FUNCTION chaos_slow_clock(delay_s float8) RETURNS timestamptz
    LANGUAGE plpgsql AS $$
DECLARE stamp timestamptz;
BEGIN
    PERFORM pg_sleep(delay_s);
    stamp := clock_timestamp();
    PERFORM pg_sleep(delay_s);
    RETURN stamp;
END $$;
GRANT EXECUTE ON FUNCTION chaos_slow_clock(float8) TO triage_app;
"""


Monitor = tuple[ClockBoard, ActorRef[ClockMonitorMessage]]


class ShiftedWall:
    """This host's wall clock, ``shift_s`` fast (negative: slow)."""

    def __init__(self, shift_s: float = 0.0) -> None:
        self.shift_s = shift_s

    def __call__(self) -> float:
        return time.time() + self.shift_s


class _Watch:
    def __init__(self, name: str) -> None:
        self.name = name
        self.fired_at: float | None = None
        self.cleared_at: float | None = None
        self.fired = 0

    def __call__(self, event: Event) -> None:
        match event:
            case DetectorFired(detector=name) if name == self.name:
                self.fired += 1
                if self.fired_at is None:
                    self.fired_at = trio.current_time()
            case DetectorCleared(detector=name) if name == self.name:
                self.cleared_at = trio.current_time()


async def _owner_setup(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(_SLOW_CLOCK_FUNCTION)
    finally:
        await conn.close()


async def _receipt_order(url: str) -> list[int]:
    """Every receipt id in database-clock order, read as the superuser."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT id FROM read_receipts ORDER BY read_at, id")
        return [int(r["id"]) for r in rows]
    finally:
        await conn.close()


def _detector(ctx: ChaosContext, bus: EventBus) -> GaugeSustainedDetector:
    return make_detector(
        alert_name(ctx.catalog.row(ROW)),
        row=ROW,
        **engine_kwargs(detector_config(ctx.config, ctx.catalog)),
        events=bus,
    ).expect(GaugeSustainedDetector)


async def _monitor(
    config: TriageConfig,
    pool: DbPool,
    wall: ShiftedWall,
    detector: GaugeSustainedDetector,
    registry: CollectorRegistry,
    bus: EventBus,
    *,
    task_status: trio.TaskStatus[Monitor] = trio.TASK_STATUS_IGNORED,
    query: str = "SELECT clock_timestamp()",
    clock_config: ClockConfig | None = None,
) -> None:
    """Run one monitor (and its detector's evaluation) until cancelled."""
    board = ClockBoard()
    section = config.clock if clock_config is None else clock_config
    spec, ref = clock_monitor_child(
        sampler=DatabaseClock(pool, wall, query=query),
        config=section,
        board=board,
        mailbox=config.mailboxes["monitor"],
        shutdown_s=1.0,
        detector=detector,
        registry=registry,
        events=bus,
        clock=Clock(wall),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        nursery.start_soon(evaluate_every, detector, config.daemon.detector_tick_s)
        task_status.started((board, ref))


async def run_scenario(ctx: ChaosContext) -> Outcome:
    config = ctx.config
    receipts = 20 if ctx.quick else 200
    wait_s = 10.0 if ctx.quick else 60.0
    ledger = Ledger()
    notes: list[str] = []
    bus = EventBus()
    detector = _detector(ctx, bus)
    watch = _Watch(detector.name)
    bus.on(Event, watch)
    registry = CollectorRegistry()
    wall = ShiftedWall()
    skewed_stats: ClockMonitorStatistics | None = None
    host_inversions = 0
    written: list[int] = []
    cleared = False
    warn_fired = 0
    warn_stats: ClockMonitorStatistics | None = None
    warn_verdicts: set[Verdict] = set()

    postgres = EmbeddedPostgres(settings=FAST_POSTGRES)
    try:
        await trio.to_thread.run_sync(postgres.start)
        async with open_bridge():
            await migrate(postgres.url)
            await run(_owner_setup, postgres.url)
            [tenant] = await run(create_tenants, postgres.url, 1)
            daemon_url = postgres_url_with(postgres.url, user=DAEMON_ROLE)
            async with open_pool(daemon_url, config.database, close_s=2.0) as pool:
                threads = ThreadService(pool, config.threads)
                thread = await threads.create_thread(tenant)
                people = ("patient-1", "clinician-2")
                for who in people:
                    await threads.add_participant(
                        tenant, thread, Participant(tenant_id=tenant, participant_id=who, role="x")
                    )

                async with trio.open_nursery() as nursery:
                    board, ref = await nursery.start(
                        _monitor, config, pool, wall, detector, registry, bus
                    )
                    await wait_until(lambda: board.reading is not None, wait_s)
                    started = trio.current_time()
                    wall.shift_s = SKEW_S  # NTP drift: this host runs fast
                    await wait_until(lambda: watch.fired_at is not None, wait_s)
                    host_inversions = await _write_receipts(
                        threads, tenant, thread, people, wall, receipts, ledger, written
                    )
                    skewed_stats = ref.statistics()
                    wall.shift_s = 0.0  # chrony fixed it
                    cleared = await wait_until(lambda: watch.cleared_at is not None, wait_s)
                    nursery.cancel_scope.cancel()

                # The warn case: 450 ms fast, on a slow link.
                warn_bus = EventBus()
                warn_detector = _detector(ctx, warn_bus)
                warn_watch = _Watch(warn_detector.name)
                warn_bus.on(Event, warn_watch)
                warn_registry = CollectorRegistry()
                slow = msgspec.structs.replace(
                    config.clock, samples=2, timeout_s=1.0, interval_s=1.0
                )
                async with trio.open_nursery() as nursery:
                    warn_board, warn_ref = await nursery.start(
                        functools.partial(
                            _monitor, config, pool, ShiftedWall(WARN_SKEW_S), warn_detector,
                            warn_registry, warn_bus, query=SLOW_CLOCK, clock_config=slow,
                        )
                    )  # fmt: skip
                    for _ in range(3 if ctx.quick else 10):
                        await trio.sleep(slow.interval_s)  # a turn at a time
                        if warn_board.reading is not None:
                            warn_verdicts.add(warn_board.reading.verdict)
                    warn_stats = warn_ref.statistics()
                    nursery.cancel_scope.cancel()
                warn_fired = warn_watch.fired
            order = await run(_receipt_order, postgres.url)
    finally:
        await trio.to_thread.run_sync(postgres.close)

    for receipt in order:
        ledger.settle(str(receipt))
        ledger.receive(str(receipt))
    in_order = order == written
    uncertain = warn_registry.get_sample_value("triage_clock_skew_uncertain_total") or 0.0
    skew_reading = skewed_stats.last if skewed_stats is not None else None
    detected = (
        watch.fired_at is not None
        and skew_reading is not None
        and skew_reading.verdict is Verdict.SKEWED
        and warn_fired == 0
        and uncertain >= 1
        # On a loaded machine one slow reading may be wider still (in sync); never skewed.
        and Verdict.UNCERTAIN in warn_verdicts
        and Verdict.SKEWED not in warn_verdicts
    )
    mitigated = in_order and cleared and len(written) == receipts
    if skew_reading is not None:
        notes.append(
            f"skew +{SKEW_S:g} s: offset {skew_reading.offset_s:+.4f} s"
            f" +- {skew_reading.error_s:.4f} s ({skew_reading.verdict.value})"
        )
    warn_reading = warn_stats.last if warn_stats is not None else None
    if warn_reading is not None:
        notes.append(
            f"skew +{WARN_SKEW_S:g} s on a slow link: offset {warn_reading.offset_s:+.4f} s"
            f" +- {warn_reading.error_s:.4f} s, verdicts {sorted(v.value for v in warn_verdicts)},"
            f" warned {int(uncertain)}, fired {warn_fired}"
        )
    notes.append(
        f"receipts {len(written)}: database order matches write order {in_order};"
        f" host-clock stamps would have inverted {host_inversions} pairs;"
        f" alert cleared after the fix {cleared}"
    )
    return Outcome(
        detected=detected,
        detect_s=None if watch.fired_at is None else watch.fired_at - started,
        mitigated=mitigated,
        ledger=ledger,
        notes=notes,
    )


async def _write_receipts(
    threads: ThreadService,
    tenant: uuid.UUID,
    thread: uuid.UUID,
    people: tuple[str, str],
    skewed: ShiftedWall,
    count: int,
    ledger: Ledger,
    written: list[int],
) -> int:
    """Receipts in turn from the skewed host and a good one; each after the previous
    committed. Returns how many consecutive pairs host-clock stamps would invert."""
    good = ShiftedWall()
    host_stamps: list[float] = []
    for n in range(count):
        host = skewed if n % 2 == 0 else good
        host_stamps.append(host())
        receipt = await threads.mark_read(tenant, thread, people[n % 2])
        written.append(receipt.id)
        ledger.accept(str(receipt.id))
    return sum(1 for x, y in itertools.pairwise(host_stamps) if y < x)


SCENARIO = Scenario(ROW, run_scenario)
