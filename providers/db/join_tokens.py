"""Join tokens in PostgreSQL (row 10): issued tokens, revocations, retired kids, incidents.

asyncio units of work, each crossed once (``bridge.run``):

* :func:`record_issued` -- the issued token's row, in its tenant's transaction
  (RLS), before the token is handed out: a token we cannot revoke is never issued;
* :func:`revoked_jti` -- whether a jti is revoked (a token without a row, e.g.
  signed by a leaked key, is not "revoked": its kid is what the ring refuses);
* :func:`retired_kids` -- every retired kid (relay role: a system table);
* :func:`retire_and_revoke` -- the mitigation, ONE transaction as ``triage_relay``:
  retire the kid, revoke every live token it signed (all tenants), and write the
  forensic record with the revoked sessions. Run twice for one kid it changes
  nothing more than the record (the kid is already retired; no live token left).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from providers.db.tenancy import run_as_relay, run_in_tenant

if TYPE_CHECKING:
    import asyncpg

    from providers.db.tenancy import Connection

    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "IncidentRecord",
    "IncidentResult",
    "IssuedToken",
    "record_issued",
    "retire_and_revoke",
    "retired_kids",
    "revoked_jti",
]


@dataclass(frozen=True, slots=True)
class IssuedToken:
    jti: uuid.UUID
    tenant_id: uuid.UUID
    session_id: str
    room: str
    kid: str
    user_id: str
    issued_at: float  # Unix seconds
    expires_at: float


@dataclass(frozen=True, slots=True)
class IncidentRecord:
    """What the forensic record says about one mitigation."""

    kid: str
    detected_at: float  # Unix seconds
    recorded_by: str
    reason: str
    failures: Mapping[str, int]
    origins: Sequence[str]
    new_kid: str | None


@dataclass(frozen=True, slots=True)
class IncidentResult:
    incident_id: int
    revoked_tokens: int
    sessions: list[dict[str, str]]
    newly_retired: bool


def _ts(unix: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(unix, tz=dt.UTC)


_INSERT_TOKEN = """
INSERT INTO join_tokens (jti, tenant_id, session_id, room, kid, user_id, issued_at, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""


async def _insert(conn: Connection, token: IssuedToken) -> None:
    await conn.execute(
        _INSERT_TOKEN, token.jti, token.tenant_id, token.session_id, token.room, token.kid,
        token.user_id, _ts(token.issued_at), _ts(token.expires_at),
    )  # fmt: skip


async def record_issued(pool: Pool, token: IssuedToken) -> None:
    """asyncio side: the issued token's row, as its tenant."""
    await run_in_tenant(pool, token.tenant_id, _insert, token)


_REVOKED = "SELECT revoked_at IS NOT NULL FROM join_tokens WHERE jti = $1"


async def _revoked(conn: Connection, jti: uuid.UUID) -> bool:
    return bool(await conn.fetchval(_REVOKED, jti))


async def revoked_jti(pool: Pool, tenant_id: uuid.UUID, jti: uuid.UUID) -> bool:
    """asyncio side: whether the token ``jti`` of ``tenant_id`` was revoked."""
    return await run_in_tenant(pool, tenant_id, _revoked, jti)


async def _retired(conn: Connection) -> list[str]:
    return [r["kid"] for r in await conn.fetch("SELECT kid FROM join_key_retirements ORDER BY kid")]


async def retired_kids(pool: Pool) -> list[str]:
    """asyncio side: every retired kid."""
    return await run_as_relay(pool, _retired)


_RETIRE = """
INSERT INTO join_key_retirements (kid, reason) VALUES ($1, $2)
ON CONFLICT (kid) DO NOTHING RETURNING 1
"""
_REVOKE = """
UPDATE join_tokens SET revoked_at = clock_timestamp(), revoked_reason = $2
WHERE kid = $1 AND revoked_at IS NULL
RETURNING tenant_id, session_id, room
"""
_INCIDENT = """
INSERT INTO join_token_incidents
    (kid, detected_at, recorded_by, reason, failures, origins, revoked_tokens, sessions, new_kid)
VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7, $8::jsonb, $9)
RETURNING id
"""


async def _mitigate(conn: Connection, record: IncidentRecord) -> IncidentResult:
    retired = await conn.fetchval(_RETIRE, record.kid, record.reason)
    rows = await conn.fetch(_REVOKE, record.kid, f"kid {record.kid} retired: {record.reason}")
    sessions = sorted({(str(r["tenant_id"]), r["session_id"], r["room"]) for r in rows})
    listed = [{"tenant_id": t, "session_id": s, "room": m} for t, s, m in sessions]
    incident = await conn.fetchval(
        _INCIDENT, record.kid, _ts(record.detected_at), record.recorded_by, record.reason,
        json.dumps(dict(record.failures)), json.dumps(list(record.origins)), len(rows),
        json.dumps(listed), record.new_kid,
    )  # fmt: skip
    return IncidentResult(
        incident_id=int(incident),
        revoked_tokens=len(rows),
        sessions=listed,
        newly_retired=retired is not None,
    )


async def retire_and_revoke(pool: Pool, record: IncidentRecord) -> IncidentResult:
    """asyncio side: retire ``record.kid``, revoke its live tokens, write the record."""
    return await run_as_relay(pool, _mitigate, record)
