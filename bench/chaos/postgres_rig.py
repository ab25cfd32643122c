"""An embedded PostgreSQL for a scenario: started, migrated, tenants made, a daemon-role pool."""

from __future__ import annotations

import functools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncpg
import trio

from bench.chaos.fixtures import create_tenants
from bench.chaos.scenario_nats import FAST_POSTGRES
from providers.bridge import open_bridge, run
from providers.db import DAEMON_ROLE, migrate
from providers.embedded import EmbeddedPostgres
from providers.services import postgres_url_with

if TYPE_CHECKING:
    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = ["PostgresRig", "open_postgres"]


@dataclass
class PostgresRig:
    postgres: EmbeddedPostgres
    pool: Pool
    tenants: list[uuid.UUID]

    @property
    def admin_url(self) -> str:
        return self.postgres.url


@asynccontextmanager
async def open_postgres(*, tenants: int, pool_max: int = 4) -> AsyncIterator[PostgresRig]:
    """Start the server, migrate, create tenants, open the pool (inside a bridge)."""
    postgres = EmbeddedPostgres(settings=FAST_POSTGRES)
    try:
        await trio.to_thread.run_sync(postgres.start)
        async with open_bridge():
            await migrate(postgres.url)
            tenant_ids = await run(create_tenants, postgres.url, tenants)
            create = functools.partial(
                asyncpg.create_pool, postgres_url_with(postgres.url, user=DAEMON_ROLE),
                min_size=1, max_size=pool_max,
            )  # fmt: skip
            pool: Pool = await run(create, service="postgres")
            try:
                yield PostgresRig(postgres, pool, tenant_ids)
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await run(pool.close)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(postgres.close)
