"""What a pool connection carries from one unit of work to the next (real PostgreSQL).

With ``[database] reset_on_release = false`` (the default) asyncpg's reset query is
not sent on release: one round trip less per unit. That is safe because every
setting the daemon makes is transaction-local: the tenant and the role of one unit
never reach the next, and an open transaction is still rolled back. The test tells
the two modes apart by a session-level setting, which only the reset query clears.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import asyncpg
import pytest

from config.schema import DatabaseConfig
from providers.bridge import run
from providers.db import DAEMON_ROLE, migrate_async
from providers.db.pool import DbPool, open_pool
from providers.db.tenancy import run_as_relay, run_in_tenant
from providers.services import postgres_url_with

if TYPE_CHECKING:
    from providers.db.tenancy import Connection

TENANT = uuid.UUID("6f0c3f2e-1d44-4f0e-9a59-0a3c5a1c2b7d")


async def _session_name(pool: asyncpg.Pool[asyncpg.Record]) -> tuple[str, str, str, str]:
    """Four facts a released connection could carry, read on the pool's one connection."""
    async with pool.acquire() as conn:
        return (
            await conn.fetchval("SELECT current_setting('application_name')"),
            await conn.fetchval("SELECT coalesce(current_setting('triage.tenant_id', true), '')"),
            await conn.fetchval("SELECT current_user"),
            await conn.fetchval("SELECT txid_current_if_assigned()::text IS NULL")
            and "no transaction",
        )


async def _mark_session(pool: asyncpg.Pool[asyncpg.Record]) -> None:
    async with pool.acquire() as conn:
        await conn.execute("SET application_name = 'left-behind'")  # session-level


async def _in_tenant(conn: Connection) -> str:
    return str(await conn.fetchval("SELECT current_setting('triage.tenant_id')"))


async def _as_relay(conn: Connection) -> str:
    return str(await conn.fetchval("SELECT current_user"))


async def _fail_midway(conn: Connection) -> None:
    await conn.execute("SET LOCAL application_name = 'inside'")
    raise LookupError("the unit failed inside its transaction")


@pytest.mark.parametrize("reset", [False, True], ids=["kept-session", "reset-query"])
async def test_a_released_connection_carries_no_tenant_role_or_transaction(
    bridge: object, postgres_url: str, reset: bool
) -> None:
    await run(migrate_async, postgres_url)
    config = DatabaseConfig(pool_min=1, pool_max=1, reset_on_release=reset)
    async with open_pool(postgres_url_with(postgres_url, user=DAEMON_ROLE), config) as db:
        await _check(db, reset)


async def _check(db: DbPool, reset: bool) -> None:
    pool = db.asyncpg_pool
    assert await db.run_unit(run_in_tenant, TENANT, _in_tenant) == str(TENANT)
    assert await db.run_unit(run_as_relay, _as_relay) == "triage_relay"
    with pytest.raises(LookupError):
        await db.run_unit(run_in_tenant, TENANT, _fail_midway)
    name, tenant, user, idle = await db.run_unit(_session_name)
    # Whatever the mode: the tenant and the relay role ended with their transactions,
    # the failed unit's transaction was rolled back (its SET LOCAL is gone with it).
    assert (tenant, user, idle) == ("", DAEMON_ROLE, "no transaction")
    assert name != "inside"
    await db.run_unit(_mark_session)
    name, *_ = await db.run_unit(_session_name)
    # Only a session-level SET (which the daemon never makes) tells the modes apart.
    assert name == ("" if reset else "left-behind")
    assert pool.get_size() == 1  # the same connection throughout
