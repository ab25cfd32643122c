"""The raw asyncpg baseline of ``bench.perf dispatch`` runs on plain asyncio, never on
trio-asyncio's loop, and really stores what it counts (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import asyncpg
import pytest

import bench.perf.dispatch  # noqa: F401 - imports Triage: trio-asyncio's loop policy is installed
from bench.perf import accept_raw
from providers.db import DAEMON_ROLE
from providers.db.migrate import migrate_async
from providers.services import postgres_url_with


def test_the_baseline_loop_is_a_plain_selector_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[type[asyncio.AbstractEventLoop]] = []

    async def main(
        url: str, tenants: Sequence[str], n: int, concurrency: int, pool_size: int
    ) -> dict[str, float]:
        seen.append(type(asyncio.get_running_loop()))
        return {}

    monkeypatch.setattr(accept_raw, "_asyncpg_main", main)
    accept_raw.asyncpg_accepts("postgresql://nowhere", ["t"], 1, concurrency=1, pool_size=1)
    assert len(seen) == 1 and issubclass(seen[0], asyncio.SelectorEventLoop)
    assert "trio" not in seen[0].__module__


def test_the_baseline_stores_every_accept_it_counts(postgres_url: str) -> None:
    async def seed() -> str:
        await migrate_async(postgres_url)
        conn = await asyncpg.connect(postgres_url)
        try:
            tenant = await conn.fetchval("INSERT INTO tenants (name) VALUES ('t') RETURNING id")
            return str(tenant)
        finally:
            await conn.close()

    async def count(tenant: str) -> tuple[int, int]:
        conn = await asyncpg.connect(postgres_url)
        try:
            rows = await conn.fetchval(
                "SELECT count(*) FROM dispatches WHERE tenant_id = $1", uuid.UUID(tenant)
            )
            events = await conn.fetchval("SELECT count(*) FROM outbox")
            return int(rows), int(events)
        finally:
            await conn.close()

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        tenant = runner.run(seed())
    out = accept_raw.asyncpg_accepts(
        postgres_url_with(postgres_url, user=DAEMON_ROLE), [tenant], 40, concurrency=8,
        pool_size=2,
    )  # fmt: skip
    assert out["accepted"] == 40 and out["seconds"] > 0
    assert 0 < out["latency_p50"] <= out["latency_p99"]
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        assert runner.run(count(tenant)) == (40 + 2, 40 + 2)  # the timed ones and the warm-up
