"""Versioned SQL migrations, applied in order under a PostgreSQL advisory lock.

A migration is a file ``NNNN_name.sql`` in :data:`MIGRATIONS_DIR` (four digits,
then lower-case words joined by ``_``). :func:`migrate_async` applies the ones a
database lacks, in version order::

    pg_advisory_lock(LOCK_KEY)                 every migrator of this database queues here
    CREATE TABLE schema_migrations (if missing)
    check what is recorded against the files   refuses before changing anything
    for each pending file, in order:
        BEGIN; SET LOCAL row_security = off; <the file>; INSERT INTO schema_migrations; COMMIT
    pg_advisory_unlock(LOCK_KEY)

Invariants:

- Two daemons starting together apply each migration once: the second waits
  for the lock, then finds nothing to do.
- A migration applies whole or not at all (its own transaction, recorded in
  it). A file that fails raises :class:`MigrationFailed` naming the file; the
  ones before it stay applied. A file cannot use statements that refuse a
  transaction block (``CREATE INDEX CONCURRENTLY``, ``VACUUM``).
- An applied migration never changes: if its file's checksum (SHA-256 of the
  text, line endings normalised) differs from the recorded one,
  :class:`ChecksumMismatch` names the file and nothing is applied. A renamed
  file, a recorded version whose file is gone, or a new file numbered below an
  applied one are refused too (:class:`MigrationOrderError`). Versions recorded
  above the newest file are left alone: a newer release migrated this database
  and an older one is still running beside it.
- ``row_security = off`` inside each migration: a superuser is not affected;
  a non-superuser owner, whom FORCE ROW LEVEL SECURITY subjects to the
  policies, gets an error instead of a data migration that silently touches
  no rows.

Two sides, one crossing. :func:`migrate_async` is asyncio code (asyncpg); the
Trio side calls :func:`migrate`, which crosses the bridge once for the whole
run. Cancelling it cancels the server-side wait or statement; a connection this
module opened is then terminated, which ends the session and so releases the
lock and rolls back the migration in flight.

Errors::

    MigrationError                      (a TriageError)
    ├─ ChecksumMismatch                 an applied file was edited
    ├─ MigrationOrderError              renamed, missing or out-of-order files
    └─ MigrationFailed                  a file's SQL failed; the cause is chained

Connection failures are not wrapped: through the bridge they arrive as
``ProviderUnavailable`` / ``ProviderTimeout``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import msgspec

from engine.errors import TriageError
from providers import bridge

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]

__all__ = [
    "LOCK_KEY",
    "MIGRATIONS_DIR",
    "ChecksumMismatch",
    "Migration",
    "MigrationError",
    "MigrationFailed",
    "MigrationOrderError",
    "applied_migrations_async",
    "checksum",
    "load_migrations",
    "migrate",
    "migrate_async",
    "plan",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

# The advisory lock every migrator of a database takes: b"triage" then 0x0001.
# Advisory locks are per database, so databases on one server do not contend.
LOCK_KEY = 0x7472_6961_6765_0001

_FILE_NAME = re.compile(r"(?P<version>[0-9]{4})_(?P<name>[a-z0-9]+(?:_[a-z0-9]+)*)\.sql")

_CREATE_TABLE = """
CREATE TABLE schema_migrations (
    version     text PRIMARY KEY CHECK (version ~ '^[0-9]{4}$'),
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
_RECORD = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"


class MigrationError(TriageError):
    """The migrations cannot be applied; the message names the file and what to do."""


class ChecksumMismatch(MigrationError):
    """A migration that is already applied no longer matches its file."""

    def __init__(self, message: str, *, path: Path, version: str) -> None:
        super().__init__(message)
        self.path = path
        self.version = version


class MigrationOrderError(MigrationError):
    """The files and the recorded versions disagree on names or order."""


class MigrationFailed(MigrationError):
    """A migration's SQL failed; its transaction was rolled back and nothing was recorded."""

    def __init__(self, message: str, *, path: Path, version: str) -> None:
        super().__init__(message)
        self.path = path
        self.version = version


class Migration(msgspec.Struct, frozen=True, kw_only=True):
    """One migration file, read and checksummed."""

    version: str
    name: str
    path: Path
    sql: str
    checksum: str


def checksum(sql: str) -> str:
    """The SHA-256 (hex) of a migration's text, with CRLF line endings read as LF."""
    return hashlib.sha256(sql.replace("\r\n", "\n").encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in ``directory``, in version order.

    Every ``*.sql`` file must be named ``NNNN_name.sql`` and versions must be
    unique; other files are ignored.
    """
    migrations: list[Migration] = []
    seen: dict[str, Path] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise MigrationOrderError(
                f"{path}: not a migration name; expected NNNN_name.sql "
                "(four digits, lower-case words joined by '_')"
            )
        version = match["version"]
        if version in seen:
            raise MigrationOrderError(f"{path}: version {version} is also used by {seen[version]}")
        seen[version] = path
        try:
            sql = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise MigrationError(f"{path}: cannot read: {exc}") from exc
        migrations.append(
            Migration(
                version=version, name=match["name"], path=path, sql=sql, checksum=checksum(sql)
            )
        )
    return sorted(migrations, key=lambda m: int(m.version))


def plan(migrations: list[Migration], applied: dict[str, tuple[str, str]]) -> list[Migration]:
    """The migrations to apply, given ``applied`` (version -> (name, checksum)).

    Raises :class:`ChecksumMismatch` or :class:`MigrationOrderError` when the
    recorded history and the files disagree (see the module docstring).
    """
    known = {m.version: m for m in migrations}
    for version, (name, digest) in sorted(applied.items()):
        migration = known.get(version)
        if migration is None:
            continue
        if migration.name != name:
            raise MigrationOrderError(
                f"{migration.path}: version {version} was applied as {version}_{name}.sql; "
                "an applied migration is never renamed"
            )
        if migration.checksum != digest:
            raise ChecksumMismatch(
                f"{migration.path}: changed after it was applied (recorded checksum "
                f"{digest[:12]}..., file now {migration.checksum[:12]}...); an applied "
                "migration must never change: restore the file and add a new migration",
                path=migration.path,
                version=version,
            )
    if not migrations:
        return []
    newest_file = int(migrations[-1].version)
    missing = sorted((v for v in applied if v not in known and int(v) < newest_file), key=int)
    if missing:
        raise MigrationOrderError(
            f"version {missing[0]} is recorded in schema_migrations but no file "
            f"{missing[0]}_*.sql exists in {migrations[-1].path.parent}"
        )
    pending = [m for m in migrations if m.version not in applied]
    if pending and applied:
        newest_applied = max(applied, key=int)
        if int(pending[0].version) < int(newest_applied):
            raise MigrationOrderError(
                f"{pending[0].path}: not applied, but the later version {newest_applied} "
                f"already is; migrations apply in order: renumber it above {newest_applied}"
            )
    return pending


async def applied_migrations_async(conn: Connection) -> dict[str, tuple[str, str]]:
    """asyncio side: the recorded migrations, version -> (name, checksum); {} if none."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
    return {row["version"]: (row["name"], row["checksum"]) for row in rows}


async def migrate_async(
    target: Connection | str,
    *,
    directory: Path = MIGRATIONS_DIR,
    cleanup_timeout_s: float = 5.0,
) -> list[str]:
    """asyncio side: apply the pending migrations; return their versions in order.

    ``target`` is a DSN (a connection is opened and closed here) or an open
    connection outside any transaction (left open, lock released). Run it as
    the tables' owner or a superuser, never as the daemon's role.

    On an error or a cancellation, a connection opened here is closed politely
    (so asyncpg's cancel request reaches the server and a wait for the lock
    ends there too) within ``cleanup_timeout_s``, else dropped.
    """
    migrations = load_migrations(directory)  # a bad file fails before connecting
    if not isinstance(target, str):
        return await _migrate_locked(target, migrations, owned=False)
    conn = await asyncpg.connect(target)
    try:
        applied = await _migrate_locked(conn, migrations, owned=True)
    except BaseException:
        # Closing ends the session: its lock and any open transaction go with it.
        # Not terminate() at once: that would drop asyncpg's pending cancel request
        # and leave the backend queued for the lock until the holder lets go.
        try:
            await conn.close(timeout=cleanup_timeout_s)
        except Exception:
            conn.terminate()
        raise
    await conn.close(timeout=cleanup_timeout_s)
    return applied


async def migrate(target: Connection | str, *, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Trio side: :func:`migrate_async` in one bridge crossing (inside ``open_bridge()``)."""
    return await bridge.run(_migrate_positional, target, directory, service="postgres")


async def _migrate_positional(target: Connection | str, directory: Path) -> list[str]:
    return await migrate_async(target, directory=directory)


async def _migrate_locked(
    conn: Connection, migrations: list[Migration], *, owned: bool
) -> list[str]:
    if conn.is_in_transaction():
        raise MigrationError(
            "migrate needs a connection outside any transaction: "
            "each migration runs in a transaction of its own"
        )
    await conn.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
    try:
        done = await _apply(conn, migrations)
    except BaseException:
        if not owned:
            await _unlock_or_terminate(conn)
        raise
    await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    return done


async def _unlock_or_terminate(conn: Connection) -> None:
    # After a cancelled statement the connection may still be busy: a lock that
    # cannot be released politely is released by ending the session.
    try:
        await conn.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    except BaseException:
        conn.terminate()
        raise


async def _apply(conn: Connection, migrations: list[Migration]) -> list[str]:
    if not await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL"):
        await conn.execute(_CREATE_TABLE)  # under the lock: no other migrator races us
    pending = plan(migrations, await applied_migrations_async(conn))
    done: list[str] = []
    for migration in pending:
        try:
            async with conn.transaction():
                await conn.execute("SET LOCAL row_security = off")
                await conn.execute(migration.sql)
                await conn.execute(_RECORD, migration.version, migration.name, migration.checksum)
        except asyncpg.PostgresError as exc:
            if bridge.translate_error(exc, service="postgres") is not None:
                raise  # the server went away: the bridge maps it, it is not this file's fault
            raise MigrationFailed(
                f"{migration.path}: {type(exc).__name__}: {exc}",
                path=migration.path,
                version=migration.version,
            ) from exc
        done.append(migration.version)
    return done
