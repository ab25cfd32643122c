"""Row 5 on real PostgreSQL: writes spooled while the primary is stopped, replayed exactly once.

The module owns its server (the tests stop it); the session server stands in for
a replica (a fresh database on it), which is enough to see reads change side.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
import trio

from actors.db_writer import (
    DbGateway,
    DbWriterMessage,
    DbWriterStatistics,
    WriteOutcome,
    WriterState,
    apply_inbox,
    db_writer_child,
)
from config.schema import DatabaseConfig, MailboxConfig, SpoolConfig
from engine.actor import ActorRef
from engine.breaker import Breaker, CircuitState
from engine.clock import Clock
from engine.detectors import RateDetector, make_detector
from engine.errors import DatabaseUnavailable
from providers.db import DAEMON_ROLE, migrate_async
from providers.db.pool import DbPool, Pool, open_pool
from providers.db.tenancy import run_in_tenant
from providers.embedded import EmbeddedPostgres
from providers.services import postgres_url_with
from providers.spool import Spool
from tests.conftest import TEST_POSTGRES_SETTINGS

if TYPE_CHECKING:
    from providers.db.tenancy import Connection

DB_CONFIG = DatabaseConfig(pool_min=1, pool_max=2, connect_timeout_s=1.0, command_timeout_s=1.0)


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(settings=TEST_POSTGRES_SETTINGS) as server:
        yield server


@pytest.fixture(scope="module")
def tenant(own_postgres: EmbeddedPostgres) -> uuid.UUID:
    async def seed() -> uuid.UUID:
        conn = await asyncpg.connect(own_postgres.url)
        try:
            await migrate_async(conn)
            tenant_id: uuid.UUID = await conn.fetchval(
                "INSERT INTO tenants (name) VALUES ('spool') RETURNING id"
            )
            return tenant_id
        finally:
            await conn.close()

    return asyncio.run(seed())


def breaker(name: str) -> Breaker:
    return Breaker(
        name,
        fail_max=2,
        reset_timeout_s=0.2,
        reset_timeout_max_s=0.2,
        reset_backoff_multiplier=1.0,
        failure_rate_threshold=2.0,
        rate_window_s=1.0,
        minimum_calls=1,
        slow_call_s=1.0,
        slow_call_rate_threshold=2.0,
        half_open_max_calls=1,
    )


def detector() -> RateDetector:
    return make_detector(
        "db_connection_errors",
        kind="rate",
        metric="triage_db_connection_errors_total",
        threshold=0.5,
        window_s=2.0,
        buckets=10,
    ).expect(RateDetector)


@pytest.fixture
async def primary(
    bridge: object, own_postgres: EmbeddedPostgres, tenant: uuid.UUID
) -> AsyncIterator[DbPool]:
    url = postgres_url_with(own_postgres.url, user=DAEMON_ROLE)
    async with open_pool(url, DB_CONFIG, close_s=2.0) as pool:
        yield pool
    if not own_postgres.running:
        await trio.to_thread.run_sync(own_postgres.start)


async def _select_keys(conn: Connection) -> list[str]:
    rows = await conn.fetch("SELECT message_key FROM inbox ORDER BY received_at, message_key")
    return [str(row["message_key"]) for row in rows]


async def _inbox_keys(pool: Pool, tenant: str) -> list[str]:
    """The tenant's inbox keys, oldest first (as the daemon role: RLS applies)."""
    return await run_in_tenant(pool, tenant, _select_keys)


async def _inbox_count(url: str, prefix: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT message_key, count(*) AS n FROM inbox WHERE message_key LIKE $1"
            " GROUP BY message_key",
            prefix + "%",
        )
        return {str(row["message_key"]): int(row["n"]) for row in rows}
    finally:
        await conn.close()


def payload(tenant: uuid.UUID, key: str) -> dict[str, Any]:
    return {"tenant": str(tenant), "appointment": key, "source": "test"}


MAILBOX = MailboxConfig(capacity=16, overflow="drop_newest")
WALL = Clock().wall


def _stats(ref: ActorRef[DbWriterMessage]) -> DbWriterStatistics:
    stats: object = ref.statistics()
    assert isinstance(stats, DbWriterStatistics), stats
    return stats


async def _until(predicate: Any, timeout_s: float) -> bool:
    deadline = trio.current_time() + timeout_s
    while not predicate():
        if trio.current_time() >= deadline:
            return False
        await trio.sleep(0.02)
    return True


async def test_stop_spool_restart_replays_exactly_once(
    tmp_path: Path, own_postgres: EmbeddedPostgres, tenant: uuid.UUID, primary: DbPool
) -> None:
    config = SpoolConfig(path=str(tmp_path / "spool"), spoolable_kinds=["inbox"], replay_batch=4)
    spool = Spool(config.path, max_bytes=config.max_bytes)
    errors = detector()
    primary_breaker = breaker("postgres_primary")
    db = DbGateway(
        primary,
        primary_breaker,
        spool,
        config,
        appliers={"inbox": apply_inbox, "dispatch": apply_inbox},
        wall=WALL,
        connection_errors=errors,
    )
    spec, writer = db_writer_child(db, mailbox=MAILBOX, shutdown_s=2.0, probe_interval_s=0.1)
    prefix = f"w-{uuid.uuid4().hex[:8]}-"
    keys: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        for n in range(3):
            keys.append(f"{prefix}{n:03d}")
            assert await db.write("inbox", keys[-1], payload(tenant, keys[-1])) == (
                WriteOutcome.WRITTEN
            )
        assert db.unavailable() is None
        assert _stats(writer).state is WriterState.IDLE

        await trio.to_thread.run_sync(own_postgres.stop)
        for n in range(3, 15):
            keys.append(f"{prefix}{n:03d}")
            outcome = await db.write("inbox", keys[-1], payload(tenant, keys[-1]))
            assert outcome is WriteOutcome.SPOOLED
        with pytest.raises(DatabaseUnavailable):  # not a spoolable kind: a 503
            await db.write("dispatch", prefix + "x", payload(tenant, prefix + "x"))
        with pytest.raises(DatabaseUnavailable):  # no replica
            await db.read(_inbox_keys, str(tenant))
        assert db.unavailable() == "database unavailable"
        assert spool.count == 12 and [r.key for r in await spool.read_all()] == keys[3:]
        stats = _stats(writer)
        assert (stats.backlog, stats.written, stats.spooled) == (12, 3, 12)
        assert stats.state is WriterState.WAITING
        errors.evaluate()
        assert errors.firing

        await trio.to_thread.run_sync(own_postgres.start)
        assert await _until(lambda: _stats(writer).backlog == 0, 10), spool.count
        assert primary_breaker.state is CircuitState.CLOSED
        stats = _stats(writer)
        assert stats.replayed == 12 and stats.refused == 1 and stats.connection_errors >= 1
        assert stats.state is WriterState.IDLE
        nursery.cancel_scope.cancel()

    counts = await trio.to_thread.run_sync(
        lambda: asyncio.run(_inbox_count(own_postgres.url, prefix))
    )
    assert counts == dict.fromkeys(keys, 1)  # every accepted write exactly once; no "x"
    assert await db.read(_inbox_keys, str(tenant)) == keys  # replayed in order
    await trio.sleep(2.1)  # the window forgets the outage
    errors.evaluate()
    assert not errors.firing


async def test_replay_after_crash_applies_each_record_once(
    tmp_path: Path, tenant: uuid.UUID, primary: DbPool
) -> None:
    config = SpoolConfig(path=str(tmp_path / "spool"), spoolable_kinds=["inbox"], replay_batch=3)
    prefix = f"c-{uuid.uuid4().hex[:8]}-"
    keys = [f"{prefix}{n}" for n in range(5)]
    # A previous process spooled five writes, applied the first two and died before dropping them.
    before = Spool(config.path, max_bytes=config.max_bytes)
    await before.open()
    for key in keys:
        await before.append("inbox", key, payload(tenant, key))
    await before.aclose()
    for record in (await before.read_all())[:2]:
        await primary.run_unit(apply_inbox, record)

    spool = Spool(config.path, max_bytes=config.max_bytes)
    db = DbGateway(
        primary, breaker("postgres_primary"), spool, config, appliers={"inbox": apply_inbox},
        wall=WALL,
    )  # fmt: skip
    spec, writer = db_writer_child(db, mailbox=MAILBOX, shutdown_s=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        assert await _until(lambda: _stats(writer).backlog == 0, 5)
        assert _stats(writer).replayed == 5
        nursery.cancel_scope.cancel()
    rows = await primary.run_unit(_inbox_keys, str(tenant))
    assert sorted(k for k in rows if k.startswith(prefix)) == keys  # once each


async def test_reads_fall_to_the_replica_while_the_primary_is_down(
    tmp_path: Path, own_postgres: EmbeddedPostgres, primary: DbPool, postgres_url: str
) -> None:
    async def which(pool: Pool) -> str:
        name: str = await pool.fetchval("SELECT current_database()")
        return name

    config = SpoolConfig(path=str(tmp_path / "spool"))
    async with open_pool(postgres_url, DB_CONFIG, verify=False, close_s=2.0) as replica:
        primary_breaker = breaker("postgres_primary")
        db = DbGateway(
            primary,
            primary_breaker,
            Spool(config.path, max_bytes=config.max_bytes),
            config,
            appliers={"inbox": apply_inbox},
            wall=WALL,
            replica=replica,
            replica_breaker=breaker("postgres_replica"),
        )
        spec, writer = db_writer_child(db, mailbox=MAILBOX, shutdown_s=2.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(spec.start)
            assert await db.read(which) == "postgres"
            await trio.to_thread.run_sync(own_postgres.stop)
            replica_name = postgres_url.rsplit("/", 1)[1].split("?")[0]
            assert await db.read(which) == replica_name  # connection error: replica
            assert await db.read(which) == replica_name
            assert primary_breaker.state is CircuitState.OPEN
            assert await db.read(which) == replica_name  # breaker open: straight to the replica
            stats = _stats(writer)
            assert stats.replica_reads == 3
            assert stats.connection_errors >= 2  # the writer's own half-open probe may add one
            with pytest.raises(DatabaseUnavailable):  # writes never go to a replica
                await db.write("inbox", "r", {"tenant": str(uuid.uuid4()), "appointment": "r"})
            nursery.cancel_scope.cancel()
        await trio.to_thread.run_sync(own_postgres.start)
