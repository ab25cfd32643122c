"""Recording ingests in PostgreSQL (row 20): the ``recordings`` rows (asyncio units of work).

* :func:`register` -- a recording to ingest, ``pending``, in its tenant's
  transaction; registering it again changes nothing (unique tenant + recording id);
* :func:`claim_pending` -- as ``triage_relay`` (every tenant): pending rows whose
  lease is free, oldest first, leased for ``lease_s`` (``FOR UPDATE SKIP LOCKED``:
  two replicas never claim one row);
* :func:`mark_ingested` -- pending -> ingested (size, sha256, where it is stored);
* :func:`mark_failed` -- pending -> failed, and in the SAME tenant transaction the
  ``recording.failed`` event in the outbox and the dead letter (source
  ``'recording'``, ref ``<tenant>/<recording id>``). Only a pending row moves, so a
  second call (a replica that also worked on it) writes nothing twice.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from providers.db.tenancy import run_as_relay, run_in_tenant

if TYPE_CHECKING:
    import asyncpg

    from providers.db.tenancy import Connection

    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "AGGREGATE",
    "DLQ_SOURCE",
    "PendingRecording",
    "claim_pending",
    "mark_failed",
    "mark_ingested",
    "register",
]

AGGREGATE = "recording"
DLQ_SOURCE = "recording"


@dataclass(frozen=True, slots=True)
class PendingRecording:
    tenant_id: uuid.UUID
    recording_id: str
    session_id: str | None
    path: str
    attempts: int


_REGISTER = """
INSERT INTO recordings (tenant_id, recording_id, session_id, path)
VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant_id, recording_id) DO NOTHING
RETURNING 1
"""


async def _register(conn: Connection, item: PendingRecording) -> bool:
    inserted = await conn.fetchval(
        _REGISTER, item.tenant_id, item.recording_id, item.session_id, item.path
    )
    return inserted is not None


async def register(pool: Pool, item: PendingRecording) -> bool:
    """asyncio side: the pending row; True if it is new."""
    return await run_in_tenant(pool, item.tenant_id, _register, item)


_CLAIM = """
UPDATE recordings AS r SET claimed_until = clock_timestamp() + make_interval(secs => $2)
FROM (
    SELECT tenant_id, recording_id FROM recordings
    WHERE status = 'pending' AND (claimed_until IS NULL OR claimed_until < clock_timestamp())
    ORDER BY created_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
) AS free
WHERE r.tenant_id = free.tenant_id AND r.recording_id = free.recording_id
RETURNING r.tenant_id, r.recording_id, r.session_id, r.path, r.attempts
"""


async def _claim(conn: Connection, limit: int, lease_s: float) -> list[PendingRecording]:
    rows = await conn.fetch(_CLAIM, limit, lease_s)
    return [
        PendingRecording(
            tenant_id=r["tenant_id"],
            recording_id=r["recording_id"],
            session_id=r["session_id"],
            path=r["path"],
            attempts=r["attempts"],
        )
        for r in rows
    ]


async def claim_pending(pool: Pool, limit: int, lease_s: float) -> list[PendingRecording]:
    """asyncio side: up to ``limit`` free pending recordings, leased for ``lease_s``."""
    if limit < 1:
        return []
    return await run_as_relay(pool, _claim, limit, lease_s)


_INGESTED = """
UPDATE recordings
SET status = 'ingested', attempts = attempts + $3, size_bytes = $4, sha256 = $5,
    stored_path = $6, last_error = NULL, claimed_until = NULL, updated_at = now()
WHERE tenant_id = $1 AND recording_id = $2 AND status = 'pending'
RETURNING 1
"""


async def _ingested(
    conn: Connection, item: PendingRecording, attempts: int, size: int, sha256: str, stored: str
) -> bool:
    moved = await conn.fetchval(
        _INGESTED, item.tenant_id, item.recording_id, attempts, size, sha256, stored
    )
    return moved is not None


async def mark_ingested(
    pool: Pool, item: PendingRecording, attempts: int, size: int, sha256: str, stored: str
) -> bool:
    """asyncio side: pending -> ingested; False if the row was not pending any more."""
    return await run_in_tenant(
        pool, item.tenant_id, _ingested, item, attempts, size, sha256, stored
    )


_FAILED = """
UPDATE recordings
SET status = 'failed', attempts = attempts + $3, last_error = $4, claimed_until = NULL,
    updated_at = now()
WHERE tenant_id = $1 AND recording_id = $2 AND status = 'pending'
RETURNING attempts
"""
_EVENT = """
INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject, payload)
VALUES ($1, $2, $3, 1, $4, $5::jsonb)
"""
_DEAD_LETTER = """
INSERT INTO dead_letters (tenant_id, source, ref, subject, payload, headers, error, attempts)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)
ON CONFLICT (source, ref) WHERE redriven_at IS NULL DO NOTHING
"""


async def _failed(
    conn: Connection, item: PendingRecording, attempts: int, error: str, subject: str
) -> bool:
    total = await conn.fetchval(_FAILED, item.tenant_id, item.recording_id, attempts, error)
    if total is None:
        return False
    payload = {
        "kind": "recording.failed",
        "tenant_id": str(item.tenant_id),
        "recording_id": item.recording_id,
        "session_id": item.session_id,
        "path": item.path,
        "reason": error,
        "attempts": int(total),
    }
    body = json.dumps(payload)
    await conn.execute(_EVENT, item.tenant_id, AGGREGATE, item.recording_id, subject, body)
    await conn.execute(
        _DEAD_LETTER, item.tenant_id, DLQ_SOURCE, f"{item.tenant_id}/{item.recording_id}",
        subject, body.encode(), json.dumps({"path": item.path}), error, int(total),
    )  # fmt: skip
    return True


async def mark_failed(
    pool: Pool, item: PendingRecording, attempts: int, error: str, subject: str
) -> bool:
    """asyncio side: pending -> failed with its event and dead letter; False if the row
    was not pending any more (nothing written)."""
    return await run_in_tenant(pool, item.tenant_id, _failed, item, attempts, error, subject)
