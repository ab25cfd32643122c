"""The thread service on real PostgreSQL, as the daemon's role: row 12's two checks, one count."""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from actors.alerts import _fields
from actors.thread_service import (
    APPLICATION,
    DATABASE,
    METRIC,
    CrossTenantParticipant,
    CrossTenantRefused,
    Participant,
    ThreadNotFound,
    ThreadService,
)
from config.schema import DatabaseConfig, ThreadsConfig
from engine.detectors import CountInWindowDetector
from engine.events import Event, EventBus
from providers.bridge import run
from providers.db import DAEMON_ROLE, migrate
from providers.db.pool import DbPool, open_pool
from providers.db.tenancy import tenant_transaction
from providers.services import postgres_url_with

DB_CONFIG = DatabaseConfig(pool_min=1, pool_max=2, connect_timeout_s=2.0, command_timeout_s=2.0)


class Unchecked(ThreadService):
    """The bug of row 12: the application check is bypassed."""

    def check(self, tenant_id: uuid.UUID, thread_id: uuid.UUID, participant: Participant) -> None:
        return None


@dataclass
class World:
    admin_url: str
    daemon_url: str
    db: DbPool
    a: uuid.UUID
    b: uuid.UUID


async def _tenants(url: str) -> list[uuid.UUID]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("INSERT INTO tenants (name) VALUES ('a'), ('b') RETURNING id")
        return [r["id"] for r in rows]
    finally:
        await conn.close()


@pytest.fixture
async def world(bridge: object, postgres_url: str) -> AsyncIterator[World]:
    await migrate(postgres_url)
    a, b = await run(_tenants, postgres_url)
    daemon_url = postgres_url_with(postgres_url, user=DAEMON_ROLE)
    async with open_pool(daemon_url, DB_CONFIG, close_s=2.0) as db:
        yield World(postgres_url, daemon_url, db, a, b)


def _service(
    world: World, cls: type[ThreadService] = ThreadService
) -> tuple[ThreadService, CollectorRegistry, list[Event], CountInWindowDetector]:
    registry = CollectorRegistry()
    bus = EventBus()
    seen: list[Event] = []
    bus.on(CrossTenantRefused, seen.append)
    detector = CountInWindowDetector(
        "tenant", metric=METRIC, threshold=0, window_s=300.0, buckets=10, row=12
    )
    service = cls(world.db, ThreadsConfig(), registry=registry, events=bus, detector=detector)
    return service, registry, seen, detector


async def _rows(url: str, sql: str, *args: object) -> list[tuple[object, ...]]:
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r.values()) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def test_threads_participants_and_receipts_for_one_tenant(world: World) -> None:
    service, _, seen, _ = _service(world)
    thread = await service.create_thread(world.a, "visit")
    assert await service.add_participant(world.a, thread, Participant(
        tenant_id=world.a, participant_id="patient-1", role="patient"))  # fmt: skip
    assert not await service.add_participant(
        world.a, thread, Participant(tenant_id=world.a, participant_id="patient-1", role="patient")
    )  # already there
    await service.add_participant(
        world.a, thread, Participant(tenant_id=world.a, participant_id="dr-2", role="clinician")
    )
    people = await service.participants(world.a, thread)
    assert [(p.participant_id, p.role, p.tenant_id) for p in people] == [
        ("patient-1", "patient", world.a),
        ("dr-2", "clinician", world.a),
    ]
    first = await service.mark_read(world.a, thread, "dr-2")
    second = await service.mark_read(world.a, thread, "patient-1")
    assert first.read_at < second.read_at
    assert [r.id for r in await service.receipts(world.a, thread)] == [first.id, second.id]
    # B sees none of it.
    assert await service.participants(world.b, thread) == []
    assert await service.receipts(world.b, thread) == []
    assert service.statistics().participants_added == 2
    assert seen == []


async def test_the_application_check_refuses_and_counts(world: World) -> None:
    service, registry, seen, detector = _service(world)
    thread = await service.create_thread(world.a, "visit with private topic")
    intruder = Participant(tenant_id=world.b, participant_id="patient-secret", role="patient")
    with pytest.raises(CrossTenantParticipant) as refused:
        await service.add_participant(world.a, thread, intruder)
    error = refused.value
    assert (error.check, error.sqlstate) == (APPLICATION, None)
    message = str(error)
    assert str(world.a) in message and str(world.b) in message  # both tenants named
    assert "patient-secret" not in message and "private topic" not in message  # no PHI
    labels = {"check": APPLICATION}
    assert registry.get_sample_value(METRIC, labels) == 1.0
    assert detector.evaluate().firing
    [notice] = seen
    assert isinstance(notice, CrossTenantRefused)
    assert (notice.acting_tenant, notice.participant_tenant, notice.check) == (
        str(world.a), str(world.b), APPLICATION,
    )  # fmt: skip
    assert await run(_rows, world.admin_url, "SELECT * FROM thread_participants") == []


async def test_with_the_check_bypassed_rls_refuses_and_it_is_counted(world: World) -> None:
    service, registry, seen, detector = _service(world, Unchecked)
    thread = await service.create_thread(world.a, "visit")
    intruder = Participant(tenant_id=world.b, participant_id="patient-b", role="patient")
    # The bug writes B's participant into A's thread, acting as A ...
    with pytest.raises(CrossTenantParticipant) as as_a:
        await service.add_participant(world.a, thread, intruder)
    # ... or writes A's participant row while acting as B.
    with pytest.raises(CrossTenantParticipant) as as_b:
        await service.add_participant(
            world.b, thread, Participant(tenant_id=world.a, participant_id="p", role="patient")
        )
    for refused in (as_a.value, as_b.value):
        assert (refused.check, refused.sqlstate) == (DATABASE, "42501")
        assert "row-level security" not in str(refused)  # our message, tenants by id only
        assert isinstance(refused.__cause__, asyncpg.InsufficientPrivilegeError)
    assert registry.get_sample_value(METRIC, {"check": DATABASE}) == 2.0
    assert registry.get_sample_value(METRIC, {"check": APPLICATION}) == 0.0  # exported at 0
    assert detector.evaluate().value == 2.0
    assert [n.check for n in seen if isinstance(n, CrossTenantRefused)] == [DATABASE, DATABASE]
    # B acting on A's thread with its own participant: the thread is not found (RLS
    # hides it); nothing counted, nothing written.
    with pytest.raises(ThreadNotFound):
        await service.add_participant(world.b, thread, intruder)
    assert registry.get_sample_value(METRIC, {"check": DATABASE}) == 2.0
    assert await run(_rows, world.admin_url, "SELECT * FROM thread_participants") == []


async def test_daemon_role_cross_tenant_insert_refused_without_the_application(
    world: World,
) -> None:
    """Raw SQL as triage_daemon (no application code at all): every shape of a
    cross-tenant participant is refused by RLS; the owner is held by the foreign key."""
    [(thread_a,)] = await run(
        _rows, world.admin_url,
        "INSERT INTO threads (tenant_id, topic) VALUES ($1, 't') RETURNING id", world.a,
    )  # fmt: skip
    insert = (
        "INSERT INTO thread_participants (thread_id, tenant_id, participant_id, role)"
        " VALUES ($1, $2, $3, 'patient')"
    )

    async def as_daemon(acting: uuid.UUID, row_tenant: uuid.UUID) -> str:
        conn = await asyncpg.connect(world.daemon_url)
        try:
            user = await conn.fetchval("SELECT current_user")
            assert user == DAEMON_ROLE
            async with tenant_transaction(conn, acting):
                return str(await conn.execute(insert, thread_a, row_tenant, "x"))
        except asyncpg.PostgresError as exc:
            return str(exc.sqlstate)
        finally:
            await conn.close()

    assert await run(as_daemon, world.a, world.b) == "42501"  # B's participant, acting as A
    assert await run(as_daemon, world.b, world.a) == "42501"  # A's row, acting as B
    assert await run(as_daemon, world.b, world.b) == "42501"  # B's row on A's thread (0011)

    async def as_owner() -> str:
        conn = await asyncpg.connect(world.admin_url)
        try:
            await conn.execute(insert, thread_a, world.b, "x")
        except asyncpg.ForeignKeyViolationError:
            return "23503"
        finally:
            await conn.close()
        return "accepted"

    assert await run(as_owner) == "23503"
    assert await run(_rows, world.admin_url, "SELECT * FROM thread_participants") == []


async def test_receipts_take_the_database_time_not_the_callers(world: World) -> None:
    service, _, _, _ = _service(world)
    thread = await service.create_thread(world.a)
    await service.add_participant(
        world.a, thread, Participant(tenant_id=world.a, participant_id="p", role="patient")
    )

    async def forged() -> tuple[object, object]:
        conn = await asyncpg.connect(world.daemon_url)
        try:
            async with tenant_transaction(conn, world.a):
                row = await conn.fetchrow(
                    "INSERT INTO read_receipts (tenant_id, thread_id, participant_id, read_at)"
                    " VALUES ($1, $2, 'p', '2000-01-01') RETURNING read_at, clock_timestamp()",
                    world.a,
                    thread,
                )
                assert row is not None
                return row[0], row[1]
        finally:
            await conn.close()

    stored, database_now = await run(forged)
    assert isinstance(stored, dt.datetime) and isinstance(database_now, dt.datetime)
    # The trigger replaced the forged time with the database's, just before RETURNING.
    assert stored.year != 2000
    assert dt.timedelta(0) <= database_now - stored < dt.timedelta(seconds=5)


def test_the_notice_logs_as_the_alert_sink_logs_it() -> None:
    """The sink logs an event's fields as record extras: none may clash with LogRecord's."""
    notice = CrossTenantRefused(
        at=1.0, wall=2.0, severity="ticket", acting_tenant="a", participant_tenant="b",
        thread_id="t", check=DATABASE, sqlstate="42501",
    )  # fmt: skip
    logger = logging.getLogger("tests.threads")
    record = logger.makeRecord(
        logger.name, logging.ERROR, __file__, 1, "m", (), None, extra=_fields(notice)
    )
    assert (record.acting_tenant, record.thread_id) == ("a", "t")  # type: ignore[attr-defined]
