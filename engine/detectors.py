"""Detectors: sliding-window rules evaluated in-process, one per catalog row.

A detector turns a stream of observations into one number, its **value**, and
compares it with a **threshold**. It is fed cheaply (synchronous, no awaits, O(1)
amortised) by the code that sees the traffic, and *evaluated* separately — by a
:class:`DetectorSet` ticking in the daemon, or by a test. Evaluation is where the
decision is made: it applies hysteresis and the ``for_s`` delay, publishes
:class:`~engine.events.DetectorFired` / :class:`~engine.events.DetectorCleared`
exactly once per transition, sets the ``triage_detector_firing`` and
``triage_detector_value`` gauges, and calls the hooks that attach mitigations.

The six kinds (``kind`` in the config)::

    kind                 fed with                       value
    rate                 observe(count=1)               events per second over the window
    ratio                observe(hit) / observe_ratio   numerator / denominator over the window
    count_in_window      observe(count=1)               events in the window
    age_of_newest        touch() / set_oldest / set_age seconds since the newest item (or the
                                                        oldest pending one; nothing pending: 0)
    gauge_sustained      set(value)                     the last value set
    spike_over_baseline  observe(count=1)               window rate / EWMA baseline rate

**Windows.** A window of ``window_s`` seconds is a ring of ``buckets`` buckets,
each ``window_s / buckets`` seconds wide and aligned on multiples of that width
in Trio time. The window holds the current (partial) bucket and the
``buckets - 1`` before it, so an observation made in the bucket starting at
``b`` is forgotten exactly at ``b + window_s``. Rates always divide by the full
``window_s``, also before the detector has watched a whole window: a young
detector under-reads, it never over-reads. A window of one bucket is a tumbling
window (it empties at every boundary); use several buckets for a sliding one.

**Thresholds and hysteresis.** With ``op="gt"`` a detector fires when the value
rises above ``threshold`` and clears only when it falls to ``clear_threshold``
or below; with ``op="lt"`` it fires below ``threshold`` and clears at
``clear_threshold`` or above. ``clear_threshold=None`` means ``threshold``.
The clear threshold must lie on the healthy side of (or on) the threshold.
Values between the two change nothing: a firing detector stays firing, a quiet
one stays quiet — so a value wobbling around the threshold cannot flap.

**Delay.** The fire condition must hold at every evaluation for ``for_s``
seconds before the detector fires (``for_s=0``: at the first evaluation that
sees it). For ``gauge_sustained`` the clock starts at the exact ``set()`` that
crossed the threshold, and any ``set()`` back under it restarts it, even one
between two evaluations. Clearing is never delayed.

**Volume and warm-up** (``min_volume``). A ratio with fewer than ``min_volume``
observations (and never with none) in its denominator is *not evaluable*; a
spike detector is not evaluable until ``min_volume`` buckets (at least one)
have been folded into its baseline and the baseline is above zero. A detector
that is not evaluable neither fires nor clears: a quiet one stays quiet and a
firing one keeps firing until there is enough volume again *and* the value is
back past ``clear_threshold`` — silence is not evidence of recovery (a provider
that gets no traffic after failover is not thereby healthy). Rate,
count-in-window, age and gauge detectors ignore ``min_volume``.

**Spike baseline.** The baseline is an EWMA (weight ``baseline_alpha`` on the
newest bucket, the first bucket seeds it) of per-bucket rates, fed with each
bucket when it *leaves* the window, so the recent traffic that the value
measures is never part of the baseline it is compared with. Buckets that leave
while the detector fires are not folded in: an anomaly does not become the norm.

**Start.** A detector starts watching when it is created inside a Trio run, or
otherwise at its first observation or evaluation; before that nothing was seen
(an ``age_of_newest`` detector counts its age from that start).

Time comes from ``trio.current_time()``; the wall clock (event timestamps only)
from the injected :class:`~engine.clock.Clock`. Every number comes from the
constructor: this module holds no thresholds.
"""

from __future__ import annotations

import enum
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, NoReturn, TypeVar

import msgspec
import trio

from .clock import Clock
from .errors import ConfigError
from .events import DetectorCleared, DetectorFired, EventBus
from .metrics import Metrics

__all__ = [
    "AgeOfNewestDetector",
    "CountInWindowDetector",
    "Detector",
    "DetectorHook",
    "DetectorKind",
    "DetectorSet",
    "DetectorState",
    "GaugeSustainedDetector",
    "Op",
    "RateDetector",
    "RatioDetector",
    "SpikeOverBaselineDetector",
    "make_detector",
]

log = logging.getLogger("triage.detectors")

# Bucket indices are floor(now / width). Trio times that are meant to sit exactly on
# a boundary (0.3 with 0.1-wide buckets) can land a hair below it in binary floating
# point; this nudge, in units of buckets, puts them on the boundary. It is a
# numerical tolerance, not a tunable.
_BOUNDARY_NUDGE = 1e-9


# The input recorder's codes (engine.recorder.Code), as plain ints.
_TUNE, _TRANSITION = 7, 8
_OBSERVE, _OBSERVE_HIT, _OBSERVE_RATIO, _TOUCH, _SET_OLDEST, _SET_AGE, _SET, _EVALUATE, _TICK = (
    range(9, 18)
)


class DetectorKind(enum.StrEnum):
    RATE = "rate"
    RATIO = "ratio"
    COUNT_IN_WINDOW = "count_in_window"
    AGE_OF_NEWEST = "age_of_newest"
    GAUGE_SUSTAINED = "gauge_sustained"
    SPIKE_OVER_BASELINE = "spike_over_baseline"


class Op(enum.StrEnum):
    """Which side of the threshold is unhealthy."""

    GT = "gt"
    LT = "lt"


class DetectorState(msgspec.Struct, frozen=True, kw_only=True):
    """What one evaluation found: a frozen record, safe to hand to anyone.

    ``value`` is NaN when it is undefined (a ratio over nothing, a spike without a
    baseline). ``evaluable`` is False while volume or warm-up is missing.
    ``since`` is the Trio time of the last transition (None: never fired).
    ``pending_since`` is when the fire condition started to hold while waiting out
    ``for_s``. ``changed`` is True on exactly the evaluation that fired or cleared.
    """

    name: str
    kind: DetectorKind
    metric: str
    row: int | None
    at: float
    value: float
    firing: bool
    evaluable: bool
    threshold: float
    clear_threshold: float
    since: float | None
    pending_since: float | None
    changed: bool


DetectorHook = Callable[[DetectorState], object]
"""A mitigation hook: called synchronously with the state of a fire or clear."""

D = TypeVar("D", bound="Detector")


def _now_if_running() -> float | None:
    try:
        return trio.current_time()
    except RuntimeError:  # not inside trio.run: start lazily at first contact
        return None


def _finite(name: str, field: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"detector {name!r}: {field} must be a finite number, got {value!r}")
    return value


class _Window:
    """A ring of ``buckets`` buckets, each holding a count and a hit count.

    Invariant: slot ``e % size`` holds bucket epoch ``e`` for every ``e`` in
    ``(head - size, head]``; ``count`` and ``hits`` are the sums over those slots.
    Epochs before ``start`` were never observed.
    """

    __slots__ = ("_counts", "_head", "_hits", "_size", "_start", "count", "hits", "width")

    def __init__(self, window_s: float, buckets: int) -> None:
        self._size = buckets
        self.width = window_s / buckets
        self._counts = [0] * buckets
        self._hits = [0] * buckets
        self._head: int | None = None
        self._start = 0
        self.count = 0
        self.hits = 0

    def advance(
        self,
        now: float,
        fold: Callable[[int], None] | None = None,
        fold_empty: Callable[[int], None] | None = None,
    ) -> None:
        """Move the head to ``now``'s bucket, dropping buckets that left the window.

        ``fold(count)`` sees every observed bucket that leaves, oldest first;
        ``fold_empty(n)`` then sees the ``n`` empty buckets skipped by a long gap.
        """
        epoch = math.floor(now / self.width + _BOUNDARY_NUDGE)
        head = self._head
        if head is None:
            self._head = self._start = epoch
            return
        steps = epoch - head
        if steps <= 0:
            return
        size = self._size
        counts = self._counts
        hits = self._hits
        for reused in range(head + 1, head + 1 + min(steps, size)):
            slot = reused % size
            leaving = counts[slot]
            if fold is not None and reused - size >= self._start:
                fold(leaving)
            self.count -= leaving
            self.hits -= hits[slot]
            counts[slot] = 0
            hits[slot] = 0
        if steps > size and fold_empty is not None:
            fold_empty(steps - size)
        self._head = epoch

    def resampled(self, window_s: float, buckets: int, now: float) -> _Window:
        """A window of the new shape holding this one's counts: each bucket's counts move
        to the new bucket holding its midpoint, if that is still within the new span
        (a shorter window drops what falls out of it; a longer one holds what this one
        did, and nothing from before it)."""
        new = _Window(window_s, buckets)
        new.advance(now)
        if self._head is None:
            return new
        assert new._head is not None
        start_time = self._start * self.width
        new._start = math.floor(start_time / new.width + _BOUNDARY_NUDGE)
        for epoch in range(max(self._head - self._size + 1, self._start), self._head + 1):
            slot = epoch % self._size
            count, hits = self._counts[slot], self._hits[slot]
            if not count and not hits:
                continue
            target = math.floor((epoch + 0.5) * self.width / new.width)
            if not new._head - new._size < target <= new._head:
                continue
            new_slot = target % new._size
            new._counts[new_slot] += count
            new._hits[new_slot] += hits
            new.count += count
            new.hits += hits
        return new

    def add(self, count: int, hits: int = 0) -> None:
        slot = self._head % self._size if self._head is not None else 0
        self._counts[slot] += count
        self._hits[slot] += hits
        self.count += count
        self.hits += hits


class Detector(ABC):
    """Base of the six kinds: thresholds, hysteresis, ``for_s``, events, metrics, hooks.

    Subclasses define how they are fed and :meth:`_measure`; everything about
    *deciding* lives here. Keyword names match the config's ``DetectorConfig``
    fields, so ``make_detector(name, **fields)`` builds any kind; fields a kind
    does not use are accepted and ignored.
    """

    kind: ClassVar[DetectorKind]

    def __init__(
        self,
        name: str,
        *,
        metric: str,
        threshold: float,
        op: Op | str = Op.GT,
        clear_threshold: float | None = None,
        window_s: float | None = None,
        buckets: int | None = None,
        min_volume: int = 0,
        for_s: float = 0.0,
        baseline_alpha: float | None = None,
        kind: DetectorKind | str | None = None,
        row: int | None = None,
        clock: Clock | None = None,
        events: EventBus | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if kind is not None and kind != self.kind:
            raise ConfigError(
                f"detector {name!r}: kind {kind!r} given to a {self.kind.value} detector"
            )
        try:
            self.op = Op(op)
        except ValueError:
            raise ConfigError(
                f"detector {name!r}: op must be one of {[o.value for o in Op]}, got {op!r}"
            ) from None
        self.name = name
        self.metric = metric
        self.row = row
        self.threshold = _finite(name, "threshold", threshold)
        self.clear_threshold = (
            self.threshold
            if clear_threshold is None
            else _finite(name, "clear_threshold", clear_threshold)
        )
        if self.op is Op.GT and self.clear_threshold > self.threshold:
            raise ConfigError(
                f"detector {name!r}: with op 'gt' clear_threshold ({self.clear_threshold})"
                f" must not exceed threshold ({self.threshold})"
            )
        if self.op is Op.LT and self.clear_threshold < self.threshold:
            raise ConfigError(
                f"detector {name!r}: with op 'lt' clear_threshold ({self.clear_threshold})"
                f" must not be below threshold ({self.threshold})"
            )
        if isinstance(min_volume, bool) or int(min_volume) != min_volume or min_volume < 0:
            raise ConfigError(
                f"detector {name!r}: min_volume must be a whole number >= 0, got {min_volume!r}"
            )
        self.min_volume = int(min_volume)
        self.for_s = _finite(name, "for_s", for_s)
        if self.for_s < 0:
            raise ConfigError(f"detector {name!r}: for_s must be >= 0, got {for_s!r}")
        self.window_s = window_s
        self.buckets = buckets
        self.baseline_alpha = baseline_alpha
        self._clock = clock if clock is not None else Clock()
        self._events = events
        if metrics is not None:
            label = metrics.label("detector", name)
            self._firing_gauge = metrics.detector_firing.labels(detector=label)
            self._value_gauge = metrics.detector_value.labels(detector=label)
            self._firing_gauge.set(0)
            self._value_gauge.set(math.nan)
        self._metrics = metrics
        self._firing = False
        self._value = math.nan
        self._since: float | None = None
        self._pending_since: float | None = None
        self._on_fire: list[DetectorHook] = []
        self._on_clear: list[DetectorHook] = []
        self.hook_errors = 0
        self.last_state: DetectorState | None = None
        #: The input recorder's tap (:mod:`engine.recorder`), None when nothing records.
        self.tap: Callable[..., None] | None = None
        self._setup()

    # -- live tuning (a config reload) -------------------------------------------

    #: The fields :meth:`retune` may change (``kind`` and ``metric`` need a restart).
    TUNABLE: ClassVar[tuple[str, ...]] = (
        "threshold", "clear_threshold", "op", "min_volume", "for_s", "window_s", "buckets",
        "baseline_alpha",
    )  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """The effective thresholds and window (what a reload compares and changes)."""
        values = {field: getattr(self, field) for field in self.TUNABLE}
        values["op"] = self.op.value
        return values

    def retune(self, **fields: Any) -> list[str]:
        """Change thresholds, hysteresis, ``for_s`` and the window in place, keeping the
        firing state and the window's counts; answers one line per change. A new window
        shape (``window_s``, ``buckets``) is migrated explicitly: the counts move into
        the new buckets by time (:meth:`_Window.resampled`), and the answer says how
        many were kept. ``kind`` or ``metric`` changes, and invalid values, raise
        :class:`ConfigError` and change nothing."""
        for fixed in ("kind", "metric"):
            value = fields.pop(fixed, None)
            current = self.kind.value if fixed == "kind" else self.metric
            if value is not None and value != current:
                raise ConfigError(
                    f"detector {self.name!r}: {fixed} {current!r} -> {value!r} needs a restart"
                )
        fields.pop("row", None)
        unknown = set(fields) - set(self.TUNABLE)
        if unknown:
            raise ConfigError(f"detector {self.name!r}: not tunable: {', '.join(sorted(unknown))}")
        merged = self.settings() | fields
        if "threshold" in fields and "clear_threshold" not in fields:
            merged["clear_threshold"] = None  # defaults to the new threshold, as configured
        candidate = type(self)(self.name, metric=self.metric, **merged)  # the checks
        before = self.settings()
        after = candidate.settings()
        changes = [
            f"detector {self.name}: {field} {before[field]} -> {after[field]}"
            for field in self.TUNABLE
            if before[field] != after[field]
        ]
        if not changes:
            return []
        self.threshold = candidate.threshold
        self.clear_threshold = candidate.clear_threshold
        self.op = candidate.op
        self.min_volume = candidate.min_volume
        self.for_s = candidate.for_s
        self._retune_kind(candidate, changes)
        tap = self.tap
        if tap is not None:
            tap(_TUNE, trio.current_time(), self.settings())
        return changes

    def _retune_kind(self, candidate: Detector, changes: list[str]) -> None:
        """A kind's own state under the new settings (the window's shape); none here."""
        return

    # -- what a kind provides ----------------------------------------------------

    @abstractmethod
    def _setup(self) -> None:
        """Validate the fields this kind needs and build its state (end of ``__init__``)."""

    @abstractmethod
    def _measure(self, now: float) -> float:
        """The value at ``now`` (NaN if undefined); may advance windows."""

    def _evaluable(self) -> bool:
        """Whether there is enough volume / warm-up to decide (after ``_measure``)."""
        return True

    def _onset(self) -> float | None:
        """The exact time the fire condition started to hold, if the kind knows it."""
        return None

    # -- deciding ----------------------------------------------------------------

    @property
    def firing(self) -> bool:
        return self._firing

    @property
    def value(self) -> float:
        """The value found by the last evaluation (NaN before the first)."""
        return self._value

    def _fires(self, value: float) -> bool:
        return value > self.threshold if self.op is Op.GT else value < self.threshold

    def _clears(self, value: float) -> bool:
        if self.op is Op.GT:
            return value <= self.clear_threshold
        return value >= self.clear_threshold

    def evaluate(self) -> DetectorState:
        """Decide at the current Trio time; publish and call hooks on a transition."""
        now = trio.current_time()
        tap = self.tap
        if tap is not None:
            tap(_EVALUATE, now)
        return self._decide(now)

    def _decide(self, now: float) -> DetectorState:
        value = self._measure(now)
        evaluable = self._evaluable()
        changed = False
        if self._firing:
            if evaluable and self._clears(value):
                self._firing = False
                self._since = now
                changed = True
        elif evaluable and self._fires(value):
            onset = self._onset()
            if onset is not None:
                self._pending_since = onset
            elif self._pending_since is None:
                self._pending_since = now
            if now - self._pending_since >= self.for_s:
                self._firing = True
                self._since = now
                self._pending_since = None
                changed = True
        else:
            self._pending_since = None
        self._value = value
        state = DetectorState(
            name=self.name,
            kind=self.kind,
            metric=self.metric,
            row=self.row,
            at=now,
            value=value,
            firing=self._firing,
            evaluable=evaluable,
            threshold=self.threshold,
            clear_threshold=self.clear_threshold,
            since=self._since,
            pending_since=self._pending_since,
            changed=changed,
        )
        self.last_state = state
        if self._metrics is not None:
            self._value_gauge.set(value)
            self._firing_gauge.set(1 if self._firing else 0)
        if changed:
            self._publish(state)
        return state

    def _publish(self, state: DetectorState) -> None:
        tap = self.tap
        if tap is not None:
            tap(_TRANSITION, state.at, state.firing, state.value)
        if state.firing:
            log.warning(
                "detector %s fired: %s=%r %s %r (row %s)",
                self.name,
                self.metric,
                state.value,
                self.op.value,
                self.threshold,
                self.row,
            )
            if self._events is not None:
                self._events.emit(
                    DetectorFired(
                        at=state.at,
                        wall=self._clock.wall(),
                        detector=self.name,
                        value=state.value,
                        threshold=self.threshold,
                        row=self.row,
                    )
                )
            hooks = self._on_fire
        else:
            log.info("detector %s cleared: %s=%r", self.name, self.metric, state.value)
            if self._events is not None:
                self._events.emit(
                    DetectorCleared(
                        at=state.at,
                        wall=self._clock.wall(),
                        detector=self.name,
                        value=state.value,
                        threshold=self.clear_threshold,
                        row=self.row,
                    )
                )
            hooks = self._on_clear
        for hook in tuple(hooks):
            try:
                hook(state)
            except Exception:
                self.hook_errors += 1
                log.exception("detector %s: hook %r failed", self.name, hook)

    # -- hooks -------------------------------------------------------------------

    def on_fire(self, hook: DetectorHook) -> Callable[[], None]:
        """Call ``hook(state)`` on every fire transition; returns an unsubscribe function.

        Hooks run synchronously inside :meth:`evaluate`, after the event is
        published. A hook that needs to await should hand the work to a task or an
        actor (``tell_nowait``). A hook's exception is logged and counted in
        ``hook_errors``, never propagated.
        """
        return _subscribe(self._on_fire, hook)

    def on_clear(self, hook: DetectorHook) -> Callable[[], None]:
        """Call ``hook(state)`` on every clear transition; returns an unsubscribe function."""
        return _subscribe(self._on_clear, hook)

    def expect(self, cls: type[D]) -> D:
        """This detector as ``cls``, or a ConfigError naming the configured kind.

        For code that feeds a detector built from config:
        ``detectors["bounce"].expect(RatioDetector).observe_ratio(1, 0)``.
        """
        if not isinstance(self, cls):
            raise ConfigError(
                f"detector {self.name!r} is configured as kind {self.kind.value!r},"
                f" but its feeder needs a {cls.__name__}"
            )
        return self

    def __repr__(self) -> str:
        state = "firing" if self._firing else "quiet"
        return (
            f"<{type(self).__name__} {self.name!r} {self.metric} {self.op.value}"
            f" {self.threshold} {state}>"
        )


def _subscribe(hooks: list[DetectorHook], hook: DetectorHook) -> Callable[[], None]:
    hooks.append(hook)

    def unsubscribe() -> None:
        if hook in hooks:
            hooks.remove(hook)

    return unsubscribe


class _WindowedDetector(Detector):
    """A detector over a ring of buckets; needs ``window_s`` and ``buckets``."""

    _span_s: float

    def _setup(self) -> None:
        name, window_s, buckets = self.name, self.window_s, self.buckets
        if window_s is None or not math.isfinite(window_s) or window_s <= 0:
            raise ConfigError(
                f"detector {name!r}: a {self.kind.value} detector needs window_s > 0,"
                f" got {window_s!r}"
            )
        if buckets is None or isinstance(buckets, bool) or int(buckets) != buckets or buckets < 1:
            raise ConfigError(
                f"detector {name!r}: a {self.kind.value} detector needs a whole number of"
                f" buckets >= 1, got {buckets!r}"
            )
        self.window_s = self._span_s = float(window_s)
        self.buckets = int(buckets)
        self._window = _Window(self._span_s, self.buckets)
        start = _now_if_running()
        if start is not None:
            self._window.advance(start)

    def _retune_kind(self, candidate: Detector, changes: list[str]) -> None:
        assert isinstance(candidate, _WindowedDetector)
        if (candidate.window_s, candidate.buckets) == (self.window_s, self.buckets):
            return
        before = self._window.count
        now = self._clock.now()
        assert candidate.buckets is not None  # _setup made it an int
        self._window = self._window.resampled(candidate._span_s, candidate.buckets, now)
        self.window_s, self.buckets, self._span_s = (
            candidate.window_s, candidate.buckets, candidate._span_s,
        )  # fmt: skip
        changes.append(
            f"detector {self.name}: window reshaped to {self.window_s}s in {self.buckets}"
            f" buckets; {self._window.count} of {before} counted events kept"
        )


class CountInWindowDetector(_WindowedDetector):
    """Events counted over the window: ``observe(count)`` per event or batch."""

    kind = DetectorKind.COUNT_IN_WINDOW

    def observe(self, count: int = 1) -> None:
        if count < 0:
            raise ValueError(f"detector {self.name!r}: count must be >= 0, got {count}")
        window = self._window
        now = trio.current_time()
        tap = self.tap
        if tap is not None:
            tap(_OBSERVE, now, count)
        window.advance(now)
        window.add(count)

    def _measure(self, now: float) -> float:
        self._window.advance(now)
        return float(self._window.count)


class RateDetector(CountInWindowDetector):
    """Events per second over the window: ``observe(count)`` per event or batch."""

    kind = DetectorKind.RATE

    def _measure(self, now: float) -> float:
        return super()._measure(now) / self._span_s


class RatioDetector(_WindowedDetector):
    """Numerator over denominator within the window, gated by ``min_volume``.

    ``observe(hit)`` counts one outcome (an error, a bounce, a cache hit); or feed
    both sides separately with ``observe_ratio(numerator_inc, denominator_inc)``
    (a bounce arrives long after its send: ``observe_ratio(1, 0)`` then). The value
    is NaN over an empty denominator.
    """

    kind = DetectorKind.RATIO

    def observe(self, hit: bool) -> None:
        window = self._window
        now = trio.current_time()
        tap = self.tap
        if tap is not None:
            tap(_OBSERVE_HIT, now, bool(hit))
        window.advance(now)
        window.add(1, 1 if hit else 0)

    def observe_ratio(self, numerator_inc: int, denominator_inc: int) -> None:
        if numerator_inc < 0 or denominator_inc < 0:
            raise ValueError(
                f"detector {self.name!r}: increments must be >= 0,"
                f" got {numerator_inc}/{denominator_inc}"
            )
        window = self._window
        now = trio.current_time()
        tap = self.tap
        if tap is not None:
            tap(_OBSERVE_RATIO, now, numerator_inc, denominator_inc)
        window.advance(now)
        window.add(denominator_inc, numerator_inc)

    @property
    def volume(self) -> int:
        """The denominator currently in the window (as of the last feed or evaluation)."""
        return self._window.count

    def _measure(self, now: float) -> float:
        window = self._window
        window.advance(now)
        return window.hits / window.count if window.count else math.nan

    def _evaluable(self) -> bool:
        return self._window.count >= max(self.min_volume, 1)


class SpikeOverBaselineDetector(_WindowedDetector):
    """The window's rate divided by an EWMA baseline of older buckets' rates.

    Fires with ``op="gt"`` on a flood (``threshold=10``: ten times the usual rate)
    or with ``op="lt"`` on a collapse. See the module docstring for how the
    baseline is fed and warmed up.
    """

    kind = DetectorKind.SPIKE_OVER_BASELINE

    _alpha: float

    def _retune_kind(self, candidate: Detector, changes: list[str]) -> None:
        super()._retune_kind(candidate, changes)
        assert isinstance(candidate, SpikeOverBaselineDetector)
        alpha = candidate.baseline_alpha
        assert alpha is not None  # _setup requires it
        self.baseline_alpha = self._alpha = float(alpha)

    def _setup(self) -> None:
        super()._setup()
        name, alpha = self.name, self.baseline_alpha
        if alpha is None or not math.isfinite(alpha) or not 0 < alpha <= 1:
            raise ConfigError(
                f"detector {name!r}: a spike_over_baseline detector needs"
                f" 0 < baseline_alpha <= 1, got {alpha!r}"
            )
        self.baseline_alpha = self._alpha = float(alpha)
        self._baseline: float | None = None
        self._folded = 0

    @property
    def baseline(self) -> float | None:
        """The baseline rate in events per second (None until a bucket was folded)."""
        return self._baseline

    @property
    def warm_buckets(self) -> int:
        """How many buckets have been folded into the baseline."""
        return self._folded

    def observe(self, count: int = 1) -> None:
        if count < 0:
            raise ValueError(f"detector {self.name!r}: count must be >= 0, got {count}")
        window = self._window
        now = trio.current_time()
        tap = self.tap
        if tap is not None:
            tap(_OBSERVE, now, count)
        window.advance(now, self._fold, self._fold_empty)
        window.add(count)

    def _fold(self, count: int) -> None:
        if self._firing:
            return
        rate = count / self._window.width
        alpha = self._alpha
        base = self._baseline
        self._baseline = rate if base is None else alpha * rate + (1 - alpha) * base
        self._folded += 1

    def _fold_empty(self, buckets: int) -> None:
        if self._firing:
            return
        alpha = self._alpha
        base = self._baseline
        self._baseline = 0.0 if base is None else base * (1 - alpha) ** buckets
        self._folded += buckets

    def _measure(self, now: float) -> float:
        window = self._window
        window.advance(now, self._fold, self._fold_empty)
        base = self._baseline
        if not base:
            return math.nan
        return window.count / self._span_s / base

    def _evaluable(self) -> bool:
        return self._folded >= max(self.min_volume, 1) and bool(self._baseline)


class AgeOfNewestDetector(Detector):
    """Seconds since something was last seen, or since the oldest pending item.

    ``touch()``: the newest item arrived now (a feedback, a heartbeat).
    ``set_oldest(ts)``: the oldest still-pending item dates from Trio time ``ts``;
    ``None`` means nothing is pending and the value is 0 (an outbox's lag).
    ``set_age(age_s)``: the same, given the age now (e.g. from a wall-clock column).
    """

    kind = DetectorKind.AGE_OF_NEWEST

    def _setup(self) -> None:
        self._reference: float | None = _now_if_running()
        self._started = self._reference is not None

    def touch(self) -> None:
        self._started = True
        self._reference = now = trio.current_time()
        tap = self.tap
        if tap is not None:
            tap(_TOUCH, now)

    def set_oldest(self, ts: float | None) -> None:
        self._started = True
        self._reference = ts
        tap = self.tap
        if tap is not None:
            tap(_SET_OLDEST, trio.current_time(), ts)

    def set_age(self, age_s: float | None) -> None:
        self._started = True
        now = trio.current_time()
        self._reference = None if age_s is None else now - age_s
        tap = self.tap
        if tap is not None:
            tap(_SET_AGE, now, age_s)

    def _measure(self, now: float) -> float:
        if not self._started:
            self._started = True
            self._reference = now
        reference = self._reference
        return 0.0 if reference is None else max(0.0, now - reference)


class GaugeSustainedDetector(Detector):
    """A gauge (``set(value)``) past its threshold for ``for_s`` seconds on end.

    The sustain clock starts at the ``set()`` that crossed the threshold, so it is
    exact even between evaluations. NaN (not evaluable) until the first ``set()``.
    """

    kind = DetectorKind.GAUGE_SUSTAINED

    def _setup(self) -> None:
        self._gauge = math.nan
        self._held_since: float | None = None

    def set(self, value: float) -> None:
        tap = self.tap
        if tap is not None:
            tap(_SET, trio.current_time(), value)
        if self._fires(value):
            if self._held_since is None:
                self._held_since = trio.current_time()
        else:
            self._held_since = None
        self._gauge = value

    def _measure(self, now: float) -> float:
        return self._gauge

    def _evaluable(self) -> bool:
        return not math.isnan(self._gauge)

    def _onset(self) -> float | None:
        return self._held_since


_KINDS: dict[DetectorKind, type[Detector]] = {
    cls.kind: cls
    for cls in (
        RateDetector,
        RatioDetector,
        CountInWindowDetector,
        AgeOfNewestDetector,
        GaugeSustainedDetector,
        SpikeOverBaselineDetector,
    )
}


def make_detector(
    name: str,
    *,
    kind: DetectorKind | str,
    metric: str,
    threshold: float,
    op: Op | str = Op.GT,
    clear_threshold: float | None = None,
    window_s: float | None = None,
    buckets: int | None = None,
    min_volume: int = 0,
    for_s: float = 0.0,
    baseline_alpha: float | None = None,
    row: int | None = None,
    clock: Clock | None = None,
    events: EventBus | None = None,
    metrics: Metrics | None = None,
) -> Detector:
    """Build the detector of ``kind``; keywords are the ``DetectorConfig`` fields.

    Raises :class:`~engine.errors.ConfigError` for an unknown kind or a value the
    kind cannot use (a missing window, a clear threshold on the wrong side...).
    """
    try:
        cls = _KINDS[DetectorKind(kind)]
    except ValueError:
        raise ConfigError(
            f"detector {name!r}: kind must be one of {[k.value for k in DetectorKind]},"
            f" got {kind!r}"
        ) from None
    return cls(
        name,
        metric=metric,
        threshold=threshold,
        op=op,
        clear_threshold=clear_threshold,
        window_s=window_s,
        buckets=buckets,
        min_volume=min_volume,
        for_s=for_s,
        baseline_alpha=baseline_alpha,
        row=row,
        clock=clock,
        events=events,
        metrics=metrics,
    )


class _SetHook:
    __slots__ = ("attached", "fire", "hook", "row")

    def __init__(self, hook: DetectorHook, row: int | None, fire: bool) -> None:
        self.hook = hook
        self.row = row
        self.fire = fire
        self.attached: list[Callable[[], None]] = []

    def attach(self, detector: Detector) -> None:
        if self.row is None or detector.row == self.row:
            subscribe = detector.on_fire if self.fire else detector.on_clear
            self.attached.append(subscribe(self.hook))


class DetectorSet:
    """The daemon's detectors by name, evaluated together on a tick.

    Hooks registered with :meth:`on_fire` / :meth:`on_clear` attach to every
    matching detector, present and future, so they also run when a detector is
    evaluated on its own.
    """

    def __init__(self, detectors: Iterable[Detector] = ()) -> None:
        self._detectors: dict[str, Detector] = {}
        self._hooks: list[_SetHook] = []
        self.ticks = 0
        #: The input recorder's tap for the ticks, and its hook for detectors added later.
        self.tap: Callable[..., None] | None = None
        self.on_add: Callable[[Detector], None] | None = None
        for detector in detectors:
            self.add(detector)

    def add(self, detector: D) -> D:
        """Add ``detector`` (names are unique) and return it."""
        if detector.name in self._detectors:
            raise ValueError(f"a detector named {detector.name!r} is already in the set")
        self._detectors[detector.name] = detector
        for hook in self._hooks:
            hook.attach(detector)
        if self.on_add is not None:
            self.on_add(detector)
        return detector

    def __getitem__(self, name: str) -> Detector:
        return self._detectors[name]

    def get(self, name: str) -> Detector | None:
        return self._detectors.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._detectors

    def __iter__(self) -> Iterator[Detector]:
        return iter(tuple(self._detectors.values()))

    def __len__(self) -> int:
        return len(self._detectors)

    def for_row(self, row: int) -> list[Detector]:
        """The detectors tied to catalog row ``row``."""
        return [d for d in self._detectors.values() if d.row == row]

    def firing(self) -> list[Detector]:
        return [d for d in self._detectors.values() if d.firing]

    def on_fire(self, hook: DetectorHook, *, row: int | None = None) -> Callable[[], None]:
        """Call ``hook(state)`` when any detector of ``row`` (None: any row) fires."""
        return self._register(_SetHook(hook, row, fire=True))

    def on_clear(self, hook: DetectorHook, *, row: int | None = None) -> Callable[[], None]:
        """Call ``hook(state)`` when any detector of ``row`` (None: any row) clears."""
        return self._register(_SetHook(hook, row, fire=False))

    def _register(self, entry: _SetHook) -> Callable[[], None]:
        self._hooks.append(entry)
        for detector in self._detectors.values():
            entry.attach(detector)

        def unsubscribe() -> None:
            if entry in self._hooks:
                self._hooks.remove(entry)
            for detach in entry.attached:
                detach()
            entry.attached.clear()

        return unsubscribe

    def evaluate_all(self) -> list[DetectorState]:
        """Evaluate every detector once, in the order they were added."""
        now = trio.current_time()
        tap = self.tap
        if tap is not None:
            tap(_TICK, now)
        return [detector._decide(now) for detector in tuple(self._detectors.values())]

    async def run(
        self, tick_s: float, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Evaluate every ``tick_s`` seconds, forever; start it in a nursery.

        The first evaluation happens at once and ``started()`` follows it. Ticks
        keep a fixed cadence (``start + k * tick_s``); a tick that is late is not
        made up for with a burst.
        """
        if not (math.isfinite(tick_s) and tick_s > 0):
            raise ConfigError(f"detector tick_s must be > 0, got {tick_s!r}")
        deadline = trio.current_time()
        self.evaluate_all()
        self.ticks += 1
        task_status.started()
        while True:
            deadline = max(deadline + tick_s, trio.current_time())
            await trio.sleep_until(deadline)
            self.evaluate_all()
            self.ticks += 1
