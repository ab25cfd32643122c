"""The erasure saga's database side (catalog row 15).

Asyncio units of work, one bridge crossing each (``await db.run_unit(fn, ...)``):

* :func:`request_async` -- record (or find) the erasure of a patient of a tenant.
* :func:`erase_rows_async` -- ONE tenant transaction (``triage_app``, under RLS) that
  deletes the patient's rows of every tenant data class not exempt, and returns per
  class how many went, and what the other stores must drop (idempotency keys for
  Redis, blob keys of attachments, recording files).
* :func:`erase_dead_letters_async` -- as ``triage_relay``: dead letters whose payload
  names the patient (a dead letter may have lost its tenant).
* :func:`residue_async` -- the reconciler's search of the same places: what still
  matches the patient, per class (never the values).
* :func:`record_run_async` -- the steps of one run, the receipt and its signature.
* :func:`finished_async` -- as ``triage_relay``: the erasures the reconciler re-searches.
* :func:`receipt_async` -- the stored receipt of one erasure.
* :func:`saga_key_async` -- as ``triage_relay``: the saga's key kept in
  ``erasure_keys`` (migration 0014), made from the candidate on first use.

A patient's data is found by its ``needles``: the patient id and the recipient
addresses given with the request. A JSON document (a payload, a response) matches
when it holds a needle as a whole JSON string (``"p-1"`` never matches ``"p-10"``);
an outbox row also matches by its subject (``<prefix>.<tenant>.<token>.``). Each
delete is of what matches, so a step repeated removes nothing more: idempotent.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from providers.db.tenancy import run_as_relay, run_in_tenant

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "DB_CLASSES",
    "ErasedRows",
    "ErasureRow",
    "erase_dead_letters_async",
    "erase_rows_async",
    "finished_async",
    "receipt_async",
    "record_run_async",
    "request_async",
    "residue_async",
    "saga_key_async",
]

#: The data classes held in tenant tables, in the order the saga deletes them.
DB_CLASSES = (
    "idempotency_db",
    "attachments",
    "recordings",
    "dispatches",
    "outbox",
    "virtual_sessions",
    "threads",
)

# A JSON text holds one of the needles as a whole string.
_JSON_HOLDS = (
    "EXISTS (SELECT 1 FROM unnest($2::text[]) n WHERE strpos({col}::text, to_jsonb(n)::text) > 0)"
)
_PATIENT_DISPATCH = f"(recipient = ANY($2::text[]) OR {_JSON_HOLDS.format(col='payload')})"


@dataclass(frozen=True, slots=True)
class ErasureRow:
    id: uuid.UUID
    tenant_id: uuid.UUID
    patient_id: str
    identifiers: tuple[str, ...]
    status: str
    attempts: int
    created: bool = False

    @property
    def needles(self) -> list[str]:
        return [self.patient_id, *(i for i in self.identifiers if i != self.patient_id)]


@dataclass(slots=True)
class ErasedRows:
    """What one tenant transaction removed, and what the other stores must drop."""

    counts: dict[str, int] = field(default_factory=dict)
    idempotency_keys: list[str] = field(default_factory=list)
    blob_keys: list[str] = field(default_factory=list)
    recording_files: list[str] = field(default_factory=list)


def _row(r: asyncpg.Record, *, created: bool = False) -> ErasureRow:
    identifiers = r["identifiers"]
    if isinstance(identifiers, str):
        identifiers = json.loads(identifiers)
    return ErasureRow(
        id=r["id"],
        tenant_id=r["tenant_id"],
        patient_id=r["patient_id"],
        identifiers=tuple(identifiers),
        status=r["status"],
        attempts=int(r["attempts"]),
        created=created,
    )


async def request_async(
    pool: Pool, tenant_id: uuid.UUID, patient_id: str, identifiers: Sequence[str]
) -> ErasureRow:
    """The erasure of ``patient_id`` (created, or found with its identifiers widened)."""

    async def work(conn: Connection) -> ErasureRow:
        found = await conn.fetchrow(
            "SELECT * FROM erasures WHERE tenant_id = $1 AND patient_id = $2 FOR UPDATE",
            tenant_id,
            patient_id,
        )
        if found is None:
            made = await conn.fetchrow(
                "INSERT INTO erasures (tenant_id, patient_id, identifiers)"
                " VALUES ($1, $2, $3::jsonb) RETURNING *",
                tenant_id,
                patient_id,
                json.dumps(sorted(set(identifiers))),
            )
            assert made is not None
            return _row(made, created=True)
        old = _row(found)
        wider = sorted({*old.identifiers, *identifiers})
        if wider != sorted(old.identifiers):
            found = await conn.fetchrow(
                "UPDATE erasures SET identifiers = $2::jsonb WHERE id = $1 RETURNING *",
                old.id,
                json.dumps(wider),
            )
            assert found is not None
        return _row(found)

    return await run_in_tenant(pool, tenant_id, work)


def _count(status: str) -> int:
    # asyncpg answers "DELETE 3"
    return int(status.rsplit(" ", 1)[-1])


async def erase_rows_async(
    pool: Pool,
    tenant_id: uuid.UUID,
    patient_id: str,
    needles: Sequence[str],
    subject_prefix: str,
    exempt: Sequence[str],
) -> ErasedRows:
    """Delete the patient's tenant rows of every class not in ``exempt`` (one transaction)."""
    out = ErasedRows()
    args = (patient_id, list(needles), subject_prefix)

    async def work(conn: Connection) -> ErasedRows:
        dispatch_ids = [
            str(r["id"])
            for r in await conn.fetch(
                f"SELECT id FROM dispatches WHERE {_PATIENT_DISPATCH} AND $1::text IS NOT NULL",
                *args[:2],
            )
        ]
        if "idempotency_db" not in exempt:
            keys = await conn.fetch(
                "DELETE FROM idempotency_keys k WHERE k.key IN (SELECT idempotency_key FROM"
                f" dispatches WHERE {_PATIENT_DISPATCH} AND idempotency_key IS NOT NULL)"
                f" OR {_JSON_HOLDS.format(col='k.response')}"
                " OR EXISTS (SELECT 1 FROM unnest($3::text[]) d WHERE strpos(k.response::text, d) > 0)"
                " OR $1::text IS NULL RETURNING k.key",
                patient_id,
                list(needles),
                dispatch_ids,
            )
            # Redis holds the same keys (and keys of dispatches not yet written).
            out.idempotency_keys = sorted(
                {r["key"] for r in keys}
                | {
                    r["idempotency_key"]
                    for r in await conn.fetch(
                        f"SELECT idempotency_key FROM dispatches WHERE {_PATIENT_DISPATCH}"
                        " AND idempotency_key IS NOT NULL AND $1::text IS NOT NULL",
                        *args[:2],
                    )
                }
            )
            out.counts["idempotency_db"] = len(keys)
        if "attachments" not in exempt:
            gone = await conn.fetch(
                "DELETE FROM attachments a WHERE EXISTS (SELECT 1 FROM dispatches d WHERE"
                f" {_PATIENT_DISPATCH.replace('payload', 'd.payload').replace('recipient', 'd.recipient')}"
                " AND strpos(d.payload::text, a.id::text) > 0) AND $1::text IS NOT NULL"
                " RETURNING a.blob_key",
                *args[:2],
            )
            out.blob_keys = sorted(r["blob_key"] for r in gone)
            out.counts["attachments"] = len(gone)
        sessions = await conn.fetch(
            "SELECT id::text AS id, appointment_id FROM virtual_sessions WHERE patient_id = $1",
            patient_id,
        )
        session_refs = sorted({r["id"] for r in sessions} | {r["appointment_id"] for r in sessions})
        if "recordings" not in exempt:
            gone = await conn.fetch(
                "DELETE FROM recordings WHERE session_id = ANY($1::text[])"
                " RETURNING path, stored_path",
                session_refs,
            )
            out.recording_files = sorted(
                {r["stored_path"] for r in gone if r["stored_path"]}
                | {"incoming:" + r["path"] for r in gone}
            )
            out.counts["recordings"] = len(gone)
        if "dispatches" not in exempt:
            out.counts["dispatches"] = _count(
                await conn.execute(
                    f"DELETE FROM dispatches WHERE {_PATIENT_DISPATCH} AND $1::text IS NOT NULL",
                    *args[:2],
                )
            )
        if "outbox" not in exempt:
            out.counts["outbox"] = _count(
                await conn.execute(
                    f"DELETE FROM outbox WHERE {_JSON_HOLDS.format(col='payload')}"
                    " OR starts_with(subject, $3) OR aggregate_id = ANY($2::text[])"
                    " OR $1::text IS NULL",
                    *args,
                )
            )
            # An aggregate named by the patient: its counter row names them too.
            await conn.execute(
                "DELETE FROM outbox_sequences WHERE aggregate_id = ANY($1::text[])", list(needles)
            )
        if "threads" not in exempt:
            threads = [
                r["thread_id"]
                for r in await conn.fetch(
                    "SELECT thread_id FROM fallback_threads WHERE patient_id = $1", patient_id
                )
            ]
        if "virtual_sessions" not in exempt:
            out.counts["virtual_sessions"] = _count(
                await conn.execute("DELETE FROM virtual_sessions WHERE patient_id = $1", patient_id)
            )
        if "threads" not in exempt:
            await conn.execute(
                "UPDATE virtual_sessions SET fallback_thread_id = NULL"
                " WHERE fallback_thread_id = ANY($1::uuid[])",
                threads,
            )
            n = _count(
                await conn.execute("DELETE FROM fallback_threads WHERE patient_id = $1", patient_id)
            )
            n += _count(
                await conn.execute("DELETE FROM threads WHERE id = ANY($1::uuid[])", threads)
            )
            n += _count(
                await conn.execute(
                    "DELETE FROM thread_participants WHERE participant_id = ANY($1::text[])",
                    list(needles),
                )
            )
            out.counts["threads"] = n
        return out

    return await run_in_tenant(pool, tenant_id, work)


_LETTER_HOLDS = (
    "EXISTS (SELECT 1 FROM unnest($2::text[]) n WHERE"
    " position(convert_to(to_jsonb(n)::text, 'UTF8') IN payload) > 0)"
    " OR starts_with(coalesce(subject, ''), $3)"
)


async def erase_dead_letters_async(
    pool: Pool, tenant_id: uuid.UUID, needles: Sequence[str], subject_prefix: str
) -> int:
    """Delete the dead letters naming the patient (of the tenant, or of no tenant)."""

    async def work(conn: Connection) -> int:
        return _count(
            await conn.execute(
                "DELETE FROM dead_letters WHERE (tenant_id = $1 OR tenant_id IS NULL)"
                f" AND ({_LETTER_HOLDS})",
                tenant_id,
                list(needles),
                subject_prefix,
            )
        )

    return await run_as_relay(pool, work)


async def residue_async(
    pool: Pool,
    tenant_id: uuid.UUID,
    patient_id: str,
    needles: Sequence[str],
    subject_prefix: str,
    attachment_blob_keys: Sequence[str],
) -> dict[str, int]:
    """What still matches the patient, per database class (dead letters included)."""
    found: dict[str, int] = {}

    async def tenant_side(conn: Connection) -> None:
        n2 = list(needles)
        found["dispatches"] = int(
            await conn.fetchval(
                f"SELECT count(*) FROM dispatches WHERE {_PATIENT_DISPATCH}"
                " AND $1::text IS NOT NULL",
                patient_id,
                n2,
            )
        )
        found["outbox"] = int(
            await conn.fetchval(
                f"SELECT count(*) FROM outbox WHERE {_JSON_HOLDS.format(col='payload')}"
                " OR starts_with(subject, $3) OR aggregate_id = ANY($2::text[])"
                " OR $1::text IS NULL",
                patient_id,
                n2,
                subject_prefix,
            )
        )
        found["idempotency_db"] = int(
            await conn.fetchval(
                f"SELECT count(*) FROM idempotency_keys WHERE {_JSON_HOLDS.format(col='response')}"
                " AND $1::text IS NOT NULL",
                patient_id,
                n2,
            )
        )
        found["virtual_sessions"] = int(
            await conn.fetchval(
                "SELECT count(*) FROM virtual_sessions WHERE patient_id = $1", patient_id
            )
        )
        found["threads"] = int(
            await conn.fetchval(
                "SELECT (SELECT count(*) FROM fallback_threads WHERE patient_id = $1)"
                " + (SELECT count(*) FROM thread_participants WHERE participant_id = ANY($2::text[]))",
                patient_id,
                n2,
            )
        )
        found["attachments"] = int(
            await conn.fetchval(
                "SELECT count(*) FROM attachments WHERE blob_key = ANY($1::text[])",
                list(attachment_blob_keys),
            )
        )

    async def relay_side(conn: Connection) -> None:
        found["dead_letters"] = int(
            await conn.fetchval(
                "SELECT count(*) FROM dead_letters WHERE (tenant_id = $1 OR tenant_id IS NULL)"
                f" AND ({_LETTER_HOLDS})",
                tenant_id,
                list(needles),
                subject_prefix,
            )
        )

    await run_in_tenant(pool, tenant_id, tenant_side)
    await run_as_relay(pool, relay_side)
    return found


@dataclass(frozen=True, slots=True)
class StepRecord:
    data_class: str
    status: str  # done | exempt | failed
    erased: int = 0
    detail: str = ""


async def record_run_async(
    pool: Pool,
    tenant_id: uuid.UUID,
    erasure_id: uuid.UUID,
    steps: Sequence[StepRecord],
    receipt: Mapping[str, Any],
    signature: str,
    traces: Mapping[str, Any],
    residue: int = 0,
) -> int:
    """Record one run of the saga: its steps, the receipt, the signature; the attempt number."""
    status = "partial" if any(s.status == "failed" for s in steps) else "done"

    async def work(conn: Connection) -> int:
        for s in steps:
            await conn.execute(
                "INSERT INTO erasure_steps AS e (erasure_id, tenant_id, data_class, status, erased,"
                " erased_total, detail) VALUES ($1, $2, $3, $4, $5, $5, $6)"
                " ON CONFLICT (erasure_id, data_class) DO UPDATE SET status = $4, erased = $5,"
                " erased_total = e.erased_total + $5, detail = $6, runs = e.runs + 1,"
                " updated_at = now()",
                erasure_id,
                tenant_id,
                s.data_class,
                s.status,
                s.erased,
                s.detail,
            )
        attempts = await conn.fetchval(
            "UPDATE erasures SET status = $2, attempts = attempts + 1, completed_at = now(),"
            " receipt = $3::jsonb, signature = $4, residue_found = residue_found + $5,"
            " traces = $6::jsonb WHERE id = $1 RETURNING attempts",
            erasure_id,
            status,
            json.dumps(receipt, sort_keys=True),
            signature,
            residue,
            json.dumps(traces),
        )
        return int(attempts)

    return await run_in_tenant(pool, tenant_id, work)


async def mark_reconciled_async(pool: Pool, tenant_id: uuid.UUID, erasure_id: uuid.UUID) -> None:
    async def work(conn: Connection) -> None:
        await conn.execute("UPDATE erasures SET reconciled_at = now() WHERE id = $1", erasure_id)

    await run_in_tenant(pool, tenant_id, work)


async def finished_async(pool: Pool, limit: int) -> list[ErasureRow]:
    """Erasures that ran at least once, least recently reconciled first."""

    async def work(conn: Connection) -> list[ErasureRow]:
        rows = await conn.fetch(
            "SELECT * FROM erasures WHERE attempts > 0"
            " ORDER BY reconciled_at NULLS FIRST, requested_at LIMIT $1",
            limit,
        )
        return [_row(r) for r in rows]

    return await run_as_relay(pool, work)


def _json(value: Any) -> dict[str, Any]:
    return json.loads(value) if isinstance(value, str) else dict(value)


async def receipt_async(
    pool: Pool, tenant_id: uuid.UUID, patient_id: str
) -> tuple[dict[str, Any], str, dict[str, Any]] | None:
    """The stored receipt, its signature and the traces; None when no run finished."""

    async def work(conn: Connection) -> tuple[dict[str, Any], str, dict[str, Any]] | None:
        r = await conn.fetchrow(
            "SELECT receipt, signature, traces FROM erasures"
            " WHERE tenant_id = $1 AND patient_id = $2",
            tenant_id,
            patient_id,
        )
        if r is None or r["receipt"] is None:
            return None
        return _json(r["receipt"]), r["signature"], _json(r["traces"])

    return await run_in_tenant(pool, tenant_id, work)


_KEY_NAME = "saga"


async def saga_key_async(pool: Pool, candidate: bytes) -> bytes:
    """The saga's key: the one kept in ``erasure_keys``, or ``candidate`` kept as it.

    Replicas racing on a new database agree: the loser's INSERT waits for the
    winner's commit and does nothing, its SELECT (a new snapshot) reads the winner's.
    """

    async def work(conn: Connection) -> bytes:
        await conn.execute(
            "INSERT INTO erasure_keys (name, secret) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
            _KEY_NAME,
            candidate,
        )
        secret = await conn.fetchval("SELECT secret FROM erasure_keys WHERE name = $1", _KEY_NAME)
        return bytes(secret)

    return await run_as_relay(pool, work)
