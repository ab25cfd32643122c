"""Chaos scenario 7: Redis cache miss flood (the cache is flushed, then Redis stops).

The scenario owns its servers: an embedded PostgreSQL (migrated; the store runs
as the daemon's role, under RLS) and an embedded Redis. It drives idempotency
claims from a few workers -- new keys and repeats of recent keys, over two
tenants -- through an :class:`~actors.idempotency.IdempotencyStore` wired from
the scenario config, and then:

1. **steady**: every lookup is a cache hit; the row's detector must stay quiet;
2. **trigger**: ``FLUSHALL`` and stop Redis (the cache loses every key, then is
   gone); claims go on, including repeats of keys claimed before the flush;
3. **restart** Redis after the outage, keep claiming until the detector clears.

Judged from outside: the hit-ratio detector fired after the trigger
(``detect_s``); the store failed open to the database (claims decided there,
and repeats of pre-flush keys refused there); the cache was warmed from the
database once Redis answered again; the detector cleared. Accounting: each
claim is an accepted item, settled when ``claim`` returns (``lost`` = 0); each
claim answered ``first`` is a receipt of its (tenant, key), so a key claimed
first twice is a duplicate. The database is checked at the end: one row per key
claimed first, no more, no less.

The window, volume and breaker timings come from the scenario config
(``config/chaos.toml``: ``[detectors.idempotency_cache_hit_ratio]``,
``breakers.redis``, ``guards.redis``, ``[idempotency]``).
"""

from __future__ import annotations

import functools
import random
import uuid
from collections import deque
from dataclasses import dataclass, field

import asyncpg
import trio

from actors.idempotency import IdempotencyStore, warmer_child
from bench.chaos import timeline
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from engine.detectors import DetectorSet, DetectorState
from engine.runtime import Runtime
from providers.bridge import open_bridge, run
from providers.db import DAEMON_ROLE, migrate
from providers.embedded import EmbeddedPostgres, EmbeddedRedis
from providers.redis_cache import RedisCache
from providers.services import postgres_url_with

__all__ = ["SCENARIO", "run_scenario"]

# Load shape (not detection tuning: windows and thresholds come from the config).
WORKERS = 4
PACE_S = 0.005  # pause between two claims of one worker
REPEAT_SHARE = 0.5  # share of claims that repeat a recent key
RECENT_KEYS = 60  # repeats pick among a tenant's newest keys (within warm_batch)
FAST_PG = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@dataclass(frozen=True)
class _Timing:
    steady_s: float
    outage_s: float
    recover_max_s: float


QUICK = _Timing(steady_s=1.0, outage_s=1.5, recover_max_s=15.0)
FULL = _Timing(steady_s=3.0, outage_s=5.0, recover_max_s=30.0)


@dataclass
class _Run:
    ledger: Ledger = field(default_factory=Ledger)
    recent: dict[str, deque[str]] = field(default_factory=dict)
    pre_flush: set[tuple[str, str]] = field(default_factory=set)
    flushed: bool = False
    stopping: bool = False  # workers finish their claim in flight, then return
    repeats_refused_by_db: int = 0  # repeats of pre-flush keys the database refused
    errors: list[str] = field(default_factory=list)
    requests: int = 0
    fired_at: float | None = None
    cleared_at: float | None = None
    fired_early: bool = False


async def _seed_tenants(url: str, count: int) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        return [
            str(await conn.fetchval("INSERT INTO tenants (name) VALUES ($1) RETURNING id", name))
            for name in (f"chaos-{i}" for i in range(count))
        ]
    finally:
        await conn.close()


async def _count_keys(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        count: int = await conn.fetchval("SELECT count(*) FROM idempotency_keys")
        return count
    finally:
        await conn.close()


async def _flushall(url: str) -> None:
    cache = await RedisCache.open(url, ttl_s=1.0)
    try:
        await run(cache.client.flushall, service="redis")
    finally:
        await cache.aclose()


async def _worker(store: IdempotencyStore, state: _Run, tenants: list[str], seed: int) -> None:
    rng = random.Random(seed)
    while not state.stopping:
        tenant = rng.choice(tenants)
        recent = state.recent.setdefault(tenant, deque(maxlen=RECENT_KEYS))
        repeat = bool(recent) and rng.random() < REPEAT_SHARE
        key = rng.choice(recent) if repeat else uuid.uuid4().hex
        state.requests += 1
        request = f"r{state.requests}"
        state.ledger.accept(request)
        try:
            claim = await store.claim(tenant, key, f"h-{key}")
        except Exception as exc:  # an unsettled claim: it shows up as lost
            state.errors.append(repr(exc))
        else:
            state.ledger.settle(request)
            if claim.first:
                state.ledger.receive(f"{tenant}:{key}")
                recent.append(key)
                if not state.flushed:
                    state.pre_flush.add((tenant, key))
            elif state.flushed and claim.source == "database" and (tenant, key) in state.pre_flush:
                state.repeats_refused_by_db += 1
        await trio.sleep(PACE_S)


async def run_scenario(ctx: ChaosContext) -> Outcome:
    """Scenario 7 (see the module docstring)."""
    timing = QUICK if ctx.quick else FULL
    postgres = EmbeddedPostgres(settings=FAST_PG)
    cache_server = EmbeddedRedis()
    try:
        await trio.to_thread.run_sync(postgres.start)
        await trio.to_thread.run_sync(cache_server.start)
        async with open_bridge():
            return await _drive(ctx, timing, postgres, cache_server)
    finally:
        await trio.to_thread.run_sync(cache_server.close)
        await trio.to_thread.run_sync(postgres.close)


async def _drive(
    ctx: ChaosContext, timing: _Timing, postgres: EmbeddedPostgres, cache_server: EmbeddedRedis
) -> Outcome:
    cfg = ctx.config
    admin_url = postgres.url
    await migrate(admin_url)
    tenants = await run(_seed_tenants, admin_url, 2)
    pool = await run(
        functools.partial(
            asyncpg.create_pool,
            postgres_url_with(admin_url, user=DAEMON_ROLE),
            min_size=1,
            max_size=cfg.database.pool_max,
        )
    )
    cache = await RedisCache.open(
        cache_server.url,
        ttl_s=cfg.idempotency.cache_ttl_s,
        timeout_s=cfg.guards["redis"].timeout_s,
    )
    store = IdempotencyStore.from_config(cfg, ctx.catalog, pool, cache, runtime=Runtime())
    state = _Run()
    notes: list[str] = []
    cleared = trio.Event()
    trigger_at = restart_at = 0.0

    def fired(_state: DetectorState) -> None:
        if not state.flushed:
            state.fired_early = True
        elif state.fired_at is None:
            state.fired_at = trio.current_time()

    def clear(_state: DetectorState) -> None:
        if state.fired_at is not None and restart_at:
            state.cleared_at = trio.current_time()
            cleared.set()

    store.detector.on_fire(fired)
    store.detector.on_clear(clear)
    detectors = DetectorSet([store.detector])
    try:
        async with trio.open_nursery() as nursery:
            warmer, _ = warmer_child(store, shutdown_s=cfg.supervisors["default"].shutdown_s)
            await nursery.start(warmer.start)
            await nursery.start(detectors.run, cfg.daemon.detector_tick_s)
            async with trio.open_nursery() as load:
                for i in range(WORKERS):
                    load.start_soon(_worker, store, state, tenants, (cfg.daemon.seed or 0) + i)

                await trio.sleep(timing.steady_s)
                hits_before = store.statistics().hits
                # The trigger: the cache loses every key, then the server is gone.
                await _flushall(cache_server.url)
                timeline.fault_started("Redis flushed and stopped")
                state.flushed = True
                trigger_at = trio.current_time()
                await trio.to_thread.run_sync(cache_server.stop)
                await trio.sleep(timing.outage_s)

                await trio.to_thread.run_sync(cache_server.start)
                timeline.fault_ended("Redis flushed and stopped")
                restart_at = trio.current_time()
                with trio.move_on_after(timing.recover_max_s):
                    await cleared.wait()
                state.stopping = True  # every accepted claim settles before we count
            nursery.cancel_scope.cancel()
    finally:
        store.close()
        with trio.CancelScope(shield=True):
            await cache.aclose()
            await run(pool.close)

    stored = await run(_count_keys, admin_url)
    ledger = state.ledger
    stats = store.statistics()
    detected = state.fired_at is not None and not state.fired_early
    detect_s = None if state.fired_at is None else round(state.fired_at - trigger_at, 3)
    failed_open = stats.db_fallbacks > 0 and state.repeats_refused_by_db > 0
    warmed = stats.warmed > 0
    recovered = state.cleared_at is not None
    truth = stored == len(ledger.received)
    mitigated = failed_open and warmed and recovered and truth

    if state.fired_early:
        notes.append("detector fired before the trigger")
    notes.append(
        f"claims={state.requests} hits={stats.hits} misses={stats.misses}"
        f" (hits before trigger={hits_before}) db_fallbacks={stats.db_fallbacks}"
        f" pre-flush repeats refused by the database={state.repeats_refused_by_db}"
    )
    notes.append(f"warm-ups={stats.warmups} warmed={stats.warmed}")
    if recovered and state.cleared_at is not None:
        notes.append(f"detector cleared {state.cleared_at - restart_at:.2f}s after restart")
    else:
        notes.append(f"detector did not clear within {timing.recover_max_s}s of restart")
    notes.append(f"keys in database={stored} keys claimed first={len(ledger.received)}")
    if state.errors:
        notes.append(f"{len(state.errors)} claims failed, first: {state.errors[0]}")
    return Outcome(
        detected=detected, detect_s=detect_s, mitigated=mitigated, ledger=ledger, notes=notes
    )


SCENARIO = Scenario(7, run_scenario)
