"""The database roles Triage uses, and the check that the daemon's role cannot defeat RLS.

Roles (created by migration ``0002_tenancy.sql``; cluster-wide)::

    triage_app     NOLOGIN  DML on tenant tables; policies admit the rows of the
                            tenant in the transaction-local setting triage.tenant_id
    triage_relay   NOLOGIN  every tenant's outbox / outbox_sequences / dead_letters
                            rows, no grant on any other tenant table
    triage_daemon  LOGIN    what the daemon connects as: NOSUPERUSER, NOBYPASSRLS,
                            owner of nothing; member of triage_app (inherited) and
                            of triage_relay without inheritance (SET ROLE only)

Migrations run as the tables' owner or a superuser (the configured admin DSN);
:func:`providers.services.postgres_url_with` (``user=DAEMON_ROLE``) derives the
daemon's URL from it, and :func:`verify_runtime_role_async` refuses a runtime
connection whose role would see through row-level security.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

from engine.errors import TriageError

if TYPE_CHECKING:
    import asyncpg
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

__all__ = [
    "APP_ROLE",
    "DAEMON_ROLE",
    "RELAY_ROLE",
    "RLS_TABLES",
    "TENANT_SETTING",
    "TENANT_TABLES",
    "UnsafeRoleError",
    "verify_runtime_role_async",
]

APP_ROLE = "triage_app"
RELAY_ROLE = "triage_relay"
DAEMON_ROLE = "triage_daemon"

# The transaction-local setting that names the current tenant (a uuid).
TENANT_SETTING = "triage.tenant_id"

# Tables with a tenant_id column: ENABLE + FORCE ROW LEVEL SECURITY, tenant policy.
TENANT_TABLES = (
    "dispatches",
    "outbox",
    "outbox_sequences",
    "inbox",
    "idempotency_keys",
    "dead_letters",
    "threads",
    "thread_participants",
    "templates",
    "category_blocks",
    "dead_recipients",
    "early_receipts",
    "attachments",
    "virtual_sessions",
    "fallback_threads",
    "join_tokens",
    "recordings",
    "read_receipts",
    "incidents",  # 0012: row 11's privacy incidents
    "erasures",  # 0013: row 15's erasure requests and their recorded steps
    "erasure_steps",
)
# Every table under row-level security (tenants: a tenant sees its own row).
RLS_TABLES = ("tenants", *TENANT_TABLES)


class UnsafeRoleError(TriageError):
    """The runtime connection's role could read or write across tenants; the message says why."""


_ROLE_FACTS = """
SELECT r.rolname, r.rolsuper, r.rolbypassrls,
       pg_has_role(current_user, $1, 'USAGE') AS inherits_relay
FROM pg_catalog.pg_roles r
WHERE r.rolname = current_user
"""

_TABLE_FACTS = """
SELECT t.name,
       c.oid IS NULL AS missing,
       coalesce(c.relrowsecurity AND c.relforcerowsecurity, false) AS forced,
       coalesce(pg_has_role(current_user, c.relowner, 'USAGE'), false) AS owner
FROM unnest($1::text[]) AS t(name)
LEFT JOIN pg_catalog.pg_class c ON c.oid = to_regclass(t.name)
ORDER BY t.name
"""


async def verify_runtime_role_async(conn: Connection) -> None:
    """asyncio side: raise :class:`UnsafeRoleError` unless ``conn``'s role is held by RLS.

    The role must not be a superuser nor BYPASSRLS, must not own (or inherit the
    owner of) any table under RLS, must not inherit triage_relay's cross-tenant
    rights, and every table must have row-level security enabled and forced.
    The daemon calls this once at start on its runtime connection.
    """
    role = await conn.fetchrow(_ROLE_FACTS, RELAY_ROLE)
    problems: list[str] = []
    if role is None:  # pragma: no cover - current_user always has a pg_roles row
        raise UnsafeRoleError("current_user has no pg_roles row")
    name = role["rolname"]
    if role["rolsuper"]:
        problems.append("is a superuser")
    if role["rolbypassrls"]:
        problems.append("has BYPASSRLS")
    if role["inherits_relay"]:
        problems.append(f"inherits {RELAY_ROLE} (grant it WITH INHERIT FALSE)")
    for row in await conn.fetch(_TABLE_FACTS, list(RLS_TABLES)):
        if row["missing"]:
            problems.append(f"cannot see table {row['name']} (schema not migrated?)")
            continue
        if row["owner"]:
            problems.append(f"owns table {row['name']}")
        if not row["forced"]:
            problems.append(f"table {row['name']} lacks ENABLE + FORCE ROW LEVEL SECURITY")
    if problems:
        raise UnsafeRoleError(
            f"role {name} cannot be trusted with tenant data: " + "; ".join(problems)
        )
