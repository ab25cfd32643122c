"""PostgreSQL: the schema (versioned migrations), its roles, and tenant-scoped units of work.

- :mod:`providers.db.migrate`: ordered SQL migrations under an advisory lock
  (:func:`migrate` from Trio, :func:`migrate_async` on the asyncio side).
- :mod:`providers.db.roles`: the roles and :func:`verify_runtime_role_async`.
- :mod:`providers.db.tenancy`: :func:`tenant_transaction` and
  :func:`relay_transaction`, the only ways a unit of work should touch tenant tables.

The SQL files live in ``providers/db/migrations/``; ``0001_core.sql`` draws the
tables and the dispatch status machine, ``0002_tenancy.sql`` the roles, grants
and row-level security.
"""

from providers.db.migrate import (
    LOCK_KEY,
    MIGRATIONS_DIR,
    ChecksumMismatch,
    Migration,
    MigrationError,
    MigrationFailed,
    MigrationOrderError,
    applied_migrations_async,
    load_migrations,
    migrate,
    migrate_async,
)
from providers.db.roles import (
    APP_ROLE,
    DAEMON_ROLE,
    RELAY_ROLE,
    RLS_TABLES,
    TENANT_SETTING,
    TENANT_TABLES,
    UnsafeRoleError,
    verify_runtime_role_async,
)
from providers.db.tenancy import (
    Isolation,
    relay_transaction,
    run_as_relay,
    run_in_tenant,
    tenant_transaction,
)

__all__ = [
    "APP_ROLE",
    "DAEMON_ROLE",
    "LOCK_KEY",
    "MIGRATIONS_DIR",
    "RELAY_ROLE",
    "RLS_TABLES",
    "TENANT_SETTING",
    "TENANT_TABLES",
    "ChecksumMismatch",
    "Isolation",
    "Migration",
    "MigrationError",
    "MigrationFailed",
    "MigrationOrderError",
    "UnsafeRoleError",
    "applied_migrations_async",
    "load_migrations",
    "migrate",
    "migrate_async",
    "relay_transaction",
    "run_as_relay",
    "run_in_tenant",
    "tenant_transaction",
    "verify_runtime_role_async",
]
