"""Push delivery feedback and its watchdog (catalog row 2: push feedback stall).

Two supervised children (see :func:`child_specs`):

:class:`PushFeedback`
    Pulls feedback from each :class:`FeedbackPuller` (FCM, APNs) in turn, hands
    the receipts to the :class:`ReceiptSink` (which settles the dispatch rows) in
    chunks of ``batch_size``, and acks them **only after** the sink applied them:
    feedback whose apply failed is not acked and comes again. An empty round
    waits ``poll_interval_s``. Every applied batch sets the gauge
    ``triage_push_feedback_last_timestamp_seconds`` (Unix time of the newest
    feedback: the receipts' ``occurred_at``, else the wall clock) and touches
    row 2's :class:`~engine.detectors.AgeOfNewestDetector`.

    Watchdog (``force_refresh_feedback``): every ``watchdog_interval_s`` in which
    no feedback arrived, it asks ``outstanding()`` how many push dispatches still
    wait for feedback. None waiting: the system is idle, not stalled, and the
    stall clock restarts (so the clock counts from the newest feedback or the
    last check that found nothing outstanding, whichever is later). Some waiting and no feedback for ``stall_after_s``:
    the actor counts ``triage_push_feedback_refreshes_total``, emits a
    :class:`FeedbackStallAlert` and raises :class:`FeedbackStalled`, so its
    supervisor restarts it; every incarnation after the first starts by
    ``reset()``-ing its sources (a fresh session) and gives them a whole
    ``stall_after_s`` again.

:class:`StaleSweep`
    Every ``sweep_interval_s``, moves dispatches stuck in ``dispatched`` for longer
    than ``stale_after_s`` to ``unknown`` through the :data:`StaleSweeper`
    (``mark_stale_unknown``), ``sweep_limit`` rows per call until a call marks
    fewer, and counts them in ``triage_push_stale_unknown_total``.

The detector, the gauge and the counters live in the actor *object*, which
outlives its incarnations (the child's ``start`` is the bound :meth:`run`), so
a restart never resets the feedback age.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from engine.clock import Clock
from engine.detectors import AgeOfNewestDetector
from engine.errors import ConfigError, ProviderError, TriageError
from engine.events import EventBus, Notice
from engine.metrics import families
from engine.supervisor import ChildSpec, Restart
from providers.channel import ChannelName, Receipt

__all__ = [
    "ROW",
    "FeedbackPuller",
    "FeedbackStallAlert",
    "FeedbackStalled",
    "FeedbackState",
    "FeedbackStats",
    "OutstandingProbe",
    "PushFeedback",
    "ReceiptSink",
    "StaleSweep",
    "StaleSweeper",
    "child_specs",
]

log = logging.getLogger("triage.push_feedback")

ROW = 2


class FeedbackPuller(Protocol):
    """One provider's feedback stream (``providers.push_feedback.FeedbackSource``)."""

    async def pull(self) -> tuple[Sequence[Receipt], Sequence[str]]:
        """The receipts available now and the ids that ack them (empty: nothing new)."""
        ...

    async def ack(self, ack_ids: list[str]) -> None:
        """Acknowledge receipts already applied: they are not delivered again."""
        ...

    async def reset(self) -> None:
        """Drop the current session and open a fresh one."""
        ...


class ReceiptSink(Protocol):
    """Applies receipts to the dispatch rows (``apply_receipts_async`` over the bridge)."""

    async def apply(self, receipts: Sequence[Receipt]) -> object: ...


#: ``outstanding()``: how many push dispatches still wait for their feedback.
OutstandingProbe = Callable[[], Awaitable[int]]

#: ``sweeper(channel, older_than_s, limit)``: mark at most ``limit`` dispatches of
#: ``channel`` that sat in ``dispatched`` longer than ``older_than_s`` as ``unknown``;
#: returns how many it marked.
StaleSweeper = Callable[[str, float, int], Awaitable[int]]


class FeedbackStalled(TriageError):
    """No push feedback for ``silent_s`` seconds while ``outstanding`` dispatches wait.

    Raised by :class:`PushFeedback` on purpose, so its supervisor restarts it
    with a fresh feedback session (``force_refresh_feedback``).
    """

    def __init__(self, silent_s: float, outstanding: int) -> None:
        super().__init__(
            f"no push feedback for {silent_s:g}s while {outstanding} dispatch(es) wait for it"
        )
        self.silent_s = silent_s
        self.outstanding = outstanding


class FeedbackStallAlert(Notice, frozen=True):
    """Row 2's mitigation ran: the feedback actor is being restarted."""

    silent_s: float
    outstanding: int
    refreshes: int


class FeedbackState(enum.Enum):
    STARTING = "starting"
    FLOWING = "flowing"  # the last round brought feedback
    WAITING = "waiting"  # no feedback in the last round
    DEGRADED = "degraded"  # the sink or a source failed; feedback is not acked
    STALLED = "stalled"  # raised FeedbackStalled; the supervisor restarts us
    STOPPED = "stopped"


@dataclass
class FeedbackStats:
    received: int = 0
    applied: int = 0
    acked: int = 0
    failures: int = 0  # rounds whose pull, apply or ack failed
    refreshes: int = 0  # FeedbackStalled raised
    resets: int = 0  # source resets at (re)start
    starts: int = 0
    swept: int = 0  # dispatches marked unknown by the StaleSweep


class _FeedbackMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.last_timestamp = Gauge(
            "triage_push_feedback_last_timestamp_seconds",
            "Unix time of the newest FCM/APNs delivery feedback received, or of the last"
            " moment no push waited for feedback",
            registry=registry,
        )
        self.refreshes = Counter(
            "triage_push_feedback_refreshes",
            "Feedback actor restarts forced by the stall watchdog",
            registry=registry,
        )
        self.receipts = Counter(
            "triage_push_feedback_receipts",
            "Push feedback receipts applied to dispatches",
            registry=registry,
        )
        self.stale = Counter(
            "triage_push_stale_unknown",
            "Push dispatches marked unknown after waiting too long for feedback",
            registry=registry,
        )


def _positive(owner: str, name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{owner}: {name} must be > 0, got {value!r}")
    return value


def _count(owner: str, name: str, value: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ConfigError(f"{owner}: {name} must be a whole number >= 1, got {value!r}")
    return int(value)


class PushFeedback:
    """The feedback loop and its watchdog; run :meth:`run` under a supervisor."""

    name = "push_feedback"

    def __init__(
        self,
        *,
        sources: Sequence[FeedbackPuller],
        sink: ReceiptSink,
        outstanding: OutstandingProbe,
        poll_interval_s: float,
        batch_size: int,
        stall_after_s: float,
        watchdog_interval_s: float,
        severity: str = "ticket",
        detector: AgeOfNewestDetector | None = None,
        events: EventBus | None = None,
        registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not sources:
            raise ConfigError("push feedback: at least one feedback source is needed")
        self.sources = tuple(sources)
        self.sink = sink
        self.outstanding = outstanding
        self.poll_interval_s = _positive(self.name, "poll_interval_s", poll_interval_s)
        self.batch_size = _count(self.name, "batch_size", batch_size)
        self.stall_after_s = _positive(self.name, "stall_after_s", stall_after_s)
        self.watchdog_interval_s = _positive(self.name, "watchdog_interval_s", watchdog_interval_s)
        self.severity = severity
        self.detector = detector
        self.events = events
        self.clock = clock if clock is not None else Clock()
        self._metrics = families(registry, _FeedbackMetrics) if registry is not None else None
        self.stats = FeedbackStats()
        self.state = FeedbackState.STARTING
        #: Unix time of the newest feedback received (None: none yet).
        self.last_feedback_wall: float | None = None
        self._quiet_since = 0.0  # Trio time the stall clock counts from
        self._fed_since_check = False

    # -- the child -----------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reset the sources (on a restart), report started, pull until cancelled or stalled."""
        self.stats.starts += 1
        try:
            if self.stats.starts > 1:
                for source in self.sources:
                    await source.reset()
                self.stats.resets += 1
                log.info("push feedback: fresh feedback session (start %d)", self.stats.starts)
            self._quiet_since = trio.current_time()
            self._fed_since_check = False
            self._enter(FeedbackState.WAITING, "started")
            task_status.started()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._watchdog)
                    while True:
                        if not await self.step():
                            await trio.sleep(self.poll_interval_s)
            except BaseExceptionGroup as group:
                # The watchdog's FeedbackStalled leaves the nursery as a one-member
                # group; the supervisor (and logs) see the typed error itself.
                if len(group.exceptions) == 1 and isinstance(group.exceptions[0], FeedbackStalled):
                    raise group.exceptions[0] from None
                raise
        finally:
            if self.state is not FeedbackState.STALLED:
                self._enter(FeedbackState.STOPPED, "stopped")

    def child_spec(self, *, shutdown_s: float = 5.0, restart: Restart | None = None) -> ChildSpec:
        """A supervisor child running :meth:`run`."""
        return ChildSpec.of(self, shutdown_s=shutdown_s, restart=restart)

    # -- one round -------------------------------------------------------------------------

    async def step(self) -> int:
        """Pull once from every source, apply, ack. Returns the receipts applied."""
        applied = 0
        for source in self.sources:
            try:
                receipts, ack_ids = await source.pull()
            except ProviderError as exc:
                self._failed(f"pull failed: {exc}")
                continue
            if not receipts:
                if ack_ids:  # nothing to apply, but the source wants them acked
                    await self._ack(source, ack_ids)
                continue
            self.stats.received += len(receipts)
            try:
                for start in range(0, len(receipts), self.batch_size):
                    await self.sink.apply(receipts[start : start + self.batch_size])
            except ProviderError as exc:  # not acked: the source delivers them again
                self._failed(f"apply failed, {len(receipts)} receipt(s) not acked: {exc}")
                continue
            self.stats.applied += len(receipts)
            applied += len(receipts)
            self._fed(receipts)
            await self._ack(source, ack_ids)
        if applied:
            self._enter(FeedbackState.FLOWING, "feedback applied")
        elif self.state is FeedbackState.FLOWING:
            self._enter(FeedbackState.WAITING, "no feedback this round")
        return applied

    async def _ack(self, source: FeedbackPuller, ack_ids: Sequence[str]) -> None:
        try:
            await source.ack(list(ack_ids))
        except ProviderError as exc:  # applying again is idempotent: they come back, no harm
            self._failed(f"ack failed: {exc}")
        else:
            self.stats.acked += len(ack_ids)

    def _fed(self, receipts: Sequence[Receipt]) -> None:
        now_wall = self.clock.wall()  # for receipts that do not say when they happened
        wall = max(now_wall if r.occurred_at is None else r.occurred_at for r in receipts)
        if self.last_feedback_wall is None or wall > self.last_feedback_wall:
            self.last_feedback_wall = wall
        self._fed_since_check = True
        self._quiet_since = trio.current_time()
        if self.detector is not None:
            self.detector.touch()
        if self._metrics is not None:
            self._metrics.receipts.inc(len(receipts))
            self._metrics.last_timestamp.set(self.last_feedback_wall)

    def _failed(self, reason: str) -> None:
        self.stats.failures += 1
        self._enter(FeedbackState.DEGRADED, reason)

    # -- the watchdog ------------------------------------------------------------------------

    async def _watchdog(self) -> None:
        while True:
            await trio.sleep(self.watchdog_interval_s)
            await self.check_stall()

    async def check_stall(self) -> None:
        """One watchdog check; raises :class:`FeedbackStalled` when the feedback stalled.

        Quiet checks (no feedback since the last one) ask ``outstanding()``; a check
        that finds nothing outstanding restarts the stall clock, so a dispatch that
        was just sent is given (up to one watchdog interval less than)
        ``stall_after_s`` for its feedback.
        """
        now = trio.current_time()
        if self._fed_since_check:
            self._fed_since_check = False
            return
        try:
            waiting = await self.outstanding()
        except ProviderError as exc:  # cannot tell: do not restart on a guess
            log.warning("push feedback: watchdog could not count outstanding dispatches: %s", exc)
            return
        if waiting <= 0:
            # Idle, not stalled: nothing waits for feedback, so none is overdue. The
            # row-2 age (detector and gauge) counts from here too, or a quiet night
            # would page as a stall.
            self._quiet_since = now
            if self.detector is not None:
                self.detector.touch()
            if self._metrics is not None:
                self._metrics.last_timestamp.set(self.clock.wall())
            return
        if now - self._quiet_since < self.stall_after_s:
            return
        silent = now - self._quiet_since
        self.stats.refreshes += 1
        if self._metrics is not None:
            self._metrics.refreshes.inc()
        self._enter(FeedbackState.STALLED, f"no feedback for {silent:g}s, {waiting} waiting")
        if self.events is not None:
            self.events.emit(
                FeedbackStallAlert(
                    at=now,
                    wall=self.clock.wall(),
                    severity=self.severity,
                    row=ROW,
                    silent_s=silent,
                    outstanding=waiting,
                    refreshes=self.stats.refreshes,
                )
            )
        raise FeedbackStalled(silent, waiting)

    def _enter(self, state: FeedbackState, reason: str) -> None:
        if state is self.state:
            return
        old, self.state = self.state, state
        level = (
            logging.WARNING
            if state in (FeedbackState.DEGRADED, FeedbackState.STALLED)
            else logging.INFO
        )
        log.log(level, "push feedback: %s -> %s (%s)", old.value, state.value, reason)


class StaleSweep:
    """Marks push dispatches whose feedback never came as ``unknown``; run :meth:`run`."""

    name = "push_stale_sweep"

    def __init__(
        self,
        *,
        sweeper: StaleSweeper,
        stale_after_s: float,
        sweep_interval_s: float,
        sweep_limit: int,
        channel: ChannelName = ChannelName.PUSH,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.sweeper = sweeper
        self.stale_after_s = _positive(self.name, "stale_after_s", stale_after_s)
        self.sweep_interval_s = _positive(self.name, "sweep_interval_s", sweep_interval_s)
        self.sweep_limit = _count(self.name, "sweep_limit", sweep_limit)
        self.channel = channel
        self._metrics = families(registry, _FeedbackMetrics) if registry is not None else None
        self.marked = 0
        self.sweeps = 0
        self.failures = 0

    async def sweep(self) -> int:
        """Mark every stale dispatch now, ``sweep_limit`` per call; returns how many."""
        total = 0
        while True:
            marked = await self.sweeper(self.channel.value, self.stale_after_s, self.sweep_limit)
            total += marked
            if marked < self.sweep_limit:
                break
        self.sweeps += 1
        if total:
            self.marked += total
            if self._metrics is not None:
                self._metrics.stale.inc(total)
            log.warning(
                "push feedback: %d dispatch(es) without feedback for %gs marked unknown",
                total,
                self.stale_after_s,
            )
        return total

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Report started, then sweep every ``sweep_interval_s`` until cancelled."""
        task_status.started()
        while True:
            try:
                await self.sweep()
            except ProviderError as exc:  # the next sweep tries again
                self.failures += 1
                log.warning("push feedback: stale sweep failed: %s", exc)
            await trio.sleep(self.sweep_interval_s)

    def child_spec(self, *, shutdown_s: float = 5.0, restart: Restart | None = None) -> ChildSpec:
        return ChildSpec.of(self, shutdown_s=shutdown_s, restart=restart)


def child_specs(
    feedback: PushFeedback, sweep: StaleSweep | None = None, *, shutdown_s: float = 5.0
) -> list[ChildSpec]:
    """Row 2's children for the tree: the feedback actor, then its stale sweep.

    Put them under a ``one_for_one`` supervisor: a stall restarts the feedback
    actor alone; the sweep keeps its own cadence.
    """
    specs = [feedback.child_spec(shutdown_s=shutdown_s)]
    if sweep is not None:
        specs.append(sweep.child_spec(shutdown_s=shutdown_s))
    return specs
