"""Row 3: bounce ratio per tenant and category -> throttle, page, disable; state in the database."""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import trio
from prometheus_client import CollectorRegistry

from actors.bounce_tracker import BounceAlert, BounceTracker, DbBlockStore, KeyState
from config import default_path, load_catalog
from config.schema import engine_kwargs
from engine.detectors import RatioDetector, make_detector
from engine.errors import ConfigError, ProviderUnavailable
from engine.events import EventBus
from engine.metrics import OVERFLOW_LABEL, Metrics
from providers.bridge import run
from providers.channel import DeliveryState, Receipt
from providers.db import DAEMON_ROLE
from providers.db.categories import (
    BlockState,
    CategoryBlock,
    block_async,
    enable_async,
    lookup_block_async,
)
from providers.services import postgres_url_with
from supervisors.vocabulary import METRICS, MITIGATIONS
from tests.providers.test_categories_db import _tenants

TENANT = "7b0c1f0e-7a43-4f1e-9d55-2f4a2b8c0001"

# Row 3's detector, as failures.toml has it.
ROW3: dict[str, Any] = dict(
    kind="ratio", metric="triage_email_bounce_ratio", threshold=0.05, clear_threshold=0.02,
    window_s=900.0, min_volume=50, buckets=60,
)  # fmt: skip
KNOBS: dict[str, Any] = dict(
    disable_after_s=300.0, ceiling_ratio=0.5, throttle_rate_per_s=1.0, max_keys=100,
    evaluate_interval_s=1.0, reload_interval_s=60.0,
)  # fmt: skip


class MemoryStore:
    """A BlockStore in memory with the database's rules: records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, str | None]] = []
        self.rows: dict[tuple[str, str], CategoryBlock] = {}
        self.fail = False

    async def block(self, tenant: str, category: str, state: BlockState, reason: str) -> None:
        await trio.lowlevel.checkpoint()
        if self.fail:
            raise ProviderUnavailable("postgres: unavailable (test)")
        self.calls.append(("block", tenant, category, state.value))
        old = self.rows.get((tenant, category))
        if old is None or old.state is not BlockState.DISABLED:
            self.rows[tenant, category] = CategoryBlock(
                tenant, "email", category, state, reason, datetime.now(UTC)
            )

    async def lift(self, tenant: str, category: str) -> None:
        await trio.lowlevel.checkpoint()
        self.calls.append(("lift", tenant, category, None))
        old = self.rows.get((tenant, category))
        if old is not None and old.state is BlockState.THROTTLED:
            del self.rows[tenant, category]

    async def load(self, tenants: Sequence[str]) -> list[CategoryBlock]:
        await trio.lowlevel.checkpoint()
        return [b for b in self.rows.values() if b.tenant_id in tenants]


def _bounce(tenant: str = TENANT, category: str = "reminder", *, hard: bool = True) -> Receipt:
    return Receipt(
        provider="smtp", state=DeliveryState.UNDELIVERABLE, client_ref="d1", permanent=hard,
        tenant_id=tenant, category=category,
    )  # fmt: skip


def _tracker(store: Any, **overrides: Any) -> tuple[BounceTracker, list[BounceAlert]]:
    bus = EventBus()
    alerts: list[BounceAlert] = []
    bus.on(BounceAlert, alerts.append)  # type: ignore[arg-type]  # handler sees BounceAlerts only
    fields = {**ROW3, **KNOBS, **overrides}
    return BounceTracker(store=store, events=bus, **fields), alerts


async def test_below_min_volume_never_fires(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    tracker, alerts = _tracker(store)
    tracker.record_sent(TENANT, "reminder", 49)
    for _ in range(49):
        tracker.record_bounce(_bounce())
    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)
        await trio.sleep(600)
        tracker.evaluate()
        nursery.cancel_scope.cancel()
    assert tracker.state(TENANT, "reminder") is KeyState.QUIET
    assert tracker.throttle_rate_per_s(TENANT, "reminder") is None
    assert alerts == [] and store.calls == []
    assert tracker.ratio(TENANT, "reminder") == 1.0  # measured, but not enough volume to act


async def test_crossing_throttles_and_pages_then_sustained_disables(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = MemoryStore()
    detector = make_detector("row3", **ROW3)
    assert isinstance(detector, RatioDetector)
    tracker, alerts = _tracker(store, detector=detector)
    t0 = trio.current_time()
    tracker.record_sent(TENANT, "reminder", 100)
    for _ in range(5):
        tracker.record_bounce(_bounce())
    assert tracker.state(TENANT, "reminder") is KeyState.QUIET  # 0.05 is not above 0.05
    tracker.record_bounce(_bounce(hard=False))  # soft: counted apart, not in the ratio
    assert tracker.state(TENANT, "reminder") is KeyState.QUIET
    tracker.record_bounce(_bounce())  # 6 / 100: the throttle applies at this very bounce
    assert tracker.is_throttled(TENANT, "reminder")
    assert tracker.throttle_rate_per_s(TENANT, "reminder") == 1.0
    assert not tracker.is_throttled(TENANT, "other") and not tracker.is_disabled(TENANT, "reminder")
    [page] = alerts
    assert (page.severity, page.action, page.row) == ("page", "throttled", 3)
    assert (page.tenant, page.category, page.channel) == (TENANT, "reminder", "email")
    assert (page.ratio, page.volume, page.at) == (0.06, 100, t0)
    assert (tracker.stats.hard_bounces, tracker.stats.soft_bounces) == (6, 1)
    assert detector.evaluate().firing  # the row's own detector saw it too

    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)
        await trio.sleep(0.1)
        assert store.calls == [("block", TENANT, "reminder", "throttled")]
        await trio.sleep(299.8)
        assert tracker.state(TENANT, "reminder") is KeyState.THROTTLED
        await trio.sleep(0.2)  # t0 + 300.1
        assert tracker.state(TENANT, "reminder") is KeyState.DISABLED
        await trio.sleep(0.1)  # the same tick writes it
        nursery.cancel_scope.cancel()
    assert [(a.action, a.severity, a.at - t0) for a in alerts] == [
        ("throttled", "page", 0.0),
        ("disabled", "page", 300.0),
    ]
    assert store.calls[-1] == ("block", TENANT, "reminder", "disabled")
    assert tracker.throttle_rate_per_s(TENANT, "reminder") == 0.0
    tracker.record_sent(TENANT, "reminder", 10)  # a disabled key is not tracked again
    assert tracker.stats.ignored == 1


async def test_clearing_lifts_the_throttle_but_never_a_disable(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = MemoryStore()
    tracker, alerts = _tracker(store)
    tracker.record_sent(TENANT, "reminder", 100)
    for _ in range(6):
        tracker.record_bounce(_bounce())
    assert tracker.is_throttled(TENANT, "reminder")
    tracker.record_sent(
        TENANT, "reminder", 150
    )  # 6 / 250 = 0.024: inside the band, still throttled
    assert tracker.is_throttled(TENANT, "reminder")
    tracker.record_sent(TENANT, "reminder", 50)  # 6 / 300 = 0.02: cleared
    assert not tracker.is_throttled(TENANT, "reminder")
    assert [a.action for a in alerts] == ["throttled", "lifted"] and alerts[1].severity == "info"

    # Another category goes past the ceiling: disabled at once, and no clean traffic lifts it.
    tracker.record_sent(TENANT, "news", 100)
    for _ in range(50):
        tracker.record_bounce(_bounce(category="news"))
    assert tracker.is_disabled(TENANT, "news")
    assert [a.action for a in alerts[2:]] == ["throttled", "disabled"]
    tracker.record_sent(TENANT, "news", 100_000)
    await trio.sleep(3600)
    tracker.evaluate()
    assert tracker.is_disabled(TENANT, "news")
    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    # Coalesced per key: the last decision of each is what is written.
    assert sorted(store.calls) == [
        ("block", TENANT, "news", "disabled"),
        ("lift", TENANT, "reminder", None),
    ]


async def test_failed_writes_are_retried(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    store.fail = True
    tracker, _ = _tracker(store)
    tracker.record_sent(TENANT, "reminder", 100)
    for _ in range(6):
        tracker.record_bounce(_bounce())
    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)
        await trio.sleep(2.5)
        assert store.calls == [] and tracker.stats.write_failures == 3
        store.fail = False
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    assert store.calls == [("block", TENANT, "reminder", "throttled")]


async def test_keys_and_label_values_are_bounded(autojump_clock: trio.abc.Clock) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_label_values=2)
    tracker, _ = _tracker(MemoryStore(), max_keys=3, metrics=metrics)
    tenants = [f"7b0c1f0e-7a43-4f1e-9d55-2f4a2b8c000{i}" for i in range(6)]
    for tenant in tenants[:5]:
        tracker.record_sent(tenant, "reminder", 10)
    assert tracker.tracked == 3 and tracker.stats.evicted == 2
    # Throttled keys are never evicted: with every slot throttled a new key is not tracked.
    for tenant in tenants[2:5]:
        tracker.record_sent(tenant, "reminder", 100)
        for _ in range(10):
            tracker.record_bounce(_bounce(tenant))
        assert tracker.is_throttled(tenant, "reminder")
    tracker.record_sent(tenants[5], "reminder", 100)
    assert tracker.tracked == 3 and tracker.stats.untracked == 1
    assert all(tracker.is_throttled(t, "reminder") for t in tenants[2:5])

    labels = {
        sample.labels["tenant"]
        for family in registry.collect()
        if family.name == "triage_email_bounce_ratio_denominator"
        for sample in family.samples
        if sample.name.endswith("_total")
    }
    assert labels == {tenants[0], tenants[1], OVERFLOW_LABEL}
    total = registry.get_sample_value(
        "triage_email_bounce_ratio_numerator_total",
        {"tenant": OVERFLOW_LABEL, "category": "reminder"},
    )
    assert total == 30.0


def test_bad_input_is_refused_by_name() -> None:
    tracker, _ = _tracker(MemoryStore())
    with pytest.raises(ValueError, match="names no tenant"):
        tracker.record_bounce(Receipt(provider="smtp", state=DeliveryState.UNDELIVERABLE))
    with pytest.raises(ConfigError, match="ceiling_ratio"):
        _tracker(MemoryStore(), ceiling_ratio=0.01)
    with pytest.raises(ConfigError, match="clear_threshold"):
        _tracker(MemoryStore(), clear_threshold=0.5)
    with pytest.raises(ConfigError, match="max_keys"):
        _tracker(MemoryStore(), max_keys=0)
    with pytest.raises(ConfigError, match="kind='rate'"):
        _tracker(MemoryStore(), kind="rate")
    with pytest.raises(ConfigError, match="window_s"):
        _tracker(MemoryStore(), window_s=math.nan)


# -- against the database (real time, short knobs) ----------------------------------------


@pytest.fixture
async def pool(
    bridge: object, postgres_url: str
) -> AsyncIterator[tuple[asyncpg.Pool[asyncpg.Record], str, tuple[str, str]]]:
    tenants = await run(_tenants, postgres_url)
    create = functools.partial(
        asyncpg.create_pool, postgres_url_with(postgres_url, user=DAEMON_ROLE), min_size=1,
        max_size=2,
    )  # fmt: skip
    p = await run(create)
    try:
        yield p, postgres_url, tenants
    finally:
        await run(p.close)


async def _state(pool: asyncpg.Pool[asyncpg.Record], tenant: str, category: str) -> str | None:
    block = await run(lookup_block_async, pool, tenant, "email", category)
    return None if block is None else block.state.value


async def _until(pool: asyncpg.Pool[asyncpg.Record], tenant: str, category: str, want: str) -> None:
    with trio.fail_after(5):
        while await _state(pool, tenant, category) != want:  # noqa: ASYNC110  # polls the database
            await trio.sleep(0.02)


async def test_blocks_persist_survive_a_restart_and_only_an_operator_enables(
    pool: tuple[asyncpg.Pool[asyncpg.Record], str, tuple[str, str]],
) -> None:
    db, admin_url, (a, b) = pool
    knobs = dict(disable_after_s=0.3, evaluate_interval_s=0.02, reload_interval_s=0.05)
    tracker, alerts = _tracker(DbBlockStore(db), **knobs)
    async with trio.open_nursery() as nursery:
        await nursery.start(tracker.run)
        tracker.record_sent(a, "reminder", 100)
        tracker.record_sent(b, "reminder", 100)
        tracker.record_sent(b, "news", 100)
        for _ in range(6):
            tracker.record_bounce(_bounce(a))
            tracker.record_bounce(_bounce(b, "news"))
        await _until(db, a, "reminder", "throttled")
        await _until(db, a, "reminder", "disabled")
        await _until(db, b, "news", "disabled")
        assert await _state(db, b, "reminder") is None
        nursery.cancel_scope.cancel()
    assert [x.action for x in alerts if x.tenant == a] == ["throttled", "disabled"]

    # A throttle written by an earlier incarnation, for the restart to find.
    await run(enable_async, admin_url, b, "email", "news")
    await run(block_async, db, b, "email", "news", BlockState.THROTTLED, "restored")

    restarted, _ = _tracker(DbBlockStore(db), tenants=[a, b], **knobs)
    async with trio.open_nursery() as nursery:
        await nursery.start(restarted.run)
        # Loaded before it reported started.
        assert restarted.is_disabled(a, "reminder")
        assert restarted.is_throttled(b, "news")
        restarted.record_sent(a, "reminder", 500)  # never re-enabled by clean traffic
        await trio.sleep(0.2)
        assert restarted.is_disabled(a, "reminder")
        # The operator's command: the running tracker sees it at its next reload.
        removed, _ = await run(enable_async, admin_url, a, "email", "reminder")
        assert removed is not None
        with trio.fail_after(5):
            while restarted.is_disabled(a, "reminder"):  # noqa: ASYNC110  # waits for a reload tick
                await trio.sleep(0.01)
        assert restarted.state(a, "reminder") is KeyState.QUIET
        # The restored throttle lifts once enough clean volume shows the ratio cleared.
        restarted.record_sent(b, "news", 60)
        with trio.fail_after(5):
            while await _state(db, b, "news") is not None:  # noqa: ASYNC110  # polls the database
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


def test_built_from_the_shipped_catalog_row() -> None:
    catalog = load_catalog(default_path("failures.toml"), metrics=METRICS, mitigations=MITIGATIONS)
    fields = engine_kwargs(catalog.row(3).detector)
    tracker = BounceTracker(store=MemoryStore(), **fields, **KNOBS)
    assert (tracker.threshold, tracker.clear_threshold, tracker.min_volume, tracker.window_s) == (
        0.05,
        0.02,
        50,
        900.0,
    )
