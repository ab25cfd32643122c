"""Migration 0006: attachment rows, their guarded status machine, what triage_relay may read."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest

from bench.chaos.fixtures import create_tenants
from providers.bridge import run
from providers.db import DAEMON_ROLE, migrate
from providers.db.attachments import (
    AttachmentStatus,
    NewAttachment,
    ScanRecord,
    get_attachment,
    insert_attachment,
    pending_attachments,
    record_scans,
)
from providers.db.tenancy import run_as_relay, run_in_tenant
from providers.services import postgres_url_with

SHA = "a" * 64


@dataclass
class World:
    pool: asyncpg.Pool[asyncpg.Record]
    a: uuid.UUID
    b: uuid.UUID


@pytest.fixture
async def world(bridge: object, postgres_url: str) -> AsyncIterator[World]:
    await migrate(postgres_url)
    a, b = await run(create_tenants, postgres_url, 2)
    create = functools.partial(
        asyncpg.create_pool, postgres_url_with(postgres_url, user=DAEMON_ROLE), min_size=1,
        max_size=2,
    )  # fmt: skip
    pool: asyncpg.Pool[asyncpg.Record] = await run(create)
    try:
        yield World(pool, a, b)
    finally:
        await run(pool.close)


def new(tenant: uuid.UUID, **fields: object) -> NewAttachment:
    attachment = uuid.uuid4()
    base: dict[str, object] = {
        "id": attachment, "tenant_id": tenant, "blob_key": f"{tenant}/{attachment}",
        "filename": "x.pdf", "content_type": "application/pdf", "size_bytes": 3, "sha256": SHA,
    }  # fmt: skip
    return NewAttachment(**{**base, **fields})  # type: ignore[arg-type]  # test values


async def test_rows_move_once_from_pending_to_a_final_state(world: World) -> None:
    row = new(world.a)
    assert await run(insert_attachment, world.pool, row) is True
    assert await run(insert_attachment, world.pool, row) is False  # same id: nothing
    attempt = ScanRecord(id=row.id, tenant_id=world.a, status=AttachmentStatus.PENDING,
                         error="ScanError: busy")  # fmt: skip
    final = ScanRecord(id=row.id, tenant_id=world.a, status=AttachmentStatus.FAILED,
                       error="ScanSizeLimit: big")  # fmt: skip
    late = ScanRecord(id=row.id, tenant_id=world.a, status=AttachmentStatus.CLEAN)
    assert await run(record_scans, world.pool, [attempt, final, late]) == [True, True, False]
    got = await run(get_attachment, world.pool, world.a, row.id)
    assert got is not None
    assert (got.status, got.scan_attempts, got.last_error) == (
        AttachmentStatus.FAILED,
        2,
        "ScanSizeLimit: big",
    )
    assert got.scanned_at is not None


async def test_another_tenant_sees_and_moves_nothing(world: World) -> None:
    row = new(world.a)
    await run(insert_attachment, world.pool, row)
    assert await run(get_attachment, world.pool, world.b, row.id) is None
    foreign = ScanRecord(id=row.id, tenant_id=world.b, status=AttachmentStatus.CLEAN)
    assert await run(record_scans, world.pool, [foreign]) == [False]
    got = await run(get_attachment, world.pool, world.a, row.id)
    assert got is not None and got.status is AttachmentStatus.PENDING


async def _sql(conn: object, sql: str, *args: object) -> object:
    return await conn.execute(sql, *args)  # type: ignore[attr-defined]  # a pool connection


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("UPDATE attachments SET status = 'clean' WHERE id = $1", None),  # then:
        ("UPDATE attachments SET status = 'pending' WHERE id = $1", "illegal attachment status"),
        ("UPDATE attachments SET size_bytes = 99 WHERE id = $1", "never changes"),
    ],
)
async def test_the_guard_refuses_going_back_and_rewriting_bytes(
    world: World, sql: str, message: str | None
) -> None:
    row = new(world.a)
    await run(insert_attachment, world.pool, row)
    clean = ScanRecord(id=row.id, tenant_id=world.a, status=AttachmentStatus.CLEAN)
    await run(record_scans, world.pool, [clean])
    if message is None:
        await run(run_in_tenant, world.pool, world.a, _sql, sql, row.id)  # same state: allowed
        return
    with pytest.raises(asyncpg.CheckViolationError, match=message):
        await run(run_in_tenant, world.pool, world.a, _sql, sql, row.id)


async def test_infected_needs_its_signature_and_inserts_start_pending(world: World) -> None:
    row = new(world.a)
    await run(insert_attachment, world.pool, row)
    bare = ScanRecord(id=row.id, tenant_id=world.a, status=AttachmentStatus.INFECTED)
    [refused] = await run(record_scans, world.pool, [bare])
    assert isinstance(refused, asyncpg.CheckViolationError)
    insert = (
        "INSERT INTO attachments (id, tenant_id, blob_key, size_bytes, sha256, status)"
        " VALUES (gen_random_uuid(), $1, 'k', 1, $2, 'clean')"
    )
    with pytest.raises(asyncpg.CheckViolationError, match="starts pending"):
        await run(run_in_tenant, world.pool, world.a, _sql, insert, world.a, SHA)


async def _relay_columns(conn: object) -> object:
    return await conn.fetch("SELECT filename FROM attachments")  # type: ignore[attr-defined]


async def test_the_relay_reads_pending_rows_of_every_tenant_and_no_file_names(
    world: World,
) -> None:
    rows = [new(world.a), new(world.b), new(world.a)]
    for row in rows:
        await run(insert_attachment, world.pool, row)
    done = ScanRecord(id=rows[2].id, tenant_id=world.a, status=AttachmentStatus.CLEAN)
    await run(record_scans, world.pool, [done])
    pending = await run(pending_attachments, world.pool, 10)
    assert [p.id for p in pending] == [rows[0].id, rows[1].id]  # oldest first, both tenants
    assert {p.tenant_id for p in pending} == {world.a, world.b}
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await run(run_as_relay, world.pool, _relay_columns)
