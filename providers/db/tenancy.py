"""Units of work scoped to one tenant, or run as the cross-tenant relay role (asyncio side).

Row-level security admits the rows of the tenant named by the transaction-local
setting ``triage.tenant_id``. :func:`tenant_transaction` opens a transaction and
sets it as the first statement, so it lasts exactly as long as the
transaction: a pooled connection never carries a tenant into its next use.

These are asyncio context managers: use them *inside* one asyncio unit of work
and cross the bridge once for the whole of it -- never bridge them themselves
(DESIGN.md section 7)::

    async def mark_dispatched(pool, tenant_id, dispatch_id):          # asyncio side
        async with pool.acquire() as conn, tenant_transaction(conn, tenant_id):
            return await conn.execute(UPDATE_STATUS, dispatch_id, "dispatched")

    await bridge.run(mark_dispatched, pool, tenant, dispatch_id, service="postgres")

or, with the acquire included, ``bridge.run(run_in_tenant, pool, tenant, work, *args)``.

:func:`relay_transaction` is for system actors (outbox relay, dead-letter list
and redrive): it switches to ``triage_relay`` for the transaction
(``SET LOCAL ROLE``), which sees every tenant's outbox and dead letters and
nothing else.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Literal, TypeAlias, TypeVar, TypeVarTuple

import asyncpg

from providers.db.roles import RELAY_ROLE, TENANT_SETTING

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    Source: TypeAlias = asyncpg.Pool[asyncpg.Record] | Connection

__all__ = [
    "Isolation",
    "relay_transaction",
    "run_as_relay",
    "run_in_tenant",
    "switch_tenant",
    "tenant_transaction",
]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

Isolation = Literal["read_committed", "repeatable_read", "serializable"]

_SET_TENANT = f"SELECT pg_catalog.set_config('{TENANT_SETTING}', $1, true)"
_SET_RELAY_ROLE = f"SET LOCAL ROLE {RELAY_ROLE}"


async def switch_tenant(conn: Connection, tenant_id: uuid.UUID | str) -> None:
    """Inside a :func:`tenant_transaction`, act for another tenant from the next
    statement on (the setting stays transaction-local): one transaction for work that
    spans tenants, such as a batch of delivery receipts."""
    await conn.execute(_SET_TENANT, _tenant_text(tenant_id))


def _tenant_text(tenant_id: uuid.UUID | str) -> str:
    """The canonical text of a tenant id; ValueError if it is not a UUID."""
    if isinstance(tenant_id, uuid.UUID):
        return str(tenant_id)
    try:
        return str(uuid.UUID(tenant_id))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tenant id must be a UUID, got {tenant_id!r}") from exc


@asynccontextmanager
async def tenant_transaction(
    conn: Connection,
    tenant_id: uuid.UUID | str,
    *,
    isolation: Isolation | None = None,
    readonly: bool = False,
) -> AsyncIterator[Connection]:
    """A transaction on ``conn`` whose first statement sets the tenant (asyncio side).

    Commits when the block ends normally, rolls back on an exception or a
    cancellation; the tenant setting ends with the transaction either way.
    """
    tenant = _tenant_text(tenant_id)
    async with conn.transaction(isolation=isolation, readonly=readonly):
        await conn.execute(_SET_TENANT, tenant)
        yield conn


@asynccontextmanager
async def relay_transaction(
    conn: Connection, *, isolation: Isolation | None = None
) -> AsyncIterator[Connection]:
    """A transaction on ``conn`` run as ``triage_relay`` (asyncio side).

    The connection's role must be a member of triage_relay (triage_daemon is,
    without inheritance). The role reverts when the transaction ends.
    """
    async with conn.transaction(isolation=isolation):
        await conn.execute(_SET_RELAY_ROLE)
        yield conn


async def run_in_tenant(
    source: Source,
    tenant_id: uuid.UUID | str,
    work: Callable[[Connection, *Ts], Awaitable[T]],
    *args: *Ts,
) -> T:
    """``await work(conn, *args)`` inside :func:`tenant_transaction` (asyncio side).

    ``source`` is a pool (a connection is acquired and released here) or a
    connection. Meant to be the one coroutine a Trio caller crosses the bridge with.
    """
    if isinstance(source, asyncpg.Pool):
        async with source.acquire() as conn, tenant_transaction(conn, tenant_id):
            return await work(conn, *args)
    async with tenant_transaction(source, tenant_id):
        return await work(source, *args)


async def run_as_relay(
    source: Source,
    work: Callable[[Connection, *Ts], Awaitable[T]],
    *args: *Ts,
) -> T:
    """``await work(conn, *args)`` inside :func:`relay_transaction` (asyncio side)."""
    if isinstance(source, asyncpg.Pool):
        async with source.acquire() as conn, relay_transaction(conn):
            return await work(conn, *args)
    async with relay_transaction(source):
        return await work(source, *args)
