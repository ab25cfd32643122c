"""virtual_sessions and fallback_threads (migration 0007) against real PostgreSQL, as the daemon.

One session per appointment however often the inbox applies its event; the pool's
placement units as triage_relay; fallback threads capped per patient-day by the
database itself, also against concurrent spawners and a bypassed breaker.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import asyncpg
import pytest

from providers.db import DAEMON_ROLE
from providers.db.inbox import InboxItem, SchedulingEvent, apply_event
from providers.db.migrate import migrate_async
from providers.db.virtual_sessions import (
    claim_waiting,
    fail_node_sessions,
    fallback_facts,
    mark_failed,
    mark_placed,
    spawn_fallback,
    without_fallback,
)
from providers.services import postgres_url_with

T = TypeVar("T")
if TYPE_CHECKING:
    Pool = asyncpg.Pool[asyncpg.Record]
DAY = dt.datetime(2026, 12, 3, 15, 0, tzinfo=dt.UTC)


async def _tenants(url: str) -> tuple[uuid.UUID, uuid.UUID]:
    await migrate_async(url)
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("INSERT INTO tenants (name) VALUES ('a'), ('b') RETURNING id")
        return rows[0]["id"], rows[1]["id"]
    finally:
        await conn.close()


def _as_daemon(url: str, work: Callable[[Pool], Awaitable[T]]) -> T:
    async def main() -> T:
        pool = await asyncpg.create_pool(
            postgres_url_with(url, user=DAEMON_ROLE), min_size=1, max_size=4
        )
        try:
            return await work(pool)
        finally:
            await pool.close()

    return asyncio.run(main())


def _event(tenant: uuid.UUID, appointment: str, patient: str | None = "pat-1") -> InboxItem:
    return InboxItem(
        SchedulingEvent(
            tenant_id=tenant,
            appointment_id=appointment,
            kind="appointment.booked",
            starts_at=DAY,
            patient_id=patient,
        )
    )


async def _count(pool: Pool, tenant: uuid.UUID, sql: str) -> int:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config('triage.tenant_id', $1, true)", str(tenant))
        return int(await conn.fetchval(sql))


def test_one_session_per_appointment_and_placement_as_the_relay(postgres_url: str) -> None:
    a, b = asyncio.run(_tenants(postgres_url))

    async def work(pool: Pool) -> None:
        assert await apply_event(pool, _event(a, "apt-1")) is True
        for _ in range(3):  # redeliveries: nothing more
            assert await apply_event(pool, _event(a, "apt-1")) is False
        assert await apply_event(pool, _event(b, "apt-1")) is True  # another tenant's
        assert await _count(pool, a, "SELECT count(*) FROM virtual_sessions") == 1
        # The pool claims across tenants; a claimed session is not claimed again.
        claimed = await claim_waiting(pool, 10, 30.0, 5)
        assert sorted(s.tenant_id for s in claimed) == sorted([a, b])
        assert {s.state for s in claimed} == {"pending"}
        assert await claim_waiting(pool, 10, 30.0, 5) == []
        first, second = claimed
        assert await mark_placed(pool, first.id, "jvb1", "room-1") is True
        assert await mark_placed(pool, first.id, "jvb1", "room-1") is False  # not waiting
        [failed] = await mark_failed(pool, [second.id], "no_bridge")
        assert (failed.state, failed.failures) == ("failed", 1)
        # A lost node's sessions fail; both are waiting again (the failed one retried).
        [lost] = await fail_node_sessions(pool, "jvb1", "bridge_lost")
        assert lost.id == first.id and lost.state == "failed"
        again = await claim_waiting(pool, 10, 0.0, 5)
        assert sorted(s.id for s in again) == sorted([first.id, second.id])
        assert await mark_placed(pool, first.id, "jvb2", "room-1") is True
        # max_failures: a session failed that often is not claimed any more.
        await asyncio.sleep(0.01)
        assert await claim_waiting(pool, 10, 0.0, 1) == []

    _as_daemon(postgres_url, work)


def test_the_relay_never_sees_the_patient(postgres_url: str) -> None:
    a, _ = asyncio.run(_tenants(postgres_url))

    async def work(pool: Pool) -> str:
        await apply_event(pool, _event(a, "apt-1"))
        async with pool.acquire() as conn:
            try:
                async with conn.transaction():
                    await conn.execute("SET LOCAL ROLE triage_relay")
                    await conn.fetch("SELECT patient_id FROM virtual_sessions")
            except asyncpg.InsufficientPrivilegeError as exc:
                return str(exc)
        return "read"

    assert "permission denied" in _as_daemon(postgres_url, work)


def test_fallback_threads_are_capped_per_patient_day_by_the_database(postgres_url: str) -> None:
    a, b = asyncio.run(_tenants(postgres_url))

    async def work(pool: Pool) -> None:
        for n in range(6):
            await apply_event(pool, _event(a, f"apt-{n}"))
        await apply_event(pool, _event(b, "apt-0"))
        sessions = await claim_waiting(pool, 10, 30.0, 5)
        ours = [s.id for s in sessions if s.tenant_id == a]
        facts = await fallback_facts(pool, a, ours[0])
        assert facts is not None
        assert (facts.patient_key, facts.day, facts.threads, facts.linked) == (
            "pat-1",
            DAY.date(),
            0,
            None,
        )
        # Every spawner allowed a new thread (a breaker bypassed), racing: the cap holds.
        results = await asyncio.gather(
            *(spawn_fallback(pool, a, sid, 2, True) for sid in ours), return_exceptions=True
        )
        outcomes = sorted(r.outcome for r in results if not isinstance(r, BaseException))
        assert outcomes == ["reused"] * 4 + ["spawned"] * 2, results
        assert await _count(pool, a, "SELECT count(*) FROM fallback_threads") == 2
        again = await spawn_fallback(pool, a, ours[0], 2, True)
        assert again.outcome == "linked"
        # Another tenant's patient-day of the same name is its own, and invisible to a.
        other = next(s.id for s in sessions if s.tenant_id == b)
        assert (await spawn_fallback(pool, b, other, 2, True)).outcome == "spawned"
        assert await _count(pool, a, "SELECT count(*) FROM fallback_threads") == 2
        assert (await spawn_fallback(pool, a, other, 2, True)).outcome == "refused"

    _as_daemon(postgres_url, work)


@pytest.mark.parametrize("cap", [None, "1"])
def test_a_slot_beyond_the_cap_is_refused_by_the_trigger(
    postgres_url: str, cap: str | None
) -> None:
    a, _ = asyncio.run(_tenants(postgres_url))

    async def work(pool: Pool) -> str:
        async with pool.acquire() as conn:
            try:
                async with conn.transaction():
                    await conn.execute("SELECT set_config('triage.tenant_id', $1, true)", str(a))
                    if cap is not None:
                        await conn.execute(
                            "SELECT set_config('triage.fallback_cap', $1, true)", cap
                        )
                    thread = await conn.fetchval(
                        "INSERT INTO threads (tenant_id, topic) VALUES ($1, 'x') RETURNING id", a
                    )
                    await conn.execute(
                        "INSERT INTO fallback_threads (tenant_id, patient_id, day, slot,"
                        " thread_id, appointment_id) VALUES ($1, 'p', current_date, 2, $2, 'apt')",
                        a, thread,
                    )  # fmt: skip
            except asyncpg.CheckViolationError as exc:
                return str(exc)
        return "inserted"

    message = _as_daemon(postgres_url, work)
    expected = "is not set" if cap is None else "cap of 1 threads reached (slot 2)"
    assert expected in message


def test_the_sweep_finds_failed_sessions_without_a_fallback_thread(postgres_url: str) -> None:
    a, _ = asyncio.run(_tenants(postgres_url))

    async def work(pool: Pool) -> None:
        for n in range(3):
            await apply_event(pool, _event(a, f"apt-{n}"))
        claimed = await claim_waiting(pool, 10, 30.0, 5)
        assert await without_fallback(pool, 10, 0.0) == []  # pending ones are not failures
        await mark_failed(pool, [s.id for s in claimed[:2]], "no_bridge")
        await asyncio.sleep(0.01)
        assert await without_fallback(pool, 10, 3600.0) == []  # not old enough yet
        orphans = await without_fallback(pool, 10, 0.0)
        assert sorted(o.id for o in orphans) == sorted(s.id for s in claimed[:2])
        assert (await spawn_fallback(pool, a, orphans[0].id, 2, True)).outcome == "spawned"
        assert [o.id for o in await without_fallback(pool, 10, 0.0)] == [orphans[1].id]

    _as_daemon(postgres_url, work)
