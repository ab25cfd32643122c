"""Message templates in PostgreSQL: lookup by (tenant, name, version | active) and storing.

Asyncio units of work, one bridge crossing each (``await db.run_unit(fn, ...)``),
run in the tenant's transaction so row-level security applies. A version is
immutable in spirit (a change is a new version); at most one version of a name
is active (``templates_one_active``). A retired version is never returned: a
dispatch that names it fails closed like a missing one (catalog row 19).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

from providers.db.tenancy import run_in_tenant

if TYPE_CHECKING:
    from providers.db.tenancy import Connection

    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

__all__ = ["TemplateRow", "lookup_template_async", "put_template_async"]


@dataclass(frozen=True, slots=True)
class TemplateRow:
    tenant_id: str
    name: str
    version: int
    channel: str
    category: str
    subject: str | None
    body: str


_COLUMNS = "name, version, channel::text AS channel, category, subject, body"
_ACTIVE = f"SELECT {_COLUMNS} FROM templates WHERE name = $1 AND active"
_VERSION = (
    f"SELECT {_COLUMNS} FROM templates WHERE name = $1 AND version = $2 AND retired_at IS NULL"
)
_DEACTIVATE = "UPDATE templates SET active = false WHERE name = $1 AND active AND version <> $2"
_INSERT = """
INSERT INTO templates (tenant_id, name, version, channel, category, subject, body, active)
VALUES (current_tenant_id(), $1, $2, $3, $4, $5, $6, $7)
"""


def _row(tenant: str, record: asyncpg.Record) -> TemplateRow:
    return TemplateRow(
        tenant_id=tenant,
        name=record["name"],
        version=int(record["version"]),
        channel=record["channel"],
        category=record["category"],
        subject=record["subject"],
        body=record["body"],
    )


async def _lookup(
    conn: Connection, tenant: str, name: str, version: int | None
) -> TemplateRow | None:
    if version is None:
        record = await conn.fetchrow(_ACTIVE, name)
    else:
        record = await conn.fetchrow(_VERSION, name, version)
    return None if record is None else _row(tenant, record)


async def lookup_template_async(
    pool: Pool, tenant_id: str | uuid.UUID, name: str, version: int | None
) -> TemplateRow | None:
    """Unit of work: the tenant's template ``name`` at ``version`` (None: the active one)."""
    tenant = str(tenant_id)
    return await run_in_tenant(pool, tenant, _lookup, tenant, name, version)


async def _put(conn: Connection, row: TemplateRow, active: bool) -> None:
    if active:
        await conn.execute(_DEACTIVATE, row.name, row.version)
    await conn.execute(
        _INSERT, row.name, row.version, row.channel, row.category, row.subject, row.body, active
    )


async def put_template_async(pool: Pool, row: TemplateRow, active: bool) -> None:
    """Unit of work: store a new version (and make it the active one if ``active``)."""
    await run_in_tenant(pool, row.tenant_id, _put, row, active)
