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
   alerted, and :class:`TemplateNotFound` is raised. Nothing is sent.
4. **PHI guard** (push only): a ``data`` key in ``phi_fields`` or rendered text
   matching one of ``phi_patterns`` -> stored ``failed`` reason ``phi_guard``,
   ``triage_phi_guard_hits_total`` counted, :class:`PhiRefused` raised.
5. **accept** (:func:`~providers.db.dispatches.accept_async`, ONE transaction):
   idempotency row, dispatch row ``queued`` and its event. In the same statement the
   category block and the dead-recipient list are read: a disabled category ends
   ``failed`` (:class:`CategoryDisabled` raised), a dead recipient ends
   ``undeliverable``; a throttled category stays queued and its sends are paced
   by the per (tenant, category) :class:`~engine.ratelimit.RateLimiter`.
6. **hand-off** to the channel's :class:`ChannelDispatcher` (a bounded mailbox;
   a full one refuses with :class:`Overloaded` *before* anything is written).

A :class:`ChannelDispatcher` runs sends concurrently (at most ``concurrency``) in
its own nursery; each send is a :class:`~actors.failover.Failover` attempt and ends
in one transaction: ``dispatched`` / ``failed`` / ``undeliverable`` (recipient
marked dead) / ``unknown``. When every provider is down the dispatch stays
``queued`` and is offered again after the failover's ``requeue_after_s``, until
``give_up_after_s`` after its acceptance: then ``failed`` ``providers_exhausted``
(or ``dispatched`` -> ``unknown`` ``ambiguous_timeout`` when a provider that timed
out may have taken it).

State machine of a dispatcher (``DispatcherState``)::

    IDLE --run--> RUNNING --cancelled / crashed--> STOPPED --restart--> RUNNING

Its mailbox and the set of dispatches it holds outlive a restart; the sends in
flight when it crashed are cancelled, and their rows (still ``queued``) are
picked up again by the backlog task, which also resumes, at start and every
``backlog_interval_s``, what a crash of the whole daemon left queued. A resumed
send goes out again with the same idempotency key (providers dedupe on it).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter

from actors.dispatch_request import (
    DispatchLimits,
    InvalidIdempotencyKey,
    InvalidRequest,
    MissingIdempotencyKey,
    RequestDecoder,
    SubmitRequest,
    check_idempotency_key,
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
from engine.detectors import CountInWindowDetector
from engine.errors import LoadShed, ProviderError, TriageError
from engine.metrics import families
from engine.ratelimit import RateLimiter
from engine.supervisor import ChildSpec, Restart, Supervisor
from providers.channel import ChannelName, Message
from providers.db.categories import BlockState
from providers.db.dispatches import (
    AcceptRequest,
    AcceptResult,
    DeadRecipient,
    DispatchStatus,
    QueuedDispatch,
    Transition,
    accept_async,
    queued_backlog_async,
    record_outcome_async,
)
from providers.push_feedback import push_platform

if TYPE_CHECKING:
    from engine.runtime import Runtime
    from providers.db.pool import DbPool

__all__ = [
    "CategoryDisabled",
    "ChannelDispatcher",
    "DispatchLimits",
    "DispatchService",
    "DispatcherState",
    "InvalidIdempotencyKey",
    "InvalidRequest",
    "Job",
    "MissingIdempotencyKey",
    "Overloaded",
    "PhiRefused",
    "RequestDecoder",
    "SubmitRequest",
    "SubmitResult",
    "check_idempotency_key",
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
    """The channel's dispatcher mailbox is full (429 / 503); nothing was written."""

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


# -- the channel dispatcher -----------------------------------------------------------------


class DispatcherState(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    STOPPED = "stopped"


@dataclass(slots=True)
class Job:
    """A queued dispatch to send (the dispatcher's only message)."""

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


@dataclass(slots=True)
class DispatcherStats:
    sent: int = 0
    dispatched: int = 0
    failed: int = 0
    undeliverable: int = 0
    unknown: int = 0
    requeued: int = 0
    record_failures: int = 0
    refused: int = 0  # offers refused: mailbox full
    resumed: int = 0
    errors: int = 0  # unexpected errors in a send (the row stays queued)
    held: int = 0


class ChannelDispatcher:
    """One channel's sends: a bounded mailbox, concurrent sends in its own nursery.

    ``failovers`` maps a route key to the channel's :class:`Failover`: for push the
    platform (``fcm`` / ``apns``, from the recipient's prefix), else ``"default"``.
    ``throttle`` paces sends of throttled categories per (tenant, category).
    ``record_attempts`` / ``record_backoff_s`` bound the retries of the outcome write.
    ``max_parked`` bounds the dispatches waiting for a requeue in memory; beyond it
    they are left ``queued`` for the backlog task.
    """

    def __init__(
        self,
        channel: ChannelName | str,
        db: DbPool,
        failovers: Mapping[str, Failover],
        *,
        capacity: int,
        concurrency: int,
        record_attempts: int,
        record_backoff_s: float,
        max_parked: int,
        throttle: RateLimiter | None = None,
        shutdown_s: float = 5.0,
    ) -> None:
        if capacity < 1 or concurrency < 1 or record_attempts < 1 or max_parked < 0:
            raise ValueError("capacity, concurrency, record_attempts >= 1; max_parked >= 0")
        if not failovers:
            raise ValueError(f"dispatcher {channel}: needs at least one failover")
        self.channel = ChannelName(channel)
        self.name = f"dispatcher_{self.channel}"
        self.db = db
        self.failovers = dict(failovers)
        self.capacity = capacity
        self.concurrency = concurrency
        self.record_attempts = record_attempts
        self.record_backoff_s = record_backoff_s
        self.max_parked = max_parked
        self.throttle = throttle
        self.shutdown_s = shutdown_s
        self.state = DispatcherState.IDLE
        self.stats = DispatcherStats()
        self._send, self._receive = trio.open_memory_channel[Job](capacity)
        self._held: set[uuid.UUID] = set()  # in the mailbox, sending, or parked
        self._parked = 0
        self._slots = trio.CapacityLimiter(concurrency)
        self._nursery: trio.Nursery | None = None
        self.idle = trio.Event()  # set whenever nothing is held (tests, drain)
        self.idle.set()

    # -- outside API --------------------------------------------------------------------------

    def full(self) -> bool:
        return self._send.statistics().current_buffer_used >= self.capacity

    def holds(self, dispatch_id: uuid.UUID) -> bool:
        return dispatch_id in self._held

    def offer(self, job: Job) -> bool:
        """Put ``job`` in the mailbox; False if already held; MailboxFull-like Overloaded."""
        if job.dispatch_id in self._held:
            return False
        try:
            self._send.send_nowait(job)
        except trio.WouldBlock:
            self.stats.refused += 1
            raise Overloaded(str(self.channel), self.capacity) from None
        self._hold(job.dispatch_id)
        return True

    def route_key(self, recipient: str) -> str:
        if self.channel is ChannelName.PUSH:
            return push_platform(recipient)[0]
        return DEFAULT_ROUTE

    def child_spec(self) -> ChildSpec:
        return ChildSpec(
            id=self.name, start=self.run, restart=Restart.PERMANENT, shutdown_s=self.shutdown_s
        )

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The child's body: take jobs from the mailbox, send each in the nursery."""
        self.state = DispatcherState.RUNNING
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                while True:
                    job = await self._receive.receive()
                    try:
                        await self._slots.acquire_on_behalf_of(job.dispatch_id)
                    except BaseException:  # cancelled while waiting: let the backlog have it
                        self._release(job.dispatch_id)
                        raise
                    nursery.start_soon(self._send_one, job)
        finally:
            self._nursery = None
            self.state = DispatcherState.STOPPED

    # -- one send -----------------------------------------------------------------------------

    def _hold(self, dispatch_id: uuid.UUID) -> None:
        self._held.add(dispatch_id)
        self.stats.held = len(self._held)
        self.idle = trio.Event() if self.idle.is_set() else self.idle

    def _release(self, dispatch_id: uuid.UUID) -> None:
        self._held.discard(dispatch_id)
        self.stats.held = len(self._held)
        if not self._held:
            self.idle.set()

    async def _send_one(self, job: Job) -> None:
        keep = False
        try:
            keep = await self._deliver(job)
        except Exception:  # a bug in an adapter must not take the other sends down
            self.stats.errors += 1
            log.exception(
                "%s: send of %s failed unexpectedly; it stays queued for the backlog",
                self.name,
                job.dispatch_id,
            )
        finally:
            self._slots.release_on_behalf_of(job.dispatch_id)
            if not keep:
                self._release(job.dispatch_id)

    async def _deliver(self, job: Job) -> bool:
        """Send ``job`` once through its failover; True when it stays held (parked)."""
        if job.throttled and self.throttle is not None:
            await self.throttle.acquire(f"{job.tenant_id}:{job.category}")
        failover = self.failovers[self.route_key(job.recipient)]
        recipient = job.recipient  # push keeps its "<platform>:" prefix: the adapter reads it
        message = Message(
            client_ref=str(job.dispatch_id),
            tenant_id=job.tenant_id,
            idempotency_key=job.idempotency_key,
            channel=self.channel,
            recipient=recipient,
            body=job.body,
            subject=job.subject,
            category=job.category,
            data=job.data,
        )
        self.stats.sent += 1
        outcome = await failover.attempt(message, probe=job.resumed)
        job.resumed = False  # asked once; a requeue from here on is ours
        if outcome.kind is OutcomeKind.QUEUED:
            if outcome.possible_duplicate:
                job.possible_duplicate = True
                unsettled = [
                    a.provider
                    for a in outcome.attempts
                    if a.result is AttemptResult.TIMEOUT_UNSETTLED
                ]
                job.unsettled_provider = unsettled[0] if unsettled else job.unsettled_provider
            now = trio.current_time()
            if now + failover.requeue_after_s <= job.accepted_at + failover.give_up_after_s:
                return self._park(job, failover.requeue_after_s)
            if job.possible_duplicate:
                outcome = Outcome(
                    kind=OutcomeKind.UNKNOWN,
                    provider=job.unsettled_provider,
                    reason=AMBIGUOUS_REASON,
                    possible_duplicate=True,
                )
            else:
                outcome = Outcome(kind=OutcomeKind.FAILED, reason=EXHAUSTED_REASON)
        await self._record(job, outcome)
        return False

    def _park(self, job: Job, delay_s: float) -> bool:
        """Offer ``job`` again after ``delay_s``; False (let the backlog have it) when full."""
        self.stats.requeued += 1
        nursery = self._nursery
        if nursery is None or self._parked >= self.max_parked:
            return False
        self._parked += 1
        nursery.start_soon(self._unpark, job, delay_s)
        return True

    async def _unpark(self, job: Job, delay_s: float) -> None:
        try:
            await trio.sleep(delay_s)
            await self._send.send(job)  # still held: waits for mailbox room
        except BaseException:
            self._release(job.dispatch_id)
            raise
        finally:
            self._parked -= 1

    async def _record(self, job: Job, outcome: Outcome) -> None:
        steps, dead = _steps(job, outcome)
        counter = {
            OutcomeKind.DISPATCHED: "dispatched",
            OutcomeKind.FAILED: "failed",
            OutcomeKind.UNDELIVERABLE: "undeliverable",
            OutcomeKind.UNKNOWN: "unknown",
        }[outcome.kind]
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        delay = self.record_backoff_s
        for attempt in range(1, self.record_attempts + 1):
            try:
                await self.db.run_unit(record_outcome_async, job.tenant_id, steps, dead)
                return
            except ProviderError as exc:
                self.stats.record_failures += 1
                if attempt == self.record_attempts:
                    # The row stays queued: the backlog sends it again, same idempotency key.
                    log.error(
                        "%s: outcome %s of %s not recorded: %s",
                        self.name,
                        outcome.kind,
                        job.dispatch_id,
                        exc,
                    )
                    return
                await trio.sleep(delay)
                delay *= 2


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
        self.phi_hits = Counter(
            "triage_phi_guard_hits",
            "Push payloads stopped by the pre-send PHI guard or log scanner",
            ["channel"],
            registry=registry,
        )
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
    resumed: int = 0


class DispatchService:
    """What the ingress calls; owns nothing but its caches (see the module docstring).

    Knobs: ``key_ttl_s`` (idempotency rows), ``limits`` (its :attr:`requests`, the
    decoder that makes every :class:`SubmitRequest`), ``phi_fields`` /
    ``phi_patterns`` (push PHI guard), ``backlog_older_than_s`` / ``backlog_batch`` /
    ``backlog_interval_s`` (the resume task), ``tenants`` (tenants whose backlog is
    resumed besides the ones seen, bounded by ``max_tenants``),
    ``channels_supervisor`` (keyword arguments of the ``channels`` Supervisor).
    """

    def __init__(
        self,
        db: DbPool,
        templates: TemplateRegistry,
        dispatchers: Iterable[ChannelDispatcher],
        *,
        limits: DispatchLimits,
        key_ttl_s: float,
        backlog_older_than_s: float,
        backlog_batch: int,
        backlog_interval_s: float,
        max_tenants: int,
        phi_fields: Collection[str] = (),
        phi_patterns: Sequence[str] = (),
        tenants: Iterable[str] = (),
        idempotency: IdempotencyStore | None = None,
        phi_detector: CountInWindowDetector | None = None,
        registry: CollectorRegistry | None = None,
        runtime: Runtime | None = None,
        channels_supervisor: Mapping[str, Any] | None = None,
        new_id: Callable[[], uuid.UUID] = uuid.uuid4,
    ) -> None:
        if not key_ttl_s > 0 or backlog_batch < 1 or not backlog_interval_s > 0:
            raise ValueError("key_ttl_s and backlog_interval_s must be > 0, backlog_batch >= 1")
        if backlog_older_than_s < 0 or max_tenants < 1:
            raise ValueError("backlog_older_than_s must be >= 0 and max_tenants >= 1")
        self.db = db
        self.templates = templates
        self.dispatchers: dict[ChannelName, ChannelDispatcher] = {}
        for dispatcher in dispatchers:
            if dispatcher.channel in self.dispatchers:
                raise ValueError(f"two dispatchers for channel {dispatcher.channel}")
            self.dispatchers[dispatcher.channel] = dispatcher
        self.limits = limits
        #: The request decoder of both doors (and of in-process callers), from ``limits``.
        self.requests = RequestDecoder(limits)
        self.key_ttl_s = key_ttl_s
        self.backlog_older_than_s = backlog_older_than_s
        self.backlog_batch = backlog_batch
        self.backlog_interval_s = backlog_interval_s
        self.max_tenants = max_tenants
        self.phi_fields = frozenset(f.lower() for f in phi_fields)
        try:
            self.phi_patterns = tuple(re.compile(p) for p in phi_patterns)
        except re.error as exc:
            raise ValueError(f"phi_patterns: {exc}") from exc
        self.idempotency = idempotency
        self.phi_detector = phi_detector
        self.runtime = runtime
        self.channels_supervisor = dict(channels_supervisor or {})
        self.new_id = new_id
        self.stats = ServiceStats()
        self._tenants: OrderedDict[str, None] = OrderedDict((str(t), None) for t in tenants)
        self._metrics = families(registry, _ServiceMetrics) if registry is not None else None

    # -- the supervisor tree ------------------------------------------------------------------

    def child_specs(self) -> list[ChildSpec]:
        """The ``channels`` supervisor (a dispatcher per channel) and the backlog task."""
        channels = Supervisor(
            "channels",
            [d.child_spec() for d in self.dispatchers.values()],
            runtime=self.runtime,
            **self.channels_supervisor,
        )
        return [
            channels.child_spec(Restart.PERMANENT),
            ChildSpec(id="dispatch_backlog", start=self.run_backlog, restart=Restart.PERMANENT),
        ]

    async def run_backlog(
        self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Resume what a crash left queued: at start, then every ``backlog_interval_s``."""
        task_status.started()
        while True:
            try:
                await self.resume_backlog()
            except ProviderError as exc:
                log.warning("dispatch backlog not read: %s", exc)
            await trio.sleep(self.backlog_interval_s)

    async def resume_backlog(self) -> int:
        """Offer queued dispatches older than ``backlog_older_than_s`` to their dispatchers."""
        rows: list[QueuedDispatch] = await self.db.run_unit(
            queued_backlog_async, list(self._tenants), self.backlog_older_than_s, self.backlog_batch
        )
        now = trio.current_time()
        offered = 0
        for row in rows:
            dispatcher = self.dispatchers.get(ChannelName(row.channel))
            if dispatcher is None or dispatcher.holds(row.dispatch_id):
                continue
            job = Job(
                dispatch_id=row.dispatch_id,
                tenant_id=row.tenant_id,
                idempotency_key=row.idempotency_key,
                channel=row.channel,
                recipient=row.recipient,
                body=row.body,
                subject=row.subject,
                category=row.category,
                data=row.data,
                accepted_at=now - row.age_s,
                throttled=row.category_state is BlockState.THROTTLED,
                resumed=True,
            )
            try:
                if dispatcher.offer(job):
                    offered += 1
            except Overloaded:
                break  # the next pass takes the rest
        self.stats.resumed += offered
        return offered

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
        self._remember(tenant)
        request_hash = _request_hash(request)
        dispatch_id = self.new_id()

        lookup = await self._cache_lookup(tenant, request.idempotency_key, request_hash)
        if lookup is not None and lookup.duplicate is not None:
            cached = lookup.duplicate.response
            if isinstance(cached, dict) and "dispatch_id" in cached:  # a committed dispatch
                self.stats.cache_duplicates += 1
                self._count(channel, "duplicate")
                return SubmitResult(dispatch_id=str(cached["dispatch_id"]), status=None, replay=True)
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
        dispatcher: ChannelDispatcher,
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
                accept_async, req, (DispatchStatus.FAILED, "template_not_found"), [notice]
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
            self._phi_hit(request, rendered.body, rendered.subject)
            if channel is ChannelName.PUSH
            else None
        )
        if phi is not None:
            refuse = (DispatchStatus.FAILED, "phi_guard")
        req = accept_request(rendered.body, rendered.subject, template.category, template.version)
        result: AcceptResult = await self.db.run_unit(accept_async, req, refuse)
        self._settle_duplicate(result, tenant, request.idempotency_key)
        if not result.created:
            return self._duplicate(result, channel)
        did = str(dispatch_id)
        if phi is not None:
            self.stats.phi_refused += 1
            if self._metrics is not None:
                self._metrics.phi_hits.labels(str(channel)).inc()
            if self.phi_detector is not None:
                self.phi_detector.observe()
            self._count(channel, "phi_guard")
            raise PhiRefused(phi, did)
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
        try:
            dispatcher.offer(job)
        except Overloaded:  # filled meanwhile: the row is durable, the backlog sends it
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

    def _remember(self, tenant: str) -> None:
        tenants = self._tenants
        if tenant in tenants:
            return
        if len(tenants) >= self.max_tenants:
            tenants.popitem(last=False)
        tenants[tenant] = None

    # -- the PHI guard ---------------------------------------------------------

    def _phi_hit(self, request: SubmitRequest, body: str, subject: str | None) -> str | None:
        for name in request.data:
            if name.lower() in self.phi_fields:
                return f"field {name!r}"
        for pattern in self.phi_patterns:
            if pattern.search(body) or (subject is not None and pattern.search(subject)):
                return f"pattern {pattern.pattern!r}"
        return None

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
