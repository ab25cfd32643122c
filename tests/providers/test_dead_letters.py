"""Dead letters of the outbox against real PostgreSQL: the move, the DLQ messages, list, redrive."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence

import asyncpg
import pytest

from providers.db.dead_letters import (
    RedriveError,
    dead_letter_async,
    list_dead_letters,
    redrive,
)
from providers.db.migrate import migrate_async
from providers.jetstream import PublishItem


async def _setup(url: str) -> tuple[uuid.UUID, list[int]]:
    """Migrate; a tenant; three events of one aggregate (seq 1, 2, 3)."""
    await migrate_async(url)
    conn = await asyncpg.connect(url)
    try:
        tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('t') RETURNING id")
        ids = []
        for n in range(3):
            ids.append(
                await conn.fetchval(
                    "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject,"
                    " payload, headers) VALUES ($1, 'appointment', 'a1', 1, 'ev.x', $2::jsonb,"
                    ' \'{"h": "v"}\'::jsonb) RETURNING id',
                    tenant,
                    json.dumps({"n": n}),
                )
            )
        return tenant, [int(i) for i in ids]
    finally:
        await conn.close()


async def _move(url: str, failures: Sequence[tuple[int, str]]) -> list[PublishItem]:
    """Dead-letter ``failures`` as the relay does (triage_relay), collecting the DLQ messages."""
    sent: list[PublishItem] = []

    async def publish(items: Sequence[PublishItem]) -> None:
        sent.extend(items)

    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE triage_relay")
            await dead_letter_async(conn, failures, publish, "dlq.outbox", 1024 * 1024)
    finally:
        await conn.close()
    return sent


async def _outbox(url: str) -> list[tuple[int, int, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT id, seq, payload::text AS p FROM outbox ORDER BY id")
        return [(r["id"], r["seq"], r["p"]) for r in rows]
    finally:
        await conn.close()


def test_dead_letter_list_and_redrive(postgres_url: str) -> None:
    tenant, ids = asyncio.run(_setup(postgres_url))
    sent = asyncio.run(_move(postgres_url, [(ids[1], "PoisonEvent: bad\nthing")]))
    [item] = sent
    assert item.msg_id == f"dlq-outbox-{ids[1]}" and item.subject == "dlq.outbox"
    assert item.headers["Triage-Skipped-Seq"] == "2"
    assert item.headers["Triage-Tenant"] == str(tenant)
    assert item.headers["Triage-Aggregate"] == "appointment/a1"
    assert item.headers["Triage-Error"] == "PoisonEvent: bad thing"  # one line
    assert json.loads(item.payload) == {"n": 1}
    assert [i for i, _, _ in asyncio.run(_outbox(postgres_url))] == [ids[0], ids[2]]

    [letter] = asyncio.run(list_dead_letters(postgres_url))
    assert (letter.source, letter.ref, letter.attempts) == ("outbox", str(ids[1]), 1)
    assert letter.error == "PoisonEvent: bad\nthing" and letter.redriven_at is None

    redriven = asyncio.run(redrive(postgres_url, letter.id))
    new_id, seq = redriven.outbox_id, redriven.seq
    assert new_id > ids[2] and seq == 4  # appended at the end of its aggregate
    assert asyncio.run(_outbox(postgres_url))[-1] == (new_id, 4, '{"n": 1}')
    assert asyncio.run(list_dead_letters(postgres_url)) == []
    [done] = asyncio.run(list_dead_letters(postgres_url, include_redriven=True))
    assert done.redriven_at is not None
    with pytest.raises(RedriveError, match="already redriven"):
        asyncio.run(redrive(postgres_url, letter.id))
    with pytest.raises(RedriveError, match="does not exist"):
        asyncio.run(redrive(postgres_url, 999_999))
    # The redriven event can be dead-lettered again (the unique index covers pending ones only).
    assert len(asyncio.run(_move(postgres_url, [(new_id, "again")]))) == 1
