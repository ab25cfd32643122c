"""Supervisor corner cases found by random crash schedules against supervisor.erl,
each with exact virtual times on the autojump clock:

1. a cancellation that arrives while a child is still starting (before its
   ``started()``) cancels that child: the tree stops within the deadlines and
   starts nothing more, and a parent never runs two incarnations of a nested
   supervisor at once;
2. running state belongs to an incarnation: an abandoned one that ends late
   does not hide its successor from the shutdown;
3. a transient child that exited normally keeps its spec under one_for_all and
   rest_for_one and restarts with its group (counted in the intensity again);
4. a supervisor that gives up exits like OTP's ``shutdown``: a transient parent
   child is not restarted and no restart is counted for it.
"""

from __future__ import annotations

import faulthandler
from collections.abc import Iterator

import pytest
import trio

from engine.clock import Chance
from engine.errors import RestartIntensityExceeded
from engine.events import ActorRestarted, EventBus
from engine.runtime import Runtime
from engine.supervisor import ChildSpec, Restart, Strategy, Supervisor

from .supervision import Children

WATCHDOG_S = 60.0  # real seconds; each test takes milliseconds


@pytest.fixture(autouse=True)
def watchdog() -> Iterator[None]:
    """A deadlock behind a shield (the first bug) is out of reach of any virtual
    deadline, and a Trio run cannot unwind it: after WATCHDOG_S real seconds,
    dump every stack and end the session (exit code 1) instead of hanging."""
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def runtime() -> Runtime:
    return Runtime(chance=Chance(7), events=EventBus())


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


def states(sup: Supervisor) -> list[tuple[str, str]]:
    return [(c.id, c.state) for c in sup.which_children()]


# ---------------------------------------------------------------- 1. cancelled mid-start


async def test_cancel_during_a_slow_first_start_stops_within_the_deadlines(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    sup = Supervisor(
        "root",
        [
            kids.spec("a"),
            kids.spec("slow", init_s=1000.0, shutdown_s=2.0, stop_s=5.0),
            kids.spec("c"),
        ],
        runtime=runtime(),
    )
    with trio.fail_after(100.0):  # a regression fails instead of hanging
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(10.0):
                await nursery.start(sup.run)
    # Cancelled at 10 while slow was starting: slow is cancelled at once and takes
    # 5 s; past its 2 s deadline the supervisor stops a (at 12); c never starts.
    # (Before: slow finished its 1000 s start shielded, and only then was stopped.)
    assert kids.log == [("start", "a", 0.0), ("stop", "a", 12.0), ("abort", "slow", 15.0)]
    assert trio.current_time() == 15.0


async def test_cancel_during_a_restarts_start_aborts_it_and_starts_no_more(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    sup = Supervisor(
        "root", [kids.spec(n) for n in "abc"], strategy=Strategy.ONE_FOR_ALL, runtime=runtime()
    )
    with trio.fail_after(100.0):  # a regression fails instead of hanging
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await trio.sleep(1.0)
            kids.clear()
            kids.slow_next_start("b", 1000.0)
            kids.crash("a")
            await trio.sleep(4.0)
            nursery.cancel_scope.cancel()
    assert kids.log == [
        ("crash", "a", 1.0),
        ("stop", "c", 1.0),
        ("stop", "b", 1.0),
        ("start", "a", 1.0),
        ("abort", "b", 5.0),  # the restart's handshake is cancelled with the supervisor
        ("stop", "a", 5.0),
    ]
    assert trio.current_time() == 5.0
    assert sup.count_children() == 0


async def test_parent_stopping_a_nested_supervisor_mid_restart_runs_one_incarnation(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    rt = runtime()
    inner = Supervisor("inner", [kids.spec("g")], shutdown_s=3.0, runtime=rt)
    live = peak = 0

    async def run_inner(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        try:
            await inner.run(task_status=task_status)
        finally:
            live -= 1

    outer = Supervisor(
        "outer",
        [kids.spec("x"), ChildSpec("inner", run_inner, shutdown_s=inner.shutdown_s)],
        strategy=Strategy.ONE_FOR_ALL,
        runtime=rt,
    )
    with trio.fail_after(100.0):  # a regression fails instead of hanging
        async with trio.open_nursery() as nursery:
            await nursery.start(outer.run)
            await trio.sleep(1.0)
            kids.clear()
            kids.slow_next_start("g", 1000.0)
            kids.crash("g")  # inner restarts g, whose start takes 1000 s
            await trio.sleep(1.0)
            kids.crash("x")  # outer (one for all) stops inner in the middle of that restart
            await settle()
            # inner stopped at once (g's start cancelled), so outer restarts it at once.
            assert kids.log == [
                ("crash", "g", 1.0),
                ("crash", "x", 2.0),
                ("abort", "g", 2.0),
                ("start", "x", 2.0),
                ("start", "g", 2.0),
            ]
            assert states(inner) == [("g", "running")]
            await trio.sleep(8.0)
            kids.clear()
            nursery.cancel_scope.cancel()
    assert kids.log == [("stop", "g", 10.0), ("stop", "x", 10.0)]
    assert trio.current_time() == 10.0
    assert peak == 1  # before: outer gave up on inner at 5 and ran a second inner beside it


async def test_nested_supervisor_restarted_past_its_deadline_waits_for_its_last_incarnation(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    rt = runtime()
    # g ignores its cancellation for 10 s: inner's own stop outlasts outer's 3 s wait.
    inner = Supervisor(
        "inner", [kids.spec("g", shutdown_s=1.0, stop_s=10.0)], shutdown_s=3.0, runtime=rt
    )
    outer = Supervisor(
        "outer", [kids.spec("x"), inner.child_spec()], strategy=Strategy.ONE_FOR_ALL, runtime=rt
    )
    with trio.fail_after(100.0):  # a regression fails instead of hanging
        async with trio.open_nursery() as nursery:
            await nursery.start(outer.run)
            await trio.sleep(1.0)
            kids.clear()
            kids.crash("x")
            await trio.sleep(20.0)
            # outer abandons inner at 4 and restarts x; the new inner starts g only once
            # the old one has ended (g's cleanup, at 11): never two g at once.
            assert kids.log == [
                ("crash", "x", 1.0),
                ("start", "x", 4.0),
                ("stop", "g", 11.0),
                ("start", "g", 11.0),
            ]
            assert states(inner) == [("g", "running")]
            nursery.cancel_scope.cancel()


async def test_start_child_cancelled_mid_start_stops_it_within_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    sup = Supervisor("tenants", [kids.spec("static")], runtime=runtime())
    with trio.fail_after(100.0):  # a regression fails instead of hanging
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            with trio.move_on_after(5.0):
                await sup.start_child(kids.spec("t1", init_s=1000.0, shutdown_s=2.0, stop_s=3.0))
            # Cancelled at 5: t1 is cancelled and given its 2 s, then forgotten.
            assert trio.current_time() == 7.0
            assert states(sup) == [("static", "running")]
            await trio.sleep(10.0)
            assert kids.log == [("start", "static", 0.0), ("abort", "t1", 8.0)]
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- 2. incarnations


async def test_abandoned_incarnation_ending_late_does_not_hide_its_successor(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    sup = Supervisor(
        "root",
        [kids.spec("a"), kids.spec("b", shutdown_s=1.0, stop_s=10.0)],
        strategy=Strategy.ONE_FOR_ALL,
        runtime=runtime(),
    )
    returned: list[float] = []
    scope = trio.CancelScope()

    async def supervise(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await sup.run(task_status=task_status)
        returned.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        await nursery.start(supervise)
        await trio.sleep(1.0)
        kids.clear()
        kids.crash("a")  # b ignores its cancellation past its 1 s deadline: abandoned at 2
        await trio.sleep(19.0)
        scope.cancel()
        await trio.sleep(100.0)
        if not returned:  # the old code never cancels the new b: release it, then fail
            kids.exit("b")
    assert kids.log == [
        ("crash", "a", 1.0),
        ("start", "a", 2.0),
        ("start", "b", 2.0),
        ("stop", "b", 11.0),  # the abandoned incarnation ends
        ("stop", "a", 21.0),  # the new b was cancelled at 20, abandoned after 1 s
        ("stop", "b", 30.0),
    ]
    assert returned == [30.0]


# ---------------------------------------------------------------- 3. transient kept


async def test_one_for_all_restarts_a_transient_child_that_exited_normally(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    sup = Supervisor(
        "root",
        [kids.spec("a"), kids.spec("t", Restart.TRANSIENT), kids.spec("c")],
        strategy=Strategy.ONE_FOR_ALL,
        runtime=runtime(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        kids.clear()
        await trio.sleep(1.0)
        kids.exit("t")
        await settle()
        assert states(sup) == [("a", "running"), ("t", "exited"), ("c", "running")]
        await trio.sleep(1.0)
        kids.crash("c")
        await settle()
        assert kids.log == [
            ("exit", "t", 1.0),
            ("crash", "c", 2.0),
            ("stop", "a", 2.0),  # t has nothing to stop
            ("start", "a", 2.0),
            ("start", "t", 2.0),  # its spec was kept: it comes back with its group
            ("start", "c", 2.0),
        ]
        assert states(sup) == [("a", "running"), ("t", "running"), ("c", "running")]
        kids.clear()
        nursery.cancel_scope.cancel()
    assert kids.events("stop") == ["c", "t", "a"]


async def test_rest_for_one_counts_the_restarted_transient_childs_next_crash(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    sup = Supervisor(
        "root",
        [kids.spec("a"), kids.spec("t", Restart.TRANSIENT), kids.spec("c")],
        strategy=Strategy.REST_FOR_ONE,
        max_restarts=1,
        period_s=10.0,
        runtime=runtime(),
    )
    with pytest.RaisesGroup(RestartIntensityExceeded, flatten_subgroups=True):
        with trio.fail_after(100.0):  # a regression fails instead of hanging
            async with trio.open_nursery() as nursery:
                await nursery.start(sup.run)
                kids.clear()
                await trio.sleep_until(1.0)
                kids.exit("t")  # not a restart
                await trio.sleep_until(2.0)
                kids.crash("a")  # restart 1: a, t, c
                await trio.sleep_until(3.0)
                kids.crash("t")  # restart 2 within 10 s: more than 1, escalate
                await settle()
    assert trio.current_time() == 3.0
    assert kids.events("start") == ["a", "t", "c"]
    assert kids.log[-3:] == [("crash", "t", 3.0), ("stop", "c", 3.0), ("stop", "a", 3.0)]


# ---------------------------------------------------------------- 4. giving up is shutdown


def nested(kids: Children, rt: Runtime, restart: Restart, strategy: Strategy) -> Supervisor:
    inner = Supervisor("inner", [kids.spec("leaf")], max_restarts=0, runtime=rt)
    return Supervisor(
        "outer",
        [inner.child_spec(restart), kids.spec("x")],
        strategy=strategy,
        max_restarts=1,
        period_s=60.0,
        runtime=rt,
    )


async def test_a_transient_supervisor_that_gives_up_is_neither_restarted_nor_counted(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    rt = runtime()
    restarted: list[str] = []
    rt.events.on(ActorRestarted, lambda e: restarted.append(e.child))  # type: ignore[attr-defined]  # ActorRestarted has child
    outer = nested(kids, rt, Restart.TRANSIENT, Strategy.ONE_FOR_ONE)
    with pytest.RaisesGroup(
        pytest.RaisesExc(RestartIntensityExceeded, check=lambda e: e.supervisor == "outer"),
        flatten_subgroups=True,
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(outer.run)
            kids.clear()
            await trio.sleep_until(1.0)
            kids.crash("leaf")  # inner gives up: OTP's shutdown, not a crash
            await settle()
            assert states(outer) == [("x", "running")]
            await trio.sleep_until(2.0)
            kids.crash("x")  # outer's first counted restart
            await settle()
            assert restarted == ["x"]
            await trio.sleep_until(3.0)
            kids.crash("x")  # the second: more than 1 within 60 s
            await settle()
    # Before: inner's exit was a crash, restarted (leaf at 1) and counted, so
    # outer escalated at the first crash of x, at 2.
    assert trio.current_time() == 3.0
    assert kids.events("start") == ["x"]


async def test_a_permanent_supervisor_that_gives_up_is_restarted_and_counted(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    rt = runtime()
    outer = nested(kids, rt, Restart.PERMANENT, Strategy.ONE_FOR_ONE)
    with pytest.RaisesGroup(
        pytest.RaisesExc(RestartIntensityExceeded, check=lambda e: e.supervisor == "outer"),
        flatten_subgroups=True,
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(outer.run)
            kids.clear()
            await trio.sleep_until(1.0)
            kids.crash("leaf")  # restart 1 of outer: inner again, leaf fresh
            await settle()
            assert kids.log == [("crash", "leaf", 1.0), ("start", "leaf", 1.0)]
            await trio.sleep_until(2.0)
            kids.crash("leaf")  # restart 2: outer escalates
            await settle()
    assert trio.current_time() == 2.0


async def test_a_transient_supervisor_that_gave_up_restarts_with_its_group(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    outer = nested(kids, runtime(), Restart.TRANSIENT, Strategy.ONE_FOR_ALL)
    async with trio.open_nursery() as nursery:
        await nursery.start(outer.run)
        kids.clear()
        await trio.sleep_until(1.0)
        kids.crash("leaf")
        await settle()
        assert states(outer) == [("inner", "exited"), ("x", "running")]
        await trio.sleep_until(2.0)
        kids.crash("x")
        await settle()
        assert kids.log == [
            ("crash", "leaf", 1.0),
            ("crash", "x", 2.0),
            ("start", "leaf", 2.0),
            ("start", "x", 2.0),
        ]
        nursery.cancel_scope.cancel()
