"""Row 3: bounce ratio per tenant and category -> throttle, page, disable; state in the database.

The tracker runs as an actor under a supervisor; the tests feed it through its
:class:`BounceFeed`, read decisions on the :class:`BounceBoard` and numbers through
``ref.statistics()``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from actors.bounce_tracker import (
    BounceAlert,
    BounceBoard,
    BounceFeed,
    BounceMessage,
    BounceRules,
    BounceStatistics,
    DbBlockStore,
    Inspect,
    KeyReport,
    KeyState,
    TrackerState,
    bounce_tracker_child,
)
from config import default_path, load_catalog
from config.schema import engine_kwargs
from engine.actor import ActorRef, Overflow
from engine.detectors import RatioDetector, make_detector
from engine.errors import ConfigError, ProviderUnavailable
from engine.events import ActorCrashed, EventBus
from engine.metrics import OVERFLOW_LABEL, Metrics
from engine.runtime import Runtime, open_runtime
from engine.supervisor import Supervisor
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
        self.fail_load = False
        self.crash_loads = 0
        self.hold: trio.Event | None = None  # every write waits for it
        self.loads: list[list[str]] = []

    async def block(self, tenant: str, category: str, state: BlockState, reason: str) -> None:
        await trio.lowlevel.checkpoint()
        if self.hold is not None:
            await self.hold.wait()
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
        if self.hold is not None:
            await self.hold.wait()
        self.calls.append(("lift", tenant, category, None))
        old = self.rows.get((tenant, category))
        if old is not None and old.state is BlockState.THROTTLED:
            del self.rows[tenant, category]

    async def load(self, tenants: Sequence[str]) -> list[CategoryBlock]:
        await trio.lowlevel.checkpoint()
        if self.fail_load:
            raise ProviderUnavailable("postgres: unavailable (test)")
        if self.crash_loads:
            self.crash_loads -= 1
            raise RuntimeError("a bug in the store (test)")
        self.loads.append(list(tenants))
        return [b for b in self.rows.values() if b.tenant_id in tenants]


def _bounce(tenant: str = TENANT, category: str = "reminder", *, hard: bool = True) -> Receipt:
    return Receipt(
        provider="smtp", state=DeliveryState.UNDELIVERABLE, client_ref="d1", permanent=hard,
        tenant_id=tenant, category=category,
    )  # fmt: skip


def _rules(**overrides: Any) -> BounceRules:
    return BounceRules.of(**{**ROW3, **KNOBS, **overrides})


@dataclass
class World:
    feed: BounceFeed
    board: BounceBoard
    alerts: list[BounceAlert]
    sup: Supervisor
    rt: Runtime

    @property
    def ref(self) -> ActorRef[BounceMessage]:
        return self.feed.ref

    def stats(self) -> BounceStatistics:
        stats = self.ref.statistics()
        assert isinstance(stats, BounceStatistics)
        return stats

    async def settle(self) -> None:
        """Every message told so far is handled (no virtual time passes)."""
        await trio.testing.wait_all_tasks_blocked()

    async def inspect(self, tenant: str = TENANT, category: str = "reminder") -> KeyReport:
        report = await self.ref.ask(Inspect(tenant, category), timeout_s=1.0)
        assert isinstance(report, KeyReport)
        return report


@asynccontextmanager
async def running(
    store: Any,
    *,
    tenants: Sequence[str] = (),
    board: BounceBoard | None = None,
    detector: RatioDetector | None = None,
    metrics: Metrics | None = None,
    capacity: int = 1000,
    **overrides: Any,
) -> AsyncIterator[World]:
    """The tracker under a supervisor; ``init`` (the first load) is done on entry."""
    bus = EventBus()
    alerts: list[BounceAlert] = []
    bus.on(BounceAlert, alerts.append)  # type: ignore[arg-type]  # handler sees BounceAlerts only
    rules = _rules(**overrides)
    board = board if board is not None else BounceBoard(rules.throttle_rate_per_s)
    async with open_runtime(seed=1, events=bus) as rt:
        spec, feed = bounce_tracker_child(
            rules, store=store, board=board, capacity=capacity, overflow=Overflow.WAIT,
            shutdown_s=1.0, deadlines=rt.deadlines, tenants=tenants, detector=detector,
            events=bus, metrics=metrics,
        )  # fmt: skip
        sup = Supervisor("bounces", [spec], runtime=rt)
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            yield World(feed, board, alerts, sup, rt)
            nursery.cancel_scope.cancel()


async def test_below_min_volume_never_fires(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    async with running(store) as w:
        w.feed.record_sent(TENANT, "reminder", 49)
        for _ in range(49):
            w.feed.record_bounce(_bounce())
        await trio.sleep(600)
        report = await w.inspect()
        assert w.stats().sent == 49 and w.stats().hard_bounces == 49
    assert report.state is KeyState.QUIET
    assert w.board.throttle_rate_per_s(TENANT, "reminder") is None
    assert w.alerts == [] and store.calls == []
    assert report.ratio == 1.0  # measured, but not enough volume to act


async def test_crossing_throttles_and_pages_then_sustained_disables(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = MemoryStore()
    detector = make_detector("row3", **ROW3)
    assert isinstance(detector, RatioDetector)
    async with running(store, detector=detector) as w:
        t0 = trio.current_time()
        board, feed = w.board, w.feed
        feed.record_sent(TENANT, "reminder", 100)
        for _ in range(5):
            feed.record_bounce(_bounce())
        await w.settle()
        assert board.state(TENANT, "reminder") is KeyState.QUIET  # 0.05 is not above 0.05
        feed.record_bounce(_bounce(hard=False))  # soft: counted apart, not in the ratio
        await w.settle()
        assert board.state(TENANT, "reminder") is KeyState.QUIET
        feed.record_bounce(_bounce())  # 6 / 100: the throttle applies at this very bounce
        await w.settle()
        assert board.is_throttled(TENANT, "reminder")
        assert board.throttle_rate_per_s(TENANT, "reminder") == 1.0
        assert not board.is_throttled(TENANT, "other")
        assert not board.is_disabled(TENANT, "reminder")
        [page] = w.alerts
        assert (page.severity, page.action, page.row) == ("page", "throttled", 3)
        assert (page.tenant, page.category, page.channel) == (TENANT, "reminder", "email")
        assert (page.ratio, page.volume, page.at) == (0.06, 100, t0)
        assert (w.stats().hard_bounces, w.stats().soft_bounces) == (6, 1)
        assert detector.evaluate().firing  # the row's own detector saw it too
        # The writer ran at once, at the same instant.
        assert store.calls == [("block", TENANT, "reminder", "throttled")]
        assert trio.current_time() == t0

        await trio.sleep(299.9)  # t0 + 299.9
        assert board.state(TENANT, "reminder") is KeyState.THROTTLED
        await trio.sleep(0.1)  # t0 + 300.0: the tick that finds it held for disable_after_s
        await w.settle()
        assert board.state(TENANT, "reminder") is KeyState.DISABLED
        assert store.calls[-1] == ("block", TENANT, "reminder", "disabled")  # the same instant
        assert board.throttle_rate_per_s(TENANT, "reminder") == 0.0
        feed.record_sent(TENANT, "reminder", 10)  # a disabled key is not tracked again
        await w.settle()
        assert w.stats().ignored == 1
        assert (w.stats().throttled, w.stats().disabled, w.stats().state) == (
            1, 1, TrackerState.RUNNING,
        )  # fmt: skip
    assert [(a.action, a.severity, a.at - t0) for a in w.alerts] == [
        ("throttled", "page", 0.0),
        ("disabled", "page", 300.0),
    ]


async def test_clearing_lifts_the_throttle_but_never_a_disable(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = MemoryStore()
    store.hold = trio.Event()  # the first write waits: later decisions coalesce meanwhile
    async with running(store) as w:
        board, feed = w.board, w.feed
        feed.record_sent(TENANT, "reminder", 100)
        for _ in range(6):
            feed.record_bounce(_bounce())
        await w.settle()
        assert board.is_throttled(TENANT, "reminder")
        feed.record_sent(TENANT, "reminder", 150)  # 6 / 250 = 0.024: inside the band
        await w.settle()
        assert board.is_throttled(TENANT, "reminder")
        feed.record_sent(TENANT, "reminder", 50)  # 6 / 300 = 0.02: cleared
        await w.settle()
        assert not board.is_throttled(TENANT, "reminder")
        assert [a.action for a in w.alerts] == ["throttled", "lifted"]
        assert w.alerts[1].severity == "info"

        # Another category goes past the ceiling: disabled at once; no clean traffic lifts it.
        feed.record_sent(TENANT, "news", 100)
        for _ in range(50):
            feed.record_bounce(_bounce(category="news"))
        await w.settle()
        assert board.is_disabled(TENANT, "news")
        assert [a.action for a in w.alerts[2:]] == ["throttled", "disabled"]
        feed.record_sent(TENANT, "news", 100_000)
        assert w.stats().pending_writes == 2  # reminder's lift, news's disable
        await trio.sleep(3600)
        assert board.is_disabled(TENANT, "news")
        store.hold.set()
        await trio.sleep(1)
        assert w.stats().pending_writes == 0
    # The write in flight went out; then, coalesced per key, the last decision of each.
    assert store.calls[0] == ("block", TENANT, "reminder", "throttled")
    assert sorted(store.calls[1:]) == [
        ("block", TENANT, "news", "disabled"),
        ("lift", TENANT, "reminder", None),
    ]


async def test_failed_writes_are_retried_on_each_tick(autojump_clock: trio.abc.Clock) -> None:
    store = MemoryStore()
    store.fail = True
    async with running(store) as w:
        t0 = trio.current_time()
        w.feed.record_sent(TENANT, "reminder", 100)
        for _ in range(6):
            w.feed.record_bounce(_bounce())
        await trio.sleep(2.5)  # tried at t0, t0 + 1 and t0 + 2
        assert store.calls == [] and w.stats().write_failures == 3
        assert w.stats().state is TrackerState.DEGRADED
        store.fail = False
        await trio.sleep(0.5)  # t0 + 3: the next tick writes it
        await w.settle()
        assert store.calls == [("block", TENANT, "reminder", "throttled")]
        assert trio.current_time() == t0 + 3.0
        assert w.stats().state is TrackerState.RUNNING


async def test_keys_and_label_values_are_bounded(autojump_clock: trio.abc.Clock) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_label_values=2)
    async with running(MemoryStore(), max_keys=3, metrics=metrics) as w:
        feed = w.feed
        tenants = [f"7b0c1f0e-7a43-4f1e-9d55-2f4a2b8c000{i}" for i in range(6)]
        for tenant in tenants[:5]:
            feed.record_sent(tenant, "reminder", 10)
        await w.settle()
        assert (w.stats().tracked, w.stats().evicted) == (3, 2)
        # Throttled keys are never evicted: with every slot throttled a new key is not tracked.
        for tenant in tenants[2:5]:
            feed.record_sent(tenant, "reminder", 100)
            for _ in range(10):
                feed.record_bounce(_bounce(tenant))
            await w.settle()
            assert w.board.is_throttled(tenant, "reminder")
        feed.record_sent(tenants[5], "reminder", 100)
        await w.settle()
        assert (w.stats().tracked, w.stats().untracked) == (3, 1)
        assert all(w.board.is_throttled(t, "reminder") for t in tenants[2:5])

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


async def test_a_full_mailbox_drops_and_counts_never_blocking_the_sender(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = MemoryStore()
    async with running(store, capacity=4) as w:
        for _ in range(10):  # no checkpoint in between: the tracker cannot run
            w.feed.record_sent(TENANT, "reminder")
        # One went straight to the waiting tracker, four fill the mailbox, five are dropped.
        assert w.feed.dropped == 5 and w.ref.queued() == 4
        await w.settle()
        assert w.stats().sent == 5
    w.feed.record_sent(TENANT, "reminder")  # the tracker stopped for good: dropped too
    assert w.feed.dropped == 6


async def test_the_board_outlives_a_crash_and_the_new_incarnation_reloads(
    autojump_clock: trio.abc.Clock,
) -> None:
    store = MemoryStore()
    async with running(store) as w:  # no tenants configured: it learns them from traffic
        crashed: list[ActorCrashed] = []
        w.rt.events.on(ActorCrashed, crashed.append)  # type: ignore[arg-type]  # these only
        t0 = trio.current_time()
        w.feed.record_sent(TENANT, "reminder", 100)
        for _ in range(50):
            w.feed.record_bounce(_bounce())
        await w.settle()
        assert w.board.is_disabled(TENANT, "reminder")
        assert store.calls[-1] == ("block", TENANT, "reminder", "disabled")
        store.fail_load = True
        await trio.sleep(60)  # the reload tick at t0 + 60 fails: degraded, the board unchanged
        await w.settle()
        assert w.stats().state is TrackerState.DEGRADED and w.stats().reload_failures == 1
        assert w.board.is_disabled(TENANT, "reminder")
        store.fail_load = False
        store.crash_loads = 1
        await trio.sleep(60)  # t0 + 120: the reload task crashes the incarnation
        await w.settle()
        assert [(e.at - t0, e.child) for e in crashed] == [(120.0, "bounce_tracker")]
        # The new incarnation learnt the tenant from the board and loaded its block
        # before it counted as started; the board never showed anything else.
        assert store.loads[-1] == [TENANT]
        assert w.board.is_disabled(TENANT, "reminder")
        assert (await w.inspect()).state is KeyState.DISABLED
        assert w.stats().state is TrackerState.RUNNING and w.stats().sent == 0


def test_bad_input_is_refused_by_name() -> None:
    board = BounceBoard(1.0)
    send, _ = trio.open_memory_channel[Any](1)
    feed = BounceFeed(ActorRef("bounce_tracker", send, Overflow.WAIT, None), board)
    with pytest.raises(ValueError, match="names no tenant"):
        feed.record_bounce(Receipt(provider="smtp", state=DeliveryState.UNDELIVERABLE))
    with pytest.raises(ValueError, match="count must be >= 0"):
        feed.record_sent(TENANT, "reminder", -1)
    with pytest.raises(ConfigError, match="ceiling_ratio"):
        _rules(ceiling_ratio=0.01)
    with pytest.raises(ConfigError, match="clear_threshold"):
        _rules(clear_threshold=0.5)
    with pytest.raises(ConfigError, match="max_keys"):
        _rules(max_keys=0)
    with pytest.raises(ConfigError, match="kind='rate'"):
        _rules(kind="rate")
    with pytest.raises(ConfigError, match="window_s"):
        _rules(window_s=math.nan)
    with pytest.raises(ConfigError, match="overflow must be 'wait'"):
        bounce_tracker_child(
            _rules(), store=MemoryStore(), board=board, capacity=1,
            overflow=Overflow.DROP_NEWEST, shutdown_s=1.0,
        )  # fmt: skip


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
    async with running(DbBlockStore(db), **knobs) as w:
        w.feed.record_sent(a, "reminder", 100)
        w.feed.record_sent(b, "reminder", 100)
        w.feed.record_sent(b, "news", 100)
        for _ in range(6):
            w.feed.record_bounce(_bounce(a))
            w.feed.record_bounce(_bounce(b, "news"))
        await _until(db, a, "reminder", "throttled")
        await _until(db, a, "reminder", "disabled")
        await _until(db, b, "news", "disabled")
        assert await _state(db, b, "reminder") is None
    assert [x.action for x in w.alerts if x.tenant == a] == ["throttled", "disabled"]

    # A throttle written by an earlier incarnation, for the restart to find.
    await run(enable_async, admin_url, b, "email", "news")
    await run(block_async, db, b, "email", "news", BlockState.THROTTLED, "restored")

    async with running(DbBlockStore(db), tenants=[a, b], **knobs) as restarted:
        board = restarted.board
        # Loaded before it reported started.
        assert board.is_disabled(a, "reminder")
        assert board.is_throttled(b, "news")
        restarted.feed.record_sent(a, "reminder", 500)  # never re-enabled by clean traffic
        await trio.sleep(0.2)
        assert board.is_disabled(a, "reminder")
        # The operator's command: the running tracker sees it at its next reload.
        removed, _ = await run(enable_async, admin_url, a, "email", "reminder")
        assert removed is not None
        with trio.fail_after(5):
            while board.is_disabled(a, "reminder"):  # noqa: ASYNC110  # waits for a reload tick
                await trio.sleep(0.01)
        assert board.state(a, "reminder") is KeyState.QUIET
        assert (await restarted.inspect(a, "reminder")).state is KeyState.QUIET
        # The restored throttle lifts once enough clean volume shows the ratio cleared.
        restarted.feed.record_sent(b, "news", 60)
        with trio.fail_after(5):
            while await _state(db, b, "news") is not None:  # noqa: ASYNC110  # polls the database
                await trio.sleep(0.02)
        assert not board.is_throttled(b, "news")


def test_built_from_the_shipped_catalog_row() -> None:
    catalog = load_catalog(default_path("failures.toml"), metrics=METRICS, mitigations=MITIGATIONS)
    fields = engine_kwargs(catalog.row(3).detector)
    rules = BounceRules.of(**fields, **KNOBS)
    assert (rules.threshold, rules.clear_threshold, rules.min_volume, rules.window_s) == (
        0.05,
        0.02,
        50,
        900.0,
    )
