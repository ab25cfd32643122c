"""Actor, ActorRef and mailbox semantics, on the autojump clock."""

from __future__ import annotations

import enum

import msgspec
import pytest
import trio

from engine.actor import Actor, Overflow, Stop, actor_child
from engine.errors import ActorError, ActorStopped, AskTimeout, MailboxFull
from engine.runtime import Runtime, open_runtime
from engine.supervisor import Restart, Supervisor


class Add(msgspec.Struct, frozen=True, tag=True):
    n: int


class Get(msgspec.Struct, frozen=True, tag=True):
    pass


class Slow(msgspec.Struct, frozen=True, tag=True):
    seconds: float


class Boom(msgspec.Struct, frozen=True, tag=True):
    pass


class Quit(msgspec.Struct, frozen=True, tag=True):
    pass


Msg = Add | Get | Slow | Boom | Quit


class Phase(enum.Enum):
    COUNTING = "counting"


class Counter(Actor[Msg]):
    """The house shape: states as an Enum, messages a tagged union, one match."""

    name = "counter"
    seen: list[int] = []  # noqa: RUF012 - shared across incarnations on purpose, for the test

    def __init__(self) -> None:
        self.total = 0
        self.phase = Phase.COUNTING

    async def handle(self, message: Msg) -> object:
        match message:
            case Add(n):
                self.total += n
                Counter.seen.append(n)
                return self.total
            case Get():
                return self.total
            case Slow(seconds):
                await trio.sleep(seconds)
                return "slow done"
            case Boom():
                raise ValueError("boom")
            case Quit():
                return Stop(reply="bye")


async def _run(sup: Supervisor, nursery: trio.Nursery) -> None:
    await nursery.start(sup.run)


async def test_tell_and_ask_round_trip(autojump_clock: trio.abc.Clock) -> None:
    async with open_runtime(seed=1) as rt:
        spec, ref = actor_child(
            "counter", Counter, capacity=8, deadlines=rt.deadlines, shutdown_s=1.0
        )
        sup = Supervisor("root", [spec], runtime=rt)
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await ref.tell(Add(2))
            ref.tell_nowait(Add(3))
            assert await ref.ask(Get(), timeout_s=1.0) == 5
            nursery.cancel_scope.cancel()


async def test_ask_times_out_at_exact_deadline_and_late_reply_is_harmless(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_runtime(seed=1) as rt:
        spec, ref = actor_child(
            "counter", Counter, capacity=8, deadlines=rt.deadlines, shutdown_s=1.0
        )
        sup = Supervisor("root", [spec], runtime=rt)
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            start = trio.current_time()
            with pytest.raises(AskTimeout):
                await ref.ask(Slow(5.0), timeout_s=2.0)
            assert trio.current_time() - start == pytest.approx(2.0, abs=1e-9)
            # The actor replies at t=5 to a caller that left at t=2: it must not crash.
            await trio.sleep(4.0)
            assert await ref.ask(Add(1), timeout_s=1.0) == 1
            assert sup.which_children()[0].restarts == 0
            nursery.cancel_scope.cancel()


async def test_cancelled_asker_leaves_server_alive(autojump_clock: trio.abc.Clock) -> None:
    async with open_runtime(seed=1) as rt:
        spec, ref = actor_child(
            "counter", Counter, capacity=8, deadlines=rt.deadlines, shutdown_s=1.0
        )
        sup = Supervisor("root", [spec], runtime=rt)
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            with trio.move_on_after(1.0):
                await ref.ask(Slow(3.0), timeout_s=10.0)
            await trio.sleep(5.0)
            assert await ref.ask(Get(), timeout_s=1.0) == 0
            assert sup.which_children()[0].restarts == 0
            nursery.cancel_scope.cancel()


async def test_overflow_policies(autojump_clock: trio.abc.Clock) -> None:
    rt = Runtime()
    _, drop = actor_child("d", Counter, capacity=2, overflow=Overflow.DROP_NEWEST, shutdown_s=1.0)
    for n in range(5):
        drop.tell_nowait(Add(n))
    assert drop.queued() == 2
    assert drop.dropped == 3
    _, reject = actor_child("r", Counter, capacity=1, overflow=Overflow.REJECT, shutdown_s=1.0)
    await reject.tell(Add(1))
    with pytest.raises(MailboxFull, match="'r' is full"):
        await reject.tell(Add(2))
    spec, wait = actor_child("w", Counter, capacity=1, overflow=Overflow.WAIT, shutdown_s=1.0)
    await wait.tell(Add(1))
    with pytest.raises(MailboxFull):
        wait.tell_nowait(Add(2))
    # A waiting tell completes as soon as the actor makes room.
    sup = Supervisor("root", [spec], runtime=rt)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        with trio.fail_after(1.0):
            await wait.tell(Add(2))
        nursery.cancel_scope.cancel()


async def test_crash_fails_pending_ask_at_once_and_mailbox_survives_restart(
    autojump_clock: trio.abc.Clock,
) -> None:
    Counter.seen = []
    async with open_runtime(seed=1) as rt:
        spec, ref = actor_child(
            "counter", Counter, capacity=8, deadlines=rt.deadlines, shutdown_s=1.0
        )
        sup = Supervisor("root", [spec], runtime=rt)
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            start = trio.current_time()
            ref.tell_nowait(Boom())
            ref.tell_nowait(Add(7))  # queued behind the poison message
            with pytest.raises(ActorError, match="crashed"):
                await ref.ask(Boom(), timeout_s=30.0)
            assert trio.current_time() == start  # failed at once, not at the deadline
            assert await ref.ask(Get(), timeout_s=1.0) == 0  # fresh incarnation state
            assert Counter.seen == [7]  # the queued message survived the first crash
            assert sup.which_children()[0].restarts == 2
            nursery.cancel_scope.cancel()


async def test_stop_reply_and_removed_child_refuses_messages(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_runtime(seed=1) as rt:
        spec, ref = actor_child(
            "counter",
            Counter,
            capacity=8,
            deadlines=rt.deadlines,
            restart=Restart.TRANSIENT,
            shutdown_s=1.0,
        )
        sup = Supervisor("root", [spec], runtime=rt)
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            assert await ref.ask(Quit(), timeout_s=1.0) == "bye"
            await trio.sleep(0.1)
            assert sup.count_children() == 0
            with pytest.raises(ActorStopped):
                await ref.tell(Add(1))
            nursery.cancel_scope.cancel()


async def test_batch_drain_handles_everything_queued_in_one_wakeup(
    autojump_clock: trio.abc.Clock,
) -> None:
    Counter.seen = []
    rt = Runtime()
    spec, ref = actor_child("counter", Counter, capacity=100, batch_max=100, shutdown_s=1.0)
    for n in range(50):
        ref.tell_nowait(Add(n))
    sup = Supervisor("root", [spec], runtime=rt)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        # One scheduler pass: the actor wakes once and drains all fifty.
        await trio.testing.wait_all_tasks_blocked()
        assert Counter.seen == list(range(50))
        nursery.cancel_scope.cancel()


class Initialised(Actor[Get]):
    ready_at: float | None = None

    async def init(self) -> None:
        await trio.sleep(2.0)
        Initialised.ready_at = trio.current_time()

    async def handle(self, message: Get) -> object:
        return "ready"


class Terminating(Actor[Get]):
    log: list[tuple[str, float]] = []  # noqa: RUF012 - test record

    async def handle(self, message: Get) -> object:
        return None

    async def terminate(self, reason: BaseException | None) -> None:
        await trio.sleep(10.0)  # longer than shutdown_s: cut at the deadline
        Terminating.log.append(("never", trio.current_time()))


async def test_started_only_after_init(autojump_clock: trio.abc.Clock) -> None:
    rt = Runtime()
    spec, _ = actor_child("init", Initialised, capacity=1, shutdown_s=1.0)
    assert not spec.ready_on_spawn
    sup = Supervisor("root", [spec], runtime=rt)
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(sup.run)
        assert Initialised.ready_at == start + 2.0
        assert trio.current_time() == start + 2.0
        nursery.cancel_scope.cancel()


async def test_terminate_is_bounded_by_shutdown_deadline(autojump_clock: trio.abc.Clock) -> None:
    rt = Runtime()
    spec, _ = actor_child("t", Terminating, capacity=1, shutdown_s=3.0)
    sup = Supervisor("root", [spec], runtime=rt)
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        start = trio.current_time()
        await sup.terminate_child("t")
        assert trio.current_time() == start + 3.0
        assert Terminating.log == []
        nursery.cancel_scope.cancel()
