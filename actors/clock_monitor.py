"""The clock monitor: this host's clock against the database's, NTP-style (catalog row 16).

:class:`ClockMonitor` is an actor. Its timer tells it :class:`Measure` every
``[clock] interval_s`` (the first at once, at start). A turn takes ``samples``
readings on one connection, in one crossing of the bridge
(:func:`providers.db.threads.database_clock`)::

    t1 = wall()                      this host, just before
    ts = SELECT clock_timestamp()    the database, in between
    t4 = wall()                      this host, just after

    offset = ts - (t1 + t4) / 2      the database's clock minus this host's
    error  = (t4 - t1) / 2           the true offset lies within offset +- error

and keeps the reading with the smallest round trip (``t4 - t1``: the tightest
bars; a reading whose round trip is negative -- the wall clock stepped back --
is discarded). The whole turn is bounded by ``timeout_s``.

**Verdict** (:func:`judge`, ``limit`` = ``max_offset_s``; CockroachDB does the same
with its clock offsets)::

    |offset| - error >  limit        SKEWED     even the kindest reading is over
    |offset| + error >  limit        UNCERTAIN  the bars straddle the limit: warn
    otherwise                        IN_SYNC

``triage_clock_skew_seconds`` is the skew the reading *proves*,
``max(0, |offset| - error)``: a straddling reading never carries it over the
limit, so row 16's detector (gauge-sustained, fed the same value) fires on
proven skew only, and the Prometheus rule of ``triage rules`` agrees with it.
An uncertain reading warns: a warning log line, ``triage_clock_skew_uncertain_total``
and a :class:`ClockSkewUncertain` notice (a ticket). The signed offset and its
error are exported too (``triage_clock_offset_seconds``,
``triage_clock_offset_error_seconds``).

**The board.** Each reading is written to a :class:`ClockBoard` the wiring hands
out, for code that must allow for this host's skew without asking the actor.
The seam for join tokens (issued by another component): take the accepted
``nbf``/``exp`` leeway from :meth:`ClockBoard.leeway_s` -- the configured leeway
widened by :meth:`ClockBoard.bound_s`, the worst case ``|offset| + error`` of the
latest reading (by ``max_offset_s`` before one) -- and refuse to issue while
:meth:`ClockBoard.skewed` (the host's clock is proven off by more than the limit).

**Mitigation** (``use_safe_clock``): nothing that orders events trusts this
host's clock -- read receipts are stamped by the database
(:meth:`actors.thread_service.ThreadService.mark_read`), and
:class:`engine.hlc.HybridLogicalClock` orders messages between daemons, bounded
by the same ``max_offset_s``.

State machine (one log line per change, :class:`~engine.statelog.StateLog`)::

    UNKNOWN --reading--> IN_SYNC | UNCERTAIN | SKEWED     (any to any on each reading)
    any --database unreachable or too slow--> UNREACHABLE

**Replicas** (issue 12): runs on every replica, deliberately *not* a singleton:
it measures this host's clock, and each replica's board gates that replica's
join tokens; one monitor for all would leave the others' skew unseen.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from config.catalog import Catalog, alert_name, row_detector
from config.schema import ClockConfig, DetectorConfig, MailboxConfig, TriageConfig, engine_kwargs
from engine.actor import Actor, ActorRef, Overflow, Timer, actor_child
from engine.clock import Clock
from engine.detectors import GaugeSustainedDetector, make_detector
from engine.errors import MailboxFull, ProviderError
from engine.events import EventBus, Notice
from engine.metrics import families
from engine.statelog import StateLog
from providers.db.threads import database_clock

if TYPE_CHECKING:
    from engine.deadlines import Deadlines
    from engine.metrics import Metrics
    from engine.runtime import Runtime
    from engine.supervisor import ChildSpec, Restart
    from providers.db.pool import DbPool

__all__ = [
    "DETECTOR_OVERRIDE",
    "MEASURE",
    "METRIC",
    "ROW",
    "ClockBoard",
    "ClockMonitor",
    "ClockMonitorMessage",
    "ClockMonitorStatistics",
    "ClockReading",
    "ClockSkewUncertain",
    "ClockState",
    "DatabaseClock",
    "Measure",
    "Sample",
    "Verdict",
    "best_sample",
    "build_detector",
    "clock_monitor_child",
    "detector_config",
    "judge",
]

log = logging.getLogger("triage.clock")

ROW = 16
METRIC = "triage_clock_skew_seconds"
#: A ``[detectors.<name>]`` with this name replaces row 16's detector settings.
DETECTOR_OVERRIDE = "clock_skew"


class Verdict(enum.Enum):
    IN_SYNC = "in_sync"
    UNCERTAIN = "uncertain"
    SKEWED = "skewed"


class ClockState(enum.Enum):
    UNKNOWN = "unknown"
    IN_SYNC = "in_sync"
    UNCERTAIN = "uncertain"
    SKEWED = "skewed"
    UNREACHABLE = "unreachable"


_STATE_OF = {
    Verdict.IN_SYNC: ClockState.IN_SYNC,
    Verdict.UNCERTAIN: ClockState.UNCERTAIN,
    Verdict.SKEWED: ClockState.SKEWED,
}


class Sample(msgspec.Struct, frozen=True, array_like=True):
    """One NTP-style reading: host wall time before (``t1``) and after (``t4``), database ``ts``."""

    t1: float
    ts: float
    t4: float

    @property
    def rtt_s(self) -> float:
        return self.t4 - self.t1

    @property
    def offset_s(self) -> float:
        """The database's clock minus this host's (positive: the host is behind)."""
        return self.ts - (self.t1 + self.t4) / 2

    @property
    def error_s(self) -> float:
        return self.rtt_s / 2


def best_sample(samples: Sequence[Sample]) -> Sample | None:
    """The sample with the smallest round trip (the first of equals); None if none is usable
    (a negative round trip means the wall clock stepped back during it)."""
    usable = [s for s in samples if s.rtt_s >= 0 and math.isfinite(s.offset_s)]
    return min(usable, key=lambda s: s.rtt_s) if usable else None


def judge(offset_s: float, error_s: float, limit_s: float) -> Verdict:
    """SKEWED if the whole interval ``offset +- error`` lies beyond ``+-limit``,
    UNCERTAIN if it straddles the limit, IN_SYNC if it lies within."""
    if abs(offset_s) - error_s > limit_s:
        return Verdict.SKEWED
    if abs(offset_s) + error_s > limit_s:
        return Verdict.UNCERTAIN
    return Verdict.IN_SYNC


class ClockReading(msgspec.Struct, frozen=True, kw_only=True):
    """A judged reading, as the board holds it."""

    offset_s: float
    error_s: float
    rtt_s: float
    verdict: Verdict
    at: float  # Trio time of the reading
    wall: float  # this host's wall time at the reading (t4)

    @property
    def proven_skew_s(self) -> float:
        """The skew this reading proves: ``max(0, |offset| - error)``."""
        return max(0.0, abs(self.offset_s) - self.error_s)

    @property
    def bound_s(self) -> float:
        """The worst case: ``|offset| + error``."""
        return abs(self.offset_s) + self.error_s


class ClockBoard:
    """The latest reading of this host's clock against the database's. Written by the
    monitor, read by anyone (join-token issuing: see the module docstring)."""

    __slots__ = ("_reading",)

    def __init__(self) -> None:
        self._reading: ClockReading | None = None

    def update(self, reading: ClockReading) -> None:
        self._reading = reading

    @property
    def reading(self) -> ClockReading | None:
        """The latest reading, or None before the first."""
        return self._reading

    def bound_s(self) -> float | None:
        """How far off this host's clock may be (``|offset| + error``); None before a reading."""
        reading = self._reading
        return None if reading is None else reading.bound_s

    def leeway_s(self, base_s: float, *, unknown_s: float) -> float:
        """A clock leeway for checks against this host's clock (a join token's ``nbf`` and
        ``exp``): ``base_s`` plus :meth:`bound_s`, or plus ``unknown_s`` before a reading."""
        bound = self.bound_s()
        return base_s + (unknown_s if bound is None else bound)

    def skewed(self) -> bool:
        """True while the latest reading proves skew beyond the limit."""
        reading = self._reading
        return reading is not None and reading.verdict is Verdict.SKEWED


class ClockSkewUncertain(Notice, frozen=True, kw_only=True):
    """Row 16's warning: a reading whose error bars straddle the limit."""

    offset_s: float
    error_s: float
    limit_s: float
    row: int | None = ROW
    severity: str = "ticket"

    def alert_key(self) -> str:
        return "clock_skew_uncertain"


class Measure(msgspec.Struct, frozen=True, tag=True):
    """Take a turn of readings now (the timer's tick)."""


MEASURE = Measure()
ClockMonitorMessage = Measure


class ClockMonitorStatistics(msgspec.Struct, frozen=True, kw_only=True):
    state: ClockState
    turns: int
    failures: int
    uncertain: int
    last: ClockReading | None


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.skew = Gauge(
            METRIC,
            "Skew between the host clock and the database clock that the latest reading"
            " proves: |offset| minus its error bound",
            registry=registry,
        )
        self.offset = Gauge(
            "triage_clock_offset_seconds",
            "The database clock minus the host clock, latest reading (midpoint)",
            registry=registry,
        )
        self.error = Gauge(
            "triage_clock_offset_error_seconds",
            "Half the round trip of the latest clock reading: the offset's error bound",
            registry=registry,
        )
        self.uncertain = Counter(
            "triage_clock_skew_uncertain",
            "Clock readings whose error bars straddled the skew limit (warned, not fired)",
            registry=registry,
        )
        self.failures = Counter(
            "triage_clock_probe_failures",
            "Clock readings that failed (database unreachable or too slow)",
            registry=registry,
        )


#: Takes ``n`` readings: the monitor's seam to the database (a fake in tests).
Sampler = Callable[[int], Awaitable[Sequence[Sample]]]


class DatabaseClock:
    """The sampler of the daemon: ``database_clock`` on ``pool`` with ``wall``.

    ``query`` returns one timestamptz; the chaos scenario slows it down on the
    server side to widen the round trip.
    """

    def __init__(
        self, pool: DbPool, wall: Callable[[], float], *, query: str = "SELECT clock_timestamp()"
    ) -> None:
        self.pool = pool
        self.wall = wall
        self.query = query

    async def __call__(self, samples: int) -> Sequence[Sample]:
        readings = await self.pool.run_unit(database_clock, self.wall, samples, self.query)
        return [Sample(*r) for r in readings]


def detector_config(config: TriageConfig, catalog: Catalog) -> DetectorConfig:
    """Row 16's detector: ``[detectors.clock_skew]`` if set, else the catalog row's."""
    return row_detector(config, catalog, ROW, DETECTOR_OVERRIDE)


def build_detector(
    config: TriageConfig, catalog: Catalog, *, runtime: Runtime | None = None
) -> GaugeSustainedDetector:
    """Row 16's detector, named like its alert."""
    common: dict[str, Any] = {}
    if runtime is not None:
        common = {"clock": runtime.clock, "events": runtime.events, "metrics": runtime.metrics}
    return make_detector(
        alert_name(catalog.row(ROW)),
        row=ROW,
        **engine_kwargs(detector_config(config, catalog)),
        **common,
    ).expect(GaugeSustainedDetector)


class ClockMonitor(Actor[ClockMonitorMessage]):
    """Measure every ``interval_s``; see the module docstring."""

    name = "clock_monitor"

    def __init__(
        self,
        *,
        sampler: Sampler,
        config: ClockConfig,
        board: ClockBoard,
        detector: GaugeSustainedDetector | None = None,
        registry: CollectorRegistry | None = None,
        events: EventBus | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.sampler = sampler
        self.config = config
        self.board = board
        self.detector = detector
        self.events = events
        self.clock = clock if clock is not None else Clock()
        self.states = StateLog(
            "clock monitor",
            ClockState.UNKNOWN,
            log,
            warn={ClockState.UNCERTAIN, ClockState.SKEWED, ClockState.UNREACHABLE},
        )
        self.turns = 0
        self.failures = 0
        self.uncertain = 0
        self._metrics = families(registry, _Metrics) if registry is not None else None

    async def init(self) -> None:
        with contextlib.suppress(MailboxFull):  # a full mailbox: the tick comes
            self.ref.tell_nowait(MEASURE)

    def timers(self) -> Sequence[Timer]:
        return [Timer(self.config.interval_s, MEASURE)]

    def statistics(self) -> ClockMonitorStatistics:
        return ClockMonitorStatistics(
            state=self.states.state,
            turns=self.turns,
            failures=self.failures,
            uncertain=self.uncertain,
            last=self.board.reading,
        )

    async def handle(self, message: ClockMonitorMessage) -> None:
        match message:
            case Measure():
                self.turns += 1
                sample = await self._sample()
                if sample is not None:
                    self._record(sample)

    async def _sample(self) -> Sample | None:
        why = "timed out"
        with trio.move_on_after(self.config.timeout_s):
            try:
                samples = await self.sampler(self.config.samples)
            except ProviderError as exc:
                why = str(exc)
            else:
                best = best_sample(samples)
                if best is not None:
                    return best
                why = "no usable reading (the wall clock stepped back)"
        self.failures += 1
        if self._metrics is not None:
            self._metrics.failures.inc()
        self.states.enter(ClockState.UNREACHABLE, why)
        return None

    def _record(self, sample: Sample) -> None:
        limit = self.config.max_offset_s
        verdict = judge(sample.offset_s, sample.error_s, limit)
        reading = ClockReading(
            offset_s=sample.offset_s,
            error_s=sample.error_s,
            rtt_s=sample.rtt_s,
            verdict=verdict,
            at=self.clock.now(),
            wall=sample.t4,
        )
        self.board.update(reading)
        proven = reading.proven_skew_s
        if self.detector is not None:
            self.detector.set(proven)
        if self._metrics is not None:
            self._metrics.skew.set(proven)
            self._metrics.offset.set(sample.offset_s)
            self._metrics.error.set(sample.error_s)
        detail = f"offset {sample.offset_s:+.3f} s +- {sample.error_s:.3f} s, limit {limit:g} s"
        self.states.enter(_STATE_OF[verdict], detail)
        if verdict is Verdict.UNCERTAIN:
            self.uncertain += 1
            if self._metrics is not None:
                self._metrics.uncertain.inc()
            if self.events is not None:
                self.events.emit(
                    ClockSkewUncertain(
                        at=reading.at,
                        wall=self.clock.wall(),
                        offset_s=sample.offset_s,
                        error_s=sample.error_s,
                        limit_s=limit,
                    )
                )


def clock_monitor_child(
    *,
    sampler: Sampler,
    config: ClockConfig,
    board: ClockBoard,
    mailbox: MailboxConfig,
    shutdown_s: float,
    detector: GaugeSustainedDetector | None = None,
    registry: CollectorRegistry | None = None,
    events: EventBus | None = None,
    clock: Clock | None = None,
    restart: Restart | None = None,
    deadlines: Deadlines | None = None,
    metrics: Metrics | None = None,
) -> tuple[ChildSpec, ActorRef[ClockMonitorMessage]]:
    """The monitor's child spec (id ``clock_monitor``) and ref, its mailbox from ``mailbox``."""
    factory = functools.partial(
        ClockMonitor, sampler=sampler, config=config, board=board, detector=detector,
        registry=registry, events=events, clock=clock,
    )  # fmt: skip
    return actor_child(
        ClockMonitor.name,
        factory,
        capacity=mailbox.capacity,
        overflow=Overflow(mailbox.overflow),
        restart=restart,
        shutdown_s=shutdown_s,
        deadlines=deadlines,
        metrics=metrics,
    )
