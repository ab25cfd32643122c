"""Dispatch rows on real PostgreSQL, as the daemon's role (RLS on), through the bridge."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import pytest

from config.schema import DatabaseConfig
from providers.bridge import run
from providers.channel import DeliveryState, Receipt
from providers.db import DAEMON_ROLE, migrate
from providers.db.categories import BlockState, is_dead_async, lookup_block_async, mark_dead_async
from providers.db.dispatches import (
    STALE_REASON,
    AcceptRequest,
    DispatchStatus,
    Transition,
    TransitionOutcome,
    accept_async,
    apply_receipts_async,
    mark_stale_unknown_async,
    queued_backlog_async,
    record_outcome_async,
    transition_async,
)
from providers.db.pool import DbPool, open_pool
from providers.services import postgres_url_with

DB_CONFIG = DatabaseConfig(pool_min=1, pool_max=2, connect_timeout_s=2.0, command_timeout_s=2.0)


@dataclass(frozen=True)
class World:
    admin_url: str
    db: DbPool
    a: str
    b: str


async def _seed(url: str) -> tuple[str, str]:
    conn = await asyncpg.connect(url)
    try:
        a = await conn.fetchval("INSERT INTO tenants (name) VALUES ('a') RETURNING id::text")
        b = await conn.fetchval("INSERT INTO tenants (name) VALUES ('b') RETURNING id::text")
        return str(a), str(b)
    finally:
        await conn.close()


async def admin(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return await run(go)


@pytest.fixture
async def world(bridge: object, postgres_url: str) -> AsyncIterator[World]:
    await migrate(postgres_url)
    a, b = await run(_seed, postgres_url)
    daemon = postgres_url_with(postgres_url, user=DAEMON_ROLE)
    async with open_pool(daemon, DB_CONFIG, close_s=2.0) as db:
        yield World(postgres_url, db, a, b)


def request(tenant: str, key: str = "k1", **over: Any) -> AcceptRequest:
    base = AcceptRequest(
        dispatch_id=uuid.uuid4(),
        tenant_id=tenant,
        idempotency_key=key,
        request_hash="h1",
        channel="sms",
        template="reminder",
        template_version=1,
        category="reminders",
        recipient="+15550100",
        body="See you at 10:00",
        subject=None,
        data={"time": "10:00"},
        key_ttl_s=3600.0,
    )
    return replace(base, **over)


async def events(world: World, dispatch_id: uuid.UUID) -> list[tuple[str, dict[str, Any]]]:
    rows = await admin(
        world.admin_url,
        "SELECT subject, payload::text AS p FROM outbox"
        " WHERE aggregate_type = 'dispatch' AND aggregate_id = $1 ORDER BY seq",
        str(dispatch_id),
    )
    return [(r["subject"], json.loads(r["p"])) for r in rows]


async def status_of(world: World, dispatch_id: uuid.UUID) -> asyncpg.Record:
    rows = await admin(world.admin_url, "SELECT * FROM dispatches WHERE id = $1", dispatch_id)
    return rows[0]


async def test_accept_is_one_transaction_and_idempotent(world: World) -> None:
    first = request(world.a)
    result = await world.db.run_unit(accept_async, first)
    assert result.created and result.status is DispatchStatus.QUEUED
    assert result.dispatch_id == first.dispatch_id
    (subject, payload), *rest = await events(world, first.dispatch_id)
    assert not rest
    assert subject == "triage.events.dispatch.queued"
    assert payload["id"] == str(first.dispatch_id) and payload["tenant"] == world.a
    assert payload["status"] == "queued" and payload["category"] == "reminders"
    assert "+15550100" not in json.dumps(payload) and "10:00" not in json.dumps(payload)

    again = await world.db.run_unit(accept_async, request(world.a))  # same key, same body
    assert not again.created and again.same_request
    assert again.dispatch_id == first.dispatch_id and again.status is DispatchStatus.QUEUED
    other = await world.db.run_unit(accept_async, request(world.a, request_hash="h2"))
    assert not other.created and not other.same_request  # a conflict
    rows = await admin(world.admin_url, "SELECT count(*) AS n FROM dispatches")
    assert rows[0]["n"] == 1
    keys = await admin(world.admin_url, "SELECT response::text AS r FROM idempotency_keys")
    assert json.loads(keys[0]["r"]) == {"dispatch_id": str(first.dispatch_id)}
    # The same key in another tenant is another dispatch.
    b = await world.db.run_unit(accept_async, request(world.b))
    assert b.created and b.dispatch_id != first.dispatch_id


async def test_accept_rolls_back_whole_on_error(world: World) -> None:
    bad = request(world.a, channel="fax")  # refused by the channel domain
    with pytest.raises(asyncpg.CheckViolationError):
        await world.db.run_unit(accept_async, bad)
    for table in ("dispatches", "idempotency_keys", "outbox"):
        rows = await admin(world.admin_url, f"SELECT count(*) AS n FROM {table}")
        assert rows[0]["n"] == 0, table


async def test_accept_refused_disabled_and_dead(world: World) -> None:
    await admin(
        world.admin_url,
        "INSERT INTO category_blocks (tenant_id, channel, category, state, reason)"
        " VALUES ($1, 'sms', 'reminders', 'disabled', 'bounces'),"
        " ($1, 'sms', 'promo', 'throttled', 'bounces')",
        uuid.UUID(world.a),
    )
    disabled = await world.db.run_unit(accept_async, request(world.a, key="d"))
    assert disabled.status is DispatchStatus.FAILED and disabled.reason == "category_disabled"
    assert disabled.dispatch_id is not None
    assert [s for s, _ in await events(world, disabled.dispatch_id)] == [
        "triage.events.dispatch.queued",
        "triage.events.dispatch.failed",
    ]
    throttled = await world.db.run_unit(accept_async, request(world.a, key="t", category="promo"))
    assert throttled.status is DispatchStatus.QUEUED
    assert throttled.category_state is BlockState.THROTTLED
    block = await world.db.run_unit(lookup_block_async, world.a, "sms", "promo")
    assert block is not None and block.state is BlockState.THROTTLED
    assert await world.db.run_unit(lookup_block_async, world.b, "sms", "promo") is None

    assert await world.db.run_unit(mark_dead_async, world.a, "sms", "+15550199", "gone")
    assert not await world.db.run_unit(mark_dead_async, world.a, "sms", "+15550199", "gone")
    assert await world.db.run_unit(is_dead_async, world.a, "sms", "+15550199")
    assert not await world.db.run_unit(is_dead_async, world.b, "sms", "+15550199")
    dead = await world.db.run_unit(
        accept_async, request(world.a, key="x", category="promo", recipient="+15550199")
    )
    assert dead.status is DispatchStatus.UNDELIVERABLE and dead.reason == "recipient_dead"


async def test_every_transition_writes_its_event(world: World) -> None:
    req = request(world.a)
    await world.db.run_unit(accept_async, req)
    did = req.dispatch_id
    steps = [Transition(did, DispatchStatus.DISPATCHED, provider="ghasi", provider_ref="g-1")]
    [moved] = await world.db.run_unit(transition_async, world.a, steps)
    assert moved.outcome is TransitionOutcome.APPLIED and moved.old_status is DispatchStatus.QUEUED
    row = await status_of(world, did)
    assert row["status"] == "dispatched" and row["provider_ref"] == "g-1"
    assert row["dispatched_at"] is not None and not row["possible_duplicate"]
    [dup] = await world.db.run_unit(transition_async, world.a, steps)
    assert dup.outcome is TransitionOutcome.DUPLICATE
    [back] = await world.db.run_unit(
        transition_async, world.a, [Transition(did, DispatchStatus.FAILED, reason="x")]
    )
    assert back.outcome is TransitionOutcome.APPLIED
    [late] = await world.db.run_unit(
        transition_async, world.a, [Transition(did, DispatchStatus.DELIVERED)]
    )
    assert late.outcome is TransitionOutcome.OUT_OF_ORDER
    [other] = await world.db.run_unit(
        transition_async, world.b, [Transition(did, DispatchStatus.DELIVERED)]
    )
    assert other.outcome is TransitionOutcome.UNKNOWN_DISPATCH  # RLS: B cannot see it
    subjects = [s for s, _ in await events(world, did)]
    assert subjects == [
        "triage.events.dispatch.queued",
        "triage.events.dispatch.dispatched",
        "triage.events.dispatch.failed",
    ]
    _, payload = (await events(world, did))[2]
    assert payload["reason"] == "x" and payload["provider"] == "ghasi"
    with pytest.raises(ValueError, match="needs a reason"):
        await world.db.run_unit(
            transition_async, world.a, [Transition(did, DispatchStatus.UNKNOWN)]
        )

    # dispatched then unknown in one transaction, possible_duplicate sticks
    req2 = request(world.a, key="k2")
    await world.db.run_unit(accept_async, req2)
    two = [
        Transition(
            req2.dispatch_id, DispatchStatus.DISPATCHED, provider="p", possible_duplicate=True
        ),
        Transition(req2.dispatch_id, DispatchStatus.UNKNOWN, reason="ambiguous_timeout"),
    ]
    results = await world.db.run_unit(transition_async, world.a, two)
    assert [r.outcome for r in results] == [TransitionOutcome.APPLIED] * 2
    row = await status_of(world, req2.dispatch_id)
    assert row["status"] == "unknown" and row["possible_duplicate"]


async def test_receipts_apply_once(world: World) -> None:
    req = request(world.a)
    await world.db.run_unit(accept_async, req)
    await world.db.run_unit(
        transition_async,
        world.a,
        [Transition(req.dispatch_id, DispatchStatus.DISPATCHED, provider="tw", provider_ref="SM1")],
    )
    delivered = Receipt(
        provider="tw", state=DeliveryState.DELIVERED, client_ref=str(req.dispatch_id),
        tenant_id=world.a,
    )  # fmt: skip
    by_ref = Receipt(
        provider="tw", state=DeliveryState.DELIVERED, provider_ref="SM1", tenant_id=world.a
    )
    failed_late = Receipt(
        provider="tw", state=DeliveryState.FAILED, client_ref=str(req.dispatch_id),
        tenant_id=world.a,
    )  # fmt: skip
    nobody = Receipt(
        provider="tw",
        state=DeliveryState.DELIVERED,
        client_ref=str(uuid.uuid4()),
        tenant_id=world.a,
    )
    no_tenant = Receipt(provider="tw", state=DeliveryState.DELIVERED, provider_ref="SM1")
    accepted = Receipt(
        provider="tw", state=DeliveryState.ACCEPTED, provider_ref="SM1", tenant_id=world.a
    )
    report = await world.db.run_unit(
        apply_receipts_async, [delivered, by_ref, failed_late, nobody, no_tenant, accepted]
    )
    assert (report.applied, report.duplicates, report.out_of_order) == (1, 1, 1)
    assert (report.unknown, report.ignored) == (2, 1)
    assert report.applied_ids == [req.dispatch_id]
    assert (await status_of(world, req.dispatch_id))["status"] == "delivered"
    assert [s for s, _ in await events(world, req.dispatch_id)][-1] == (
        "triage.events.dispatch.delivered"
    )


async def test_stale_sweep_marks_only_old_dispatched_rows_of_the_channel(world: World) -> None:
    made: dict[str, uuid.UUID] = {}
    for name, tenant, channel in [
        ("old_a", world.a, "push"),
        ("old_b", world.b, "push"),
        ("new_a", world.a, "push"),
        ("old_sms", world.a, "sms"),
        ("queued", world.a, "push"),
    ]:
        req = request(tenant, key=name, channel=channel)
        await world.db.run_unit(accept_async, req)
        made[name] = req.dispatch_id
        if name != "queued":
            await world.db.run_unit(
                transition_async,
                tenant,
                [Transition(req.dispatch_id, DispatchStatus.DISPATCHED, provider="fcm")],
            )
    await admin(
        world.admin_url,
        "UPDATE dispatches SET dispatched_at = now() - interval '20 minutes',"
        " created_at = now() - interval '20 minutes' WHERE id = ANY($1::uuid[])",
        [made["old_a"], made["old_b"], made["old_sms"], made["queued"]],
    )
    marked = await world.db.run_unit(mark_stale_unknown_async, "push", 600.0, 10)
    assert sorted(marked) == sorted([made["old_a"], made["old_b"]])
    for name, expected in [
        ("old_a", "unknown"),
        ("old_b", "unknown"),
        ("new_a", "dispatched"),
        ("old_sms", "dispatched"),
        ("queued", "queued"),
    ]:
        row = await status_of(world, made[name])
        assert row["status"] == expected, name
    row = await status_of(world, made["old_a"])
    assert row["reason"] == STALE_REASON
    subject, payload = (await events(world, made["old_b"]))[-1]
    assert subject == "triage.events.dispatch.unknown"
    assert payload["tenant"] == world.b and payload["reason"] == STALE_REASON
    assert await world.db.run_unit(mark_stale_unknown_async, "push", 600.0, 10) == []

    backlog = await world.db.run_unit(queued_backlog_async, [world.a, world.b], 600.0, 10)
    assert [q.dispatch_id for q in backlog] == [made["queued"]]
    assert backlog[0].body == "See you at 10:00" and backlog[0].data == {"time": "10:00"}
    assert backlog[0].age_s >= 1200 - 5


async def test_a_receipt_that_overtakes_its_send_is_kept_and_applied_with_it(world: World) -> None:
    req = request(world.a)
    await world.db.run_unit(accept_async, req)
    early = Receipt(
        provider="ghasi", state=DeliveryState.DELIVERED, client_ref=str(req.dispatch_id),
        tenant_id=world.a,
    )  # fmt: skip
    # Twice, as from two DLR workers: kept once, no deadlock, the row still queued.
    report = await world.db.run_unit(apply_receipts_async, [early, early])
    assert (report.early, report.duplicates, report.applied) == (1, 1, 0)
    assert (await status_of(world, req.dispatch_id))["status"] == "queued"
    again = await world.db.run_unit(apply_receipts_async, [early])
    assert again.early == 1  # the stash takes it once (ON CONFLICT DO NOTHING)
    results = await world.db.run_unit(
        record_outcome_async,
        world.a,
        [
            Transition(
                req.dispatch_id, DispatchStatus.DISPATCHED, provider="ghasi", provider_ref="m1"
            )
        ],
    )
    assert [r.outcome for r in results] == [TransitionOutcome.APPLIED]
    assert (await status_of(world, req.dispatch_id))["status"] == "delivered"
    assert [s for s, _ in await events(world, req.dispatch_id)][-2:] == [
        "triage.events.dispatch.dispatched",
        "triage.events.dispatch.delivered",
    ]
    late = await world.db.run_unit(apply_receipts_async, [early])
    assert (late.duplicates, late.early) == (1, 0)
