"""Message templates in PostgreSQL: lookup by (tenant, name, version | active) and storing.

Asyncio units of work, one bridge crossing each (``await db.run_unit(fn, ...)``),
run in the tenant's transaction so row-level security applies. A version is
immutable in spirit (a change is a new version); at most one version of a name
is active (``templates_one_active``). A retired version is never returned: a
lookup that finds one (the version asked for, or -- no version active -- the newest)
answers a :class:`RetiredVersion` with its reason, and the dispatch that names it
fails closed like one naming a missing version (rows 19 and 11).
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

__all__ = ["RetiredVersion", "TemplateRow", "lookup_template_async", "put_template_async"]


@dataclass(frozen=True, slots=True)
class TemplateRow:
    tenant_id: str
    name: str
    version: int
    channel: str
    category: str
    subject: str | None
    body: str


@dataclass(frozen=True, slots=True)
class RetiredVersion:
    """The version a lookup named is retired (or, asking for the active one, the newest is)."""

    version: int
    reason: str


_COLUMNS = "name, version, channel::text AS channel, category, subject, body"
_ACTIVE = f"SELECT {_COLUMNS} FROM templates WHERE name = $1 AND active"
_VERSION = (
    f"SELECT {_COLUMNS} FROM templates WHERE name = $1 AND version = $2 AND retired_at IS NULL"
)
_RETIRED = """
SELECT version, coalesce(retired_reason, 'retired') AS reason FROM templates
WHERE name = $1 AND ($2::integer IS NULL OR version = $2) AND retired_at IS NOT NULL
  AND ($2::integer IS NOT NULL OR NOT EXISTS (
      SELECT 1 FROM templates n WHERE n.name = $1 AND n.retired_at IS NULL
                                  AND n.version > templates.version))
ORDER BY version DESC LIMIT 1
"""
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
) -> TemplateRow | RetiredVersion | None:
    if version is None:
        record = await conn.fetchrow(_ACTIVE, name)
    else:
        record = await conn.fetchrow(_VERSION, name, version)
    if record is not None:
        return _row(tenant, record)
    retired = await conn.fetchrow(_RETIRED, name, version)
    return None if retired is None else RetiredVersion(int(retired["version"]), retired["reason"])


async def lookup_template_async(
    pool: Pool, tenant_id: str | uuid.UUID, name: str, version: int | None
) -> TemplateRow | RetiredVersion | None:
    """Unit of work: the tenant's template ``name`` at ``version`` (None: the active one);
    a :class:`RetiredVersion` when that version (or, for the active one, the newest) is
    retired; None when there is none."""
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
