"""The Redis idempotency cache: SET NX GET, refresh, warm pipeline, TTLs, a dead server."""

from __future__ import annotations

import asyncio
import socket
import uuid

import pytest
import redis

from engine.errors import ProviderUnavailable
from providers.redis_cache import CachedKey, RedisCache, cache_name, decode_entry

TENANT = uuid.UUID("00000000-0000-4000-8000-000000000001")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_claim_sets_once_then_answers_the_entry(
    bridge: asyncio.AbstractEventLoop, redis_url: str
) -> None:
    cache = await RedisCache.open(redis_url, ttl_s=30.0)
    try:
        assert await cache.claim(TENANT, "k1", CachedKey("h1")) is None
        raw = await cache.claim(TENANT, "k1", CachedKey("other"))
        assert raw is not None
        assert decode_entry(raw) == CachedKey("h1")
        assert await cache.get(TENANT, "k1") == CachedKey("h1")
        assert await cache.get(TENANT, "absent") is None
        # refresh changes an entry that exists, never creates one
        assert await cache.refresh(TENANT, "k1", CachedKey("h1", {"id": 7}))
        assert await cache.get(TENANT, "k1") == CachedKey("h1", {"id": 7})
        assert not await cache.refresh(TENANT, "k2", CachedKey("h2"))
        assert await cache.get(TENANT, "k2") is None
        await cache.forget(TENANT, "k1")
        assert await cache.get(TENANT, "k1") is None
    finally:
        await cache.aclose()
    with redis.Redis.from_url(redis_url) as client:
        client.set(cache_name(TENANT, "junk"), b"not json")
    cache = await RedisCache.open(redis_url, ttl_s=30.0)
    try:
        assert await cache.get(TENANT, "junk") is None  # not ours: a miss
    finally:
        await cache.aclose()


async def test_ttls_and_warm_pipeline(bridge: asyncio.AbstractEventLoop, redis_url: str) -> None:
    cache = await RedisCache.open(redis_url, ttl_s=30.0)
    try:
        await cache.claim(TENANT, "a", CachedKey("ha"))
        added = await cache.warm(
            TENANT,
            [
                ("a", CachedKey("stale"), 100.0),  # present: left alone
                ("b", CachedKey("hb", [1]), 100.0),  # capped at the cache TTL
                ("c", CachedKey("hc"), 2.0),  # its own remaining life is shorter
                ("d", CachedKey("hd"), 0.0),  # expired: skipped
            ],
        )
        assert added == 2
        assert await cache.get(TENANT, "a") == CachedKey("ha")
        assert await cache.get(TENANT, "b") == CachedKey("hb", [1])
        assert await cache.get(TENANT, "d") is None
        assert await cache.warm(TENANT, []) == 0
        await cache.put(TENANT, "e", CachedKey("he"), 1500)
    finally:
        await cache.aclose()
    with redis.Redis.from_url(redis_url) as client:
        assert 0 < client.pttl(cache_name(TENANT, "a")) <= 30_000
        assert 0 < client.pttl(cache_name(TENANT, "b")) <= 30_000
        assert 0 < client.pttl(cache_name(TENANT, "c")) <= 2_000
        assert 0 < client.pttl(cache_name(TENANT, "e")) <= 1_500


async def test_a_dead_server_is_unavailable_at_once(bridge: asyncio.AbstractEventLoop) -> None:
    cache = await RedisCache.open(f"redis://127.0.0.1:{closed_port()}/0", ttl_s=30.0)
    try:
        with pytest.raises(ProviderUnavailable, match=r"^redis: unavailable"):
            await cache.claim(TENANT, "k", CachedKey("h"))
    finally:
        await cache.aclose()


def test_ttl_must_be_positive() -> None:
    with pytest.raises(ValueError, match="ttl"):
        RedisCache(redis.asyncio.Redis(), ttl_s=0.0)
