"""The bounce tracker: email bounce ratio per tenant and category (catalog row 3).

The email dispatcher tells it every send (:meth:`BounceTracker.record_sent`) and
bounce intake every bounce (:meth:`BounceTracker.record_bounce`). Only **hard**
bounces (``Receipt.permanent``: the address is gone, 5.x.x) count toward the
ratio; **soft** bounces (mailbox full, greylisting, 4.x.x) are counted apart in
``triage_email_soft_bounces_total`` and never throttle anything, because they
say nothing about a bad template or the sender's reputation.

Per key ``(tenant, category)`` the ratio is hard bounces / sends over a sliding
window of ``window_s`` seconds (``buckets`` buckets), decided only with at least
``min_volume`` sends in the window. Each key walks this machine::

    QUIET --ratio > threshold--> THROTTLED        throttle now (in memory + a
                                                  'throttled' row), page on-call
    QUIET/THROTTLED --ratio >= ceiling_ratio--> DISABLED
    THROTTLED --ratio > threshold for disable_after_s--> DISABLED
                                                  a 'disabled' row, page on-call
    THROTTLED --ratio <= clear_threshold--> QUIET lift the throttle
    DISABLED --operator: `triage category enable`--> (forgotten)

Between ``clear_threshold`` and ``threshold`` nothing changes (hysteresis);
without enough volume nothing changes either (silence is not recovery). The
sustain clock counts from the first evaluation above ``threshold`` and restarts
whenever an evaluation finds the ratio at or below it.

Decisions are made synchronously in ``record_*`` (the throttle applies at the
very bounce that crosses) and on a tick of ``evaluate_interval_s`` (the
sustain clock runs without traffic). Writing ``category_blocks`` is the run
loop's job: pending writes are coalesced per key (bounded by the tracked keys)
and retried on the next tick when the database is unreachable.

The dispatcher reads :meth:`is_disabled`, :meth:`is_throttled` and
:meth:`throttle_rate_per_s`. State survives a restart: :meth:`run` loads the
blocks of the tenants it knows before it reports started, and reloads every
``reload_interval_s`` (so an operator's ``enable`` is seen by a running daemon).
The database row stays the authority: a dispatcher may also check it in its
own unit of work (:func:`providers.db.categories.lookup_block_in`).

At most ``max_keys`` keys are tracked (least recently used first out; a
throttled key is never evicted, and a new key that finds every slot throttled
is not tracked and is counted in ``stats.untracked``). The counters
``triage_email_bounce_ratio_numerator_total`` / ``_denominator_total`` carry
``tenant`` and ``category`` labels, capped by the engine's label cap.
"""

from __future__ import annotations

import enum
import logging
import math
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Protocol

import trio
from prometheus_client import CollectorRegistry, Counter

from engine.clock import Clock
from engine.detectors import RatioDetector
from engine.errors import ConfigError, ProviderError
from engine.events import EventBus, Notice
from engine.metrics import OVERFLOW_LABEL, Metrics, families
from engine.supervisor import ChildSpec, Restart
from providers.bridge import run
from providers.channel import ChannelName, Receipt
from providers.db.categories import (
    BlockState,
    CategoryBlock,
    block_async,
    load_blocks_async,
    unblock_async,
)

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "ROW",
    "BlockStore",
    "BounceAlert",
    "BounceStats",
    "BounceTracker",
    "DbBlockStore",
    "KeyState",
]

log = logging.getLogger("triage.bounces")

ROW = 3

Key = tuple[str, str]  # (tenant, category)


class KeyState(enum.Enum):
    QUIET = "quiet"
    THROTTLED = "throttled"
    DISABLED = "disabled"


class BounceAlert(Notice, frozen=True):
    """Row 3 acted on one tenant's category: ``action`` is throttled, disabled or lifted.

    ``severity`` is ``page`` for throttled and disabled, ``info`` for lifted.
    """

    tenant: str
    channel: str
    category: str
    action: str
    ratio: float
    volume: int

    def alert_key(self) -> str:
        return f"bounce_spike:{self.tenant}:{self.channel}:{self.category}"

    @property
    def resolved(self) -> bool:
        return self.action == "lifted"


class BlockStore(Protocol):
    """Where blocks persist (the database in the daemon)."""

    async def block(self, tenant: str, category: str, state: BlockState, reason: str) -> None: ...

    async def lift(self, tenant: str, category: str) -> None: ...

    async def load(self, tenants: Sequence[str]) -> list[CategoryBlock]: ...


class DbBlockStore:
    """:class:`BlockStore` on ``category_blocks``: one bridge crossing per call."""

    def __init__(
        self, pool: asyncpg.Pool[asyncpg.Record], *, channel: ChannelName = ChannelName.EMAIL
    ) -> None:
        self.pool = pool
        self.channel = channel

    async def block(self, tenant: str, category: str, state: BlockState, reason: str) -> None:
        await run(
            block_async, self.pool, tenant, self.channel.value, category, state, reason,
            service="postgres",
        )  # fmt: skip

    async def lift(self, tenant: str, category: str) -> None:
        await run(
            unblock_async, self.pool, tenant, self.channel.value, category, service="postgres"
        )

    async def load(self, tenants: Sequence[str]) -> list[CategoryBlock]:
        blocks = await run(load_blocks_async, self.pool, list(tenants), service="postgres")
        return [b for b in blocks if b.channel == self.channel.value]


@dataclass
class BounceStats:
    sent: int = 0
    hard_bounces: int = 0
    soft_bounces: int = 0
    throttled: int = 0  # QUIET -> THROTTLED transitions
    disabled: int = 0  # -> DISABLED transitions
    lifted: int = 0  # THROTTLED -> QUIET transitions
    evicted: int = 0  # quiet keys forgotten to stay within max_keys
    untracked: int = 0  # observations of new keys refused: every slot throttled
    ignored: int = 0  # sends or bounces of a disabled key
    write_failures: int = 0  # block writes that failed and wait for the next tick


class _Key:
    __slots__ = ("above_since", "detector", "since", "state", "value", "volume")

    def __init__(self, detector: RatioDetector) -> None:
        self.detector = detector
        self.state = KeyState.QUIET
        self.since: float | None = None  # when it entered its current state
        self.above_since: float | None = None
        self.value = math.nan
        self.volume = 0


class _BounceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["tenant", "category"]
        self.bounced = Counter(
            "triage_email_bounce_ratio_numerator",
            "Hard email bounces, per tenant and category",
            labels,
            registry=registry,
        )
        self.sent = Counter(
            "triage_email_bounce_ratio_denominator",
            "Emails sent, per tenant and category",
            labels,
            registry=registry,
        )
        self.soft = Counter(
            "triage_email_soft_bounces",
            "Soft (temporary) email bounces, not counted in the bounce ratio",
            labels,
            registry=registry,
        )
        self.actions = Counter(
            "triage_email_category_actions",
            "Row-3 mitigations taken on a tenant's category (throttled, disabled, lifted)",
            ["action"],
            registry=registry,
        )


def _check(name: str, value: float, *, positive: bool = True) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ConfigError(
            f"bounce tracker: {name} must be {'> 0' if positive else '>= 0'}, got {value!r}"
        )
    return value


class BounceTracker:
    """Bounce ratios per (tenant, category) and row 3's mitigations; see the module docstring."""

    name = "bounce_tracker"

    def __init__(
        self,
        *,
        store: BlockStore,
        threshold: float,
        clear_threshold: float | None,
        window_s: float,
        min_volume: int,
        buckets: int,
        disable_after_s: float,
        ceiling_ratio: float,
        throttle_rate_per_s: float,
        max_keys: int,
        evaluate_interval_s: float,
        reload_interval_s: float,
        tenants: Iterable[str] = (),
        channel: ChannelName = ChannelName.EMAIL,
        severity: str = "page",
        detector: RatioDetector | None = None,
        events: EventBus | None = None,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        kind: str | None = None,
        metric: str | None = None,
        op: str = "gt",
        for_s: float = 0.0,
        baseline_alpha: float | None = None,
    ) -> None:
        """``threshold`` ... ``buckets`` are the row's ``DetectorConfig`` fields, so
        ``BounceTracker(**engine_kwargs(row.detector), ...)`` works: ``kind`` must be
        ``ratio`` and ``op`` ``gt``; ``metric``, ``for_s`` and ``baseline_alpha`` are
        accepted and not used (each key decides at once; the sustain rule is
        ``disable_after_s``)."""
        if kind not in (None, "ratio") or op != "gt":
            raise ConfigError(
                f"bounce tracker: needs a ratio detector with op 'gt', got kind={kind!r} op={op!r}"
            )
        self.threshold = _check("threshold", threshold)
        self.clear_threshold = (
            self.threshold
            if clear_threshold is None
            else _check("clear_threshold", clear_threshold, positive=False)
        )
        if self.clear_threshold > self.threshold:
            raise ConfigError(
                f"bounce tracker: clear_threshold ({self.clear_threshold}) must not exceed"
                f" threshold ({self.threshold})"
            )
        self.ceiling_ratio = _check("ceiling_ratio", ceiling_ratio)
        if self.ceiling_ratio <= self.threshold:
            raise ConfigError(
                f"bounce tracker: ceiling_ratio ({self.ceiling_ratio}) must exceed"
                f" threshold ({self.threshold})"
            )
        self.window_s = _check("window_s", window_s)
        self.disable_after_s = _check("disable_after_s", disable_after_s)
        self.rate_per_s = _check("throttle_rate_per_s", throttle_rate_per_s)
        self.evaluate_interval_s = _check("evaluate_interval_s", evaluate_interval_s)
        self.reload_interval_s = _check("reload_interval_s", reload_interval_s)
        if int(max_keys) != max_keys or max_keys < 1:
            raise ConfigError(
                f"bounce tracker: max_keys must be a whole number >= 1, got {max_keys!r}"
            )
        self.max_keys = int(max_keys)
        self.min_volume = int(min_volume)
        self.buckets = int(buckets)
        self.store = store
        self.channel = channel
        self.severity = severity
        self.detector = detector
        self.events = events
        self.clock = clock if clock is not None else Clock()
        self._labels = metrics.label if metrics is not None else None
        self._metrics = families(metrics.registry, _BounceMetrics) if metrics is not None else None
        self._new_window: Callable[[str], RatioDetector] = partial(
            _key_window,
            window_s=self.window_s,
            buckets=self.buckets,
            min_volume=self.min_volume,
        )
        # Validate the window settings now, not at the first send.
        self._new_window("bounce-tracker-check")
        self.stats = BounceStats()
        self._keys: OrderedDict[Key, _Key] = OrderedDict()
        self._disabled: dict[Key, str] = {}  # key -> reason
        self._tenants: set[str] = {str(t) for t in tenants}
        self._pending: dict[Key, tuple[KeyState, str]] = {}
        self._wake = trio.Event()

    # -- what the dispatcher reads ---------------------------------------------------

    def is_disabled(self, tenant: str, category: str) -> bool:
        return (tenant, category) in self._disabled

    def is_throttled(self, tenant: str, category: str) -> bool:
        key = self._keys.get((tenant, category))
        return key is not None and key.state is KeyState.THROTTLED

    def throttle_rate_per_s(self, tenant: str, category: str) -> float | None:
        """Sends per second allowed: None unthrottled, 0.0 disabled."""
        if self.is_disabled(tenant, category):
            return 0.0
        return self.rate_per_s if self.is_throttled(tenant, category) else None

    def state(self, tenant: str, category: str) -> KeyState:
        if self.is_disabled(tenant, category):
            return KeyState.DISABLED
        key = self._keys.get((tenant, category))
        return KeyState.QUIET if key is None else key.state

    def ratio(self, tenant: str, category: str) -> float:
        """The ratio at the last evaluation of the key (NaN: untracked or no sends)."""
        key = self._keys.get((tenant, category))
        return math.nan if key is None else key.value

    @property
    def tracked(self) -> int:
        return len(self._keys)

    # -- feeding (synchronous, cheap) ------------------------------------------------

    def record_sent(self, tenant: str, category: str, count: int = 1) -> None:
        """``count`` emails of ``category`` were handed to the provider for ``tenant``."""
        if count < 0:
            raise ValueError(f"bounce tracker: count must be >= 0, got {count}")
        self._observe(str(tenant), category, 0, count)
        self.stats.sent += count
        if self._metrics is not None:
            self._metrics.sent.labels(*self._label_values(tenant, category)).inc(count)
        if self.detector is not None:
            self.detector.observe_ratio(0, count)

    def record_bounce(
        self, receipt: Receipt, *, tenant: str | None = None, category: str | None = None
    ) -> None:
        """One bounce. Tenant and category come from the receipt unless given.

        A hard bounce (``permanent``) counts toward the ratio; a soft one only in
        its own counter. A receipt that names no tenant is refused (ValueError); one
        without a category counts for category ``"default"`` (the database default).
        """
        tenant = tenant if tenant is not None else receipt.tenant_id
        if not tenant:
            raise ValueError(
                f"bounce receipt from {receipt.provider!r} names no tenant"
                f" (client_ref={receipt.client_ref!r})"
            )
        category = category if category is not None else (receipt.category or "default")
        if not receipt.permanent:
            self.stats.soft_bounces += 1
            if self._metrics is not None:
                self._metrics.soft.labels(*self._label_values(tenant, category)).inc()
            return
        self._observe(tenant, category, 1, 0)
        self.stats.hard_bounces += 1
        if self._metrics is not None:
            self._metrics.bounced.labels(*self._label_values(tenant, category)).inc()
        if self.detector is not None:
            self.detector.observe_ratio(1, 0)

    def _label_values(self, tenant: str, category: str) -> tuple[str, str]:
        labels = self._labels
        if labels is None:  # pragma: no cover - only called with metrics
            return OVERFLOW_LABEL, OVERFLOW_LABEL
        return labels("bounce_tenant", tenant), labels("bounce_category", category)

    def _observe(self, tenant: str, category: str, bounced: int, sent: int) -> None:
        k = (tenant, category)
        self._tenants.add(tenant)
        if k in self._disabled:
            self.stats.ignored += 1
            return
        key = self._keys.get(k)
        if key is None:
            key = self._admit(k)
            if key is None:
                self.stats.untracked += 1
                return
        else:
            self._keys.move_to_end(k)
        key.detector.observe_ratio(bounced, sent)
        self._decide(k, key, trio.current_time())

    def _admit(self, k: Key) -> _Key | None:
        if len(self._keys) >= self.max_keys:
            victim = next((kk for kk, v in self._keys.items() if v.state is KeyState.QUIET), None)
            if victim is None:
                return None
            del self._keys[victim]
            self.stats.evicted += 1
        key = self._keys[k] = _Key(self._new_window(f"bounce:{k[0]}:{k[1]}"))
        return key

    # -- deciding ----------------------------------------------------------------------

    def evaluate(self) -> None:
        """Re-decide every throttled key at the current time (the sustain clock)."""
        now = trio.current_time()
        for k, key in list(self._keys.items()):
            if key.state is KeyState.THROTTLED:
                self._decide(k, key, now)

    def _decide(self, k: Key, key: _Key, now: float) -> None:
        state = key.detector.evaluate()
        key.value, key.volume = state.value, key.detector.volume
        if not state.evaluable:
            return
        value = state.value
        if value > self.threshold:
            if key.above_since is None:
                key.above_since = now
        else:
            key.above_since = None
        if key.state is KeyState.QUIET:
            if value >= self.ceiling_ratio:
                self._disable(
                    k, key, now, f"bounce ratio {value:.3f} >= ceiling {self.ceiling_ratio}"
                )
            elif value > self.threshold:
                self._throttle(k, key, now, value)
        elif key.state is KeyState.THROTTLED:
            if value <= self.clear_threshold:
                self._lift(k, key, now, value)
            elif value >= self.ceiling_ratio:
                self._disable(
                    k, key, now, f"bounce ratio {value:.3f} >= ceiling {self.ceiling_ratio}"
                )
            elif key.above_since is not None and now - key.above_since >= self.disable_after_s:
                self._disable(
                    k, key, now,
                    f"bounce ratio above {self.threshold} for {self.disable_after_s:g}s"
                    f" (now {value:.3f})",
                )  # fmt: skip

    def _throttle(self, k: Key, key: _Key, now: float, value: float) -> None:
        key.state, key.since = KeyState.THROTTLED, now
        self.stats.throttled += 1
        reason = f"bounce ratio {value:.3f} > {self.threshold} over {key.volume} sends"
        self._persist(k, KeyState.THROTTLED, reason)
        self._announce(k, key, now, "throttled", self.severity)

    def _disable(self, k: Key, key: _Key, now: float, reason: str) -> None:
        del self._keys[k]
        key.state, key.since = KeyState.DISABLED, now
        self._disabled[k] = reason
        self.stats.disabled += 1
        self._persist(k, KeyState.DISABLED, reason)
        self._announce(k, key, now, "disabled", self.severity)

    def _lift(self, k: Key, key: _Key, now: float, value: float) -> None:
        key.state, key.since, key.above_since = KeyState.QUIET, now, None
        self.stats.lifted += 1
        self._persist(k, KeyState.QUIET, f"bounce ratio {value:.3f} <= {self.clear_threshold}")
        self._announce(k, key, now, "lifted", "info")

    def _persist(self, k: Key, state: KeyState, reason: str) -> None:
        pending = self._pending.get(k)
        if pending is not None and pending[0] is KeyState.DISABLED:
            return  # a disable is never overtaken by an older-decided lift or throttle
        self._pending[k] = (state, reason)
        self._wake.set()

    def _announce(self, k: Key, key: _Key, now: float, action: str, severity: str) -> None:
        tenant, category = k
        log_level = logging.WARNING if severity != "info" else logging.INFO
        log.log(
            log_level,
            "bounce spike: %s %s for tenant %s (ratio %.3f over %d sends)",
            self.channel.value, f"category {category!r} {action}", tenant, key.value, key.volume,
        )  # fmt: skip
        if self._metrics is not None:
            self._metrics.actions.labels(action).inc()
        if self.events is not None:
            self.events.emit(
                BounceAlert(
                    at=now,
                    wall=self.clock.wall(),
                    severity=severity,
                    row=ROW,
                    tenant=tenant,
                    channel=self.channel.value,
                    category=category,
                    action=action,
                    ratio=key.value,
                    volume=key.volume,
                )
            )

    # -- persistence ---------------------------------------------------------------------

    async def flush(self) -> int:
        """Write the pending block changes; returns how many were written.

        A write that fails with a ProviderError stays pending for the next try.
        """
        written = 0
        for k, (state, reason) in list(self._pending.items()):
            tenant, category = k
            try:
                if state is KeyState.QUIET:
                    await self.store.lift(tenant, category)
                else:
                    await self.store.block(tenant, category, BlockState(state.value), reason)
            except ProviderError as exc:
                self.stats.write_failures += 1
                log.warning("bounce tracker: block of %s/%s not written: %s", tenant, category, exc)
                return written
            if self._pending.get(k) == (state, reason):
                del self._pending[k]
            written += 1
        return written

    async def reload(self) -> None:
        """Make the in-memory blocks match the database for every known tenant."""
        tenants = sorted(self._tenants)
        if not tenants:
            return
        blocks = await self.store.load(tenants)
        now = trio.current_time()
        disabled = {(b.tenant_id, b.category): b for b in blocks if b.state is BlockState.DISABLED}
        for k in list(self._disabled):
            if k not in disabled and self._pending.get(k, (None,))[0] is not KeyState.DISABLED:
                del self._disabled[k]  # an operator re-enabled it: start from a clean window
                log.info("bounce tracker: %s/%s re-enabled by an operator", *k)
        for k, block in disabled.items():
            if k not in self._disabled:
                self._keys.pop(k, None)
                self._disabled[k] = block.reason
        for block in blocks:
            k = (block.tenant_id, block.category)
            if (
                block.state is BlockState.THROTTLED
                and k not in self._keys
                and k not in self._pending
            ):
                key = self._admit(k)
                if key is not None:  # restored: lifts once enough volume shows it cleared
                    key.state, key.since = KeyState.THROTTLED, now

    # -- the child -------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load the blocks, report started, then evaluate, flush and reload until cancelled."""
        await self.reload()
        task_status.started()
        next_reload = trio.current_time() + self.reload_interval_s
        while True:
            with trio.move_on_after(self.evaluate_interval_s):
                await self._wake.wait()
            self._wake = trio.Event()
            self.evaluate()
            await self.flush()
            if trio.current_time() >= next_reload:
                next_reload = trio.current_time() + self.reload_interval_s
                try:
                    await self.reload()
                except ProviderError as exc:
                    log.warning("bounce tracker: blocks not reloaded: %s", exc)

    def child_spec(self, *, shutdown_s: float = 5.0, restart: Restart | None = None) -> ChildSpec:
        """A supervisor child running :meth:`run`."""
        return ChildSpec.of(self, shutdown_s=shutdown_s, restart=restart)


def _key_window(
    name: str,
    *,
    window_s: float,
    buckets: int,
    min_volume: int,
) -> RatioDetector:
    """One key's sliding window: a RatioDetector used as a calculator only.

    The tracker reads its value and volume and decides itself, so the detector's
    own threshold is set where it can never fire (no events, no log lines per key).
    """
    return RatioDetector(
        name,
        metric="triage_email_bounce_ratio",
        threshold=sys.float_info.max,
        window_s=window_s,
        buckets=buckets,
        min_volume=min_volume,
    )
