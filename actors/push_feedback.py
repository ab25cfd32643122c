"""Push delivery feedback and its watchdog (catalog row 2: push feedback stall).

Two actors, each a supervised child (:func:`push_feedback_child`,
:func:`stale_sweep_child`):

:class:`PushFeedback`
    Pulls feedback from each :class:`FeedbackPuller` (FCM, APNs) in turn, hands
    the receipts to the :class:`ReceiptSink` (which settles the dispatch rows) in
    chunks of ``batch_size``, and acks them **only after** the sink applied them:
    feedback whose apply failed is not acked and comes again. A round runs as a
    task of the actor (``start_soon``) and reports each source (:class:`Pulled`)
    and its end (:class:`RoundDone`) by message; a round that applied something
    is followed at once by the next, an empty one by a :class:`Poll`
    ``poll_interval_s`` later (``send_after``). Every source that brought
    feedback sets the gauge ``triage_push_feedback_last_timestamp_seconds`` (Unix
    time of the newest feedback: the receipts' ``occurred_at``, else the wall
    clock) and touches row 2's :class:`~engine.detectors.AgeOfNewestDetector`.

    Watchdog (``force_refresh_feedback``), a timer of ``watchdog_interval_s``:
    a tick after which no feedback arrived asks ``outstanding()`` (a task;
    answered by :class:`Counted`) how many push dispatches still wait for
    feedback. None waiting: the system is idle, not stalled, and the stall clock
    restarts (so the clock counts from the newest feedback or the last check
    that found nothing outstanding, whichever is later). Some waiting and no
    feedback for ``stall_after_s``: the actor counts
    ``triage_push_feedback_refreshes_total``, emits a
    :class:`FeedbackStallAlert` and raises :class:`FeedbackStalled` from
    ``handle``, so its supervisor restarts it; every incarnation after the first
    starts (in ``init``, before it counts as started) by ``reset()``-ing its
    sources -- a fresh session -- and gives them a whole ``stall_after_s`` again.

    Its state is one of :class:`FeedbackState`, held in a
    :class:`~engine.statelog.StateLog` (one log line per change).

:class:`StaleSweep`
    At start and every ``sweep_interval_s`` (a timer), moves dispatches stuck in
    ``dispatched`` for longer than ``stale_after_s`` to ``unknown`` through the
    :data:`StaleSweeper` (``mark_stale_unknown``), ``sweep_limit`` rows per call
    until a call marks fewer (:func:`sweep_stale`, run as a task), and counts
    them in ``triage_push_stale_unknown_total``.

What outlives an incarnation: the mailbox, the detector and the metrics, and the
:class:`FeedbackHistory` the wiring passes in (how many incarnations started,
the refreshes, the newest feedback's time and the running totals), so a restart
never resets the feedback age nor the numbers ``ref.statistics()`` shows. The
mailboxes carry only the actors' own ticks and task reports (their tasks wait
for room, so ``[mailboxes.push_feedback]`` must be ``wait``).

**Replicas** (issue 12): :class:`PushFeedback` is the daemon's singleton
(``[singletons] actors``, :mod:`supervisors.singleton`): it runs on the one
replica holding its advisory-lock lease. With several pullers each would get a
share of the subscriptions' messages, and the watchdog (no feedback *here* while
some wait) would take a healthy share for a stall. On a standby the wiring keeps
row 2's detector touched (only the holder watches the feedback). :class:`StaleSweep`
runs everywhere (one idempotent UPDATE per call); it may be made a singleton too.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Protocol

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from engine.actor import Actor, ActorRef, Overflow, Timer, actor_child
from engine.clock import Clock
from engine.detectors import AgeOfNewestDetector
from engine.errors import ConfigError, ProviderError, TriageError
from engine.events import EventBus, Notice
from engine.metrics import families
from engine.statelog import StateLog
from engine.supervisor import ChildSpec, Restart
from providers.channel import ChannelName, Receipt

if TYPE_CHECKING:
    from engine.metrics import Metrics

__all__ = [
    "ROW",
    "Counted",
    "FeedbackHistory",
    "FeedbackMessage",
    "FeedbackPuller",
    "FeedbackStallAlert",
    "FeedbackStalled",
    "FeedbackState",
    "FeedbackStatistics",
    "OutstandingProbe",
    "Poll",
    "Pulled",
    "PushFeedback",
    "ReceiptSink",
    "RoundDone",
    "StaleSweep",
    "StaleSweeper",
    "Sweep",
    "SweepMessage",
    "SweepStatistics",
    "Swept",
    "Watchdog",
    "push_feedback_child",
    "stale_sweep_child",
    "sweep_stale",
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


# -- messages --------------------------------------------------------------------------


class Poll(msgspec.Struct, frozen=True, tag=True):
    """Start a round (sent ``poll_interval_s`` after an empty one)."""


class Watchdog(msgspec.Struct, frozen=True, tag=True):
    """Timer: is the feedback stalled?"""


class Pulled(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """The round task's report on one source."""

    received: int = 0
    applied: int = 0
    acked: int = 0
    failures: tuple[str, ...] = ()
    newest_wall: float | None = None  # Unix time of the newest feedback applied


class RoundDone(msgspec.Struct, frozen=True, tag=True):
    """The round task ended; ``applied`` receipts over all sources."""

    applied: int


class Counted(msgspec.Struct, frozen=True, tag=True):
    """The watchdog's probe: how many pushes wait for feedback (None: it failed)."""

    waiting: int | None
    error: str | None = None


FeedbackMessage = Poll | Watchdog | Pulled | RoundDone | Counted


class Sweep(msgspec.Struct, frozen=True, tag=True):
    """Timer: mark the stale dispatches now."""


class Swept(msgspec.Struct, frozen=True, tag=True):
    """The sweep task's answer."""

    marked: int
    error: str | None = None


SweepMessage = Sweep | Swept

_POLL = Poll()
_WATCHDOG = Watchdog()
_SWEEP = Sweep()


# -- numbers ---------------------------------------------------------------------------


class FeedbackHistory:
    """What outlives the feedback actor's incarnations; written by the actor only.

    Created once by the wiring (like the mailbox). Read through
    :meth:`ActorRef.statistics` (:class:`FeedbackStatistics`).
    """

    __slots__ = (
        "acked", "applied", "failures", "last_feedback_wall", "received", "refreshes", "resets",
        "starts",
    )  # fmt: skip

    def __init__(self) -> None:
        self.starts = 0
        self.resets = 0  # source resets at a restart
        self.refreshes = 0  # FeedbackStalled raised
        self.received = 0
        self.applied = 0
        self.acked = 0
        self.failures = 0  # pulls, applies or acks that failed
        #: Unix time of the newest feedback received (None: none yet).
        self.last_feedback_wall: float | None = None


class FeedbackStatistics(msgspec.Struct, frozen=True, kw_only=True):
    state: FeedbackState
    starts: int
    resets: int
    refreshes: int
    received: int
    applied: int
    acked: int
    failures: int
    last_feedback_wall: float | None


class SweepStatistics(msgspec.Struct, frozen=True, kw_only=True):
    sweeps: int
    marked: int
    failures: int


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


def _waiting_mailbox(owner: str, overflow: Overflow) -> None:
    if overflow is not Overflow.WAIT:
        raise ConfigError(
            f"{owner}: its mailbox overflow must be 'wait', got {overflow.value!r}"
            " (its own tasks report by message and must never lose a report)"
        )


# -- the feedback actor ----------------------------------------------------------------


class PushFeedback(Actor[FeedbackMessage]):
    """The feedback loop and its watchdog; see the module docstring."""

    name = "push_feedback"

    def __init__(
        self,
        *,
        sources: Sequence[FeedbackPuller],
        sink: ReceiptSink,
        outstanding: OutstandingProbe,
        history: FeedbackHistory,
        poll_interval_s: float,
        batch_size: int,
        stall_after_s: float,
        watchdog_interval_s: float,
        severity: str,
        detector: AgeOfNewestDetector | None = None,
        events: EventBus | None = None,
        registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.sources = tuple(sources)
        self.sink = sink
        self.outstanding = outstanding
        self.history = history
        self.poll_interval_s = poll_interval_s
        self.batch_size = batch_size
        self.stall_after_s = stall_after_s
        self.watchdog_interval_s = watchdog_interval_s
        self.severity = severity
        self.detector = detector
        self.events = events
        self.clock = clock if clock is not None else Clock()
        self._metrics = families(registry, _FeedbackMetrics) if registry is not None else None
        self.states = StateLog(
            self.name,
            FeedbackState.STARTING,
            log,
            warn={FeedbackState.DEGRADED, FeedbackState.STALLED},
        )
        self._quiet_since = 0.0  # Trio time the stall clock counts from
        self._fed_since_check = False
        self._counting = False

    # -- the actor's life ------------------------------------------------------------------

    async def init(self) -> None:
        """On a restart, reset every source (a fresh session); then start the first round."""
        history = self.history
        history.starts += 1
        if history.starts > 1:
            for source in self.sources:
                await source.reset()
            history.resets += 1
            log.info("push feedback: fresh feedback session (start %d)", history.starts)
        self._quiet_since = trio.current_time()
        self.states.enter(FeedbackState.WAITING, "started", at=self._quiet_since)
        self.start_soon(self._round)

    def timers(self) -> list[Timer]:
        return [Timer(self.watchdog_interval_s, _WATCHDOG)]

    async def terminate(self, reason: BaseException | None) -> None:
        if self.states.state is not FeedbackState.STALLED:
            self.states.enter(FeedbackState.STOPPED, "stopped", at=trio.current_time())

    def statistics(self) -> FeedbackStatistics:
        h = self.history
        return FeedbackStatistics(
            state=self.states.state,
            starts=h.starts,
            resets=h.resets,
            refreshes=h.refreshes,
            received=h.received,
            applied=h.applied,
            acked=h.acked,
            failures=h.failures,
            last_feedback_wall=h.last_feedback_wall,
        )

    async def handle(self, message: FeedbackMessage) -> object:
        match message:
            case Poll():
                self.start_soon(self._round)
            case Pulled():
                self._pulled(message)
            case RoundDone(applied=applied):
                if applied:
                    self.states.enter(FeedbackState.FLOWING, "feedback applied")
                    self.start_soon(self._round)
                else:
                    if self.states.state is FeedbackState.FLOWING:
                        self.states.enter(FeedbackState.WAITING, "no feedback this round")
                    self.send_after(self.poll_interval_s, _POLL)
            case Watchdog():
                if self._fed_since_check:
                    self._fed_since_check = False
                elif not self._counting:
                    self._counting = True
                    self.start_soon(self._count)
            case Counted(waiting=waiting, error=error):
                self._counting = False
                self._check_stall(waiting, error)
        return None

    # -- one round (a task) ----------------------------------------------------------------

    async def _round(self) -> None:
        """Pull once from every source, apply, ack; report each source, then the end."""
        applied = 0
        for source in self.sources:
            report = await self._pull(source)
            applied += report.applied
            await self.ref.tell(report)
        await self.ref.tell(RoundDone(applied))

    async def _pull(self, source: FeedbackPuller) -> Pulled:
        try:
            receipts, ack_ids = await source.pull()
        except ProviderError as exc:
            return Pulled(failures=(f"pull failed: {exc}",))
        if not receipts:
            if not ack_ids:
                return Pulled()
            # Nothing to apply, but the source wants them acked.
            return await self._ack(source, ack_ids, Pulled())
        try:
            for start in range(0, len(receipts), self.batch_size):
                await self.sink.apply(receipts[start : start + self.batch_size])
        except ProviderError as exc:  # not acked: the source delivers them again
            return Pulled(
                received=len(receipts),
                failures=(f"apply failed, {len(receipts)} receipt(s) not acked: {exc}",),
            )
        now_wall = self.clock.wall()  # for receipts that do not say when they happened
        newest = max(now_wall if r.occurred_at is None else r.occurred_at for r in receipts)
        done = Pulled(received=len(receipts), applied=len(receipts), newest_wall=newest)
        return await self._ack(source, ack_ids, done)

    async def _ack(self, source: FeedbackPuller, ack_ids: Sequence[str], done: Pulled) -> Pulled:
        try:
            await source.ack(list(ack_ids))
        except ProviderError as exc:  # applying again is idempotent: they come back, no harm
            return msgspec.structs.replace(done, failures=(*done.failures, f"ack failed: {exc}"))
        return msgspec.structs.replace(done, acked=len(ack_ids))

    def _pulled(self, report: Pulled) -> None:
        history = self.history
        history.received += report.received
        history.applied += report.applied
        history.acked += report.acked
        history.failures += len(report.failures)
        for failure in report.failures:
            self.states.enter(FeedbackState.DEGRADED, failure, at=trio.current_time())
        if not report.applied or report.newest_wall is None:
            return
        wall = report.newest_wall
        if history.last_feedback_wall is None or wall > history.last_feedback_wall:
            history.last_feedback_wall = wall
        self._fed_since_check = True
        self._quiet_since = trio.current_time()
        if self.detector is not None:
            self.detector.touch()
        if self._metrics is not None:
            self._metrics.receipts.inc(report.applied)
            self._metrics.last_timestamp.set(history.last_feedback_wall)

    # -- the watchdog ----------------------------------------------------------------------

    async def _count(self) -> None:
        try:
            waiting = await self.outstanding()
        except ProviderError as exc:
            await self.ref.tell(Counted(None, str(exc)))
        else:
            await self.ref.tell(Counted(waiting))

    def _check_stall(self, waiting: int | None, error: str | None) -> None:
        """One watchdog decision; raises :class:`FeedbackStalled` when the feedback stalled.

        A check that finds nothing outstanding restarts the stall clock, so a
        dispatch that was just sent is given (up to one watchdog interval less
        than) ``stall_after_s`` for its feedback.
        """
        now = trio.current_time()
        if waiting is None:  # cannot tell: do not restart on a guess
            log.warning("push feedback: watchdog could not count outstanding dispatches: %s", error)
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
        silent = now - self._quiet_since
        if silent < self.stall_after_s:
            return
        self.history.refreshes += 1
        if self._metrics is not None:
            self._metrics.refreshes.inc()
        self.states.enter(
            FeedbackState.STALLED, f"no feedback for {silent:g}s, {waiting} waiting", at=now
        )
        if self.events is not None:
            self.events.emit(
                FeedbackStallAlert(
                    at=now,
                    wall=self.clock.wall(),
                    severity=self.severity,
                    row=ROW,
                    silent_s=silent,
                    outstanding=waiting,
                    refreshes=self.history.refreshes,
                )
            )
        raise FeedbackStalled(silent, waiting)


def push_feedback_child(
    *,
    sources: Sequence[FeedbackPuller],
    sink: ReceiptSink,
    outstanding: OutstandingProbe,
    history: FeedbackHistory,
    poll_interval_s: float,
    batch_size: int,
    stall_after_s: float,
    watchdog_interval_s: float,
    severity: str,
    capacity: int,
    overflow: Overflow,
    shutdown_s: float,
    restart: Restart | None = None,
    detector: AgeOfNewestDetector | None = None,
    events: EventBus | None = None,
    registry: CollectorRegistry | None = None,
    metrics: Metrics | None = None,
    clock: Clock | None = None,
) -> tuple[ChildSpec, ActorRef[FeedbackMessage]]:
    """The feedback actor's child spec (id ``push_feedback``) and its ref; knobs checked now."""
    owner = PushFeedback.name
    if not sources:
        raise ConfigError("push feedback: at least one feedback source is needed")
    _waiting_mailbox(owner, overflow)
    factory = partial(
        PushFeedback,
        sources=tuple(sources),
        sink=sink,
        outstanding=outstanding,
        history=history,
        poll_interval_s=_positive(owner, "poll_interval_s", poll_interval_s),
        batch_size=_count(owner, "batch_size", batch_size),
        stall_after_s=_positive(owner, "stall_after_s", stall_after_s),
        watchdog_interval_s=_positive(owner, "watchdog_interval_s", watchdog_interval_s),
        severity=severity,
        detector=detector,
        events=events,
        registry=registry,
        clock=clock,
    )
    return actor_child(
        owner, factory, capacity=capacity, overflow=overflow, restart=restart,
        shutdown_s=shutdown_s, metrics=metrics,
    )  # fmt: skip


# -- the stale sweep -------------------------------------------------------------------


async def sweep_stale(sweeper: StaleSweeper, channel: str, stale_after_s: float, limit: int) -> int:
    """Mark every stale dispatch of ``channel`` now, ``limit`` per call; returns how many."""
    total = 0
    while True:
        marked = await sweeper(channel, stale_after_s, limit)
        total += marked
        if marked < limit:
            return total


class StaleSweep(Actor[SweepMessage]):
    """Marks push dispatches whose feedback never came as ``unknown``; see the module docstring."""

    name = "push_stale_sweep"
    uses_tasks = True

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
        self.stale_after_s = stale_after_s
        self.sweep_interval_s = sweep_interval_s
        self.sweep_limit = sweep_limit
        self.channel = channel
        self._metrics = families(registry, _FeedbackMetrics) if registry is not None else None
        self._sweeping = False
        self._sweeps = 0
        self._marked = 0
        self._failures = 0

    async def init(self) -> None:
        self._start()  # the first sweep at once

    def timers(self) -> list[Timer]:
        return [Timer(self.sweep_interval_s, _SWEEP)]

    def statistics(self) -> SweepStatistics:
        return SweepStatistics(sweeps=self._sweeps, marked=self._marked, failures=self._failures)

    async def handle(self, message: SweepMessage) -> object:
        match message:
            case Sweep():
                if not self._sweeping:
                    self._start()
            case Swept(marked=marked, error=error):
                self._sweeping = False
                if error is not None:  # the next tick tries again
                    self._failures += 1
                    log.warning("push feedback: stale sweep failed: %s", error)
                    return None
                self._sweeps += 1
                if marked:
                    self._marked += marked
                    if self._metrics is not None:
                        self._metrics.stale.inc(marked)
                    log.warning(
                        "push feedback: %d dispatch(es) without feedback for %gs marked unknown",
                        marked,
                        self.stale_after_s,
                    )
        return None

    def _start(self) -> None:
        self._sweeping = True
        self.start_soon(self._sweep)

    async def _sweep(self) -> None:
        try:
            marked = await sweep_stale(
                self.sweeper, self.channel.value, self.stale_after_s, self.sweep_limit
            )
        except ProviderError as exc:
            await self.ref.tell(Swept(0, str(exc)))
        else:
            await self.ref.tell(Swept(marked))


def stale_sweep_child(
    *,
    sweeper: StaleSweeper,
    stale_after_s: float,
    sweep_interval_s: float,
    sweep_limit: int,
    capacity: int,
    overflow: Overflow,
    shutdown_s: float,
    restart: Restart | None = None,
    channel: ChannelName = ChannelName.PUSH,
    registry: CollectorRegistry | None = None,
    metrics: Metrics | None = None,
) -> tuple[ChildSpec, ActorRef[SweepMessage]]:
    """The sweep's child spec (id ``push_stale_sweep``) and its ref; knobs checked now.

    Put it beside :func:`push_feedback_child` under a ``one_for_one`` supervisor:
    a stall restarts the feedback actor alone; the sweep keeps its own cadence.
    """
    owner = StaleSweep.name
    _waiting_mailbox(owner, overflow)
    factory = partial(
        StaleSweep,
        sweeper=sweeper,
        stale_after_s=_positive(owner, "stale_after_s", stale_after_s),
        sweep_interval_s=_positive(owner, "sweep_interval_s", sweep_interval_s),
        sweep_limit=_count(owner, "sweep_limit", sweep_limit),
        channel=channel,
        registry=registry,
    )
    return actor_child(
        owner, factory, capacity=capacity, overflow=overflow, restart=restart,
        shutdown_s=shutdown_s, metrics=metrics,
    )  # fmt: skip
