"""Attachment rows and their scan state (migration 0006), asyncio side of the bridge.

Each function is one unit of work, crossed with one :func:`providers.bridge.run`:

* :func:`insert_attachment` -- as the tenant: the row of a stored upload, ``pending``;
  ``False`` when the id is taken (a second upload to the same pre-signed URL);
* :func:`record_scans` -- per result, as its tenant: ``clean`` / ``infected`` (with the
  signature) / ``failed`` (with the error), or one more failed attempt on a row that
  stays ``pending``; only a pending row moves (a result for a row already final
  changes nothing and says so);
* :func:`get_attachment` -- as the tenant: the row, or None (another tenant's
  row is invisible, so it is None too);
* :func:`pending_attachments` -- as ``triage_relay``: the pending rows of every
  tenant, oldest first (the scanner pool's queue after a restart).
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

import asyncpg
import msgspec

from providers.db.tenancy import run_as_relay, run_in_tenant

if TYPE_CHECKING:
    from providers.db.tenancy import Connection

    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "AttachmentRow",
    "AttachmentStatus",
    "NewAttachment",
    "PendingScan",
    "ScanRecord",
    "get_attachment",
    "insert_attachment",
    "pending_attachments",
    "record_scans",
]


class AttachmentStatus(enum.StrEnum):
    PENDING = "pending"
    CLEAN = "clean"
    INFECTED = "infected"
    FAILED = "failed"


class NewAttachment(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    tenant_id: uuid.UUID
    blob_key: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str


class AttachmentRow(msgspec.Struct, frozen=True, kw_only=True):
    id: uuid.UUID
    tenant_id: uuid.UUID
    blob_key: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    status: AttachmentStatus
    signature: str | None
    scan_attempts: int
    last_error: str | None
    created_at: dt.datetime
    scanned_at: dt.datetime | None


class PendingScan(msgspec.Struct, frozen=True, kw_only=True):
    """An attachment waiting for its scan: what the scanner pool needs to scan it."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    blob_key: str
    size_bytes: int
    #: Failed attempts so far (``scan_attempts``): a restarted pool keeps the budget.
    attempts: int = 0


class ScanRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A scan result to write: ``status`` final, or PENDING for one more failed attempt."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    status: AttachmentStatus
    signature: str | None = None
    error: str | None = None


_INSERT = """
INSERT INTO attachments (id, tenant_id, blob_key, filename, content_type, size_bytes, sha256)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (id) DO NOTHING
"""

_FINAL = """
UPDATE attachments
SET status = $2, signature = $3, last_error = coalesce($4, last_error),
    scan_attempts = scan_attempts + CASE WHEN $4::text IS NULL THEN 0 ELSE 1 END,
    scanned_at = now()
WHERE id = $1 AND status = 'pending'
"""

_ATTEMPT = """
UPDATE attachments SET scan_attempts = scan_attempts + 1, last_error = $2
WHERE id = $1 AND status = 'pending'
"""

_SELECT = """
SELECT id, tenant_id, blob_key, filename, content_type, size_bytes, sha256, status, signature,
       scan_attempts, last_error, created_at, scanned_at
FROM attachments WHERE id = $1
"""

_PENDING = """
SELECT id, tenant_id, blob_key, size_bytes, scan_attempts AS attempts FROM attachments
WHERE status = 'pending' ORDER BY created_at, id LIMIT $1
"""


async def _insert(conn: Connection, row: NewAttachment) -> bool:
    status = await conn.execute(
        _INSERT, row.id, row.tenant_id, row.blob_key, row.filename, row.content_type,
        row.size_bytes, row.sha256,
    )  # fmt: skip
    return bool(status.endswith(" 1"))


async def insert_attachment(pool: Pool, row: NewAttachment) -> bool:
    """The pending row of a stored upload; False if the id already has one."""
    return await run_in_tenant(pool, row.tenant_id, _insert, row)


async def _record(conn: Connection, record: ScanRecord) -> bool:
    if record.status is AttachmentStatus.PENDING:
        status = await conn.execute(_ATTEMPT, record.id, record.error or "")
    else:
        status = await conn.execute(
            _FINAL, record.id, record.status.value, record.signature, record.error
        )
    return bool(status.endswith(" 1"))


async def record_scans(pool: Pool, records: Sequence[ScanRecord]) -> list[bool | Exception]:
    """Each record in its own transaction as its tenant: True if the row moved, False if
    it was no longer pending (or not there), or the exception that record raised."""
    results: list[bool | Exception] = []
    for record in records:
        try:
            results.append(await run_in_tenant(pool, record.tenant_id, _record, record))
        except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as exc:
            results.append(exc)
    return results


async def _get(conn: Connection, attachment_id: uuid.UUID) -> AttachmentRow | None:
    row = await conn.fetchrow(_SELECT, attachment_id)
    if row is None:
        return None
    return AttachmentRow(**{**dict(row), "status": AttachmentStatus(row["status"])})


async def get_attachment(
    pool: Pool, tenant_id: uuid.UUID, attachment_id: uuid.UUID
) -> AttachmentRow | None:
    """The tenant's attachment, or None (absent, or another tenant's)."""
    return await run_in_tenant(pool, tenant_id, _get, attachment_id)


async def _pending(conn: Connection, limit: int) -> list[PendingScan]:
    rows = await conn.fetch(_PENDING, limit)
    return [PendingScan(**dict(r)) for r in rows]


async def pending_attachments(pool: Pool, limit: int) -> list[PendingScan]:
    """The oldest ``limit`` pending attachments of every tenant (as triage_relay)."""
    return await run_as_relay(pool, _pending, limit)
