"""Fallback threads (catalog row 14): a breaker per patient-day, the spike containment, the cap.

The actor runs on trio's autojump MockClock against an in-memory store with the
database's semantics (``providers.db.virtual_sessions.spawn_fallback``); the cap
as the database keeps it is tested in ``tests/providers/test_virtual_sessions_db.py``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from actors.fallback_thread import (
    CONTAIN,
    RELEASE,
    FallbackContained,
    FallbackRequest,
    FallbackState,
    FallbackThreads,
)
from engine.actor import ActorRef, actor_child
from engine.breaker import CircuitState
from engine.detectors import SpikeOverBaselineDetector
from engine.errors import ProviderUnavailable
from engine.events import EventBus
from providers.db.virtual_sessions import FallbackFacts, FallbackResult, SessionRef

DAY = dt.date(2026, 12, 3)
TENANT = uuid.uuid4()
BREAKER: dict[str, Any] = {
    "fail_max": 1, "reset_timeout_s": 60.0, "reset_timeout_max_s": 60.0,
    "reset_backoff_multiplier": 1.0, "failure_rate_threshold": 1.0, "rate_window_s": 60.0,
    "minimum_calls": 1, "slow_call_s": 60.0, "slow_call_rate_threshold": 1.0,
    "half_open_max_calls": 1,
}  # fmt: skip


@dataclass
class MemoryFallbacks:
    """Sessions (patient, day) and slots per patient-day, as the database keeps them."""

    sessions: dict[uuid.UUID, tuple[str, dt.date]] = field(default_factory=dict)
    links: dict[uuid.UUID, uuid.UUID] = field(default_factory=dict)
    slots: dict[tuple[str, dt.date], list[uuid.UUID]] = field(default_factory=dict)
    fail_next: int = 0
    orphaned: set[uuid.UUID] = field(default_factory=set)  # failed, their request lost
    calls: list[float] = field(default_factory=list)

    def session(self, patient: str, day: dt.date = DAY) -> uuid.UUID:
        sid = uuid.uuid4()
        self.sessions[sid] = (patient, day)
        return sid

    async def facts(self, tenant_id: uuid.UUID, session_id: uuid.UUID) -> FallbackFacts | None:
        await trio.lowlevel.checkpoint()
        self.calls.append(trio.current_time())
        if self.fail_next:
            self.fail_next -= 1
            raise ProviderUnavailable("postgres: unavailable")
        found = self.sessions.get(session_id)
        if found is None:
            return None
        threads = len(self.slots.get(found, []))
        return FallbackFacts(found[0], found[1], threads, self.links.get(session_id))

    async def spawn(
        self, tenant_id: uuid.UUID, session_id: uuid.UUID, cap: int, allow_new: bool
    ) -> FallbackResult:
        await trio.lowlevel.checkpoint()
        if session_id in self.links:
            return FallbackResult("linked", self.links[session_id])
        key = self.sessions[session_id]
        slots = self.slots.setdefault(key, [])
        if allow_new and len(slots) < cap:
            thread = uuid.uuid4()
            slots.append(thread)
            self.links[session_id] = thread
            return FallbackResult("spawned", thread, len(slots))
        if not slots:
            return FallbackResult("refused", None)
        self.links[session_id] = slots[-1]
        return FallbackResult("reused", slots[-1], len(slots))

    async def without_fallback(self, limit: int, older_than_s: float) -> list[SessionRef]:
        await trio.lowlevel.checkpoint()
        return [
            SessionRef(sid, TENANT, f"apt-{sid.hex[:6]}", "failed", None, 1)
            for sid in self.sessions
            if sid not in self.links and sid in self.orphaned
        ][:limit]

    def threads(self, patient: str, day: dt.date = DAY) -> int:
        return len(self.slots.get((patient, day), []))


@dataclass
class Rig:
    store: MemoryFallbacks
    ref: ActorRef[Any]
    notices: list[FallbackContained]
    detector: SpikeOverBaselineDetector

    def actor(self) -> FallbackThreads:
        actor = self.ref._current
        assert isinstance(actor, FallbackThreads)
        return actor

    async def fail(self, patient: str, day: dt.date = DAY) -> uuid.UUID:
        sid = self.store.session(patient, day)
        await self.ref.tell(FallbackRequest(tenant_id=TENANT, session_id=sid,
                                            appointment_id=f"apt-{sid.hex[:6]}", reason="no_bridge"))  # fmt: skip
        return sid


@asynccontextmanager
async def open_rig(*, cap: int = 2) -> AsyncIterator[Rig]:
    store = MemoryFallbacks()
    bus = EventBus()
    notices: list[FallbackContained] = []
    bus.on(FallbackContained, notices.append)  # type: ignore[arg-type]  # the handler takes that kind
    detector = SpikeOverBaselineDetector(
        "row14", metric="m", threshold=20, window_s=10.0, buckets=5, baseline_alpha=0.2,
        min_volume=1,
    )  # fmt: skip
    spec, ref = actor_child(
        "fallback_threads",
        partial(FallbackThreads, store=store, breaker=BREAKER, cap=cap, max_patient_days=100,
                retry_after_s=2.0, max_attempts=3, sweep_interval_s=30.0, sweep_after_s=10.0,
                sweep_batch=10, detector=detector, events=bus),
        capacity=100, shutdown_s=1.0,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        yield Rig(store, ref, notices, detector)
        nursery.cancel_scope.cancel()


async def test_one_thread_per_patient_day_however_often_visits_fail(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_rig() as rig:
        for _ in range(5):
            await rig.fail("p1")
        await rig.fail("p2")
        await rig.fail("p1", DAY + dt.timedelta(days=1))  # another day: its own thread
        await trio.sleep(0.1)
        assert (rig.store.threads("p1"), rig.store.threads("p2")) == (1, 1)
        assert rig.store.threads("p1", DAY + dt.timedelta(days=1)) == 1
        # Every failed visit is linked to its patient-day's thread.
        assert len(rig.store.links) == 7
        stats = rig.actor().statistics()
        assert (stats.requests, stats.spawned, stats.reused) == (7, 3, 4)
        [breaker] = [b for k, b in rig.actor().breakers.items() if k.endswith(f"p1:{DAY}")]
        assert breaker.state is CircuitState.OPEN


async def test_the_half_open_probe_opens_a_second_thread_never_more_than_the_cap(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_rig(cap=2) as rig:
        start = trio.current_time()
        await rig.fail("p1")
        await trio.sleep(59.9)
        await rig.fail("p1")  # within the reset interval: shared
        await trio.sleep(0.2)  # 60.1 s after the first: the breaker half-opens
        await rig.fail("p1")  # the probe: a second thread, and the breaker opens again
        await rig.fail("p1")
        await trio.sleep(0.1)
        assert rig.store.threads("p1") == 2
        breaker = next(iter(rig.actor().breakers.values()))
        assert breaker.state is CircuitState.OPEN
        assert breaker.half_open_at() == start + 60.1 + 60.0
        await trio.sleep(60.0)
        await rig.fail("p1")  # the next probe: the cap (2) is reached, the thread is shared
        await trio.sleep(0.1)
        assert rig.store.threads("p1") == 2
        assert rig.actor().statistics().reused == 3


async def test_a_spike_contains_every_patient_day_that_has_a_thread(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_rig(cap=3) as rig:
        await rig.fail("p1")
        await rig.fail("p2")
        await trio.sleep(0.1)
        await rig.ref.tell(CONTAIN)
        await trio.sleep(0.1)
        actor = rig.actor()
        assert actor.states.state is FallbackState.CONTAINED
        assert {b.state for b in actor.breakers.values()} == {CircuitState.FORCED_OPEN}
        [notice] = rig.notices
        assert (notice.breakers_opened, notice.row, notice.resolved) == (2, 14, False)
        # Past the reset interval nothing half-opens: p1 keeps its one thread; a patient
        # without one still gets one.
        await trio.sleep(120.0)
        await rig.fail("p1")
        await rig.fail("p3")
        await rig.fail("p3")
        await trio.sleep(0.1)
        assert [rig.store.threads(p) for p in ("p1", "p2", "p3")] == [1, 1, 1]
        await rig.ref.tell(RELEASE)
        await trio.sleep(0.1)
        assert actor.states.state is FallbackState.NORMAL
        assert rig.notices[-1].resolved


async def test_a_request_the_database_refused_is_retried_then_abandoned(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_rig() as rig:
        start = trio.current_time()
        rig.store.fail_next = 2
        sid = await rig.fail("p1")
        await trio.sleep(10.0)
        assert [t - start for t in rig.store.calls] == [0.0, 2.0, 4.0]
        assert sid in rig.store.links and rig.store.threads("p1") == 1
        stats = rig.actor().statistics()
        assert (stats.requests, stats.retried, stats.spawned) == (1, 2, 1)
        rig.store.fail_next = 3
        other = await rig.fail("p2")
        await trio.sleep(10.0)
        assert other not in rig.store.links
        assert rig.actor().statistics().abandoned == 1


async def test_the_sweep_asks_again_for_failed_visits_whose_request_was_lost(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with open_rig() as rig:
        start = trio.current_time()
        lost = [rig.store.session("p1"), rig.store.session("p2")]
        rig.store.orphaned.update(lost)  # their requests died with a crashed pool
        await trio.sleep(29.9)
        assert rig.store.links == {}
        await trio.sleep(0.2)  # the sweep at 30.0
        assert set(rig.store.links) == set(lost)
        stats = rig.actor().statistics()
        assert (stats.swept, stats.spawned, stats.requests) == (2, 2, 0)  # not initiated again
        assert rig.store.calls[0] - start == 30.0
        await trio.sleep(30.0)  # the next sweep finds nothing left
        assert rig.actor().statistics().swept == 2
