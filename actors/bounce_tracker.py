"""The bounce tracker: email bounce ratio per tenant and category (catalog row 3).

:class:`BounceTracker` is an actor. The email path tells it every send and
bounce intake every bounce, through a :class:`BounceFeed` (``record_sent``,
``record_bounce``: :class:`Sent` and :class:`Bounced` messages). Only **hard**
bounces (``Receipt.permanent``: the address is gone, 5.x.x) count toward the
ratio; **soft** bounces (mailbox full, greylisting, 4.x.x) are counted apart in
``triage_email_soft_bounces_total`` and never throttle anything, because they
say nothing about a bad template or the sender's reputation.

Per key ``(tenant, category)`` the ratio is hard bounces / sends over a sliding
window of ``window_s`` seconds (``buckets`` buckets), decided only with at least
``min_volume`` sends in the window. Each key walks this machine::

    QUIET --ratio > threshold--> THROTTLED        throttle now (on the board + a
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

The actor itself is in one of :class:`TrackerState` (a :class:`StateLog`):
``RUNNING``, or ``DEGRADED`` while block writes or reloads fail.

Messages (one ``match`` in :meth:`BounceTracker.handle`):

==================  =========================================================
``Sent``/``Bounced``  from the feed; decided at once (the throttle applies at
                    the very bounce that crosses)
``Evaluate``        timer, every ``evaluate_interval_s``: the sustain clock runs
                    without traffic; failed block writes are retried
``Reload``          timer, every ``reload_interval_s``: re-read the blocks of
                    every known tenant (an operator's ``enable`` is seen)
``Loaded``          the reload task's answer
``Flushed``         the block-writer task's answer
``Inspect``         an ask: one key's :class:`KeyReport` (state, ratio, volume)
==================  =========================================================

Writing ``category_blocks`` is a task of the actor (``start_soon``), one at a
time: pending writes are coalesced per key while one is in flight (bounded by
the tracked keys) and retried on the next ``Evaluate`` when the database is
unreachable. Reloads are a task too, so the mailbox keeps moving while the
database is slow.

**Who reads the decisions.** The actor writes a :class:`BounceBoard` (passed in
by the wiring, like the alert sink's ``ActiveAlerts``); readers hold the board,
never the actor: ``is_disabled``, ``is_throttled``, ``throttle_rate_per_s`` are
one dict lookup each (a per-send check that costs well under a microsecond and
never waits behind a tracker busy with a burst of bounces -- an ``ask`` would
cost a mailbox hop and a scheduler round trip per send). The board outlives
the actor's incarnations, as the mailbox does. The database row stays the
authority: the dispatcher checks it in its own unit of work
(:func:`providers.db.categories.lookup_block_in`).

**Feeding never blocks a send.** The feed uses ``tell_nowait``: when the
mailbox is full (a burst larger than ``[mailboxes.bounces] capacity``) the
observation is dropped and counted in :attr:`BounceFeed.dropped`. Losing a
count under overload is acceptable here: the ratio is an estimate over a
window of thousands of sends, a lost send or bounce moves it by one part in
the window's volume for ``window_s`` at most, and a mailbox that full already
shows in ``triage_mailbox_depth``. The mailbox itself is ``wait``: the actor's
own tasks (the writer, the reloader) wait for room to report, so no answer of
theirs is ever lost.

State survives a restart: :meth:`BounceTracker.init` loads the blocks of the
tenants it knows (the configured ones and every tenant on the board) before it
counts as started. The sliding windows start empty in a new incarnation.

At most ``max_keys`` keys are tracked (least recently used first out; a
throttled key is never evicted, and a new key that finds every slot throttled
is not tracked and is counted in ``untracked``). The counters
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
from functools import partial
from typing import TYPE_CHECKING, Protocol

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter

from engine.actor import Actor, ActorRef, Overflow, Timer, actor_child
from engine.clock import Clock
from engine.detectors import RatioDetector
from engine.errors import ActorStopped, ConfigError, MailboxFull, ProviderError
from engine.events import EventBus, Notice
from engine.metrics import OVERFLOW_LABEL, Metrics, families
from engine.statelog import StateLog
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

    from engine.deadlines import Deadlines

__all__ = [
    "ROW",
    "BlockStore",
    "BounceAlert",
    "BounceBoard",
    "BounceFeed",
    "BounceMessage",
    "BounceRules",
    "BounceStatistics",
    "BounceTracker",
    "Bounced",
    "DbBlockStore",
    "Evaluate",
    "Flushed",
    "Inspect",
    "KeyReport",
    "KeyState",
    "Loaded",
    "Reload",
    "Sent",
    "TrackerState",
    "bounce_tracker_child",
]

log = logging.getLogger("triage.bounces")

ROW = 3

Key = tuple[str, str]  # (tenant, category)


class KeyState(enum.Enum):
    QUIET = "quiet"
    THROTTLED = "throttled"
    DISABLED = "disabled"


class TrackerState(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"  # block writes or reloads fail; retried every tick


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


# -- messages --------------------------------------------------------------------------


class Sent(msgspec.Struct, frozen=True, tag=True):
    """``count`` emails of ``category`` were handed to the provider for ``tenant``."""

    tenant: str
    category: str
    count: int = 1


class Bounced(msgspec.Struct, frozen=True, tag=True):
    """One bounce; ``hard`` (permanent) ones count toward the ratio."""

    tenant: str
    category: str
    hard: bool


class Evaluate(msgspec.Struct, frozen=True, tag=True):
    """Timer: re-decide every throttled key now (the sustain clock); retry failed writes."""


class Reload(msgspec.Struct, frozen=True, tag=True):
    """Timer: re-read the blocks of every known tenant."""


class Loaded(msgspec.Struct, frozen=True, tag=True):
    """The reload task's answer: the blocks, or why they could not be read."""

    blocks: tuple[CategoryBlock, ...] = ()
    error: str | None = None


class Flushed(msgspec.Struct, frozen=True, tag=True):
    """The writer task's answer: what it wrote, and the error that stopped it (if any)."""

    written: tuple[tuple[str, str, KeyState, str], ...]
    error: str | None = None


class Inspect(msgspec.Struct, frozen=True, tag=True):
    """Ask: one key's :class:`KeyReport`."""

    tenant: str
    category: str


BounceMessage = Sent | Bounced | Evaluate | Reload | Loaded | Flushed | Inspect


class KeyReport(msgspec.Struct, frozen=True):
    """One key as the tracker sees it: the ratio at its last evaluation (NaN: none)."""

    state: KeyState
    ratio: float
    volume: int


class BounceStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """The running incarnation's numbers (``ActorRef.statistics()``)."""

    state: TrackerState
    sent: int
    hard_bounces: int
    soft_bounces: int
    throttled: int  # QUIET -> THROTTLED transitions
    disabled: int  # -> DISABLED transitions
    lifted: int  # THROTTLED -> QUIET transitions
    evicted: int  # quiet keys forgotten to stay within max_keys
    untracked: int  # observations of new keys refused: every slot throttled
    ignored: int  # sends or bounces of a disabled key
    write_failures: int  # block writes that failed and wait for the next tick
    reload_failures: int
    tracked: int
    pending_writes: int


# -- what readers hold -------------------------------------------------------------------


class BounceBoard:
    """The tracker's decisions, for readers: written by the actor only.

    Every lookup is one dict access, cheap enough for a check per send. Created
    once by the wiring and passed to every incarnation, so it outlives restarts.
    """

    __slots__ = ("_states", "rate_per_s")

    def __init__(self, rate_per_s: float) -> None:
        self.rate_per_s = rate_per_s
        self._states: dict[Key, KeyState] = {}  # throttled and disabled keys only

    def state(self, tenant: str, category: str) -> KeyState:
        return self._states.get((tenant, category), KeyState.QUIET)

    def is_disabled(self, tenant: str, category: str) -> bool:
        return self._states.get((tenant, category)) is KeyState.DISABLED

    def is_throttled(self, tenant: str, category: str) -> bool:
        return self._states.get((tenant, category)) is KeyState.THROTTLED

    def throttle_rate_per_s(self, tenant: str, category: str) -> float | None:
        """Sends per second allowed: None unthrottled, 0.0 disabled."""
        state = self._states.get((tenant, category))
        if state is None:
            return None
        return 0.0 if state is KeyState.DISABLED else self.rate_per_s

    def tenants(self) -> set[str]:
        return {tenant for tenant, _ in self._states}

    def snapshot(self) -> dict[Key, KeyState]:
        return dict(self._states)

    def _set(self, key: Key, state: KeyState) -> None:
        if state is KeyState.QUIET:
            self._states.pop(key, None)
        else:
            self._states[key] = state

    def _replace(self, states: dict[Key, KeyState]) -> None:
        self._states = {k: s for k, s in states.items() if s is not KeyState.QUIET}


class BounceFeed:
    """What the email path holds: tells the tracker every send and bounce, never blocking.

    A full mailbox (or a tracker that stopped for good) drops the observation and
    counts it in :attr:`dropped` (see the module docstring for why that is fine).
    """

    __slots__ = ("board", "dropped", "ref")

    def __init__(self, ref: ActorRef[BounceMessage], board: BounceBoard) -> None:
        self.ref = ref
        self.board = board
        self.dropped = 0

    def record_sent(self, tenant: str, category: str, count: int = 1) -> None:
        """``count`` emails of ``category`` were handed to the provider for ``tenant``."""
        if count < 0:
            raise ValueError(f"bounce tracker: count must be >= 0, got {count}")
        self._tell(Sent(str(tenant), category, count))

    def record_bounce(
        self, receipt: Receipt, *, tenant: str | None = None, category: str | None = None
    ) -> None:
        """One bounce. Tenant and category come from the receipt unless given.

        A receipt that names no tenant is refused (ValueError); one without a
        category counts for category ``"default"`` (the database default).
        """
        tenant = tenant if tenant is not None else receipt.tenant_id
        if not tenant:
            raise ValueError(
                f"bounce receipt from {receipt.provider!r} names no tenant"
                f" (client_ref={receipt.client_ref!r})"
            )
        category = category if category is not None else (receipt.category or "default")
        self._tell(Bounced(tenant, category, receipt.permanent))

    def _tell(self, message: BounceMessage) -> None:
        try:
            self.ref.tell_nowait(message)
        except (MailboxFull, ActorStopped):
            self.dropped += 1


# -- persistence -------------------------------------------------------------------------


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


# -- the rules ---------------------------------------------------------------------------


def _check(name: str, value: float, *, positive: bool = True) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ConfigError(
            f"bounce tracker: {name} must be {'> 0' if positive else '>= 0'}, got {value!r}"
        )
    return value


class BounceRules(msgspec.Struct, frozen=True, kw_only=True):
    """Row 3's numbers, checked once (:meth:`of`) and shared by every incarnation."""

    threshold: float
    clear_threshold: float
    ceiling_ratio: float
    window_s: float
    buckets: int
    min_volume: int
    disable_after_s: float
    throttle_rate_per_s: float
    max_keys: int
    evaluate_interval_s: float
    reload_interval_s: float

    @classmethod
    def of(
        cls,
        *,
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
        kind: str | None = None,
        metric: str | None = None,
        op: str = "gt",
        for_s: float = 0.0,
        baseline_alpha: float | None = None,
    ) -> BounceRules:
        """``threshold`` ... ``buckets`` are the row's ``DetectorConfig`` fields, so
        ``BounceRules.of(**engine_kwargs(row.detector), ...)`` works: ``kind`` must be
        ``ratio`` and ``op`` ``gt``; ``metric``, ``for_s`` and ``baseline_alpha`` are
        accepted and not used (each key decides at once; the sustain rule is
        ``disable_after_s``)."""
        if kind not in (None, "ratio") or op != "gt":
            raise ConfigError(
                f"bounce tracker: needs a ratio detector with op 'gt', got kind={kind!r} op={op!r}"
            )
        high = _check("threshold", threshold)
        low = (
            high
            if clear_threshold is None
            else _check("clear_threshold", clear_threshold, positive=False)
        )
        if low > high:
            raise ConfigError(
                f"bounce tracker: clear_threshold ({low}) must not exceed threshold ({high})"
            )
        ceiling = _check("ceiling_ratio", ceiling_ratio)
        if ceiling <= high:
            raise ConfigError(
                f"bounce tracker: ceiling_ratio ({ceiling}) must exceed threshold ({high})"
            )
        if int(max_keys) != max_keys or max_keys < 1:
            raise ConfigError(
                f"bounce tracker: max_keys must be a whole number >= 1, got {max_keys!r}"
            )
        rules = cls(
            threshold=high,
            clear_threshold=low,
            ceiling_ratio=ceiling,
            window_s=_check("window_s", window_s),
            buckets=int(buckets),
            min_volume=int(min_volume),
            disable_after_s=_check("disable_after_s", disable_after_s),
            throttle_rate_per_s=_check("throttle_rate_per_s", throttle_rate_per_s),
            max_keys=int(max_keys),
            evaluate_interval_s=_check("evaluate_interval_s", evaluate_interval_s),
            reload_interval_s=_check("reload_interval_s", reload_interval_s),
        )
        rules.window("bounce-tracker-check")  # the window settings fail now, not at the first send
        return rules

    def window(self, name: str) -> RatioDetector:
        """One key's sliding window: a RatioDetector used as a calculator only.

        The tracker reads its value and volume and decides itself, so the
        detector's own threshold is set where it can never fire (no events, no
        log lines per key).
        """
        return RatioDetector(
            name,
            metric="triage_email_bounce_ratio",
            threshold=sys.float_info.max,
            window_s=self.window_s,
            buckets=self.buckets,
            min_volume=self.min_volume,
        )


# -- the actor ---------------------------------------------------------------------------


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


_EVALUATE = Evaluate()
_RELOAD = Reload()


class BounceTracker(Actor[BounceMessage]):
    """Bounce ratios per (tenant, category) and row 3's mitigations; see the module docstring."""

    name = "bounce_tracker"
    uses_tasks = True

    def __init__(
        self,
        rules: BounceRules,
        *,
        store: BlockStore,
        board: BounceBoard,
        tenants: Iterable[str] = (),
        channel: ChannelName = ChannelName.EMAIL,
        severity: str = "page",
        detector: RatioDetector | None = None,
        events: EventBus | None = None,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.rules = rules
        self.store = store
        self.board = board
        self.channel = channel
        self.severity = severity
        self.detector = detector
        self.events = events
        self.clock = clock if clock is not None else Clock()
        self._labels = metrics.label if metrics is not None else None
        self._metrics = families(metrics.registry, _BounceMetrics) if metrics is not None else None
        self._new_window: Callable[[str], RatioDetector] = rules.window
        self.states = StateLog(self.name, TrackerState.STARTING, log, warn={TrackerState.DEGRADED})
        self._keys: OrderedDict[Key, _Key] = OrderedDict()
        self._disabled: dict[Key, str] = {}  # key -> reason
        self._tenants: set[str] = {str(t) for t in tenants} | board.tenants()
        self._pending: dict[Key, tuple[KeyState, str]] = {}
        self._flushing = False
        self._loading = False
        self._write_error: str | None = None
        self._load_error: str | None = None
        self._counts = dict.fromkeys(
            ("sent", "hard", "soft", "throttled", "disabled", "lifted", "evicted", "untracked",
             "ignored", "write_failures", "reload_failures"),
            0,
        )  # fmt: skip

    # -- the actor's life ------------------------------------------------------------------

    async def init(self) -> None:
        """Load the blocks of every known tenant before counting as started."""
        if self._tenants:
            self._apply_blocks(await self.store.load(sorted(self._tenants)))
        self._publish_all()
        self.states.enter(TrackerState.RUNNING, "blocks loaded", at=trio.current_time())

    def timers(self) -> list[Timer]:
        return [
            Timer(self.rules.evaluate_interval_s, _EVALUATE),
            Timer(self.rules.reload_interval_s, _RELOAD),
        ]

    def statistics(self) -> BounceStatistics:
        c = self._counts
        return BounceStatistics(
            state=self.states.state,
            sent=c["sent"],
            hard_bounces=c["hard"],
            soft_bounces=c["soft"],
            throttled=c["throttled"],
            disabled=c["disabled"],
            lifted=c["lifted"],
            evicted=c["evicted"],
            untracked=c["untracked"],
            ignored=c["ignored"],
            write_failures=c["write_failures"],
            reload_failures=c["reload_failures"],
            tracked=len(self._keys),
            pending_writes=len(self._pending),
        )

    async def handle(self, message: BounceMessage) -> object:
        match message:
            case Sent(tenant=tenant, category=category, count=count):
                self._observe(tenant, category, 0, count)
                self._counts["sent"] += count
                if self._metrics is not None:
                    self._metrics.sent.labels(*self._label_values(tenant, category)).inc(count)
                if self.detector is not None:
                    self.detector.observe_ratio(0, count)
            case Bounced(tenant=tenant, category=category, hard=False):
                self._tenants.add(tenant)
                self._counts["soft"] += 1
                if self._metrics is not None:
                    self._metrics.soft.labels(*self._label_values(tenant, category)).inc()
            case Bounced(tenant=tenant, category=category):
                self._observe(tenant, category, 1, 0)
                self._counts["hard"] += 1
                if self._metrics is not None:
                    self._metrics.bounced.labels(*self._label_values(tenant, category)).inc()
                if self.detector is not None:
                    self.detector.observe_ratio(1, 0)
            case Evaluate():
                now = trio.current_time()
                for k, key in list(self._keys.items()):
                    if key.state is KeyState.THROTTLED:
                        self._decide(k, key, now)
                self._flush_soon(retry=True)
            case Reload():
                if not self._loading and self._tenants:
                    self._loading = True
                    self.start_soon(self._load, tuple(sorted(self._tenants)))
            case Loaded(blocks=blocks, error=error):
                self._loading = False
                if error is not None:
                    self._counts["reload_failures"] += 1
                    self._load_error = error
                    log.warning("bounce tracker: blocks not reloaded: %s", error)
                else:
                    self._load_error = None
                    self._apply_blocks(blocks)
                    self._publish_all()
                self._health()
            case Flushed(written=written, error=error):
                self._flushing = False
                for tenant, category, state, reason in written:
                    if self._pending.get((tenant, category)) == (state, reason):
                        del self._pending[tenant, category]
                if error is not None:
                    self._counts["write_failures"] += 1
                    self._write_error = error
                    log.warning("bounce tracker: block not written: %s", error)
                else:
                    self._write_error = None
                    self._flush_soon(retry=False)
                self._health()
            case Inspect(tenant=tenant, category=category):
                k = (tenant, category)
                if k in self._disabled:
                    return KeyReport(KeyState.DISABLED, math.nan, 0)
                found = self._keys.get(k)
                if found is None:
                    return KeyReport(KeyState.QUIET, math.nan, 0)
                return KeyReport(found.state, found.value, found.volume)
        return None

    def _health(self) -> None:
        problem = self._write_error or self._load_error
        if problem is None:
            self.states.enter(
                TrackerState.RUNNING, "blocks written and read", at=trio.current_time()
            )
        else:
            self.states.enter(TrackerState.DEGRADED, problem, at=trio.current_time())

    # -- feeding ---------------------------------------------------------------------------

    def _label_values(self, tenant: str, category: str) -> tuple[str, str]:
        labels = self._labels
        if labels is None:  # pragma: no cover - only called with metrics
            return OVERFLOW_LABEL, OVERFLOW_LABEL
        return labels("bounce_tenant", tenant), labels("bounce_category", category)

    def _observe(self, tenant: str, category: str, bounced: int, sent: int) -> None:
        k = (tenant, category)
        self._tenants.add(tenant)
        if k in self._disabled:
            self._counts["ignored"] += 1
            return
        key = self._keys.get(k)
        if key is None:
            key = self._admit(k)
            if key is None:
                self._counts["untracked"] += 1
                return
        else:
            self._keys.move_to_end(k)
        key.detector.observe_ratio(bounced, sent)
        self._decide(k, key, trio.current_time())

    def _admit(self, k: Key) -> _Key | None:
        if len(self._keys) >= self.rules.max_keys:
            victim = next((kk for kk, v in self._keys.items() if v.state is KeyState.QUIET), None)
            if victim is None:
                return None
            del self._keys[victim]
            self._counts["evicted"] += 1
        key = self._keys[k] = _Key(self._new_window(f"bounce:{k[0]}:{k[1]}"))
        return key

    # -- deciding --------------------------------------------------------------------------

    def _decide(self, k: Key, key: _Key, now: float) -> None:
        rules = self.rules
        state = key.detector.evaluate()
        key.value, key.volume = state.value, key.detector.volume
        if not state.evaluable:
            return
        value = state.value
        if value > rules.threshold:
            if key.above_since is None:
                key.above_since = now
        else:
            key.above_since = None
        ceiling = f"bounce ratio {value:.3f} >= ceiling {rules.ceiling_ratio}"
        if key.state is KeyState.QUIET:
            if value >= rules.ceiling_ratio:
                self._disable(k, key, now, ceiling)
            elif value > rules.threshold:
                self._throttle(k, key, now, value)
        elif key.state is KeyState.THROTTLED:
            if value <= rules.clear_threshold:
                self._lift(k, key, now, value)
            elif value >= rules.ceiling_ratio:
                self._disable(k, key, now, ceiling)
            elif key.above_since is not None and now - key.above_since >= rules.disable_after_s:
                self._disable(
                    k, key, now,
                    f"bounce ratio above {rules.threshold} for {rules.disable_after_s:g}s"
                    f" (now {value:.3f})",
                )  # fmt: skip

    def _throttle(self, k: Key, key: _Key, now: float, value: float) -> None:
        key.state, key.since = KeyState.THROTTLED, now
        self._counts["throttled"] += 1
        reason = f"bounce ratio {value:.3f} > {self.rules.threshold} over {key.volume} sends"
        self._persist(k, KeyState.THROTTLED, reason)
        self._announce(k, key, now, "throttled", self.severity)

    def _disable(self, k: Key, key: _Key, now: float, reason: str) -> None:
        del self._keys[k]
        key.state, key.since = KeyState.DISABLED, now
        self._disabled[k] = reason
        self._counts["disabled"] += 1
        self._persist(k, KeyState.DISABLED, reason)
        self._announce(k, key, now, "disabled", self.severity)

    def _lift(self, k: Key, key: _Key, now: float, value: float) -> None:
        key.state, key.since, key.above_since = KeyState.QUIET, now, None
        self._counts["lifted"] += 1
        self._persist(
            k, KeyState.QUIET, f"bounce ratio {value:.3f} <= {self.rules.clear_threshold}"
        )
        self._announce(k, key, now, "lifted", "info")

    def _persist(self, k: Key, state: KeyState, reason: str) -> None:
        self.board._set(k, state)
        pending = self._pending.get(k)
        if pending is not None and pending[0] is KeyState.DISABLED:
            return  # a disable is never overtaken by an older-decided lift or throttle
        self._pending[k] = (state, reason)
        self._flush_soon(retry=False)

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

    # -- persistence -----------------------------------------------------------------------

    def _flush_soon(self, *, retry: bool) -> None:
        """Start the writer unless one runs; after a failed write only on a tick (``retry``)."""
        if self._flushing or not self._pending or (self._write_error is not None and not retry):
            return
        self._flushing = True
        batch = tuple((t, c, state, reason) for (t, c), (state, reason) in self._pending.items())
        self.start_soon(self._flush, batch)

    async def _flush(self, batch: tuple[tuple[str, str, KeyState, str], ...]) -> None:
        """Write ``batch`` in order; stop at the first ProviderError (retried on a tick)."""
        written: list[tuple[str, str, KeyState, str]] = []
        error: str | None = None
        for tenant, category, state, reason in batch:
            try:
                if state is KeyState.QUIET:
                    await self.store.lift(tenant, category)
                else:
                    await self.store.block(tenant, category, BlockState(state.value), reason)
            except ProviderError as exc:
                error = f"{tenant}/{category}: {exc}"
                break
            written.append((tenant, category, state, reason))
        await self.ref.tell(Flushed(tuple(written), error))

    async def _load(self, tenants: tuple[str, ...]) -> None:
        try:
            blocks = await self.store.load(tenants)
        except ProviderError as exc:
            await self.ref.tell(Loaded(error=str(exc)))
        else:
            await self.ref.tell(Loaded(tuple(blocks)))

    def _apply_blocks(self, blocks: Sequence[CategoryBlock]) -> None:
        """Make the in-memory blocks match the database's for every tenant loaded."""
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

    def _publish_all(self) -> None:
        states = {k: KeyState.DISABLED for k in self._disabled}
        states.update(
            (k, key.state) for k, key in self._keys.items() if key.state is KeyState.THROTTLED
        )
        self.board._replace(states)


def bounce_tracker_child(
    rules: BounceRules,
    *,
    store: BlockStore,
    board: BounceBoard,
    capacity: int,
    overflow: Overflow,
    shutdown_s: float,
    restart: Restart | None = None,
    deadlines: Deadlines | None = None,
    tenants: Iterable[str] = (),
    severity: str = "page",
    detector: RatioDetector | None = None,
    events: EventBus | None = None,
    metrics: Metrics | None = None,
    clock: Clock | None = None,
) -> tuple[ChildSpec, BounceFeed]:
    """The tracker's child spec (id ``bounce_tracker``) and the feed that reaches it.

    ``overflow`` must be ``wait``: the tracker's own tasks wait for room to
    report, and the feed never waits (``tell_nowait``).
    """
    if overflow is not Overflow.WAIT:
        raise ConfigError(
            f"bounce tracker: its mailbox overflow must be 'wait', got {overflow.value!r}"
            " (the feed never waits; the tracker's own tasks must not lose a report)"
        )
    factory = partial(
        BounceTracker, rules, store=store, board=board, tenants=tuple(tenants),
        severity=severity, detector=detector, events=events, metrics=metrics, clock=clock,
    )  # fmt: skip
    spec, ref = actor_child(
        BounceTracker.name, factory, capacity=capacity, overflow=overflow, restart=restart,
        shutdown_s=shutdown_s, deadlines=deadlines, metrics=metrics,
    )  # fmt: skip
    return spec, BounceFeed(ref, board)
