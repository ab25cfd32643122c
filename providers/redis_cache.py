"""Redis as the idempotency cache: asyncio units of work, each crossed over the bridge once.

Catalog row 7's store (``actors.idempotency``) keeps one Redis string per
idempotency key, ``triage:idem:<tenant>:<key>``, whose value is the JSON
``[request_hash, response]``, with a TTL. Redis is only a cache: the database's
unique (tenant, key) is the truth, so every function here may fail (the server
is down, was flushed, evicted the key) and the caller falls back to the database.

The asyncio side (one command or one pipeline per function)::

    set_nx_get(client, name, value, ttl_ms)   SET NX PX GET: None if it was set
                                              (the key was new), else the old value
    get_value(client, name)                   GET
    set_existing(client, name, value)         SET XX KEEPTTL (only refresh what is cached)
    overwrite(client, name, value, ttl_ms)    SET PX (the database said otherwise)
    delete(client, name)                      DEL
    warm(client, entries)                     one pipeline of SET NX PX; how many were new

:class:`RedisCache` is the Trio side: it opens the client inside the bridge and
crosses once per call (``service="redis"``, so connection failures arrive as
:class:`~engine.errors.ProviderUnavailable` / :class:`~engine.errors.ProviderTimeout`).
The client never retries by itself (``retry=None``): the caller's breaker and
timeout decide, and a dead Redis costs one refused connection per call.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import msgspec
import redis.asyncio

from providers import bridge

__all__ = [
    "CachedKey",
    "RedisCache",
    "cache_name",
    "decode_entry",
    "delete",
    "encode_entry",
    "get_value",
    "open_client",
    "overwrite",
    "set_existing",
    "set_nx_get",
    "warm",
]

KEY_PREFIX = "triage:idem:"

Client = redis.asyncio.Redis


class CachedKey(msgspec.Struct, frozen=True, array_like=True):
    """What the cache holds for one idempotency key (JSON ``[request_hash, response]``)."""

    request_hash: str
    response: Any = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CachedKey)


def cache_name(tenant_id: uuid.UUID | str, key: str) -> str:
    """The Redis key of one tenant's idempotency key."""
    return f"{KEY_PREFIX}{tenant_id}:{key}"


def encode_entry(entry: CachedKey) -> bytes:
    return _encoder.encode(entry)


def decode_entry(raw: bytes) -> CachedKey | None:
    """The cached entry, or None when the value is not ours (then treat it as a miss)."""
    try:
        return _decoder.decode(raw)
    except msgspec.DecodeError:
        return None


# -- asyncio side: one unit of work each ---------------------------------------------


async def open_client(url: str, timeout_s: float) -> Client:
    """A client for ``url`` that never retries by itself; connects on first use."""
    client: Client = redis.asyncio.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=None,
        retry_on_timeout=False,
        health_check_interval=0,
    )
    return client


async def close_client(client: Client) -> None:
    await client.aclose()


async def set_nx_get(client: Client, name: str, value: bytes, ttl_ms: int) -> bytes | None:
    """SET NX PX GET (Redis >= 7): None if ``name`` was absent (now set), else its value."""
    old: bytes | None = await client.set(name, value, nx=True, px=ttl_ms, get=True)
    return old


async def get_value(client: Client, name: str) -> bytes | None:
    value: bytes | None = await client.get(name)
    return value


async def set_existing(client: Client, name: str, value: bytes) -> bool:
    """SET XX KEEPTTL: refresh a cached entry, never create one."""
    return bool(await client.set(name, value, xx=True, keepttl=True))


async def overwrite(client: Client, name: str, value: bytes, ttl_ms: int) -> None:
    await client.set(name, value, px=ttl_ms)


async def delete(client: Client, name: str) -> int:
    return int(await client.delete(name))


async def warm(client: Client, entries: Sequence[tuple[str, bytes, int]]) -> int:
    """One pipeline of SET NX PX for ``(name, value, ttl_ms)``; how many were absent."""
    if not entries:
        return 0
    pipe = client.pipeline(transaction=False)
    for name, value, ttl_ms in entries:
        pipe.set(name, value, nx=True, px=max(1, ttl_ms))
    results: list[object] = await pipe.execute()
    return sum(1 for result in results if result)


# -- Trio side -------------------------------------------------------------------------


class RedisCache:
    """The idempotency cache on one Redis server, for Trio callers (inside ``open_bridge``).

    Every method is one bridge crossing and may raise the translated
    :class:`~engine.errors.ProviderError`; wrap calls in a breaker and a timeout.
    """

    def __init__(self, client: Client, *, ttl_s: float) -> None:
        if not ttl_s > 0:
            raise ValueError(f"cache ttl must be > 0, got {ttl_s!r}")
        self.client = client
        self.ttl_ms = max(1, round(ttl_s * 1000))

    @classmethod
    async def open(cls, url: str, *, ttl_s: float, timeout_s: float = 1.0) -> RedisCache:
        client = await bridge.run(open_client, url, timeout_s, service="redis")
        return cls(client, ttl_s=ttl_s)

    async def aclose(self) -> None:
        await bridge.run(close_client, self.client, service="redis")

    async def claim(self, tenant_id: uuid.UUID | str, key: str, entry: CachedKey) -> bytes | None:
        """Cache ``entry`` under the key if absent: None if it was new, else the cached bytes."""
        return await bridge.run(
            set_nx_get,
            self.client,
            cache_name(tenant_id, key),
            encode_entry(entry),
            self.ttl_ms,
            service="redis",
        )

    async def get(self, tenant_id: uuid.UUID | str, key: str) -> CachedKey | None:
        raw = await bridge.run(get_value, self.client, cache_name(tenant_id, key), service="redis")
        return None if raw is None else decode_entry(raw)

    async def refresh(self, tenant_id: uuid.UUID | str, key: str, entry: CachedKey) -> bool:
        return await bridge.run(
            set_existing,
            self.client,
            cache_name(tenant_id, key),
            encode_entry(entry),
            service="redis",
        )

    async def put(
        self, tenant_id: uuid.UUID | str, key: str, entry: CachedKey, ttl_ms: int | None = None
    ) -> None:
        await bridge.run(
            overwrite,
            self.client,
            cache_name(tenant_id, key),
            encode_entry(entry),
            self.ttl_ms if ttl_ms is None else max(1, min(ttl_ms, self.ttl_ms)),
            service="redis",
        )

    async def forget(self, tenant_id: uuid.UUID | str, key: str) -> None:
        await bridge.run(delete, self.client, cache_name(tenant_id, key), service="redis")

    async def warm(
        self, tenant_id: uuid.UUID | str, entries: Sequence[tuple[str, CachedKey, float]]
    ) -> int:
        """Cache ``(key, entry, seconds left)`` entries that are absent; how many were added.

        Each entry's TTL is the shorter of the cache TTL and the key's own remaining life.
        """
        batch = [
            (
                cache_name(tenant_id, key),
                encode_entry(entry),
                min(self.ttl_ms, max(1, round(left_s * 1000))),
            )
            for key, entry, left_s in entries
            if left_s > 0
        ]
        return await bridge.run(warm, self.client, batch, service="redis")
