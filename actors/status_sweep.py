"""SMS and email dispatches whose receipt never came: asked about, then ended ``unknown``.

A dispatch a provider took sits ``dispatched`` until its receipt (an SMS DLR, an
email bounce) settles it. A receipt can be lost for good -- the daemon was down
while the gateway's retries ran out, the provider dropped it -- and the row would
then never end. Push has its row-2 sweep (:mod:`actors.push_feedback`); SMS and
email have :class:`StatusSweep` (child id ``status_sweep``), one actor for both
channels. At start and every ``sweep_interval_s`` (a timer) it runs one *turn* as
a task; per channel:

1. **claim** (:meth:`UnsettledStore.claim`, as the relay role: no recipient, no
   payload): at most ``batch`` ``dispatched`` rows of every tenant, oldest first,
   not claimed now, and due: taken ``query_after_s`` ago by a provider that answers
   a status query (:class:`StatusQuery`: Ghasi, Twilio), or taken longer ago than
   the channel's deadline (``stale_after_s``) by any provider. The claim lasts
   ``query_interval_s`` and is set by the statement that locks the rows, so two
   replicas never ask about (nor end) the same row, and a row is asked about at most
   once per ``query_interval_s``;
2. **ask** each claimed row's provider, by its wire reference and its
   ``provider_ref`` (at most ``concurrency`` queries at once, each within
   ``query_timeout_s``). A final answer (delivered, failed, undeliverable) goes to
   the :class:`ReceiptSink` as a receipt, as if the lost DLR had come: the row
   settles under its tenant's RLS, and a bounce reaches the bounce tracker;
3. **end**: a claimed row not settled whose age passed the deadline becomes
   ``unknown`` (:meth:`UnsettledStore.mark_unknown`, with its outbox event), its
   reason saying what the provider last said::

       feedback_stale              the provider answers no status query (SMTP)
       feedback_stale:not_found    it does not know the message (its records lost)
       feedback_stale:pending      it still reports the message in flight
       feedback_stale:no_answer    the query failed, timed out, or could not tell

   ``unknown`` is not the end of the story: a receipt that comes later still moves
   it to delivered / failed / undeliverable (the status machine allows it).

A turn that claimed a full ``batch`` of some channel is followed at once by the
next; one turn runs at a time. So a row whose receipt was lost ends, on any
replica, by ``stale_after_s + query_interval_s + sweep_interval_s`` after its send
(plus the queueing of a backlog larger than ``batch`` per turn).

Messages (its own only)::

    Check()            timer / init / after a full turn: a turn now (none runs)
    Checked(report)    the turn task's report (:class:`TurnReport`)

States (:class:`SweepState`, one log line per change)::

    IDLE --Check--> CHECKING --Checked--> IDLE
    CHECKING --Checked(error)--> DEGRADED --Check--> CHECKING   (the next tick retries)

**Replicas** (issue 12): runs on every replica, no lease: the claim shares the rows.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter

from engine.actor import Actor, ActorRef, Overflow, Timer, actor_child
from engine.errors import ConfigError, ProviderError
from engine.metrics import families
from engine.statelog import StateLog
from engine.supervisor import ChildSpec, Restart
from providers.channel import ChannelName, DeliveryState, Receipt, StatusAnswer
from providers.db.dispatches import (
    STALE_REASON,
    Unsettled,
    claim_unsettled_async,
    mark_unknown_async,
)

if TYPE_CHECKING:
    from actors.push_feedback import ReceiptSink
    from engine.metrics import Metrics
    from providers.db.pool import DbPool, Pool

__all__ = [
    "CHILD_ID",
    "Check",
    "Checked",
    "DbUnsettledStore",
    "StatusQuery",
    "StatusSweep",
    "StatusSweepStatistics",
    "SweepState",
    "TurnReport",
    "UnsettledStore",
    "stale_reason",
    "status_sweep_child",
]

log = logging.getLogger("triage.status_sweep")

CHILD_ID: Final = "status_sweep"

_FINAL: Final = frozenset(
    {DeliveryState.DELIVERED, DeliveryState.FAILED, DeliveryState.UNDELIVERABLE}
)


@runtime_checkable
class StatusQuery(Protocol):
    """A provider that answers "what became of this message?" (Ghasi, Twilio)."""

    name: str

    async def query_status(
        self, reference: str, provider_ref: str | None = None
    ) -> StatusAnswer | None:
        """Its answer for the message sent with wire ``reference`` (``tenant:dispatch``)
        that it took as ``provider_ref``; ``None``: it cannot tell. Raises as a send does."""
        ...


class UnsettledStore(Protocol):
    """The dispatch rows the sweep works on (:class:`DbUnsettledStore` in the daemon)."""

    async def claim(
        self,
        channel: str,
        askable: Sequence[str],
        *,
        ask_after_s: float,
        stale_after_s: float,
        limit: int,
        lease_s: float,
    ) -> list[Unsettled]:
        """Claim the due rows (see :func:`~providers.db.dispatches.claim_unsettled_async`)."""
        ...

    async def mark_unknown(self, reasons: Mapping[uuid.UUID, str]) -> int:
        """End these rows ``unknown`` with their reasons (still dispatched ones); how many."""
        ...


class DbUnsettledStore:
    """:class:`UnsettledStore` on the daemon's pool (relay role, one crossing each)."""

    def __init__(self, db: DbPool) -> None:
        self.db = db

    async def claim(
        self,
        channel: str,
        askable: Sequence[str],
        *,
        ask_after_s: float,
        stale_after_s: float,
        limit: int,
        lease_s: float,
    ) -> list[Unsettled]:
        async def unit(pool: Pool) -> list[Unsettled]:
            return await claim_unsettled_async(
                pool, channel, askable, ask_after_s=ask_after_s, stale_after_s=stale_after_s,
                limit=limit, lease_s=lease_s,
            )  # fmt: skip

        return await self.db.run_unit(unit)

    async def mark_unknown(self, reasons: Mapping[uuid.UUID, str]) -> int:
        marked: list[uuid.UUID] = await self.db.run_unit(mark_unknown_async, reasons)
        return len(marked)


def stale_reason(answer: StatusAnswer | None, *, asked: bool) -> str:
    """The ``unknown`` reason of a row past its deadline (see the module docstring)."""
    if not asked:
        return STALE_REASON
    if answer is None:
        return f"{STALE_REASON}:no_answer"
    if answer.state is DeliveryState.NOT_FOUND:
        return f"{STALE_REASON}:not_found"
    return f"{STALE_REASON}:pending"


class SweepState(enum.Enum):
    IDLE = "idle"  # between turns
    CHECKING = "checking"  # a turn runs
    DEGRADED = "degraded"  # the last turn failed (the database); the next tick retries
    STOPPED = "stopped"


class TurnReport(msgspec.Struct, frozen=True, kw_only=True):
    """What one turn did, over every channel."""

    claimed: int = 0
    asked: int = 0
    settled: dict[str, int] = msgspec.field(default_factory=dict)  # by delivery state
    marked: int = 0
    query_failures: int = 0  # queries that raised or timed out
    full: bool = False  # some channel's claim filled its batch: more may be due
    error: str | None = None  # the turn stopped there (the database failed)


class Check(msgspec.Struct, frozen=True, tag=True):
    """A turn now, unless one runs (the timer, ``init``, or a full turn)."""


class Checked(msgspec.Struct, frozen=True, tag=True):
    """The turn task's report."""

    report: TurnReport


StatusSweepMessage = Check | Checked

_CHECK = Check()


class StatusSweepStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What ``ref.statistics()`` reports; counts are totals across restarts."""

    state: SweepState
    turns: int
    claimed: int
    asked: int
    settled: dict[str, int]  # rows a status answer settled, by delivery state
    marked: int  # rows ended unknown
    query_failures: int
    failures: int  # turns that failed


@dataclasses.dataclass(slots=True)
class SweepHistory:
    """The counts, created once with the child so a restart keeps them (the fields of
    :class:`StatusSweepStatistics` but its state)."""

    turns: int = 0
    claimed: int = 0
    asked: int = 0
    marked: int = 0
    query_failures: int = 0
    failures: int = 0
    settled: dict[str, int] = dataclasses.field(default_factory=dict)


class _SweepMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.answers = Counter(
            "triage_status_queries",
            "Status queries of SMS/email dispatches whose receipt did not come, by answer",
            ["provider", "answer"],
            registry=registry,
        )
        self.unknown = Counter(
            "triage_status_stale_unknown",
            "SMS/email dispatches ended unknown: no final answer by the feedback deadline",
            ["channel"],
            registry=registry,
        )


class StatusSweep(Actor[StatusSweepMessage]):
    """Asks about SMS/email dispatches without a receipt, then ends them; see the module doc."""

    name = CHILD_ID
    uses_tasks = True

    def __init__(
        self,
        *,
        store: UnsettledStore,
        sink: ReceiptSink,
        queries: Mapping[str, StatusQuery],
        deadlines: Mapping[ChannelName, float],
        history: SweepHistory,
        query_after_s: float,
        query_interval_s: float,
        query_timeout_s: float,
        sweep_interval_s: float,
        batch: int,
        concurrency: int,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.store = store
        self.sink = sink
        self.queries = dict(queries)
        self.deadlines = dict(deadlines)
        self.history = history
        self.query_after_s = query_after_s
        self.query_interval_s = query_interval_s
        self.query_timeout_s = query_timeout_s
        self.sweep_interval_s = sweep_interval_s
        self.batch = batch
        self.concurrency = concurrency
        self.states = StateLog(self.name, SweepState.IDLE, log, warn={SweepState.DEGRADED})
        self._metrics = families(registry, _SweepMetrics) if registry is not None else None
        self._checking = False

    # -- the actor's life ----------------------------------------------------------------

    async def init(self) -> None:
        self._start()  # at once: what a stop of the daemon left unsettled

    def timers(self) -> list[Timer]:
        return [Timer(self.sweep_interval_s, _CHECK)]

    async def terminate(self, reason: BaseException | None) -> None:
        self.states.enter(SweepState.STOPPED, "stopped" if reason is None else repr(reason))

    def statistics(self) -> StatusSweepStatistics:
        return StatusSweepStatistics(state=self.states.state, **dataclasses.asdict(self.history))

    async def handle(self, message: StatusSweepMessage) -> object:
        match message:
            case Check():
                if not self._checking:
                    self._start()
            case Checked(report=report):
                self._checking = False
                self._count(report)
                if report.error is not None:
                    self.history.failures += 1
                    self.states.enter(SweepState.DEGRADED, f"turn failed: {report.error}")
                else:
                    self.history.turns += 1
                    self.states.enter(SweepState.IDLE, "turn done")
                    if report.full:
                        self.tell_self(_CHECK)  # more may be due: the next turn at once
        return None

    def _start(self) -> None:
        self._checking = True
        self.states.enter(SweepState.CHECKING, "turn")
        self.start_soon(self._turn)

    def _count(self, report: TurnReport) -> None:
        h = self.history
        h.claimed += report.claimed
        h.asked += report.asked
        h.marked += report.marked
        h.query_failures += report.query_failures
        for state, n in report.settled.items():
            h.settled[state] = h.settled.get(state, 0) + n
        if report.settled or report.marked:
            log.info(
                "%s: %d dispatch(es) settled by a status query %s, %d ended unknown",
                self.name,
                sum(report.settled.values()),
                report.settled,
                report.marked,
            )

    # -- a turn (a task; it reports, handle counts) --------------------------------------

    async def _turn(self) -> None:
        totals: dict[str, int] = {"claimed": 0, "asked": 0, "marked": 0, "query_failures": 0}
        settled: dict[str, int] = {}
        full = False
        error: str | None = None
        try:
            for channel, stale_after_s in self.deadlines.items():
                full |= await self._channel(channel, stale_after_s, totals, settled)
        except ProviderError as exc:
            error = str(exc) or type(exc).__name__
        report = TurnReport(settled=settled, full=full, error=error, **totals)
        await self.ref.tell(Checked(report))

    async def _channel(
        self,
        channel: ChannelName,
        stale_after_s: float,
        totals: dict[str, int],
        settled: dict[str, int],
    ) -> bool:
        """One channel's claim, queries, receipts and ends; True when the claim was full."""
        rows = await self.store.claim(
            channel.value,
            sorted(self.queries),
            ask_after_s=self.query_after_s,
            stale_after_s=stale_after_s,
            limit=self.batch,
            lease_s=self.query_interval_s,
        )
        totals["claimed"] += len(rows)
        answers: dict[uuid.UUID, StatusAnswer | None] = {}
        asked = [r for r in rows if r.provider in self.queries]
        limiter = trio.CapacityLimiter(self.concurrency)
        async with trio.open_nursery() as nursery:
            for row in asked:
                nursery.start_soon(self._ask, row, limiter, answers, totals)
        totals["asked"] += len(asked)
        receipts: list[Receipt] = []
        reasons: dict[uuid.UUID, str] = {}
        for row in rows:
            answer = answers.get(row.dispatch_id)
            if answer is not None and answer.state in _FINAL:
                receipts.append(_receipt(row, answer))
            elif row.age_s >= stale_after_s:
                reasons[row.dispatch_id] = stale_reason(answer, asked=row.provider in self.queries)
        if receipts:
            await self.sink.apply(receipts)
            for receipt in receipts:
                settled[receipt.state.value] = settled.get(receipt.state.value, 0) + 1
        if reasons:
            marked = await self.store.mark_unknown(reasons)
            totals["marked"] += marked
            if self._metrics is not None:
                self._metrics.unknown.labels(channel.value).inc(marked)
        return len(rows) >= self.batch

    async def _ask(
        self,
        row: Unsettled,
        limiter: trio.CapacityLimiter,
        answers: dict[uuid.UUID, StatusAnswer | None],
        totals: dict[str, int],
    ) -> None:
        """One status query, within ``query_timeout_s``; its answer (None: no answer)."""
        assert row.provider is not None
        query = self.queries[row.provider]
        answer: StatusAnswer | None = None
        failed = True
        async with limiter:
            with trio.move_on_after(self.query_timeout_s):
                try:
                    answer = await query.query_status(
                        f"{row.tenant_id}:{row.dispatch_id}", row.provider_ref
                    )
                    failed = False
                except Exception as exc:  # any failure leaves it unsettled, asked again later
                    log.warning(
                        "%s: status query to %s for %s failed: %s",
                        self.name, row.provider, row.dispatch_id, exc,
                    )  # fmt: skip
        if failed:
            totals["query_failures"] += 1
        answers[row.dispatch_id] = answer
        if self._metrics is not None:
            label = "failed_query" if failed else ("none" if answer is None else answer.state.value)
            self._metrics.answers.labels(row.provider, label).inc()


def _receipt(row: Unsettled, answer: StatusAnswer) -> Receipt:
    """A final status answer as the receipt that did not come (a definite answer)."""
    return Receipt(
        provider=row.provider or "",
        state=answer.state,
        provider_ref=answer.provider_ref or row.provider_ref,
        client_ref=str(row.dispatch_id),
        tenant_id=row.tenant_id,
        reason=None if answer.state is DeliveryState.DELIVERED else answer.reason,
        permanent=True,
    )


def status_sweep_child(
    *,
    store: UnsettledStore,
    sink: ReceiptSink,
    queries: Mapping[str, StatusQuery],
    deadlines: Mapping[ChannelName, float],
    query_after_s: float,
    query_interval_s: float,
    query_timeout_s: float,
    sweep_interval_s: float,
    batch: int,
    concurrency: int,
    capacity: int,
    overflow: Overflow,
    shutdown_s: float,
    restart: Restart | None = None,
    registry: CollectorRegistry | None = None,
    metrics: Metrics | None = None,
) -> tuple[ChildSpec, ActorRef[StatusSweepMessage]]:
    """The sweep's child spec (id ``status_sweep``) and its ref; every knob checked now.

    ``queries`` maps a provider's name (as dispatch rows record it) to the adapter
    that answers its status queries; ``deadlines`` each swept channel to its
    ``stale_after_s``. The mailbox must ``wait`` (its tasks report through it).
    """
    if not deadlines:
        raise ConfigError(f"{CHILD_ID}: no channel to sweep")
    knobs = {
        "query_after_s": query_after_s,
        "query_interval_s": query_interval_s,
        "query_timeout_s": query_timeout_s,
        "sweep_interval_s": sweep_interval_s,
        **{f"{c}_stale_after_s": v for c, v in deadlines.items()},
    }
    for knob, value in knobs.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{CHILD_ID}: {knob} must be > 0, got {value!r}")
    for knob, count in (("batch", batch), ("concurrency", concurrency)):
        if isinstance(count, bool) or count < 1:
            raise ConfigError(f"{CHILD_ID}: {knob} must be a whole number >= 1, got {count!r}")
    if overflow is not Overflow.WAIT:
        raise ConfigError(
            f"{CHILD_ID}: its mailbox overflow must be 'wait', got {overflow.value!r}"
            " (its own tasks report by message and must never lose a report)"
        )
    factory = partial(
        StatusSweep, store=store, sink=sink, queries=dict(queries),
        deadlines={ChannelName(c): float(v) for c, v in deadlines.items()},
        history=SweepHistory(), query_after_s=query_after_s, query_interval_s=query_interval_s,
        query_timeout_s=query_timeout_s, sweep_interval_s=sweep_interval_s, batch=batch,
        concurrency=concurrency, registry=registry,
    )  # fmt: skip
    return actor_child(
        CHILD_ID, factory, capacity=capacity, overflow=overflow, restart=restart,
        shutdown_s=shutdown_s, metrics=metrics,
    )  # fmt: skip
