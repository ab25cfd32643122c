"""The outbox relay against real PostgreSQL and NATS: order, marking, lag, breaker, claims, warnings."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import trio

from actors.outbox_relay import (
    RelayMessage,
    RelayState,
    RelayStatistics,
    dlq_stream_name,
    nudge,
    relay_child,
    retry_horizon_s,
)
from bench.chaos.scenario_nats import check_order
from config.schema import MailboxConfig, RelayConfig
from engine.actor import ActorRef
from engine.breaker import Breaker, CircuitState
from engine.detectors import AgeOfNewestDetector, CountInWindowDetector
from engine.errors import ProviderUnavailable
from engine.supervisor import ChildSpec, Supervisor
from providers import jetstream
from providers.bridge import run
from providers.db import DAEMON_ROLE, migrate, run_as_relay
from providers.db.outbox import (
    BatchReport,
    NewEvent,
    OutboxRow,
    Publish,
    _settle,
    claim_batch_async,
    enqueue_async,
    relay_batch,
    relay_session,
)
from providers.embedded import EmbeddedPostgres
from providers.services import postgres_url_with


@dataclass
class World:
    admin_url: str
    pool: asyncpg.Pool[asyncpg.Record]
    client: jetstream.JetStreamClient
    tenants: list[uuid.UUID]
    config: RelayConfig


async def _tenants(url: str) -> list[uuid.UUID]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("INSERT INTO tenants (name) VALUES ('a'), ('b') RETURNING id")
        return [row["id"] for row in rows]
    finally:
        await conn.close()


async def _published_flags(url: str) -> list[tuple[int, bool, int, str | None]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT id, published_at IS NOT NULL AS done, attempts, last_error FROM outbox ORDER BY id"
        )
        return [(r["id"], r["done"], r["attempts"], r["last_error"]) for r in rows]
    finally:
        await conn.close()


@pytest.fixture
async def world(
    postgres_url: str, nats_url: str, bridge: asyncio.AbstractEventLoop
) -> AsyncIterator[World]:
    await migrate(postgres_url)
    tenants = await run(_tenants, postgres_url)
    create = functools.partial(
        asyncpg.create_pool,
        postgres_url_with(postgres_url, user=DAEMON_ROLE),
        min_size=1,
        max_size=4,
    )
    pool = await run(create)
    client = await run(jetstream.connect, nats_url)
    tag = uuid.uuid4().hex[:8]
    config = RelayConfig(
        stream=f"EV_{tag}", subjects=f"ev{tag}.>", batch_size=7, poll_interval_s=0.02,
        ack_timeout_s=2.0, duplicate_window_s=60.0,
    )  # fmt: skip
    try:
        yield World(postgres_url, pool, client, tenants, config)
    finally:
        await run(jetstream.close, client)
        await run(pool.close)


def _breaker(**overrides: float) -> Breaker:
    fields: dict[str, float] = dict(
        fail_max=1, reset_timeout_s=0.2, reset_timeout_max_s=0.2, reset_backoff_multiplier=1.0,
        failure_rate_threshold=2.0, rate_window_s=1.0, minimum_calls=1, slow_call_s=5.0,
        slow_call_rate_threshold=2.0, half_open_max_calls=1,
    )  # fmt: skip
    fields.update(overrides)
    return Breaker("nats_publish", **fields)  # type: ignore[arg-type]


async def _write(world: World, count: int) -> list[int]:
    ids = []
    subject = world.config.subjects.replace(">", "appointment")
    for n in range(count):
        tenant = world.tenants[n % 2]
        event = NewEvent("appointment", f"a{n % 3}", subject, {"n": n})
        [(outbox_id, _)] = await run(enqueue_async, world.pool, tenant, [event])
        ids.append(outbox_id)
    return ids


MAILBOX = MailboxConfig(capacity=16, overflow="wait")


def _relay(
    world: World, config: RelayConfig | None = None, breaker: Breaker | None = None, **kw: Any
) -> tuple[ChildSpec, ActorRef[RelayMessage]]:
    return relay_child(
        pool=kw.pop("pool", world.pool), client=kw.pop("client", world.client),
        config=config if config is not None else world.config,
        breaker=breaker if breaker is not None else _breaker(), mailbox=MAILBOX, shutdown_s=2.0,
        **kw,
    )  # fmt: skip


def _stats(ref: ActorRef[RelayMessage]) -> RelayStatistics:
    stats: object = ref.statistics()
    assert isinstance(stats, RelayStatistics), stats
    return stats


async def _until(
    ref: ActorRef[RelayMessage],
    predicate: Callable[[RelayStatistics], bool],
    timeout_s: float = 10.0,
) -> RelayStatistics:
    """Poll the relay's statistics (no event signals them) until ``predicate`` holds."""
    with trio.fail_after(timeout_s):
        while True:
            stats: object = ref.statistics()
            if isinstance(stats, RelayStatistics) and predicate(stats):
                return stats
            await trio.sleep(0.01)


async def test_relays_in_order_marks_published_and_clears_the_lag(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="triage.relay")
    ids = await _write(world, 30)
    lag = AgeOfNewestDetector("lag", metric="m_timestamp_seconds", threshold=30.0)
    spec, relay = _relay(world, lag=lag)
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        assert _stats(relay).state is RelayState.RELAYING
        await _until(relay, lambda s: s.published == 30 and s.lag_s is None)
        more = await _write(world, 5)
        nudge(relay)
        stats = await _until(relay, lambda s: s.published == 35)
        assert stats.failed == 0 and stats.restarts == 0
        nursery.cancel_scope.cancel()
    assert relay.statistics() is None  # no incarnation runs
    transitions = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert transitions == [
        "outbox relay: starting -> relaying (started)",
        "outbox relay: relaying -> stopped (stopped)",
    ]
    assert lag.evaluate().value == 0.0  # nothing pending
    stored = await run(jetstream.read_stream, world.client, world.config.stream)
    assert [m.msg_id for m in stored] == [str(i) for i in ids + more]
    assert check_order(stored) == []
    assert all(done for _, done, _, _ in await run(_published_flags, world.admin_url))


async def test_open_breaker_keeps_rows_then_replays_in_order(world: World) -> None:
    breaker = _breaker()
    spec, relay = _relay(world, breaker=breaker)
    breaker.force_open("test: NATS is away")
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        ids = await _write(world, 20)
        stats = await _until(relay, lambda s: s.state is RelayState.BLOCKED and s.lag_s is not None)
        assert stats.published == 0
        assert not any(done for _, done, _, _ in await run(_published_flags, world.admin_url))
        breaker.reset("test: NATS is back")
        stats = await _until(relay, lambda s: s.published == 20 and s.lag_s is None)
        assert stats.state is RelayState.RELAYING
        nursery.cancel_scope.cancel()
    stored = await run(jetstream.read_stream, world.client, world.config.stream)
    assert [m.msg_id for m in stored] == [str(i) for i in ids]


async def test_a_replica_skips_the_aggregates_another_one_holds(world: World) -> None:
    await _write(world, 12)  # aggregates a0, a1, a2 alternating over two tenants

    async def two_replicas(
        pool: asyncpg.Pool[asyncpg.Record],
    ) -> tuple[list[OutboxRow], list[OutboxRow]]:
        claimed = asyncio.Event()
        release = asyncio.Event()
        first: list[OutboxRow] = []

        async def replica_a(conn: object) -> None:
            first.extend(await claim_batch_async(conn, 2))  # type: ignore[arg-type]
            claimed.set()
            await release.wait()

        task = asyncio.ensure_future(run_as_relay(pool, replica_a))
        await claimed.wait()
        second = await run_as_relay(pool, claim_batch_async, 100)
        release.set()
        await task
        return first, second

    first, second = await run(two_replicas, world.pool)
    held = {row.aggregate for row in first}
    assert len(first) == 2
    assert second and not any(row.aggregate in held for row in second)
    # The rest of every other aggregate is claimable, in id order.
    assert [row.id for row in second] == sorted(row.id for row in second)


async def test_failed_publishes_are_recorded_and_stop_their_aggregate(world: World) -> None:
    ids = await _write(world, 6)

    async def flaky(rows: Sequence[OutboxRow]) -> list[object]:
        await asyncio.sleep(0)
        return [TimeoutError("no ack") if row.id == ids[1] else "ack" for row in rows]

    report = await run(relay_batch, world.pool, flaky, 100)
    assert (report.claimed, report.failed) == (6, 1)
    assert report.first_error == "TimeoutError: no ack"
    flags = {
        i: (done, attempts, err)
        for i, done, attempts, err in await run(_published_flags, world.admin_url)
    }
    assert flags[ids[1]] == (False, 1, "TimeoutError: no ack")
    # ids[4] belongs to the failed row's aggregate (n % 3 == 1, same tenant parity differs:
    # the aggregate key includes the tenant), so only rows of that exact aggregate wait.
    failed_aggregate = {ids[n] for n in range(6) if n % 3 == 1 and n % 2 == 1}
    for i in ids:
        assert flags[i][0] is (i not in failed_aggregate), i
    assert report.published == 6 - len(failed_aggregate)
    assert report.lag_s is not None


def test_settle_marks_only_the_acked_prefix_of_each_aggregate() -> None:
    def row(i: int, aggregate: str) -> OutboxRow:
        return OutboxRow(i, "t", "x", aggregate, i, "s", "{}", {}, 0)

    rows = [row(1, "a"), row(2, "b"), row(3, "a"), row(4, "a"), row(5, "b")]
    results: list[object] = ["ok", "ok", RuntimeError("nope"), "ok", "ok"]
    published, failures = _settle(rows, results)
    assert published == [1, 2, 5]
    assert failures == [(3, "RuntimeError: nope")]


async def test_warns_when_the_duplicate_window_is_short_and_replicas_are_few(world: World) -> None:
    config = world.config
    await run(jetstream.ensure_stream, world.client, config.stream, [config.subjects], 1.0)
    breaker = _breaker(reset_timeout_s=2.0, reset_timeout_max_s=30.0)
    spec, relay = _relay(world, config, breaker, ensure_stream=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        warnings = _stats(relay).warnings
        nursery.cancel_scope.cancel()
    horizon = retry_horizon_s(config, breaker)
    assert horizon == pytest.approx(2.0 + 30.0 + 0.02 + config.session_s)
    assert len(warnings) == 3
    text = " | ".join(warnings)
    assert f"retry horizon {horizon:g}s" in text
    assert "below [relay] duplicate_window_s" in text
    assert "1 replica(s)" in text
    assert breaker.state is CircuitState.CLOSED


async def test_database_outage_degrades_then_recovers(
    nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    with EmbeddedPostgres(settings={"fsync": "off"}) as server:
        await migrate(server.url)
        [tenant, _] = await run(_tenants, server.url)
        create = functools.partial(
            asyncpg.create_pool,
            postgres_url_with(server.url, user=DAEMON_ROLE),
            min_size=1,
            max_size=2,
        )
        pool = await run(create)
        client = await run(jetstream.connect, nats_url)
        tag = uuid.uuid4().hex[:8]
        config = RelayConfig(stream=f"DB_{tag}", subjects=f"db{tag}.>", poll_interval_s=0.02)
        event = NewEvent("appointment", "a1", f"db{tag}.appointment", {"n": 1})
        breaker = _breaker()
        spec, relay = relay_child(
            pool=pool, client=client, config=config, breaker=breaker, mailbox=MAILBOX,
            shutdown_s=2.0,
        )  # fmt: skip
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(spec.start)
                await run(enqueue_async, pool, tenant, [event])
                await _until(relay, lambda s: s.published == 1)
                await trio.to_thread.run_sync(server.stop)
                await _until(relay, lambda s: s.state is RelayState.DEGRADED)
                assert breaker.state is CircuitState.CLOSED  # the database is not NATS
                await trio.to_thread.run_sync(server.start)
                await _until(relay, lambda s: s.state is RelayState.RELAYING, 15)
                await run(enqueue_async, pool, tenant, [event])
                await _until(relay, lambda s: s.published == 2, 15)
                nursery.cancel_scope.cancel()
        finally:
            await run(jetstream.close, client)
            await run(pool.close)


# -- poison events and crash loops (catalog row 9) -------------------------------------


async def _insert_raw(url: str, tenant: uuid.UUID, subject: str, payload: str, headers: str) -> int:
    """An outbox row written behind the application's back (the superuser): schema drift."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject, payload,"
            " headers) VALUES ($1, 'appointment', 'a0', 1, $2, $3::jsonb, $4::jsonb) RETURNING id",
            tenant, subject, payload, headers,
        )  # fmt: skip
        assert row is not None
        return int(row["id"])
    finally:
        await conn.close()


async def _dead_letters(url: str) -> list[tuple[str, str, int, int]]:
    """(ref, error, attempts, skipped seq) of every dead letter, by ref."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT ref, error, attempts, (headers->>'seq')::int AS seq FROM dead_letters"
            " ORDER BY ref::bigint"
        )
        return [(r["ref"], r["error"], r["attempts"], r["seq"]) for r in rows]
    finally:
        await conn.close()


async def _small_stream(client: jetstream.JetStreamClient, config: RelayConfig) -> None:
    """Pre-create the relay's stream with a 2 KiB max message size (the relay keeps it)."""
    import nats.js.api

    await client.js.add_stream(
        nats.js.api.StreamConfig(
            name=config.stream, subjects=[config.subjects], duplicate_window=60.0,
            max_msg_size=2048,
        )
    )  # fmt: skip


def _poison_config(world: World, **changes: object) -> RelayConfig:
    import msgspec

    tag = world.config.stream.lower()
    return msgspec.structs.replace(world.config, dlq_subject=f"dlq.{tag}", **changes)


async def test_poison_events_are_dead_lettered_one_by_one_and_the_rest_goes_on(
    world: World,
) -> None:
    config = _poison_config(world)
    await run(_small_stream, world.client, config)
    subject = config.subjects.replace(">", "appointment")
    before = await _write(world, 6)
    tenant = world.tenants[0]  # _write's even events: tenant 0, aggregates a0, a2, a1
    oversize = await run(_insert_raw, world.admin_url, tenant, subject,
                         json.dumps({"blob": "x" * 4000}), "{}")  # fmt: skip
    drift = await run(_insert_raw, world.admin_url, tenant, subject, '{"n": -1}', '["drift"]')
    unbound = await run(_insert_raw, world.admin_url, tenant, "elsewhere.x", '{"n": -2}', "{}")
    after = await _write(world, 6)
    spec, relay = _relay(world, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        stats = await _until(relay, lambda s: s.published == 12 and s.dead_lettered == 3)
        nursery.cancel_scope.cancel()
    assert stats.restarts == 0 and stats.crashes == 0 and stats.quarantined == 0
    stored = await run(jetstream.read_stream, world.client, config.stream)
    assert [m.msg_id for m in stored] == [str(i) for i in before + after]  # each once, in order
    letters = await run(_dead_letters, world.admin_url)
    assert [ref for ref, *_ in letters] == [str(oversize), str(drift), str(unbound)]
    assert "exceeds the stream's max_msg_size 2048" in letters[0][1]
    assert "undecodable headers" in letters[1][1]
    assert "not bound" in letters[2][1]
    assert [seq for *_, seq in letters] == [2, 3, 4]  # the skipped seqs of tenant 0's a0
    dlq = await run(jetstream.read_stream, world.client, dlq_stream_name(config))
    assert [m.msg_id for m in dlq] == [f"dlq-outbox-{i}" for i in (oversize, drift, unbound)]
    assert [m.headers["Triage-Skipped-Seq"] for m in dlq] == ["2", "3", "4"]
    flags = await run(_published_flags, world.admin_url)
    assert {i for i, *_ in flags} == set(before + after)  # the poison rows left the outbox
    assert all(done for _, done, _, _ in flags)


async def _shrink_stream(client: jetstream.JetStreamClient, stream: str) -> None:
    info = await client.js.stream_info(stream)
    info.config.max_msg_size = 2048
    await client.js.update_stream(info.config)


async def test_a_refusal_the_relay_did_not_foresee_is_learnt_from_the_stream(world: World) -> None:
    config = _poison_config(world, ack_timeout_s=0.5)
    subject = config.subjects.replace(">", "appointment")
    spec, relay = _relay(world, config)
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        await run(_shrink_stream, world.client, config.stream)  # after the relay read it
        good = await _write(world, 2)
        big = await run(_insert_raw, world.admin_url, world.tenants[0], subject,
                        json.dumps({"blob": "x" * 4000}), "{}")  # fmt: skip
        good += await _write(world, 2)
        nudge(relay)
        await _until(relay, lambda s: s.published == 4 and s.dead_lettered == 1)
        nursery.cancel_scope.cancel()
    [(ref, error, _, _)] = await run(_dead_letters, world.admin_url)
    assert ref == str(big) and "stream refused" in error and "10054" in error
    stored = await run(jetstream.read_stream, world.client, config.stream)
    assert [m.msg_id for m in stored] == [str(i) for i in good]


async def test_an_event_failing_max_attempts_times_is_dead_lettered(world: World) -> None:
    config = _poison_config(world, max_attempts=3)
    ids = await _write(world, 5)
    victim = ids[1]

    def flaky(real: Publish) -> Publish:
        async def publish(rows: Sequence[OutboxRow]) -> list[object]:
            results = await real(rows)
            return [
                TimeoutError("no ack") if r.id == victim else x
                for r, x in zip(rows, results, strict=True)
            ]

        return publish

    spec, relay = _relay(world, config, _breaker(fail_max=100), publish_hook=flaky)
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        stats = await _until(relay, lambda s: s.dead_lettered == 1 and s.published == 4)
        nursery.cancel_scope.cancel()
    assert stats.failed == config.max_attempts - 1 and stats.restarts == 0  # then dead-lettered
    [(ref, error, attempts, _)] = await run(_dead_letters, world.admin_url)
    assert (ref, attempts) == (str(victim), 3)
    assert "TimeoutError" in error
    dlq = await run(jetstream.read_stream, world.client, dlq_stream_name(config))
    assert [m.msg_id for m in dlq] == [f"dlq-outbox-{victim}"]


async def test_a_crash_loop_under_a_supervisor_quarantines_the_row_and_goes_on(
    world: World,
) -> None:
    config = _poison_config(world)
    ids = await _write(world, 20)
    victim = ids[9]
    detector = CountInWindowDetector(
        "relay_restarts", metric="m_total", threshold=1.0, window_s=300.0, buckets=10
    )

    def crashing(real: Publish) -> Publish:
        async def publish(rows: Sequence[OutboxRow]) -> list[object]:
            if any(r.id == victim for r in rows):
                raise RuntimeError("schema drift: cannot render this event")
            return list(await real(rows))

        return publish

    spec, relay = _relay(world, config, restart_sinks=[detector], publish_hook=crashing)
    supervisor = Supervisor("backbone", [spec], max_restarts=3, period_s=60.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        stats = await _until(relay, lambda s: s.published == 19 and s.quarantined == 1)
        assert stats.state is RelayState.RELAYING
        nursery.cancel_scope.cancel()
    assert stats.crashes == 2 and stats.restarts == 2  # the batch, then the row alone
    assert stats.starts == 3 and stats.dead_lettered == 1
    assert detector.evaluate().value == 2.0 and detector.firing
    [(ref, error, _, _)] = await run(_dead_letters, world.admin_url)
    assert ref == str(victim) and "relay crashed" in error and "schema drift" in error
    stored = await run(jetstream.read_stream, world.client, config.stream)
    assert [m.msg_id for m in stored] == [str(i) for i in ids if i != victim]
    dlq = await run(jetstream.read_stream, world.client, dlq_stream_name(config))
    assert [m.msg_id for m in dlq] == [f"dlq-outbox-{victim}"]


# -- sessions: batches back to back in one crossing ------------------------------------


async def _locked_by_others(url: str) -> int:
    """Outbox rows that another transaction holds (FOR UPDATE SKIP LOCKED skips them)."""
    conn = await asyncpg.connect(url)
    try:
        total = await conn.fetchval("SELECT count(*) FROM outbox")
        free = await conn.fetchval(
            "SELECT count(*) FROM (SELECT id FROM outbox FOR UPDATE SKIP LOCKED) AS free"
        )
        return int(total) - int(free)
    finally:
        await conn.close()


def _acks(rows: Sequence[OutboxRow]) -> list[object]:
    return ["ack"] * len(rows)


async def test_a_session_claims_ahead_and_publishes_each_batch_after_the_acks_before(
    world: World,
) -> None:
    ids = await _write(world, 30)
    log: list[tuple[str, list[int]]] = []

    async def publish(rows: Sequence[OutboxRow]) -> list[object]:
        batch = [row.id for row in rows]
        log.append(("start", batch))
        if len(log) == 1:  # hold the first batch's "acks" until the next batch is claimed
            for _ in range(1000):
                if await _locked_by_others(world.admin_url) >= 14:
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the next batch was not claimed while this one was out")
        log.append(("end", batch))
        return _acks(rows)

    claimed: list[int] = []
    report = await run(relay_session, world.pool, publish, 7, None, claimed, 60.0)
    assert (report.batches, report.claimed, report.published, report.failed) == (5, 30, 30, 0)
    assert report.lag_s is None and not report.more and report.stopped_by is None
    assert [kind for kind, _ in log] == ["start", "end"] * 5  # one batch out at a time
    assert [i for kind, batch in log if kind == "start" for i in batch] == ids
    assert claimed == ids[28:]
    assert all(done for _, done, _, _ in await run(_published_flags, world.admin_url))


async def test_a_session_ends_at_a_failure_and_sends_nothing_of_that_aggregate_after_it(
    world: World,
) -> None:
    await run(jetstream.ensure_stream, world.client, world.config.stream,
              [world.config.subjects], 60.0)  # fmt: skip
    ids = await _write(world, 30)
    victim = ids[9]  # the second batch
    batches: list[list[int]] = []

    async def flaky(rows: Sequence[OutboxRow]) -> list[object]:
        batches.append([row.id for row in rows])
        return [TimeoutError("no ack") if row.id == victim else "ack" for row in rows]

    report = await run(relay_session, world.pool, flaky, 7, None, None, 60.0)
    assert batches == [ids[:7], ids[7:14]]  # the third batch (claimed ahead) never went out
    assert (report.batches, report.claimed, report.failed) == (2, 14, 1)
    assert not report.more
    n = ids.index(victim)
    same = [i for k, i in enumerate(ids[7:14], 7) if k % 6 == n % 6]  # _write's aggregates
    assert report.published == 14 - len(same)
    flags = {i: (done, attempts) for i, done, attempts, _ in await run(_published_flags,
                                                                        world.admin_url)}  # fmt: skip
    assert flags[victim] == (False, 1)
    assert [i for i in ids if not flags[i][0]] == same + ids[14:]
    # The next session picks the aggregate up again from the failed row, in order.
    again = await run(relay_session, world.pool, _real_publish(world), 7, None, None, 60.0)
    assert again.published == len(same) + 16 and again.failed == 0
    stored = await run(jetstream.read_stream, world.client, world.config.stream)
    assert [int(m.msg_id) for m in stored] == same + ids[14:]  # the failed row first


def _real_publish(world: World) -> Publish:
    """The relay's own publish step (to JetStream), for a session run without the actor."""
    from actors.outbox_relay import _Limits, _publish_rows

    limits = _Limits([world.config.subjects], 1024 * 1024)
    return functools.partial(_publish_rows, world.client, world.config.ack_timeout_s, limits)


async def test_a_crash_keeps_what_the_batches_before_marked_and_names_the_batch_in_flight(
    world: World,
) -> None:
    await run(jetstream.ensure_stream, world.client, world.config.stream,
              [world.config.subjects], 60.0)  # fmt: skip
    ids = await _write(world, 30)
    real = _real_publish(world)

    async def crashing(rows: Sequence[OutboxRow]) -> Sequence[object]:
        if any(row.id == ids[16] for row in rows):
            raise RuntimeError("cannot render this event")
        return await real(rows)

    claimed: list[int] = []
    before: list[BatchReport] = []
    session = functools.partial(
        relay_session, world.pool, crashing, 7, None, claimed, 60.0, before_crash=before
    )
    with pytest.raises(RuntimeError, match="cannot render"):
        await run(session)
    assert claimed == ids[14:21]
    [done] = before
    assert (done.batches, done.published) == (2, 14)
    flags = await run(_published_flags, world.admin_url)
    assert [i for i, published, _, _ in flags if published] == ids[:14]  # committed
    assert [int(m.msg_id) for m in await run(jetstream.read_stream, world.client,
                                              world.config.stream)] == ids[:14]  # fmt: skip


async def test_nats_refusing_a_batch_ends_the_session_and_keeps_the_marks_before(
    world: World,
) -> None:
    ids = await _write(world, 30)
    calls: list[int] = []

    async def going_away(rows: Sequence[OutboxRow]) -> list[object]:
        calls.append(len(rows))
        if len(calls) == 2:
            raise ProviderUnavailable("nats: not connected")
        return _acks(rows)

    report = await run(relay_session, world.pool, going_away, 7, None, None, 60.0)
    assert isinstance(report.stopped_by, ProviderUnavailable)
    assert (report.batches, report.claimed, report.published, report.failed) == (1, 7, 7, 0)
    assert report.lag_s is not None
    flags = await run(_published_flags, world.admin_url)
    assert [i for i, published, attempts, _ in flags if published] == ids[:7]
    assert all(attempts == 0 for _, _, attempts, _ in flags)  # an outage is no attempt


async def test_a_session_of_zero_seconds_is_one_batch_and_says_whether_more_wait(
    world: World,
) -> None:
    await _write(world, 10)
    first = await run(relay_session, world.pool, _async_acks, 7, None, None, 0.0)
    assert (first.batches, first.published, first.more) == (1, 7, True)
    second = await run(relay_session, world.pool, _async_acks, 7, None, None, 0.0)
    assert (second.batches, second.published, second.more) == (1, 3, False)
    assert second.lag_s is None


async def _async_acks(rows: Sequence[OutboxRow]) -> list[object]:
    await asyncio.sleep(0)
    return _acks(rows)


def test_the_session_must_end_within_the_duplicate_window() -> None:
    import msgspec

    with pytest.raises(ValueError, match="session_s: 120 must be shorter than duplicate_window_s"):
        RelayConfig(session_s=120.0, duplicate_window_s=120.0)
    with pytest.raises(msgspec.ValidationError, match="session_s"):
        msgspec.convert({"session_s": -1.0}, RelayConfig)
    assert RelayConfig(session_s=0.0).session_s == 0.0  # one batch per turn


async def test_a_cancelled_session_rolls_back_and_leaves_the_connection_usable(
    world: World,
) -> None:
    ids = await _write(world, 30)
    started: list[int] = []
    stalled = trio.Event()  # set from the asyncio side: trio-asyncio runs in Trio's thread

    async def stalling(rows: Sequence[OutboxRow]) -> list[object]:
        started.append(len(rows))
        if len(started) == 2:  # the second batch never gets its acks
            stalled.set()
            await asyncio.Event().wait()
        return _acks(rows)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, relay_session, world.pool, stalling, 7, None, None, 60.0)
        with trio.fail_after(10):
            await stalled.wait()
        nursery.cancel_scope.cancel()  # a claim ahead may be running on the connection
    flags = await run(_published_flags, world.admin_url)
    assert not any(done for _, done, _, _ in flags)  # the session's marks rolled back
    report = await run(relay_session, world.pool, _async_acks, 7, None, None, 60.0)
    assert report.published == len(ids)
