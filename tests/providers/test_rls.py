"""Row-level security: a connection as the daemon's role cannot cross tenants.

These tests bypass the application entirely: raw SQL on a real login as
``triage_daemon`` (the embedded server trusts loopback logins), with the
tenant set the way :func:`tenant_transaction` sets it. Two tenants, A and B,
each own one row in every tenant table; the daemon acts as A.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import trio

from providers.bridge import run
from providers.db import (
    APP_ROLE,
    DAEMON_ROLE,
    RELAY_ROLE,
    RLS_TABLES,
    TENANT_TABLES,
    UnsafeRoleError,
    migrate,
    relay_transaction,
    run_as_relay,
    run_in_tenant,
    tenant_transaction,
    verify_runtime_role_async,
)
from providers.services import postgres_url_with

INSUFFICIENT_PRIVILEGE = "42501"  # RLS violations and missing grants alike


@dataclass(frozen=True)
class Tenant:
    id: uuid.UUID
    dispatch: uuid.UUID
    thread: uuid.UUID


@dataclass(frozen=True)
class World:
    admin_url: str  # superuser: bypasses RLS, used to seed and to check from outside
    daemon_url: str
    a: Tenant
    b: Tenant


SEED = {
    "dispatches": "INSERT INTO dispatches (tenant_id, channel, template, recipient)"
    " VALUES ($1, 'sms', 'reminder', '+15550100') RETURNING id",
    "outbox": "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, subject, payload)"
    " VALUES ($1, 'dispatch', 'd1', 'dispatch.queued', '{}') RETURNING id",
    "inbox": "INSERT INTO inbox (tenant_id, appointment_id, source)"
    " VALUES ($1, 'appt-1', 'scheduling') RETURNING appointment_id",
    "idempotency_keys": "INSERT INTO idempotency_keys (tenant_id, key, request_hash, expires_at)"
    " VALUES ($1, 'k1', 'h', now() + interval '1 day') RETURNING key",
    "dead_letters": "INSERT INTO dead_letters (tenant_id, source, ref, payload, error)"
    " VALUES ($1, 'outbox', gen_random_uuid()::text, '\\x00', 'poison') RETURNING id",
    "threads": "INSERT INTO threads (tenant_id, topic) VALUES ($1, 'visit') RETURNING id",
    "templates": "INSERT INTO templates (tenant_id, name, version, channel, body)"
    " VALUES ($1, 'reminder', 1, 'sms', 'See you at {time}') RETURNING name",
    "category_blocks": "INSERT INTO category_blocks (tenant_id, channel, category, state, reason)"
    " VALUES ($1, 'email', 'reminder', 'disabled', 'bounce spike') RETURNING category",
    "dead_recipients": "INSERT INTO dead_recipients (tenant_id, channel, recipient, reason)"
    " VALUES ($1, 'push', 'token-1', 'UNREGISTERED') RETURNING recipient",
    "early_receipts": "INSERT INTO early_receipts (tenant_id, dispatch_id, state, provider)"
    " VALUES ($1, gen_random_uuid(), 'delivered', 'ghasi') RETURNING dispatch_id",
    "attachments": "INSERT INTO attachments (id, tenant_id, blob_key, size_bytes, sha256)"
    " VALUES (gen_random_uuid(), $1, gen_random_uuid()::text, 1, repeat('a', 64)) RETURNING id",
    "virtual_sessions": "INSERT INTO virtual_sessions (tenant_id, appointment_id, patient_id)"
    " VALUES ($1, 'appt-1', 'patient') RETURNING id",
    # The cap trigger reads triage.fallback_cap (0007): set for the seeding session.
    "fallback_threads": "INSERT INTO fallback_threads (tenant_id, patient_id, day, slot,"
    " thread_id, appointment_id) SELECT $1, 'patient', current_date, 1, t.id, 'appt-1'"
    " FROM threads t, (SELECT set_config('triage.fallback_cap', '3', false)) c"
    " WHERE t.tenant_id = $1 RETURNING slot",
    "join_tokens": "INSERT INTO join_tokens (jti, tenant_id, session_id, room, kid, user_id,"
    " issued_at, expires_at) VALUES (gen_random_uuid(), $1, 's1', 'visit', 'k1', 'u1', now(),"
    " now() + interval '1 hour') RETURNING jti",
    "recordings": "INSERT INTO recordings (tenant_id, recording_id, path)"
    " VALUES ($1, 'rec-1', 'visit/rec-1.mp4') RETURNING recording_id",
    "incidents": "INSERT INTO incidents (tenant_id, kind, source, ref, rule, location, excerpt)"
    " VALUES ($1, 'phi_leak', 'push_guard', gen_random_uuid()::text, 'field:dob', 'data.dob',"
    " 'dob=[redacted]') RETURNING id",
    "erasures": "INSERT INTO erasures (tenant_id, patient_id) VALUES ($1, 'patient') RETURNING id",
    "erasure_steps": "INSERT INTO erasure_steps (erasure_id, tenant_id, data_class, status)"
    " SELECT e.id, $1, 'dispatches', 'done' FROM erasures e WHERE e.tenant_id = $1"
    " RETURNING data_class",
}
# thread_participants needs the tenant's thread: seeded apart. outbox_sequences is
# filled by the outbox trigger.
PARTICIPANT = (
    "INSERT INTO thread_participants (thread_id, tenant_id, participant_id, role)"
    " VALUES ($1, $2, $3, 'patient')"
)
# read_receipts needs the participant: seeded after it (read_at is the database's).
RECEIPT = "INSERT INTO read_receipts (tenant_id, thread_id, participant_id) VALUES ($1, $2, $3)"


async def seed(admin_url: str) -> tuple[Tenant, Tenant]:
    conn = await asyncpg.connect(admin_url)
    try:
        tenants: list[Tenant] = []
        for name in ("a", "b"):
            tenant = await conn.fetchval(
                "INSERT INTO tenants (name) VALUES ($1) RETURNING id", name
            )
            ids = {table: await conn.fetchval(sql, tenant) for table, sql in SEED.items()}
            await conn.execute(PARTICIPANT, ids["threads"], tenant, f"patient-{name}")
            await conn.execute(RECEIPT, tenant, ids["threads"], f"patient-{name}")
            tenants.append(Tenant(tenant, ids["dispatches"], ids["threads"]))
        # A dead letter whose tenant is unknown (a poison message that did not parse).
        await conn.execute(
            "INSERT INTO dead_letters (source, ref, payload, error)"
            " VALUES ('inbox', 'seq-9', '\\xff', 'not JSON')"
        )
        return tenants[0], tenants[1]
    finally:
        await conn.close()


@pytest.fixture
async def world(bridge: object, postgres_url: str) -> World:
    await migrate(postgres_url)
    a, b = await run(seed, postgres_url)
    return World(postgres_url, postgres_url_with(postgres_url, user=DAEMON_ROLE), a, b)


async def as_daemon(
    world: World, tenant: uuid.UUID | None, statements: list[tuple[str, tuple[Any, ...]]]
) -> list[Any]:
    """asyncio side: run each statement as the daemon (A's tenant set, or none).

    Each runs in its own transaction; the result is its status tag or rows,
    or the SQLSTATE and message of its error.
    """
    conn = await asyncpg.connect(world.daemon_url)
    results: list[Any] = []
    try:
        for sql, args in statements:
            try:
                if tenant is None:
                    async with conn.transaction():
                        results.append(await _one(conn, sql, args))
                else:
                    async with tenant_transaction(conn, tenant):
                        results.append(await _one(conn, sql, args))
            except asyncpg.PostgresError as exc:
                results.append((exc.sqlstate, str(exc)))
    finally:
        await conn.close()
    return results


async def _one(conn: Any, sql: str, args: tuple[Any, ...]) -> Any:
    if sql.lstrip().upper().startswith("SELECT"):
        return [tuple(r.values()) for r in await conn.fetch(sql, *args)]
    return await conn.execute(sql, *args)


async def admin_counts(world: World) -> dict[str, int]:
    """Rows per table, seen from outside RLS."""
    conn = await asyncpg.connect(world.admin_url)
    try:
        return {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in RLS_TABLES}
    finally:
        await conn.close()


# -- the roles ------------------------------------------------------------------------


async def test_daemon_role_is_neither_superuser_nor_owner_nor_bypassrls(world: World) -> None:
    async def facts() -> tuple[list[asyncpg.Record], int, list[asyncpg.Record]]:
        conn = await asyncpg.connect(world.admin_url)
        try:
            roles = await conn.fetch(
                "SELECT rolname, rolsuper, rolbypassrls, rolcanlogin, rolcreaterole,"
                " rolcreatedb FROM pg_roles WHERE rolname = ANY($1::text[]) ORDER BY rolname",
                [APP_ROLE, DAEMON_ROLE, RELAY_ROLE],
            )
            owned = await conn.fetchval(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = current_schema()"
                " AND pg_has_role($1, c.relowner, 'USAGE')",
                DAEMON_ROLE,
            )
            memberships = await conn.fetch(
                "SELECT r.rolname AS granted, m.inherit_option, m.set_option"
                " FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.roleid"
                " WHERE m.member = $1::regrole ORDER BY r.rolname",
                DAEMON_ROLE,
            )
            return roles, owned, memberships
        finally:
            await conn.close()

    roles, owned, memberships = await run(facts)
    by_name = {r["rolname"]: r for r in roles}
    assert set(by_name) == {APP_ROLE, DAEMON_ROLE, RELAY_ROLE}
    for role in roles:
        assert not role["rolsuper"], role
        assert not role["rolbypassrls"], role
        assert not role["rolcreaterole"], role
        assert not role["rolcreatedb"], role
    assert by_name[DAEMON_ROLE]["rolcanlogin"]
    assert not by_name[APP_ROLE]["rolcanlogin"]
    assert not by_name[RELAY_ROLE]["rolcanlogin"]
    assert owned == 0
    assert {(m["granted"], m["inherit_option"], m["set_option"]) for m in memberships} == {
        (APP_ROLE, True, True),
        (RELAY_ROLE, False, True),
    }


async def test_every_tenant_table_has_forced_row_level_security(world: World) -> None:
    async def facts() -> tuple[set[str], list[asyncpg.Record]]:
        conn = await asyncpg.connect(world.admin_url)
        try:
            with_tenant = await conn.fetch(
                "SELECT table_name FROM information_schema.columns"
                " WHERE table_schema = current_schema() AND column_name = 'tenant_id'"
            )
            tables = await conn.fetch(
                "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class"
                " WHERE relkind = 'r' AND relnamespace = current_schema()::regnamespace"
            )
            return {r["table_name"] for r in with_tenant}, tables
        finally:
            await conn.close()

    with_tenant, tables = await run(facts)
    # A future migration that adds a tenant table must list it (and secure it).
    assert with_tenant == set(TENANT_TABLES)
    secured = {r["relname"] for r in tables if r["relrowsecurity"] and r["relforcerowsecurity"]}
    assert secured == set(RLS_TABLES)


async def test_runtime_role_check_accepts_the_daemon_and_refuses_the_superuser(
    world: World,
) -> None:
    async def check(url: str) -> str:
        conn = await asyncpg.connect(url)
        try:
            await verify_runtime_role_async(conn)
            return "trusted"
        except UnsafeRoleError as exc:
            return str(exc)
        finally:
            await conn.close()

    assert await run(check, world.daemon_url) == "trusted"
    refused = await run(check, world.admin_url)
    assert "is a superuser" in refused
    assert "owns table dispatches" in refused


# -- reading and writing across tenants ---------------------------------------------------


@pytest.mark.parametrize("table", TENANT_TABLES)
async def test_daemon_sees_only_its_tenants_rows(world: World, table: str) -> None:
    rows = await run(
        as_daemon,
        world,
        world.a.id,
        [
            (f"SELECT DISTINCT tenant_id FROM {table}", ()),
            (f"SELECT count(*) FROM {table} WHERE tenant_id = $1", (world.b.id,)),
        ],
    )
    assert rows == [[(world.a.id,)], [(0,)]]


async def test_daemon_sees_only_its_own_tenant_row(world: World) -> None:
    rows = await run(as_daemon, world, world.a.id, [("SELECT id FROM tenants", ())])
    assert rows == [[(world.a.id,)]]


async def test_daemon_cannot_change_another_tenants_dispatch(world: World) -> None:
    b = world.b
    results = await run(
        as_daemon,
        world,
        world.a.id,
        [
            ("SELECT id FROM dispatches WHERE id = $1", (b.dispatch,)),
            ("UPDATE dispatches SET reason = 'hijacked' WHERE id = $1", (b.dispatch,)),
            ("UPDATE dispatches SET reason = 'hijacked' WHERE tenant_id = $1", (b.id,)),
            ("DELETE FROM dispatches WHERE id = $1", (b.dispatch,)),
            ("DELETE FROM dispatches", ()),  # A's own row only
            (
                "INSERT INTO dispatches (tenant_id, channel, template, recipient)"
                " VALUES ($1, 'sms', 'reminder', '+15550199')",
                (b.id,),
            ),
        ],
    )
    assert results[:5] == [[], "UPDATE 0", "UPDATE 0", "DELETE 0", "DELETE 1"]
    sqlstate, message = results[5]
    assert sqlstate == INSUFFICIENT_PRIVILEGE
    assert 'new row violates row-level security policy for table "dispatches"' in message

    # Seen from outside RLS: B's dispatch is untouched, and nothing was added for B.
    async def b_dispatches() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(world.admin_url)
        try:
            return await conn.fetch("SELECT id, reason FROM dispatches WHERE tenant_id = $1", b.id)
        finally:
            await conn.close()

    assert [(r["id"], r["reason"]) for r in await run(b_dispatches)] == [(b.dispatch, None)]


async def test_daemon_cannot_move_its_rows_to_another_tenant(world: World) -> None:
    results = await run(
        as_daemon,
        world,
        world.a.id,
        [("UPDATE threads SET tenant_id = $1 WHERE id = $2", (world.b.id, world.a.thread))],
    )
    sqlstate, message = results[0]
    assert sqlstate == INSUFFICIENT_PRIVILEGE
    assert "row-level security" in message


INSERT_FOR = {
    "dispatches": SEED["dispatches"],
    "outbox": SEED["outbox"],
    "outbox_sequences": "INSERT INTO outbox_sequences (tenant_id, aggregate_type, aggregate_id,"
    " last_seq) VALUES ($1, 'dispatch', 'other', 1)",
    "inbox": "INSERT INTO inbox (tenant_id, appointment_id, source)"
    " VALUES ($1, 'appt-2', 'scheduling')",
    "idempotency_keys": "INSERT INTO idempotency_keys (tenant_id, key, request_hash, expires_at)"
    " VALUES ($1, 'k2', 'h', now() + interval '1 day')",
    "dead_letters": SEED["dead_letters"],
    "threads": SEED["threads"],
    "thread_participants": "INSERT INTO thread_participants (thread_id, tenant_id,"
    " participant_id, role) SELECT id, tenant_id, 'intruder', 'staff' FROM threads"
    " WHERE tenant_id = $1",
    "templates": "INSERT INTO templates (tenant_id, name, version, channel, body)"
    " VALUES ($1, 'reminder', 2, 'sms', 'x')",
    "read_receipts": "INSERT INTO read_receipts (tenant_id, thread_id, participant_id)"
    " SELECT tenant_id, thread_id, participant_id FROM thread_participants WHERE tenant_id = $1",
    "category_blocks": "INSERT INTO category_blocks (tenant_id, channel, category, state, reason)"
    " VALUES ($1, 'sms', 'alerts', 'throttled', 'x')",
    "dead_recipients": "INSERT INTO dead_recipients (tenant_id, channel, recipient, reason)"
    " VALUES ($1, 'email', 'gone@example.org', '5.1.1')",
    "early_receipts": "INSERT INTO early_receipts (tenant_id, dispatch_id, state, provider)"
    " VALUES ($1, gen_random_uuid(), 'failed', 'twilio')",
    "attachments": SEED["attachments"],
    "virtual_sessions": "INSERT INTO virtual_sessions (tenant_id, appointment_id)"
    " VALUES ($1, 'appt-2')",
    "fallback_threads": "INSERT INTO fallback_threads (tenant_id, patient_id, day, slot,"
    " thread_id, appointment_id) SELECT $1, 'other', current_date, 1, gen_random_uuid(), 'x'"
    " FROM (SELECT set_config('triage.fallback_cap', '3', true)) c",
    "join_tokens": SEED["join_tokens"],
    "recordings": "INSERT INTO recordings (tenant_id, recording_id, path)"
    " VALUES ($1, 'rec-2', 'visit/rec-2.mp4')",
    "incidents": SEED["incidents"],
    "erasures": "INSERT INTO erasures (tenant_id, patient_id) VALUES ($1, 'other')",
    # erasure_steps selects B's erasure: invisible to A, so nothing to insert.
    "erasure_steps": SEED["erasure_steps"],
}


@pytest.mark.parametrize("table", TENANT_TABLES)
async def test_daemon_cannot_write_another_tenants_rows_in_any_table(
    world: World, table: str
) -> None:
    before = await run(admin_counts, world)
    b = world.b.id
    results = await run(
        as_daemon,
        world,
        world.a.id,
        [
            (f"UPDATE {table} SET tenant_id = tenant_id WHERE tenant_id = $1", (b,)),
            (f"DELETE FROM {table} WHERE tenant_id = $1", (b,)),
            # thread_participants selects B's thread: invisible to A, so nothing to insert.
            (INSERT_FOR[table], (b,)),
        ],
    )
    update, delete, insert = results
    # Either the role has no such grant at all, or RLS hides B's rows: 0 rows.
    assert update == "UPDATE 0" or update[0] == INSUFFICIENT_PRIVILEGE, update
    assert delete == "DELETE 0" or delete[0] == INSUFFICIENT_PRIVILEGE, delete
    if table in ("thread_participants", "read_receipts", "erasure_steps"):
        assert insert == "INSERT 0 0"
    else:
        assert insert[0] == INSUFFICIENT_PRIVILEGE, insert
    assert await run(admin_counts, world) == before


async def test_without_a_tenant_nothing_is_visible(world: World) -> None:
    async def unit() -> tuple[dict[str, int], dict[str, int], int]:
        conn = await asyncpg.connect(world.daemon_url)
        try:
            count = "SELECT count(*) FROM {}"
            # A fresh session: the setting does not exist (NULL).
            fresh = {t: await conn.fetchval(count.format(t)) for t in RLS_TABLES}
            async with tenant_transaction(conn, world.a.id):
                inside = await conn.fetchval("SELECT count(*) FROM dispatches")
            # After a tenant transaction: the setting reads '' for the rest of the session.
            after = {t: await conn.fetchval(count.format(t)) for t in RLS_TABLES}
            return fresh, after, inside
        finally:
            await conn.close()

    fresh, after, inside = await run(unit)
    assert inside == 1
    assert fresh == dict.fromkeys(RLS_TABLES, 0)
    assert after == dict.fromkeys(RLS_TABLES, 0)


async def test_without_a_tenant_nothing_can_be_written(world: World) -> None:
    results = await run(
        as_daemon,
        world,
        None,
        [
            ("UPDATE dispatches SET reason = 'x'", ()),
            ("DELETE FROM threads", ()),
            (SEED["dispatches"], (world.a.id,)),
        ],
    )
    assert results[:2] == ["UPDATE 0", "DELETE 0"]
    assert results[2][0] == INSUFFICIENT_PRIVILEGE


async def test_a_malformed_tenant_setting_fails_closed(world: World) -> None:
    results = await run(
        as_daemon,
        world,
        None,
        [
            (
                "SELECT set_config('triage.tenant_id', 'not-a-uuid', true),"
                " (SELECT count(*) FROM dispatches)",
                (),
            )
        ],
    )
    assert results[0][0] == "22P02"  # invalid_text_representation: an error, never a match


async def test_daemon_cannot_switch_row_level_security_off(world: World) -> None:
    results = await run(
        as_daemon,
        world,
        world.a.id,
        [
            ("ALTER TABLE dispatches NO FORCE ROW LEVEL SECURITY", ()),
            ("ALTER TABLE dispatches DISABLE ROW LEVEL SECURITY", ()),
            ("DROP POLICY tenant_isolation ON dispatches", ()),
            ("SET LOCAL ROLE postgres", ()),
            ("SET LOCAL row_security = off", ()),
        ],
    )
    for sqlstate, message in results[:4]:
        assert sqlstate == INSUFFICIENT_PRIVILEGE, message
    assert results[4] == "SET"  # allowed, but then any query RLS would filter fails

    async def with_row_security_off() -> tuple[str | None, str]:
        conn = await asyncpg.connect(world.daemon_url)
        try:
            async with tenant_transaction(conn, world.a.id):
                await conn.execute("SET LOCAL row_security = off")
                await conn.fetchval("SELECT count(*) FROM dispatches")
        except asyncpg.PostgresError as exc:
            return exc.sqlstate, str(exc)
        finally:
            await conn.close()
        return None, "read with row_security off"

    sqlstate, message = await run(with_row_security_off)
    assert sqlstate == INSUFFICIENT_PRIVILEGE
    assert "row-level security" in message


async def test_thread_participant_cannot_join_another_tenants_thread(world: World) -> None:
    a, b = world.a, world.b

    async def as_superuser() -> str:
        # Even a role that bypasses RLS is held by the composite foreign key.
        conn = await asyncpg.connect(world.admin_url)
        try:
            await conn.execute(PARTICIPANT, a.thread, b.id, "patient-b")
        except asyncpg.ForeignKeyViolationError as exc:
            return exc.constraint_name or ""
        finally:
            await conn.close()
        return "accepted"

    assert await run(as_superuser) == "thread_participants_same_tenant"
    results = await run(
        as_daemon,
        world,
        a.id,
        [
            (PARTICIPANT, (b.thread, a.id, "patient-a")),  # B's thread, claimed as A's
            (PARTICIPANT, (a.thread, b.id, "patient-b")),  # A's thread, B's participant
            (PARTICIPANT, (a.thread, a.id, "clinician-a")),  # the legitimate case
        ],
    )
    sqlstate, message = results[0]
    # Migration 0011: RLS itself refuses a thread the tenant cannot see (before 0011
    # the foreign key did, as 23503, once RLS had admitted the row).
    assert sqlstate == INSUFFICIENT_PRIVILEGE, message
    assert 'row-level security policy "participant_joins_own_thread"' in message
    assert str(b.id) not in message  # the refusal does not reveal B
    assert results[1][0] == INSUFFICIENT_PRIVILEGE
    assert results[2] == "INSERT 0 1"


# -- the relay role ---------------------------------------------------------------------


async def test_relay_role_reads_every_tenants_outbox_but_no_dispatch(world: World) -> None:
    async def unit() -> list[Any]:
        conn = await asyncpg.connect(world.daemon_url)
        results: list[Any] = []
        try:
            async with relay_transaction(conn):
                claimed = await conn.fetch(
                    "SELECT id, tenant_id FROM outbox WHERE published_at IS NULL"
                    " ORDER BY id FOR UPDATE SKIP LOCKED"
                )
                results.append(sorted({r["tenant_id"] for r in claimed}))
                results.append(
                    await conn.execute(
                        "UPDATE outbox SET published_at = now(), attempts = attempts + 1"
                        " WHERE id = ANY($1::bigint[])",
                        [r["id"] for r in claimed],
                    )
                )
                results.append(await conn.fetchval("SELECT count(*) FROM dead_letters"))
            for sql in (
                "SELECT recipient, payload FROM dispatches",
                "SELECT count(*) FROM threads",
                "SELECT count(*) FROM tenants",
                "UPDATE outbox SET payload = '{\"x\": 1}'",
                "DELETE FROM dispatches",
            ):
                try:
                    async with relay_transaction(conn):
                        await conn.execute(sql)
                    results.append("allowed")
                except asyncpg.InsufficientPrivilegeError as exc:
                    results.append(exc.sqlstate)
            # The role lasts one transaction: afterwards the daemon is itself again.
            results.append(await conn.fetchval("SELECT current_user"))
            results.append(await conn.fetchval("SELECT count(*) FROM outbox"))
        finally:
            await conn.close()
        return results

    results = await run(unit)
    assert results[0] == sorted([world.a.id, world.b.id])
    assert results[1] == "UPDATE 2"
    assert results[2] == 3  # A's, B's and the tenant-less dead letter
    assert results[3:8] == [INSUFFICIENT_PRIVILEGE] * 5
    assert results[8:] == [DAEMON_ROLE, 0]


# -- the helpers, through a pool ----------------------------------------------------------


async def test_pool_helpers_scope_each_unit_of_work(world: World) -> None:
    async def count_dispatches(conn: Any) -> int:
        return int(await conn.fetchval("SELECT count(*) FROM dispatches"))

    async def count_outbox(conn: Any) -> int:
        return int(await conn.fetchval("SELECT count(*) FROM outbox"))

    async def current_tenant(conn: Any, _: object) -> str:
        return str(await conn.fetchval("SELECT current_setting('triage.tenant_id', true)"))

    async def unit() -> list[object]:
        pool = await asyncpg.create_pool(world.daemon_url, min_size=1, max_size=1)
        try:
            return [
                await run_in_tenant(pool, world.a.id, count_dispatches),
                await run_in_tenant(pool, str(world.b.id), current_tenant, None),
                await run_as_relay(pool, count_outbox),
                # One connection in the pool: it carries no tenant into its next use.
                await pool.fetchval("SELECT count(*) FROM dispatches"),
                await pool.fetchval("SELECT current_setting('triage.tenant_id', true)"),
            ]
        finally:
            await pool.close()

    assert await run(unit) == [1, str(world.b.id), 2, 0, ""]


async def test_tenant_transaction_refuses_a_malformed_tenant_id(world: World) -> None:
    async def unit() -> str:
        conn = await asyncpg.connect(world.daemon_url)
        try:
            async with tenant_transaction(conn, "a'; DROP TABLE dispatches; --"):
                return "entered"
        except ValueError as exc:
            return str(exc)
        finally:
            await conn.close()

    assert "tenant id must be a UUID" in await run(unit)


async def test_cancelled_tenant_unit_of_work_rolls_back_and_frees_the_connection(
    world: World,
) -> None:
    inserted = asyncio.Event()

    async def insert_then_hang(conn: Any) -> None:
        await conn.execute(SEED["threads"], world.a.id)
        inserted.set()
        await asyncio.sleep(3600)  # cancelled from Trio

    async def open_pool() -> asyncpg.Pool[asyncpg.Record]:
        return await asyncpg.create_pool(world.daemon_url, min_size=1, max_size=1)

    pool = await run(open_pool)
    try:
        with trio.move_on_after(5) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, run_in_tenant, pool, world.a.id, insert_then_hang)
                await run(inserted.wait)
                nursery.cancel_scope.cancel()
        assert not scope.cancelled_caught  # the nursery was cancelled, not the deadline

        async def after(pool: asyncpg.Pool[asyncpg.Record]) -> tuple[Any, ...]:
            async with pool.acquire() as conn:  # the one connection came back
                return (
                    await conn.fetchval("SELECT current_setting('triage.tenant_id', true)"),
                    conn.is_in_transaction(),
                )

        assert await run(after, pool) == ("", False)
    finally:
        await run(pool.close)
    assert (await run(admin_counts, world))["threads"] == 2  # the insert was rolled back
