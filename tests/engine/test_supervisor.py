"""OTP supervision semantics, with exact virtual times on the autojump clock."""

from __future__ import annotations

import pytest
import trio

from engine.clock import Chance
from engine.errors import RestartIntensityExceeded, TooManyChildren
from engine.events import ActorRestarted, Event, EventBus, SupervisorEscalated
from engine.runtime import Runtime
from engine.supervisor import ChildSpec, Restart, Strategy, Supervisor

from .supervision import Children


def runtime(seed: int = 7) -> Runtime:
    return Runtime(chance=Chance(seed), events=EventBus())


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_children_start_in_order_and_stop_in_reverse(autojump_clock: trio.abc.Clock) -> None:
    kids = Children()
    sup = Supervisor(
        "root",
        [kids.spec("a", init_s=1.0), kids.spec("b", init_s=2.0), kids.spec("c")],
        runtime=runtime(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        # started() only once every child is ready: 1 s + 2 s of init.
        assert trio.current_time() == 3.0
        assert kids.log == [("start", "a", 1.0), ("start", "b", 3.0), ("start", "c", 3.0)]
        kids.clear()
        nursery.cancel_scope.cancel()
    assert kids.events("stop") == ["c", "b", "a"]


async def test_shutdown_waits_each_child_at_most_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    sup = Supervisor(
        "root",
        [kids.spec("a", shutdown_s=5.0, stop_s=1.0), kids.spec("b", shutdown_s=2.0, stop_s=100.0)],
        runtime=runtime(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        nursery.cancel_scope.cancel()
    # b is abandoned after its 2 s deadline, then a stops in its own 1 s.
    assert ("stop", "a", 3.0) in kids.log
    assert trio.current_time() == 100.0  # b's shielded cleanup was allowed to finish last


async def test_one_for_one_restarts_only_the_crashed_child(autojump_clock: trio.abc.Clock) -> None:
    kids = Children()
    sup = Supervisor("root", [kids.spec(n) for n in "abc"], runtime=runtime())
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        kids.clear()
        kids.crash("b")
        await settle()
        assert kids.log == [("crash", "b", 0.0), ("start", "b", 0.0)]
        nursery.cancel_scope.cancel()


async def test_one_for_all_restarts_everyone_in_order(autojump_clock: trio.abc.Clock) -> None:
    kids = Children()
    sup = Supervisor(
        "root", [kids.spec(n) for n in "abc"], strategy=Strategy.ONE_FOR_ALL, runtime=runtime()
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        kids.clear()
        kids.crash("b")
        await settle()
        assert [(w, c) for w, c, _ in kids.log] == [
            ("crash", "b"),
            ("stop", "c"),
            ("stop", "a"),
            ("start", "a"),
            ("start", "b"),
            ("start", "c"),
        ]
        nursery.cancel_scope.cancel()


async def test_rest_for_one_restarts_the_child_and_those_after(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    sup = Supervisor(
        "root", [kids.spec(n) for n in "abcd"], strategy="rest_for_one", runtime=runtime()
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        kids.clear()
        kids.crash("b")
        await settle()
        assert [(w, c) for w, c, _ in kids.log] == [
            ("crash", "b"),
            ("stop", "d"),
            ("stop", "c"),
            ("start", "b"),
            ("start", "c"),
            ("start", "d"),
        ]
        nursery.cancel_scope.cancel()


async def test_restart_types(autojump_clock: trio.abc.Clock) -> None:
    kids = Children()
    sup = Supervisor(
        "root",
        [
            kids.spec("perm", Restart.PERMANENT),
            kids.spec("trans", Restart.TRANSIENT),
            kids.spec("temp", Restart.TEMPORARY),
        ],
        max_restarts=10,
        runtime=runtime(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        kids.clear()
        kids.exit("perm")  # permanent: restarted even after a normal exit
        await settle()
        kids.crash("trans")  # transient: restarted after a crash...
        await settle()
        kids.exit("trans")  # ...but not after a normal exit
        kids.crash("temp")  # temporary: never
        await settle()
        assert kids.events("start") == ["perm", "trans"]
        # One for one: nothing could start trans again, so it is removed like temp.
        assert [(c.id, c.state) for c in sup.which_children()] == [("perm", "running")]
        kids.clear()
        nursery.cancel_scope.cancel()
    assert kids.events("stop") == ["perm"]


async def test_one_for_all_does_not_restart_a_stopped_temporary_sibling(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    sup = Supervisor(
        "root",
        [kids.spec("a"), kids.spec("tmp", Restart.TEMPORARY), kids.spec("c")],
        strategy=Strategy.ONE_FOR_ALL,
        runtime=runtime(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        kids.clear()
        kids.crash("c")
        await settle()
        assert kids.events("stop") == ["tmp", "a"]
        assert kids.events("start") == ["a", "c"]
        nursery.cancel_scope.cancel()


async def test_intensity_exceeded_stops_children_and_escalates(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    rt = runtime()
    escalated: list[Event] = []
    rt.events.on(SupervisorEscalated, escalated.append)
    sup = Supervisor(
        "root", [kids.spec("a"), kids.spec("b")], max_restarts=2, period_s=10.0, runtime=rt
    )
    with pytest.RaisesGroup(
        pytest.RaisesExc(RestartIntensityExceeded, match="more than 2 restarts within 10.0s"),
        flatten_subgroups=True,
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            for at in (1.0, 2.0, 3.0):
                await trio.sleep_until(at)
                kids.crash("a")
                await settle()
    assert trio.current_time() == 3.0
    assert kids.events("start") == ["a", "b", "a", "a"]
    assert kids.events("stop") == ["b"]
    assert len(escalated) == 1


async def test_restarts_older_than_the_period_are_forgotten(autojump_clock: trio.abc.Clock) -> None:
    kids = Children()
    sup = Supervisor("root", [kids.spec("a")], max_restarts=2, period_s=10.0, runtime=runtime())
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        # Crashes at 0, 5, 10.5, 16: never three within any 10 s window.
        for at in (0.0, 5.0, 10.5, 16.0):
            await trio.sleep_until(at)
            kids.crash("a")
            await settle()
        assert sup.which_children()[0].restarts == 4
        nursery.cancel_scope.cancel()


async def test_escalation_across_two_levels(autojump_clock: trio.abc.Clock) -> None:
    kids = Children()
    rt = runtime()
    inner = Supervisor("inner", [kids.spec("leaf")], max_restarts=1, period_s=60.0, runtime=rt)
    outer = Supervisor(
        "outer",
        [kids.spec("sibling"), inner.child_spec()],
        max_restarts=1,
        period_s=60.0,
        runtime=rt,
    )
    with pytest.RaisesGroup(
        pytest.RaisesExc(RestartIntensityExceeded, check=lambda e: e.supervisor == "outer"),
        flatten_subgroups=True,
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(outer.run)
            # inner tolerates 1 restart; the 2nd crash escalates to outer, which
            # restarts inner (outer's 1st restart): leaf starts fresh.
            for _ in range(2):
                kids.crash("leaf")
                await settle()
            assert kids.events("start") == ["sibling", "leaf", "leaf", "leaf"]
            # Twice more: inner escalates again, outer's 2nd restart exceeds its intensity.
            for _ in range(2):
                kids.crash("leaf")
                await settle()
    assert kids.events("stop")[-1] == "sibling"


async def test_backoff_grows_and_resets_after_stable_period(autojump_clock: trio.abc.Clock) -> None:
    kids = Children()
    rt = runtime()
    delays: list[float] = []
    rt.events.on(ActorRestarted, lambda e: delays.append(e.delay_s))  # type: ignore[attr-defined]  # ActorRestarted has delay_s
    sup = Supervisor(
        "root",
        [kids.spec("a")],
        max_restarts=100,
        period_s=1.0,
        backoff_min_s=1.0,
        backoff_max_s=5.0,
        backoff_reset_s=30.0,
        runtime=rt,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        for _ in range(5):
            kids.crash("a")
            await trio.sleep(10.0)
        # Crashes at 0, 10, 20, 30, 40 (each run < 30 s): delays 1, 2, 4, 5 (capped), 5.
        assert [t for what, _, t in kids.log if what == "start"] == [0, 1, 12, 24, 35, 45]
        assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
        # Stable for 30 s: the next crash restarts after backoff_min_s again.
        await trio.sleep(30.0)
        kids.crash("a")
        await trio.sleep(10.0)
        assert kids.log[-1] == ("start", "a", 81.0)
        assert delays[-1] == 1.0
        nursery.cancel_scope.cancel()


async def test_backoff_jitter_is_replayable_from_the_seed(autojump_clock: trio.abc.Clock) -> None:
    async def run_once(seed: int) -> list[float]:
        kids = Children()
        rt = runtime(seed)
        delays: list[float] = []
        rt.events.on(ActorRestarted, lambda e: delays.append(e.delay_s))  # type: ignore[attr-defined]  # delay_s
        sup = Supervisor(
            "root",
            [kids.spec("a")],
            max_restarts=100,
            backoff_min_s=1.0,
            backoff_max_s=60.0,
            backoff_random_factor=0.5,
            runtime=rt,
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            for _ in range(4):
                kids.crash("a")
                await trio.sleep(61.0)
            nursery.cancel_scope.cancel()
        return delays

    first, again, other = await run_once(3), await run_once(3), await run_once(4)
    assert first == again
    assert first != other
    assert all(1.0 * 2**i <= d <= 1.5 * 2**i for i, d in enumerate(first))


class FakeBreaker:
    def __init__(self) -> None:
        self.opens_until: float | None = None

    def half_open_at(self) -> float | None:
        return self.opens_until


async def test_restart_waits_for_the_breakers_half_open_moment(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    breaker = FakeBreaker()
    base = kids.spec("provider")
    spec = ChildSpec(id=base.id, start=base.start, breaker=breaker)
    sup = Supervisor("root", [spec], max_restarts=5, runtime=runtime())
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        kids.clear()
        breaker.opens_until = trio.current_time() + 30.0
        kids.crash("provider")
        await trio.sleep(29.999)
        assert kids.events("start") == []
        await trio.sleep(0.001)
        await settle()
        assert kids.log[-1] == ("start", "provider", 30.0)
        nursery.cancel_scope.cancel()


async def test_dynamic_children_bound_and_parallel_shutdown(autojump_clock: trio.abc.Clock) -> None:
    kids = Children()
    sup = Supervisor("tenants", [kids.spec("static")], max_children=3, runtime=runtime())
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.start_child(kids.spec("t1", shutdown_s=5.0, stop_s=2.0))
        await sup.start_child(kids.spec("t2", shutdown_s=5.0, stop_s=2.0))
        with pytest.raises(TooManyChildren):
            await sup.start_child(kids.spec("t3"))
        kids.crash("t1")
        await settle()
        assert kids.events("start").count("t1") == 2
        await sup.terminate_child("t2")
        assert [c.id for c in sup.which_children()] == ["static", "t1"]
        await sup.start_child(kids.spec("t4", shutdown_s=5.0, stop_s=2.0))
        kids.clear()
        start = trio.current_time()
        nursery.cancel_scope.cancel()
    # Dynamic children stop together (2 s), then the static one.
    assert sorted(kids.events("stop")[:2]) == ["t1", "t4"]
    assert kids.events("stop")[2] == "static"
    assert trio.current_time() == start + 2.0


async def test_cancellation_is_not_a_crash(autojump_clock: trio.abc.Clock) -> None:
    kids = Children()
    sup = Supervisor("root", [kids.spec("a", Restart.TRANSIENT)], max_restarts=0, runtime=runtime())
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await sup.terminate_child("a")  # cancelled by its supervisor: no restart, no escalation
        await settle()
        assert kids.events("start") == ["a"]
        nursery.cancel_scope.cancel()


async def test_failed_initial_start_propagates(autojump_clock: trio.abc.Clock) -> None:
    async def broken(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise OSError("cannot bind")

    kids = Children()
    sup = Supervisor("root", [kids.spec("a"), ChildSpec("b", broken)], runtime=runtime())
    with pytest.RaisesGroup(pytest.RaisesExc(OSError, match="cannot bind"), flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
    assert kids.events("stop") == ["a"]


async def test_restart_waits_for_a_real_breakers_half_open(autojump_clock: trio.abc.Clock) -> None:
    from engine.breaker import Breaker, CircuitState

    breaker = Breaker(
        "provider",
        fail_max=2,
        reset_timeout_s=20.0,
        reset_timeout_max_s=60.0,
        reset_backoff_multiplier=2.0,
        failure_rate_threshold=1.0,
        rate_window_s=60.0,
        minimum_calls=100,
        slow_call_s=10.0,
        slow_call_rate_threshold=1.0,
        half_open_max_calls=1,
    )

    async def failing() -> None:
        raise OSError("gateway down")

    kids = Children()
    base = kids.spec("provider")
    sup = Supervisor(
        "root", [ChildSpec(id="provider", start=base.start, breaker=breaker)], runtime=runtime()
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        await trio.sleep(5.0)
        for _ in range(2):
            with pytest.raises(OSError):
                await breaker.call(failing)
        assert breaker.state is CircuitState.OPEN
        kids.clear()
        kids.crash("provider")
        await settle()
        assert kids.events("start") == []
        await trio.sleep(20.0)
        await settle()
        # Opened at t=5 for 20 s: the child comes back at the half-open moment, not before.
        assert kids.log[-1] == ("start", "provider", 25.0)
        nursery.cancel_scope.cancel()


async def test_supervisor_deadline_cuts_a_slow_stop_and_still_cancels_the_rest(
    autojump_clock: trio.abc.Clock,
) -> None:
    kids = Children()
    sup = Supervisor(
        "root",
        [kids.spec("a"), kids.spec("b", shutdown_s=5.0, stop_s=100.0)],
        shutdown_s=3.0,
        runtime=runtime(),
    )
    with trio.fail_after(1000.0):
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            nursery.cancel_scope.cancel()
    # b overran; at the supervisor's own 3 s deadline a is cancelled anyway.
    assert ("stop", "a", 3.0) in kids.log
    assert sup.count_children() == 0
