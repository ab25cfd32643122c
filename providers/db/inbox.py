"""The scheduling-event inbox (row 18): effect and inbox row in one transaction (asyncio side).

A scheduling event ("appointment booked") arrives from JetStream at least once.
Its unit of work, in ONE transaction as the event's tenant (the daemon role,
row-level security on)::

    INSERT INTO inbox (tenant_id, appointment_id, ...) ON CONFLICT DO NOTHING
    -- inserted: apply the effect; conflict: a redelivery, change nothing
    INSERT INTO threads (tenant_id, topic) VALUES ($1, 'appointment:<id>')

The effect is the appointment's session thread: one ``threads`` row whose topic
is ``appointment:<appointment_id>`` (the catalog's impact for row 18 is
"duplicate sessions"), and its virtual session (``virtual_sessions``, pending until
the Jitsi pool places it: rows 4, 14). The inbox primary key (tenant_id, appointment_id) is the
truth: a redelivered or republished event finds the row and commits nothing, so
however often JetStream delivers it there is exactly one inbox row and one
thread per appointment. Because both inserts share the transaction, a crash
between them leaves neither, and the redelivery applies both.

:func:`apply_batch` runs every event of a fetched batch, each in its own
transaction, in one bridge crossing; it returns per event whether it was new or
the exception it raised (the caller decides ack, nak or dead letter).
:func:`dead_letter_batch` stores poison or exhausted events in ``dead_letters``
(source ``'inbox'``) as ``triage_relay`` (a garbage body may name no tenant).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Literal

import asyncpg
import msgspec

from providers.bridge import translate_error
from providers.db.tenancy import run_as_relay, run_in_tenant
from providers.db.virtual_sessions import insert_session

if TYPE_CHECKING:
    from providers.db.tenancy import Connection

    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "DLQ_SOURCE",
    "INBOX_SOURCE",
    "DeadLetter",
    "InboxItem",
    "SchedulingEvent",
    "apply_batch",
    "apply_event",
    "dead_letter_batch",
    "session_topic",
]

INBOX_SOURCE = "jetstream"  # inbox.source: where the event came from
DLQ_SOURCE = "inbox"  # dead_letters.source for the inbox consumer


class SchedulingEvent(msgspec.Struct, frozen=True, kw_only=True):
    """The body of a scheduling event (JSON). Unknown fields are ignored."""

    tenant_id: uuid.UUID
    appointment_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    kind: Literal["appointment.booked"]
    starts_at: dt.datetime | None = None
    #: who the visit is for (rows 4, 14 key fallback threads per patient and day)
    patient_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None


def session_topic(appointment_id: str) -> str:
    """The topic of the session thread the inbox creates for an appointment."""
    return f"appointment:{appointment_id}"


@dataclass(frozen=True, slots=True)
class InboxItem:
    """An event to apply, with where it came from (kept on the inbox row)."""

    event: SchedulingEvent
    message_key: str | None = None  # Nats-Msg-Id, or the stream sequence
    subject: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event the inbox gives up on; ``ref`` is unique while it waits (stream:seq)."""

    ref: str
    payload: bytes
    error: str
    attempts: int
    tenant_id: uuid.UUID | None = None
    subject: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


_INSERT_INBOX = """
INSERT INTO inbox (tenant_id, appointment_id, source, message_key, subject)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (tenant_id, appointment_id) DO NOTHING
RETURNING 1
"""
_INSERT_SESSION = "INSERT INTO threads (tenant_id, topic) VALUES ($1, $2)"
_INSERT_DEAD_LETTER = """
INSERT INTO dead_letters (tenant_id, source, ref, subject, payload, headers, error, attempts)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8)
ON CONFLICT (source, ref) WHERE redriven_at IS NULL DO NOTHING
"""


async def _record(conn: Connection, item: InboxItem) -> bool:
    event = item.event
    inserted = await conn.fetchval(
        _INSERT_INBOX,
        event.tenant_id,
        event.appointment_id,
        INBOX_SOURCE,
        item.message_key,
        item.subject,
    )
    if inserted is None:
        return False  # seen before: the effect is already committed
    await conn.execute(_INSERT_SESSION, event.tenant_id, session_topic(event.appointment_id))
    await insert_session(
        conn, event.tenant_id, event.appointment_id, event.patient_id, event.starts_at
    )
    return True


async def apply_event(pool: Pool, item: InboxItem) -> bool:
    """asyncio side: inbox row + effect in one tenant transaction; True if the event was new."""
    return await run_in_tenant(pool, item.event.tenant_id, _record, item)


async def apply_batch(pool: Pool, items: Sequence[InboxItem]) -> list[bool | Exception]:
    """asyncio side: :func:`apply_event` for each item, in order; one result per item.

    A result is True (new: committed), False (a duplicate: nothing changed) or
    the exception the item raised. After a connection-level failure the rest of
    the batch is not attempted and gets the same exception.
    """
    results: list[bool | Exception] = []
    for index, item in enumerate(items):
        try:
            results.append(await apply_event(pool, item))
        except Exception as exc:
            if translate_error(exc, service="postgres") is None:
                results.append(exc)  # this event's own problem (e.g. an unknown tenant)
                continue
            results.extend([exc] * (len(items) - index))
            break
    return results


async def _dead_letter(conn: Connection, letter: DeadLetter) -> None:
    args = (
        DLQ_SOURCE,
        letter.ref,
        letter.subject,
        letter.payload,
        json.dumps(letter.headers),
        letter.error,
        letter.attempts,
    )
    if letter.tenant_id is not None:
        try:
            async with conn.transaction():  # a savepoint: an unknown tenant falls back to NULL
                await conn.execute(_INSERT_DEAD_LETTER, letter.tenant_id, *args)
            return
        except asyncpg.ForeignKeyViolationError:
            pass
    await conn.execute(_INSERT_DEAD_LETTER, None, *args)


async def _dead_letters(conn: Connection, letters: Sequence[DeadLetter]) -> int:
    for letter in letters:
        await _dead_letter(conn, letter)
    return len(letters)


async def dead_letter_batch(pool: Pool, letters: Sequence[DeadLetter]) -> int:
    """asyncio side: store ``letters`` in one transaction as ``triage_relay``; a ref already
    waiting is left as it is. Returns how many were handled."""
    if not letters:
        return 0
    return await run_as_relay(pool, _dead_letters, letters)
