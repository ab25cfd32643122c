"""The crash backlog: queued dispatches of every tenant, claimed and handed to the dispatchers.

A dispatch is accepted ``queued`` (durably) and handed to its channel's
:class:`~actors.dispatcher.ChannelDispatcher` in memory. Whatever the memory loses
-- a ``kill -9`` of the daemon, a dispatcher restarted with jobs in flight, a job
shed by a full dispatcher, a requeue beyond ``max_parked`` -- is still ``queued`` in
the database, and :class:`BacklogResumer` (child id ``dispatch_backlog``) sends it:
at start and every ``interval_s`` (a timer) it runs one *turn* as a task:

1. **room**: per channel, how many jobs its dispatcher can take now (its
   ``capacity`` less what waits in its mailbox and for a slot), at most ``batch``;
   and the rows the dispatchers hold (waiting, sending, parked for a requeue);
2. **renew** the claims of those held rows that would lapse within two
   ``interval_s`` (the next turn, and one turn of slack), for ``lease_s`` (which must
   exceed two ``interval_s``): while this replica lives, no other replica takes a
   row it is still sending or has parked;
3. **claim** (:meth:`BacklogStore.claim`, in the daemon
   :func:`~providers.db.dispatches.claim_backlog_async`): as the relay
   role, the queued rows of *every* tenant created more than ``older_than_s`` ago
   and not claimed now, oldest first, up to the room of each channel; the claim
   (``claimed_until = now + lease_s``) is set by the statement that locks them
   (``FOR UPDATE SKIP LOCKED``), so another replica's resumer never takes the same
   row. Then, under each row's tenant (RLS), what sending it needs;
4. **hand-off** (in ``handle``, on :class:`Claimed`): each row as a
   :class:`~actors.dispatcher.Job` (``resumed``: the failover asks the provider
   first, it may have been sent before the crash) offered to its dispatcher. A row
   the dispatcher already holds (parked for a requeue) is left to it: the claim
   just renewed keeps other replicas off it. A row it cannot take now (it filled
   meanwhile) has its claim released (:class:`Released`): due again at the next turn.

A turn that filled some channel's room is followed at once by the next (there may
be more); a turn runs at most one at a time. Messages (its own only)::

    Resume()                              timer / init / a full turn: a turn (none runs)
    Claimed(jobs, full, renewed, error)   the claim task's answer (error: the database)
    Released(count, error)                the release task's answer

States (:class:`ResumerState`, one log line per change)::

    IDLE --Resume--> CLAIMING --Claimed--> IDLE
    CLAIMING --Claimed(error)--> DEGRADED --Resume--> CLAIMING   (the next tick retries)

A row claimed (or held) by a resumer that dies waits out its claim and is due again:
after a ``kill -9`` every queued row is resumed within ``max(older_than_s, lease_s) +
interval_s`` of the restart.

**Replicas** (issue 12): runs on every replica, no lease: the claim above shares
the backlog, and a SIGKILLed replica's claims lapse after ``resume_lease_s``.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Protocol

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter

from actors.dispatcher import DispatcherChild, Job
from engine.actor import Actor, ActorRef, Overflow, Timer, actor_child
from engine.errors import ConfigError, ProviderError
from engine.metrics import families
from engine.statelog import StateLog
from engine.supervisor import ChildSpec, Restart
from providers.channel import ChannelName
from providers.db.categories import BlockState
from providers.db.dispatches import (
    BacklogClaim,
    QueuedDispatch,
    claim_backlog_async,
    release_claims_async,
)

if TYPE_CHECKING:
    import uuid

    from engine.metrics import Metrics
    from providers.db.pool import DbPool

__all__ = [
    "BacklogMessage",
    "BacklogResumer",
    "BacklogStore",
    "Claimed",
    "DbBacklogStore",
    "Released",
    "Resume",
    "ResumerState",
    "ResumerStatistics",
    "backlog_resumer_child",
]

log = logging.getLogger("triage.backlog")

CHILD_ID = "dispatch_backlog"


class BacklogStore(Protocol):
    """The queued rows the resumer claims (:class:`DbBacklogStore` in the daemon)."""

    async def claim(
        self,
        limits: Mapping[str, int],
        held: Sequence[uuid.UUID],
        older_than_s: float,
        lease_s: float,
        renew_within_s: float,
    ) -> BacklogClaim:
        """Renew the held rows' claims, claim the due rows (``claim_backlog_async``)."""
        ...

    async def release(self, ids: Sequence[uuid.UUID]) -> int:
        """End these claims (``release_claims_async``); how many."""
        ...


class DbBacklogStore:
    """:class:`BacklogStore` on the daemon's pool (one crossing each)."""

    def __init__(self, db: DbPool) -> None:
        self.db = db

    async def claim(
        self,
        limits: Mapping[str, int],
        held: Sequence[uuid.UUID],
        older_than_s: float,
        lease_s: float,
        renew_within_s: float,
    ) -> BacklogClaim:
        claim: BacklogClaim = await self.db.run_unit(
            claim_backlog_async, dict(limits), list(held), older_than_s, lease_s, renew_within_s
        )
        return claim

    async def release(self, ids: Sequence[uuid.UUID]) -> int:
        count: int = await self.db.run_unit(release_claims_async, list(ids))
        return count


class ResumerState(enum.Enum):
    IDLE = "idle"  # between turns
    CLAIMING = "claiming"  # a turn's claim in flight
    DEGRADED = "degraded"  # the last claim failed; the next tick tries again
    STOPPED = "stopped"


class Resume(msgspec.Struct, frozen=True, tag=True):
    """A turn now, unless one runs (the timer, ``init``, or a turn that filled its room)."""


class Claimed(msgspec.Struct, frozen=True, tag=True):
    """The claim task's answer: the claimed rows as jobs, oldest first; ``full``: some
    channel's room was filled (more may be due); ``error``: the claim failed."""

    jobs: tuple[Job, ...]
    full: bool
    renewed: int = 0
    error: str | None = None


class Released(msgspec.Struct, frozen=True, tag=True):
    """The release task's answer: ``count`` claims ended (``error``: the release failed,
    the claims lapse by themselves)."""

    count: int
    error: str | None = None


BacklogMessage = Resume | Claimed | Released

_RESUME = Resume()


class ResumerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What ``ref.statistics()`` reports; counts are totals across restarts."""

    state: ResumerState
    turns: int  # claims that answered
    claimed: int
    offered: int  # handed to a dispatcher
    held: int  # claimed while their dispatcher held them (left to it)
    renewed: int  # claims of held rows renewed
    released: int  # claims ended because the dispatcher was full
    failures: int  # claims or releases that failed


@dataclasses.dataclass(slots=True)
class ResumerHistory:
    """The counts, created once with the child so a restart keeps them (the fields of
    :class:`ResumerStatistics` but its state)."""

    turns: int = 0
    claimed: int = 0
    offered: int = 0
    held: int = 0
    renewed: int = 0
    released: int = 0
    failures: int = 0


class _ResumerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.resumed = Counter(
            "triage_dispatch_resumed",
            "Queued dispatches claimed from the backlog and handed to their dispatcher",
            ["channel"],
            registry=registry,
        )


class BacklogResumer(Actor[BacklogMessage]):
    """Claims the due queued rows of every tenant and offers them; see the module docstring."""

    name = CHILD_ID
    uses_tasks = True

    def __init__(
        self,
        store: BacklogStore,
        dispatchers: Mapping[ChannelName, DispatcherChild],
        history: ResumerHistory,
        *,
        older_than_s: float,
        lease_s: float,
        batch: int,
        interval_s: float,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.store = store
        self.dispatchers = dispatchers
        self.history = history
        self.older_than_s = older_than_s
        self.lease_s = lease_s
        self.batch = batch
        self.interval_s = interval_s
        self.states = StateLog(self.name, ResumerState.IDLE, log, warn={ResumerState.DEGRADED})
        self._metrics = families(registry, _ResumerMetrics) if registry is not None else None
        self._turning = False

    # -- the actor's life ----------------------------------------------------------------

    async def init(self) -> None:
        self._turn()  # at once: what a crash left queued

    def timers(self) -> list[Timer]:
        return [Timer(self.interval_s, _RESUME)]

    async def terminate(self, reason: BaseException | None) -> None:
        self.states.enter(ResumerState.STOPPED, "stopped" if reason is None else repr(reason))

    def statistics(self) -> ResumerStatistics:
        return ResumerStatistics(state=self.states.state, **dataclasses.asdict(self.history))

    async def handle(self, message: BacklogMessage) -> object:
        match message:
            case Resume():
                if not self._turning:
                    self._turn()
            case Claimed(error=str(error)):
                self._turning = False
                self.history.failures += 1
                self.states.enter(ResumerState.DEGRADED, f"backlog not claimed: {error}")
            case Claimed(jobs=jobs, full=full, renewed=renewed):
                self._turning = False
                self.history.turns += 1
                self.history.renewed += renewed
                self.states.enter(ResumerState.IDLE, "claimed")
                if self._hand_off(jobs) and full:
                    self.tell_self(_RESUME)  # the next turn at once: more may be due
            case Released(count=count, error=error):
                if error is not None:
                    self.history.failures += 1
                    log.warning("%s: claims not released (they lapse): %s", self.name, error)
                self.history.released += count
        return None

    # -- a turn --------------------------------------------------------------------------

    def _turn(self) -> None:
        """Start a turn's claim for the room every dispatcher has now (none: no claim)."""
        limits = {
            str(channel): min(self.batch, max(0, d.capacity - d.ref.queued() - d.memory.waiting))
            for channel, d in self.dispatchers.items()
        }
        held = [i for d in self.dispatchers.values() for i in d.memory.held]
        self._turning = True
        self.states.enter(ResumerState.CLAIMING, "turn")
        self.start_soon(self._claim, limits, held)

    async def _claim(self, limits: dict[str, int], held: list[uuid.UUID]) -> None:
        """Renew the held rows' claims, claim what the room allows; report :class:`Claimed`."""
        try:
            claim = await self.store.claim(
                limits, held, self.older_than_s, self.lease_s, 2 * self.interval_s
            )
        except ProviderError as exc:
            await self.ref.tell(Claimed((), False, error=str(exc) or type(exc).__name__))
            return
        now = trio.current_time()
        per_channel: dict[str, int] = {}
        for row in claim.rows:
            per_channel[row.channel] = per_channel.get(row.channel, 0) + 1
        full = any(per_channel.get(c, 0) >= n for c, n in limits.items() if n)
        jobs = tuple(_job(row, now) for row in claim.rows)
        await self.ref.tell(Claimed(jobs, full, claim.renewed))

    def _hand_off(self, jobs: Iterable[Job]) -> bool:
        """Offer each claimed job; True when every one found its place (none released)."""
        history = self.history
        left: list[uuid.UUID] = []
        for job in jobs:
            history.claimed += 1
            dispatcher = self.dispatchers[ChannelName(job.channel)]
            if dispatcher.memory.holds(job.dispatch_id):
                history.held += 1  # parked here: the renewed claim keeps other replicas off
                continue
            if dispatcher.full() or not dispatcher.offer(job):
                left.append(job.dispatch_id)
                continue
            history.offered += 1
            if self._metrics is not None:
                self._metrics.resumed.labels(job.channel).inc()
        if left:
            self.start_soon(self._release, left)
        return not left

    async def _release(self, ids: list[uuid.UUID]) -> None:
        try:
            count = await self.store.release(ids)
        except ProviderError as exc:
            await self.ref.tell(Released(0, str(exc) or type(exc).__name__))
        else:
            await self.ref.tell(Released(count))


def _job(row: QueuedDispatch, now: float) -> Job:
    return Job(
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


def backlog_resumer_child(
    store: BacklogStore,
    dispatchers: Iterable[DispatcherChild],
    *,
    older_than_s: float,
    lease_s: float,
    batch: int,
    interval_s: float,
    capacity: int,
    overflow: Overflow,
    shutdown_s: float,
    registry: CollectorRegistry | None = None,
    metrics: Metrics | None = None,
) -> tuple[ChildSpec, ActorRef[BacklogMessage]]:
    """The resumer's child spec (id ``dispatch_backlog``) and ref; every knob checked now.

    Start it after the supervisor of ``dispatchers``. ``older_than_s`` is the
    failover's ``requeue_after_s`` (a fresher queued row is its dispatcher's);
    ``lease_s`` must outlast a send (a claim that lapses mid-send lets another
    replica send too: the provider dedupes on the idempotency key, and a resumed
    send asks first); the mailbox must ``wait`` (its tasks report through it).
    """
    by_channel: dict[ChannelName, DispatcherChild] = {}
    for dispatcher in dispatchers:
        if dispatcher.channel in by_channel:
            raise ConfigError(f"{CHILD_ID}: two dispatchers for channel {dispatcher.channel}")
        by_channel[dispatcher.channel] = dispatcher
    if not by_channel:
        raise ConfigError(f"{CHILD_ID}: no dispatcher to resume the backlog into")
    if not (math.isfinite(older_than_s) and older_than_s >= 0):
        raise ConfigError(f"{CHILD_ID}: older_than_s must be >= 0, got {older_than_s!r}")
    for knob, value in (("lease_s", lease_s), ("interval_s", interval_s)):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{CHILD_ID}: {knob} must be > 0, got {value!r}")
    if not lease_s > 2 * interval_s:
        raise ConfigError(
            f"{CHILD_ID}: lease_s ({lease_s:g}) must be more than twice interval_s"
            f" ({interval_s:g}): a held row's claim is renewed when it would lapse"
            " within two turns"
        )
    if isinstance(batch, bool) or batch < 1:
        raise ConfigError(f"{CHILD_ID}: batch must be a whole number >= 1, got {batch!r}")
    if overflow is not Overflow.WAIT:
        raise ConfigError(
            f"{CHILD_ID}: its mailbox overflow must be 'wait', got {overflow.value!r}"
            " (its own tasks report by message and must never lose a report)"
        )
    factory = partial(
        BacklogResumer, store, by_channel, ResumerHistory(), older_than_s=older_than_s,
        lease_s=lease_s, batch=batch, interval_s=interval_s, registry=registry,
    )  # fmt: skip
    return actor_child(
        CHILD_ID, factory, capacity=capacity, overflow=overflow, restart=Restart.PERMANENT,
        shutdown_s=shutdown_s, metrics=metrics,
    )  # fmt: skip
