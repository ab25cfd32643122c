"""Property: for random exit schedules, the supervisor restarts exactly as an OTP
supervisor would, and escalates exactly when its intensity is exceeded.

The reference model below is written from OTP's documented rules, independently
of engine/supervisor.py: restart types, the three strategies, and add_restart's
"keep restarts within [now - period, now], terminate when more than max".

A transient child that exits normally follows supervisor.erl's do_restart: its
spec stays (the child has no pid), so a later one_for_all / rest_for_one restart
of its group starts it again. Under one_for_one nothing can, and the engine
removes it; the model does the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import RestartIntensityExceeded
from engine.runtime import Runtime
from engine.supervisor import Restart, Strategy, Supervisor

from .supervision import Children


@dataclass
class Model:
    ids: list[str]
    restart: dict[str, Restart]
    strategy: Strategy
    max_restarts: int
    period_s: float
    kept: list[str] = field(default_factory=list)  # children with a spec, in start order
    alive: list[str] = field(default_factory=list)  # the running ones, in start order
    restarts: list[float] = field(default_factory=list)
    log: list[tuple[str, str]] = field(default_factory=list)
    escalated_at: int | None = None

    def start(self) -> None:
        self.kept = list(self.ids)
        self.alive = list(self.ids)
        self.log = [("start", i) for i in self.ids]

    def exit(self, step: int, now: float, child: str, crashed: bool) -> None:
        self.log.append(("crash" if crashed else "exit", child))
        kind = self.restart[child]
        self.alive.remove(child)
        if kind is Restart.TEMPORARY:
            self.kept.remove(child)
            return
        if kind is Restart.TRANSIENT and not crashed:
            if self.strategy is Strategy.ONE_FOR_ONE:
                self.kept.remove(child)
            return  # otherwise the spec stays: its group's next restart starts it
        self.restarts = [t for t in self.restarts if t >= now - self.period_s] + [now]
        if len(self.restarts) > self.max_restarts:
            self.escalated_at = step
            self.log += [("stop", c) for c in reversed(self.alive)]
            return
        if self.strategy is Strategy.ONE_FOR_ONE:
            group = [child]
        elif self.strategy is Strategy.ONE_FOR_ALL:
            group = list(self.kept)
        else:
            group = self.kept[self.kept.index(child) :]
        for sibling in reversed(group):
            if sibling in self.alive:
                self.log.append(("stop", sibling))
                if self.restart[sibling] is Restart.TEMPORARY:
                    self.kept.remove(sibling)
        started = [c for c in group if c in self.kept]
        self.log += [("start", c) for c in started]
        self.alive = [c for c in self.kept if c in self.alive or c in started]


restart_types = st.sampled_from(list(Restart))
events = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.5, 1.0, 2.5, 5.0, 11.0]),  # time since the previous event
        st.integers(min_value=0, max_value=3),  # which child (modulo the live ones)
        st.booleans(),  # crash (True) or normal exit
    ),
    max_size=14,
)


@settings(max_examples=150, deadline=None)
@given(
    kinds=st.lists(restart_types, min_size=1, max_size=4),
    strategy=st.sampled_from(list(Strategy)),
    max_restarts=st.integers(min_value=0, max_value=4),
    period_s=st.sampled_from([1.0, 5.0, 10.0]),
    schedule=events,
)
def test_supervisor_matches_otp_reference_model(
    kinds: list[Restart],
    strategy: Strategy,
    max_restarts: int,
    period_s: float,
    schedule: list[tuple[float, int, bool]],
) -> None:
    ids = [f"c{i}" for i in range(len(kinds))]
    model = Model(ids, dict(zip(ids, kinds, strict=True)), strategy, max_restarts, period_s)
    kids = Children()
    escalated_at: list[int] = []

    async def main() -> None:
        sup = Supervisor(
            "sup",
            [kids.spec(i, kinds[n]) for n, i in enumerate(ids)],
            strategy=strategy,
            max_restarts=max_restarts,
            period_s=period_s,
            runtime=Runtime(),
        )
        model.start()
        step = -1
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(sup.run)
                now = 0.0
                for step, (delta, pick, crashed) in enumerate(schedule):
                    if not model.alive:
                        break
                    now += delta
                    await trio.sleep_until(now)
                    child = model.alive[pick % len(model.alive)]
                    model.exit(step, now, child, crashed)
                    if crashed:
                        kids.crash(child)
                    else:
                        kids.exit(child)
                    await trio.testing.wait_all_tasks_blocked()
                    if model.escalated_at is not None:
                        break
                nursery.cancel_scope.cancel()
        except* RestartIntensityExceeded:
            escalated_at.append(step)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    observed = [(what, child) for what, child, _ in kids.log]
    if model.escalated_at is None:
        assert escalated_at == []
        # On shutdown the remaining children stop in reverse order.
        expected = model.log + [("stop", c) for c in reversed(model.alive)]
    else:
        assert escalated_at == [model.escalated_at]
        expected = model.log
    assert observed == expected
