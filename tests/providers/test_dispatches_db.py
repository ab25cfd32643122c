"""Dispatch rows on real PostgreSQL, as the daemon's role (RLS on), through the bridge."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from functools import partial
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
    claim_backlog_async,
    claim_unsettled_async,
    mark_stale_unknown_async,
    mark_unknown_async,
    record_outcome_async,
    release_claims_async,
    transition_async,
)
from providers.db.pool import DbPool, open_pool
from providers.db.tenancy import relay_transaction
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


# -- the batch units of the group commit ---------------------------------------------------


async def test_accept_batch_judges_each_request_under_its_own_tenant(world: World) -> None:
    """One statement for a batch: each request in its own tenant and subtransaction; an
    unknown tenant or an unstorable value fails that request alone; a key repeated in the
    batch is the same dispatch; nothing crosses tenants."""
    from providers.db.dispatches import UnknownTenant, UnstorableValue, accept_batch_async

    first_a, first_b = request(world.a, "k1"), request(world.b, "k1")  # same key, two tenants
    stranger = request(str(uuid.uuid4()), "k2")
    nul = request(world.a, "k3", recipient="+1555\x00")
    again_a = request(world.a, "k1")  # same key and body as first_a: the same dispatch
    out = await world.db.run_unit(accept_batch_async, [first_a, stranger, first_b, nul, again_a])
    assert isinstance(out[1], UnknownTenant) and isinstance(out[3], UnstorableValue)
    ok_a, ok_b, replay = out[0], out[2], out[4]
    assert not isinstance(ok_a, Exception) and ok_a.created
    assert ok_a.status is DispatchStatus.QUEUED
    assert not isinstance(ok_b, Exception) and ok_b.created  # tenant b's own key
    assert not isinstance(replay, Exception)
    assert not replay.created and replay.same_request and replay.dispatch_id == first_a.dispatch_id
    rows = await admin(world.admin_url, "SELECT id, tenant_id::text AS t FROM dispatches")
    assert {(r["id"], r["t"]) for r in rows} == {
        (first_a.dispatch_id, world.a),
        (first_b.dispatch_id, world.b),
    }
    # Each stored row has exactly its queued event; nothing for the refused ones.
    assert [s for s, _ in await events(world, first_a.dispatch_id)] == [
        "triage.events.dispatch.queued"
    ]
    assert await events(world, nul.dispatch_id) == []


async def test_record_outcomes_batch_across_tenants(world: World) -> None:
    """Outcomes of several tenants in one statement: each applied under its tenant, a
    dispatch of another tenant is unknown to the step that names it under the wrong one."""
    from providers.db.dispatches import OutcomeRecord, record_outcomes_async

    ra, rb = request(world.a, "o1"), request(world.b, "o1")
    for r in (ra, rb):
        await world.db.run_unit(accept_async, r)
    sent = DispatchStatus.DISPATCHED
    out = await world.db.run_unit(
        record_outcomes_async,
        [
            OutcomeRecord(world.a, [Transition(ra.dispatch_id, sent, provider="p", provider_ref="x")]),
            OutcomeRecord(world.a, [Transition(rb.dispatch_id, sent, provider="p")]),  # b's row
            OutcomeRecord(world.b, [Transition(rb.dispatch_id, sent, provider="p"),
                                    Transition(rb.dispatch_id, sent, provider="p")]),
        ],
    )  # fmt: skip
    assert [[r.outcome for r in steps] for steps in out] == [
        [TransitionOutcome.APPLIED],
        [TransitionOutcome.UNKNOWN_DISPATCH],
        [TransitionOutcome.APPLIED, TransitionOutcome.DUPLICATE],
    ]
    assert (await status_of(world, ra.dispatch_id))["status"] == "dispatched"
    assert [s for s, _ in await events(world, rb.dispatch_id)] == [
        "triage.events.dispatch.queued",
        "triage.events.dispatch.dispatched",
    ]


async def test_record_outcomes_answer_in_order_whatever_the_lock_order(world: World) -> None:
    """The batch is written in dispatch-id order but answered in the callers' order; a
    batch with a recipient gone marks it dead in the same transaction."""
    from providers.db.dispatches import DeadRecipient, OutcomeRecord, record_outcomes_async

    reqs = [request(world.a, f"lo{i}", recipient=f"+1555010{i}") for i in range(6)]
    for r in reqs:
        await world.db.run_unit(accept_async, r)
    ordered = sorted(reqs, key=lambda r: r.dispatch_id, reverse=True)
    sent, gone = DispatchStatus.DISPATCHED, DispatchStatus.UNDELIVERABLE
    records = [
        OutcomeRecord(world.a, [Transition(r.dispatch_id, sent, provider="p", provider_ref=f"x{i}")])
        for i, r in enumerate(ordered[:-1])
    ]  # fmt: skip
    last = ordered[-1]
    records.append(
        OutcomeRecord(world.a, [Transition(last.dispatch_id, gone, reason="recipient_gone")],
                      DeadRecipient("sms", last.recipient, "recipient_gone"))
    )  # fmt: skip
    out = await world.db.run_unit(record_outcomes_async, records)
    assert [[r.outcome for r in steps] for steps in out] == [[TransitionOutcome.APPLIED]] * 6
    for i, r in enumerate(ordered[:-1]):
        assert (await status_of(world, r.dispatch_id))["provider_ref"] == f"x{i}"
    assert (await status_of(world, last.dispatch_id))["status"] == "undeliverable"
    assert await world.db.run_unit(is_dead_async, world.a, "sms", last.recipient)
    assert not await world.db.run_unit(is_dead_async, world.a, "sms", ordered[0].recipient)


# -- the crash backlog and the status sweep: claims across tenants (issue 13) ---------------


async def _age(world: World, ids: list[uuid.UUID], column: str, seconds: float) -> None:
    await admin(
        world.admin_url,
        f"UPDATE dispatches SET {column} = now() - make_interval(secs => $2)"
        " WHERE id = ANY($1::uuid[])",
        ids,
        seconds,
    )


async def _queued(world: World, tenant: str, n: int, age_s: float) -> list[uuid.UUID]:
    ids = []
    for i in range(n):
        req = request(tenant, key=f"q-{uuid.uuid4().hex[:8]}-{i}", body=f"body {i}")
        await world.db.run_unit(accept_async, req)
        ids.append(req.dispatch_id)
    await _age(world, ids, "created_at", age_s)
    return ids


async def test_the_backlog_claim_finds_every_tenants_due_rows_and_leases_them(
    world: World,
) -> None:
    old_a = await _queued(world, world.a, 2, 600.0)
    old_b = await _queued(world, world.b, 1, 300.0)
    fresh = await _queued(world, world.a, 1, 0.0)
    email = request(world.b, key="mail", channel="email", recipient="p@example.org")
    await world.db.run_unit(accept_async, email)
    await _age(world, [email.dispatch_id], "created_at", 900.0)

    limits = {"sms": 10, "email": 10}
    claim = await world.db.run_unit(claim_backlog_async, limits, [], 60.0, 30.0)
    # Both tenants' due rows, oldest first, nothing fresher than older_than_s; with
    # what sending them needs, read under each row's tenant.
    assert [q.dispatch_id for q in claim.rows] == [email.dispatch_id, *old_a, *old_b]
    assert [q.tenant_id for q in claim.rows] == [world.b, world.a, world.a, world.b]
    first = claim.rows[1]
    assert (first.body, first.data, first.recipient) == ("body 0", {"time": "10:00"}, "+15550100")
    assert first.idempotency_key.startswith("q-") and first.age_s >= 600.0 - 5
    assert claim.renewed == 0
    leases = await admin(
        world.admin_url,
        "SELECT id, claimed_until - now() AS left FROM dispatches WHERE claimed_until IS NOT NULL",
    )
    assert {r["id"] for r in leases} == {q.dispatch_id for q in claim.rows}
    assert all(25 < r["left"].total_seconds() <= 30 for r in leases)

    # Claimed: no resumer takes them again until the claim lapses, nor the fresh row.
    again = await world.db.run_unit(claim_backlog_async, limits, [], 60.0, 30.0)
    assert again.rows == []
    # A claim released is due at once; a limit of 0 claims nothing of that channel.
    assert await world.db.run_unit(release_claims_async, [old_b[0], email.dispatch_id]) == 2
    only_sms = await world.db.run_unit(claim_backlog_async, {"sms": 10, "email": 0}, [], 60.0, 30.0)
    assert [q.dispatch_id for q in only_sms.rows] == old_b
    # A claim that lapsed is due again (the resumer that held it died).
    await admin(
        world.admin_url,
        "UPDATE dispatches SET claimed_until = now() - interval '1 second' WHERE id = $1",
        old_a[0],
    )
    lapsed = await world.db.run_unit(claim_backlog_async, {"sms": 1}, [], 60.0, 30.0)
    assert [q.dispatch_id for q in lapsed.rows] == [old_a[0]]
    assert fresh[0] not in {q.dispatch_id for q in lapsed.rows}


async def test_held_rows_keep_their_claim_while_their_replica_renews_it(world: World) -> None:
    held = await _queued(world, world.a, 2, 600.0)  # parked in this replica's dispatcher
    other = await _queued(world, world.b, 1, 600.0)  # held by nobody
    # Renewed only when the claim would lapse within renew_within_s: both are due now.
    mine = await world.db.run_unit(claim_backlog_async, {"sms": 0}, held, 60.0, 40.0, 20.0)
    assert (mine.rows, mine.renewed) == ([], 2)
    soon = await world.db.run_unit(claim_backlog_async, {"sms": 0}, held, 60.0, 40.0, 20.0)
    assert soon.renewed == 0  # 40 s left: more than 20
    later = await world.db.run_unit(claim_backlog_async, {"sms": 0}, held, 60.0, 40.0, 45.0)
    assert later.renewed == 2
    # Another replica's resumer takes only the row nobody holds.
    theirs = await world.db.run_unit(claim_backlog_async, {"sms": 10}, [], 60.0, 40.0)
    assert [q.dispatch_id for q in theirs.rows] == other
    # A row claimed but settled since is not read back to be sent.
    await world.db.run_unit(
        transition_async, world.a, [Transition(held[0], DispatchStatus.DISPATCHED, provider="x")]
    )
    await admin(world.admin_url, "UPDATE dispatches SET claimed_until = NULL")
    left = await world.db.run_unit(claim_backlog_async, {"sms": 10}, [], 60.0, 40.0)
    assert [q.dispatch_id for q in left.rows] == [held[1], *other]


async def _two_resumers(url: str, limit: int) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Two resumers (two pools, as two replicas) claiming until nothing is left, at once."""
    pools = [await asyncpg.create_pool(url, min_size=1, max_size=1) for _ in range(2)]
    try:

        async def resumer(pool: Any) -> list[uuid.UUID]:
            taken: list[uuid.UUID] = []
            empty = 0
            while empty < 3:  # a turn that found nothing may have met the other's locks
                claim = await claim_backlog_async(pool, {"sms": limit}, [], 60.0, 300.0)
                taken.extend(q.dispatch_id for q in claim.rows)
                empty = 0 if claim.rows else empty + 1
                await asyncio.sleep(0)
            return taken

        first, second = await asyncio.gather(resumer(pools[0]), resumer(pools[1]))
        return first, second
    finally:
        for pool in pools:
            await pool.close()


async def test_two_concurrent_resumers_never_claim_the_same_row(world: World) -> None:
    rows = [
        *await _queued(world, world.a, 60, 600.0),
        *await _queued(world, world.b, 60, 600.0),
    ]
    daemon = postgres_url_with(world.admin_url, user=DAEMON_ROLE)
    first, second = await run(_two_resumers, daemon, 7)
    assert first and second  # both took rows...
    assert not set(first) & set(second)  # ...never the same one
    assert len(first) + len(second) == len(rows) and set(first) | set(second) == set(rows)


async def test_a_claim_skips_rows_another_resumer_has_locked(world: World) -> None:
    rows = await _queued(world, world.a, 3, 600.0)

    async def locked_claim(url: str) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
        # One replica's claim statement holds its locks (its transaction still open)
        # while the other's claim runs: SKIP LOCKED, it neither waits nor takes them.
        holder = await asyncpg.connect(url)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
        try:
            async with relay_transaction(holder):
                locked = await holder.fetch(
                    "SELECT id FROM dispatches WHERE status = 'queued' ORDER BY created_at"
                    " LIMIT 2 FOR UPDATE SKIP LOCKED"
                )
                during = await claim_backlog_async(pool, {"sms": 10}, [], 60.0, 300.0)
            return [r["id"] for r in locked], [q.dispatch_id for q in during.rows]
        finally:
            await holder.close()
            await pool.close()

    locked, during = await run(locked_claim, postgres_url_with(world.admin_url, user=DAEMON_ROLE))
    assert locked == rows[:2] and during == rows[2:]


async def test_the_status_sweep_claims_unsettled_rows_and_ends_them_with_reasons(
    world: World,
) -> None:
    made: dict[str, uuid.UUID] = {}
    for name, tenant, channel, provider, age_s in [
        ("asked_a", world.a, "sms", "ghasi", 1200.0),
        ("asked_b", world.b, "sms", "twilio", 900.0),
        ("young", world.a, "sms", "ghasi", 60.0),
        ("no_query", world.a, "sms", "other", 1200.0),  # answers no status query
        ("stale_other", world.b, "sms", "other", 7200.0),
        ("mail", world.a, "email", "smtp", 7200.0),
        ("push", world.a, "push", "fcm", 7200.0),
    ]:
        req = request(tenant, key=name, channel=channel)
        await world.db.run_unit(accept_async, req)
        await world.db.run_unit(
            transition_async,
            tenant,
            [Transition(req.dispatch_id, DispatchStatus.DISPATCHED, provider=provider,
                        provider_ref=f"ref-{name}")],
        )  # fmt: skip
        await _age(world, [req.dispatch_id], "dispatched_at", age_s)
        made[name] = req.dispatch_id
    queued = request(world.a, key="queued")
    await world.db.run_unit(accept_async, queued)

    def claim(channel: str, **over: Any) -> Any:
        knobs = {"ask_after_s": 600.0, "stale_after_s": 3600.0, "limit": 10, "lease_s": 30.0}
        knobs.update(over)
        return world.db.run_unit(
            partial(claim_unsettled_async, **knobs), channel, ["ghasi", "twilio"]
        )

    rows = await claim("sms")
    assert [r.dispatch_id for r in rows] == [made["stale_other"], made["asked_a"], made["asked_b"]]
    stale, asked_a, asked_b = rows
    assert (asked_a.tenant_id, asked_a.provider, asked_a.provider_ref) == (
        world.a, "ghasi", "ref-asked_a",
    )  # fmt: skip
    assert asked_b.tenant_id == world.b and 900.0 - 5 <= asked_b.age_s <= 900.0 + 5
    assert stale.age_s >= 7200.0 - 5
    assert await claim("sms") == []  # claimed: nobody asks again before the lease ends
    assert [r.dispatch_id for r in await claim("email", stale_after_s=86400.0)] == []
    assert [r.dispatch_id for r in await claim("email")] == [made["mail"]]
    with pytest.raises(ValueError, match="limit"):
        await claim("sms", limit=0)

    # A status answer came for asked_a (delivered, under RLS), the others end unknown.
    await world.db.run_unit(
        apply_receipts_async,
        [Receipt(provider="ghasi", state=DeliveryState.DELIVERED,
                 client_ref=str(made["asked_a"]), tenant_id=world.a)],
    )  # fmt: skip
    reasons = {
        made["asked_a"]: "feedback_stale:pending",  # settled meanwhile: left as it is
        made["stale_other"]: STALE_REASON,
        made["mail"]: "feedback_stale:not_found",
    }
    moved = await world.db.run_unit(mark_unknown_async, reasons)
    assert sorted(moved) == sorted([made["stale_other"], made["mail"]])
    assert (await status_of(world, made["asked_a"]))["status"] == "delivered"
    for name, reason in [("stale_other", STALE_REASON), ("mail", "feedback_stale:not_found")]:
        row = await status_of(world, made[name])
        assert (row["status"], row["reason"]) == ("unknown", reason)
        subject, payload = (await events(world, made[name]))[-1]
        assert subject == "triage.events.dispatch.unknown" and payload["reason"] == reason
        assert payload["provider_ref"] == f"ref-{name}"
    assert (await status_of(world, made["push"]))["status"] == "dispatched"
    assert await world.db.run_unit(mark_unknown_async, reasons) == []
    with pytest.raises(ValueError, match="reason"):
        await world.db.run_unit(mark_unknown_async, {made["young"]: ""})


# -- the receipt batch (migration 0009) ------------------------------------------------------


async def _dispatched(world: World, tenant: str, key: str, ref: str) -> uuid.UUID:
    req = request(tenant, key)
    await world.db.run_unit(accept_async, req)
    await world.db.run_unit(
        transition_async,
        tenant,
        [
            Transition(
                req.dispatch_id, DispatchStatus.DISPATCHED, provider="ghasi", provider_ref=ref
            )
        ],
    )
    return req.dispatch_id


async def test_receipt_batch_is_one_statement_each_receipt_under_its_own_tenant(
    world: World,
) -> None:
    """Receipts of two tenants in one batch: each applied under its own tenant (a receipt
    naming the other tenant finds nothing, by id or by provider ref), each answered in
    the caller's order, and applying the batch again changes nothing."""
    from providers.db.dispatches import ReceiptOutcome, apply_receipt_batch_async

    a1 = await _dispatched(world, world.a, "a1", "ref-a1")
    a2 = await _dispatched(world, world.a, "a2", "ref-a2")
    b1 = await _dispatched(world, world.b, "b1", "ref-b1")
    queued = request(world.b, "b2")
    await world.db.run_unit(accept_async, queued)

    def receipt(
        tenant: str, state: DeliveryState, client_ref: str | None = None,
        provider_ref: str | None = None,
    ) -> Receipt:  # fmt: skip
        return Receipt(provider="ghasi", state=state, tenant_id=tenant, client_ref=client_ref,
                       provider_ref=provider_ref)  # fmt: skip

    batch = [
        receipt(world.b, DeliveryState.DELIVERED, client_ref=str(b1)),
        receipt(world.a, DeliveryState.UNDELIVERABLE, provider_ref="ref-a2"),  # by ref
        receipt(world.b, DeliveryState.DELIVERED, client_ref=str(a1)),  # a's row, b's name
        receipt(world.b, DeliveryState.DELIVERED, provider_ref="ref-a1"),  # likewise by ref
        receipt(world.a, DeliveryState.DELIVERED, client_ref=str(a1)),
        receipt(world.a, DeliveryState.FAILED, client_ref=str(a1)),  # after delivered
        receipt(world.b, DeliveryState.DELIVERED, client_ref=str(queued.dispatch_id)),
        receipt(world.a, DeliveryState.ACCEPTED, client_ref=str(a1)),  # moves nothing
        receipt("not-a-tenant", DeliveryState.DELIVERED, client_ref=str(a1)),
        receipt(world.b, DeliveryState.DELIVERED, client_ref=str(b1)),  # repeated in the batch
    ]
    results = await world.db.run_unit(apply_receipt_batch_async, batch)
    assert [(r.outcome, r.dispatch_id) for r in results] == [  # type: ignore[union-attr]
        (ReceiptOutcome.APPLIED, b1),
        (ReceiptOutcome.APPLIED, a2),
        (ReceiptOutcome.UNKNOWN, None),
        (ReceiptOutcome.UNKNOWN, None),
        (ReceiptOutcome.APPLIED, a1),
        (ReceiptOutcome.OUT_OF_ORDER, a1),
        (ReceiptOutcome.EARLY, queued.dispatch_id),
        (ReceiptOutcome.IGNORED, None),
        (ReceiptOutcome.UNKNOWN, None),
        (ReceiptOutcome.DUPLICATE, None),
    ]
    for dispatch_id, status in [(a1, "delivered"), (a2, "undeliverable"), (b1, "delivered")]:
        row = await status_of(world, dispatch_id)
        assert row["status"] == status
    assert (await status_of(world, a2))["reason"] == "undeliverable"
    assert (await status_of(world, queued.dispatch_id))["status"] == "queued"
    subject, payload = (await events(world, b1))[-1]
    assert subject == "triage.events.dispatch.delivered" and payload["tenant"] == world.b
    outbox = await admin(world.admin_url, "SELECT count(*) AS n FROM outbox")
    early = await admin(world.admin_url, "SELECT tenant_id::text AS t FROM early_receipts")
    assert [r["t"] for r in early] == [world.b]

    again = await world.db.run_unit(apply_receipt_batch_async, batch)  # a provider's retry
    assert [r.outcome for r in again[:2]] == [ReceiptOutcome.DUPLICATE] * 2  # type: ignore[union-attr]
    assert again[6].outcome is ReceiptOutcome.EARLY  # type: ignore[union-attr]  # kept once
    assert await admin(world.admin_url, "SELECT count(*) AS n FROM outbox") == outbox
    assert len(await admin(world.admin_url, "SELECT 1 FROM early_receipts")) == 1
    assert await world.db.run_unit(apply_receipt_batch_async, []) == []


async def test_receipt_batch_locks_in_dispatch_order_and_leaves_the_tenant_setting(
    world: World,
) -> None:
    """Many receipts in one statement are applied in dispatch-id order (the lock order
    shared by every batch), answered in the caller's order; the statement restores the
    caller's tenant setting."""
    from providers.db.dispatches import ReceiptOutcome, apply_receipt_batch_async

    made = [await _dispatched(world, world.a, f"k{i}", f"r{i}") for i in range(12)]
    batch = [
        Receipt(provider="ghasi", state=DeliveryState.DELIVERED, client_ref=str(d),
                tenant_id=world.a)
        for d in reversed(made)
    ]  # fmt: skip
    results = await world.db.run_unit(apply_receipt_batch_async, batch)
    assert [r.dispatch_id for r in results] == list(reversed(made))  # type: ignore[union-attr]
    assert {r.outcome for r in results} == {ReceiptOutcome.APPLIED}  # type: ignore[union-attr]
    delivered_at = await admin(
        world.admin_url,
        "SELECT aggregate_id FROM outbox WHERE subject = 'triage.events.dispatch.delivered'"
        " ORDER BY id",
    )
    assert [r["aggregate_id"] for r in delivered_at] == sorted(str(d) for d in made)

    async def setting(pool: Any) -> str | None:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT set_config('triage.tenant_id', $1, true)", world.b)
            await conn.fetch("SELECT * FROM apply_receipts($1::jsonb)", "[]")
            value: str | None = await conn.fetchval(
                "SELECT current_setting('triage.tenant_id', true)"
            )
            return value

    assert await world.db.run_unit(setting) == world.b


async def test_a_receipt_postgres_refuses_fails_alone(world: World) -> None:
    """A receipt PostgreSQL refuses (a NUL in its reason) spoils its statement; the batch
    is then run item by item, so the others are applied and only it is refused."""
    from providers.db.dispatches import (
        ReceiptOutcome,
        UnstorableValue,
        apply_receipt_batch_async,
    )

    good = await _dispatched(world, world.a, "g", "rg")
    bad = await _dispatched(world, world.a, "b", "rb")
    results = await world.db.run_unit(
        apply_receipt_batch_async,
        [
            Receipt(provider="ghasi", state=DeliveryState.FAILED, client_ref=str(bad),
                    reason="bad\x00reason", tenant_id=world.a),
            Receipt(provider="ghasi", state=DeliveryState.DELIVERED, client_ref=str(good),
                    tenant_id=world.a),
        ],
    )  # fmt: skip
    assert isinstance(results[0], UnstorableValue)
    assert results[1] == results[1].__class__(ReceiptOutcome.APPLIED, good)
    assert (await status_of(world, good))["status"] == "delivered"
    assert (await status_of(world, bad))["status"] == "dispatched"
