"""Join tokens and recordings in real PostgreSQL, as the daemon's role (RLS on)."""

from __future__ import annotations

import asyncio
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from providers.bridge import run
from providers.db import DAEMON_ROLE, migrate
from providers.db.dead_letters import RedriveError, redrive
from providers.db.join_tokens import (
    IncidentRecord,
    IssuedToken,
    record_issued,
    retire_and_revoke,
    retired_kids,
    revoked_jti,
)
from providers.db.recordings import (
    PendingRecording,
    claim_pending,
    mark_failed,
    mark_ingested,
    register,
)
from providers.services import postgres_url_with


@dataclass
class World:
    admin_url: str
    pool: asyncpg.Pool[asyncpg.Record]
    a: uuid.UUID
    b: uuid.UUID


async def _tenants(url: str) -> list[uuid.UUID]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("INSERT INTO tenants (name) VALUES ('a'), ('b') RETURNING id")
        return [r["id"] for r in rows]
    finally:
        await conn.close()


async def _admin(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@pytest.fixture
async def world(postgres_url: str, bridge: asyncio.AbstractEventLoop) -> AsyncIterator[World]:
    await migrate(postgres_url)
    a, b = await run(_tenants, postgres_url)
    create = functools.partial(
        asyncpg.create_pool, postgres_url_with(postgres_url, user=DAEMON_ROLE), min_size=1,
        max_size=2,
    )  # fmt: skip
    pool = await run(create)
    try:
        yield World(postgres_url, pool, a, b)
    finally:
        await run(pool.close)


def _token(tenant: uuid.UUID, kid: str, session: str) -> IssuedToken:
    now = time.time()
    return IssuedToken(
        jti=uuid.uuid4(), tenant_id=tenant, session_id=session, room=f"room-{session}", kid=kid,
        user_id="u1", issued_at=now, expires_at=now + 600,
    )  # fmt: skip


async def test_a_rotation_retires_the_kid_revokes_its_tokens_and_records_it(world: World) -> None:
    tokens = [
        _token(world.a, "k1", "s1"), _token(world.b, "k1", "s2"), _token(world.a, "k2", "s3"),
    ]  # fmt: skip
    for token in tokens:
        await run(record_issued, world.pool, token)
    assert not await run(revoked_jti, world.pool, world.a, tokens[0].jti)
    record = IncidentRecord(
        kid="k1", detected_at=1_800_000_000.0, recorded_by="replica-1/key_ring",
        reason="spike", failures={"bad_signature": 30}, origins=["203.0.113.7:1"], new_kid="k2",
    )  # fmt: skip
    result = await run(retire_and_revoke, world.pool, record)
    assert (result.revoked_tokens, result.newly_retired) == (2, True)
    assert sorted(s["session_id"] for s in result.sessions) == ["s1", "s2"]
    assert await run(retired_kids, world.pool) == ["k1"]
    assert await run(revoked_jti, world.pool, world.a, tokens[0].jti)
    assert await run(revoked_jti, world.pool, world.b, tokens[1].jti)
    assert not await run(revoked_jti, world.pool, world.a, tokens[2].jti)  # another kid
    # A tenant cannot read another tenant's token.
    assert not await run(revoked_jti, world.pool, world.a, tokens[1].jti)

    [incident] = await run(_admin, world.admin_url, "SELECT * FROM join_token_incidents")
    assert (incident["kid"], incident["recorded_by"], incident["new_kid"]) == (
        "k1",
        "replica-1/key_ring",
        "k2",
    )
    assert incident["detected_at"].timestamp() == 1_800_000_000.0
    assert json.loads(incident["failures"]) == {"bad_signature": 30}
    assert json.loads(incident["origins"]) == ["203.0.113.7:1"]
    assert incident["revoked_tokens"] == 2

    again = await run(retire_and_revoke, world.pool, record)  # idempotent but for the record
    assert (again.revoked_tokens, again.newly_retired) == (0, False)


async def test_the_daemon_role_cannot_touch_the_system_tables_directly(world: World) -> None:
    async def insert(pool: asyncpg.Pool[asyncpg.Record]) -> str:
        async with pool.acquire() as conn:
            try:
                await conn.execute(
                    "INSERT INTO join_key_retirements (kid, reason) VALUES ('x', 'y')"
                )
            except asyncpg.InsufficientPrivilegeError as exc:
                return exc.sqlstate
        return "inserted"

    assert await run(insert, world.pool) == "42501"


def _pending(tenant: uuid.UUID, rid: str) -> PendingRecording:
    return PendingRecording(
        tenant_id=tenant, recording_id=rid, session_id="s1", path=f"{rid}.mp4", attempts=0
    )


async def test_recordings_register_once_claim_under_a_lease_and_settle_once(world: World) -> None:
    a1, b1 = _pending(world.a, "r1"), _pending(world.b, "r1")
    assert await run(register, world.pool, a1) is True
    assert await run(register, world.pool, a1) is False
    assert await run(register, world.pool, b1) is True  # unique per tenant
    claimed = await run(claim_pending, world.pool, 10, 60.0)
    assert sorted((c.tenant_id, c.recording_id) for c in claimed) == sorted(
        [(world.a, "r1"), (world.b, "r1")]
    )
    assert await run(claim_pending, world.pool, 10, 60.0) == []  # leased

    assert await run(mark_ingested, world.pool, a1, 2, 5, "ab" * 32, "/store/a/r1") is True
    assert await run(mark_ingested, world.pool, a1, 1, 5, "ab" * 32, "/store/a/r1") is False
    subject = "triage.events.recording.failed"
    assert await run(mark_failed, world.pool, b1, 5, "RecordingDenied: denied", subject) is True
    assert await run(mark_failed, world.pool, b1, 5, "again", subject) is False

    rows = await run(
        _admin,
        world.admin_url,
        "SELECT tenant_id, status, attempts, sha256 FROM recordings ORDER BY status",
    )
    assert [(r["tenant_id"], r["status"], r["attempts"]) for r in rows] == [
        (world.b, "failed", 5), (world.a, "ingested", 2),
    ]  # fmt: skip
    [event] = await run(
        _admin,
        world.admin_url,
        "SELECT tenant_id, aggregate_type, aggregate_id, subject, payload FROM outbox",
    )
    assert (event["tenant_id"], event["aggregate_type"], event["subject"]) == (
        world.b,
        "recording",
        subject,
    )
    payload = json.loads(event["payload"])
    assert (payload["kind"], payload["recording_id"], payload["attempts"]) == (
        "recording.failed",
        "r1",
        5,
    )
    [letter] = await run(
        _admin, world.admin_url, "SELECT tenant_id, source, ref, error, attempts FROM dead_letters"
    )
    assert (letter["source"], letter["ref"], letter["attempts"]) == (
        "recording",
        f"{world.b}/r1",
        5,
    )
    assert letter["error"] == "RecordingDenied: denied"


async def test_an_expired_lease_is_claimed_again(world: World) -> None:
    await run(register, world.pool, _pending(world.a, "r9"))
    assert len(await run(claim_pending, world.pool, 10, 0.0)) == 1  # a lease that ends at once
    assert [c.recording_id for c in await run(claim_pending, world.pool, 10, 60.0)] == ["r9"]
    assert await run(claim_pending, world.pool, 10, 60.0) == []


@pytest.mark.parametrize("as_daemon", [False, True], ids=["superuser", "daemon-role"])
async def test_a_failed_recordings_dead_letter_is_redriven_to_pending_once(
    world: World, as_daemon: bool
) -> None:
    """Row 20's replay: the on-call redrives the dead letter; the recording is pending
    again with a fresh budget, claimable by the ingest; a second redrive is refused, as
    is one whose recording is no longer failed."""
    item = _pending(world.b, "r7")
    await run(register, world.pool, item)
    subject = "triage.events.recording.failed"
    assert await run(mark_failed, world.pool, item, 5, "RecordingMissing: gone", subject) is True
    [letter] = await run(_admin, world.admin_url, "SELECT id FROM dead_letters")
    url = postgres_url_with(world.admin_url, user=DAEMON_ROLE) if as_daemon else world.admin_url
    done = await run(redrive, url, letter["id"])
    assert done.what == "recording r7 pending again (ingested at the next resume)"
    assert done.outbox_id is None
    [row] = await run(
        _admin,
        world.admin_url,
        "SELECT status, attempts, last_error, claimed_until FROM recordings",
    )
    assert tuple(row) == ("pending", 0, None, None)
    [claimed] = await run(claim_pending, world.pool, 10, 60.0)
    assert (claimed.tenant_id, claimed.recording_id, claimed.attempts) == (world.b, "r7", 0)
    with pytest.raises(RedriveError, match="already redriven"):
        await run(redrive, url, letter["id"])
    # Failed again, dead-lettered again; ingested meanwhile by hand: nothing to redrive.
    assert await run(mark_failed, world.pool, claimed, 5, "RecordingMissing: gone", subject)
    await run(_admin, world.admin_url, "UPDATE recordings SET status = 'ingested'")
    [second] = await run(
        _admin, world.admin_url, "SELECT id FROM dead_letters WHERE redriven_at IS NULL"
    )
    with pytest.raises(RedriveError, match=r"recording r7 of tenant .* is ingested, not failed"):
        await run(redrive, url, second["id"])
    [pending] = await run(
        _admin, world.admin_url, "SELECT count(*) AS n FROM dead_letters WHERE redriven_at IS NULL"
    )
    assert pending["n"] == 1  # the refused redrive changed nothing
