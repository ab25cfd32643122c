"""The daemon's backbone: its services, the bridge, the schema and the database pool.

:func:`open_backbone` brings them up in this order, before the supervision tree
starts (so ``/readyz`` cannot answer 200 before the schema is migrated), and
takes them down in the reverse one:

1. resolve the services (:func:`providers.services.resolve_services`): the
   environment's ``TRIAGE_*_URL``, else ``[services]``, else embedded PostgreSQL
   and NATS, started in a worker thread; log ``services: postgres=embedded
   nats=embedded redis=none``;
2. open the bridge (one trio-asyncio loop for the daemon's lifetime);
3. apply the migrations with the configured (owner) URL; log the versions
   applied;
4. open the pool as ``[database].daemon_role`` and verify that role is held by
   row-level security (:class:`~providers.db.roles.UnsafeRoleError` otherwise:
   the daemon refuses to start);
5. connect to NATS (JetStream) for the outbox relay, and to Redis for the
   idempotency cache when a Redis URL is configured (without one the store
   runs on the database alone: catalog row 7's mitigation).

A drain requested during the start (:meth:`StartGuard.abandon`) cancels the
step in progress (migration, pool creation; the services' start is waited for)
and :class:`StartAbandoned` comes out of :func:`open_backbone` once what was
started is stopped again.

At the end: the pool closes (shielded, by :attr:`Backbone.deadline` or
``command_timeout_s``), the bridge closes, then the embedded servers stop in a
worker thread that is waited for even when cancelled, so that no server outlives
the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlsplit

import msgspec
import trio

from config import TriageConfig
from engine.errors import TriageError
from providers import jetstream
from providers.bridge import open_bridge, run
from providers.db import migrate
from providers.db.pool import DbPool, open_pool
from providers.redis_cache import RedisCache
from providers.services import Services, postgres_url_with, resolve_services

__all__ = ["Backbone", "StartAbandoned", "StartGuard", "describe_services", "open_backbone"]

log = logging.getLogger("triage.backbone")


class StartAbandoned(TriageError):
    """A drain was requested while the backbone was starting; nothing is left running."""


class StartGuard:
    """Lets a drain cancel the backbone's start, one step (a fresh cancel scope) at a time."""

    def __init__(self) -> None:
        self.abandoned = False
        self._scope: trio.CancelScope | None = None

    def abandon(self) -> None:
        """Cancel the step in progress and every later one."""
        self.abandoned = True
        if self._scope is not None:
            self._scope.cancel()

    @contextmanager
    def step(self) -> Iterator[None]:
        """A block the drain may cancel; raises :class:`StartAbandoned` if it did."""
        with trio.CancelScope() as scope:
            if self.abandoned:
                scope.cancel()
            self._scope = scope
            try:
                yield
            finally:
                self._scope = None
        if scope.cancelled_caught or self.abandoned:
            raise StartAbandoned("a drain was requested during the start")


@dataclass(kw_only=True)
class Backbone:
    """What :func:`open_backbone` opened, for the tree's children to use."""

    services: Services
    pool: DbPool
    nats: jetstream.JetStreamClient
    #: The read replica's pool, when ``postgres_replica_url`` is configured.
    replica: DbPool | None
    #: The outbox relay's own pool (``[relay] pool_size``), when the relay is enabled.
    relay_pool: DbPool | None
    redis: RedisCache | None
    migrated: list[str]
    #: Trio time by which the close must be done (the daemon sets it when a drain starts).
    deadline: float = field(default=math.inf)


async def _close_nats(client: jetstream.JetStreamClient, within_s: float) -> None:
    """Close the client, bounded: its flush of pending publishes has no deadline of its own."""
    with trio.CancelScope(shield=True), trio.move_on_after(within_s):
        await run(jetstream.close, client, service="nats")


def describe_services(services: Services) -> str:
    """``postgres=embedded nats=embedded redis=none`` (or ``external``; never a URL)."""
    parts = []
    for name, url in (
        ("postgres", services.postgres_url),
        ("nats", services.nats_url),
        ("redis", services.redis_url),
    ):
        kind = "embedded" if name in services.embedded else "external" if url else "none"
        parts.append(f"{name}={kind}")
    return " ".join(parts)


def _where(url: str | None) -> str | None:
    """Host and port of ``url``, without credentials."""
    if url is None:
        return None
    parts = urlsplit(url)
    return parts.netloc.rpartition("@")[2] or parts.query


@asynccontextmanager
async def open_backbone(
    config: TriageConfig,
    env: Mapping[str, str] = os.environ,
    *,
    guard: StartGuard | None = None,
) -> AsyncIterator[Backbone]:
    """Bring the backbone up for the block; see the module docstring for the order."""
    guard = guard if guard is not None else StartGuard()
    began = time.monotonic()
    # Shielded: a server started in the thread must come back to us to be stopped.
    with trio.CancelScope(shield=True):
        services = await trio.to_thread.run_sync(resolve_services, config.services, env)
    try:
        log.info(
            "services: " + describe_services(services),
            extra={
                "embedded": sorted(services.embedded),
                "postgres": _where(services.postgres_url),
                "nats": _where(services.nats_url),
                "redis": _where(services.redis_url),
                "pids": {name: server.pid for name, server in services.servers.items()},
                "elapsed_s": round(time.monotonic() - began, 3),
            },
        )
        with guard.step():  # a drain while the services started: stop them again
            await trio.lowlevel.checkpoint()
        async with open_bridge():
            with guard.step():
                applied = await migrate(services.postgres_url)
            log.info(
                "migrations applied" if applied else "schema up to date",
                extra={"applied": applied},
            )
            database = config.database
            url = postgres_url_with(services.postgres_url, user=database.daemon_role)
            async with contextlib.AsyncExitStack() as stack:
                with guard.step():
                    pool = await stack.enter_async_context(open_pool(url, database))
                log.info(
                    "database pool open",
                    extra={
                        "role": database.daemon_role,
                        "pool_min": database.pool_min,
                        "pool_max": database.pool_max,
                        "elapsed_s": round(time.monotonic() - began, 3),
                    },
                )
                # The relay's own small pool: it never queues behind the daemon's
                # writers for a connection (under load that made events wait in the
                # outbox long enough to look like a NATS outage, row 6).
                relay_pool: DbPool | None = None
                if config.relay.enabled:
                    relay_db = msgspec.structs.replace(
                        database, pool_min=config.relay.pool_size, pool_max=config.relay.pool_size
                    )
                    with guard.step():
                        relay_pool = await stack.enter_async_context(open_pool(url, relay_db))
                replica: DbPool | None = None
                if services.postgres_replica_url is not None:
                    replica_url = postgres_url_with(
                        services.postgres_replica_url, user=database.daemon_role
                    )
                    with guard.step():
                        replica = await stack.enter_async_context(open_pool(replica_url, database))
                    log.info("replica pool open", extra={"replica": _where(replica_url)})
                with guard.step():
                    nats = await run(
                        partial(jetstream.connect, connect_timeout_s=database.connect_timeout_s),
                        services.nats_url,
                        service="nats",
                    )
                stack.push_async_callback(_close_nats, nats, config.relay.ack_timeout_s)
                redis: RedisCache | None = None
                if services.redis_url is not None:
                    with guard.step():
                        redis = await RedisCache.open(
                            services.redis_url,
                            ttl_s=config.idempotency.cache_ttl_s,
                            timeout_s=config.guards["redis"].timeout_s,
                        )
                    stack.push_async_callback(redis.aclose)
                backbone = Backbone(
                    services=services,
                    pool=pool,
                    relay_pool=relay_pool,
                    replica=replica,
                    nats=nats,
                    redis=redis,
                    migrated=applied,
                )
                try:
                    yield backbone
                finally:
                    await pool.aclose(deadline=backbone.deadline)
                    log.info("database pool closed")
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(services.close)
        if services.embedded:
            log.info("embedded services stopped", extra={"stopped": sorted(services.embedded)})
