"""An actor's own time and tasks: timers, send_after, start_soon, statistics, StateLog."""

from __future__ import annotations

import enum
import logging

import msgspec
import pytest
import trio

from engine.actor import Actor, Timer, actor_child, ended_by_error
from engine.errors import ActorError
from engine.runtime import open_runtime
from engine.statelog import StateLog
from engine.supervisor import Supervisor


class Tick(msgspec.Struct, frozen=True, tag=True):
    pass


class Later(msgspec.Struct, frozen=True, tag=True):
    n: int


class Work(msgspec.Struct, frozen=True, tag=True):
    seconds: float


class Done(msgspec.Struct, frozen=True, tag=True):
    seconds: float


class Get(msgspec.Struct, frozen=True, tag=True):
    pass


class Stats(msgspec.Struct, frozen=True):
    ticks: tuple[float, ...]
    later: tuple[tuple[int, float], ...]
    done: tuple[float, ...]


Msg = Tick | Later | Work | Done | Get
TICK = Tick()


class Clocked(Actor[Msg]):
    """Ticks every 2 s; each tick handled takes ``tick_cost_s``; works in its own tasks."""

    name = "clocked"
    tick_cost_s = 0.0

    def __init__(self) -> None:
        self.ticks: list[float] = []
        self.later: list[tuple[int, float]] = []
        self.done: list[float] = []

    def timers(self) -> list[Timer]:
        return [Timer(2.0, TICK)]

    def statistics(self) -> Stats:
        return Stats(tuple(self.ticks), tuple(self.later), tuple(self.done))

    async def handle(self, message: Msg) -> object:
        match message:
            case Tick():
                self.ticks.append(trio.current_time())
                await trio.sleep(self.tick_cost_s)
            case Later(n):
                self.later.append((n, trio.current_time()))
            case Work(seconds):
                self.start_soon(self._work, seconds)
            case Done(seconds):
                self.done.append(trio.current_time())
            case Get():
                self.send_after(5.0, Later(1))
        return None

    async def _work(self, seconds: float) -> None:
        await trio.sleep(seconds)
        await self.ref.tell(Done(seconds))


async def test_timer_ticks_at_exact_intervals_and_send_after_arrives_on_time(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_runtime(seed=1) as rt:
        spec, ref = actor_child("clocked", Clocked, capacity=8, shutdown_s=1.0)
        sup = Supervisor("root", [spec], runtime=rt)
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            await nursery.start(sup.run)
            await ref.tell(Get())
            await trio.sleep(6.5)
            stats = ref.statistics()
            assert stats.ticks == (t0 + 2.0, t0 + 4.0, t0 + 6.0)
            assert stats.later == ((1, t0 + 5.0),)
            nursery.cancel_scope.cancel()
    assert ref.statistics() is None  # no incarnation runs


class SlowTicks(Clocked):
    tick_cost_s = 5.0


async def test_ticks_coalesce_while_the_actor_is_busy(autojump_clock: trio.abc.Clock) -> None:
    async with open_runtime(seed=1) as rt:
        spec, ref = actor_child("slow", SlowTicks, capacity=8, shutdown_s=1.0)
        sup = Supervisor("root", [spec], runtime=rt)
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            await nursery.start(sup.run)
            await trio.sleep(20.5)
            # Handled at 2 (busy till 7): the ticks due at 4 and 6 are not sent, the
            # one at 8 is; handled at 8 (busy till 13), and so on.
            assert ref.statistics().ticks == (t0 + 2.0, t0 + 8.0, t0 + 14.0, t0 + 20.0)
            assert ref.queued() == 0
            nursery.cancel_scope.cancel()


async def test_tasks_report_back_by_message_and_die_with_the_incarnation(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_runtime(seed=1) as rt:
        spec, ref = actor_child("clocked", Clocked, capacity=8, shutdown_s=1.0)
        sup = Supervisor("root", [spec], runtime=rt)
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            await nursery.start(sup.run)
            await ref.tell(Work(1.0))
            await ref.tell(Work(30.0))
            await trio.sleep(3.0)
            assert ref.statistics().done == (t0 + 1.0,)
            await sup.terminate_child("clocked")
            assert trio.current_time() == t0 + 3.0  # the 30 s task did not hold the stop
            nursery.cancel_scope.cancel()


class Plain(Actor[Get]):
    async def handle(self, message: Get) -> object:
        self.start_soon(trio.sleep, 1.0)
        return None


async def test_start_soon_without_a_nursery_is_a_clear_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_runtime(seed=1) as rt:
        spec, ref = actor_child("plain", Plain, capacity=1, shutdown_s=1.0, deadlines=rt.deadlines)
        sup = Supervisor("root", [spec], runtime=rt)
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            with pytest.raises(ActorError, match="no nursery: set uses_tasks"):
                await ref.ask(Get(), timeout_s=1.0)
            nursery.cancel_scope.cancel()


def test_timer_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        Timer(0.0, TICK)


class Phase(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    BLOCKED = "blocked"


def test_state_log_logs_each_change_once(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.statelog")
    states = StateLog("relay", Phase.IDLE, log, warn={Phase.BLOCKED})
    with caplog.at_level(logging.INFO, logger="test.statelog"):
        assert states.enter(Phase.RUNNING, "started", at=1.0)
        assert not states.enter(Phase.RUNNING, "still")
        assert states.enter(Phase.BLOCKED, "breaker open", at=2.0)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "relay: idle -> running (started)"),
        (logging.WARNING, "relay: running -> blocked (breaker open)"),
    ]
    assert (states.state, states.since) == (Phase.BLOCKED, 2.0)


class Crashes(Clocked):
    """Crashes on its first tick: the error leaves its own nursery unwrapped."""

    async def handle(self, message: Msg) -> object:
        if isinstance(message, Tick):
            raise LookupError("tick refused")
        return await super().handle(message)


async def test_a_crash_inside_the_actors_nursery_reaches_the_supervisor_unwrapped(
    autojump_clock: trio.abc.Clock,
) -> None:
    spec, _ = actor_child("crashes", Crashes, capacity=8, shutdown_s=1.0)
    with pytest.raises(LookupError, match="tick refused"):
        await spec.start()


class Waker(Actor[Msg]):
    """Wakes itself at given moments; counts what came."""

    name = "waker"
    uses_tasks = True

    def __init__(self) -> None:
        self.later: list[tuple[int, float]] = []

    def statistics(self) -> tuple[tuple[int, float], ...]:
        return tuple(self.later)

    async def handle(self, message: Msg) -> object:
        match message:
            case Work(seconds):  # wake at now + seconds, unless beyond 10 s
                at = trio.current_time() + seconds
                self.wake_at(at, Later(int(seconds)), sooner_than_s=10.0)
                self.wake_at(at, Later(-1), sooner_than_s=10.0)  # the same moment: once
            case Later(n):
                self.later.append((n, trio.current_time()))
            case Get():
                assert self.tell_self(Later(0))
                assert not self.tell_self(Later(99))  # capacity 1: Later(0) fills it
        return None


async def test_wake_at_once_per_moment_and_only_before_the_timer(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_runtime(seed=1) as rt:
        spec, ref = actor_child("waker", Waker, capacity=1, shutdown_s=1.0)
        sup = Supervisor("root", [spec], runtime=rt)
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            await nursery.start(sup.run)
            await ref.tell(Work(3.0))
            await ref.tell(Work(30.0))  # later than its timer would come: not scheduled
            await trio.sleep(40.0)
            assert ref.statistics() == ((3, t0 + 3.0),)
            await ref.tell(Later(7))
            await ref.tell(Get())
            await trio.sleep(1.0)
            assert ref.statistics()[1:] == ((7, t0 + 40.0), (0, t0 + 40.0))
            nursery.cancel_scope.cancel()


def test_ended_by_error_tells_crashes_from_stops() -> None:
    assert not ended_by_error(None)
    assert ended_by_error(LookupError("x"))
    assert ended_by_error(ExceptionGroup("g", [LookupError("x")]))
