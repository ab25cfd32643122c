"""Idempotency keys in PostgreSQL, the truth behind the Redis cache (catalog row 7).

The table ``idempotency_keys`` has the primary key (tenant_id, key): whatever
the cache says, a key is claimed first exactly once, by the transaction whose
INSERT wrote the row. Each function below is one asyncio unit of work run as
the daemon's role inside :func:`~providers.db.tenancy.run_in_tenant` (so RLS
applies); the Trio wrappers cross the bridge once each (``service="postgres"``).

An expired key (``expires_at`` passed) counts as absent: the claim replaces it in
the same statement, so a key can be reused after its TTL without a sweeper.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

from providers import bridge
from providers.db.tenancy import run_in_tenant

if TYPE_CHECKING:
    from providers.db.tenancy import Connection

__all__ = [
    "KeyRecord",
    "claim_key",
    "claim_key_async",
    "complete_key",
    "complete_key_async",
    "recent_keys",
    "recent_keys_async",
]

Pool = asyncpg.Pool

# Inserted, or an expired row taken over; RETURNING gives a row only then.
_CLAIM = """
INSERT INTO idempotency_keys AS k (tenant_id, key, request_hash, expires_at)
VALUES (current_tenant_id(), $1, $2, now() + make_interval(secs => $3))
ON CONFLICT (tenant_id, key) DO UPDATE
    SET request_hash = EXCLUDED.request_hash, response = NULL,
        created_at = now(), expires_at = EXCLUDED.expires_at
    WHERE k.expires_at <= now()
RETURNING k.request_hash, k.response::text AS response,
          extract(epoch FROM k.expires_at - now())::float8 AS left_s
"""

_LOOKUP = """
SELECT request_hash, response::text AS response,
       extract(epoch FROM expires_at - now())::float8 AS left_s
FROM idempotency_keys WHERE key = $1
"""

_COMPLETE = """
UPDATE idempotency_keys SET response = $2::jsonb
WHERE key = $1 AND response IS NULL AND expires_at > now()
RETURNING request_hash
"""

_RECENT = """
SELECT key, request_hash, response::text AS response,
       extract(epoch FROM expires_at - now())::float8 AS left_s
FROM idempotency_keys WHERE expires_at > now()
ORDER BY created_at DESC LIMIT $1
"""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One stored idempotency key; ``left_s`` is how long it still lives."""

    key: str
    request_hash: str
    response: Any
    left_s: float


def _response(text: str | None) -> Any:
    return None if text is None else msgspec.json.decode(text)


def _record(key: str, row: asyncpg.Record) -> KeyRecord:
    return KeyRecord(
        key=key,
        request_hash=row["request_hash"],
        response=_response(row["response"]),
        left_s=float(row["left_s"]),
    )


# -- asyncio side ----------------------------------------------------------------------


async def _claim(
    conn: Connection, key: str, request_hash: str, ttl_s: float
) -> tuple[bool, KeyRecord]:
    row = await conn.fetchrow(_CLAIM, key, request_hash, ttl_s)
    if row is not None:
        return True, _record(key, row)
    existing = await conn.fetchrow(_LOOKUP, key)
    if existing is None:  # pragma: no cover - the conflicting row cannot vanish under our lock
        raise RuntimeError(f"idempotency key {key!r} conflicted but is not visible")
    return False, _record(key, existing)


async def claim_key_async(
    pool: Pool[asyncpg.Record],
    tenant_id: uuid.UUID | str,
    key: str,
    request_hash: str,
    ttl_s: float,
) -> tuple[bool, KeyRecord]:
    """Claim ``key`` for the tenant: ``(True, new)`` if this call wrote it, else ``(False, existing)``."""
    return await run_in_tenant(pool, tenant_id, _claim, key, request_hash, ttl_s)


async def _complete(conn: Connection, key: str, response_json: str) -> bool:
    return await conn.fetchval(_COMPLETE, key, response_json) is not None


async def complete_key_async(
    pool: Pool[asyncpg.Record], tenant_id: uuid.UUID | str, key: str, response: Any
) -> bool:
    """Record the response of a claimed key (once); False if there was none to complete."""
    text = msgspec.json.encode(response).decode()
    return await run_in_tenant(pool, tenant_id, _complete, key, text)


async def _recent(conn: Connection, limit: int) -> list[KeyRecord]:
    rows = await conn.fetch(_RECENT, limit)
    return [_record(row["key"], row) for row in rows]


async def recent_keys_async(
    pool: Pool[asyncpg.Record], tenant_id: uuid.UUID | str, limit: int
) -> list[KeyRecord]:
    """The tenant's newest live keys, at most ``limit`` (for warming the cache)."""
    return await run_in_tenant(pool, tenant_id, _recent, limit)


# -- Trio side: one crossing each ------------------------------------------------------


async def claim_key(
    pool: Pool[asyncpg.Record],
    tenant_id: uuid.UUID | str,
    key: str,
    request_hash: str,
    ttl_s: float,
) -> tuple[bool, KeyRecord]:
    return await bridge.run(
        claim_key_async, pool, tenant_id, key, request_hash, ttl_s, service="postgres"
    )


async def complete_key(
    pool: Pool[asyncpg.Record], tenant_id: uuid.UUID | str, key: str, response: Any
) -> bool:
    return await bridge.run(complete_key_async, pool, tenant_id, key, response, service="postgres")


async def recent_keys(
    pool: Pool[asyncpg.Record], tenant_id: uuid.UUID | str, limit: int
) -> list[KeyRecord]:
    return await bridge.run(recent_keys_async, pool, tenant_id, limit, service="postgres")
