"""Engine metrics: Prometheus names, values read from the registry, capped label cardinality."""

from __future__ import annotations

import trio
from prometheus_client import CollectorRegistry

from engine.actor import Actor, actor_child
from engine.metrics import OVERFLOW_LABEL, Metrics
from engine.runtime import Runtime
from engine.supervisor import Supervisor

from .supervision import Children


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_label_values_past_the_cap_fold_into_other() -> None:
    metrics = Metrics(CollectorRegistry(), max_label_values=2)
    assert [metrics.label("tenant", v) for v in ("a", "b", "c", "a", "d")] == [
        "a",
        "b",
        OVERFLOW_LABEL,
        "a",
        OVERFLOW_LABEL,
    ]
    # Each family has its own budget.
    assert metrics.label("child", "c") == "c"


async def test_restarts_crashes_and_children_are_counted(autojump_clock: trio.abc.Clock) -> None:
    metrics = Metrics(CollectorRegistry(), max_label_values=10)
    kids = Children()
    sup = Supervisor("root", [kids.spec("a"), kids.spec("b")], runtime=Runtime(metrics=metrics))
    async with trio.open_nursery() as nursery:
        await nursery.start(sup.run)
        assert sample(metrics, "triage_supervisor_children", supervisor="root") == 2
        kids.crash("a")
        await trio.testing.wait_all_tasks_blocked()
        kids.crash("a")
        await trio.testing.wait_all_tasks_blocked()
        labels = {"supervisor": "root", "child": "a"}
        assert sample(metrics, "triage_actor_restarts_total", **labels) == 2
        assert sample(metrics, "triage_actor_crashes_total", **labels) == 2
        assert sample(metrics, "triage_actor_restarts_total", supervisor="root", child="b") is None
        nursery.cancel_scope.cancel()


class Idle(Actor[int]):
    async def handle(self, message: int) -> object:
        await trio.sleep_forever()
        return None


async def test_mailbox_depth_is_read_at_scrape_time_and_capped() -> None:
    metrics = Metrics(CollectorRegistry(), max_label_values=1)
    _, first = actor_child("first", Idle, capacity=10, metrics=metrics, shutdown_s=1.0)
    _, second = actor_child("second", Idle, capacity=10, metrics=metrics, shutdown_s=1.0)
    for n in range(3):
        first.tell_nowait(n)
        second.tell_nowait(n)
    assert sample(metrics, "triage_mailbox_depth", actor="first") == 3
    # Past the cap, an actor gets no gauge of its own (no unbounded series).
    assert sample(metrics, "triage_mailbox_depth", actor="second") is None
