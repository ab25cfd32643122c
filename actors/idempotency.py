"""The idempotency store: Redis in front, the database's unique key as the truth.

Catalog row 7 (Redis cache miss flood). ``await store.claim(tenant, key, request_hash)``
answers one question -- is this the first request with this key? -- and returns
a :class:`Claim`::

    Redis GET (behind the "redis" breaker and bulkhead, with a timeout)
      finds the key ................... HIT   duplicate, answered by the cache alone
                                              (same key, other request_hash: IdempotencyConflict)
      key absent ...................... the database decides (INSERT ... ON CONFLICT):
          inserted .................... HIT   first = True (the cache was right); cached
          already there ............... MISS  duplicate; the cache lost the key (evicted,
                                              flushed): the entry is written back
      Redis down / breaker open ....... MISS  fail OPEN to the database: the INSERT decides

**A cache entry is written only after the database committed the row it names.**
That is the invariant that makes a Redis hit safe to trust without the database:
a hit can only ever name a committed row. A daemon killed between its commit and
its cache write leaves no entry at all -- the retry misses and the database
answers it (and writes the entry back). The other order (``SET NX`` first, then
the commit) was tried and lost acknowledged dispatches: a crash between the two
left a claim naming a row that was never written, and every retry was answered
with it. Verifying such a claim against the database on each hit would cost the
round trip the cache exists to save; writing after the commit costs nothing but
this: concurrent first requests of one key are serialized by the database's
unique key (the second INSERT waits for the first's commit), not by Redis.

The database is never skipped for a new key, so a flushed or absent cache can
cost speed but never a duplicate: no key is claimed first twice. When the
database is down too, ``claim`` raises (the translated ProviderError): there is
no "send anyway". A duplicate that arrives while the first request is still in
flight gets ``response=None`` (in progress: answer it like Stripe's 409, never by
sending).

Callers that write their own row in their own transaction (the dispatcher: the
idempotency row, the dispatch and its event in ONE statement) use the two halves
of a claim: :meth:`IdempotencyStore.lookup` before their transaction and
:meth:`IdempotencyStore.settle` after it committed.

The **hit ratio** is the share of lookups Redis answered correctly (the HIT
lines above). It feeds the row's :class:`~engine.detectors.RatioDetector`
(``triage_idempotency_cache_hit_ratio < 0.9`` with a minimum volume) and the
counters ``triage_idempotency_cache_hit_ratio_numerator_total`` /
``_denominator_total``. Without Redis every lookup is a miss: the detector
fires, and the store runs on the database alone, correctly.

**Warm-up** (the row's ``warm_cache`` mitigation): the :class:`CacheWarmer`
actor (:func:`warmer_child`) reloads each known tenant's newest live keys
(``warm_batch`` per tenant) from the database into Redis with ``SET NX`` in one
pipeline, whenever the detector fires and whenever Redis answers again after a
failure. Keys keep the shorter of the cache TTL and their own remaining life.
Warmed entries come from committed rows, so they keep the invariant.

Same key, different body -> :class:`IdempotencyConflict`, like Stripe's
idempotency keys: the caller must not treat it as a duplicate of the first.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar, TypeVarTuple

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter

from config.catalog import Catalog, alert_name, row_detector
from config.schema import DetectorConfig, TriageConfig, engine_kwargs
from engine.actor import Actor, ActorRef, Overflow, actor_child
from engine.breaker import Breaker
from engine.bulkhead import Bulkhead
from engine.detectors import RatioDetector, make_detector
from engine.errors import ActorStopped, CircuitOpen, TriageError
from engine.metrics import families
from engine.statelog import StateLog
from providers.db.idempotency import claim_key, recent_keys
from providers.db.idempotency import complete_key as db_complete_key
from providers.redis_cache import CachedKey, RedisCache

if TYPE_CHECKING:
    import asyncpg

    from engine.runtime import Runtime
    from engine.supervisor import ChildSpec, Restart

__all__ = [
    "DETECTOR_OVERRIDE",
    "ROW",
    "WARM",
    "CacheWarmer",
    "Claim",
    "IdempotencyConflict",
    "IdempotencyStatistics",
    "IdempotencyStore",
    "Lookup",
    "Warm",
    "WarmerMessage",
    "WarmerState",
    "WarmerStatistics",
    "detector_config",
    "warmer_child",
]

log = logging.getLogger("triage.idempotency")

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: The catalog row this store owns.
ROW: Final = 7
#: A ``[detectors.<name>]`` section with this name replaces the row's detector settings
#: (the chaos config shortens the window this way).
DETECTOR_OVERRIDE: Final = "idempotency_cache_hit_ratio"


class IdempotencyConflict(TriageError):
    """The key was already used for a different request (another request hash)."""

    def __init__(self, tenant_id: str, key: str) -> None:
        super().__init__(
            f"idempotency key {key!r} of tenant {tenant_id} was already used"
            " for a different request"
        )
        self.tenant_id = tenant_id
        self.key = key


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer to a claim: ``first`` (go ahead) or a duplicate with the recorded response."""

    first: bool
    response: Any = None
    source: Literal["cache", "database"] = "database"


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the cache said of a key before the database decided (:meth:`IdempotencyStore.lookup`).

    ``duplicate``: the cache's answer (a committed key), or None -- the database must
    decide; ``reachable``: Redis answered (so its "absent" is scored by ``settle``).
    """

    tenant: str
    key: str
    duplicate: Claim | None
    reachable: bool


class IdempotencyStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """The store's numbers (:meth:`IdempotencyStore.statistics`), beside its Prometheus counters."""

    hits: int
    misses: int
    db_fallbacks: int
    cache_errors: int
    bulkhead_full: int
    conflicts: int
    warmups: int
    warmed: int
    cache_available: bool


@dataclass(slots=True)
class _Counts:
    hits: int = 0
    misses: int = 0
    db_fallbacks: int = 0  # claims decided by the database while Redis was unavailable
    cache_errors: int = 0  # Redis calls that failed, timed out or were refused by the breaker
    bulkhead_full: int = 0  # Redis calls skipped (straight to the database): bulkhead full
    conflicts: int = 0
    warmups: int = 0  # warm-ups that reached Redis
    warmed: int = 0  # keys put back into Redis by warm-ups


class _Unavailable:
    """The cache could not answer (down, slow, breaker open, or no cache at all)."""


_UNAVAILABLE: Final = _Unavailable()


class _StoreMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.hits = Counter(
            "triage_idempotency_cache_hit_ratio_numerator",
            "Idempotency-key lookups answered correctly by Redis",
            registry=registry,
        )
        self.lookups = Counter(
            "triage_idempotency_cache_hit_ratio_denominator",
            "Idempotency-key lookups",
            registry=registry,
        )
        self.fallbacks = Counter(
            "triage_idempotency_db_fallbacks",
            "Idempotency claims decided by the database alone while Redis was unavailable",
            registry=registry,
        )
        self.warmed = Counter(
            "triage_idempotency_cache_warmed",
            "Idempotency keys loaded back into Redis from the database",
            registry=registry,
        )


def _store_metrics(registry: CollectorRegistry) -> _StoreMetrics:
    return families(registry, _StoreMetrics)


def detector_config(config: TriageConfig, catalog: Catalog) -> DetectorConfig:
    """Row 7's detector settings: ``[detectors.idempotency_cache_hit_ratio]`` if set, else the row's."""
    return row_detector(config, catalog, ROW, DETECTOR_OVERRIDE)


def _tenant_text(tenant_id: uuid.UUID | str) -> str:
    try:
        return str(tenant_id if isinstance(tenant_id, uuid.UUID) else uuid.UUID(tenant_id))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tenant id must be a UUID, got {tenant_id!r}") from exc


class IdempotencyStore:
    """Claims idempotency keys; see the module docstring for the rules.

    ``cache`` None means no Redis: every claim goes to the database (and counts as
    a miss). ``breaker`` guards every Redis call; ``cache_timeout_s`` bounds each.
    """

    def __init__(
        self,
        pool: asyncpg.Pool[asyncpg.Record],
        *,
        cache: RedisCache | None,
        breaker: Breaker,
        detector: RatioDetector,
        key_ttl_s: float,
        warm_batch: int,
        cache_timeout_s: float,
        max_tenants: int = 10_000,
        registry: CollectorRegistry | None = None,
        bulkhead: Bulkhead | None = None,
    ) -> None:
        if not key_ttl_s > 0 or not cache_timeout_s > 0:
            raise ValueError("key_ttl_s and cache_timeout_s must be > 0")
        if warm_batch < 1 or max_tenants < 1:
            raise ValueError("warm_batch and max_tenants must be >= 1")
        self.pool = pool
        self.cache = cache
        self.breaker = breaker
        #: Bounds concurrent Redis calls; a full bulkhead falls open to the database
        #: at once rather than queue behind a slow cache.
        self.bulkhead = bulkhead
        self.detector = detector
        self.key_ttl_s = key_ttl_s
        self.warm_batch = warm_batch
        self.cache_timeout_s = cache_timeout_s
        self.max_tenants = max_tenants
        self._counts = _Counts()
        self._metrics = _store_metrics(registry) if registry is not None else None
        # Tenants seen, oldest first (a dict keeps insertion order): warm-up covers them.
        self._tenants: dict[str, None] = {}
        self._cache_down = False
        self._warmer: ActorRef[WarmerMessage] | None = None
        self._unsubscribe = detector.on_fire(lambda _state: self.request_warm())

    @classmethod
    def from_config(
        cls,
        config: TriageConfig,
        catalog: Catalog,
        pool: asyncpg.Pool[asyncpg.Record],
        cache: RedisCache | None,
        *,
        runtime: Runtime | None = None,
        detector: RatioDetector | None = None,
    ) -> IdempotencyStore:
        """A store wired from ``[idempotency]``, ``breakers.redis``, ``guards.redis`` and row 7.

        ``detector``: feed this one (e.g. the daemon's, from its DetectorSet) instead of
        building the row's own from :func:`detector_config`.
        """
        common: dict[str, Any] = {}
        if runtime is not None:
            common = {"clock": runtime.clock, "events": runtime.events, "metrics": runtime.metrics}
        breaker = Breaker("redis", **engine_kwargs(config.breakers["redis"]), **common)
        if runtime is not None:
            runtime.tunables.breaker("redis", breaker)  # a reload retunes it in place
        if detector is None:
            detector = make_detector(
                alert_name(catalog.row(ROW)),
                row=ROW,
                **engine_kwargs(detector_config(config, catalog)),
                **common,
            ).expect(RatioDetector)
        metrics = runtime.metrics if runtime is not None else None
        profile = config.guards["redis"].bulkhead
        bulkhead = Bulkhead("redis", **engine_kwargs(config.bulkheads[profile]), metrics=metrics)
        if runtime is not None:
            runtime.tunables.bulkhead(profile, bulkhead)  # a reload retunes it in place
        return cls(
            pool,
            cache=cache,
            breaker=breaker,
            detector=detector,
            key_ttl_s=config.idempotency.key_ttl_s,
            warm_batch=config.idempotency.warm_batch,
            max_tenants=config.idempotency.max_tenants,
            cache_timeout_s=config.guards["redis"].timeout_s,
            bulkhead=bulkhead,
            registry=metrics.registry if metrics is not None else None,
        )

    def close(self) -> None:
        """Detach from the detector (the store's hook)."""
        self._unsubscribe()

    def statistics(self) -> IdempotencyStatistics:
        """A frozen record of the store's counts."""
        return IdempotencyStatistics(
            **{f: getattr(self._counts, f) for f in _Counts.__slots__},
            cache_available=self.cache_available,
        )

    @property
    def cache_available(self) -> bool:
        """False while the last Redis call failed (or there is no Redis)."""
        return self.cache is not None and not self._cache_down

    # -- claims ------------------------------------------------------------------------

    async def claim(self, tenant_id: uuid.UUID | str, key: str, request_hash: str) -> Claim:
        """Claim ``key`` for ``request_hash``: ``first`` exactly once per (tenant, key).

        Raises :class:`IdempotencyConflict` when the key belongs to another request,
        and the translated ProviderError when the database cannot decide.
        """
        found = await self.lookup(tenant_id, key, request_hash)
        if found.duplicate is not None:
            return found.duplicate
        first, record = await claim_key(self.pool, found.tenant, key, request_hash, self.key_ttl_s)
        # Committed: only now may the cache hear of the key (module docstring).
        await self.settle(
            found, first=first, stored_hash=record.request_hash, response=record.response,
            left_s=record.left_s,
        )  # fmt: skip
        if first:
            return Claim(first=True, response=None, source="database")
        return self._duplicate(
            found.tenant, key, request_hash, record.request_hash, record.response, "database"
        )

    async def lookup(self, tenant_id: uuid.UUID | str, key: str, request_hash: str) -> Lookup:
        """The cache's half of a claim, before the caller's database transaction.

        ``duplicate`` is set when Redis holds the key (a committed row: the caller
        answers the duplicate without the database); :class:`IdempotencyConflict`
        when it holds the key for another request. Otherwise the database must
        decide, and the caller reports its decision with :meth:`settle`.
        """
        tenant = _tenant_text(tenant_id)
        if not key:
            raise ValueError("idempotency key must not be empty")
        self._remember(tenant)
        cached = await self._cache_call(self._cache_get, tenant, key)
        if isinstance(cached, CachedKey):
            self._observe(True)
            duplicate = self._duplicate(
                tenant, key, request_hash, cached.request_hash, cached.response, "cache"
            )
            return Lookup(tenant, key, duplicate=duplicate, reachable=True)
        if isinstance(cached, _Unavailable):
            self._counts.db_fallbacks += 1
            if self._metrics is not None:
                self._metrics.fallbacks.inc()
            return Lookup(tenant, key, duplicate=None, reachable=False)
        return Lookup(tenant, key, duplicate=None, reachable=True)

    async def settle(
        self,
        lookup: Lookup,
        *,
        first: bool,
        stored_hash: str | None,
        response: Any,
        left_s: float | None = None,
    ) -> None:
        """The database's decision on ``lookup``'s key, once COMMITTED: scored for the hit
        ratio and cached (``first``: this request wrote the key; else it found it there).

        ``stored_hash`` / ``response`` are the key's row (None: score only, cache nothing);
        ``left_s`` the row's remaining life (default: the cache TTL). Never call it before
        the commit: a cache entry must never name a row that may not exist.
        """
        if lookup.duplicate is not None:
            return  # answered (and scored) by the cache
        if not lookup.reachable:
            self._observe(False)
            return
        self._observe(first)  # new and Redis said absent: right; else Redis had lost it
        if stored_hash is not None:
            entry = CachedKey(stored_hash, response)
            await self._cache_call(self._cache_put, lookup.tenant, lookup.key, entry, left_s)

    async def complete(self, tenant_id: uuid.UUID | str, key: str, response: Any) -> bool:
        """Record the response of a claimed key, for duplicates to replay; False if already set."""
        tenant = _tenant_text(tenant_id)
        done = await db_complete_key(self.pool, tenant, key, response)
        if done:
            await self._cache_call(self._cache_refresh, tenant, key, response)
        return done

    def _duplicate(
        self,
        tenant: str,
        key: str,
        request_hash: str,
        stored_hash: str,
        response: Any,
        source: Literal["cache", "database"],
    ) -> Claim:
        if stored_hash != request_hash:
            self._counts.conflicts += 1
            raise IdempotencyConflict(tenant, key)
        return Claim(first=False, response=response, source=source)

    def _observe(self, hit: bool) -> None:
        if hit:
            self._counts.hits += 1
        else:
            self._counts.misses += 1
        self.detector.observe(hit)
        if self._metrics is not None:
            self._metrics.lookups.inc()
            if hit:
                self._metrics.hits.inc()

    def _remember(self, tenant: str) -> None:
        tenants = self._tenants
        if tenant in tenants:
            return
        if len(tenants) >= self.max_tenants:
            del tenants[next(iter(tenants))]
        tenants[tenant] = None

    # -- Redis, behind the breaker -----------------------------------------------------

    async def _cache_get(self, cache: RedisCache, tenant: str, key: str) -> CachedKey | None:
        return await cache.get(tenant, key)  # None: absent, or not ours (then overwritten)

    async def _cache_put(
        self, cache: RedisCache, tenant: str, key: str, entry: CachedKey, left_s: float | None
    ) -> None:
        ttl_ms = None if left_s is None else max(1, round(left_s * 1000))
        await cache.put(tenant, key, entry, ttl_ms)

    async def _cache_refresh(self, cache: RedisCache, tenant: str, key: str, response: Any) -> None:
        current = await cache.get(tenant, key)
        if current is not None:
            await cache.refresh(tenant, key, CachedKey(current.request_hash, response))

    async def _cache_call(
        self, fn: Callable[[RedisCache, *Ts], Awaitable[T]], *args: *Ts
    ) -> T | _Unavailable:
        """``fn(cache, *args)`` through the breaker with the timeout; failures answer _UNAVAILABLE."""
        cache = self.cache
        if cache is None:
            return _UNAVAILABLE
        permit = self.bulkhead.try_acquire_nowait() if self.bulkhead is not None else None
        if self.bulkhead is not None and permit is None:
            self._counts.bulkhead_full += 1
            return _UNAVAILABLE
        try:
            return await self._guarded(cache, fn, *args)
        finally:
            if self.bulkhead is not None and permit is not None:
                self.bulkhead.release(permit)

    async def _guarded(
        self, cache: RedisCache, fn: Callable[[RedisCache, *Ts], Awaitable[T]], *args: *Ts
    ) -> T | _Unavailable:
        try:
            start = self.breaker.before_call()
        except CircuitOpen:
            self._cache_failed()
            return _UNAVAILABLE
        try:
            with trio.fail_after(self.cache_timeout_s):
                result = await fn(cache, *args)
        except Exception as exc:  # the cache is optional: any failure falls open to the DB
            self.breaker.on_failure(exc, start)
            self._cache_failed()
            log.debug("redis cache call failed: %r", exc)
            return _UNAVAILABLE
        except BaseException as exc:
            self.breaker.on_failure(exc, start)  # Cancelled: never counted
            raise
        self.breaker.on_success(start)
        if self._cache_down:
            self._cache_down = False
            log.info("redis cache answers again: warming it from the database")
            self.request_warm()
        return result

    def _cache_failed(self) -> None:
        self._counts.cache_errors += 1
        if not self._cache_down:
            self._cache_down = True
            log.warning("redis cache unavailable: idempotency falls open to the database")

    # -- warm-up -----------------------------------------------------------------------

    def warm_with(self, warmer: ActorRef[WarmerMessage]) -> None:
        """Send warm-up requests to ``warmer`` (the :class:`CacheWarmer` of this store)."""
        self._warmer = warmer

    def request_warm(self) -> None:
        """Ask the warmer for a warm-up; requests made while one is queued coalesce."""
        if self._warmer is None:
            return
        with contextlib.suppress(ActorStopped):
            self._warmer.tell_nowait(WARM)

    async def warm(self) -> int:
        """Load each known tenant's newest live keys into Redis; how many were added."""
        if self.cache is None:
            return 0
        added = 0
        reached = False
        for tenant in tuple(self._tenants):
            records = await recent_keys(self.pool, tenant, self.warm_batch)
            if not records:
                continue
            entries = [(r.key, CachedKey(r.request_hash, r.response), r.left_s) for r in records]
            result = await self._cache_call(self._cache_warm, tenant, entries)
            if isinstance(result, _Unavailable):
                break
            reached = True
            added += result
        if reached:
            self._counts.warmups += 1
            self._counts.warmed += added
            if self._metrics is not None:
                self._metrics.warmed.inc(added)
        return added

    async def _cache_warm(
        self, cache: RedisCache, tenant: str, entries: list[tuple[str, CachedKey, float]]
    ) -> int:
        return await cache.warm(tenant, entries)


# -- the warm-up actor -------------------------------------------------------------------


class Warm(msgspec.Struct, frozen=True, tag=True):
    """Reload the known tenants' newest keys into Redis (the row's ``warm_cache``)."""


WARM: Final = Warm()
#: The warmer's messages.
WarmerMessage = Warm


class WarmerState(enum.Enum):
    IDLE = "idle"
    WARMING = "warming"
    FAILED = "failed"  # the last warm-up could not read the database; the next request retries


class WarmerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    state: str
    runs: int
    failures: int
    last_added: int


class CacheWarmer(Actor[WarmerMessage]):
    """Row 7's mitigation as an actor: each :data:`WARM` it is told runs one warm-up.

    The store tells it when the row's detector fires and when Redis answers again
    after a failure. Its mailbox holds one message and drops the newest: requests
    made while a warm-up is queued are the same request, and one made while a
    warm-up runs queues exactly one more (so keys committed meanwhile are warmed
    too). That capacity is the coalescing rule itself, not a tunable.

    The store's claims stay direct calls: they are the accept path of every
    dispatch (a lookup before its transaction, a settle after its commit), and a
    mailbox hop there would serialise every request behind one task.
    """

    name = "idempotency"

    def __init__(self, store: IdempotencyStore) -> None:
        self.store = store
        self.states = StateLog(
            "idempotency warmer", WarmerState.IDLE, log, warn={WarmerState.FAILED}
        )
        self.runs = 0
        self.failures = 0
        self.last_added = 0

    async def handle(self, message: WarmerMessage) -> None:
        match message:
            case Warm():
                self.states.enter(WarmerState.WARMING, "warm-up requested")
                try:
                    added = await self.store.warm()
                except Exception as exc:  # the database is down: the next request tries again
                    self.failures += 1
                    self.states.enter(WarmerState.FAILED, f"warm-up failed: {exc!r}")
                    return
                self.runs += 1
                self.last_added = added
                log.info("idempotency cache warmed: %d keys", added)
                self.states.enter(WarmerState.IDLE, f"warmed {added} keys")

    def statistics(self) -> WarmerStatistics:
        return WarmerStatistics(
            state=self.states.state.value,
            runs=self.runs,
            failures=self.failures,
            last_added=self.last_added,
        )


def warmer_child(
    store: IdempotencyStore, *, shutdown_s: float, restart: Restart | None = None
) -> tuple[ChildSpec, ActorRef[WarmerMessage]]:
    """The warmer's child spec and ref; ``store`` sends its warm-up requests there."""
    spec, ref = actor_child(
        CacheWarmer.name,
        partial(CacheWarmer, store),
        capacity=1,
        overflow=Overflow.DROP_NEWEST,
        restart=restart,
        shutdown_s=shutdown_s,
    )
    store.warm_with(ref)
    return spec, ref
