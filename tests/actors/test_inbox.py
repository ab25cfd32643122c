"""The inbox consumer against real PostgreSQL and NATS: dedupe, ack after commit, nak, DLQ."""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import asyncpg
import msgspec
import pytest
import trio
from prometheus_client import CollectorRegistry

import config
from actors.inbox import InboxConsumer, InboxState, decode_event
from config.schema import InboxConfig
from engine.breaker import Breaker
from engine.detectors import CountInWindowDetector
from engine.errors import ProviderUnavailable
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


async def _turns(consumer: InboxConsumer, until: Callable[[], bool], timeout_s: float = 8) -> None:
    with trio.fail_after(timeout_s):
        while not until():
            await consumer.step()


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
    consumer = InboxConsumer.from_config(cfg, catalog, pool=None, client=None)  # type: ignore[arg-type]
    assert consumer.detector is not None
    assert consumer.detector.metric == "triage_inbox_duplicates_total"
    assert consumer.settings.max_deliver == cfg.inbox.max_deliver


async def test_new_events_apply_once_and_republished_ones_are_counted_duplicates(
    world: World,
) -> None:
    registry = CollectorRegistry()
    detector = _detector()
    consumer = InboxConsumer(
        pool=world.pool, client=world.client, config=world.config, detector=detector,
        registry=registry,
    )  # fmt: skip
    await consumer.open()
    await _publish(world, [(f"m{n}", _body(world.tenant, f"apt-{n}")) for n in range(4)])
    await _turns(consumer, lambda: consumer.stats.applied == 4)
    assert not detector.evaluate().firing

    # The same appointments again under new message ids (not deduped by the stream).
    await _publish(world, [(f"again{n}", _body(world.tenant, f"apt-{n}")) for n in range(2)])
    await _turns(consumer, lambda: consumer.stats.duplicates == 2)
    assert detector.evaluate().firing
    assert registry.get_sample_value("triage_inbox_duplicates_total") == 2
    assert registry.get_sample_value("triage_inbox_applied_total") == 4
    assert await _sessions(world) == {f"appointment:apt-{n}": 1 for n in range(4)}
    assert consumer.state is InboxState.CONSUMING


class _DropAcks(InboxConsumer):
    """Withholds the first ack of every message: to JetStream, an ack lost on the way."""

    def settle_for(self, delivery: Delivery, decision: Settle) -> Settle:
        if decision.kind is SettleKind.ACK and delivery.num_delivered == 1:
            return Settle.skip()
        return decision


async def test_a_lost_ack_redelivers_and_changes_nothing(world: World) -> None:
    consumer = _DropAcks(pool=world.pool, client=world.client, config=world.config)
    await consumer.open()
    await _publish(world, [(f"m{n}", _body(world.tenant, f"apt-{n}")) for n in range(3)])
    await _turns(consumer, lambda: consumer.stats.duplicates == 3)
    assert consumer.stats.applied == 3 and consumer.stats.acks_dropped == 3
    assert await _sessions(world) == {f"appointment:apt-{n}": 1 for n in range(3)}
    inbox = await run(_admin_fetch, world.admin_url, "SELECT appointment_id FROM inbox")
    assert sorted(r["appointment_id"] for r in inbox) == ["apt-0", "apt-1", "apt-2"]


async def test_garbage_and_unknown_tenants_go_to_dead_letters(world: World) -> None:
    consumer = InboxConsumer(pool=world.pool, client=world.client, config=world.config)
    await consumer.open()
    await _publish(
        world,
        [("bad", b"not json"), ("ghost", _body(uuid.uuid4(), "apt-x")),
         ("ok", _body(world.tenant, "apt-ok"))],
    )  # fmt: skip
    await _turns(
        consumer, lambda: consumer.stats.dead_lettered == 2 and consumer.stats.applied == 1
    )
    letters = await run(
        _admin_fetch,
        world.admin_url,
        "SELECT source, tenant_id, error FROM dead_letters ORDER BY id",
    )
    assert [r["source"] for r in letters] == ["inbox", "inbox"]
    assert all(r["tenant_id"] is None for r in letters)
    assert "undecodable" in letters[0]["error"]
    # Terminated: nothing comes back.
    with trio.move_on_after(1.0):
        while True:
            await consumer.step()
    assert consumer.stats.dead_lettered == 2 and consumer.stats.fetched == 3


def _state(consumer: InboxConsumer) -> InboxState:
    return consumer.state


class _DatabaseDown(InboxConsumer):
    """The database refuses every event while ``down`` (dead letters still work)."""

    down = True

    async def _apply(self, items: list[InboxItem]) -> list[bool | Exception]:
        if self.down:
            return [ProviderUnavailable("postgres: unavailable (test)")] * len(items)
        return await super()._apply(items)


async def test_transient_failures_nak_then_apply_or_dead_letter_at_max_deliver(
    world: World,
) -> None:
    consumer = _DatabaseDown(pool=world.pool, client=world.client, config=world.config)
    await consumer.open()
    await _publish(world, [("m0", _body(world.tenant, "apt-0"))])
    await _turns(consumer, lambda: consumer.stats.naks == 1)
    assert _state(consumer) is InboxState.DEGRADED
    consumer.down = False
    await _turns(consumer, lambda: consumer.stats.applied == 1)
    assert _state(consumer) is InboxState.CONSUMING

    consumer.down = True
    await _publish(world, [("m1", _body(world.tenant, "apt-1"))])
    await _turns(consumer, lambda: consumer.stats.dead_lettered == 1)
    assert consumer.stats.naks == 1 + world.config.max_deliver - 1
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
    consumer = InboxConsumer(
        pool=world.pool, client=world.client, config=world.config, breaker=breaker
    )
    await consumer.open()
    await _publish(world, [(f"b{n}", _body(world.tenant, f"apt-b{n}")) for n in range(2)])
    breaker.force_open("test: database down")
    with trio.move_on_after(0.3):
        await consumer.step()
    # Nothing fetched while open: the events wait in JetStream, no delivery is spent.
    assert consumer.stats.fetched == 0 and consumer.stats.naks == 0
    breaker.reset()
    await _turns(consumer, lambda: consumer.stats.applied == 2)
    assert await _sessions(world) == {"appointment:apt-b0": 1, "appointment:apt-b1": 1}
