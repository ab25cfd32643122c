"""The SMS/email status sweep on the autojump clock, over an in-memory model of the rows.

The model keeps the database's rules (:func:`providers.db.dispatches.claim_unsettled_async`
and :func:`~providers.db.dispatches.mark_unknown_async`, tested on PostgreSQL in
tests/providers/test_dispatches_db.py): a ``dispatched`` row is due once a provider that
answers status queries took it more than ``ask_after_s`` ago, or any provider more than
``stale_after_s`` ago, and it is not claimed; a claim lasts ``lease_s``.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from prometheus_client import CollectorRegistry

from actors.status_sweep import (
    StatusSweepMessage,
    SweepState,
    UnsettledStore,
    stale_reason,
    status_sweep_child,
)
from engine.actor import ActorRef, Overflow
from engine.errors import ConfigError, ProviderUnavailable
from engine.supervisor import ChildSpec, Supervisor
from providers.channel import ChannelName, DeliveryState, Receipt, StatusAnswer
from providers.db.dispatches import STALE_REASON, Unsettled

TENANT = "11111111-1111-1111-1111-111111111111"


@dataclass
class Row:
    channel: str
    provider: str
    dispatched: float
    status: str = "dispatched"
    reason: str | None = None
    claimed_until: float | None = None


@dataclass
class Rows:
    """The dispatch rows the sweep sees, and every claim and mark, with its Trio time."""

    rows: dict[uuid.UUID, Row] = field(default_factory=dict)
    claims: list[tuple[float, str, int]] = field(default_factory=list)
    marks: list[tuple[float, dict[uuid.UUID, str]]] = field(default_factory=list)
    fail: int = 0  # the next claims that raise

    def add(self, channel: str, provider: str, *, at: float) -> uuid.UUID:
        dispatch_id = uuid.uuid4()
        self.rows[dispatch_id] = Row(channel, provider, at + len(self.rows) * 1e-6)
        return dispatch_id

    async def claim(
        self,
        channel: str,
        askable: Sequence[str],
        *,
        ask_after_s: float,
        stale_after_s: float,
        limit: int,
        lease_s: float,
    ) -> list[Unsettled]:
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        if self.fail:
            self.fail -= 1
            raise ProviderUnavailable("postgres: connection refused")

        def due(row: Row) -> bool:
            return (
                row.channel == channel
                and row.status == "dispatched"
                and (row.claimed_until is None or row.claimed_until < now)
                and (
                    row.dispatched < now - stale_after_s
                    or (row.provider in askable and row.dispatched < now - ask_after_s)
                )
            )

        taken = sorted((r.dispatched, i) for i, r in self.rows.items() if due(r))[:limit]
        self.claims.append((now, channel, len(taken)))
        out = []
        for _, dispatch_id in taken:
            row = self.rows[dispatch_id]
            row.claimed_until = now + lease_s
            unsettled = Unsettled(
                dispatch_id=dispatch_id, tenant_id=TENANT, provider=row.provider,
                provider_ref=f"ref-{dispatch_id}", age_s=now - row.dispatched,
            )  # fmt: skip
            out.append(unsettled)
        return out

    async def mark_unknown(self, reasons: Mapping[uuid.UUID, str]) -> int:
        await trio.lowlevel.checkpoint()
        self.marks.append((trio.current_time(), dict(reasons)))
        marked = 0
        for dispatch_id, reason in reasons.items():
            row = self.rows[dispatch_id]
            if row.status == "dispatched":
                row.status, row.reason = "unknown", reason
                marked += 1
        return marked


@dataclass
class Sink:
    """The receipt sink: applies each receipt to its row (as apply_receipts_async would)."""

    rows: Rows
    applied: list[tuple[float, Receipt]] = field(default_factory=list)

    async def apply(self, receipts: Sequence[Receipt]) -> object:
        await trio.lowlevel.checkpoint()
        for receipt in receipts:
            self.applied.append((trio.current_time(), receipt))
            assert receipt.client_ref is not None
            self.rows.rows[uuid.UUID(receipt.client_ref)].status = receipt.state.value
        return None


Script = Callable[[float], StatusAnswer | None]


class Provider:
    """A provider's status queries: ``scripts`` answer per dispatch id, given the time."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.scripts: dict[uuid.UUID, Script] = {}
        self.asked: dict[uuid.UUID, list[float]] = {}

    async def query_status(
        self, reference: str, provider_ref: str | None = None
    ) -> StatusAnswer | None:
        tenant, _, client_ref = reference.partition(":")
        dispatch_id = uuid.UUID(client_ref)
        assert tenant == TENANT and provider_ref == f"ref-{dispatch_id}"
        now = trio.current_time()
        self.asked.setdefault(dispatch_id, []).append(now)
        return self.scripts[dispatch_id](now)


def answers(state: DeliveryState, reason: str | None = None) -> Script:
    return lambda now: StatusAnswer(state=state, provider_ref="p", reason=reason)


def raises(now: float) -> StatusAnswer | None:
    raise ProviderUnavailable("twilio: 503")


def hangs(now: float) -> StatusAnswer | None:
    raise _Hang


class _Hang(Exception):
    pass


class HangingProvider(Provider):
    async def query_status(
        self, reference: str, provider_ref: str | None = None
    ) -> StatusAnswer | None:
        try:
            return await super().query_status(reference, provider_ref)
        except _Hang:
            await trio.sleep(math.inf)
            raise AssertionError("unreachable") from None


KNOBS: dict[str, Any] = {
    "query_after_s": 10.0, "query_interval_s": 30.0, "query_timeout_s": 2.0,
    "sweep_interval_s": 5.0, "batch": 10, "concurrency": 2,
    "capacity": 16, "overflow": Overflow.WAIT, "shutdown_s": 1.0,
}  # fmt: skip


def sweep(
    store: UnsettledStore, sink: Sink, *providers: Provider, **over: Any
) -> tuple[ChildSpec, ActorRef[StatusSweepMessage]]:
    knobs = {
        **KNOBS,
        "deadlines": {ChannelName.SMS: 100.0, ChannelName.EMAIL: 200.0},
        **over,
    }
    return status_sweep_child(
        store=store, sink=sink, queries={p.name: p for p in providers}, **knobs
    )


async def test_rows_are_asked_about_every_interval_then_ended_at_their_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    t0 = trio.current_time()
    rows = Rows()
    sink = Sink(rows)
    ghasi, twilio = Provider("ghasi"), HangingProvider("twilio")
    late = rows.add("sms", "ghasi", at=t0)  # in flight, delivered at 40: its DLR was lost
    ghasi.scripts[late] = lambda now: StatusAnswer(
        state=DeliveryState.DELIVERED if now >= 40 else DeliveryState.ACCEPTED, provider_ref="p"
    )
    forgot = rows.add("sms", "ghasi", at=t0)  # the gateway lost its records
    ghasi.scripts[forgot] = answers(DeliveryState.NOT_FOUND)
    broken = rows.add("sms", "twilio", at=t0)  # every query fails
    twilio.scripts[broken] = raises
    hung = rows.add("sms", "twilio", at=t0)  # every query hangs past query_timeout_s
    twilio.scripts[hung] = hangs
    expired = rows.add("sms", "ghasi", at=t0)  # a final answer at the first query
    ghasi.scripts[expired] = answers(DeliveryState.FAILED, "expired")
    mail = rows.add("email", "smtp", at=t0)  # SMTP answers no status query
    registry = CollectorRegistry()
    spec, ref = sweep(rows, sink, ghasi, twilio, registry=registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(Supervisor("channels", [spec]).run)
        await trio.sleep(210)
        stats = ref.statistics()
        nursery.cancel_scope.cancel()

    # Due once older than 10 s (the tick at 15), then once the 30 s claim lapsed (strictly
    # after: the ticks at 50 and 85), and at the first claim past the 100 s deadline (120).
    assert ghasi.asked[forgot] == [15.0, 50.0, 85.0, 120.0]
    assert twilio.asked[broken] == twilio.asked[hung] == [15.0, 50.0, 85.0, 120.0]
    assert ghasi.asked[late] == [15.0, 50.0] and ghasi.asked[expired] == [15.0]
    # Final answers are the lost receipts, applied once the turn's queries ended (the
    # hung one gives up after 2 s).
    assert [(at - t0, r.client_ref, r.state, r.reason) for at, r in sink.applied] == [
        (17.0, str(expired), DeliveryState.FAILED, "expired"),
        (52.0, str(late), DeliveryState.DELIVERED, None),
    ]
    receipt = sink.applied[0][1]
    assert (receipt.provider, receipt.tenant_id, receipt.permanent) == ("ghasi", TENANT, True)
    # Past the deadline: unknown, the reason saying what the provider last said; the
    # email at the first claim past its own deadline (200 s), without a query.
    assert [(at - t0, marks) for at, marks in rows.marks] == [
        (122.0, {forgot: "feedback_stale:not_found", broken: "feedback_stale:no_answer",
                 hung: "feedback_stale:no_answer"}),
        (205.0, {mail: STALE_REASON}),
    ]  # fmt: skip
    assert {rows.rows[i].status for i in (forgot, broken, hung, mail)} == {"unknown"}
    assert stats.state is SweepState.IDLE and stats.failures == 0
    assert stats.settled == {"failed": 1, "delivered": 1} and stats.marked == 4
    assert stats.query_failures == 8  # the broken and the hung one, four times each
    assert stats.asked == 15 and stats.claimed == 16
    sample = registry.get_sample_value
    assert sample("triage_status_stale_unknown_total", {"channel": "sms"}) == 3.0
    assert sample("triage_status_stale_unknown_total", {"channel": "email"}) == 1.0
    assert sample("triage_status_queries_total", {"provider": "ghasi", "answer": "not_found"}) == 4
    assert sample(
        "triage_status_queries_total", {"provider": "twilio", "answer": "failed_query"}
    ) == 8  # fmt: skip


async def test_a_full_batch_is_followed_at_once_and_concurrency_bounds_the_queries(
    autojump_clock: trio.abc.Clock,
) -> None:
    t0 = trio.current_time()
    rows = Rows()
    sink = Sink(rows)
    slow = HangingProvider("ghasi")
    ids = [rows.add("sms", "ghasi", at=t0 - 1000) for _ in range(5)]
    for dispatch_id in ids:
        slow.scripts[dispatch_id] = hangs  # each query takes query_timeout_s
    spec, _ = sweep(rows, sink, slow, batch=2, concurrency=1, sweep_interval_s=5.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(Supervisor("channels", [spec]).run)
        await trio.sleep(13)
        nursery.cancel_scope.cancel()
    # 2 rows per turn, one query at a time (2 s each): a full turn is followed at once
    # (at 4, 8), the ticks that come while one runs (5.5) do nothing, the next (11) finds
    # nothing left.
    assert [(at - t0, channel, n) for at, channel, n in rows.claims] == [
        (0.0, "sms", 2), (4.0, "email", 0),
        (4.0, "sms", 2), (8.0, "email", 0),
        (8.0, "sms", 1), (10.0, "email", 0),
        (11.0, "sms", 0), (11.0, "email", 0),
    ]  # fmt: skip
    # Oldest first, one after the other (the order within a turn is the scheduler's).
    asked = [slow.asked[i] for i in ids]
    assert sorted(asked[:2]) == [[0.0], [2.0]] and sorted(asked[2:4]) == [[4.0], [6.0]]
    assert asked[4] == [8.0]
    assert [(at - t0, sorted(m.values())) for at, m in rows.marks] == [
        (4.0, [f"{STALE_REASON}:no_answer"] * 2),
        (8.0, [f"{STALE_REASON}:no_answer"] * 2),
        (10.0, [f"{STALE_REASON}:no_answer"]),
    ]


async def test_a_failed_claim_degrades_and_the_next_tick_retries(
    autojump_clock: trio.abc.Clock,
) -> None:
    t0 = trio.current_time()
    rows = Rows()
    sink = Sink(rows)
    mail = rows.add("email", "smtp", at=t0 - 1000)
    rows.fail = 1
    spec, ref = sweep(rows, sink)
    async with trio.open_nursery() as nursery:
        await nursery.start(Supervisor("channels", [spec]).run)
        await trio.sleep(1)
        degraded = ref.statistics()
        await trio.sleep(5)
        stats = ref.statistics()
        nursery.cancel_scope.cancel()
    assert degraded.state is SweepState.DEGRADED and degraded.failures == 1
    assert [at - t0 for at, _, _ in rows.claims] == [5.0, 5.0]  # the failed one not counted
    assert rows.marks == [(t0 + 5.0, {mail: STALE_REASON})]
    assert stats.state is SweepState.IDLE and (stats.turns, stats.marked) == (1, 1)


def test_stale_reasons_say_what_the_provider_last_said() -> None:
    assert stale_reason(None, asked=False) == "feedback_stale"
    assert stale_reason(None, asked=True) == "feedback_stale:no_answer"
    assert stale_reason(StatusAnswer(state=DeliveryState.NOT_FOUND), asked=True) == (
        "feedback_stale:not_found"
    )
    assert stale_reason(StatusAnswer(state=DeliveryState.ACCEPTED), asked=True) == (
        "feedback_stale:pending"
    )


def test_bad_knobs_are_refused_by_name() -> None:
    rows = Rows()
    for over, match in [
        ({"query_after_s": 0.0}, "query_after_s must be > 0"),
        ({"query_timeout_s": math.nan}, "query_timeout_s must be > 0"),
        ({"deadlines": {ChannelName.SMS: -1.0}}, "sms_stale_after_s must be > 0"),
        ({"deadlines": {}}, "no channel to sweep"),
        ({"batch": 0}, "batch must be a whole number"),
        ({"concurrency": True}, "concurrency must be a whole number"),
        ({"overflow": Overflow.DROP_NEWEST}, "overflow must be 'wait'"),
    ]:
        with pytest.raises(ConfigError, match=match):
            sweep(rows, Sink(rows), **over)
