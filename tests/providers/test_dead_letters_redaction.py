"""Dead letters are redacted before they are written (row 11): the table and the DLQ message."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

import asyncpg

from actors.phi_rules import phi_rules
from config.schema import PhiConfig
from providers.db.dead_letters import dead_letter_async, redrive
from providers.db.migrate import migrate_async
from providers.jetstream import PublishItem

RULES = phi_rules(PhiConfig(fields=["diagnosis"], patterns={"ssn": r"\b\d{3}-\d{2}-\d{4}\b"}))
EVENT = {"kind": "note", "diagnosis": "asthma", "text": "ssn 123-45-6789", "n": 1}


async def _scenario(url: str) -> tuple[list[PublishItem], list[asyncpg.Record], int]:
    await migrate_async(url)
    conn = await asyncpg.connect(url)
    try:
        tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('t') RETURNING id")
        outbox_id = await conn.fetchval(
            "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject, payload)"
            " VALUES ($1, 'note', 'n1', 1, 'ev.note', $2::jsonb) RETURNING id",
            tenant,
            json.dumps(EVENT),
        )
        sent: list[PublishItem] = []

        async def publish(items: Sequence[PublishItem]) -> None:
            sent.extend(items)

        async with conn.transaction():
            await conn.execute("SET LOCAL ROLE triage_relay")
            moved = await dead_letter_async(
                conn, [(outbox_id, "refused: 123-45-6789")], publish, "dlq.outbox", 1 << 20,
                RULES.redact_bytes,
            )  # fmt: skip
        rows = await conn.fetch(
            "SELECT id, convert_from(payload, 'UTF8') AS payload, error FROM dead_letters"
        )
        return sent, list(rows), moved
    finally:
        await conn.close()


def test_a_phi_value_never_reaches_the_table_or_the_dlq(postgres_url: str) -> None:
    sent, rows, moved = asyncio.run(_scenario(postgres_url))
    assert moved == 1
    [row] = rows
    for text in (row["payload"], row["error"], sent[0].payload.decode(), str(sent[0].headers)):
        assert "asthma" not in text and "123-45-6789" not in text
    assert json.loads(row["payload"]) == {
        "kind": "note", "diagnosis": "[redacted]", "text": "ssn [redacted]", "n": 1,
    }  # fmt: skip
    assert row["error"] == "refused: [redacted]"
    # Still JSON: the redacted letter can be redriven.
    redriven = asyncio.run(redrive(postgres_url, int(row["id"])))
    new_id, seq = redriven.outbox_id, redriven.seq
    assert new_id > 0 and seq == 2
