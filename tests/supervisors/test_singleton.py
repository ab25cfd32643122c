"""The singleton wrapper on the autojump clock, over an in-memory lock table.

The lock table stands for PostgreSQL's advisory locks (tests/providers/test_lease.py
runs :class:`~providers.db.lease.AdvisoryLease` against the real server): one
holder per name; ``drop`` is the holder's connection dying (``pg_terminate_backend``).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from engine.errors import ProviderUnavailable
from engine.supervisor import ChildSpec
from supervisors.singleton import Singleton, SingletonState

RETRY_S = 2.0
CHECK_S = 0.5


class Locks:
    def __init__(self) -> None:
        self.holders: dict[str, FakeLease] = {}


class FakeLease:
    def __init__(self, locks: Locks, name: str) -> None:
        self.locks = locks
        self.name = name
        self.connected = False
        self.attempts: list[float] = []

    async def try_acquire(self) -> bool:
        await trio.lowlevel.checkpoint()
        self.attempts.append(trio.current_time())
        if self.locks.holders.get(self.name) in (None, self):
            self.locks.holders[self.name] = self
            self.connected = True
        return self.connected

    async def check(self) -> None:
        await trio.lowlevel.checkpoint()
        if not self.connected:
            raise ProviderUnavailable("postgres: unavailable (connection lost)")

    async def release(self) -> None:
        await trio.lowlevel.checkpoint()
        self.abandon()

    def abandon(self) -> None:
        if self.connected and self.locks.holders.get(self.name) is self:
            del self.locks.holders[self.name]
        self.connected = False

    def drop(self) -> None:
        """The connection died: the server freed the lock."""
        self.abandon()


class Child:
    """A child that records when it ran and for how long."""

    def __init__(self) -> None:
        self.started: list[float] = []
        self.stopped: list[float] = []
        self.fail: BaseException | None = None
        self.finish = trio.Event()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.started.append(trio.current_time())
        task_status.started()
        try:
            await self.finish.wait()
            if self.fail is not None:
                raise self.fail
        finally:
            self.stopped.append(trio.current_time())


def _singleton(locks: Locks, child: Child, standby: list[float]) -> tuple[Singleton, FakeLease]:
    lease = FakeLease(locks, "push_feedback")
    wrapper = Singleton(
        ChildSpec(id="push_feedback", start=child.run),
        lease,
        retry_s=RETRY_S,
        check_s=CHECK_S,
        release_s=1.0,
        on_standby=lambda: standby.append(trio.current_time()),
    )
    return wrapper, lease


async def test_one_of_two_runs_the_child_and_the_other_takes_over_when_its_connection_dies(
    autojump_clock: trio.testing.MockClock,
) -> None:
    locks = Locks()
    a_child, b_child = Child(), Child()
    a_standby: list[float] = []
    b_standby: list[float] = []
    a, a_lease = _singleton(locks, a_child, a_standby)
    b, b_lease = _singleton(locks, b_child, b_standby)
    async with trio.open_nursery() as nursery:
        await nursery.start(a.run)
        await nursery.start(b.run)  # started at once, though it only stands by
        await trio.sleep(5.25)
        assert (a.state, b.state) == (SingletonState.LEADING, SingletonState.STANDBY)
        assert a_child.started == [0.0] and b_child.started == []
        assert a_standby == [] and b_standby == [0.0, 2.0, 4.0]  # every retry_s
        assert b_lease.attempts == [0.0, 2.0, 4.0]

        a_lease.drop()  # at t=5.25: A's connection is gone, the lock free
        await trio.sleep(0.5)  # A's next check, at 5.5, finds it gone
        assert a_child.stopped == [5.5]  # the child stopped at once
        assert a.losses == 1
        # A tries again at once and takes the free lock back before B's retry at 6:
        # either replica may win the free lock, never both.
        assert locks.holders["push_feedback"] is a_lease
        assert a_child.started == [0.0, 5.5]
        await trio.sleep(0.5)  # t=6.25
        assert b.state is SingletonState.STANDBY and b_standby[-1] == 6.0

        a_lease.drop()
        nursery.cancel_scope.cancel()  # A gone for good (its process killed)
    assert a.state is SingletonState.STOPPED


async def test_a_dead_holder_is_replaced_within_retry_s(
    autojump_clock: trio.testing.MockClock,
) -> None:
    locks = Locks()
    a_child, b_child = Child(), Child()
    a, a_lease = _singleton(locks, a_child, [])
    b, _ = _singleton(locks, b_child, [])
    async with trio.open_nursery() as outer:
        a_scope = trio.CancelScope()

        async def run_a(task_status: trio.TaskStatus[None]) -> None:
            with a_scope:
                await a.run(task_status=task_status)

        await outer.start(run_a)
        await outer.start(b.run)
        await trio.sleep(3.25)
        a_scope.cancel()  # t=3.25: the holder dies; its connection goes, the server frees the lock
        await trio.sleep(0.25)
        assert "push_feedback" not in locks.holders and b.state is SingletonState.STANDBY
        await trio.sleep(0.75)  # t=4.25: B's attempt at t=4 (every retry_s) won
        assert b.state is SingletonState.LEADING
        assert b_child.started == [4.0] and a_child.stopped == [3.25]
        outer.cancel_scope.cancel()
    assert a_lease.connected is False


async def test_a_child_crash_releases_the_lease_and_reaches_the_supervisor(
    autojump_clock: trio.testing.MockClock,
) -> None:
    locks = Locks()
    child = Child()
    a, lease = _singleton(locks, child, [])
    child.fail = ValueError("bug")

    async def crash_later() -> None:
        await trio.sleep(1.0)
        child.finish.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(crash_later)
        with pytest.raises(ValueError, match="bug"):  # unwrapped: the supervisor sees it
            await a.run()
    assert trio.current_time() == 1.0 and child.stopped == [1.0]
    assert locks.holders == {} and not lease.connected


async def test_a_child_that_returns_ends_its_wrapper_and_frees_the_lease(
    autojump_clock: trio.testing.MockClock,
) -> None:
    locks = Locks()
    child = Child()
    a, _ = _singleton(locks, child, [])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await trio.sleep(1.0)
            child.finish.set()
    assert trio.current_time() == 1.0
    assert locks.holders == {} and a.state is SingletonState.STOPPED
    assert a.acquisitions == 1


async def test_the_wrapper_refuses_bad_periods() -> None:
    with pytest.raises(ValueError, match="retry_s"):
        Singleton(
            ChildSpec(id="x", start=Child().run), FakeLease(Locks(), "x"),
            retry_s=0.0, check_s=1.0, release_s=1.0,
        )  # fmt: skip
