"""Schema migrations against a real PostgreSQL, and what the migrated schema guarantees.

Every database touch is one asyncio unit of work crossing the bridge once
(``run(fn, ...)``); nothing here mocks the server.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import trio

from providers.bridge import run
from providers.db import (
    LOCK_KEY,
    MIGRATIONS_DIR,
    ChecksumMismatch,
    MigrationError,
    MigrationFailed,
    MigrationOrderError,
    load_migrations,
    migrate,
    migrate_async,
)
from providers.db.migrate import checksum, plan

REPO = Path(__file__).resolve().parents[2]

# -- asyncio units of work used by the tests -----------------------------------------------


async def fetch(url: str, query: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(query, *args)
    finally:
        await conn.close()


async def fetchval(url: str, query: str, *args: object) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(query, *args)
    finally:
        await conn.close()


async def recorded(url: str) -> list[tuple[str, str, str]]:
    rows = await fetch(
        url, "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
    )
    return [(r["version"], r["name"], r["checksum"]) for r in rows]


WAITING_FOR_LOCK = """
SELECT count(*) FROM pg_locks
WHERE locktype = 'advisory' AND NOT granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


async def wait_for_lock_waiters(url: str, count: int) -> None:
    """Poll (bounded by the caller's deadline) until ``count`` sessions wait for the lock."""
    while True:
        if await run(fetchval, url, WAITING_FOR_LOCK) == count:
            return
        await trio.sleep(0.01)


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


# Each migration appends its version to a log, so the order of application shows.
LOGGED = {
    "0001_log.sql": "CREATE TABLE log (version text, at timestamptz DEFAULT clock_timestamp());"
    " INSERT INTO log (version) VALUES ('0001');",
    "0002_second.sql": "INSERT INTO log (version) VALUES ('0002');",
    "0010_tenth.sql": "INSERT INTO log (version) VALUES ('0010');",
    "0003_third.sql": "INSERT INTO log (version) VALUES ('0003');",
}


# -- applying ---------------------------------------------------------------------------


async def test_shipped_migrations_apply_in_order_and_record_themselves(
    bridge: object, postgres_url: str
) -> None:
    files = load_migrations()
    assert [m.path.name for m in files][:2] == ["0001_core.sql", "0002_tenancy.sql"]
    assert await migrate(postgres_url) == [m.version for m in files]
    assert await run(recorded, postgres_url) == [(m.version, m.name, m.checksum) for m in files]
    # Each in its own transaction: applied_at (the transaction's start) never goes back.
    times = await run(
        fetch, postgres_url, "SELECT applied_at FROM schema_migrations ORDER BY version"
    )
    assert [r["applied_at"] for r in times] == sorted(r["applied_at"] for r in times)


async def test_migrations_apply_in_version_order(
    bridge: object, postgres_url: str, tmp_path: Path
) -> None:
    directory = write(tmp_path / "m", LOGGED)
    assert await migrate(postgres_url, directory=directory) == ["0001", "0002", "0003", "0010"]
    rows = await run(fetch, postgres_url, "SELECT version FROM log ORDER BY at")
    assert [r["version"] for r in rows] == ["0001", "0002", "0003", "0010"]


async def test_running_again_applies_nothing(bridge: object, postgres_url: str) -> None:
    assert await migrate(postgres_url)
    before = await run(fetch, postgres_url, "SELECT * FROM schema_migrations ORDER BY version")
    assert await migrate(postgres_url) == []
    assert await migrate(postgres_url) == []
    after = await run(fetch, postgres_url, "SELECT * FROM schema_migrations ORDER BY version")
    assert after == before


async def test_new_migration_is_applied_after_the_old_ones(
    bridge: object, postgres_url: str, tmp_path: Path
) -> None:
    directory = write(tmp_path / "m", {k: LOGGED[k] for k in ("0001_log.sql", "0002_second.sql")})
    assert await migrate(postgres_url, directory=directory) == ["0001", "0002"]
    write(directory, {"0003_third.sql": LOGGED["0003_third.sql"]})
    assert await migrate(postgres_url, directory=directory) == ["0003"]


async def test_two_migrators_at_once_apply_each_migration_once(
    bridge: object, postgres_url: str, tmp_path: Path
) -> None:
    # Not idempotent on purpose: applied twice, 0002 would fail on the duplicate table.
    directory = write(
        tmp_path / "m",
        {"0001_log.sql": LOGGED["0001_log.sql"], "0002_once.sql": "CREATE TABLE once ();"},
    )
    holder = await run(asyncpg.connect, postgres_url)
    try:
        # Hold the lock so both migrators are provably waiting at the same time.
        await run(holder.execute, "SELECT pg_advisory_lock($1)", LOCK_KEY)
        results: list[list[str]] = []

        async def one() -> None:
            results.append(await migrate(postgres_url, directory=directory))

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(one)
                nursery.start_soon(one)
                await wait_for_lock_waiters(postgres_url, 2)
                await run(holder.execute, "SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await run(holder.close)
    assert sorted(results) == [[], ["0001", "0002"]]
    assert [v for v, _, _ in await run(recorded, postgres_url)] == ["0001", "0002"]


async def test_cancelled_migrate_gives_up_its_place_in_the_queue(
    bridge: object, postgres_url: str
) -> None:
    holder = await run(asyncpg.connect, postgres_url)
    try:
        await run(holder.execute, "SELECT pg_advisory_lock($1)", LOCK_KEY)
        with trio.move_on_after(0.5) as scope:
            await migrate(postgres_url)
        assert scope.cancelled_caught
        with trio.fail_after(10):
            await wait_for_lock_waiters(postgres_url, 0)  # the server-side wait ended too
        await run(holder.execute, "SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await run(holder.close)
    assert await migrate(postgres_url) == [m.version for m in load_migrations()]


async def test_borrowed_connection_is_left_open_unlocked_and_idle(
    bridge: object, postgres_url: str
) -> None:
    async def unit() -> tuple[list[str], bool, int]:
        conn = await asyncpg.connect(postgres_url)
        try:
            applied = await migrate_async(conn)
            held = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            )
            return applied, conn.is_in_transaction(), held
        finally:
            await conn.close()

    applied, in_transaction, held = await run(unit)
    assert applied == [m.version for m in load_migrations()]
    assert not in_transaction
    assert held == 0


async def test_connection_in_a_transaction_is_refused(bridge: object, postgres_url: str) -> None:
    async def unit() -> str:
        conn = await asyncpg.connect(postgres_url)
        try:
            async with conn.transaction():
                try:
                    await migrate_async(conn)
                except MigrationError as exc:
                    return str(exc)
            return "applied"
        finally:
            await conn.close()

    assert "outside any transaction" in await run(unit)


# -- refusing -------------------------------------------------------------------------


async def test_tampered_migration_is_refused_naming_the_file(
    bridge: object, postgres_url: str, tmp_path: Path
) -> None:
    directory = tmp_path / "m"
    shutil.copytree(MIGRATIONS_DIR, directory)
    assert await migrate(postgres_url, directory=directory)
    core = directory / "0001_core.sql"
    core.write_text(core.read_text() + "\nCREATE TABLE sneaky ();\n")
    write(directory, {"0999_later.sql": "CREATE TABLE later ();"})
    with pytest.raises(ChecksumMismatch) as caught:
        await migrate(postgres_url, directory=directory)
    assert caught.value.path == core
    assert caught.value.version == "0001"
    assert str(core) in str(caught.value)
    assert "never change" in str(caught.value)
    # Refused before anything ran: neither the edit nor the later file was applied.
    assert await run(fetchval, postgres_url, "SELECT to_regclass('sneaky') IS NULL")
    assert await run(fetchval, postgres_url, "SELECT to_regclass('later') IS NULL")
    assert "0999" not in [v for v, _, _ in await run(recorded, postgres_url)]


async def test_failing_migration_rolls_back_names_the_file_and_keeps_the_earlier_ones(
    bridge: object, postgres_url: str, tmp_path: Path
) -> None:
    directory = write(
        tmp_path / "m",
        {
            "0001_log.sql": LOGGED["0001_log.sql"],
            "0002_broken.sql": "CREATE TABLE half (); SELECT 1 / 0;",
            "0003_third.sql": LOGGED["0003_third.sql"],
        },
    )
    with pytest.raises(MigrationFailed) as caught:
        await migrate(postgres_url, directory=directory)
    assert caught.value.path == directory / "0002_broken.sql"
    assert "0002_broken.sql" in str(caught.value)
    assert isinstance(caught.value.__cause__, asyncpg.DivisionByZeroError)
    assert [v for v, _, _ in await run(recorded, postgres_url)] == ["0001"]
    assert await run(fetchval, postgres_url, "SELECT to_regclass('half') IS NULL")
    # Fixed (it was never applied, so it may change), the run goes on where it stopped.
    write(directory, {"0002_broken.sql": "CREATE TABLE half ();"})
    assert await migrate(postgres_url, directory=directory) == ["0002", "0003"]


async def test_file_numbered_below_an_applied_version_is_refused(
    bridge: object, postgres_url: str, tmp_path: Path
) -> None:
    directory = write(tmp_path / "m", {k: LOGGED[k] for k in ("0001_log.sql", "0003_third.sql")})
    assert await migrate(postgres_url, directory=directory) == ["0001", "0003"]
    write(directory, {"0002_second.sql": LOGGED["0002_second.sql"]})  # merged late
    with pytest.raises(
        MigrationOrderError, match=r"0002_second\.sql: not applied.*renumber it above 0003"
    ):
        await migrate(postgres_url, directory=directory)


async def test_recorded_version_whose_file_is_gone_is_refused(
    bridge: object, postgres_url: str, tmp_path: Path
) -> None:
    directory = write(
        tmp_path / "m",
        {k: LOGGED[k] for k in ("0001_log.sql", "0002_second.sql", "0003_third.sql")},
    )
    assert await migrate(postgres_url, directory=directory)
    (directory / "0002_second.sql").unlink()
    with pytest.raises(MigrationOrderError, match=r"version 0002 .* no file 0002_"):
        await migrate(postgres_url, directory=directory)


async def test_renamed_migration_is_refused(
    bridge: object, postgres_url: str, tmp_path: Path
) -> None:
    directory = write(tmp_path / "m", {k: LOGGED[k] for k in ("0001_log.sql", "0002_second.sql")})
    assert await migrate(postgres_url, directory=directory)
    (directory / "0002_second.sql").rename(directory / "0002_renamed.sql")
    with pytest.raises(MigrationOrderError, match=r"applied as 0002_second\.sql.*never renamed"):
        await migrate(postgres_url, directory=directory)


def test_versions_recorded_above_the_newest_file_are_left_alone() -> None:
    # A newer release migrated this database; the older one beside it still starts.
    migrations = load_migrations()
    newest = int(migrations[-1].version)
    applied = {m.version: (m.name, m.checksum) for m in migrations}
    applied[f"{newest + 1:04d}"] = ("from_the_future", "0" * 64)
    assert plan(migrations, applied) == []


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("1_short.sql", "not a migration name"),
        ("0004-dash.sql", "not a migration name"),
        ("0004_Upper.sql", "not a migration name"),
        ("0001_again.sql", "also used by"),
    ],
)
def test_badly_named_files_are_refused(tmp_path: Path, name: str, error: str) -> None:
    write(tmp_path, {"0001_first.sql": "SELECT 1;", name: "SELECT 1;"})
    with pytest.raises(MigrationOrderError, match=error):
        load_migrations(tmp_path)


def test_checksum_ignores_line_ending_style() -> None:
    assert checksum("SELECT 1;\r\nSELECT 2;\r\n") == checksum("SELECT 1;\nSELECT 2;\n")
    assert checksum("SELECT 1;\n") != checksum("SELECT 2;\n")


def test_other_files_in_the_directory_are_ignored(tmp_path: Path) -> None:
    write(tmp_path, {"0001_first.sql": "SELECT 1;", "README.md": "notes"})
    assert [m.path.name for m in load_migrations(tmp_path)] == ["0001_first.sql"]


# -- triage migrate --------------------------------------------------------------------


def triage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "TRIAGE_POSTGRES_URL"}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "supervisors.cli", *args],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_migrate_applies_then_reports_up_to_date(postgres_url: str) -> None:
    first = triage("migrate", "--dsn", postgres_url)
    assert first.returncode == 0, first.stderr
    names = [m.path.name for m in load_migrations()]
    assert first.stdout.splitlines() == [
        *(f"applied {name}" for name in names),
        f"{len(names)} migrations applied",
    ]
    again = triage("migrate", "--dsn", postgres_url)
    assert again.returncode == 0, again.stderr
    assert again.stdout == "up to date: no pending migrations\n"


def test_cli_migrate_takes_the_url_from_the_environment(postgres_url: str) -> None:
    done = triage("migrate", env={"TRIAGE_POSTGRES_URL": postgres_url})
    assert done.returncode == 0, done.stderr
    assert "applied 0001_core.sql" in done.stdout


def test_cli_migrate_takes_the_url_from_the_config(postgres_url: str, tmp_path: Path) -> None:
    config = tmp_path / "triage.toml"
    config.write_text(
        "[daemon]\ndrain_s = 25\nmax_label_values = 100\ndetector_tick_s = 1\n\n"
        f'[services]\npostgres_url = "{postgres_url}"\n'
    )
    done = triage("migrate", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert "applied 0001_core.sql" in done.stdout


def test_cli_migrate_without_a_database_says_so() -> None:
    done = triage("migrate")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "no PostgreSQL configured" in done.stderr
    assert "--dsn" in done.stderr and "TRIAGE_POSTGRES_URL" in done.stderr


def test_cli_migrate_reports_an_unreachable_server_without_the_password() -> None:
    # Port 1 on loopback: nothing listens, the connection is refused at once.
    done = triage("migrate", "--dsn", "postgresql://admin:s3cret@127.0.0.1:1/triage")
    assert done.returncode == 1
    assert "triage migrate: postgresql://admin:***@127.0.0.1:1/triage" in done.stderr
    assert "s3cret" not in done.stderr


def test_cli_migrate_reports_a_tampered_file(postgres_url: str) -> None:
    # The shipped files cannot be edited here: record a wrong checksum instead.
    assert triage("migrate", "--dsn", postgres_url).returncode == 0
    asyncio.run(
        fetch(postgres_url, "UPDATE schema_migrations SET checksum = 'x' WHERE version = '0001'")
    )
    done = triage("migrate", "--dsn", postgres_url)
    assert done.returncode == 1
    assert "0001_core.sql: changed after it was applied" in done.stderr


# -- what the migrated schema guarantees ------------------------------------------------

STATUSES = ("queued", "dispatched", "delivered", "failed", "undeliverable", "unknown")
# The documented machine (0001_core.sql), besides writing the same status again.
ALLOWED = {
    ("queued", "dispatched"),
    ("queued", "failed"),
    ("queued", "undeliverable"),
    ("dispatched", "delivered"),
    ("dispatched", "failed"),
    ("dispatched", "undeliverable"),
    ("dispatched", "unknown"),
    ("unknown", "delivered"),
    ("unknown", "failed"),
    ("unknown", "undeliverable"),
}
# How a dispatch reaches each status from queued.
PATHS = {
    "queued": (),
    "dispatched": ("dispatched",),
    "delivered": ("dispatched", "delivered"),
    "failed": ("failed",),
    "undeliverable": ("undeliverable",),
    "unknown": ("dispatched", "unknown"),
}


async def test_dispatch_status_machine_refuses_illegal_transitions(
    bridge: object, postgres_url: str
) -> None:
    await migrate(postgres_url)

    async def unit() -> dict[tuple[str, str], str]:
        # As the superuser: the guard is a trigger, it holds for every role.
        conn = await asyncpg.connect(postgres_url)
        outcomes: dict[tuple[str, str], str] = {}
        try:
            tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('t') RETURNING id")
            for old in STATUSES:
                for new in STATUSES:
                    dispatch = await conn.fetchval(
                        "INSERT INTO dispatches (tenant_id, channel, template, recipient)"
                        " VALUES ($1, 'sms', 'reminder', '+15550100') RETURNING id",
                        tenant,
                    )
                    for step in PATHS[old]:
                        await conn.execute(
                            "UPDATE dispatches SET status = $2, reason = 'r' WHERE id = $1",
                            dispatch,
                            step,
                        )
                    try:
                        await conn.execute(
                            "UPDATE dispatches SET status = $2, reason = 'r' WHERE id = $1",
                            dispatch,
                            new,
                        )
                        outcomes[old, new] = "ok"
                    except asyncpg.CheckViolationError as exc:
                        assert exc.constraint_name == "dispatches_status_transition"
                        assert f"{old} -> {new}" in str(exc)
                        outcomes[old, new] = "refused"
        finally:
            await conn.close()
        return outcomes

    outcomes = await run(unit)
    expected = {
        (old, new): "ok" if old == new or (old, new) in ALLOWED else "refused"
        for old in STATUSES
        for new in STATUSES
    }
    assert outcomes == expected


async def test_dispatch_starts_queued_and_outcomes_carry_a_reason(
    bridge: object, postgres_url: str
) -> None:
    await migrate(postgres_url)

    async def unit() -> list[str]:
        conn = await asyncpg.connect(postgres_url)
        errors: list[str] = []
        try:
            tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('t') RETURNING id")
            insert = (
                "INSERT INTO dispatches (tenant_id, channel, template, recipient, status)"
                " VALUES ($1, 'sms', 'reminder', '+15550100', $2) RETURNING id"
            )
            for statement, args in [
                (insert, (tenant, "dispatched")),
                (insert, (tenant, "bogus")),
            ]:
                try:
                    await conn.execute(statement, *args)
                except asyncpg.CheckViolationError as exc:
                    errors.append(exc.constraint_name or str(exc))
            dispatch = await conn.fetchval(insert, tenant, "queued")
            try:
                await conn.execute(
                    "UPDATE dispatches SET status = 'failed' WHERE id = $1", dispatch
                )
            except asyncpg.CheckViolationError as exc:
                errors.append(exc.constraint_name or "")
            # Two dispatches with one idempotency key: the second is refused.
            keyed = (
                "INSERT INTO dispatches (tenant_id, idempotency_key, channel, template, recipient)"
                " VALUES ($1, 'k1', 'sms', 'reminder', '+15550100')"
            )
            await conn.execute(keyed, tenant)
            try:
                await conn.execute(keyed, tenant)
            except asyncpg.UniqueViolationError as exc:
                errors.append(exc.constraint_name or "")
        finally:
            await conn.close()
        return errors

    errors = await run(unit)
    assert errors[0] == "dispatches_status_transition"
    assert "dispatch_status" in errors[1]  # the domain's check
    assert errors[2:] == ["dispatches_reason_required", "dispatches_idempotency_key"]


async def test_outbox_numbers_events_per_aggregate_in_commit_order(
    bridge: object, postgres_url: str
) -> None:
    await migrate(postgres_url)

    async def unit() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(postgres_url)
        try:
            tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('t') RETURNING id")
            for aggregate, given_seq in [("a", 7), ("b", 7), ("a", 7), ("a", 1), ("b", 1)]:
                # Writers cannot choose seq or id: any given value is replaced.
                await conn.execute(
                    "INSERT INTO outbox (id, tenant_id, aggregate_type, aggregate_id, seq,"
                    " subject, payload) VALUES (1, $1, 'dispatch', $2, $3, 'ev', '{}')",
                    tenant,
                    aggregate,
                    given_seq,
                )
            return await conn.fetch("SELECT aggregate_id, seq, id FROM outbox ORDER BY id")
        finally:
            await conn.close()

    rows = await run(unit)
    assert [(r["aggregate_id"], r["seq"]) for r in rows] == [
        ("a", 1),
        ("b", 1),
        ("a", 2),
        ("a", 3),
        ("b", 2),
    ]
    assert len({r["id"] for r in rows}) == 5


async def test_outbox_writers_of_one_aggregate_wait_for_each_other(
    bridge: object, postgres_url: str
) -> None:
    await migrate(postgres_url)

    async def unit() -> list[tuple[int, int]]:
        first = await asyncpg.connect(postgres_url)
        second = await asyncpg.connect(postgres_url)
        insert = (
            "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, subject, payload)"
            " VALUES ($1, 'dispatch', 'a', 'ev', '{}')"
        )
        try:
            tenant = await first.fetchval("INSERT INTO tenants (name) VALUES ('t') RETURNING id")
            async with first.transaction():
                await first.execute(insert, tenant)
                # The second writer blocks on the aggregate's counter until the first commits.
                waiting = asyncio.ensure_future(second.execute(insert, tenant))
                await asyncio.sleep(0.2)
                assert not waiting.done()
            await waiting
            rows = await first.fetch("SELECT seq, id FROM outbox ORDER BY seq")
            return [(r["seq"], r["id"]) for r in rows]
        finally:
            await first.close()
            await second.close()

    rows = await run(unit)
    assert [seq for seq, _ in rows] == [1, 2]
    assert rows[0][1] < rows[1][1]  # within an aggregate, id order is seq order


async def test_one_active_version_per_template(bridge: object, postgres_url: str) -> None:
    await migrate(postgres_url)

    async def unit() -> str:
        conn = await asyncpg.connect(postgres_url)
        try:
            tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('t') RETURNING id")
            insert = (
                "INSERT INTO templates (tenant_id, name, version, channel, body, active)"
                " VALUES ($1, 'reminder', $2, 'sms', 'Your appointment is at {time}', true)"
            )
            await conn.execute(insert, tenant, 1)
            try:
                await conn.execute(insert, tenant, 2)
            except asyncpg.UniqueViolationError as exc:
                return exc.constraint_name or ""
            return "accepted"
        finally:
            await conn.close()

    assert await run(unit) == "templates_one_active"
