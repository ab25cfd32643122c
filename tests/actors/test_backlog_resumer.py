"""The backlog resumer on the autojump clock, over an in-memory model of the claimed rows.

The model keeps the database's rules (:func:`providers.db.dispatches.claim_backlog_async`,
tested on PostgreSQL in tests/providers/test_dispatches_db.py): a queued row is due
once older than ``older_than_s`` and not claimed; a claim lasts ``lease_s``; held rows
are renewed when their claim would lapse within ``renew_within_s`` (the resumer asks
for two of its intervals). Time is Trio's.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from actors.backlog_resumer import (
    BacklogMessage,
    BacklogStore,
    ResumerState,
    backlog_resumer_child,
)
from actors.dispatcher import DispatcherChild, DispatcherMemory, DispatcherMessage, Job, Send
from engine.actor import Actor, ActorRef, Overflow, actor_child
from engine.errors import ConfigError, MailboxFull, ProviderUnavailable
from engine.supervisor import ChildSpec, Supervisor
from providers.channel import ChannelName
from providers.db.dispatches import BacklogClaim, QueuedDispatch

TENANTS = ("11111111-1111-1111-1111-111111111111", "22222222-2222-2222-2222-222222222222")


@dataclass
class Row:
    channel: str
    tenant: str
    created: float
    claimed_until: float | None = None
    queued: bool = True


@dataclass
class Backlog:
    """What the claims see: the queued rows and every call, with its Trio time."""

    rows: dict[uuid.UUID, Row] = field(default_factory=dict)
    claims: list[tuple[float, dict[str, int], int]] = field(default_factory=list)
    releases: list[tuple[float, list[uuid.UUID]]] = field(default_factory=list)
    fail: int = 0  # the next claims that raise
    during_claim: Callable[[], Awaitable[None]] | None = None  # what happens meanwhile

    def add(self, channel: str, n: int, *, tenant: str = TENANTS[0], at: float) -> list[uuid.UUID]:
        ids = [uuid.uuid4() for _ in range(n)]
        for i, dispatch_id in enumerate(ids):
            self.rows[dispatch_id] = Row(channel, tenant, at + i * 1e-6)
        return ids

    async def claim(
        self,
        limits: Mapping[str, int],
        held: Sequence[uuid.UUID],
        older_than_s: float,
        lease_s: float,
        renew_within_s: float,
    ) -> BacklogClaim:
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        self.claims.append((now, dict(limits), len(held)))
        if self.during_claim is not None:
            await self.during_claim()
        if self.fail:
            self.fail -= 1
            raise ProviderUnavailable("postgres: connection refused")
        renewed = 0
        for dispatch_id in held:
            row = self.rows.get(dispatch_id)
            if row is None or not row.queued:
                continue
            lapses = (
                row.claimed_until if row.claimed_until is not None else row.created + older_than_s
            )
            if lapses < now + renew_within_s:
                row.claimed_until = now + lease_s
                renewed += 1
        out: list[QueuedDispatch] = []
        for channel, limit in limits.items():
            due = sorted(
                (
                    (row.created, i)
                    for i, row in self.rows.items()
                    if row.channel == channel and row.queued and row.created < now - older_than_s
                    and (row.claimed_until is None or row.claimed_until < now)
                ),
            )[:limit]  # fmt: skip
            for _, dispatch_id in due:
                row = self.rows[dispatch_id]
                row.claimed_until = now + lease_s
                out.append(_queued(dispatch_id, row, now))
        out.sort(key=lambda q: -q.age_s)
        return BacklogClaim(out, renewed)

    async def release(self, ids: Sequence[uuid.UUID]) -> int:
        await trio.lowlevel.checkpoint()
        self.releases.append((trio.current_time(), list(ids)))
        for dispatch_id in ids:
            self.rows[dispatch_id].claimed_until = None
        return len(ids)


def _queued(dispatch_id: uuid.UUID, row: Row, now: float) -> QueuedDispatch:
    return QueuedDispatch(
        dispatch_id=dispatch_id, tenant_id=row.tenant, idempotency_key=f"key-{dispatch_id}",
        channel=row.channel, template="reminder", category="reminders", recipient="+15550100",
        body="See you", subject=None, data={"time": "10:00"}, age_s=now - row.created,
        category_state=None,
    )  # fmt: skip


class Taker(Actor[DispatcherMessage]):
    """Stands in for a channel dispatcher: records what it is sent (at what time)."""

    def __init__(self, got: list[tuple[float, Job]], gate: trio.Event) -> None:
        self.got = got
        self.gate = gate

    async def handle(self, message: DispatcherMessage) -> object:
        await self.gate.wait()  # a closed gate: the mailbox fills (the dispatcher is busy)
        match message:
            case Send(job=job):
                self.got.append((trio.current_time(), job))
        return None


@dataclass
class Channel:
    child: DispatcherChild
    got: list[tuple[float, Job]]
    gate: trio.Event


def channel(name: str, capacity: int, *, open_gate: bool = True) -> Channel:
    got: list[tuple[float, Job]] = []
    gate = trio.Event()
    if open_gate:
        gate.set()
    memory = DispatcherMemory()
    memory.idle.set()
    spec, ref = actor_child(
        f"dispatcher_{name}", lambda: Taker(got, gate), capacity=capacity,
        overflow=Overflow.WAIT, shutdown_s=1.0,
    )  # fmt: skip
    return Channel(DispatcherChild(ChannelName(name), spec, ref, memory, capacity), got, gate)


def resumer(
    store: BacklogStore, *channels: Channel, **knobs: Any
) -> tuple[ChildSpec, ActorRef[BacklogMessage]]:
    settings: dict[str, Any] = {
        "older_than_s": 60.0, "lease_s": 300.0, "batch": 10, "interval_s": 30.0,
        "capacity": 16, "overflow": Overflow.WAIT, "shutdown_s": 1.0,
    }  # fmt: skip
    settings.update(knobs)
    return backlog_resumer_child(store, [c.child for c in channels], **settings)


def tree(*specs: ChildSpec) -> Supervisor:
    return Supervisor("dispatch", list(specs))


async def test_every_tenants_due_rows_are_claimed_at_start_then_every_interval(
    autojump_clock: trio.abc.Clock,
) -> None:
    t0 = trio.current_time()
    backlog = Backlog()
    a = backlog.add("sms", 2, tenant=TENANTS[0], at=t0 - 600)  # left by a crash
    b = backlog.add("sms", 1, tenant=TENANTS[1], at=t0 - 300)
    fresh = backlog.add("sms", 1, at=t0)  # its dispatcher's for older_than_s
    sms = channel("sms", 50)
    registry = CollectorRegistry()
    spec, ref = resumer(backlog, sms, registry=registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(tree(sms.child.spec, spec).run)
        await trio.sleep(95)
        stats = ref.statistics()
        nursery.cancel_scope.cancel()
    # Claims at start and every 30 s; the fresh row is due after 60 s, claimed at 90.
    assert [at - t0 for at, _, _ in backlog.claims] == [0.0, 30.0, 60.0, 90.0]
    assert [(at - t0, job.dispatch_id) for at, job in sms.got] == [
        (0.0, a[0]), (0.0, a[1]), (0.0, b[0]), (90.0, fresh[0]),
    ]  # fmt: skip
    first = sms.got[0][1]
    assert first.resumed and first.tenant_id == TENANTS[0] and first.accepted_at == t0 - 600
    assert sms.got[2][1].tenant_id == TENANTS[1]
    assert (stats.turns, stats.claimed, stats.offered, stats.released) == (4, 4, 4, 0)
    assert stats.state is ResumerState.IDLE
    sample = registry.get_sample_value("triage_dispatch_resumed_total", {"channel": "sms"})
    assert sample == 4.0


async def test_a_full_room_is_followed_at_once_and_each_claim_is_bounded(
    autojump_clock: trio.abc.Clock,
) -> None:
    t0 = trio.current_time()
    backlog = Backlog()
    rows = backlog.add("sms", 7, at=t0 - 600)
    mails = backlog.add("email", 1, at=t0 - 600)
    sms, email = channel("sms", 50), channel("email", 50)
    spec, _ = resumer(backlog, sms, email, batch=3)
    async with trio.open_nursery() as nursery:
        await nursery.start(tree(sms.child.spec, email.child.spec, spec).run)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    # 3 per channel per turn: a full one is followed at once, until one is not full.
    assert [(at - t0, limits) for at, limits, _ in backlog.claims] == [
        (0.0, {"sms": 3, "email": 3}),
        (0.0, {"sms": 3, "email": 3}),
        (0.0, {"sms": 3, "email": 3}),
    ]
    assert [job.dispatch_id for _, job in sms.got] == rows
    assert [job.dispatch_id for _, job in email.got] == mails


async def test_rows_a_dispatcher_cannot_take_have_their_claims_released(
    autojump_clock: trio.abc.Clock,
) -> None:
    t0 = trio.current_time()
    backlog = Backlog()
    rows = backlog.add("sms", 3, at=t0 - 600)
    sms = channel("sms", 3, open_gate=False)  # busy: what it is sent stays in its mailbox
    filler = Job(
        dispatch_id=uuid.uuid4(), tenant_id=TENANTS[0], idempotency_key="new", channel="sms",
        recipient="+15550100", body="b", subject=None, category="c", data={}, accepted_at=0.0,
    )  # fmt: skip

    async def accepts_meanwhile() -> None:  # new dispatches fill it during the claim
        while True:
            await trio.testing.wait_all_tasks_blocked()  # the taker took what it could
            try:
                sms.child.ref.tell_nowait(Send(filler))
            except MailboxFull:
                return

    backlog.during_claim = accepts_meanwhile
    spec, ref = resumer(backlog, sms)
    async with trio.open_nursery() as nursery:
        await nursery.start(tree(sms.child.spec, spec).run)
        await trio.sleep(5)
        mid = ref.statistics()
        backlog.during_claim = None
        sms.gate.set()
        await trio.sleep(30)
        stats = ref.statistics()
        nursery.cancel_scope.cancel()
    # Full at the hand-off: every claimed row released at once, due again at the next tick.
    assert (mid.claimed, mid.offered, mid.released) == (3, 0, 3)
    assert backlog.releases == [(t0, rows)]
    assert [(at - t0, job.dispatch_id) for at, job in sms.got if job is not filler] == [
        (30.0, rows[0]), (30.0, rows[1]), (30.0, rows[2]),
    ]  # fmt: skip
    assert (stats.claimed, stats.offered, stats.released) == (6, 3, 3)


async def test_held_rows_are_renewed_not_resent_and_a_failed_claim_is_retried(
    autojump_clock: trio.abc.Clock,
) -> None:
    t0 = trio.current_time()
    backlog = Backlog()
    parked = backlog.add("sms", 1, at=t0 - 600)  # this replica's dispatcher holds it
    lost = backlog.add("sms", 1, at=t0 - 600)
    sms = channel("sms", 50)
    sms.child.memory.held.add(parked[0])
    backlog.fail = 1
    spec, ref = resumer(backlog, sms, lease_s=100.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(tree(sms.child.spec, spec).run)
        await trio.sleep(1)
        degraded = ref.statistics()
        await trio.sleep(130)
        stats = ref.statistics()
        nursery.cancel_scope.cancel()
    assert degraded.state is ResumerState.DEGRADED and degraded.failures == 1
    # The failed claim at 0 is retried by the next tick, which renews the held row (it
    # was due), as the turn at 90 does again (its claim would lapse within two turns).
    assert [(at - t0, held) for at, _, held in backlog.claims] == [
        (0.0, 1), (30.0, 1), (60.0, 1), (90.0, 1), (120.0, 1),
    ]  # fmt: skip
    assert backlog.rows[parked[0]].claimed_until == t0 + 90.0 + 100.0
    assert [job.dispatch_id for _, job in sms.got] == lost
    assert (stats.offered, stats.held, stats.renewed, stats.failures) == (1, 0, 2, 1)
    assert stats.state is ResumerState.IDLE


async def test_a_row_claimed_while_its_dispatcher_holds_it_is_left_to_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    t0 = trio.current_time()
    backlog = Backlog()
    held = backlog.add("sms", 1, at=t0 - 600)
    sms = channel("sms", 50)
    spec, ref = resumer(backlog, sms)

    async def held_meanwhile() -> None:  # the service handed it over during the claim
        sms.child.memory.held.add(held[0])

    backlog.during_claim = held_meanwhile
    async with trio.open_nursery() as nursery:
        await nursery.start(tree(sms.child.spec, spec).run)
        await trio.sleep(1)
        stats = ref.statistics()
        nursery.cancel_scope.cancel()
    assert sms.got == [] and backlog.releases == []
    assert (stats.claimed, stats.held, stats.offered) == (1, 1, 0)


def test_bad_knobs_are_refused_by_name() -> None:
    sms = channel("sms", 4)
    for knobs, match in [
        ({"lease_s": 60.0, "interval_s": 30.0}, r"lease_s \(60\) must be more than twice"),
        ({"interval_s": 0.0}, "interval_s must be > 0"),
        ({"older_than_s": -1.0}, "older_than_s must be >= 0"),
        ({"batch": 0}, "batch must be a whole number"),
        ({"overflow": Overflow.REJECT}, "overflow must be 'wait'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            resumer(Backlog(), sms, **knobs)
    with pytest.raises(ConfigError, match="two dispatchers for channel sms"):
        resumer(Backlog(), sms, sms)
    with pytest.raises(ConfigError, match="no dispatcher"):
        resumer(Backlog())
