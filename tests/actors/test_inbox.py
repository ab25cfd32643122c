"""The inbox consumer against real PostgreSQL and NATS: dedupe, ack after commit, nak, DLQ."""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import pytest
import trio
from prometheus_client import CollectorRegistry

import config
from actors.inbox import (
    InboxConsumer,
    InboxMessage,
    InboxState,
    InboxStatistics,
    build_detector,
    consumer_settings,
    decode_event,
    inbox_child,
)
from config.schema import InboxConfig, MailboxConfig
from engine.actor import ActorRef
from engine.breaker import Breaker
from engine.detectors import CountInWindowDetector
from engine.errors import ProviderUnavailable
from engine.supervisor import ChildSpec
from providers import jetstream
from providers.bridge import run
from providers.db import DAEMON_ROLE, migrate
from providers.db.inbox import InboxItem
from providers.jetstream import PublishItem
from providers.jetstream_consumer import Delivery, Settle, SettleKind
from providers.services import postgres_url_with
from supervisors.vocabulary import METRICS, MITIGATIONS


@dataclass
class World:
    admin_url: str
    pool: asyncpg.Pool[asyncpg.Record]
    client: jetstream.JetStreamClient
    tenant: uuid.UUID
    config: InboxConfig

    @property
    def subject(self) -> str:
        return self.config.subjects.replace(">", "appointment")


async def _tenant(url: str) -> uuid.UUID:
    conn = await asyncpg.connect(url)
    try:
        tenant: uuid.UUID = await conn.fetchval(
            "INSERT INTO tenants (name) VALUES ('a') RETURNING id"
        )
        return tenant
    finally:
        await conn.close()


async def _admin_fetch(url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


@pytest.fixture
async def world(
    postgres_url: str, nats_url: str, bridge: asyncio.AbstractEventLoop
) -> AsyncIterator[World]:
    await migrate(postgres_url)
    tenant = await run(_tenant, postgres_url)
    create = functools.partial(
        asyncpg.create_pool, postgres_url_with(postgres_url, user=DAEMON_ROLE), min_size=1,
        max_size=4,
    )  # fmt: skip
    pool = await run(create)
    client = await run(jetstream.connect, nats_url)
    tag = uuid.uuid4().hex[:8]
    cfg = InboxConfig(
        stream=f"IN_{tag}", subjects=f"in{tag}.>", durable=f"inbox{tag}", batch_size=10,
        fetch_timeout_s=0.1, ack_wait_s=0.5, max_deliver=3, backoff_s=[0.1, 0.2],
    )  # fmt: skip
    try:
        yield World(postgres_url, pool, client, tenant, cfg)
    finally:
        await run(jetstream.close, client)
        await run(pool.close)


def _detector() -> CountInWindowDetector:
    return CountInWindowDetector(
        "inbox_duplicates", metric="triage_inbox_duplicates_total", threshold=0, window_s=60,
        buckets=6,
    )  # fmt: skip


def _body(tenant: uuid.UUID, appointment: str) -> bytes:
    return json.dumps(
        {"tenant_id": str(tenant), "appointment_id": appointment, "kind": "appointment.booked"}
    ).encode()


async def _publish(world: World, items: Sequence[tuple[str, bytes]]) -> None:
    batch = [PublishItem(msg_id, world.subject, body) for msg_id, body in items]
    results = await run(jetstream.publish_batch, world.client, batch, 2.0)
    assert not [r for r in results if isinstance(r, Exception)]


MAILBOX = MailboxConfig(capacity=16, overflow="wait")


def _consumer(world: World, **kw: Any) -> tuple[ChildSpec, ActorRef[InboxMessage]]:
    return inbox_child(
        pool=world.pool, client=world.client, config=world.config, mailbox=MAILBOX,
        shutdown_s=2.0, **kw,
    )  # fmt: skip


def _stats(ref: ActorRef[InboxMessage]) -> InboxStatistics:
    stats: object = ref.statistics()
    assert isinstance(stats, InboxStatistics), stats
    return stats


async def _until(
    ref: ActorRef[InboxMessage], until: Callable[[InboxStatistics], bool], timeout_s: float = 8
) -> InboxStatistics:
    """Poll the consumer's statistics (no event signals them) until ``until`` holds."""
    with trio.fail_after(timeout_s):
        while True:
            stats = _stats(ref)
            if until(stats):
                return stats
            await trio.sleep(0.01)


async def _sessions(world: World) -> dict[str, int]:
    rows = await run(
        _admin_fetch, world.admin_url, "SELECT topic, count(*) AS n FROM threads GROUP BY topic"
    )
    return {r["topic"]: r["n"] for r in rows}


def test_decode_event_is_typed() -> None:
    tenant = uuid.uuid4()
    event = decode_event(_body(tenant, "apt-1"))
    assert (event.tenant_id, event.appointment_id, event.kind) == (
        tenant,
        "apt-1",
        "appointment.booked",
    )
    with pytest.raises(msgspec.ValidationError):
        decode_event(b'{"tenant_id": "x", "appointment_id": "a", "kind": "appointment.booked"}')
    with pytest.raises(msgspec.DecodeError):
        decode_event(b"\xff not json")


def test_the_shipped_configs_and_row_18_build_a_consumer() -> None:
    path = config.default_path("chaos.toml")
    cfg = config.load_config(path)
    catalog = config.load_catalog(
        config.catalog_path(cfg, path), metrics=METRICS, mitigations=MITIGATIONS
    )
    detector = build_detector(cfg, catalog)
    assert detector.metric == "triage_inbox_duplicates_total" and detector.row == 18
    assert consumer_settings(cfg.inbox).max_deliver == cfg.inbox.max_deliver


async def test_new_events_apply_once_and_republished_ones_are_counted_duplicates(
    world: World,
) -> None:
    registry = CollectorRegistry()
    detector = _detector()
    spec, consumer = _consumer(world, detector=detector, registry=registry)
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        await _publish(world, [(f"m{n}", _body(world.tenant, f"apt-{n}")) for n in range(4)])
        await _until(consumer, lambda s: s.applied == 4)
        assert not detector.evaluate().firing

        # The same appointments again under new message ids (not deduped by the stream).
        await _publish(world, [(f"again{n}", _body(world.tenant, f"apt-{n}")) for n in range(2)])
        stats = await _until(consumer, lambda s: s.duplicates == 2)
        assert detector.evaluate().firing
        assert registry.get_sample_value("triage_inbox_duplicates_total") == 2
        assert registry.get_sample_value("triage_inbox_applied_total") == 4
        assert await _sessions(world) == {f"appointment:apt-{n}": 1 for n in range(4)}
        assert stats.state is InboxState.CONSUMING
        assert (stats.fetched, stats.applied, stats.naks, stats.dead_lettered) == (6, 4, 0, 0)
        nursery.cancel_scope.cancel()


class _DropAcks(InboxConsumer):
    """Withholds the first ack of every message: to JetStream, an ack lost on the way."""

    def settle_for(self, delivery: Delivery, decision: Settle) -> Settle:
        if decision.kind is SettleKind.ACK and delivery.num_delivered == 1:
            return Settle.skip()
        return decision


async def test_a_lost_ack_redelivers_and_changes_nothing(world: World) -> None:
    spec, consumer = _consumer(world, actor=_DropAcks)
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        await _publish(world, [(f"m{n}", _body(world.tenant, f"apt-{n}")) for n in range(3)])
        stats = await _until(consumer, lambda s: s.duplicates == 3)
        nursery.cancel_scope.cancel()
    assert stats.applied == 3 and stats.acks_dropped == 3
    assert await _sessions(world) == {f"appointment:apt-{n}": 1 for n in range(3)}
    inbox = await run(_admin_fetch, world.admin_url, "SELECT appointment_id FROM inbox")
    assert sorted(r["appointment_id"] for r in inbox) == ["apt-0", "apt-1", "apt-2"]


async def test_garbage_and_unknown_tenants_go_to_dead_letters(world: World) -> None:
    spec, consumer = _consumer(world)
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        await _publish(
            world,
            [("bad", b"not json"), ("ghost", _body(uuid.uuid4(), "apt-x")),
             ("ok", _body(world.tenant, "apt-ok"))],
        )  # fmt: skip
        await _until(consumer, lambda s: s.dead_lettered == 2 and s.applied == 1)
        # Terminated: nothing comes back.
        await trio.sleep(1.0)
        stats = _stats(consumer)
        nursery.cancel_scope.cancel()
    assert stats.dead_lettered == 2 and stats.fetched == 3 and stats.naks == 0
    letters = await run(
        _admin_fetch,
        world.admin_url,
        "SELECT source, tenant_id, error FROM dead_letters ORDER BY id",
    )
    assert [r["source"] for r in letters] == ["inbox", "inbox"]
    assert all(r["tenant_id"] is None for r in letters)
    assert "undecodable" in letters[0]["error"]


@dataclass
class Switch:
    """Shared between a test and the actor it injects faults into."""

    down: bool = True


class _DatabaseDown(InboxConsumer):
    """The database refuses every event while ``switch.down`` (dead letters still work)."""

    def __init__(self, switch: Switch, **kw: Any) -> None:
        super().__init__(**kw)
        self.switch = switch

    async def _apply(self, items: list[InboxItem]) -> list[bool | Exception]:
        if self.switch.down:
            return [ProviderUnavailable("postgres: unavailable (test)")] * len(items)
        return await super()._apply(items)


async def test_transient_failures_nak_then_apply_or_dead_letter_at_max_deliver(
    world: World,
) -> None:
    switch = Switch()
    spec, consumer = _consumer(world, actor=functools.partial(_DatabaseDown, switch))
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        await _publish(world, [("m0", _body(world.tenant, "apt-0"))])
        stats = await _until(consumer, lambda s: s.naks == 1)
        assert stats.state is InboxState.DEGRADED
        switch.down = False
        stats = await _until(consumer, lambda s: s.applied == 1)
        assert stats.state is InboxState.CONSUMING

        switch.down = True
        await _publish(world, [("m1", _body(world.tenant, "apt-1"))])
        stats = await _until(consumer, lambda s: s.dead_lettered == 1)
        nursery.cancel_scope.cancel()
    assert stats.naks == 1 + world.config.max_deliver - 1
    letters = await run(
        _admin_fetch, world.admin_url, "SELECT tenant_id, attempts, error FROM dead_letters"
    )
    assert [(r["tenant_id"], r["attempts"]) for r in letters] == [(world.tenant, 3)]
    assert "max deliveries" in letters[0]["error"]
    assert await _sessions(world) == {"appointment:apt-0": 1}


def test_inbox_config_refuses_more_backoff_steps_than_deliveries() -> None:
    with pytest.raises(ValueError, match="backoff_s"):
        InboxConfig(max_deliver=2, backoff_s=[0.1, 0.2])
    assert InboxConfig(max_deliver=3, backoff_s=[0.1, 0.2]).max_deliver == 3


async def test_an_open_database_breaker_stops_fetching_until_half_open(world: World) -> None:
    breaker = Breaker(
        "postgres_primary", fail_max=1, reset_timeout_s=0.5, reset_timeout_max_s=0.5,
        reset_backoff_multiplier=1.0, failure_rate_threshold=1.0, rate_window_s=10.0,
        minimum_calls=100, slow_call_s=10.0, slow_call_rate_threshold=1.0, half_open_max_calls=1,
    )  # fmt: skip
    spec, consumer = _consumer(world, breaker=breaker)
    breaker.force_open("test: database down")
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        await _publish(world, [(f"b{n}", _body(world.tenant, f"apt-b{n}")) for n in range(2)])
        await trio.sleep(0.3)
        # Nothing fetched while open: the events wait in JetStream, no delivery is spent.
        stats = _stats(consumer)
        assert (stats.fetched, stats.naks, stats.turns) == (0, 0, 0)
        assert stats.state is InboxState.DEGRADED
        breaker.reset()
        await _until(consumer, lambda s: s.applied == 2)
        nursery.cancel_scope.cancel()
    assert await _sessions(world) == {"appointment:apt-b0": 1, "appointment:apt-b1": 1}
