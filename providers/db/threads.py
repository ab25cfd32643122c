"""Threads, their participants and read receipts: units of work on the asyncio side (rows 12, 16).

Each function is one unit of work for one crossing of the bridge
(``pool.run_unit(fn, ...)``): a connection from the pool, one
:func:`~providers.db.tenancy.tenant_transaction` for the caller's tenant, the
statements. Row-level security decides what is visible and what may be written;
nothing here checks tenants itself -- that is the application check of
:mod:`actors.thread_service`, which runs before these are called.

``insert_participant`` writes the row it is given, tenant included: a caller that
got the tenants wrong (the bug of catalog row 12) is refused by the database
(:data:`RLS_REFUSED`, or :data:`FK_REFUSED` for a role outside RLS), and the
error comes back as asyncpg raised it. :func:`refusal_sqlstate` names those.

Read receipts take their time from the database (``clock_timestamp()``, set by
the trigger of migration 0011): the host's clock is never sent.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import msgspec

from providers.db.tenancy import tenant_transaction

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "ADDED",
    "CHECK_REFUSED",
    "FK_REFUSED",
    "NO_THREAD",
    "PRESENT",
    "REFUSALS",
    "RLS_REFUSED",
    "ParticipantRow",
    "ReceiptRow",
    "create_thread",
    "database_clock",
    "insert_participant",
    "list_participants",
    "list_receipts",
    "record_receipt",
    "refusal_sqlstate",
    "thread_tenant",
]

#: insufficient_privilege: "new row violates row-level security policy".
RLS_REFUSED = "42501"
#: foreign_key_violation: the participant's (thread, tenant) is no thread's.
FK_REFUSED = "23503"
#: check_violation.
CHECK_REFUSED = "23514"
#: The SQLSTATEs that mean "the database refused a cross-tenant write".
REFUSALS = frozenset({RLS_REFUSED, FK_REFUSED, CHECK_REFUSED})


class ParticipantRow(msgspec.Struct, frozen=True, kw_only=True):
    thread_id: uuid.UUID
    tenant_id: uuid.UUID
    participant_id: str
    role: str
    joined_at: dt.datetime


class ReceiptRow(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    thread_id: uuid.UUID
    participant_id: str
    read_at: dt.datetime  # the database's clock


def refusal_sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of ``exc`` if it is the database refusing a cross-tenant write."""
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(exc, asyncpg.PostgresError) and state in REFUSALS else None


async def create_thread(pool: Pool, tenant_id: uuid.UUID, topic: str | None) -> uuid.UUID:
    async with pool.acquire() as conn, tenant_transaction(conn, tenant_id):
        thread: uuid.UUID = await conn.fetchval(
            "INSERT INTO threads (tenant_id, topic) VALUES ($1, $2) RETURNING id", tenant_id, topic
        )
        return thread


async def thread_tenant(pool: Pool, tenant_id: uuid.UUID, thread_id: uuid.UUID) -> uuid.UUID | None:
    """The thread's tenant as ``tenant_id`` sees it: None when RLS hides it or it is gone."""
    async with pool.acquire() as conn, tenant_transaction(conn, tenant_id, readonly=True):
        owner: uuid.UUID | None = await conn.fetchval(
            "SELECT tenant_id FROM threads WHERE id = $1", thread_id
        )
        return owner


#: What :func:`insert_participant` found.
ADDED = "added"
PRESENT = "present"  # already a participant: nothing changed
NO_THREAD = "no_thread"  # the acting tenant cannot see the thread (none, or another's)


async def insert_participant(
    pool: Pool,
    acting_tenant: uuid.UUID,
    thread_id: uuid.UUID,
    row_tenant: uuid.UUID,
    participant_id: str,
    role: str,
) -> str:
    """Insert the participant row as given, in ``acting_tenant``'s transaction.

    :data:`ADDED`, or :data:`PRESENT` if already a participant. A refused row
    whose tenant is the acting tenant's, on a thread that tenant cannot see, is
    :data:`NO_THREAD` (a stale or foreign thread id: RLS hides which). Any other
    refusal is the database's error, raised as asyncpg raised it (42501 from RLS
    as the daemon's role): a cross-tenant participant.
    """
    async with pool.acquire() as conn:
        try:
            async with tenant_transaction(conn, acting_tenant):
                status: str = await conn.execute(
                    "INSERT INTO thread_participants (thread_id, tenant_id, participant_id, role)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (thread_id, participant_id) DO NOTHING",
                    thread_id,
                    row_tenant,
                    participant_id,
                    role,
                )
        except asyncpg.PostgresError as exc:
            if refusal_sqlstate(exc) is None or row_tenant != acting_tenant:
                raise
            async with tenant_transaction(conn, acting_tenant, readonly=True):
                visible = await conn.fetchval(
                    "SELECT EXISTS (SELECT FROM threads WHERE id = $1)", thread_id
                )
            if not visible:
                return NO_THREAD
            raise
        return ADDED if status == "INSERT 0 1" else PRESENT


async def list_participants(
    pool: Pool, tenant_id: uuid.UUID, thread_id: uuid.UUID, limit: int
) -> list[ParticipantRow]:
    async with pool.acquire() as conn, tenant_transaction(conn, tenant_id, readonly=True):
        rows = await conn.fetch(
            "SELECT thread_id, tenant_id, participant_id, role, joined_at"
            " FROM thread_participants WHERE thread_id = $1 AND left_at IS NULL"
            " ORDER BY joined_at, participant_id LIMIT $2",
            thread_id,
            limit,
        )
        return [ParticipantRow(**dict(r)) for r in rows]


async def record_receipt(
    pool: Pool, tenant_id: uuid.UUID, thread_id: uuid.UUID, participant_id: str
) -> ReceiptRow:
    """A read receipt stamped by the database clock (the trigger sets ``read_at``)."""
    async with pool.acquire() as conn, tenant_transaction(conn, tenant_id):
        row = await conn.fetchrow(
            "INSERT INTO read_receipts (tenant_id, thread_id, participant_id)"
            " VALUES ($1, $2, $3) RETURNING id, thread_id, participant_id, read_at",
            tenant_id,
            thread_id,
            participant_id,
        )
        assert row is not None, "INSERT ... RETURNING returns the row"
        return ReceiptRow(**dict(row))


async def list_receipts(
    pool: Pool, tenant_id: uuid.UUID, thread_id: uuid.UUID, limit: int
) -> list[ReceiptRow]:
    """The thread's receipts in database-clock order (ties by id, the insert order)."""
    async with pool.acquire() as conn, tenant_transaction(conn, tenant_id, readonly=True):
        rows = await conn.fetch(
            "SELECT id, thread_id, participant_id, read_at FROM read_receipts"
            " WHERE thread_id = $1 ORDER BY read_at, id LIMIT $2",
            thread_id,
            limit,
        )
        return [ReceiptRow(**dict(r)) for r in rows]


async def database_clock(
    pool: Pool,
    wall: Callable[[], float],
    samples: int,
    query: str = "SELECT clock_timestamp()",
) -> list[tuple[float, float, float]]:
    """``samples`` NTP-style readings on one connection: (t1, ts, t4) in Unix seconds.

    ``t1`` and ``t4`` are ``wall()`` just before and just after the statement,
    ``ts`` the database's ``clock_timestamp()`` in between. All readings run in
    one unit of work, so the bridge crossing and the pool's acquire are outside
    every round trip. ``query`` must return one timestamptz (a test may slow it
    down on the server side).
    """
    readings: list[tuple[float, float, float]] = []
    async with pool.acquire() as conn:
        statement = await conn.prepare(query)
        for _ in range(samples):
            t1 = wall()
            stamp: dt.datetime = await statement.fetchval()
            t4 = wall()
            readings.append((t1, stamp.timestamp(), t4))
    return readings
