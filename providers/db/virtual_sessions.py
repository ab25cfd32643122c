"""Virtual sessions and their fallback threads in PostgreSQL (rows 4, 14; asyncio side).

Tables from migration ``0007_virtual_sessions.sql``. The units here are asyncio
coroutines; Trio code crosses the bridge once per unit (``DbPool.run_unit`` or
``bridge.run``).

- :func:`insert_session` runs inside the inbox's transaction (row 18): one session per
  appointment, whatever the number of deliveries (``ON CONFLICT DO NOTHING`` on
  ``UNIQUE (tenant_id, appointment_id)``).
- The Jitsi pool works across tenants as ``triage_relay``, on the placement columns
  only: :func:`claim_waiting` (``FOR UPDATE SKIP LOCKED`` and a lease, so two replicas
  never place one session), :func:`mark_placed`, :func:`mark_failed`,
  :func:`fail_node_sessions` (a lost bridge's sessions), :func:`fail_pending` (no
  bridge at all); the fallback sweep's :func:`without_fallback` (relay too).
- The sessions API works as the session's tenant: :func:`open_session` (the inbox's
  insert, answering the id) and :func:`join_target` (the placed room and node of one
  session; another tenant's session is not seen, RLS).
- The fallback actor works as the session's tenant: :func:`fallback_facts` (who, which
  day, threads already there) and :func:`spawn_fallback` (a new thread in the next slot,
  or the patient-day's existing thread), under a transaction advisory lock per
  patient-day; the cap is also the database's (``triage.fallback_cap``, see the
  migration).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from providers.db.tenancy import run_as_relay, run_in_tenant

if TYPE_CHECKING:
    import asyncpg

    from providers.db.tenancy import Connection

    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "CAP_SETTING",
    "FallbackFacts",
    "FallbackResult",
    "JoinTarget",
    "SessionRef",
    "claim_waiting",
    "fail_node_sessions",
    "fail_pending",
    "fallback_facts",
    "fallback_topic",
    "insert_session",
    "join_target",
    "mark_failed",
    "mark_placed",
    "open_session",
    "spawn_fallback",
    "without_fallback",
]

#: The transaction-local setting the fallback_threads trigger checks.
CAP_SETTING = "triage.fallback_cap"


def fallback_topic(appointment_id: str) -> str:
    """The topic of the fallback thread opened for a failed visit."""
    return f"fallback:{appointment_id}"


@dataclass(frozen=True, slots=True)
class SessionRef:
    """A session as the pool sees it (no patient data)."""

    id: uuid.UUID
    tenant_id: uuid.UUID
    appointment_id: str
    state: str
    node: str | None = None
    failures: int = 0


_INSERT_SESSION = """
INSERT INTO virtual_sessions (tenant_id, appointment_id, patient_id, starts_at)
VALUES ($1, $2, $3, $4)
ON CONFLICT (tenant_id, appointment_id) DO NOTHING
"""


async def insert_session(
    conn: Connection,
    tenant_id: uuid.UUID,
    appointment_id: str,
    patient_id: str | None,
    starts_at: dt.datetime | None,
) -> None:
    """Inside the caller's tenant transaction: the appointment's session, once."""
    await conn.execute(_INSERT_SESSION, tenant_id, appointment_id, patient_id, starts_at)


# -- the join route (as the tenant) --------------------------------------------------------
_SESSION_OF = """
SELECT id, state FROM virtual_sessions
WHERE tenant_id = $1 AND appointment_id = $2
"""


async def _open(
    conn: Connection,
    tenant_id: uuid.UUID,
    appointment_id: str,
    patient_id: str | None,
    starts_at: dt.datetime | None,
) -> tuple[uuid.UUID, str, bool]:
    inserted = await conn.fetchrow(_INSERT_SESSION + " RETURNING id, state",
                                   tenant_id, appointment_id, patient_id, starts_at)  # fmt: skip
    if inserted is not None:
        return inserted["id"], inserted["state"], True
    row = await conn.fetchrow(_SESSION_OF, tenant_id, appointment_id)
    assert row is not None, "ON CONFLICT DO NOTHING without a conflicting row"
    return row["id"], row["state"], False


async def open_session(
    pool: Pool,
    tenant_id: uuid.UUID,
    appointment_id: str,
    patient_id: str | None,
    starts_at: dt.datetime | None,
) -> tuple[uuid.UUID, str, bool]:
    """The appointment's session as its tenant: (id, state, created). The same insert
    as the inbox's, so an appointment booked over both doors still has one session."""
    return await run_in_tenant(pool, tenant_id, _open, tenant_id, appointment_id, patient_id,
                               starts_at)  # fmt: skip


@dataclass(frozen=True, slots=True)
class JoinTarget:
    """Where a session's participants join: its state, and room and node once placed."""

    id: uuid.UUID
    appointment_id: str
    state: str
    room: str | None
    node: str | None
    fallback_thread_id: uuid.UUID | None


_JOIN_TARGET = """
SELECT id, appointment_id, state, room, node, fallback_thread_id
FROM virtual_sessions WHERE id = $1
"""


async def _join_target(conn: Connection, session_id: uuid.UUID) -> JoinTarget | None:
    row = await conn.fetchrow(_JOIN_TARGET, session_id)
    if row is None:
        return None
    return JoinTarget(
        id=row["id"],
        appointment_id=row["appointment_id"],
        state=row["state"],
        room=row["room"],
        node=row["node"],
        fallback_thread_id=row["fallback_thread_id"],
    )


async def join_target(pool: Pool, tenant_id: uuid.UUID, session_id: uuid.UUID) -> JoinTarget | None:
    """The session as its tenant sees it; None if the tenant has no such session."""
    return await run_in_tenant(pool, tenant_id, _join_target, session_id)


# -- the pool (triage_relay) ---------------------------------------------------------------

_CLAIM = """
UPDATE virtual_sessions s SET claimed_until = now() + make_interval(secs => $2)
WHERE s.id IN (
    SELECT id FROM virtual_sessions
    WHERE state IN ('pending', 'failed') AND failures < $3
      AND (claimed_until IS NULL OR claimed_until < now())
    ORDER BY created_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
RETURNING s.id, s.tenant_id, s.appointment_id, s.state, s.node, s.failures
"""


def _ref(row: asyncpg.Record) -> SessionRef:
    return SessionRef(
        id=row["id"],
        tenant_id=row["tenant_id"],
        appointment_id=row["appointment_id"],
        state=row["state"],
        node=row["node"],
        failures=row["failures"],
    )


async def _claim(
    conn: Connection, limit: int, lease_s: float, max_failures: int
) -> list[SessionRef]:
    rows = await conn.fetch(_CLAIM, limit, lease_s, max_failures)
    return sorted(map(_ref, rows), key=lambda r: (r.failures, str(r.id)))


async def claim_waiting(
    pool: Pool, limit: int, lease_s: float, max_failures: int
) -> list[SessionRef]:
    """Up to ``limit`` sessions waiting for a bridge (pending, or failed fewer than
    ``max_failures`` times), claimed for ``lease_s`` seconds."""
    return await run_as_relay(pool, _claim, limit, lease_s, max_failures)


_PLACED = """
UPDATE virtual_sessions SET state = 'placed', node = $2, room = $3,
    attempts = attempts + 1,
    failovers = failovers + CASE WHEN state = 'failed' THEN 1 ELSE 0 END,
    failure = NULL, claimed_until = NULL, updated_at = now()
WHERE id = $1 AND state IN ('pending', 'failed')
RETURNING 1
"""


async def _placed(conn: Connection, session_id: uuid.UUID, node: str, room: str) -> bool:
    return await conn.fetchval(_PLACED, session_id, node, room) is not None


async def mark_placed(pool: Pool, session_id: uuid.UUID, node: str, room: str) -> bool:
    """The session is hosted by ``node`` in ``room``; False if it was not waiting."""
    return await run_as_relay(pool, _placed, session_id, node, room)


_FAILED = """
UPDATE virtual_sessions SET state = 'failed', failure = $2, failures = failures + 1,
    attempts = attempts + 1, claimed_until = NULL, updated_at = now()
WHERE id = ANY($1::uuid[]) AND state IN ('pending', 'failed')
RETURNING id, tenant_id, appointment_id, state, node, failures
"""


async def _failed(conn: Connection, ids: list[uuid.UUID], reason: str) -> list[SessionRef]:
    return [_ref(r) for r in await conn.fetch(_FAILED, ids, reason)]


async def mark_failed(pool: Pool, ids: Sequence[uuid.UUID], reason: str) -> list[SessionRef]:
    """Sessions no bridge could host: failed with ``reason`` (counted per session)."""
    if not ids:
        return []
    return await run_as_relay(pool, _failed, list(ids), reason)


_LOST = """
UPDATE virtual_sessions SET state = 'failed', failure = $2, failures = failures + 1,
    claimed_until = NULL, updated_at = now()
WHERE state = 'placed' AND node = $1
RETURNING id, tenant_id, appointment_id, state, node, failures
"""


async def _lost(conn: Connection, node: str, reason: str) -> list[SessionRef]:
    return [_ref(r) for r in await conn.fetch(_LOST, node, reason)]


async def fail_node_sessions(pool: Pool, node: str, reason: str) -> list[SessionRef]:
    """The sessions hosted by a lost bridge: failed (they wait for another bridge)."""
    return await run_as_relay(pool, _lost, node, reason)


_FAIL_PENDING = """
UPDATE virtual_sessions s SET state = 'failed', failure = $2, failures = failures + 1,
    claimed_until = NULL, updated_at = now()
WHERE s.id IN (
    SELECT id FROM virtual_sessions
    WHERE state = 'pending' AND (claimed_until IS NULL OR claimed_until < now())
    ORDER BY created_at, id
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
RETURNING s.id, s.tenant_id, s.appointment_id, s.state, s.node, s.failures
"""


async def _fail_pending(conn: Connection, limit: int, reason: str) -> list[SessionRef]:
    return [_ref(r) for r in await conn.fetch(_FAIL_PENDING, limit, reason)]


async def fail_pending(pool: Pool, limit: int, reason: str) -> list[SessionRef]:
    """Up to ``limit`` sessions still waiting for their first bridge: failed (no bridge)."""
    return await run_as_relay(pool, _fail_pending, limit, reason)


_ORPHANS = """
SELECT id, tenant_id, appointment_id, state, node, failures FROM virtual_sessions
WHERE failures > 0 AND fallback_thread_id IS NULL
  AND updated_at < now() - make_interval(secs => $2)
ORDER BY updated_at, id
LIMIT $1
"""


async def _orphans(conn: Connection, limit: int, older_than_s: float) -> list[SessionRef]:
    return [_ref(r) for r in await conn.fetch(_ORPHANS, limit, older_than_s)]


async def without_fallback(pool: Pool, limit: int, older_than_s: float) -> list[SessionRef]:
    """Sessions that failed at least once, unchanged for ``older_than_s``, and still have no
    fallback thread (their request was lost in a crash, or refused): for the sweep."""
    return await run_as_relay(pool, _orphans, limit, older_than_s)


# -- fallback threads (the session's tenant) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class FallbackFacts:
    """What the fallback actor decides on: the patient-day and what it already has."""

    patient_key: str
    day: dt.date
    threads: int  # fallback threads of the patient-day
    linked: uuid.UUID | None  # the session's own fallback thread, if it has one


_FACTS = """
SELECT coalesce(s.patient_id, 'appointment:' || s.appointment_id) AS patient_key,
       coalesce((s.starts_at AT TIME ZONE 'UTC')::date, (now() AT TIME ZONE 'UTC')::date) AS day,
       s.fallback_thread_id
FROM virtual_sessions s WHERE s.id = $1
"""
_COUNT = "SELECT count(*) FROM fallback_threads WHERE patient_id = $1 AND day = $2"


async def _facts(conn: Connection, session_id: uuid.UUID) -> FallbackFacts | None:
    row = await conn.fetchrow(_FACTS, session_id)
    if row is None:
        return None
    threads = int(await conn.fetchval(_COUNT, row["patient_key"], row["day"]))
    return FallbackFacts(row["patient_key"], row["day"], threads, row["fallback_thread_id"])


async def fallback_facts(
    pool: Pool, tenant_id: uuid.UUID, session_id: uuid.UUID
) -> FallbackFacts | None:
    """The session's patient-day and its fallback threads (None: no such session)."""
    return await run_in_tenant(pool, tenant_id, _facts, session_id)


FallbackOutcome = Literal["spawned", "reused", "linked", "refused"]


@dataclass(frozen=True, slots=True)
class FallbackResult:
    """How a fallback request ended: ``spawned`` a new thread, ``reused`` the patient-day's
    newest one, ``linked`` (the session had its thread already) or ``refused`` (no
    thread may be opened and none exists: the session stays without one)."""

    outcome: FallbackOutcome
    thread_id: uuid.UUID | None
    slot: int | None = None


_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 7))"
_NEWEST = """
SELECT thread_id, slot FROM fallback_threads WHERE patient_id = $1 AND day = $2
ORDER BY slot DESC LIMIT 1
"""
_THREAD = "INSERT INTO threads (tenant_id, topic) VALUES ($1, $2) RETURNING id"
_SLOT = """
INSERT INTO fallback_threads (tenant_id, patient_id, day, slot, thread_id, appointment_id)
SELECT $1, $2, $3, $4, $5, appointment_id FROM virtual_sessions WHERE id = $6
"""
_LINK = """
UPDATE virtual_sessions SET fallback_thread_id = $2, updated_at = now()
WHERE id = $1 AND fallback_thread_id IS NULL
"""
_SET_CAP = f"SELECT pg_catalog.set_config('{CAP_SETTING}', $1, true)"


async def _spawn(
    conn: Connection, tenant_id: uuid.UUID, session_id: uuid.UUID, cap: int, allow_new: bool
) -> FallbackResult:
    row = await conn.fetchrow(_FACTS, session_id)
    if row is None:
        return FallbackResult("refused", None)
    if row["fallback_thread_id"] is not None:
        return FallbackResult("linked", row["fallback_thread_id"])
    patient, day = row["patient_key"], row["day"]
    await conn.execute(_LOCK, f"{tenant_id}:{patient}:{day.isoformat()}")
    newest = await conn.fetchrow(_NEWEST, patient, day)
    taken = 0 if newest is None else int(newest["slot"])
    if allow_new and taken < cap:
        await conn.execute(_SET_CAP, str(cap))
        appointment = await conn.fetchval(
            "SELECT appointment_id FROM virtual_sessions WHERE id = $1", session_id
        )
        thread = await conn.fetchval(_THREAD, tenant_id, fallback_topic(appointment))
        await conn.execute(_SLOT, tenant_id, patient, day, taken + 1, thread, session_id)
        await conn.execute(_LINK, session_id, thread)
        return FallbackResult("spawned", thread, taken + 1)
    if newest is None:
        return FallbackResult("refused", None)
    await conn.execute(_LINK, session_id, newest["thread_id"])
    return FallbackResult("reused", newest["thread_id"], taken)


async def spawn_fallback(
    pool: Pool, tenant_id: uuid.UUID, session_id: uuid.UUID, cap: int, allow_new: bool
) -> FallbackResult:
    """In one tenant transaction, locked per patient-day: the session's fallback thread.

    A session that has one keeps it (``linked``). Otherwise, with ``allow_new`` and fewer
    than ``cap`` threads in the patient-day, a new thread takes the next slot
    (``spawned``); else the patient-day's newest thread is shared (``reused``), or, with
    none, nothing (``refused``)."""
    return await run_in_tenant(pool, tenant_id, _spawn, tenant_id, session_id, cap, allow_new)
