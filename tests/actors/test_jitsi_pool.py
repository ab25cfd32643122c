"""The Jitsi pool: placement like jicofo's, node health, failover (catalog row 4).

Placement is a pure function (:func:`rank`); the node pollers and the pool run as
actors on trio's autojump MockClock against fake bridges and an in-memory store,
with exact assertions on virtual time.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial

import trio

from actors.jitsi_pool import (
    BridgeNode,
    JitsiPool,
    NodeView,
    PlacementRules,
    PoolFailedOver,
    PoolHandle,
    PoolState,
    SessionFailed,
    operational,
    rank,
    room_name,
)
from engine.actor import actor_child
from engine.breaker import Breaker, CircuitState
from engine.deadlines import Deadlines
from engine.detectors import CountInWindowDetector
from engine.errors import ProviderUnavailable
from engine.events import EventBus
from engine.supervisor import Supervisor
from providers.db.virtual_sessions import SessionRef
from providers.jitsi import Allocation, BridgeStats

RULES = PlacementRules(overload_threshold=0.8, failure_reset_s=10.0, stale_after_s=3.0)


def view(name: str, **fields: object) -> NodeView:
    base: dict[str, object] = {"url": f"http://{name}", "healthy": True, "seen_at": 100.0}
    base.update(fields)
    return NodeView(name, **base)  # type: ignore[arg-type]  # test helper: fields by name


# -- placement ------------------------------------------------------------------------


def test_rank_prefers_not_draining_then_not_overloaded_then_least_loaded() -> None:
    views = [
        view("draining", stress=0.1, draining=True),
        view("overloaded", stress=0.85),
        view("busy", stress=0.5),
        view("quiet", stress=0.2, participants=40),
        view("quiet2", stress=0.2, participants=10),
        view("exactly_at_threshold", stress=0.8),
    ]
    ranked = [v.name for v in rank(views, 101.0, RULES)]
    assert ranked == ["quiet2", "quiet", "busy", "exactly_at_threshold", "overloaded", "draining"]


def test_rank_leaves_out_nodes_that_are_not_operational_or_shutting_down() -> None:
    views = [
        view("ok"),
        view("unhealthy", healthy=False),
        view("never_seen", seen_at=None),
        view("stale", seen_at=100.0 - 3.5),
        view("failed_recently", failed_at=95.0),
        view("shutting_down", shutting_down=True),
        view("breaker_open"),
        view("forced_out"),
    ]
    breakers = {"breaker_open": CircuitState.OPEN, "forced_out": CircuitState.FORCED_OPEN}
    assert [v.name for v in rank(views, 100.0, RULES, breakers)] == ["ok"]


def test_a_failed_node_is_skipped_for_exactly_the_reset_time() -> None:
    failed = view("a", failed_at=100.0, seen_at=110.0)
    assert not operational(failed, 109.999, RULES)
    assert operational(failed, 110.0, RULES)
    # Heard from exactly stale_after_s ago still counts; a moment later it does not.
    fresh = view("b", seen_at=100.0)
    assert operational(fresh, 103.0, RULES)
    assert not operational(fresh, 103.001, RULES)
    # A half-open breaker lets the allocation through as its probe.
    assert operational(fresh, 101.0, RULES, CircuitState.HALF_OPEN)


def test_all_overloaded_still_places_on_the_least_stressed() -> None:
    views = [view("x", stress=0.95), view("y", stress=0.9)]
    assert [v.name for v in rank(views, 100.0, RULES)] == ["y", "x"]


# -- fakes ----------------------------------------------------------------------------------


@dataclass
class FakeBridge:
    name: str
    url: str = ""
    healthy: bool = True
    hang: bool = False
    refuse_allocations: bool = False
    stress: float = 0.0
    draining: bool = False
    rooms: list[str] = field(default_factory=list)
    health_calls: list[float] = field(default_factory=list)

    async def health(self) -> None:
        self.health_calls.append(trio.current_time())
        if self.hang:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        if not self.healthy:
            raise ProviderUnavailable(f"jitsi {self.name}: HTTP 500")

    async def stats(self) -> BridgeStats:
        await trio.lowlevel.checkpoint()
        return BridgeStats(conferences=len(self.rooms), participants=2 * len(self.rooms),
                           stress_level=self.stress)  # fmt: skip

    async def drain(self) -> bool:
        await trio.lowlevel.checkpoint()
        return self.draining

    async def allocate(self, room: str) -> Allocation:
        await trio.lowlevel.checkpoint()
        if self.refuse_allocations or not self.healthy:
            raise ProviderUnavailable(f"jitsi {self.name}: HTTP 503")
        created = room not in self.rooms
        if created:
            self.rooms.append(room)
        return Allocation(self.name, self.url, room, f"conf-{room}", created)

    async def aclose(self) -> None:
        pass


class MemoryStore:
    """The session store's semantics (``providers.db.virtual_sessions``) in memory."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, dict[str, object]] = {}
        self.tenant = uuid.uuid4()

    def add(self, count: int) -> list[uuid.UUID]:
        ids = [uuid.uuid4() for _ in range(count)]
        for n, i in enumerate(ids):
            self.rows[i] = {"state": "pending", "node": None, "failures": 0, "apt": f"apt-{n}"}
        return ids

    def ref(self, i: uuid.UUID) -> SessionRef:
        row = self.rows[i]
        return SessionRef(i, self.tenant, str(row["apt"]), str(row["state"]),
                          row["node"], int(row["failures"]))  # type: ignore[arg-type, call-overload]  # fmt: skip

    async def claim(self, limit: int, lease_s: float, max_failures: int) -> list[SessionRef]:
        await trio.lowlevel.checkpoint()
        waiting = [i for i, r in self.rows.items() if r["state"] in ("pending", "failed")]
        return [self.ref(i) for i in waiting[:limit]]

    async def placed(self, session_id: uuid.UUID, node: str, room: str) -> bool:
        await trio.lowlevel.checkpoint()
        self.rows[session_id].update(state="placed", node=node)
        return True

    async def failed(self, ids: Sequence[uuid.UUID], reason: str) -> list[SessionRef]:
        await trio.lowlevel.checkpoint()
        for i in ids:
            row = self.rows[i]
            row.update(state="failed", failures=int(row["failures"]) + 1)  # type: ignore[call-overload]
        return [self.ref(i) for i in ids]

    async def fail_pending(self, limit: int, reason: str) -> list[SessionRef]:
        await trio.lowlevel.checkpoint()
        pending = [i for i, r in self.rows.items() if r["state"] == "pending"][:limit]
        for i in pending:
            self.rows[i].update(state="failed", failures=1)
        return [self.ref(i) for i in pending]

    async def fail_node(self, node: str, reason: str) -> list[SessionRef]:
        await trio.lowlevel.checkpoint()
        lost = [i for i, r in self.rows.items() if r["state"] == "placed" and r["node"] == node]
        for i in lost:
            self.rows[i].update(state="failed")
        return [self.ref(i) for i in lost]

    def on(self, node: str) -> int:
        return sum(1 for r in self.rows.values() if r["state"] == "placed" and r["node"] == node)


def breaker(name: str, fail_max: int = 3, reset_s: float = 10.0) -> Breaker:
    return Breaker(
        name, fail_max=fail_max, reset_timeout_s=reset_s, reset_timeout_max_s=reset_s,
        reset_backoff_multiplier=1.0, failure_rate_threshold=2.0, rate_window_s=10.0,
        minimum_calls=1, slow_call_s=100.0, slow_call_rate_threshold=2.0, half_open_max_calls=1,
    )  # fmt: skip


@dataclass
class Rig:
    bridges: dict[str, FakeBridge]
    breakers: dict[str, Breaker]
    store: MemoryStore
    handle: PoolHandle
    detector: CountInWindowDetector
    failed: list[SessionFailed]
    events: list[PoolFailedOver]
    placed: list[tuple[SessionRef, Allocation]]

    def pool(self) -> JitsiPool:
        pool = self.handle.ref._current
        assert isinstance(pool, JitsiPool)
        return pool


@asynccontextmanager
async def open_rig(
    names: Sequence[str] = ("a", "b"), *, fail_max: int = 3, unhealthy: Sequence[str] = ()
) -> AsyncIterator[Rig]:
    bridges = {n: FakeBridge(n, url=f"http://{n}", healthy=n not in unhealthy) for n in names}
    breakers = {n: breaker(f"jitsi_{n}", fail_max) for n in names}
    store = MemoryStore()
    failed: list[SessionFailed] = []
    seen: list[PoolFailedOver] = []
    bus = EventBus()
    bus.on(PoolFailedOver, seen.append)  # type: ignore[arg-type]  # the handler takes that kind
    detector = CountInWindowDetector("row4", metric="m", threshold=5, window_s=60.0, buckets=6)

    async def on_failed(f: SessionFailed) -> None:
        failed.append(f)
        await trio.lowlevel.checkpoint()

    placed: list[tuple[SessionRef, Allocation]] = []

    async def on_placed(session: SessionRef, allocation: Allocation) -> None:
        placed.append((session, allocation))
        await trio.lowlevel.checkpoint()

    deadlines = Deadlines()
    pool_spec, pool_ref = actor_child(
        "jitsi_pool",
        partial(
            JitsiPool, clients=bridges, breakers=breakers, store=store, rules=RULES,
            place_interval_s=0.5, place_batch=100, claim_lease_s=30.0, max_failures=5,
            allocate_timeout_s=2.0, room_prefix="t", detector=detector, on_failed=on_failed, on_placed=on_placed,
            events=bus,
        ),
        capacity=100, shutdown_s=1.0, deadlines=deadlines,
    )  # fmt: skip
    handle = PoolHandle(pool_ref)
    detector.on_fire(lambda _s: handle.request_failover())
    specs = [pool_spec]
    for n in names:
        spec, ref = actor_child(
            f"jitsi_node_{n}",
            partial(BridgeNode, bridges[n], breakers[n], pool_ref, poll_interval_s=1.0,
                    health_timeout_s=0.5, stats_timeout_s=0.5),
            capacity=10, shutdown_s=1.0,
        )  # fmt: skip
        handle.nodes[n] = ref
        specs.append(spec)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(deadlines.run)
        await nursery.start(Supervisor("jitsi", specs, max_restarts=0).run)
        yield Rig(bridges, breakers, store, handle, detector, failed, seen, placed)
        nursery.cancel_scope.cancel()


# -- node health ------------------------------------------------------------------------------


async def test_nodes_are_polled_every_interval_and_a_down_node_opens_its_breaker(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_rig() as rig:
        start = trio.current_time()
        await trio.sleep(2.25)
        assert [t - start for t in rig.bridges["a"].health_calls] == [0.0, 1.0, 2.0]
        rig.bridges["a"].healthy = False  # from now on: 500 on /about/health
        await trio.sleep(2.0)  # the polls at 3.0 and 4.0 fail
        assert rig.breakers["a"].state is CircuitState.CLOSED
        assert "a" not in rig.pool().lost
        await trio.sleep(1.0)  # the third failure, at 5.0, opens it
        assert rig.breakers["a"].state is CircuitState.OPEN
        assert rig.breakers["a"].half_open_at() == start + 5.0 + 10.0
        assert rig.pool().lost == {"a"}
        assert rig.pool().states.state is PoolState.DEGRADED
        # Still polled while open (the view stays fresh), never counted by the breaker.
        await trio.sleep(3.0)
        assert [t - start for t in rig.bridges["a"].health_calls][-3:] == [6.0, 7.0, 8.0]
        assert rig.breakers["a"].statistics().consecutive_failures == 3
        # Healthy again: the first poll after the half-open moment (15.0) closes it.
        rig.bridges["a"].healthy = True
        await trio.sleep(15.5 - 8.25)
        assert rig.breakers["a"].state is CircuitState.CLOSED
        assert rig.pool().lost == set()
        assert rig.pool().states.state is PoolState.SERVING


async def test_a_hanging_health_check_times_out_at_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_rig(("a",)) as rig:
        start = trio.current_time()
        rig.bridges["a"].hang = True
        await trio.sleep(1.6)  # the poll at 1.0 hangs; it gives up at exactly 1.5
        seen = rig.pool().views["a"]
        assert not seen.healthy and seen.failed_at == start + 1.5
        assert seen.error is not None and "health not answered in 0.5 s" in seen.error
        assert rig.pool().states.state is PoolState.NO_BRIDGE


# -- placement and failover -----------------------------------------------------------------


async def test_sessions_go_to_the_least_loaded_node_and_fail_over_when_it_refuses(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_rig() as rig:
        rig.bridges["a"].stress = 0.1
        rig.bridges["b"].stress = 0.3
        await trio.sleep(0.1)  # the first polls are in
        ids = rig.store.add(3)
        await trio.sleep(0.5)  # the place tick at 0.5
        assert rig.store.on("a") == 3 and rig.store.on("b") == 0
        assert rig.bridges["a"].rooms == [room_name("t", i) for i in ids]
        # The join-token seam: each placement's room and node URL (the token is added later).
        assert [(s.id, a.room, a.url) for s, a in rig.placed] == [
            (i, room_name("t", i), "http://a") for i in ids
        ]
        # a refuses allocations: the next sessions fail over to b in the same tick,
        # and a is skipped for failure_reset_s from that failure on.
        rig.bridges["a"].refuse_allocations = True
        more = rig.store.add(2)
        failed_at = trio.current_time() + 0.5 - 0.1
        await trio.sleep(0.5)
        assert all(rig.store.rows[i]["node"] == "b" for i in more)
        pool = rig.pool()
        assert pool.failovers == 1  # the first one tried a, then b; the second went to b
        assert pool.views["a"].failed_at is not None
        assert math.isclose(pool.views["a"].failed_at, failed_at)
        assert [v.name for v in pool.candidates()] == ["b"]
        rig.bridges["a"].refuse_allocations = False
        await trio.sleep(9.0)  # 10.1: the tick at 10.5 is still within failure_reset_s
        later = rig.store.add(1)
        await trio.sleep(0.5)
        assert rig.store.rows[later[0]]["node"] == "b"
        again = rig.store.add(1)  # the tick at 11.0 is exactly failure_reset_s after it
        await trio.sleep(0.5)
        assert rig.store.rows[again[0]]["node"] == "a"
        assert rig.failed == []  # every session was placed: none failed


async def test_a_lost_node_fails_its_sessions_which_are_placed_again_elsewhere(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_rig(fail_max=1) as rig:
        rig.bridges["b"].stress = 0.5
        await trio.sleep(0.1)
        ids = rig.store.add(7)
        await trio.sleep(0.5)
        assert rig.store.on("a") == 7
        rig.bridges["a"].healthy = False
        await trio.sleep(1.0)  # the poll at 1.0 fails: breaker open, node lost
        assert rig.pool().lost == {"a"}
        assert sorted(f.session.id for f in rig.failed) == sorted(ids)
        assert {f.reason for f in rig.failed} == {"bridge_lost"}
        assert {f.node for f in rig.failed} == {"a"}
        await trio.sleep(0.5)
        assert rig.store.on("b") == 7 and rig.store.on("a") == 0
        # Row 4: 7 failures > 5 in the window fires; the mitigation forces a out and pages.
        rig.detector.evaluate()
        await trio.sleep(0.01)
        assert rig.breakers["a"].state is CircuitState.FORCED_OPEN
        assert rig.pool().forced.keys() == {"a"}
        [notice] = rig.events
        assert (notice.nodes, notice.failed_sessions, notice.severity) == (("a",), 7, "page")
        # a answers again: back in the pool once healthy failure_reset_s after it was forced.
        rig.bridges["a"].healthy = True
        forced_at = rig.pool().forced["a"]
        await trio.sleep(9.5)  # the poll before failure_reset_s has passed: still out
        assert rig.pool().forced.keys() == {"a"}
        await trio.sleep(1.5)  # the first healthy poll after it (13.0): back in
        assert rig.pool().forced == {}
        assert rig.breakers["a"].state is CircuitState.CLOSED
        assert trio.current_time() - forced_at >= 10.0


async def test_with_no_operational_node_waiting_sessions_fail_once_and_wait(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_rig(("a",), fail_max=1, unhealthy=("a",)) as rig:
        await trio.sleep(0.1)
        ids = rig.store.add(3)
        await trio.sleep(5.0)
        assert rig.pool().states.state is PoolState.NO_BRIDGE
        assert {str(r["state"]) for r in rig.store.rows.values()} == {"failed"}
        assert sorted(f.session.id for f in rig.failed) == sorted(ids)
        assert {(f.reason, f.node) for f in rig.failed} == {("no_bridge", None)}
        assert rig.pool().failed == 3  # once each, however many ticks passed
        assert rig.bridges["a"].rooms == []  # nothing was allocated
        # The node comes back: the failed sessions are placed.
        rig.bridges["a"].healthy = True
        await trio.sleep(15.0)
        assert rig.store.on("a") == 3


async def test_sessions_that_no_node_takes_fail_once_per_episode(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_rig(("a",), fail_max=100) as rig:
        await trio.sleep(0.1)
        rig.bridges["a"].refuse_allocations = True
        ids = rig.store.add(2)
        await trio.sleep(0.5)
        assert sorted(f.session.id for f in rig.failed) == sorted(ids)
        assert {f.reason for f in rig.failed} == {"no_bridge"}
        # The first tried a (and failed); a was skipped for the second: no node to blame.
        assert [f.node for f in rig.failed] == ["a", None]
        # a is skipped for failure_reset_s: nothing is claimed, nothing counted again.
        await trio.sleep(5.0)
        assert len(rig.failed) == 2 and rig.pool().failed == 2
