"""Supervisors: Erlang/OTP semantics on a Trio nursery.

A :class:`Supervisor` starts its children in order, each one ready before the
next starts, and only then reports itself started. When a child exits it
decides, exactly as an OTP supervisor does:

* **restart type** — ``PERMANENT`` children are always restarted, ``TRANSIENT``
  ones only after a crash, ``TEMPORARY`` ones never. Under ``ONE_FOR_ALL`` and
  ``REST_FOR_ONE`` a static transient child that ends without a crash keeps its
  spec (OTP's child with no pid; state ``EXITED``) and the next restart of its
  group starts it again; where nothing could (``ONE_FOR_ONE``, dynamic
  children) it is removed;
* **strategy** — ``ONE_FOR_ONE`` restarts the child alone; ``ONE_FOR_ALL`` stops
  every other child (reverse order) and restarts them all (in order);
  ``REST_FOR_ONE`` does the same for the children started after it. Temporary
  children stopped by a strategy are not restarted;
* **intensity** — every restart decision is counted per supervisor; a restart
  that makes more than ``max_restarts`` within ``period_s`` seconds (the OTP
  rule, bounds inclusive) stops all children and raises
  :class:`RestartIntensityExceeded` to the parent. The parent takes that as
  OTP's exit reason ``shutdown``, not as a crash: it restarts a permanent
  supervisor child (a counted restart) and neither restarts nor counts a
  transient or temporary one;
* **backoff** — a restart waits ``min(backoff_max_s, backoff_min_s * 2**n)``
  scaled by a random factor in ``[1, 1 + backoff_random_factor]`` (from the
  runtime's seedable :class:`Chance`), where ``n`` counts the child's restarts
  since it last ran ``backoff_reset_s`` without crashing; ``backoff_min_s = 0``
  restarts at once, as OTP does;
* **breaker-aware restart** — a child whose spec names a breaker that is open is
  not restarted hot into it: its restart waits for the breaker's half-open moment.

Exit kinds are three distinct things: a *normal* return, a *crash* (any
``Exception``, exception groups included) and a *shutdown* (the supervisor
cancelled the child, or the child is a supervisor that gave up).
``trio.Cancelled`` is never a crash.

Each start of a child is an *incarnation* with its own cancel scope; running
state belongs to the incarnation, so an old one abandoned past its deadline
that ends late never touches its successor. A cancellation of the supervisor
that arrives while a child is still starting (before its ``started()``)
cancels that child too; nothing starts after the supervisor was cancelled. A
supervisor object runs one incarnation at a time: a restart of it waits until
the previous one has ended.

Children are stopped in reverse start order, each by cancelling its own scope
and waiting at most its ``shutdown_s``. Children added at run time with
:meth:`Supervisor.start_child` / :meth:`Supervisor.start_child_nowait`
(one per tenant, per patient-day, per node) are bounded by ``max_children`` and,
on shutdown, stopped together in parallel — OTP's ``simple_one_for_one`` rule —
before the static children, which stop one by one.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import msgspec
import trio

from .errors import RestartIntensityExceeded, TooManyChildren
from .events import ActorCrashed, ActorRestarted, SupervisorEscalated
from .runtime import Runtime

__all__ = [
    "BreakerLike",
    "ChildInfo",
    "ChildSpec",
    "ChildState",
    "Exit",
    "Restart",
    "Runnable",
    "Strategy",
    "Supervisor",
]


class Restart(enum.Enum):
    PERMANENT = "permanent"
    TRANSIENT = "transient"
    TEMPORARY = "temporary"


class Strategy(enum.Enum):
    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


class Exit(enum.Enum):
    """How a child's incarnation ended. ``SHUTDOWN`` is OTP's exit reason
    ``shutdown``: cancelled by its supervisor, or a supervisor child that gave up."""

    NORMAL = "normal"
    CRASH = "crash"
    SHUTDOWN = "shutdown"


class ChildState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"  # waiting out a backoff or a breaker's open interval
    STOPPING = "stopping"
    EXITED = "exited"  # a transient child that ended without a crash: no incarnation, spec kept


class BreakerLike(Protocol):
    def half_open_at(self) -> float | None:
        """Trio time at which an open breaker lets a probe through; None when not open."""


Start = Callable[..., Awaitable[None]]


class Runnable(Protocol):
    """A long-running service object: a ``name`` and a ``run`` that follows Trio's
    ``nursery.start`` protocol (see :meth:`ChildSpec.of`)."""

    @property
    def name(self) -> str: ...

    async def run(self, task_status: trio.TaskStatus[None] = ...) -> None: ...


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """What to run and how to treat its exits.

    ``start`` follows Trio's ``nursery.start`` protocol: an async callable taking
    ``task_status`` and calling ``task_status.started()`` once really ready.
    ``ready_on_spawn`` marks a child that is ready as soon as it is scheduled
    (an actor without ``init``: its mailbox already exists), so it can be
    spawned without a start handshake. ``on_removed`` runs when the child is
    removed for good (an actor's mailbox is closed then).
    """

    id: str
    start: Start
    restart: Restart = Restart.PERMANENT
    shutdown_s: float = 5.0
    ready_on_spawn: bool = False
    breaker: BreakerLike | None = None
    on_removed: Callable[[], None] | None = None

    @classmethod
    def of(
        cls, service: Runnable, *, shutdown_s: float, restart: Restart | None = None
    ) -> ChildSpec:
        """The child running ``service.run``, named ``service.name``; ``restart``
        defaults to ``PERMANENT``."""
        return cls(
            id=service.name,
            start=service.run,
            restart=restart if restart is not None else Restart.PERMANENT,
            shutdown_s=shutdown_s,
        )


class ChildInfo(msgspec.Struct, frozen=True):
    id: str
    state: str
    restart: str
    restarts: int
    dynamic: bool


class _Incarnation:
    """One start of a child: its own cancel scope, its start handshake and its end.

    It is also the ``task_status`` handed to the child's ``start``. Running
    state lives here and not on :class:`_Child`: when an incarnation abandoned
    past its deadline finally ends, it marks only itself ended, never the
    incarnation that replaced it.
    """

    __slots__ = ("done", "error", "number", "orphaned", "ready", "running", "scope", "started_flag")

    def __init__(self, number: int, *, shield: bool, handshake: bool) -> None:
        self.number = number
        self.scope = trio.CancelScope(shield=shield)
        self.running = True
        self.done: trio.Event | None = None  # created by whoever waits for the end
        # Set by started(), or by the end of an incarnation that never started.
        self.ready: trio.Event | None = trio.Event() if handshake else None
        self.started_flag = not handshake
        self.error: Exception | None = None  # a failed start, for whoever waits on it
        self.orphaned = False  # nobody waits on the start any more: a failure propagates

    def started(self, value: object = None) -> None:
        if self.started_flag:
            raise RuntimeError("started() called twice")
        self.started_flag = True
        if self.ready is not None:
            self.ready.set()


class _Child:
    __slots__ = (
        "current",
        "dynamic",
        "failures",
        "incarnation",
        "restarts",
        "spec",
        "started_at",
        "state",
        "token",
    )

    def __init__(self, spec: ChildSpec, dynamic: bool) -> None:
        self.spec = spec
        self.dynamic = dynamic
        self.state = ChildState.STARTING
        self.current: _Incarnation | None = None
        self.incarnation = 0
        self.failures = 0  # restarts since the child last ran backoff_reset_s
        self.restarts = 0
        self.started_at = 0.0
        self.token = 0


class _Report:
    __slots__ = ("child", "error", "exit", "incarnation")

    def __init__(
        self, child: _Child, incarnation: int, exit: Exit, error: BaseException | None
    ) -> None:
        self.child = child
        self.incarnation = incarnation
        self.exit = exit
        self.error = error


class _RestartDue:
    __slots__ = ("delay_s", "ids", "token")

    def __init__(self, ids: list[str], token: int, delay_s: float) -> None:
        self.ids = ids
        self.token = token
        self.delay_s = delay_s


class Supervisor:
    """An OTP supervisor on a Trio nursery. Run it with ``await nursery.start(sup.run)``.

    The keyword arguments are the ``[supervisors.NAME]`` section of the config.
    """

    def __init__(
        self,
        name: str,
        children: Iterable[ChildSpec] = (),
        *,
        strategy: Strategy | str = Strategy.ONE_FOR_ONE,
        max_restarts: int = 3,
        period_s: float = 5.0,
        backoff_min_s: float = 0.0,
        backoff_max_s: float = 0.0,
        backoff_random_factor: float = 0.0,
        backoff_reset_s: float = 60.0,
        max_children: int = 10_000,
        shutdown_s: float = 30.0,
        runtime: Runtime | None = None,
    ) -> None:
        if max_restarts < 0 or period_s <= 0 or max_children < 1 or shutdown_s <= 0:
            raise ValueError("supervisor limits must be positive")
        self.name = name
        self.specs: tuple[ChildSpec, ...] = tuple(children)
        ids = [spec.id for spec in self.specs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"supervisor {name!r}: duplicate child ids")
        self.strategy = Strategy(strategy)
        self.max_restarts = max_restarts
        self.period_s = period_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = max(backoff_max_s, backoff_min_s)
        self.backoff_random_factor = backoff_random_factor
        self.backoff_reset_s = backoff_reset_s
        self.max_children = max_children
        self.shutdown_s = shutdown_s
        self.runtime = runtime if runtime is not None else Runtime()
        self._chance = self.runtime.chance.fork(f"supervisor:{name}")
        self._children: dict[str, _Child] = {}
        self._restart_times: deque[float] = deque()
        self._nursery: trio.Nursery | None = None
        self._dynamic_nursery: trio.Nursery | None = None
        self._dynamic_closed: trio.Event | None = None
        self._reports_send, self._reports = trio.open_memory_channel[_Report | _RestartDue](
            math.inf
        )
        self._tokens = 0
        self._live: trio.Event | None = None  # set when the running incarnation has ended

    # ------------------------------------------------------------------ public API

    def child_spec(self, restart: Restart = Restart.PERMANENT) -> ChildSpec:
        """This supervisor as a child of another one."""
        return ChildSpec(id=self.name, start=self.run, restart=restart, shutdown_s=self.shutdown_s)

    def which_children(self) -> list[ChildInfo]:
        return [
            ChildInfo(c.spec.id, c.state.value, c.spec.restart.value, c.restarts, c.dynamic)
            for c in self._children.values()
        ]

    def children_with_specs(self) -> list[tuple[ChildInfo, ChildSpec]]:
        """:meth:`which_children` with each child's spec (the dashboard walks nested
        supervisors and actors' mailboxes through them)."""
        return [
            (ChildInfo(c.spec.id, c.state.value, c.spec.restart.value, c.restarts, c.dynamic),
             c.spec)
            for c in list(self._children.values())
        ]  # fmt: skip

    def count_children(self) -> int:
        return len(self._children)

    async def start_child(self, spec: ChildSpec) -> None:
        """Add a dynamic child and return once it is ready."""
        child = self._admit(spec)
        try:
            await self._spawn(child, wait_ready=True)
        except BaseException as exc:
            # Cancelled while it started: _spawn cancelled it; it gets its
            # shutdown deadline to end before we forget it.
            inc = child.current
            if inc is not None and inc.running:
                deadline = trio.current_time() + spec.shutdown_s
                with trio.CancelScope(shield=True, deadline=deadline):
                    await self._stop(child)
                inc.orphaned = inc.running  # a start failing later reaches the supervisor
                if inc.error is not None:
                    self._remove(child)
                    raise BaseExceptionGroup(
                        f"child {spec.id!r} failed to start while cancelled", [inc.error, exc]
                    ) from None
            self._remove(child)
            raise

    def start_child_nowait(self, spec: ChildSpec) -> None:
        """Add a dynamic child that is ready on spawn, without waiting for it to run."""
        if not spec.ready_on_spawn:
            raise ValueError(f"child {spec.id!r} needs a start handshake: use start_child()")
        child = self._admit(spec)
        self._spawn_soon(child)

    async def terminate_child(self, child_id: str) -> None:
        """Stop a child within its shutdown deadline and remove it."""
        child = self._children.get(child_id)
        if child is None:
            raise KeyError(child_id)
        await self._stop(child)
        self._remove(child)

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the children in order, report started, supervise until cancelled or escalation."""
        # One incarnation of this supervisor at a time: a parent that abandoned
        # the previous one past its deadline restarts us only once it has ended.
        while self._live is not None:
            await self._live.wait()
        live = self._live = trio.Event()
        try:
            await self._run(task_status)
        finally:
            self._live = None
            live.set()

    async def _run(self, task_status: trio.TaskStatus[None]) -> None:
        self._children = {}
        self._restart_times.clear()
        escalation: RestartIntensityExceeded | None = None
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await nursery.start(self._host_dynamic)
                for spec in self.specs:
                    child = _Child(spec, dynamic=False)
                    self._children[spec.id] = child
                    await self._spawn(child, wait_ready=True)
                self._set_gauge()
                task_status.started()
                escalation = await self._loop()
            finally:
                with trio.CancelScope(shield=True) as shield:
                    shield.deadline = trio.current_time() + self.shutdown_s
                    await self._stop_all()
                # Past our own deadline, children not yet reached are cancelled
                # without waiting: they are shielded, so the nursery alone would not.
                for child in list(self._children.values()):
                    if child.current is not None:
                        child.current.scope.cancel()
                    self._remove(child)
                nursery.cancel_scope.cancel()
                self._nursery = None
        if escalation is not None:
            raise escalation

    async def _host_dynamic(self, *, task_status: trio.TaskStatus[None]) -> None:
        closed = self._dynamic_closed = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                self._dynamic_nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._dynamic_nursery = None
            closed.set()

    async def _loop(self) -> RestartIntensityExceeded | None:
        async for item in self._reports:
            if isinstance(item, _RestartDue):
                await self._restart_due(item)
                continue
            escalation = await self._on_exit(item)
            if escalation is not None:
                return escalation
        return None  # pragma: no cover - the report channel is never closed

    # ------------------------------------------------------------------ children

    def _admit(self, spec: ChildSpec) -> _Child:
        if self._nursery is None:
            raise RuntimeError(f"supervisor {self.name!r} is not running")
        if spec.id in self._children:
            raise ValueError(f"supervisor {self.name!r} already has a child {spec.id!r}")
        if len(self._children) >= self.max_children:
            raise TooManyChildren(
                f"supervisor {self.name!r} already runs {self.max_children} children"
            )
        child = _Child(spec, dynamic=True)
        self._children[spec.id] = child
        self._set_gauge()
        return child

    def _remove(self, child: _Child) -> None:
        if self._children.get(child.spec.id) is child:
            del self._children[child.spec.id]
            if child.spec.on_removed is not None:
                child.spec.on_removed()
            self._set_gauge()

    def _launch(self, child: _Child, *, handshake: bool) -> _Incarnation:
        nursery = self._nursery_for(child)
        child.incarnation += 1
        # Static children are shielded from cancellation coming from outside the
        # supervisor: when it is cancelled, it stops them itself, one by one in
        # reverse order. Dynamic children take the outer cancellation together.
        inc = child.current = _Incarnation(
            child.incarnation, shield=not child.dynamic, handshake=handshake
        )
        nursery.start_soon(self._child_main, child, inc)
        return inc

    async def _spawn(self, child: _Child, *, wait_ready: bool) -> None:
        """Start a new incarnation of ``child`` and return once it is ready.

        The incarnation runs in the supervisor's nursery from the start; only
        the wait for its ``started()`` happens here. A cancellation of that wait
        (the supervisor being stopped mid-start) cancels the incarnation as
        well, so a handshake never outlives the cancellation; the caller then
        stops it within its deadline like any other child.
        """
        if child.spec.ready_on_spawn and not wait_ready:
            self._spawn_soon(child)
            return
        child.state = ChildState.STARTING
        inc = self._launch(child, handshake=True)
        assert inc.ready is not None
        try:
            await inc.ready.wait()
        except trio.Cancelled as cancelled:
            if inc.error is not None:
                # It failed just before the cancellation reached us: keep both.
                raise BaseExceptionGroup(
                    f"child {child.spec.id!r} failed to start while cancelled",
                    [inc.error, cancelled],
                ) from None
            if not inc.started_flag:
                inc.scope.cancel()
                # start_child waits for a dynamic child's end itself.
                inc.orphaned = not child.dynamic
            raise
        if inc.error is not None:
            raise inc.error
        if not inc.started_flag:
            raise RuntimeError(f"child {child.spec.id!r} was stopped before started()")
        if child.state is ChildState.STARTING:
            child.state = ChildState.RUNNING
        child.started_at = trio.current_time()

    def _spawn_soon(self, child: _Child) -> None:
        child.state = ChildState.RUNNING
        child.started_at = trio.current_time()
        self._launch(child, handshake=False)

    def _nursery_for(self, child: _Child) -> trio.Nursery:
        nursery = self._dynamic_nursery if child.dynamic else self._nursery
        if nursery is None:
            raise RuntimeError(f"supervisor {self.name!r} is not running")
        return nursery

    async def _child_main(self, child: _Child, inc: _Incarnation) -> None:
        exit, error = Exit.NORMAL, None
        try:
            with inc.scope:
                if inc.ready is None:
                    await child.spec.start()
                else:
                    await child.spec.start(task_status=inc)
                    if not inc.started_flag:
                        raise RuntimeError(f"child {child.spec.id!r} returned before started()")
            if inc.scope.cancelled_caught:
                exit = Exit.SHUTDOWN
        except Exception as exc:
            if not inc.started_flag:
                if inc.orphaned:
                    raise  # nobody waits on this start any more: the supervisor sees it
                inc.error = exc  # a failed start belongs to whoever started the child
                return
            exit, error = _exit_of(exc), exc
        finally:
            inc.running = False
            if inc.done is not None:
                inc.done.set()
            if inc.ready is not None:
                inc.ready.set()
        if inc.started_flag:
            self._reports_send.send_nowait(_Report(child, inc.number, exit, error))

    async def _stop(self, child: _Child) -> None:
        """Cancel one child and wait for it, at most its shutdown deadline."""
        child.state = ChildState.STOPPING
        child.token = 0
        inc = child.current
        if inc is None or not inc.running:
            return
        if inc.done is None:
            inc.done = trio.Event()
        inc.scope.cancel()
        with trio.move_on_after(child.spec.shutdown_s):
            await inc.done.wait()

    async def _stop_all(self) -> None:
        dynamic = [c for c in self._children.values() if c.dynamic]
        if dynamic and self._dynamic_nursery is not None and self._dynamic_closed is not None:
            for child in dynamic:
                child.state = ChildState.STOPPING
            self._dynamic_nursery.cancel_scope.cancel()
            with trio.move_on_after(max(c.spec.shutdown_s for c in dynamic)):
                await self._dynamic_closed.wait()
        for child in reversed([c for c in self._children.values() if not c.dynamic]):
            await self._stop(child)
        for child in list(self._children.values()):
            self._remove(child)

    # ------------------------------------------------------------------ decisions

    async def _on_exit(self, report: _Report) -> RestartIntensityExceeded | None:
        child = report.child
        if report.incarnation != child.incarnation or child.state is ChildState.STOPPING:
            return None  # we stopped it ourselves, or an older incarnation
        if self._children.get(child.spec.id) is not child:
            return None
        now = trio.current_time()
        rt = self.runtime
        if report.exit is Exit.CRASH:
            if rt.metrics is not None:
                rt.metrics.actor_crashes.labels(self.name, self._label(child)).inc()
            rt.events.emit(
                ActorCrashed(
                    at=now,
                    wall=rt.clock.wall(),
                    supervisor=self.name,
                    child=child.spec.id,
                    error=repr(report.error),
                )
            )
        restart = child.spec.restart
        if restart is Restart.TEMPORARY:
            self._remove(child)
            return None
        if restart is Restart.TRANSIENT and report.exit is not Exit.CRASH:
            # OTP keeps the spec of a child with no process, and its group's
            # next restart starts it again. Where no group restart can (one
            # for one, dynamic children as in simple_one_for_one) it is
            # removed, so its on_removed runs (an actor's mailbox refuses).
            if child.dynamic or self.strategy is Strategy.ONE_FOR_ONE:
                self._remove(child)
            else:
                child.state = ChildState.EXITED
            return None
        if not self._count_restart(now):
            return await self._escalate(now)
        if now - child.started_at >= self.backoff_reset_s:
            child.failures = 0
        delay = self._backoff_delay(child.failures)
        child.failures += 1
        breaker = child.spec.breaker
        if breaker is not None:
            half_open = breaker.half_open_at()
            if half_open is not None:
                delay = max(delay, half_open - now)
        group = self._group(child)
        for sibling in reversed(group):
            if sibling is not child and sibling.state is not ChildState.RESTARTING:
                await self._stop(sibling)
                if sibling.spec.restart is Restart.TEMPORARY:
                    self._remove(sibling)
        group = [c for c in group if self._children.get(c.spec.id) is c]
        self._tokens += 1
        for member in group:
            member.state = ChildState.RESTARTING
            member.token = self._tokens
        due = _RestartDue([c.spec.id for c in group], self._tokens, max(delay, 0.0))
        if delay <= 0:
            await self._restart_due(due)
        else:
            assert self._nursery is not None
            self._nursery.start_soon(self._wake_after, delay, due)
        return None

    def _group(self, child: _Child) -> list[_Child]:
        if child.dynamic or self.strategy is Strategy.ONE_FOR_ONE:
            return [child]
        static = [c for c in self._children.values() if not c.dynamic]
        if self.strategy is Strategy.ONE_FOR_ALL:
            return static
        return static[static.index(child) :]

    async def _wake_after(self, delay: float, due: _RestartDue) -> None:
        await trio.sleep(delay)
        self._reports_send.send_nowait(due)

    async def _restart_due(self, due: _RestartDue) -> None:
        rt = self.runtime
        for child_id in due.ids:
            child = self._children.get(child_id)
            if (
                child is None
                or child.state is not ChildState.RESTARTING
                or child.token != due.token
            ):
                continue
            child.restarts += 1
            now = trio.current_time()
            if rt.metrics is not None:
                rt.metrics.actor_restarts.labels(self.name, self._label(child)).inc()
            rt.events.emit(
                ActorRestarted(
                    at=now,
                    wall=rt.clock.wall(),
                    supervisor=self.name,
                    child=child_id,
                    delay_s=due.delay_s,
                    restarts_in_period=len(self._restart_times),
                )
            )
            try:
                await self._spawn(child, wait_ready=False)
            except Exception as exc:  # a failed (re)start counts as another crash
                self._reports_send.send_nowait(_Report(child, child.incarnation, Exit.CRASH, exc))

    def _count_restart(self, now: float) -> bool:
        """OTP's add_restart: keep restarts within [now - period, now], add this one."""
        times = self._restart_times
        threshold = now - self.period_s
        while times and times[0] < threshold:
            times.popleft()
        times.append(now)
        return len(times) <= self.max_restarts

    def _backoff_delay(self, failures: int) -> float:
        if self.backoff_min_s <= 0:
            return 0.0
        base = min(self.backoff_max_s, self.backoff_min_s * (2.0**failures))
        return min(self.backoff_max_s, self._chance.jitter(base, self.backoff_random_factor))

    async def _escalate(self, now: float) -> RestartIntensityExceeded:
        rt = self.runtime
        error = RestartIntensityExceeded(
            self.name, max_restarts=self.max_restarts, period_s=self.period_s
        )
        rt.events.emit(
            SupervisorEscalated(
                at=now, wall=rt.clock.wall(), supervisor=self.name, reason=str(error)
            )
        )
        return error

    def _label(self, child: _Child) -> str:
        metrics = self.runtime.metrics
        assert metrics is not None
        return metrics.label("child", child.spec.id)

    def _set_gauge(self) -> None:
        metrics = self.runtime.metrics
        if metrics is not None:
            metrics.supervisor_children.labels(self.name).set(len(self._children))


def _exit_of(error: Exception) -> Exit:
    """How a child that raised ``error`` after its start ended: a supervisor that
    gave up (:class:`RestartIntensityExceeded`, alone or as every leaf of a group)
    exits with OTP's ``shutdown``; anything else is a crash."""
    if isinstance(error, RestartIntensityExceeded):
        return Exit.SHUTDOWN
    if isinstance(error, ExceptionGroup) and error.split(RestartIntensityExceeded)[1] is None:
        return Exit.SHUTDOWN
    return Exit.CRASH
