"""category_blocks and dead_recipients against real PostgreSQL, as the daemon's role."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import pytest

from providers.db import DAEMON_ROLE
from providers.db.categories import (
    BlockState,
    CategoryError,
    block_async,
    enable_async,
    is_dead_async,
    list_blocks_async,
    load_blocks_async,
    lookup_block_async,
    mark_dead_async,
    unblock_async,
)
from providers.db.migrate import migrate_async
from providers.services import postgres_url_with

T = TypeVar("T")


async def _tenants(url: str) -> tuple[str, str]:
    await migrate_async(url)
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("INSERT INTO tenants (name) VALUES ('a'), ('b') RETURNING id")
        return str(rows[0]["id"]), str(rows[1]["id"])
    finally:
        await conn.close()


def _as_daemon(url: str, work: Callable[[asyncpg.Pool[asyncpg.Record]], Awaitable[T]]) -> T:
    async def main() -> T:
        pool = await asyncpg.create_pool(
            postgres_url_with(url, user=DAEMON_ROLE), min_size=1, max_size=2
        )
        try:
            return await work(pool)
        finally:
            await pool.close()

    return asyncio.run(main())


def test_block_lift_disable_and_enable(postgres_url: str) -> None:
    a, b = asyncio.run(_tenants(postgres_url))

    async def work(pool: asyncpg.Pool[asyncpg.Record]) -> None:
        first = await block_async(pool, a, "email", "reminder", BlockState.THROTTLED, "spike")
        assert (first.tenant_id, first.channel, first.category) == (a, "email", "reminder")
        assert first.state is BlockState.THROTTLED
        again = await block_async(pool, a, "email", "reminder", BlockState.THROTTLED, "still")
        assert again.since == first.since  # same state: the clock does not move
        # Row-level security: tenant b sees nothing of a's.
        assert await lookup_block_async(pool, b, "email", "reminder") is None
        assert await unblock_async(pool, b, "email", "reminder") is False
        assert await unblock_async(pool, a, "email", "reminder") is True
        assert await lookup_block_async(pool, a, "email", "reminder") is None

        await block_async(pool, a, "email", "reminder", BlockState.DISABLED, "sustained")
        # Never downgraded, never lifted automatically.
        down = await block_async(pool, a, "email", "reminder", BlockState.THROTTLED, "late")
        assert (down.state, down.reason) == (BlockState.DISABLED, "sustained")
        assert await unblock_async(pool, a, "email", "reminder") is False
        await block_async(pool, b, "email", "news", BlockState.THROTTLED, "spike b")
        loaded = await load_blocks_async(pool, [a, b])
        assert sorted((x.tenant_id, x.category, x.state.value) for x in loaded) == sorted(
            [(a, "reminder", "disabled"), (b, "news", "throttled")]
        )

    _as_daemon(postgres_url, work)

    # The operator's side (superuser URL).
    listed = asyncio.run(list_blocks_async(postgres_url))
    assert [(x.tenant_id, x.category) for x in listed] == sorted([(a, "reminder"), (b, "news")])
    assert [x.category for x in asyncio.run(list_blocks_async(postgres_url, tenant_id=b))] == [
        "news"
    ]
    assert asyncio.run(enable_async(postgres_url, b, "email", "news")) == (
        None,
        BlockState.THROTTLED,
    )
    removed, current = asyncio.run(enable_async(postgres_url, a, "email", "reminder"))
    assert removed is not None and removed.state is BlockState.DISABLED and current is None
    assert asyncio.run(enable_async(postgres_url, a, "email", "reminder")) == (None, None)
    assert [x.category for x in asyncio.run(list_blocks_async(postgres_url))] == ["news"]


def test_dead_recipients(postgres_url: str) -> None:
    a, b = asyncio.run(_tenants(postgres_url))

    async def work(pool: asyncpg.Pool[asyncpg.Record]) -> list[bool]:
        return [
            await mark_dead_async(pool, a, "push", "token-1", "UNREGISTERED"),
            await mark_dead_async(pool, a, "push", "token-1", "UNREGISTERED"),
            await is_dead_async(pool, a, "push", "token-1"),
            await is_dead_async(pool, a, "email", "token-1"),
            await is_dead_async(pool, b, "push", "token-1"),
        ]

    assert _as_daemon(postgres_url, work) == [True, False, True, False, False]


def test_bad_keys_are_refused_by_name(postgres_url: str) -> None:
    a, _ = asyncio.run(_tenants(postgres_url))

    async def attempt(
        pool: asyncpg.Pool[asyncpg.Record], fn: Callable[[], Awaitable[object]]
    ) -> str:
        with pytest.raises(CategoryError) as info:
            await fn()
        return str(info.value)

    async def work(pool: asyncpg.Pool[asyncpg.Record]) -> list[str]:
        return [
            await attempt(
                pool, lambda: block_async(pool, "nope", "email", "c", BlockState.DISABLED, "r")
            ),
            await attempt(pool, lambda: block_async(pool, a, "fax", "c", BlockState.DISABLED, "r")),
            await attempt(
                pool, lambda: block_async(pool, a, "email", " ", BlockState.DISABLED, "r")
            ),
            await attempt(
                pool, lambda: block_async(pool, a, "email", "c", BlockState.DISABLED, " ")
            ),
        ]

    messages = _as_daemon(postgres_url, work)
    assert "tenant id must be a UUID, got 'nope'" in messages[0]
    assert "channel must be one of" in messages[1] and "'fax'" in messages[1]
    assert "category must be a non-empty name" in messages[2]
    assert "needs a reason" in messages[3]
