"""DispatchService + the ChannelDispatcher actor on real PostgreSQL with in-test provider adapters."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, cast

import asyncpg
import msgspec
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from actors.backlog_resumer import DbBacklogStore, backlog_resumer_child
from actors.dispatch_request import DispatchLimits, InvalidRequest, RequestDecoder, SubmitRequest
from actors.dispatcher import (
    CategoryDisabled,
    DispatcherChild,
    DispatcherState,
    DispatchService,
    Job,
    Overloaded,
    PhiRefused,
    Recorded,
    Send,
    Sent,
    Unpark,
    dispatcher_child,
)
from actors.failover import Failover, Outcome, OutcomeKind, Route
from actors.idempotency import IdempotencyConflict, IdempotencyStore
from actors.phi_guard import PhiGuard
from actors.phi_rules import phi_rules
from actors.templates import TemplateMissing, TemplateNotFound, TemplateRegistry, TemplateRetired
from config.schema import DatabaseConfig, PhiConfig
from engine.actor import Overflow
from engine.breaker import Breaker
from engine.detectors import RatioDetector
from engine.errors import ProviderUnavailable
from engine.events import Event, EventBus
from engine.ratelimit import RateLimiter
from engine.retry import RetryPolicy
from engine.runtime import Runtime
from engine.supervisor import Supervisor
from providers.bridge import run
from providers.channel import ChannelName, RecipientGone
from providers.db import DAEMON_ROLE, migrate
from providers.db.dispatches import (
    MAX_TEMPLATE_VERSION,
    AcceptRequest,
    DispatchStatus,
    UnknownTenant,
    accept_async,
)
from providers.db.pool import DbPool, open_pool
from providers.db.templates import TemplateRow, put_template_async
from providers.redis_cache import RedisCache
from providers.services import postgres_url_with
from tests.actors.test_failover import FakeAdapter, RecordingPool, guard, rounds

DB_CONFIG = DatabaseConfig(pool_min=1, pool_max=4, connect_timeout_s=2.0, command_timeout_s=2.0)
LIMITS = DispatchLimits(
    max_key_chars=64,
    max_template_chars=64,
    max_recipient_chars=256,
    max_data_fields=4,
    max_field_name_chars=32,
    max_value_chars=64,
)
REQUESTS = RequestDecoder(LIMITS)


class PushAdapter(FakeAdapter):
    channel = ChannelName.PUSH


@dataclass
class World:
    admin_url: str
    db: DbPool
    tenant: str
    bus: EventBus
    metrics: CollectorRegistry
    templates: TemplateRegistry


async def _tenant(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("INSERT INTO tenants (name) VALUES ('t') RETURNING id"))
    finally:
        await conn.close()


async def admin(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def go() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return await run(go)


@pytest.fixture
async def world(bridge: object, postgres_url: str) -> AsyncIterator[World]:
    await migrate(postgres_url)
    tenant = await run(_tenant, postgres_url)
    daemon = postgres_url_with(postgres_url, user=DAEMON_ROLE)
    async with open_pool(daemon, DB_CONFIG, close_s=2.0) as db:
        for name, channel, body in [
            ("reminder", "sms", "See you at {time}"),
            ("ping", "push", "New message: {topic}"),
        ]:
            await db.run_unit(
                put_template_async,
                TemplateRow(tenant, name, 1, channel, "reminders", None, body),
                True,
            )
        bus, metrics = EventBus(), CollectorRegistry()
        templates = TemplateRegistry(db, ttl_s=60.0, max_entries=100, registry=metrics, events=bus)
        yield World(postgres_url, db, tenant, bus, metrics, templates)


def failover(*adapters: FakeAdapter, **kw: Any) -> Failover:
    return Failover(
        "f",
        [Route(a, guard(a.name)) for a in adapters],
        rounds=rounds(max_attempts=kw.pop("max_rounds", 3)),
        status_timeout_s=0.5,
        requeue_after_s=kw.pop("requeue_after_s", 10.0),
        give_up_after_s=kw.pop("give_up_after_s", 20.0),
    )


def dispatcher(
    world: World, channel: ChannelName, failovers: dict[str, Failover], **kw: Any
) -> DispatcherChild:
    return dispatcher_child(
        channel,
        world.db,
        failovers,
        capacity=kw.pop("capacity", 16),
        overflow=Overflow.WAIT,
        concurrency=4,
        record_attempts=2,
        record_backoff_s=0.1,
        max_parked=16,
        shutdown_s=1.0,
        **kw,
    )


async def settled(d: DispatcherChild, timeout_s: float = 10.0) -> None:
    """Until the dispatcher's mailbox is empty and it holds nothing.

    (A message handed straight to a waiting actor is in neither place until the
    actor ran: every task blocked first.)"""
    with trio.fail_after(timeout_s):
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if d.ref.queued() == 0 and d.memory.idle.is_set():
                return
            await trio.sleep(0.01)


PHI = PhiConfig(fields=["diagnosis"], patterns={"hiv": r"\bHIV\b"})


def service(world: World, *dispatchers: DispatcherChild, **kw: Any) -> DispatchService:
    guard = PhiGuard(
        world.db, phi_rules(kw.pop("phi", PHI)), registry=world.metrics, events=world.bus
    )
    return DispatchService(
        world.db,
        world.templates,
        dispatchers,
        limits=LIMITS,
        key_ttl_s=3600.0,
        phi_guard=guard,
        registry=world.metrics,
        **kw,
    )


def sms(world: World, key: str = "k1", **kw: Any) -> SubmitRequest:
    base: dict[str, Any] = {
        "tenant_id": world.tenant,
        "idempotency_key": key,
        "channel": "sms",
        "recipient": "+15550100",
        "template": "reminder",
        "data": {"time": "10:00"},
    }
    base.update(kw)
    return REQUESTS.build(**base)  # the doors' rules: a bad field raises here


async def row(world: World, dispatch_id: str) -> asyncpg.Record:
    rows = await admin(
        world.admin_url, "SELECT * FROM dispatches WHERE id = $1", uuid.UUID(dispatch_id)
    )
    return rows[0]


async def subjects(world: World, aggregate: str, aggregate_id: str) -> list[str]:
    rows = await admin(
        world.admin_url,
        "SELECT subject FROM outbox WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY seq",
        aggregate,
        aggregate_id,
    )
    return [r["subject"] for r in rows]


async def test_submit_sends_once_and_dedupes(world: World) -> None:
    primary, secondary = (
        FakeAdapter("ghasi", fail=[ProviderUnavailable("503")]),
        FakeAdapter("twilio"),
    )
    d = dispatcher(world, ChannelName.SMS, {"default": failover(primary, secondary)})
    svc = service(world, d)
    async with trio.open_nursery() as nursery:
        await nursery.start(d.spec.start)
        first = await svc.submit(sms(world))
        assert first.status is DispatchStatus.QUEUED and not first.replay
        await settled(d)
        again = await svc.submit(sms(world))
        assert again.replay and again.dispatch_id == first.dispatch_id
        assert again.status is DispatchStatus.DISPATCHED
        with pytest.raises(IdempotencyConflict):
            await svc.submit(sms(world, data={"time": "11:00"}))
        nursery.cancel_scope.cancel()
    assert len(secondary.sent) == 1 and len(primary.sent) == 1
    message = secondary.sent[0][1]
    assert message.body == "See you at 10:00" and message.idempotency_key == "k1"
    assert message.client_ref == first.dispatch_id and message.category == "reminders"
    record = await row(world, first.dispatch_id)
    assert (record["status"], record["provider"], record["provider_ref"]) == (
        "dispatched", "twilio", "twilio-1",
    )  # fmt: skip
    assert await subjects(world, "dispatch", first.dispatch_id) == [
        "triage.events.dispatch.queued",
        "triage.events.dispatch.dispatched",
    ]


async def test_template_missing_fails_closed(world: World) -> None:
    adapter = FakeAdapter("ghasi")
    d = dispatcher(world, ChannelName.SMS, {"default": failover(adapter)})
    svc = service(world, d)
    seen: list[Event] = []
    world.bus.on(TemplateMissing, seen.append)
    with pytest.raises(TemplateNotFound) as caught:
        await svc.submit(sms(world, template="gone"))
    dispatch_id = caught.value.dispatch_id
    assert dispatch_id is not None
    record = await row(world, dispatch_id)
    assert (record["status"], record["reason"]) == ("failed", "template_not_found")
    notices = await admin(
        world.admin_url,
        "SELECT payload::text AS p FROM outbox WHERE subject = 'triage.events.ops.notice'",
    )
    [notice] = [json.loads(n["p"]) for n in notices]
    assert notice["kind"] == "template_not_found" and notice["template"] == "gone"
    assert notice["tenant"] == world.tenant and notice["dispatch_id"] == dispatch_id
    assert (
        world.metrics.get_sample_value("triage_template_not_found_total", {"channel": "sms"}) == 1
    )
    assert len(seen) == 1
    assert adapter.sent == [] and not d.memory.holds(uuid.UUID(dispatch_id))
    # The same request again is a duplicate of the failed dispatch, not a second count.
    again = await svc.submit(sms(world, template="gone"))
    assert again.replay and again.status is DispatchStatus.FAILED
    assert (
        world.metrics.get_sample_value("triage_template_not_found_total", {"channel": "sms"}) == 1
    )


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tenant_id": "nope"}, "tenant_id"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"idempotency_key": "x" * 65}, "idempotency_key"),
        ({"channel": "fax"}, "channel"),
        ({"recipient": "0555"}, "recipient"),
        ({"channel": "push", "recipient": "+15550100", "template": "ping"}, "recipient"),
        ({"channel": "email", "recipient": "nobody"}, "recipient"),
        ({"template": "bad name!"}, "template"),
        ({"template_version": 0}, "template_version"),
        ({"data": {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"}}, "data"),
        ({"data": {"time": "x" * 65}}, "data.time"),
        ({"data": {"9bad": "x"}}, "data"),
        ({"data": {}}, "data.time"),  # the template needs {time}
        ({"template": "ping"}, "template"),  # a push template on sms
    ],
)
async def test_bad_requests_are_typed_and_write_nothing(
    world: World, change: dict[str, Any], field: str
) -> None:
    d = dispatcher(world, ChannelName.SMS, {"default": failover(FakeAdapter("ghasi"))})
    p = dispatcher(world, ChannelName.PUSH, {"fcm": failover(PushAdapter("fcm"))})
    svc = service(world, d, p)
    with pytest.raises(InvalidRequest) as caught:
        await svc.submit(sms(world, **change))
    assert caught.value.field == field
    rows = await admin(world.admin_url, "SELECT count(*) AS n FROM dispatches")
    assert rows[0]["n"] == 0


async def test_push_phi_guard_and_platform_routing(world: World) -> None:
    fcm, apns = PushAdapter("fcm"), PushAdapter("apns")
    p = dispatcher(world, ChannelName.PUSH, {"fcm": failover(fcm), "apns": failover(apns)})
    svc = service(world, p)
    push = {"channel": "push", "template": "ping"}
    async with trio.open_nursery() as nursery:
        await nursery.start(p.spec.start)
        ok_fcm = await svc.submit(
            sms(world, "p3", recipient="fcm:tok1", data={"topic": "x"}, **push)
        )
        ok_apns = await svc.submit(
            sms(world, "p4", recipient="apns:tok2", data={"topic": "y"}, **push)
        )
        await settled(p)
        with pytest.raises(PhiRefused) as by_field:
            await svc.submit(
                sms(
                    world, "p1", recipient="fcm:tok1", data={"topic": "x", "Diagnosis": "y"}, **push
                )
            )
        # The trip retired ping@1: the next push naming it is refused with the reason.
        with pytest.raises(TemplateRetired) as retired:
            await svc.submit(
                sms(world, "p2", recipient="fcm:tok1", data={"topic": "your HIV test"}, **push)
            )
        nursery.cancel_scope.cancel()
    assert by_field.value.dispatch_id is not None
    record = await row(world, by_field.value.dispatch_id)
    assert (record["status"], record["reason"]) == ("failed", "phi_guard")
    assert retired.value.why == "phi_guard: field:diagnosis"
    assert retired.value.dispatch_id is not None
    again = await row(world, retired.value.dispatch_id)
    assert (again["status"], again["reason"]) == ("failed", "template_retired")
    hits = world.metrics.get_sample_value("triage_phi_guard_hits_total", {"source": "push_guard"})
    assert hits == 1
    # The adapter gets the recipient whole: it reads the platform prefix itself.
    assert [m.recipient for _, m in fcm.sent] == ["fcm:tok1"]
    assert [m.recipient for _, m in apns.sent] == ["apns:tok2"]
    assert (await row(world, ok_fcm.dispatch_id))["provider"] == "fcm"
    assert (await row(world, ok_apns.dispatch_id))["provider"] == "apns"


async def test_recipient_gone_marks_dead_then_blocks(world: World) -> None:
    gone = FakeAdapter("ghasi", fail=[RecipientGone("+15550100", "unknown subscriber")])
    d = dispatcher(world, ChannelName.SMS, {"default": failover(gone)})
    svc = service(world, d)
    async with trio.open_nursery() as nursery:
        await nursery.start(d.spec.start)
        first = await svc.submit(sms(world))
        await settled(d)
        second = await svc.submit(sms(world, "k2"))
        nursery.cancel_scope.cancel()
    record = await row(world, first.dispatch_id)
    assert record["status"] == "undeliverable" and "unknown subscriber" in record["reason"]
    assert second.status is DispatchStatus.UNDELIVERABLE and second.reason == "recipient_dead"
    assert len(gone.sent) == 1
    dead = await admin(world.admin_url, "SELECT recipient FROM dead_recipients")
    assert [r["recipient"] for r in dead] == ["+15550100"]


async def test_category_disabled(world: World) -> None:
    adapter = FakeAdapter("ghasi")
    d = dispatcher(world, ChannelName.SMS, {"default": failover(adapter)})
    svc = service(world, d)
    await admin(
        world.admin_url,
        "INSERT INTO category_blocks (tenant_id, channel, category, state, reason)"
        " VALUES ($1, 'sms', 'reminders', 'disabled', 'bounces')",
        uuid.UUID(world.tenant),
    )
    with pytest.raises(CategoryDisabled) as caught:
        await svc.submit(sms(world))
    assert (await row(world, caught.value.dispatch_id))["reason"] == "category_disabled"
    assert adapter.sent == []


async def test_overloaded_refuses_before_writing(world: World) -> None:
    d = dispatcher(world, ChannelName.SMS, {"default": failover(FakeAdapter("ghasi"))}, capacity=1)
    svc = service(world, d)  # the dispatcher is not running: its mailbox fills
    await svc.submit(sms(world, "a"))
    with pytest.raises(Overloaded):
        await svc.submit(sms(world, "b"))
    rows = await admin(world.admin_url, "SELECT count(*) AS n FROM dispatches")
    assert rows[0]["n"] == 1


async def test_all_providers_down_stays_queued_then_fails(world: World) -> None:
    # Real time (the database's timeouts would fire on an autojump clock), tiny durations;
    # the failover's own timing is asserted exactly in test_failover.py.
    down = FakeAdapter("ghasi", fail=[ProviderUnavailable("503")] * 50)
    policy = RetryPolicy(
        "rounds", max_attempts=2, time_budget_s=10.0, backoff_initial_s=0.05,
        backoff_max_s=0.05, backoff_multiplier=1.0, jitter=0.0,
    )  # fmt: skip
    fo = Failover(
        "f", [Route(down, guard("ghasi"))], rounds=policy, status_timeout_s=0.5,
        requeue_after_s=0.2, give_up_after_s=0.35,
    )  # fmt: skip
    d = dispatcher(world, ChannelName.SMS, {"default": fo})
    svc = service(world, d)
    async with trio.open_nursery() as nursery:
        await nursery.start(d.spec.start)
        result = await svc.submit(sms(world))
        await wait_for(lambda: d.ref.statistics().requeued == 1)
        # both rounds failed: parked for the requeue, the row still queued
        assert (await row(world, result.dispatch_id))["status"] == "queued"
        await settled(d, 5)
        stats = d.ref.statistics()
        nursery.cancel_scope.cancel()
    # rounds, requeue, rounds again; then the next requeue would pass give_up_after_s
    assert len(down.sent) == 4
    record = await row(world, result.dispatch_id)
    assert (record["status"], record["reason"]) == ("failed", "providers_exhausted")
    assert stats.requeued == 1 and stats.failed == 1 and stats.exhausted == 1


async def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    with trio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110  # a plain condition on another object
            await trio.sleep(0.01)


async def test_backlog_resumes_crash_leftovers_under_the_supervisor(world: World) -> None:
    # The row's tenant never sent anything to this process: found in the database.
    adapter = FakeAdapter("ghasi")
    d = dispatcher(world, ChannelName.SMS, {"default": failover(adapter)})
    svc = service(world, d)
    backlog_spec, backlog = backlog_resumer_child(
        DbBacklogStore(world.db), [d], older_than_s=0.0, lease_s=30.0, batch=100,
        interval_s=10.0, capacity=16, overflow=Overflow.WAIT, shutdown_s=1.0,
    )  # fmt: skip
    left = AcceptRequest(
        dispatch_id=uuid.uuid4(), tenant_id=world.tenant, idempotency_key="crash",
        request_hash="h", channel="sms", template="reminder", template_version=1,
        category="reminders", recipient="+15550111", body="left behind", subject=None,
        data={}, key_ttl_s=60.0,
    )  # fmt: skip
    await world.db.run_unit(accept_async, left)
    top = Supervisor("dispatch", [*svc.child_specs(), backlog_spec], runtime=Runtime())
    async with trio.open_nursery() as nursery:
        await nursery.start(top.run)
        await wait_for(lambda: bool(adapter.sent))
        await settled(d)
        stats = backlog.statistics()
        nursery.cancel_scope.cancel()
    assert [m.body for _, m in adapter.sent] == ["left behind"]
    assert adapter.sent[0][1].idempotency_key == "crash"
    assert (await row(world, str(left.dispatch_id)))["status"] == "dispatched"
    assert (stats.claimed, stats.offered, stats.released) == (1, 1, 0)


async def test_throttled_category_is_paced_by_the_limiter(world: World) -> None:
    adapter = FakeAdapter("ghasi")
    limiter = RateLimiter("category", rate_per_s=0.001, burst=5, max_keys=10)
    d = dispatcher(world, ChannelName.SMS, {"default": failover(adapter)}, throttle=limiter)
    svc = service(world, d)
    await admin(
        world.admin_url,
        "INSERT INTO category_blocks (tenant_id, channel, category, state, reason)"
        " VALUES ($1, 'sms', 'reminders', 'throttled', 'bounces')",
        uuid.UUID(world.tenant),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(d.spec.start)
        result = await svc.submit(sms(world))
        await settled(d, 5)
        nursery.cancel_scope.cancel()
    assert (await row(world, result.dispatch_id))["status"] == "dispatched"
    assert limiter.available(f"{world.tenant}:reminders") < 4.5  # a token was taken


async def test_redis_fast_path_answers_duplicates(world: World, redis_url: str) -> None:
    cache = await RedisCache.open(redis_url, ttl_s=60.0)
    store = IdempotencyStore(
        world.db.asyncpg_pool,
        cache=cache,
        breaker=Breaker(
            "redis", fail_max=2, reset_timeout_s=1.0, reset_timeout_max_s=1.0,
            reset_backoff_multiplier=1.0, failure_rate_threshold=2.0, rate_window_s=1.0,
            minimum_calls=1, slow_call_s=1.0, slow_call_rate_threshold=2.0,
            half_open_max_calls=1,
        ),
        detector=RatioDetector(
            "hits", metric="triage_idempotency_cache_hit_ratio", op="lt", threshold=0.9,
            window_s=30.0, buckets=10,
        ),
        key_ttl_s=3600.0, warm_batch=10, cache_timeout_s=1.0,
    )  # fmt: skip
    adapter = FakeAdapter("ghasi")
    d = dispatcher(world, ChannelName.SMS, {"default": failover(adapter)})
    svc = service(world, d, idempotency=store)
    try:
        first = await svc.submit(sms(world))
        cached = await cache.get(world.tenant, "k1")  # written after the accept committed
        assert cached is not None and cached.response == {"dispatch_id": first.dispatch_id}
        assert (await row(world, first.dispatch_id))["idempotency_key"] == "k1"
        again = await svc.submit(sms(world))
        assert again.replay and again.dispatch_id == first.dispatch_id
        assert svc.stats.cache_duplicates == 1 and svc.stats.duplicates == 0
        assert (store.statistics().hits, store.statistics().misses) == (
            2,
            0,
        )  # the dispatcher's lookups count
        with pytest.raises(IdempotencyConflict):
            await svc.submit(sms(world, data={"time": "12:00"}))
        # A failed accept forgets its cache entry: the key is free again.
        with pytest.raises(TemplateNotFound):
            await svc.submit(sms(world, "k9", template="gone"))
        # (a refused row is still a row: the same request answers from the database)
        assert (await svc.submit(sms(world, "k9", template="gone"))).replay
        with pytest.raises(InvalidRequest):
            await svc.submit(sms(world, "k10", data={}))
        assert await cache.get(world.tenant, "k10") is None
    finally:
        store.close()
        await cache.aclose()


async def test_an_adapter_bug_leaves_the_dispatch_queued_and_the_dispatcher_up(
    world: World,
) -> None:
    buggy = FakeAdapter("ghasi", fail=[RuntimeError("adapter bug")])
    d = dispatcher(world, ChannelName.SMS, {"default": failover(buggy)})
    svc = service(world, d)
    async with trio.open_nursery() as nursery:
        await nursery.start(d.spec.start)
        first = await svc.submit(sms(world, "a"))
        await settled(d, 5)
        second = await svc.submit(sms(world, "b"))
        await settled(d, 5)
        stats = d.ref.statistics()
        nursery.cancel_scope.cancel()
    assert (await row(world, first.dispatch_id))["status"] == "queued"
    assert (await row(world, second.dispatch_id))["status"] == "dispatched"
    assert stats.errors == 1 and stats.dispatched == 1 and stats.held == 0


async def test_bad_values_are_typed_refusals_that_write_nothing(world: World) -> None:
    d = dispatcher(world, ChannelName.SMS, {"default": failover(FakeAdapter("ghasi"))})
    svc = service(world, d)
    stranger = str(uuid.uuid4())  # well formed, no such tenant
    with pytest.raises(UnknownTenant) as unknown:
        await svc.submit(sms(world, "t1", tenant_id=stranger))
    assert unknown.value.tenant_id == stranger
    with pytest.raises(InvalidRequest) as version:
        await svc.submit(sms(world, "t2", template_version=MAX_TEMPLATE_VERSION + 1))
    assert version.value.field == "template_version"
    with pytest.raises(InvalidRequest) as nul:
        await svc.submit(sms(world, "t3", data={"time": "10\x0000"}))
    assert nul.value.field == "data.time"
    assert await admin(world.admin_url, "SELECT id FROM dispatches") == []


async def test_sends_are_bounded_by_concurrency_and_the_waiting_by_capacity(
    autojump_clock: trio.abc.Clock,
) -> None:
    # No database here (the autojump clock would fire asyncpg's timeouts): the outcome
    # writes go to test_failover's recording stand-in; the counts and times are exact.
    slow = FakeAdapter("ghasi", fail=[0.5] * 10)  # each send takes 0.5 s (guard timeout 1 s)
    pool = RecordingPool()
    d = dispatcher_child(
        ChannelName.SMS, cast(DbPool, pool), {"default": failover(slow)}, capacity=2,
        overflow=Overflow.WAIT, concurrency=2, record_attempts=1, record_backoff_s=0.1,
        max_parked=4, shutdown_s=1.0,
    )  # fmt: skip
    base = Job(
        dispatch_id=uuid.uuid4(), tenant_id="t-1", idempotency_key="k", channel="sms",
        recipient="+15550100", body="hi", subject=None, category="c", data={},
        accepted_at=slow.t0,
    )  # fmt: skip
    jobs = [msgspec.structs.replace(base, dispatch_id=uuid.uuid4()) for _ in range(5)]
    async with trio.open_nursery() as nursery:
        await nursery.start(d.spec.start)
        for job in jobs:
            d.ref.tell_nowait(Send(job))
            await trio.testing.wait_all_tasks_blocked()
        d.ref.tell_nowait(Send(jobs[0]))  # offered again while held: ignored
        await trio.testing.wait_all_tasks_blocked()
        stats = d.ref.statistics()
        assert (stats.in_flight, stats.waiting, stats.held, stats.shed) == (2, 2, 4, 1)
        assert stats.state is DispatcherState.SATURATED and d.full()
        assert not d.memory.holds(jobs[4].dispatch_id)  # shed: its row waits for the backlog
        await d.memory.idle.wait()
        await trio.testing.wait_all_tasks_blocked()
        stats = d.ref.statistics()
        nursery.cancel_scope.cancel()
    assert [t for t, _ in slow.sent] == [0.0, 0.0, 0.5, 0.5]
    assert [at - slow.t0 for at, *_ in pool.units] == [0.5, 0.5, 1.0, 1.0]
    assert (stats.dispatched, stats.sent, stats.shed, stats.held) == (4, 4, 1, 0)
    assert stats.state is DispatcherState.IDLE and not d.full()


async def test_a_report_from_an_earlier_incarnation_is_ignored(
    autojump_clock: trio.abc.Clock,
) -> None:
    adapter = FakeAdapter("ghasi")
    pool = RecordingPool()
    d = dispatcher_child(
        ChannelName.SMS, cast(DbPool, pool), {"default": failover(adapter)}, capacity=4,
        overflow=Overflow.WAIT, concurrency=1, record_attempts=1, record_backoff_s=0.1,
        max_parked=4, shutdown_s=1.0,
    )  # fmt: skip
    job = Job(
        dispatch_id=uuid.uuid4(), tenant_id="t-1", idempotency_key="k", channel="sms",
        recipient="+15550100", body="hi", subject=None, category="c", data={},
        accepted_at=adapter.t0,
    )  # fmt: skip
    done = Outcome(kind=OutcomeKind.DISPATCHED, provider="ghasi")
    async with trio.open_nursery() as nursery:
        await nursery.start(d.spec.start)
        # Incarnation 1 runs: reports of a (crashed) incarnation 0 change nothing.
        for stale in (Sent(job, done, 0), Unpark(job, 0), Recorded(job, 1, False, 0)):
            d.ref.tell_nowait(stale)
        await trio.testing.wait_all_tasks_blocked()
        stats = d.ref.statistics()
        assert (stats.in_flight, stats.parked, stats.held, stats.dispatched) == (0, 0, 0, 0)
        assert stats.record_failures == 0 and adapter.sent == [] and pool.units == []
        d.ref.tell_nowait(Send(job))  # and the slot count is intact: concurrency 1 still sends
        await trio.testing.wait_all_tasks_blocked()
        stats = d.ref.statistics()
        nursery.cancel_scope.cancel()
    assert len(adapter.sent) == 1 and len(pool.units) == 1
    assert (stats.dispatched, stats.in_flight, stats.held) == (1, 0, 0)
