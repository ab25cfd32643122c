"""Dispatch: the service the HTTP and NATS ingress call, and one dispatcher actor per channel.

:meth:`DispatchService.submit` takes one request through, in order:

1. **validation** happened before: a :class:`SubmitRequest` is made by the
   :class:`~actors.dispatch_request.RequestDecoder` (both doors and in-process
   callers), which checked every field against the configured bounds. Here only
   the channel is checked to be served.
2. **idempotency, fast path** (when an :class:`~actors.idempotency.IdempotencyStore`
   with Redis is given): a ``GET`` of the key. A key already there names a
   committed dispatch and answers the duplicate at once (another body:
   :class:`IdempotencyConflict`). Absent, or Redis down, slow or refused by its
   breaker: step 5 decides, which is the truth either way. The entry is written
   only **after** step 5 committed (:meth:`IdempotencyStore.settle`), so a cache
   hit can never name a dispatch that does not exist: a crash between the commit
   and the cache write leaves no entry, and the retry is answered by the
   database. (Claiming the key in Redis before the commit lost acknowledged
   dispatches to ``kill -9``: the retry found the claim of a row never written.)
3. **template** from the :class:`~actors.templates.TemplateRegistry` (cached),
   rendered strictly (a missing field is an :class:`InvalidRequest` on
   ``data.<field>``). A missing template fails closed (row 19): the dispatch is
   stored ``failed`` reason ``template_not_found`` with an ops notice, counted,
   alerted, and :class:`TemplateNotFound` is raised. Nothing is sent. A retired
   version is refused the same way (reason ``template_retired``).
4. **PHI guard** (push only, row 11): the :class:`~actors.phi_guard.PhiGuard`'s rules
   of the template@version find PHI in the payload -> the guard trips (counted,
   paged, category halted, version retired, incident written), the dispatch is
   stored ``failed`` reason ``phi_guard``, :class:`PhiRefused` raised.
5. **accept** (with a :class:`~actors.group_commit.GroupCommit` of accepts, the group
   commit: ONE statement for the requests gathered meanwhile, each under its own
   tenant; without one, or with a refusal, :func:`~providers.db.dispatches.accept_async`,
   ONE transaction): idempotency row, dispatch row ``queued`` and its event. In the same statement the
   category block and the dead-recipient list are read: a disabled category ends
   ``failed`` (:class:`CategoryDisabled` raised), a dead recipient ends
   ``undeliverable``; a throttled category stays queued and its sends are paced
   by the per (tenant, category) :class:`~engine.ratelimit.RateLimiter`.
6. **hand-off** to the channel's dispatcher actor: a :class:`Send` offered with
   ``tell_nowait`` (:meth:`DispatcherChild.offer`). A dispatcher that already has
   ``capacity`` jobs waiting (its mailbox plus the jobs waiting for a slot, read
   from its :class:`DispatcherMemory`) refuses with :class:`Overloaded` *before*
   anything is written; one that filled between the check and the offer leaves the
   durable row to the backlog task (``deferred``).

A :class:`ChannelDispatcher` is an :class:`~engine.actor.Actor` (one per channel,
built by :func:`dispatcher_child`, child id ``dispatcher_<channel>``). Its messages::

    Send(job)              from the service / the backlog: hold the job, send it in a free
                           slot or queue it for the next (``capacity`` queued at most:
                           beyond it the job is shed to the backlog, counted ``shed``)
    Sent(job, outcome)     from a send task: the failover's outcome (None: an adapter bug;
                           the row stays queued)
    Unpark(job)            ``send_after(requeue_after_s)``: a parked job is due again
    Recorded(job, ...)     from a record task: the outcome is written (or given up)

Sends run concurrently (at most ``concurrency`` slots) as tasks of the actor
(``start_soon``); each is one :class:`~actors.failover.Failover` attempt and
reports back by message, so the held ids, the waiting and parked jobs change only
in ``handle``. A final outcome is written in one transaction by a record task (the
slot stays busy until :class:`Recorded`): ``dispatched`` / ``failed`` /
``undeliverable`` (recipient marked dead) / ``unknown``. When every provider is
down (QUEUED) the dispatch stays ``queued`` and is parked for the failover's
``requeue_after_s`` (at most ``max_parked`` parked: beyond it the backlog has it),
until ``give_up_after_s`` after its acceptance: then ``failed``
``providers_exhausted`` (or ``dispatched`` -> ``unknown`` ``ambiguous_timeout`` when
a provider that timed out may have taken it). Numbers: ``ref.statistics()``
(:class:`DispatcherStatistics`).

State machine of a dispatcher (``DispatcherState``, one log line per change)::

    IDLE --Send--> SENDING --every slot busy, a job waits--> SATURATED
    SATURATED --a slot frees, nothing waits--> SENDING --nothing held--> IDLE
    any --the incarnation ends--> STOPPED

Its mailbox outlives a restart; the sends in flight, the parked and the waiting
jobs when it crashed are cancelled with the incarnation, and their rows (still
``queued``) are picked up again by the backlog resumer
(:mod:`actors.backlog_resumer`), which also resumes, at start and every
``resume_interval_s``, what a crash of the whole daemon left queued, for every
tenant, claiming each row so that two replicas never resume it both. A
resumed send goes out again with the same idempotency key (providers dedupe on
it, and the failover asks them first: ``probe``).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter

from actors.dispatch_request import (
    DispatchLimits,
    InvalidRequest,
    RequestDecoder,
    SubmitRequest,
)
from actors.failover import (
    AMBIGUOUS_REASON,
    EXHAUSTED_REASON,
    AttemptResult,
    Failover,
    Outcome,
    OutcomeKind,
)
from actors.idempotency import IdempotencyConflict, IdempotencyStore, Lookup
from actors.templates import MissingField, TemplateNotFound, TemplateRegistry, TemplateRenderError
from engine.actor import Actor, ActorRef, Overflow, actor_child
from engine.errors import ActorStopped, LoadShed, MailboxFull, ProviderError, TriageError
from engine.metrics import families
from engine.ratelimit import RateLimiter
from engine.statelog import StateLog
from engine.supervisor import ChildSpec, Restart, Supervisor
from providers.channel import ChannelName, Message
from providers.db.categories import BlockState
from providers.db.dispatches import (
    AcceptRequest,
    AcceptResult,
    DeadRecipient,
    DispatchStatus,
    OutcomeRecord,
    Transition,
    TransitionResult,
    accept_async,
    record_outcome_async,
)
from providers.push_feedback import push_platform

if TYPE_CHECKING:
    from actors.group_commit import GroupCommit
    from actors.phi_guard import PhiGuard
    from engine.metrics import Metrics
    from engine.runtime import Runtime
    from providers.db.pool import DbPool

__all__ = [
    "CategoryDisabled",
    "ChannelDispatcher",
    "DispatchService",
    "DispatcherChild",
    "DispatcherMemory",
    "DispatcherMessage",
    "DispatcherState",
    "DispatcherStatistics",
    "Job",
    "Overloaded",
    "PhiRefused",
    "Recorded",
    "Send",
    "Sent",
    "SubmitResult",
    "Unpark",
    "dispatcher_child",
    "route_key",
]

log = logging.getLogger("triage.dispatcher")

DEFAULT_ROUTE = "default"

# -- errors the ingress maps to answers ----------------------------------------------------


class CategoryDisabled(TriageError):
    """The tenant's category is disabled (row 3): the dispatch was stored ``failed``."""

    def __init__(self, tenant_id: str, channel: str, category: str, dispatch_id: str) -> None:
        super().__init__(
            f"category {category!r} of channel {channel} is disabled for tenant {tenant_id}"
        )
        self.tenant_id = tenant_id
        self.channel = channel
        self.category = category
        self.dispatch_id = dispatch_id


class PhiRefused(TriageError):
    """The push payload carries PHI: the dispatch was stored ``failed`` reason ``phi_guard``."""

    def __init__(self, what: str, dispatch_id: str | None) -> None:
        super().__init__(f"push payload refused by the PHI guard ({what})")
        self.what = what
        self.dispatch_id = dispatch_id


class Overloaded(LoadShed):
    """The channel's dispatcher has ``capacity`` jobs waiting (503); nothing was written."""

    def __init__(self, channel: str, capacity: int) -> None:
        super().__init__(f"the {channel} dispatcher is full ({capacity} queued)")
        self.channel = channel
        self.capacity = capacity


# -- requests and results -------------------------------------------------------------------


class SubmitResult(msgspec.Struct, frozen=True, kw_only=True):
    """The one result of a dispatch request, at every door: the dispatch and where it
    stands. ``replay``: an earlier request's dispatch (``status`` None when the cache
    answered, which does not know it); ``deferred``: accepted, but left to the backlog
    task (the mailbox filled meanwhile)."""

    dispatch_id: str
    status: DispatchStatus | None
    replay: bool = False
    reason: str | None = None
    deferred: bool = False


# -- the channel dispatcher (an actor) ------------------------------------------------------


class DispatcherState(enum.Enum):
    IDLE = "idle"  # nothing held
    SENDING = "sending"  # sends in flight (or parked), a slot free
    SATURATED = "saturated"  # every slot busy: jobs wait for one
    STOPPED = "stopped"


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """A queued dispatch to send: what :class:`Send` carries."""

    dispatch_id: uuid.UUID
    tenant_id: str
    idempotency_key: str
    channel: str
    recipient: str
    body: str
    subject: str | None
    category: str
    data: dict[str, str]
    accepted_at: float  # Trio time
    throttled: bool = False
    possible_duplicate: bool = False
    unsettled_provider: str | None = None
    resumed: bool = False  # from the backlog: it may have been sent before a crash


class Send(msgspec.Struct, frozen=True, tag=True):
    """From the service or the backlog: send this dispatch (ignored if already held)."""

    job: Job


class Sent(msgspec.Struct, frozen=True, tag=True):
    """From a send task: the failover's outcome (None: the send failed unexpectedly).

    Like every report, it names the ``incarnation`` that started the task: one an
    earlier incarnation left in the mailbox is ignored (its job went with it)."""

    job: Job
    outcome: Outcome | None
    incarnation: int


class Unpark(msgspec.Struct, frozen=True, tag=True):
    """``send_after`` ``requeue_after_s``: a parked dispatch is due again."""

    job: Job
    incarnation: int


class Recorded(msgspec.Struct, frozen=True, tag=True):
    """From a record task: the outcome write ended; ``failures`` tries failed (the row
    stays queued if all did), ``error``: it failed unexpectedly (stays queued too)."""

    job: Job
    failures: int
    error: bool
    incarnation: int


DispatcherMessage = Send | Sent | Unpark | Recorded


class DispatcherStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What ``ref.statistics()`` reports; counts are totals across restarts."""

    state: DispatcherState
    held: int  # waiting for a slot, sending, parked or recording
    waiting: int  # held, waiting for a slot
    in_flight: int  # slots busy (a send, or its outcome write)
    parked: int  # waiting for their requeue
    sent: int  # failover attempts started
    dispatched: int
    failed: int
    undeliverable: int
    unknown: int
    requeued: int  # attempts that ended QUEUED within give_up_after_s
    exhausted: int  # dispatches given up after give_up_after_s
    record_failures: int
    shed: int  # sends refused: ``capacity`` jobs already waiting (left to the backlog)
    errors: int  # unexpected errors in a send (the row stays queued)


@dataclass(slots=True)
class DispatcherMemory:
    """What outlives an incarnation of a dispatcher, created once with its child.

    The actor alone writes it (in ``handle``); the service reads :meth:`holds` and
    ``waiting`` on its accept path, which must answer at once. ``idle`` is set
    whenever nothing is held.
    """

    held: set[uuid.UUID] = field(default_factory=set)
    waiting: int = 0
    starts: int = 0
    idle: trio.Event = field(default_factory=trio.Event)
    counts: dict[str, int] = field(default_factory=dict)

    def holds(self, dispatch_id: uuid.UUID) -> bool:
        return dispatch_id in self.held


_COUNTS = (
    "sent", "dispatched", "failed", "undeliverable", "unknown", "requeued", "exhausted",
    "record_failures", "shed", "errors",
)  # fmt: skip
_COUNTER = {
    OutcomeKind.DISPATCHED: "dispatched",
    OutcomeKind.FAILED: "failed",
    OutcomeKind.UNDELIVERABLE: "undeliverable",
    OutcomeKind.UNKNOWN: "unknown",
}


def route_key(channel: ChannelName, recipient: str) -> str:
    """The failover a recipient goes through: push by platform, else ``"default"``."""
    if channel is ChannelName.PUSH:
        return push_platform(recipient)[0]
    return DEFAULT_ROUTE


class ChannelDispatcher(Actor[DispatcherMessage]):
    """One channel's sends; build it with :func:`dispatcher_child` (see the module docstring).

    ``failovers`` maps a route key (:func:`route_key`) to the channel's
    :class:`Failover`. ``throttle`` paces sends of throttled categories per
    (tenant, category). ``record_attempts`` / ``record_backoff_s`` bound the retries
    of the outcome write. ``capacity`` bounds the jobs waiting for one of the
    ``concurrency`` slots (beyond it a :class:`Send` is shed to the backlog);
    ``max_parked`` the dispatches waiting for a requeue (beyond it they are left
    ``queued`` for the backlog).

    Cost: the hand-off is a message and each send reports back by message, so a
    dispatch crosses the mailbox three times (send, outcome, record) where the
    plain task loop before it crossed a memory channel once. Not measurably slower
    end to end (``python -m bench.perf dispatch --quick``, two runs each, 2 shared
    cores): before 34.5 and 39.8 dispatches/s (ratio to the hand-written loop
    0.88, 0.71), as an actor 33.6 and 43.0 (0.89, 0.85); the database and HTTP
    round trips dominate.
    """

    uses_tasks = True

    def __init__(
        self,
        channel: ChannelName,
        db: DbPool,
        failovers: Mapping[str, Failover],
        memory: DispatcherMemory,
        *,
        capacity: int,
        concurrency: int,
        record_attempts: int,
        record_backoff_s: float,
        max_parked: int,
        throttle: RateLimiter | None,
        outcomes: GroupCommit[OutcomeRecord, list[TransitionResult]] | None = None,
    ) -> None:
        self.channel = channel
        self.outcomes = outcomes
        self.name = f"dispatcher_{channel}"
        self.db = db
        self.failovers = failovers
        self.memory = memory
        self.capacity = capacity
        self.concurrency = concurrency
        self.record_attempts = record_attempts
        self.record_backoff_s = record_backoff_s
        self.max_parked = max_parked
        self.throttle = throttle
        self.states = StateLog(self.name, DispatcherState.IDLE, log)
        self._waiting: deque[Job] = deque()
        self._in_flight = 0
        self._parked = 0
        for name in _COUNTS:
            memory.counts.setdefault(name, 0)
        self._counts = memory.counts
        memory.starts += 1
        self._incarnation = memory.starts
        memory.held.clear()  # an earlier incarnation's sends were cancelled with it
        memory.waiting = 0
        memory.idle.set()

    # -- the actor's life ----------------------------------------------------------------------

    async def terminate(self, reason: BaseException | None) -> None:
        # Sends in flight, parked and waiting jobs are gone with the incarnation;
        # their rows are still queued and the backlog task resumes them.
        memory = self.memory
        memory.held.clear()
        memory.waiting = 0
        memory.idle.set()
        self._waiting.clear()
        self.states.enter(DispatcherState.STOPPED, "stopped" if reason is None else repr(reason))

    def statistics(self) -> DispatcherStatistics:
        c = self._counts
        return DispatcherStatistics(
            state=self.states.state,
            held=len(self.memory.held),
            waiting=len(self._waiting),
            in_flight=self._in_flight,
            parked=self._parked,
            sent=c["sent"],
            dispatched=c["dispatched"],
            failed=c["failed"],
            undeliverable=c["undeliverable"],
            unknown=c["unknown"],
            requeued=c["requeued"],
            exhausted=c["exhausted"],
            record_failures=c["record_failures"],
            shed=c["shed"],
            errors=c["errors"],
        )

    async def handle(self, message: DispatcherMessage) -> object:
        match message:
            case Send(job=job):
                held = self.memory.held
                if job.dispatch_id in held:
                    return None  # offered twice (the backlog read it meanwhile)
                if self._in_flight >= self.concurrency and len(self._waiting) >= self.capacity:
                    self._counts["shed"] += 1  # its row is queued: the backlog sends it
                    return None
                if not held:
                    self.memory.idle = trio.Event()
                held.add(job.dispatch_id)
                self._start(job)
            case Sent(incarnation=n) | Unpark(incarnation=n) | Recorded(incarnation=n) if (
                n != self._incarnation
            ):
                return None  # an earlier incarnation's: its job went with it
            case Sent(job=job, outcome=None):
                self._counts["errors"] += 1
                self._release(job)
            case Sent(job=job, outcome=Outcome() as outcome):
                self._settle(job, outcome)
            case Unpark(job=job):
                self._parked -= 1
                self._start(job)
            case Recorded(job=job, failures=failures, error=error):
                self._counts["record_failures"] += failures
                self._counts["errors"] += error
                self._release(job)
        self._update_state()
        return None

    # -- slots, parking ---------------------------------------------------------------------

    def _start(self, job: Job) -> None:
        """Send ``job`` in a free slot, or queue it for the next one."""
        if self._in_flight < self.concurrency:
            self._in_flight += 1
            self._counts["sent"] += 1
            self.start_soon(self._send, job)
        else:
            self._waiting.append(job)
            self.memory.waiting = len(self._waiting)

    def _free_slot(self) -> None:
        self._in_flight -= 1
        if self._waiting:
            job = self._waiting.popleft()
            self.memory.waiting = len(self._waiting)
            self._start(job)

    def _release(self, job: Job) -> None:
        """``job`` is done here (recorded, or left to the backlog): its slot and id go."""
        self._free_slot()
        held = self.memory.held
        held.discard(job.dispatch_id)
        if not held:
            self.memory.idle.set()

    def _settle(self, job: Job, outcome: Outcome) -> None:
        """After an attempt: park a QUEUED job for its requeue, or record the outcome."""
        failover = self.failovers[route_key(self.channel, job.recipient)]
        job = msgspec.structs.replace(job, resumed=False)  # asked once; a requeue is ours
        if outcome.kind is OutcomeKind.QUEUED:
            if outcome.possible_duplicate:
                unsettled = [
                    a.provider
                    for a in outcome.attempts
                    if a.result is AttemptResult.TIMEOUT_UNSETTLED
                ]
                job = msgspec.structs.replace(
                    job,
                    possible_duplicate=True,
                    unsettled_provider=unsettled[0] if unsettled else job.unsettled_provider,
                )
            now = trio.current_time()
            if now + failover.requeue_after_s <= job.accepted_at + failover.give_up_after_s:
                self._counts["requeued"] += 1
                if self._parked >= self.max_parked:
                    self._release(job)  # left queued: the backlog has it
                    return
                self._parked += 1
                self._free_slot()  # still held while parked
                self.send_after(failover.requeue_after_s, Unpark(job, self._incarnation))
                return
            self._counts["exhausted"] += 1
            if job.possible_duplicate:
                outcome = Outcome(
                    kind=OutcomeKind.UNKNOWN,
                    provider=job.unsettled_provider,
                    reason=AMBIGUOUS_REASON,
                    possible_duplicate=True,
                )
            else:
                outcome = Outcome(kind=OutcomeKind.FAILED, reason=EXHAUSTED_REASON)
        self._counts[_COUNTER[outcome.kind]] += 1
        self.start_soon(self._record, job, outcome)  # keeps the slot until Recorded

    def _update_state(self) -> None:
        if self._waiting:
            self.states.enter(DispatcherState.SATURATED, f"{len(self._waiting)} waiting")
        elif self.memory.held:
            self.states.enter(DispatcherState.SENDING, "sends held")
        else:
            self.states.enter(DispatcherState.IDLE, "nothing held")

    # -- the tasks (they report back; only handle changes the state) -------------------------

    async def _send(self, job: Job) -> None:
        """One failover attempt for ``job``, reported as :class:`Sent`."""
        outcome: Outcome | None = None
        try:
            if job.throttled and self.throttle is not None:
                await self.throttle.acquire(f"{job.tenant_id}:{job.category}")
            failover = self.failovers[route_key(self.channel, job.recipient)]
            message = Message(
                client_ref=str(job.dispatch_id),
                tenant_id=job.tenant_id,
                idempotency_key=job.idempotency_key,
                channel=self.channel,
                recipient=job.recipient,  # push keeps its "<platform>:" prefix: the adapter reads it
                body=job.body,
                subject=job.subject,
                category=job.category,
                data=job.data,
            )
            outcome = await failover.attempt(message, probe=job.resumed)
        except Exception:  # a bug in an adapter must not take the other sends down
            log.exception(
                "%s: send of %s failed unexpectedly; it stays queued for the backlog",
                self.name,
                job.dispatch_id,
            )
        await self.ref.tell(Sent(job, outcome, self._incarnation))

    async def _record(self, job: Job, outcome: Outcome) -> None:
        """Write ``outcome`` (retried ``record_attempts`` times), reported as :class:`Recorded`."""
        steps, dead = _steps(job, outcome)
        delay = self.record_backoff_s
        failures = 0
        error = False
        while True:
            try:
                if self.outcomes is not None:  # the group commit of outcomes
                    await self.outcomes.submit(OutcomeRecord(job.tenant_id, steps, dead))
                else:
                    await self.db.run_unit(record_outcome_async, job.tenant_id, steps, dead)
                break
            except ProviderError as exc:
                failures += 1
                if failures == self.record_attempts:
                    # The row stays queued: the backlog sends it again, same idempotency key.
                    log.error(
                        "%s: outcome %s of %s not recorded: %s",
                        self.name,
                        outcome.kind,
                        job.dispatch_id,
                        exc,
                    )
                    break
                await trio.sleep(delay)
                delay *= 2
            except Exception:  # a bug must not take the other sends down: it stays queued
                log.exception("%s: outcome of %s not recorded", self.name, job.dispatch_id)
                error = True
                break
        await self.ref.tell(Recorded(job, failures, error, self._incarnation))


@dataclass(frozen=True, slots=True)
class DispatcherChild:
    """A dispatcher as the service knows it: its child spec, its ref and its memory."""

    channel: ChannelName
    spec: ChildSpec
    ref: ActorRef[DispatcherMessage]
    memory: DispatcherMemory
    capacity: int

    def full(self) -> bool:
        """``capacity`` jobs already wait (in the mailbox, or for a slot)."""
        return self.ref.queued() + self.memory.waiting >= self.capacity

    def offer(self, job: Job) -> bool:
        """Hand ``job`` over without waiting; False when the mailbox refused it (full or gone)."""
        try:
            self.ref.tell_nowait(Send(job))
        except (MailboxFull, ActorStopped):
            return False
        return True


def dispatcher_child(
    channel: ChannelName | str,
    db: DbPool,
    failovers: Mapping[str, Failover],
    *,
    capacity: int,
    overflow: Overflow,
    concurrency: int,
    record_attempts: int,
    record_backoff_s: float,
    max_parked: int,
    shutdown_s: float,
    throttle: RateLimiter | None = None,
    metrics: Metrics | None = None,
    outcomes: GroupCommit[OutcomeRecord, list[TransitionResult]] | None = None,
) -> DispatcherChild:
    """The dispatcher of ``channel`` (child id ``dispatcher_<channel>``); every number checked now.

    ``capacity`` / ``overflow`` are the mailbox's (``[mailboxes.dispatcher]``); the
    overflow must be ``wait``: the send tasks report back through the same mailbox
    and a report must never be dropped or refused (the service never waits: it
    offers with ``tell_nowait``).
    """
    if capacity < 1 or concurrency < 1 or record_attempts < 1 or max_parked < 0:
        raise ValueError("capacity, concurrency, record_attempts >= 1; max_parked >= 0")
    if not failovers:
        raise ValueError(f"dispatcher {channel}: needs at least one failover")
    if overflow is not Overflow.WAIT:
        raise ValueError(
            f"dispatcher {channel}: mailbox overflow must be 'wait' (its sends report back"
            f" through it), got {overflow.value!r}"
        )
    name = ChannelName(channel)
    memory = DispatcherMemory()
    memory.idle.set()
    factory = partial(
        ChannelDispatcher, name, db, dict(failovers), memory, capacity=capacity,
        concurrency=concurrency, record_attempts=record_attempts,
        record_backoff_s=record_backoff_s, max_parked=max_parked, throttle=throttle,
        outcomes=outcomes,
    )  # fmt: skip
    spec, ref = actor_child(
        f"dispatcher_{name}", factory, capacity=capacity, overflow=overflow,
        restart=Restart.PERMANENT, shutdown_s=shutdown_s, metrics=metrics,
    )  # fmt: skip
    return DispatcherChild(name, spec, ref, memory, capacity)


def _steps(job: Job, outcome: Outcome) -> tuple[list[Transition], DeadRecipient | None]:
    did = job.dispatch_id
    dup = outcome.possible_duplicate or job.possible_duplicate
    if outcome.kind is OutcomeKind.DISPATCHED:
        return [
            Transition(
                did,
                DispatchStatus.DISPATCHED,
                provider=outcome.provider,
                provider_ref=outcome.provider_ref,
                possible_duplicate=dup,
            )
        ], None
    if outcome.kind is OutcomeKind.UNKNOWN:
        return [
            Transition(
                did, DispatchStatus.DISPATCHED, provider=outcome.provider, possible_duplicate=dup
            ),
            Transition(did, DispatchStatus.UNKNOWN, reason=outcome.reason or AMBIGUOUS_REASON),
        ], None
    if outcome.kind is OutcomeKind.UNDELIVERABLE:
        reason = outcome.reason or "recipient_gone"
        dead = DeadRecipient(job.channel, job.recipient, reason) if outcome.recipient_gone else None
        return [
            Transition(
                did,
                DispatchStatus.UNDELIVERABLE,
                reason=reason,
                provider=outcome.provider,
                possible_duplicate=dup,
            )
        ], dead
    return [
        Transition(
            did,
            DispatchStatus.FAILED,
            reason=outcome.reason or EXHAUSTED_REASON,
            provider=outcome.provider,
            possible_duplicate=dup,
        )
    ], None


# -- the service ------------------------------------------------------------------------------


class _ServiceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.submitted = Counter(
            "triage_dispatch_submitted",
            "Dispatch requests by result",
            ["channel", "result"],
            registry=registry,
        )


@dataclass(slots=True)
class ServiceStats:
    accepted: int = 0
    duplicates: int = 0
    cache_duplicates: int = 0
    conflicts: int = 0
    invalid: int = 0
    template_not_found: int = 0
    phi_refused: int = 0
    category_disabled: int = 0
    undeliverable: int = 0
    overloaded: int = 0
    deferred: int = 0


class DispatchService:
    """What the ingress calls; owns nothing but its caches (see the module docstring).

    Knobs: ``key_ttl_s`` (idempotency rows), ``limits`` (its :attr:`requests`, the
    decoder that makes every :class:`SubmitRequest`), ``phi_guard`` (the push PHI
    guard, row 11; None: no guard), ``channels_supervisor`` (keyword arguments of
    the ``channels`` Supervisor), ``accepts`` (the group commit of the accept; None: one
    transaction per request). What its dispatchers lose is resumed from the database by
    :class:`~actors.backlog_resumer.BacklogResumer`, for every tenant.
    """

    def __init__(
        self,
        db: DbPool,
        templates: TemplateRegistry,
        dispatchers: Iterable[DispatcherChild],
        *,
        limits: DispatchLimits,
        key_ttl_s: float,
        phi_guard: PhiGuard | None = None,
        idempotency: IdempotencyStore | None = None,
        accepts: GroupCommit[AcceptRequest, AcceptResult] | None = None,
        registry: CollectorRegistry | None = None,
        runtime: Runtime | None = None,
        channels_supervisor: Mapping[str, Any] | None = None,
        new_id: Callable[[], uuid.UUID] = uuid.uuid4,
    ) -> None:
        if not key_ttl_s > 0:
            raise ValueError("key_ttl_s must be > 0")
        self.db = db
        self.templates = templates
        self.dispatchers: dict[ChannelName, DispatcherChild] = {}
        for dispatcher in dispatchers:
            if dispatcher.channel in self.dispatchers:
                raise ValueError(f"two dispatchers for channel {dispatcher.channel}")
            self.dispatchers[dispatcher.channel] = dispatcher
        self.limits = limits
        #: The request decoder of both doors (and of in-process callers), from ``limits``.
        self.requests = RequestDecoder(limits)
        self.key_ttl_s = key_ttl_s
        self.phi_guard = phi_guard
        self.idempotency = idempotency
        self.accepts = accepts
        self.runtime = runtime
        self.channels_supervisor = dict(channels_supervisor or {})
        self.new_id = new_id
        self.stats = ServiceStats()
        self._metrics = families(registry, _ServiceMetrics) if registry is not None else None

    # -- the supervisor tree ------------------------------------------------------------------

    def child_specs(self) -> list[ChildSpec]:
        """The ``channels`` supervisor (a dispatcher per channel). Start the backlog
        resumer (:func:`~actors.backlog_resumer.backlog_resumer_child`) after it."""
        channels = Supervisor(
            "channels",
            [d.spec for d in self.dispatchers.values()],
            runtime=self.runtime,
            **self.channels_supervisor,
        )
        return [channels.child_spec(Restart.PERMANENT)]

    # -- submit -------------------------------------------------------------------------------

    async def submit(self, request: SubmitRequest) -> SubmitResult:
        """Dedupe, render, guard, accept and hand off one validated dispatch (module doc)."""
        channel = request.channel
        dispatcher = self.dispatchers.get(channel)
        if dispatcher is None:
            raise InvalidRequest("channel", f"{channel} is not served by this daemon")
        if dispatcher.full():
            self.stats.overloaded += 1
            self._count(channel, "overloaded")
            raise Overloaded(str(channel), dispatcher.capacity)
        tenant = request.tenant_id  # canonical: the decoder made it
        request_hash = _request_hash(request)
        dispatch_id = self.new_id()

        lookup = await self._cache_lookup(tenant, request.idempotency_key, request_hash)
        if lookup is not None and lookup.duplicate is not None:
            cached = lookup.duplicate.response
            if isinstance(cached, dict) and "dispatch_id" in cached:  # a committed dispatch
                self.stats.cache_duplicates += 1
                self._count(channel, "duplicate")
                return SubmitResult(
                    dispatch_id=str(cached["dispatch_id"]), status=None, replay=True
                )
            lookup = None  # not a dispatch's entry: the database decides, nothing is cached
        result = await self._submit(request, channel, dispatcher, tenant, request_hash, dispatch_id)
        if lookup is not None and self.idempotency is not None:
            # The accept committed: only now may Redis name its dispatch (step 2).
            await self.idempotency.settle(
                lookup,
                first=not result.replay,
                stored_hash=request_hash,
                response={"dispatch_id": result.dispatch_id},
            )
        return result

    async def _submit(
        self,
        request: SubmitRequest,
        channel: ChannelName,
        dispatcher: DispatcherChild,
        tenant: str,
        request_hash: str,
        dispatch_id: uuid.UUID,
    ) -> SubmitResult:
        def accept_request(
            body: str, subject: str | None, category: str, version: int | None
        ) -> AcceptRequest:
            return AcceptRequest(
                dispatch_id=dispatch_id,
                tenant_id=tenant,
                idempotency_key=request.idempotency_key,
                request_hash=request_hash,
                channel=str(channel),
                template=request.template,
                template_version=version,
                category=category,
                recipient=request.recipient,
                body=body,
                subject=subject,
                data=dict(request.data),
                key_ttl_s=self.key_ttl_s,
            )

        try:
            template = await self.templates.lookup(
                tenant, request.template, request.template_version
            )
        except TemplateNotFound as missing:
            notice = self.templates.notice_for(
                missing, channel=str(channel), dispatch_id=str(dispatch_id)
            )
            req = accept_request("", None, "default", request.template_version)
            refused = await self.db.run_unit(
                accept_async, req, (DispatchStatus.FAILED, missing.reason), [notice]
            )
            self._settle_duplicate(refused, tenant, request.idempotency_key)
            if not refused.created:
                return self._duplicate(refused, channel)
            self.templates.not_found(missing, channel=str(channel))
            self.stats.template_not_found += 1
            self._count(channel, "template_not_found")
            missing.dispatch_id = str(dispatch_id)
            raise
        if template.channel != channel:
            raise InvalidRequest(
                "template", f"{request.template!r} is a {template.channel} template"
            )
        try:
            rendered = self.templates.render(template, request.data)
        except MissingField as exc:
            self.stats.invalid += 1
            raise InvalidRequest(f"data.{exc.field}", "required by the template") from exc
        except TemplateRenderError as exc:
            raise InvalidRequest("template", exc.problem) from exc

        refuse: tuple[DispatchStatus, str] | None = None
        phi = (
            self.phi_guard.check(template, request.data, rendered.body, rendered.subject)
            if channel is ChannelName.PUSH and self.phi_guard is not None
            else None
        )
        if phi is not None and self.phi_guard is not None:
            refuse = (DispatchStatus.FAILED, "phi_guard")
            # Halt, retire, record first (actors/phi_guard.py); a replay finds it retired.
            await self.phi_guard.trip(
                phi, tenant_id=tenant, dispatch_id=str(dispatch_id), channel=str(channel),
                template=template, templates=self.templates,
            )  # fmt: skip
        req = accept_request(rendered.body, rendered.subject, template.category, template.version)
        result: AcceptResult
        if refuse is None and self.accepts is not None:
            result = await self.accepts.submit(req)  # the group commit
        else:
            result = await self.db.run_unit(accept_async, req, refuse)
        self._settle_duplicate(result, tenant, request.idempotency_key)
        if not result.created:
            return self._duplicate(result, channel)
        did = str(dispatch_id)
        if phi is not None:
            self.stats.phi_refused += 1
            self._count(channel, "phi_guard")
            raise PhiRefused(f"rule {phi.rule} at {phi.where}", did)
        if result.status is DispatchStatus.FAILED:  # category_disabled
            self.stats.category_disabled += 1
            self._count(channel, "category_disabled")
            raise CategoryDisabled(tenant, str(channel), template.category, did)
        if result.status is DispatchStatus.UNDELIVERABLE:
            self.stats.undeliverable += 1
            self._count(channel, "undeliverable")
            return SubmitResult(dispatch_id=did, status=result.status, reason=result.reason)
        self.stats.accepted += 1
        self._count(channel, "accepted")
        job = Job(
            dispatch_id=dispatch_id,
            tenant_id=tenant,
            idempotency_key=request.idempotency_key,
            channel=str(channel),
            recipient=request.recipient,
            body=rendered.body,
            subject=rendered.subject,
            category=template.category,
            data=dict(request.data),
            accepted_at=trio.current_time(),
            throttled=result.category_state is BlockState.THROTTLED,
        )
        if not dispatcher.offer(job):  # filled meanwhile: the row is durable, the backlog sends it
            self.stats.deferred += 1
            return SubmitResult(dispatch_id=did, status=DispatchStatus.QUEUED, deferred=True)
        return SubmitResult(dispatch_id=did, status=DispatchStatus.QUEUED)

    def _settle_duplicate(self, result: AcceptResult, tenant: str, key: str) -> None:
        if not result.created and not result.same_request:
            self.stats.conflicts += 1
            raise IdempotencyConflict(tenant, key)

    def _duplicate(self, result: AcceptResult, channel: ChannelName) -> SubmitResult:
        self.stats.duplicates += 1
        self._count(channel, "duplicate")
        return SubmitResult(dispatch_id=str(result.dispatch_id), status=result.status, replay=True)

    def _count(self, channel: ChannelName | str, result: str) -> None:
        if self._metrics is not None:
            self._metrics.submitted.labels(str(channel), result).inc()

    # -- the Redis fast path --------------------------------------------------------------------

    async def _cache_lookup(self, tenant: str, key: str, request_hash: str) -> Lookup | None:
        """The store's cache half of the claim (None without a store); a key cached for
        another request is an :class:`IdempotencyConflict`."""
        if self.idempotency is None:
            return None
        try:
            return await self.idempotency.lookup(tenant, key, request_hash)
        except IdempotencyConflict:
            self.stats.conflicts += 1
            raise


def _request_hash(request: SubmitRequest) -> str:
    material = msgspec.json.encode(
        [
            request.channel,
            request.recipient,
            request.template,
            request.template_version,
            sorted(request.data.items()),
        ]
    )
    return hashlib.sha256(material).hexdigest()
