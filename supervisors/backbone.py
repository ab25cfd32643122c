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

:func:`build_backbone_actors` wires the actors that live on the backbone (the
tree places their child specs): the database probe, the database writer (row
5), the outbox relay under ``[supervisors.relay]`` (rows 6, 9) and the inbox
consumer (row 18), and the error-budget actor (``[slo]``, :mod:`actors.error_budget`). Each is an :class:`~engine.actor.Actor` with its mailbox
from ``[mailboxes.*]`` (:data:`BACKBONE_MAILBOXES`); what others read of them
goes through their refs (``ref.statistics()``) or a shared object the wiring
hands out (the primary database's breaker, for readiness).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import msgspec
import trio

from actors.db_health import DbHealth, DbHealthMessage, unavailable
from actors.db_writer import ROW as DB_ROW
from actors.db_writer import DbGateway, DbWriterMessage, apply_inbox, db_writer_child
from actors.error_budget import ErrorBudget, ErrorBudgetMessage
from actors.inbox import ROW as INBOX_ROW
from actors.inbox import InboxMessage, inbox_child
from actors.inbox import build_detector as build_inbox_detector
from actors.outbox_relay import CRASH_LOOP_ROW, LAG_ROW, RelayMessage, relay_child
from actors.phi_rules import phi_rules
from config import Catalog, CatalogRow, ConfigError, ConfigProblem, TriageConfig, engine_kwargs
from config.catalog import alert_name
from engine.actor import ActorRef, Overflow, actor_child
from engine.breaker import Breaker
from engine.detectors import (
    AgeOfNewestDetector,
    CountInWindowDetector,
    Detector,
    DetectorSet,
    RateDetector,
)
from engine.errors import TriageError
from engine.runtime import Runtime
from engine.supervisor import ChildSpec, Restart, Supervisor
from providers import jetstream
from providers.bridge import open_bridge, run
from providers.db import migrate
from providers.db.pool import DbPool, open_pool
from providers.redis_cache import RedisCache
from providers.services import Services, postgres_url_with, resolve_services
from providers.spool import Spool

__all__ = [
    "BACKBONE_MAILBOXES",
    "DB_BREAKER",
    "SPOOL_APPLIERS",
    "Backbone",
    "BackboneActors",
    "StartAbandoned",
    "StartGuard",
    "build_backbone_actors",
    "describe_services",
    "open_backbone",
]

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


# -- the backbone's actors --------------------------------------------------------------

#: The breaker profile of the primary database: the probe's, the writer's, the inbox's.
DB_BREAKER: Final = "postgres_primary"
#: Each backbone actor's ``[mailboxes.*]`` profile.
BACKBONE_MAILBOXES: Final = {
    "db_health": "monitor",
    "db_writer": "monitor",
    "outbox_relay": "relay",
    "inbox_consumer": "relay",
    "error_budget": "monitor",
}

#: How each spoolable write kind is replayed (``[spool] spoolable_kinds`` names them).
SPOOL_APPLIERS: Final = {"inbox": apply_inbox}

D = TypeVar("D", bound=Detector)


@dataclass(frozen=True, slots=True)
class BackboneActors:
    """What :func:`build_backbone_actors` wired.

    ``early`` are the probe, the writer and the relay's supervisor; ``late`` the
    inbox consumer: the tree starts the idempotency store between them.
    """

    db_breaker: Breaker
    db_health: ActorRef[DbHealthMessage]
    #: Reads and writes on the primary (the replica, the spool): direct calls, per request.
    db: DbGateway
    db_writer: ActorRef[DbWriterMessage]
    relay: ActorRef[RelayMessage] | None
    #: The pool the relay was given (its own, ``[relay] pool_size``).
    relay_pool: DbPool | None
    inbox: ActorRef[InboxMessage]
    #: The error-budget policy's actor (``[slo] enabled``), else None.
    error_budget: ActorRef[ErrorBudgetMessage] | None
    early: tuple[ChildSpec, ...]
    late: tuple[ChildSpec, ...]

    def unavailable(self) -> str | None:
        """The readiness check: ``"database unavailable"`` while the primary's breaker refuses."""
        return unavailable(self.db_breaker)


def _check_mailboxes(config: TriageConfig, source: str) -> None:
    problems = [
        ConfigProblem(
            source=source,
            line=None,
            path=f"$.mailboxes.{name}",
            message=f"missing required profile [mailboxes.{name}] (the {actor} actor uses it)",
        )
        for actor, name in BACKBONE_MAILBOXES.items()
        if name not in config.mailboxes
    ]
    if problems:
        raise ConfigError(problems)


def _mailbox(config: TriageConfig, actor: str) -> dict[str, Any]:
    """``actor_child`` keywords for ``actor``'s mailbox profile."""
    mailbox = config.mailboxes[BACKBONE_MAILBOXES[actor]]
    return {"capacity": mailbox.capacity, "overflow": Overflow(mailbox.overflow)}


def _live_detector(
    rows: Sequence[CatalogRow], detectors: DetectorSet, row_id: int, kind: type[D]
) -> D | None:
    """The detector of catalog row ``row_id``, if that row is live here."""
    for row in rows:
        if row.id == row_id:
            return detectors[alert_name(row)].expect(kind)
    return None


def _breaker(config: TriageConfig, name: str, runtime: Runtime) -> Breaker:
    breaker = Breaker(
        name,
        **engine_kwargs(config.breakers[name]),
        clock=runtime.clock,
        events=runtime.events,
        metrics=runtime.metrics,
    )
    return runtime.tunables.breaker(name, breaker)  # a reload retunes it in place


def build_backbone_actors(
    config: TriageConfig,
    catalog: Catalog,
    backbone: Backbone,
    runtime: Runtime,
    *,
    rows: Sequence[CatalogRow],
    detectors: DetectorSet,
    shutdown_s: float,
    source: str = "<config>",
) -> BackboneActors:
    """Wire the probe, the writer, the relay and the inbox on ``backbone`` (nothing runs yet).

    ``rows`` are the live catalog rows (their detectors, in ``detectors``, are fed
    by these actors); ``shutdown_s`` is each child's shutdown deadline.
    """
    _check_mailboxes(config, source)
    common: dict[str, Any] = {"deadlines": runtime.deadlines, "metrics": runtime.metrics}
    db_breaker = _breaker(config, DB_BREAKER, runtime)
    database = config.database
    health_spec, health = actor_child(
        "db_health",
        partial(
            DbHealth,
            backbone.pool,
            db_breaker,
            tick_s=config.daemon.detector_tick_s,
            # A backstop one tick after the pool's own connect and command timeouts.
            timeout_s=(
                database.connect_timeout_s
                + database.command_timeout_s
                + config.daemon.detector_tick_s
            ),
        ),
        **_mailbox(config, "db_health"),
        restart=Restart.PERMANENT,
        shutdown_s=shutdown_s,
        **common,
    )
    # Row 5: writes share the probe's primary breaker; spoolable kinds go to the
    # durable journal while the primary is gone, and replay in order after.
    spool = config.spool
    replica_breaker = None
    if backbone.replica is not None:
        replica_breaker = _breaker(config, "postgres_replica", runtime)
    db = DbGateway(
        backbone.pool,
        db_breaker,
        Spool(spool.path, max_bytes=spool.max_bytes, fsync=spool.fsync),
        spool,
        appliers=SPOOL_APPLIERS,
        wall=runtime.clock.wall,
        replica=backbone.replica,
        replica_breaker=replica_breaker,
        connection_errors=_live_detector(rows, detectors, DB_ROW, RateDetector),
    )
    writer_spec, writer = db_writer_child(
        db,
        mailbox=config.mailboxes[BACKBONE_MAILBOXES["db_writer"]],
        shutdown_s=shutdown_s,
        restart=Restart.PERMANENT,
        **common,
    )
    early: list[ChildSpec] = [health_spec, writer_spec]
    relay: ActorRef[RelayMessage] | None = None
    relay_pool: DbPool | None = None
    if config.relay.enabled:
        relay_pool = backbone.relay_pool if backbone.relay_pool is not None else backbone.pool
        restarts = _live_detector(rows, detectors, CRASH_LOOP_ROW, CountInWindowDetector)
        relay_spec, relay = relay_child(
            pool=relay_pool.asyncpg_pool,
            client=backbone.nats,
            config=config.relay,
            breaker=_breaker(config, "nats_publish", runtime),
            mailbox=config.mailboxes[BACKBONE_MAILBOXES["outbox_relay"]],
            shutdown_s=shutdown_s,
            lag=_live_detector(rows, detectors, LAG_ROW, AgeOfNewestDetector),
            restart_sinks=() if restarts is None else (restarts,),
            redact=phi_rules(config.phi).redact_bytes,  # row 11: dead letters redacted
            **common,
        )
        # The relay under its own intensity ([supervisors.relay]): a poison event
        # costs it a restart or two, never the root's budget (row 9).
        early.append(
            Supervisor(
                "relay",
                [relay_spec],
                **engine_kwargs(config.supervisors["relay"]),
                runtime=runtime,
            ).child_spec()
        )
    duplicates = _live_detector(rows, detectors, INBOX_ROW, CountInWindowDetector)
    inbox_spec, inbox = inbox_child(
        pool=backbone.pool.asyncpg_pool,
        client=backbone.nats,
        config=config.inbox,
        mailbox=config.mailboxes[BACKBONE_MAILBOXES["inbox_consumer"]],
        shutdown_s=shutdown_s,
        detector=duplicates
        if duplicates is not None
        else build_inbox_detector(config, catalog, runtime=runtime),
        registry=runtime.metrics.registry if runtime.metrics is not None else None,
        breaker=db_breaker,  # one breaker for the primary database
        restart=Restart.PERMANENT,
        **common,
    )
    late: list[ChildSpec] = [inbox_spec]
    budget: ActorRef[ErrorBudgetMessage] | None = None
    if config.slo.enabled:
        budget_spec, budget = actor_child(
            "error_budget",
            partial(
                ErrorBudget,
                backbone.pool,
                config.slo,
                registry=runtime.metrics.registry if runtime.metrics is not None else None,
            ),
            **_mailbox(config, "error_budget"),
            restart=Restart.PERMANENT,
            shutdown_s=shutdown_s,
            **common,
        )
        late.append(budget_spec)
    return BackboneActors(
        db_breaker=db_breaker,
        db_health=health,
        db=db,
        db_writer=writer,
        relay=relay,
        relay_pool=relay_pool,
        inbox=inbox,
        error_budget=budget,
        early=tuple(early),
        late=tuple(late),
    )
