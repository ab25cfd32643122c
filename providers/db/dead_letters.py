"""Dead letters of the outbox (catalog row 9): quarantine, DLQ message, list and redrive.

An outbox event the relay gives up on -- the stream refused it for good, it
cannot be turned into a message (schema drift), it failed ``max_attempts``
publishes, or it crashed the relay on its own -- is *dead-lettered* in the
relay's unit of work (``SET LOCAL ROLE triage_relay``), all in one transaction:

1. a ``dead_letters`` row (``source = 'outbox'``, ``ref`` = the outbox id, the
   payload as bytes, the error, ``attempts``; ``headers`` keeps what a redrive
   needs: ``aggregate_type``, ``aggregate_id``, the skipped ``seq`` and the
   event's own ``headers``);
2. a message on the DLQ subject (``[relay] dlq_subject``, ``Nats-Msg-Id`` =
   ``dlq-outbox-<outbox id>``) whose headers name the tenant, aggregate, skipped
   seq and error, its body the payload (cut to the connection's max payload);
3. the outbox row is deleted.

If the DLQ publish fails, the transaction rolls back: the event stays in the
outbox and nothing is half-done.

**Redaction at the source** (catalog row 11): given ``redact`` (the relay passes
:meth:`actors.phi_rules.PhiRules.redact_bytes`), each payload is read from the
outbox row, redacted in Python and only then written to ``dead_letters`` and the
DLQ message; the error text is redacted too. A PHI value never reaches either.

Order per aggregate: the later events of the aggregate go on (the aggregate is
not blocked behind a poison event). A consumer sees a gap in ``Triage-Seq``;
the DLQ message and the dead letter say which seq was skipped. A redrive
appends the event again at the end of its aggregate (a new outbox id and a new,
higher seq): it is delivered after the events that went on meanwhile.

``triage dlq list`` / ``triage dlq redrive ID`` (see :func:`list_dead_letters`,
:func:`redrive`) run with the owner/admin URL (the ``migrate`` URL): a superuser
sees every dead letter; any other role runs the statements as ``triage_relay``
(it must be a member), which sees every tenant's dead letters and may re-insert
outbox events. A recording's dead letter (row 20, ``source = 'recording'``) is
redriven by putting the recording back to ``pending`` with a fresh retry budget
(as its tenant); the ingest claims it at its next resume.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from engine.errors import TriageError
from providers.db.recordings import DLQ_SOURCE as RECORDING_DLQ_SOURCE
from providers.jetstream import PublishItem

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

__all__ = [
    "DLQ_MSG_ID_PREFIX",
    "SOURCE_OUTBOX",
    "DeadLetter",
    "DlqPublish",
    "Redact",
    "RedriveError",
    "Redriven",
    "dead_letter_async",
    "dlq_items",
    "list_dead_letters",
    "redrive",
]

SOURCE_OUTBOX = "outbox"
SOURCE_RECORDING = RECORDING_DLQ_SOURCE  # row 20's dead letters (providers.db.recordings)
DLQ_MSG_ID_PREFIX = "dlq-outbox-"

HEADER_DEAD_LETTER = "Triage-Dead-Letter"
HEADER_SOURCE = "Triage-Source"
HEADER_REF = "Triage-Ref"
HEADER_ERROR = "Triage-Error"
HEADER_SKIPPED_SEQ = "Triage-Skipped-Seq"
HEADER_TRUNCATED = "Triage-Truncated"

#: ``publish(items)``: publish the DLQ messages; raise if any was not acknowledged.
DlqPublish: TypeAlias = Callable[[Sequence[PublishItem]], Awaitable[None]]
#: ``redact(payload)``: the payload with every PHI value replaced (row 11).
Redact: TypeAlias = Callable[[bytes], bytes]

_DEAD_LETTER = """
WITH moved AS (
    INSERT INTO dead_letters (tenant_id, source, ref, subject, payload, headers, error, attempts)
    SELECT o.tenant_id, 'outbox', o.id::text, o.subject, convert_to(o.payload::text, 'UTF8'),
           jsonb_build_object('aggregate_type', o.aggregate_type, 'aggregate_id', o.aggregate_id,
                              'seq', o.seq, 'headers', o.headers),
           f.error, o.attempts + 1
    FROM outbox AS o JOIN unnest($1::bigint[], $2::text[]) AS f(id, error) ON o.id = f.id
    ON CONFLICT (source, ref) WHERE redriven_at IS NULL DO NOTHING
    RETURNING id, tenant_id, ref, payload, headers::text AS headers, error
)
SELECT * FROM moved ORDER BY ref::bigint
"""

# The same move with the payloads (and errors) given, redacted by the caller.
_DEAD_LETTER_GIVEN = """
WITH moved AS (
    INSERT INTO dead_letters (tenant_id, source, ref, subject, payload, headers, error, attempts)
    SELECT o.tenant_id, 'outbox', o.id::text, o.subject, f.payload,
           jsonb_build_object('aggregate_type', o.aggregate_type, 'aggregate_id', o.aggregate_id,
                              'seq', o.seq, 'headers', o.headers),
           f.error, o.attempts + 1
    FROM outbox AS o
    JOIN unnest($1::bigint[], $2::text[], $3::bytea[]) AS f(id, error, payload) ON o.id = f.id
    ON CONFLICT (source, ref) WHERE redriven_at IS NULL DO NOTHING
    RETURNING id, tenant_id, ref, payload, headers::text AS headers, error
)
SELECT * FROM moved ORDER BY ref::bigint
"""

_PAYLOADS = "SELECT id, convert_to(payload::text, 'UTF8') AS payload FROM outbox WHERE id = ANY($1)"

_DELETE = "DELETE FROM outbox WHERE id = ANY($1::bigint[])"

_LIST = """
SELECT id, tenant_id, source, ref, subject, error, attempts, created_at, redriven_at
FROM dead_letters WHERE ($1 OR redriven_at IS NULL) ORDER BY id
"""

_LOCK_LETTER = """
SELECT id, tenant_id, source, ref, subject, convert_from(payload, 'UTF8') AS payload,
       headers::text AS headers, redriven_at
FROM dead_letters WHERE id = $1 FOR UPDATE
"""

_REINSERT = """
INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject, payload, headers)
VALUES ($1, $2, $3, 1, $4, $5::jsonb, $6::jsonb)
RETURNING id, seq
"""

_MARK_REDRIVEN = "UPDATE dead_letters SET redriven_at = clock_timestamp() WHERE id = $1"

_RECORDING_PENDING_AGAIN = """
UPDATE recordings SET status = 'pending', attempts = 0, last_error = NULL,
    claimed_until = NULL, updated_at = now()
WHERE tenant_id = $1 AND recording_id = $2 AND status = 'failed'
RETURNING status
"""
_RECORDING_STATUS = "SELECT status FROM recordings WHERE tenant_id = $1 AND recording_id = $2"

_IS_SUPERUSER = "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user"


@dataclass(frozen=True, slots=True)
class Redriven:
    """What a redrive did: ``what`` in words; for an outbox event its new id and seq."""

    letter_id: int
    what: str
    outbox_id: int | None = None
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A row of ``dead_letters`` as ``triage dlq list`` shows it."""

    id: int
    tenant_id: str | None
    source: str
    ref: str
    subject: str | None
    error: str
    attempts: int
    created_at: datetime
    redriven_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant_id": self.tenant_id,
            "source": self.source,
            "ref": self.ref,
            "subject": self.subject,
            "error": self.error,
            "attempts": self.attempts,
            "created_at": self.created_at.isoformat(),
            "redriven_at": None if self.redriven_at is None else self.redriven_at.isoformat(),
        }


class RedriveError(TriageError):
    """A redrive refused: no such dead letter, already redriven, or not an outbox event."""


def _header_value(text: str, limit: int = 512) -> str:
    """A NATS header value: one line, bounded."""
    return " ".join(text.split())[:limit]


def dlq_items(
    records: Sequence[asyncpg.Record], dlq_subject: str, max_payload: int
) -> list[PublishItem]:
    """The DLQ messages of freshly inserted dead letters (see the module docstring)."""
    items = []
    for record in records:
        meta = json.loads(record["headers"])
        headers = {
            HEADER_DEAD_LETTER: str(record["id"]),
            HEADER_SOURCE: SOURCE_OUTBOX,
            HEADER_REF: str(record["ref"]),
            "Triage-Tenant": str(record["tenant_id"]),
            "Triage-Aggregate": _header_value(f"{meta['aggregate_type']}/{meta['aggregate_id']}"),
            HEADER_SKIPPED_SEQ: str(meta["seq"]),
            HEADER_ERROR: _header_value(str(record["error"])),
        }
        payload = bytes(record["payload"])
        budget = max(0, max_payload - 4096)  # room for the headers
        if len(payload) > budget:
            headers[HEADER_TRUNCATED] = f"{len(payload)} bytes, kept in dead_letters"
            payload = payload[:budget]
        items.append(
            PublishItem(
                msg_id=f"{DLQ_MSG_ID_PREFIX}{record['ref']}",
                subject=dlq_subject,
                payload=payload,
                headers=headers,
            )
        )
    return items


async def dead_letter_async(
    conn: Connection,
    failures: Sequence[tuple[int, str]],
    publish: DlqPublish,
    dlq_subject: str,
    max_payload: int,
    redact: Redact | None = None,
) -> int:
    """Inside a relay transaction: move ``(outbox id, error)`` to dead_letters + DLQ; delete them.

    With ``redact``, payloads and errors are redacted before they are written (module
    docstring). Returns the number of events dead-lettered. Raises (and the caller's
    transaction rolls back) if the DLQ publish fails.
    """
    if not failures:
        return 0
    ids = [i for i, _ in failures]
    errors = [e[:2000] for _, e in failures]
    if redact is None:
        records = await conn.fetch(_DEAD_LETTER, ids, errors)
    else:
        payloads = {
            int(r["id"]): redact(bytes(r["payload"])) for r in await conn.fetch(_PAYLOADS, ids)
        }
        given = [i for i in ids if i in payloads]
        records = await conn.fetch(
            _DEAD_LETTER_GIVEN,
            given,
            [
                redact(e.encode()).decode("utf-8", "replace")
                for i, e in zip(ids, errors, strict=True)
                if i in payloads
            ],
            [payloads[i] for i in given],
        )
    if records:
        await publish(dlq_items(records, dlq_subject, max_payload))
    await conn.execute(_DELETE, ids)
    return len(ids)


async def _as_relay_unless_superuser(conn: Connection) -> None:
    if not await conn.fetchval(_IS_SUPERUSER):
        await conn.execute("SET LOCAL ROLE triage_relay")


def _letter(record: asyncpg.Record) -> DeadLetter:
    tenant = record["tenant_id"]
    return DeadLetter(
        id=int(record["id"]),
        tenant_id=None if tenant is None else str(tenant),
        source=record["source"],
        ref=record["ref"],
        subject=record["subject"],
        error=record["error"],
        attempts=int(record["attempts"]),
        created_at=record["created_at"],
        redriven_at=record["redriven_at"],
    )


async def list_dead_letters(url: str, *, include_redriven: bool = False) -> list[DeadLetter]:
    """asyncio side: the dead letters (pending only unless ``include_redriven``), by id."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction(readonly=True):
            await _as_relay_unless_superuser(conn)
            return [_letter(r) for r in await conn.fetch(_LIST, include_redriven)]
    finally:
        await conn.close()


async def redrive(url: str, letter_id: int) -> Redriven:
    """asyncio side: redrive dead letter ``letter_id``; what was done.

    An outbox event is re-inserted into the outbox: same tenant, aggregate, subject,
    payload and headers; a new outbox id and the aggregate's next seq. A recording's
    letter (row 20) puts the recording back to ``pending`` with a fresh retry budget.
    The dead letter is marked redriven in the same transaction. Raises
    :class:`RedriveError` when it cannot be redriven.
    """
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await _as_relay_unless_superuser(conn)
            record = await conn.fetchrow(_LOCK_LETTER, letter_id)
            if record is None:
                raise RedriveError(f"dead letter {letter_id} does not exist")
            if record["redriven_at"] is not None:
                raise RedriveError(
                    f"dead letter {letter_id} was already redriven at {record['redriven_at']}"
                )
            if record["source"] == SOURCE_RECORDING and record["tenant_id"] is not None:
                return await _redrive_recording(conn, letter_id, record)
            if record["source"] != SOURCE_OUTBOX or record["tenant_id"] is None:
                raise RedriveError(
                    f"dead letter {letter_id} comes from {record['source']!r}: only outbox events"
                    " and recordings can be redriven"
                )
            meta = json.loads(record["headers"])
            try:
                json.loads(record["payload"])
            except ValueError as exc:
                raise RedriveError(f"dead letter {letter_id}: payload is not JSON ({exc})") from exc
            row = await conn.fetchrow(
                _REINSERT,
                record["tenant_id"],
                meta["aggregate_type"],
                meta["aggregate_id"],
                record["subject"],
                record["payload"],
                json.dumps(meta.get("headers", {})),
            )
            assert row is not None
            await conn.execute(_MARK_REDRIVEN, letter_id)
            return Redriven(
                letter_id, f"outbox event {row['id']} (seq {row['seq']} of its aggregate)",
                outbox_id=int(row["id"]), seq=int(row["seq"]),
            )  # fmt: skip
    finally:
        await conn.close()


async def _redrive_recording(conn: Connection, letter_id: int, record: asyncpg.Record) -> Redriven:
    """A recording's dead letter: its row back to ``pending`` with a fresh budget (the
    ingest claims it at its next resume), in the letter's transaction. The row is
    moved as its tenant (``triage_app``), the letter marked as the relay."""
    tenant = record["tenant_id"]
    recording = str(record["ref"]).partition("/")[2]
    superuser = bool(await conn.fetchval(_IS_SUPERUSER))
    if not superuser:
        await conn.execute("SET LOCAL ROLE triage_app")
    await conn.execute("SELECT set_config('triage.tenant_id', $1, true)", str(tenant))
    status = await conn.fetchval(_RECORDING_PENDING_AGAIN, tenant, recording)
    if status is None:
        now = await conn.fetchval(_RECORDING_STATUS, tenant, recording)
        raise RedriveError(
            f"dead letter {letter_id}: recording {recording} of tenant {tenant} is"
            f" {'gone' if now is None else now}, not failed: nothing to ingest again"
        )
    if not superuser:
        await conn.execute("SET LOCAL ROLE triage_relay")
    await conn.execute(_MARK_REDRIVEN, letter_id)
    return Redriven(letter_id, f"recording {recording} pending again (ingested at the next resume)")
