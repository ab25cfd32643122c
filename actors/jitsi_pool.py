"""The Jitsi pool (catalog row 4): one poller per videobridge node, and placement like jicofo's.

Two kinds of actor, under one supervisor (``supervisors/virtual.py``):

* :class:`BridgeNode`, one per node of ``[jitsi] nodes``: every ``poll_interval_s``
  it reads ``/about/health``, ``/colibri/stats`` and ``/colibri/drain``, each within
  its timeout, records the outcome in the node's breaker (when the breaker admits
  it: an open breaker's half-open probe is the next poll) and tells the pool a
  :class:`NodeReport`. It never places anything.
* :class:`JitsiPool`: keeps the latest :class:`NodeView` of every node and, every
  ``place_interval_s``, claims the sessions waiting for a bridge (the inbox creates
  them, row 18) and places each on the best node (:func:`rank`), allocating its room
  through that node's breaker; a node whose allocation fails is skipped for
  ``failure_reset_s`` and the session fails over to the next node at once.

Placement (:func:`rank`, as jicofo's bridge selector): only *operational* nodes
(healthy at the last poll, heard from within ``stale_after_s``, no failure within
``failure_reset_s``, breaker not refusing) that are not shutting down; among them
non-draining before draining, stress below ``overload_threshold`` before
overloaded, then the lowest stress, then the fewest participants, then the name.

A session **fails** (``triage_virtual_session_failed_total{reason}``, fed to row 4's
count-in-window detector, once per failure episode) when

* ``no_bridge``: it was claimed and every candidate node refused or failed its
  allocation; or every node has been polled and none is a candidate (then the
  sessions waiting for their first bridge fail at once, nothing is allocated);
* ``bridge_lost``: the node hosting it was lost (its breaker opened).

Each failed session gets a fallback thread request (``actors.fallback_thread``, row
14 guards against a loop) and waits for a bridge again: it is placed anew on a
healthy node (``failovers`` counted on the row), up to ``max_failures`` times.

Row 4's mitigation (:class:`FailOver`, sent when the detector fires): the nodes on
which sessions failed within the detector's window are taken out of the pool
(their breakers forced open) and a ``page`` :class:`PoolFailedOver` notice is
published; a forced node comes back once it has been healthy for
``failure_reset_s``. New sessions go to the other nodes meanwhile.

The join token is not made here: a placed session has its room and node in its
row, and ``on_placed(session, allocation)`` hands the token service the
:class:`~providers.jitsi.Allocation` (room name, node URL) to add the token to.

States (:class:`PoolState`, one log line per change)::

    STARTING --first report--> SERVING --no operational node--> NO_BRIDGE
    SERVING/NO_BRIDGE --a node lost or forced out--> DEGRADED --all back--> SERVING
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Protocol, TypeVar

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from engine.actor import Actor, ActorRef, Timer
from engine.breaker import Breaker, CircuitState
from engine.detectors import CountInWindowDetector
from engine.errors import ActorStopped, CircuitOpen, MailboxFull, ProviderError, ProviderTimeout
from engine.events import EventBus, Notice
from engine.metrics import families
from engine.statelog import StateLog
from providers.db.virtual_sessions import SessionRef
from providers.jitsi import Allocation, BridgeClient

__all__ = [
    "FAILOVER",
    "PLACE",
    "POLL",
    "ROW",
    "BridgeNode",
    "FailOver",
    "JitsiPool",
    "NodeReport",
    "NodeView",
    "Place",
    "PlacementRules",
    "Poll",
    "PoolFailedOver",
    "PoolHandle",
    "PoolMessage",
    "PoolState",
    "PoolStatistics",
    "SessionFailed",
    "SessionStore",
    "operational",
    "rank",
    "room_name",
]

log = logging.getLogger("triage.jitsi")

T = TypeVar("T")

ROW: Final = 4  # the catalog row this actor owns: virtual room unreachable

NO_BRIDGE: Final = "no_bridge"
BRIDGE_LOST: Final = "bridge_lost"


# -- what a node looks like ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeView:
    """A node as its last poll saw it (Trio times)."""

    name: str
    url: str
    healthy: bool = False
    stress: float = 0.0
    conferences: int = 0
    participants: int = 0
    draining: bool = False
    shutting_down: bool = False
    seen_at: float | None = None  # the last good poll
    failed_at: float | None = None  # the last failed poll or allocation
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PlacementRules:
    """The numbers placement decides by (from ``[jitsi]``)."""

    overload_threshold: float
    failure_reset_s: float
    stale_after_s: float
    room_stress: float = 0.0  # added to a node's stress per room placed until its next poll


#: Breaker states in which a node takes no new room.
_REFUSING: Final = frozenset({CircuitState.OPEN, CircuitState.FORCED_OPEN})


def operational(
    view: NodeView, now: float, rules: PlacementRules, breaker: CircuitState = CircuitState.CLOSED
) -> bool:
    """Whether ``view``'s node may take a room at ``now``: healthy at its last poll, heard
    from within ``stale_after_s``, no failure within ``failure_reset_s``, its breaker not
    refusing."""
    if not view.healthy or view.seen_at is None or breaker in _REFUSING:
        return False
    if now - view.seen_at > rules.stale_after_s:
        return False
    return view.failed_at is None or now - view.failed_at >= rules.failure_reset_s


def rank(
    views: Sequence[NodeView],
    now: float,
    rules: PlacementRules,
    breakers: Mapping[str, CircuitState] | None = None,
) -> list[NodeView]:
    """The candidate nodes for a new room, best first (see the module docstring)."""
    states = breakers or {}
    candidates = [
        v
        for v in views
        if not v.shutting_down
        and operational(v, now, rules, states.get(v.name, CircuitState.CLOSED))
    ]
    return sorted(
        candidates,
        key=lambda v: (
            v.draining,
            v.stress >= rules.overload_threshold,
            v.stress,
            v.participants,
            v.name,
        ),
    )


def room_name(prefix: str, session_id: uuid.UUID) -> str:
    """The session's room: one name per session, so a retried allocation is idempotent."""
    return f"{prefix}-{session_id.hex}"


# -- messages -------------------------------------------------------------------------


class Poll(msgspec.Struct, frozen=True, tag=True):
    """A node's turn: read health, stats and drain."""


class Place(msgspec.Struct, frozen=True, tag=True):
    """The pool's turn: place the sessions waiting for a bridge."""


class FailOver(msgspec.Struct, frozen=True, tag=True):
    """Row 4's detector fired: take the failing nodes out of the pool."""


class NodeReport(msgspec.Struct, frozen=True, tag=True):
    """A node's poll, as told to the pool (``breaker``: the node breaker's state value)."""

    view: NodeView
    breaker: str


POLL = Poll()
PLACE = Place()
FAILOVER = FailOver()

PoolMessage = Place | FailOver | NodeReport


@dataclass(frozen=True, slots=True)
class SessionFailed:
    """A failed session, handed to the fallback seam (``on_failed``)."""

    session: SessionRef
    reason: str
    node: str | None


class PoolFailedOver(Notice, frozen=True, kw_only=True):
    """Row 4's mitigation ran: these nodes were taken out of the pool."""

    nodes: tuple[str, ...]
    failed_sessions: int


class PoolState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DEGRADED = "degraded"  # a node is lost or forced out; the others serve
    NO_BRIDGE = "no_bridge"  # no node can take a room
    STOPPED = "stopped"


class PoolStatistics(msgspec.Struct, frozen=True, kw_only=True):
    state: PoolState
    placed: int
    failed: int  # failure episodes counted (row 4's metric)
    failovers: int  # allocations moved on to another node after a failure
    lost: tuple[str, ...]
    forced: tuple[str, ...]
    views: tuple[NodeView, ...]


class SessionStore(Protocol):
    """Where sessions wait and are placed (``DbSessionStore`` in ``supervisors.virtual``)."""

    async def claim(self, limit: int, lease_s: float, max_failures: int) -> list[SessionRef]: ...

    async def placed(self, session_id: uuid.UUID, node: str, room: str) -> bool: ...

    async def failed(self, ids: Sequence[uuid.UUID], reason: str) -> list[SessionRef]: ...

    async def fail_node(self, node: str, reason: str) -> list[SessionRef]: ...

    async def fail_pending(self, limit: int, reason: str) -> list[SessionRef]: ...


class _PoolMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.failed = Counter(
            "triage_virtual_session_failed",
            "Virtual-care sessions that failed to start or dropped",
            ["reason"],
            registry=registry,
        )
        self.placed = Counter(
            "triage_virtual_sessions_placed",
            "Virtual-care sessions placed on a videobridge node",
            ["node"],
            registry=registry,
        )
        self.up = Gauge(
            "triage_jitsi_node_up", "1 if the node is operational for placement", ["node"],
            registry=registry,
        )  # fmt: skip
        self.stress = Gauge(
            "triage_jitsi_node_stress", "The node's stress_level at its last poll", ["node"],
            registry=registry,
        )  # fmt: skip


# -- the node poller -----------------------------------------------------------------------


class BridgeNode(Actor[Poll]):
    """Polls one node and reports to the pool; see the module docstring."""

    def __init__(
        self,
        client: BridgeClient,
        breaker: Breaker,
        pool: ActorRef[PoolMessage],
        *,
        poll_interval_s: float,
        health_timeout_s: float,
        stats_timeout_s: float,
    ) -> None:
        self.name = f"jitsi_node_{client.name}"
        self.client = client
        self.breaker = breaker
        self.pool = pool
        self.poll_interval_s = poll_interval_s
        self.health_timeout_s = health_timeout_s
        self.stats_timeout_s = stats_timeout_s
        self.view = NodeView(client.name, client.url)
        self.polls = 0

    async def init(self) -> None:
        self.tell_self(POLL)  # the first poll at once

    def timers(self) -> Sequence[Timer]:
        return [Timer(self.poll_interval_s, POLL)]

    def statistics(self) -> NodeView:
        return self.view

    async def handle(self, message: Poll) -> None:
        match message:
            case Poll():
                await self._poll()

    async def _bounded(self, timeout_s: float, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        with trio.move_on_after(timeout_s):
            return await fn()
        raise ProviderTimeout(f"jitsi {self.client.name}: {what} not answered in {timeout_s:g} s")

    async def _poll(self) -> None:
        self.polls += 1
        breaker = self.breaker
        try:
            start: float | None = breaker.before_call()
        except CircuitOpen:
            start = None  # still polled (the view stays fresh); the breaker is not told
        now = trio.current_time
        try:
            await self._bounded(self.health_timeout_s, "health", self.client.health)
            stats = await self._bounded(self.stats_timeout_s, "stats", self.client.stats)
            drain = await self._bounded(self.stats_timeout_s, "drain", self.client.drain)
        except ProviderError as exc:
            if start is not None:
                breaker.on_failure(exc, start)
            self.view = replace(self.view, healthy=False, failed_at=now(), error=str(exc))
        else:
            if start is not None:
                breaker.on_success(start)
            self.view = replace(
                self.view,
                healthy=True,
                stress=stats.stress_level,
                conferences=stats.conferences,
                participants=stats.participants,
                shutting_down=stats.graceful_shutdown,
                draining=drain,
                seen_at=now(),
                error=None,
            )
        await self.pool.tell(NodeReport(self.view, breaker.state.value))


# -- the pool ---------------------------------------------------------------------------


class JitsiPool(Actor[PoolMessage]):
    """Placement over the nodes' reports; see the module docstring."""

    name = "jitsi_pool"

    def __init__(
        self,
        *,
        clients: Mapping[str, BridgeClient],
        breakers: Mapping[str, Breaker],
        store: SessionStore,
        rules: PlacementRules,
        place_interval_s: float,
        place_batch: int,
        claim_lease_s: float,
        max_failures: int,
        allocate_timeout_s: float,
        room_prefix: str,
        detector: CountInWindowDetector | None = None,
        on_failed: Callable[[SessionFailed], Awaitable[None]] | None = None,
        on_placed: Callable[[SessionRef, Allocation], Awaitable[None]] | None = None,
        events: EventBus | None = None,
        wall: Callable[[], float] | None = None,
        severity: str = "page",
        registry: CollectorRegistry | None = None,
    ) -> None:
        if set(clients) != set(breakers):
            raise ValueError("jitsi pool: one breaker per node is needed")
        self.clients = dict(clients)
        self.breakers = dict(breakers)
        self.store = store
        self.rules = rules
        self.place_interval_s = place_interval_s
        self.place_batch = place_batch
        self.claim_lease_s = claim_lease_s
        self.max_failures = max_failures
        self.allocate_timeout_s = allocate_timeout_s
        self.room_prefix = room_prefix
        self.detector = detector
        self.on_failed = on_failed
        self.on_placed = on_placed
        self.events = events
        self.wall = wall
        self.severity = severity
        self.views: dict[str, NodeView] = {n: NodeView(n, c.url) for n, c in clients.items()}
        self.lost: set[str] = set()
        self.forced: dict[str, float] = {}  # node -> Trio time it was forced out
        self.recent: dict[str, deque[float]] = {n: deque() for n in clients}  # failure times
        self.placed = 0
        self.failed = 0
        self.failovers = 0
        self.states = StateLog("jitsi pool", PoolState.STARTING, log, warn={PoolState.NO_BRIDGE})
        self._metrics = families(registry, _PoolMetrics) if registry is not None else None

    def timers(self) -> Sequence[Timer]:
        return [Timer(self.place_interval_s, PLACE)]

    def statistics(self) -> PoolStatistics:
        return PoolStatistics(
            state=self.states.state,
            placed=self.placed,
            failed=self.failed,
            failovers=self.failovers,
            lost=tuple(sorted(self.lost)),
            forced=tuple(sorted(self.forced)),
            views=tuple(self.views[n] for n in sorted(self.views)),
        )

    async def handle(self, message: PoolMessage) -> None:
        match message:
            case NodeReport(view=view, breaker=state):
                await self._report(view, CircuitState(state))
            case Place():
                await self._place()
            case FailOver():
                self._fail_over()

    def candidates(self) -> list[NodeView]:
        """The nodes a room would go to now, best first."""
        states = {n: b.state for n, b in self.breakers.items()}
        return rank(list(self.views.values()), trio.current_time(), self.rules, states)

    # -- node reports -------------------------------------------------------------------

    async def _report(self, view: NodeView, state: CircuitState) -> None:
        node = view.name
        old = self.views.get(node)
        # An allocation failure the poll did not see keeps the node skipped.
        if (
            old is not None
            and old.failed_at is not None
            and (view.failed_at is None or old.failed_at > view.failed_at)
        ):
            view = replace(view, failed_at=old.failed_at)
        self.views[node] = view
        now = trio.current_time()
        if self._metrics is not None:
            up = operational(view, now, self.rules, state)
            self._metrics.up.labels(node).set(1 if up else 0)
            self._metrics.stress.labels(node).set(view.stress)
        if state is CircuitState.FORCED_OPEN and node not in self.forced:
            self.forced[node] = now  # forced before this incarnation (a restart): adopt it
        forced_at = self.forced.get(node)
        if forced_at is not None and view.healthy and now - forced_at >= self.rules.failure_reset_s:
            del self.forced[node]
            self.breakers[node].reset("row 4: healthy again after being taken out")
            log.warning("jitsi pool: node %s back in the pool", node)
        if state in _REFUSING and node not in self.lost:
            self.lost.add(node)
            refs = await self.store.fail_node(node, BRIDGE_LOST)
            log.warning("jitsi pool: node %s lost, %d session(s) failed over", node, len(refs))
            for ref in refs:
                await self._session_failed(ref, BRIDGE_LOST, node)
        elif state not in _REFUSING and node in self.lost:
            self.lost.discard(node)
        self._enter_state()

    def _enter_state(self) -> None:
        if not self.candidates():
            self.states.enter(PoolState.NO_BRIDGE, "no operational node")
        elif self.lost or self.forced:
            lost = ", ".join(sorted(self.lost | set(self.forced)))
            self.states.enter(PoolState.DEGRADED, f"out of the pool: {lost}")
        else:
            self.states.enter(PoolState.SERVING, "nodes operational")

    # -- placement ------------------------------------------------------------------------

    async def _place(self) -> None:
        if not self.candidates():
            self._enter_state()
            # Every node was polled and none can take a room: the sessions waiting for
            # their first bridge fail now (a fallback thread each), not at some later
            # moment; failed ones wait quietly for a node to come back.
            if all(v.seen_at is not None or v.failed_at is not None for v in self.views.values()):
                for ref in await self.store.fail_pending(self.place_batch, NO_BRIDGE):
                    await self._session_failed(ref, NO_BRIDGE, None)
            return
        waiting = await self.store.claim(self.place_batch, self.claim_lease_s, self.max_failures)
        unplaced: list[SessionRef] = []
        blamed: dict[uuid.UUID, str] = {}
        for session in waiting:
            allocation, tried = await self._allocate(session)
            if allocation is None:
                unplaced.append(session)
                if tried:
                    blamed[session.id] = tried[-1]
                continue
            if allocation.created:  # jicofo-like: the node counts as busier until it reports
                seen = self.views[allocation.node]
                self.views[allocation.node] = replace(
                    seen, stress=seen.stress + self.rules.room_stress,
                    conferences=seen.conferences + 1,
                )  # fmt: skip
            if await self.store.placed(session.id, allocation.node, allocation.room):
                self.placed += 1
                if self.on_placed is not None:  # the join-token seam
                    await self.on_placed(session, allocation)
                if self._metrics is not None:
                    self._metrics.placed.labels(allocation.node).inc()
        if unplaced:
            was = {s.id: s.state for s in unplaced}
            for ref in await self.store.failed([s.id for s in unplaced], NO_BRIDGE):
                if was.get(ref.id) == "pending":  # a new failure episode; a retry is not one
                    await self._session_failed(ref, NO_BRIDGE, blamed.get(ref.id))
        self._enter_state()

    async def _allocate(self, session: SessionRef) -> tuple[Allocation | None, list[str]]:
        """Allocate the session's room on the best node, failing over at once to the next."""
        room = room_name(self.room_prefix, session.id)
        tried: list[str] = []
        for view in self.candidates():
            node = view.name
            breaker = self.breakers[node]
            try:
                start = breaker.before_call()
            except CircuitOpen:
                continue
            if tried:
                self.failovers += 1
            tried.append(node)
            try:
                with trio.move_on_after(self.allocate_timeout_s):
                    allocation = await self.clients[node].allocate(room)
                    breaker.on_success(start)
                    return allocation, tried
                raise ProviderTimeout(
                    f"jitsi {node}: allocation not answered in {self.allocate_timeout_s:g} s"
                )
            except ProviderError as exc:
                breaker.on_failure(exc, start)
                self.views[node] = replace(
                    self.views[node], failed_at=trio.current_time(), error=str(exc)
                )
                log.warning("jitsi pool: allocation on %s failed (%s), failing over", node, exc)
        return None, tried

    async def _session_failed(self, session: SessionRef, reason: str, node: str | None) -> None:
        self.failed += 1
        if node is not None:
            now = trio.current_time()
            times = self.recent[node]
            times.append(now)
            window = self.detector.window_s if self.detector is not None else None
            while window is not None and times and times[0] < now - window:
                times.popleft()  # only the detector's window matters (bounded)
        if self._metrics is not None:
            self._metrics.failed.labels(reason).inc()
        if self.detector is not None:
            self.detector.observe(1)
        if self.on_failed is not None:
            await self.on_failed(SessionFailed(session, reason, node))

    # -- row 4's mitigation -------------------------------------------------------------------

    def _fail_over(self) -> None:
        """Take out of the pool every node on which sessions failed within the detector's
        window; page."""
        now = trio.current_time()
        window = self.detector.window_s if self.detector is not None else None
        horizon = now - window if window is not None else -float("inf")
        taken: list[str] = []
        failed = 0
        for node, times in self.recent.items():
            while times and times[0] < horizon:
                times.popleft()
            if not times:
                continue
            failed += len(times)
            breaker = self.breakers[node]
            if breaker.state is not CircuitState.FORCED_OPEN:
                breaker.force_open(f"row 4: {len(times)} session(s) failed on this node")
            self.forced.setdefault(node, now)
            taken.append(node)
        log.warning("jitsi pool: row 4 failover, out of the pool: %s", ", ".join(taken) or "none")
        if self.events is not None:
            self.events.emit(
                PoolFailedOver(
                    at=now,
                    wall=self.wall() if self.wall is not None else 0.0,
                    severity=self.severity,
                    row=ROW,
                    nodes=tuple(taken),
                    failed_sessions=failed,
                )
            )
        self._enter_state()


@dataclass
class PoolHandle:
    """The pool's ref and a hook for row 4's detector (stable across restarts)."""

    ref: ActorRef[PoolMessage]
    nodes: dict[str, ActorRef[Poll]] = field(default_factory=dict)

    def request_failover(self) -> None:
        try:
            self.ref.tell_nowait(FAILOVER)
        except (MailboxFull, ActorStopped):
            log.warning("jitsi pool: failover request dropped (mailbox full or stopped)")
