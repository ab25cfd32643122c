"""The idempotency store on real PostgreSQL, with Redis and without it (row 7's mitigation)."""

from __future__ import annotations

import asyncio
import functools
import socket
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeAlias

import asyncpg
import msgspec
import pytest
import redis
import trio

import config
from actors.idempotency import (
    DETECTOR_OVERRIDE,
    IdempotencyConflict,
    IdempotencyStore,
    detector_config,
    warmer_child,
)
from engine.breaker import Breaker
from engine.bulkhead import Bulkhead
from engine.detectors import RatioDetector, make_detector
from engine.metrics import Metrics
from engine.runtime import Runtime
from providers.bridge import run
from providers.db import DAEMON_ROLE, migrate_async
from providers.redis_cache import RedisCache, cache_name
from providers.services import postgres_url_with
from supervisors.vocabulary import METRICS, MITIGATIONS

Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def tenants(postgres_module_url: str) -> tuple[uuid.UUID, uuid.UUID]:
    """The module's database, migrated, with two tenants (seeded as the owner)."""

    async def seed() -> tuple[uuid.UUID, uuid.UUID]:
        conn = await asyncpg.connect(postgres_module_url)
        try:
            await migrate_async(conn)
            a = await conn.fetchval("INSERT INTO tenants (name) VALUES ('a') RETURNING id")
            b = await conn.fetchval("INSERT INTO tenants (name) VALUES ('b') RETURNING id")
            return a, b
        finally:
            await conn.close()

    return asyncio.run(seed())


def breaker() -> Breaker:
    return Breaker(
        "redis",
        fail_max=2,
        reset_timeout_s=0.2,
        reset_timeout_max_s=0.2,
        reset_backoff_multiplier=1.0,
        failure_rate_threshold=2.0,
        rate_window_s=1.0,
        minimum_calls=1,
        slow_call_s=1.0,
        slow_call_rate_threshold=2.0,
        half_open_max_calls=1,
    )


def detector() -> RatioDetector:
    return make_detector(
        "hit_ratio",
        kind="ratio",
        metric="triage_idempotency_cache_hit_ratio",
        op="lt",
        threshold=0.9,
        clear_threshold=0.95,
        window_s=30.0,
        buckets=10,
        min_volume=5,
    ).expect(RatioDetector)


@pytest.fixture
async def pool(
    bridge: asyncio.AbstractEventLoop, postgres_module_url: str, tenants: object
) -> AsyncIterator[Pool]:
    url = postgres_url_with(postgres_module_url, user=DAEMON_ROLE)
    created: Pool = await run(functools.partial(asyncpg.create_pool, url, min_size=1, max_size=4))
    try:
        yield created
    finally:
        await run(created.close)


async def open_store(pool: Pool, redis_url: str | None, **kwargs: Any) -> IdempotencyStore:
    cache = None if redis_url is None else await RedisCache.open(redis_url, ttl_s=60.0)
    options: dict[str, Any] = {
        "cache": cache,
        "breaker": breaker(),
        "detector": detector(),
        "key_ttl_s": 3600.0,
        "warm_batch": 100,
        "cache_timeout_s": 0.5,
    }
    options.update(kwargs)
    return IdempotencyStore(pool, **options)


async def close_store(store: IdempotencyStore) -> None:
    store.close()
    if store.cache is not None:
        await store.cache.aclose()


def key() -> str:
    return f"k-{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize("with_redis", [True, False], ids=["redis", "database-only"])
async def test_first_then_duplicate_then_conflict(
    pool: Pool, tenants: tuple[uuid.UUID, uuid.UUID], redis_url: str, with_redis: bool
) -> None:
    store = await open_store(pool, redis_url if with_redis else None)
    a, b = tenants
    k = key()
    try:
        first = await store.claim(a, k, "h1")
        assert first.first and first.source == "database"
        again = await store.claim(str(a), k, "h1")
        assert not again.first
        assert again.source == ("cache" if with_redis else "database")
        with pytest.raises(IdempotencyConflict, match="different request"):
            await store.claim(a, k, "h2")
        assert (await store.claim(b, k, "h2")).first  # another tenant, its own key space
        assert await store.complete(a, k, {"dispatch": 42})
        assert not await store.complete(a, k, {"dispatch": 43})  # recorded once
        replay = await store.claim(a, k, "h1")
        assert not replay.first and replay.response == {"dispatch": 42}
        if with_redis:
            assert store.statistics().hits == 5 and store.statistics().misses == 0
            assert store.statistics().db_fallbacks == 0
        else:
            assert store.statistics().hits == 0 and store.statistics().misses == 5
            assert store.statistics().db_fallbacks == 5
            assert not store.cache_available
        with pytest.raises(ValueError, match="UUID"):
            await store.claim("tenant-a", k, "h1")
        with pytest.raises(ValueError, match="empty"):
            await store.claim(a, "", "h1")
    finally:
        await close_store(store)


@pytest.mark.parametrize("with_redis", [True, False], ids=["redis", "database-only"])
async def test_concurrent_claims_of_one_key_have_one_winner(
    pool: Pool, tenants: tuple[uuid.UUID, uuid.UUID], redis_url: str, with_redis: bool
) -> None:
    store = await open_store(pool, redis_url if with_redis else None)
    a, _ = tenants
    k = key()
    firsts: list[bool] = []

    async def one() -> None:
        firsts.append((await store.claim(a, k, "h")).first)

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
        assert firsts.count(True) == 1 and len(firsts) == 20
    finally:
        await close_store(store)


async def test_a_flushed_cache_is_caught_by_the_database_and_repaired(
    pool: Pool, tenants: tuple[uuid.UUID, uuid.UUID], redis_url: str
) -> None:
    store = await open_store(pool, redis_url)
    a, _ = tenants
    keys = [key() for _ in range(5)]
    try:
        for k in keys:
            assert (await store.claim(a, k, "h")).first
        await store.complete(a, keys[0], "done")
        with redis.Redis.from_url(redis_url) as client:
            client.flushall()
        # Cache loss: every repeat is a miss the database still refuses.
        for k in keys[:3]:
            claim = await store.claim(a, k, "h")
            assert not claim.first and claim.source == "database"
        assert store.statistics().misses == 3
        assert (await store.claim(a, keys[0], "h")).response == "done"  # repaired entry: a hit
        assert store.statistics().hits == 6
        # Warm-up puts the other two back, nothing is claimed twice.
        # (the module's database holds other tests' keys of this tenant too)
        added = await store.warm()
        assert added >= 2
        assert store.statistics().warmups == 1 and store.statistics().warmed == added
        for k in keys:
            claim = await store.claim(a, k, "h")
            assert not claim.first and claim.source == "cache"
    finally:
        await close_store(store)


async def test_redis_down_fails_open_to_the_database_and_fires_the_detector(
    pool: Pool, tenants: tuple[uuid.UUID, uuid.UUID]
) -> None:
    store = await open_store(pool, f"redis://127.0.0.1:{closed_port()}/0")
    a, _ = tenants
    keys = [key() for _ in range(4)]
    try:
        for k in keys:
            assert (await store.claim(a, k, "h")).first
            assert not (await store.claim(a, k, "h")).first  # refused by the unique key
        assert store.statistics().misses == 8 and store.statistics().db_fallbacks == 8
        assert store.breaker.state.value != "closed"
        assert not store.cache_available
        state = store.detector.evaluate()
        assert state.firing and state.value == 0.0
        assert await store.warm() == 0  # nothing reachable to warm
        assert store.statistics().warmups == 0
    finally:
        await close_store(store)


async def test_warm_task_runs_when_the_detector_fires(
    pool: Pool, tenants: tuple[uuid.UUID, uuid.UUID], redis_url: str
) -> None:
    store = await open_store(pool, redis_url)
    a, _ = tenants
    keys = [key() for _ in range(6)]
    try:
        warmer, ref = warmer_child(store, shutdown_s=1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(warmer.start)
            for k in keys:
                await store.claim(a, k, "h")
            with redis.Redis.from_url(redis_url) as client:
                client.flushall()
            for k in keys:
                assert not (await store.claim(a, k, "h")).first  # misses, repaired one by one
            with redis.Redis.from_url(redis_url) as client:
                client.flushall()
            assert store.detector.evaluate().firing  # 6 hits / 12 < 0.9
            with trio.fail_after(5):
                while store.statistics().warmups == 0:  # noqa: ASYNC110 - bridged I/O, not an event
                    await trio.sleep(0.01)
            assert store.statistics().warmed >= 6
            warmed = ref.statistics()
            assert (warmed.runs, warmed.failures, warmed.state) == (1, 0, "idle")
            assert warmed.last_added == store.statistics().warmed
            nursery.cancel_scope.cancel()
        for k in keys:
            assert (await store.claim(a, k, "h")).source == "cache"
    finally:
        await close_store(store)


async def test_a_failed_database_claim_removes_what_it_cached(
    bridge: asyncio.AbstractEventLoop,
    postgres_module_url: str,
    tenants: tuple[uuid.UUID, uuid.UUID],
    redis_url: str,
) -> None:
    url = postgres_url_with(postgres_module_url, user=DAEMON_ROLE)
    dead: Pool = await run(functools.partial(asyncpg.create_pool, url, min_size=1, max_size=1))
    await run(dead.close)
    store = await open_store(dead, redis_url)
    a, _ = tenants
    try:
        with pytest.raises(asyncpg.InterfaceError):
            await store.claim(a, "never", "h")
        with redis.Redis.from_url(redis_url) as client:
            assert client.get(cache_name(a, "never")) is None  # no unconfirmed entry left
    finally:
        await close_store(store)


async def test_from_config_uses_the_chaos_override_and_the_redis_profiles(
    pool: Pool, tenants: tuple[uuid.UUID, uuid.UUID], redis_url: str
) -> None:
    path = config.default_path("chaos.toml")
    cfg = config.load_config(path)
    catalog = config.load_catalog(
        config.catalog_path(cfg, path), metrics=METRICS, mitigations=MITIGATIONS
    )
    chosen = detector_config(cfg, catalog)
    assert chosen == cfg.detectors[DETECTOR_OVERRIDE]
    assert chosen.window_s < catalog.row(7).detector.window_s  # shortened for chaos
    without = msgspec.structs.replace(cfg, detectors={})
    assert detector_config(without, catalog) == catalog.row(7).detector
    metrics = Metrics()
    cache = await RedisCache.open(redis_url, ttl_s=cfg.idempotency.cache_ttl_s)
    store = IdempotencyStore.from_config(
        cfg, catalog, pool, cache, runtime=Runtime(metrics=metrics)
    )
    given = detector()
    other = IdempotencyStore.from_config(without, catalog, pool, None, detector=given)
    try:
        assert other.detector is given and other.cache is None
        assert store.detector.row == 7 and store.detector.window_s == chosen.window_s
        assert store.warm_batch == cfg.idempotency.warm_batch
        assert store.key_ttl_s == cfg.idempotency.key_ttl_s
        assert store.cache is not None
        assert store.cache.ttl_ms == round(cfg.idempotency.cache_ttl_s * 1000)
        assert store.cache_timeout_s == cfg.guards["redis"].timeout_s
        assert store.breaker.fail_max == cfg.breakers["redis"].fail_max
        stranger = await run(pool.fetchval, "SELECT gen_random_uuid()")
        k = key()
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await store.claim(stranger, k, "h")  # an unknown tenant: the database refuses
        with redis.Redis.from_url(redis_url) as client:
            assert client.get(cache_name(stranger, k)) is None  # and nothing stays cached
        a, _ = tenants
        await store.claim(a, k, "h")
        await store.claim(a, k, "h")
        sample = metrics.registry.get_sample_value
        assert sample("triage_idempotency_cache_hit_ratio_denominator_total") == 2
        assert sample("triage_idempotency_cache_hit_ratio_numerator_total") == 2
    finally:
        other.close()
        await close_store(store)


async def test_a_full_redis_bulkhead_falls_open_to_the_database(
    pool: Pool, tenants: tuple[uuid.UUID, uuid.UUID], redis_url: str
) -> None:
    bulkhead = Bulkhead("redis", capacity=1, max_wait_s=0.0, max_partitions=1, partition_capacity=1)
    store = await open_store(pool, redis_url, bulkhead=bulkhead)
    a, _ = tenants
    k = key()
    try:
        held = bulkhead.try_acquire_nowait()
        assert held is not None  # every Redis permit taken: a slow cache, say
        first = await store.claim(a, k, "h")
        again = await store.claim(a, k, "h")
        assert first.first and not again.first and again.source == "database"
        assert store.statistics().bulkhead_full >= 2
        bulkhead.release(held)
        assert (await store.claim(a, k, "h")).source in ("cache", "database")
    finally:
        await close_store(store)


async def test_the_cache_hears_of_a_key_only_once_the_database_decided(
    pool: Pool, tenants: tuple[uuid.UUID, uuid.UUID], redis_url: str
) -> None:
    """A crash between the two halves of a claim leaves nothing in Redis (the row is the truth)."""
    store = await open_store(pool, redis_url)
    a, _ = tenants
    k = key()
    try:
        found = await store.lookup(a, k, "h")
        assert found.duplicate is None and found.reachable
        with redis.Redis.from_url(redis_url) as client:
            assert client.get(cache_name(a, k)) is None  # nothing before the commit
        # "killed" here: the next request for the key asks the database again
        again = await store.lookup(a, k, "h")
        assert again.duplicate is None
        await store.settle(again, first=True, stored_hash="h", response={"dispatch_id": "d1"})
        hit = await store.lookup(a, k, "h")
        assert hit.duplicate is not None and hit.duplicate.response == {"dispatch_id": "d1"}
        assert hit.duplicate.source == "cache"
        with pytest.raises(IdempotencyConflict):
            await store.lookup(a, k, "other")
        assert (store.statistics().hits, store.statistics().misses) == (3, 0)
    finally:
        await close_store(store)
