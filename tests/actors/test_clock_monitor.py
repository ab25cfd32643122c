"""The clock monitor: the NTP arithmetic, the verdicts, the actor on the autojump clock,
and the readings against a real PostgreSQL."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import pytest
import trio
from prometheus_client import CollectorRegistry

from actors.alerts import _fields
from actors.clock_monitor import (
    METRIC,
    ClockBoard,
    ClockMonitorMessage,
    ClockSkewUncertain,
    ClockState,
    DatabaseClock,
    Sample,
    Verdict,
    best_sample,
    clock_monitor_child,
    judge,
)
from config.schema import ClockConfig, DatabaseConfig, MailboxConfig
from engine.actor import ActorRef
from engine.detectors import GaugeSustainedDetector
from engine.errors import ProviderUnavailable
from engine.events import Event, EventBus
from providers.db import DAEMON_ROLE, migrate
from providers.db.pool import DbPool, open_pool
from providers.services import postgres_url_with

# -- the arithmetic --------------------------------------------------------------------


def test_offset_and_error_follow_the_ntp_formula() -> None:
    sample = Sample(t1=100.0, ts=99.5, t4=100.25)
    assert sample.rtt_s == 0.25
    assert sample.offset_s == 99.5 - 100.125  # ts - (t1 + t4) / 2
    assert sample.error_s == 0.125


def test_the_smallest_round_trip_wins_and_backward_steps_are_dropped() -> None:
    slow = Sample(10.0, 10.5, 11.0)  # rtt 1.0
    fast = Sample(20.0, 20.0625, 20.125)  # rtt 0.125
    tied = Sample(30.0, 31.0, 30.125)  # rtt 0.125, later
    stepped_back = Sample(40.0, 40.0, 39.0)  # rtt -1: the wall clock jumped back
    assert best_sample([slow, fast, tied, stepped_back]) is fast
    assert best_sample([stepped_back]) is None
    assert best_sample([]) is None


@pytest.mark.parametrize(
    ("offset", "error", "verdict"),
    [
        (0.0, 0.001, Verdict.IN_SYNC),
        (0.375, 0.125, Verdict.IN_SYNC),  # the bars touch the limit: not over it
        (0.5, 0.0, Verdict.IN_SYNC),  # skew > 500 ms fires; exactly 500 does not
        (0.5, 0.125, Verdict.UNCERTAIN),
        (-0.45, 0.125, Verdict.UNCERTAIN),  # straddles: warn, do not fire
        (0.75, 0.25, Verdict.UNCERTAIN),  # 0.5 .. 1.0: the kindest reading is at the limit
        (0.8, 0.001, Verdict.SKEWED),
        (-0.8, 0.25, Verdict.SKEWED),
    ],
)
def test_the_verdict_looks_at_both_ends_of_the_bars(
    offset: float, error: float, verdict: Verdict
) -> None:
    assert judge(offset, error, 0.5) is verdict


def test_an_empty_board_allows_the_configured_bound() -> None:
    board = ClockBoard()
    assert board.reading is None and board.bound_s() is None and not board.skewed()
    assert board.leeway_s(5.0, unknown_s=0.5) == 5.5  # no reading yet: max_offset_s


# -- the actor on the autojump clock -----------------------------------------------------


class FakeDatabase:
    """Samples of a database clock that reads Trio time, seen from a host ``shift_s`` ahead.

    Each sample's round trip comes from ``rtts_s`` in turn (symmetric: ``ts`` in the
    middle). Dyadic numbers only, so every offset is exact.
    """

    def __init__(self) -> None:
        self.shift_s = 0.0
        self.rtts_s: Sequence[float] = (0.25, 0.0625, 0.125)
        self.fail = False
        self.calls: list[float] = []

    async def __call__(self, samples: int) -> Sequence[Sample]:
        now = trio.current_time()
        self.calls.append(now)
        if self.fail:
            raise ProviderUnavailable("postgres: unavailable (test)")
        rtts = [self.rtts_s[i % len(self.rtts_s)] for i in range(samples)]
        return [Sample(now + self.shift_s, now + rtt / 2, now + rtt + self.shift_s) for rtt in rtts]


MAILBOX = MailboxConfig(capacity=4, overflow="drop_newest")


@dataclass
class Rig:
    database: FakeDatabase
    board: ClockBoard
    detector: GaugeSustainedDetector
    registry: CollectorRegistry
    seen: list[Event]
    ref: ActorRef[ClockMonitorMessage]


@pytest.fixture
async def monitor(autojump_clock: trio.abc.Clock) -> AsyncIterator[Rig]:
    database = FakeDatabase()
    board = ClockBoard()
    registry = CollectorRegistry()
    bus = EventBus()
    seen: list[Event] = []
    bus.on(ClockSkewUncertain, seen.append)
    detector = GaugeSustainedDetector(
        "skew", metric=METRIC, threshold=0.5, clear_threshold=0.25, for_s=2.0, row=16
    )
    config = ClockConfig(interval_s=1.0, samples=3, max_offset_s=0.5, timeout_s=0.5)
    spec, ref = clock_monitor_child(
        sampler=database, config=config, board=board, mailbox=MAILBOX, shutdown_s=1.0,
        detector=detector, registry=registry, events=bus,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        yield Rig(database, board, detector, registry, seen, ref)
        nursery.cancel_scope.cancel()


async def test_in_sync_then_skewed_fires_after_for_s_then_clears(
    monitor: Rig, autojump_clock: trio.abc.Clock
) -> None:
    database, board, detector, registry, seen, ref = (
        monitor.database, monitor.board, monitor.detector, monitor.registry, monitor.seen,
        monitor.ref,
    )  # fmt: skip
    await trio.sleep(0.5)
    assert database.calls == [0.0]  # the first turn at once, not a tick later
    reading = board.reading
    assert reading is not None
    # The smallest round trip of the three (1/16 s) was kept.
    assert (reading.offset_s, reading.error_s, reading.verdict) == (0.0, 0.03125, Verdict.IN_SYNC)
    assert ref.statistics().state is ClockState.IN_SYNC
    assert registry.get_sample_value(METRIC) == 0.0

    database.shift_s = 0.75  # NTP drift: the host runs 750 ms fast
    await trio.sleep_until(1.5)  # the turn at t=1 saw it
    reading = board.reading
    assert reading is not None and reading.at == 1.0
    assert (reading.offset_s, reading.verdict) == (-0.75, Verdict.SKEWED)
    assert reading.proven_skew_s == 0.75 - 0.03125
    assert board.skewed() and board.bound_s() == 0.75 + 0.03125
    assert board.leeway_s(5.0, unknown_s=0.5) == 5.0 + 0.78125  # the join-token seam
    assert registry.get_sample_value(METRIC) == 0.71875
    assert registry.get_sample_value("triage_clock_offset_seconds") == -0.75
    assert not detector.evaluate().firing  # held since t=1, for_s is 2
    await trio.sleep_until(2.999)
    assert not detector.evaluate().firing
    await trio.sleep_until(3.0)
    assert detector.evaluate().firing
    assert seen == []  # proven skew fires; it does not warn

    database.shift_s = 0.0  # chrony fixed it
    await trio.sleep_until(4.5)
    assert not detector.evaluate().firing  # cleared at once (below 0.25)
    assert ref.statistics().state is ClockState.IN_SYNC


async def test_bars_straddling_the_limit_warn_and_never_fire(
    monitor: Rig, autojump_clock: trio.abc.Clock
) -> None:
    database, board, detector, registry, seen, ref = (
        monitor.database, monitor.board, monitor.detector, monitor.registry, monitor.seen,
        monitor.ref,
    )  # fmt: skip
    database.shift_s = 0.5
    database.rtts_s = (0.25,)  # a slow link: +- 125 ms
    for _ in range(10):
        await trio.sleep(1.0)
        assert not detector.evaluate().firing
    await trio.sleep(0.5)  # t = 10.5: the turn at t = 10 is done
    reading = board.reading
    assert reading is not None
    assert (reading.offset_s, reading.error_s, reading.verdict) == (-0.5, 0.125, Verdict.UNCERTAIN)
    assert registry.get_sample_value(METRIC) == 0.375  # what the reading proves
    stats = ref.statistics()
    assert stats.state is ClockState.UNCERTAIN
    # Turns at t = 0, 1, ..., 10; the first ran as the actor started, before the shift.
    assert (stats.turns, stats.uncertain) == (11, 10)
    assert registry.get_sample_value("triage_clock_skew_uncertain_total") == 10.0
    assert len(seen) == 10
    notice = seen[0]
    assert isinstance(notice, ClockSkewUncertain)
    assert (notice.offset_s, notice.error_s, notice.limit_s) == (-0.5, 0.125, 0.5)


async def test_an_unreachable_database_is_a_failed_turn_not_a_reading(
    monitor: Rig, autojump_clock: trio.abc.Clock
) -> None:
    database, board, registry, ref = monitor.database, monitor.board, monitor.registry, monitor.ref
    await trio.sleep(0.5)
    first = board.reading
    database.fail = True
    await trio.sleep(2.0)
    assert board.reading is first  # the last reading stays on the board
    stats = ref.statistics()
    assert (stats.state, stats.failures) == (ClockState.UNREACHABLE, 2)
    assert registry.get_sample_value("triage_clock_probe_failures_total") == 2.0


# -- real PostgreSQL ----------------------------------------------------------------------

DB_CONFIG = DatabaseConfig(pool_min=1, pool_max=2, connect_timeout_s=2.0, command_timeout_s=2.0)


@pytest.fixture
async def db(bridge: object, postgres_url: str) -> AsyncIterator[DbPool]:
    await migrate(postgres_url)
    url = postgres_url_with(postgres_url, user=DAEMON_ROLE)
    async with open_pool(url, DB_CONFIG, close_s=2.0) as pool:
        yield pool


@pytest.mark.parametrize("shift_s", [0.0, 0.8, -0.45])
async def test_a_shifted_wall_clock_is_measured_within_its_error_bars(
    db: DbPool, shift_s: float
) -> None:
    """Host and database share this machine's clock: the true offset is exactly -shift."""
    sampler = DatabaseClock(db, lambda: time.time() + shift_s)
    samples = await sampler(5)
    assert len(samples) == 5
    best = best_sample(samples)
    assert best is not None and best.rtt_s == min(s.rtt_s for s in samples)
    resolution = 1e-5  # PostgreSQL's microseconds, the float wall clock
    assert abs(best.offset_s - (-shift_s)) <= best.error_s + resolution
    assert best.error_s < 0.05
    expected = Verdict.SKEWED if shift_s == 0.8 else Verdict.IN_SYNC
    assert judge(best.offset_s, best.error_s, 0.5) is expected


def test_the_notice_logs_as_the_alert_sink_logs_it() -> None:
    notice = ClockSkewUncertain(at=1.0, wall=2.0, offset_s=-0.5, error_s=0.125, limit_s=0.5)
    logger = logging.getLogger("tests.clock")
    record = logger.makeRecord(
        logger.name, logging.WARNING, __file__, 1, "m", (), None, extra=_fields(notice)
    )
    assert (record.offset_s, record.row, record.severity) == (-0.5, 16, "ticket")  # type: ignore[attr-defined]
