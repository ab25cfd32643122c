"""A circuit breaker on Trio time, built on pybreaker and wrapped so it is Trio-safe.

States and transitions::

    CLOSED ──trip rule──▶ OPEN ──open interval elapsed──▶ HALF_OPEN ──all probes ok──▶ CLOSED
                           ▲                                  │
                           └────────── a probe fails ─────────┘

    force_open(reason) ─▶ FORCED_OPEN    refuses every call until reset()
    disable()          ─▶ DISABLED       lets every call through, records nothing
    force_closed()     ─▶ DISABLED       (the same thing, by its other name)
    metrics_only()     ─▶ METRICS_ONLY   records windows and metrics, never opens
    reset()            ─▶ CLOSED         counters cleared, open interval back to its start

Trip rules, checked in CLOSED whenever a recorded outcome could make one true:

- ``fail_max`` consecutive failures;
- failure rate ``>= failure_rate_threshold`` over the last ``rate_window_s``, once the
  window holds at least ``minimum_calls`` calls;
- slow-call rate (calls taking ``>= slow_call_s``) ``>= slow_call_rate_threshold`` over
  the same window, with the same minimum volume.

Rates are fractions in ``(0, 1]``; a threshold above 1 switches its rule off (and
its bookkeeping: with both rate rules off the window stays empty). The window is a
ring of :data:`WINDOW_BUCKETS` buckets keyed on Trio time: a success lands in the
bucket of its end time when the slow-call rule is on, else of its start time (one
clock read saved); a call never lands in a bucket older than the current one.

The open interval grows with each consecutive trip, ``reset_timeout_s *
reset_backoff_multiplier ** (trips - 1)`` capped at ``reset_timeout_max_s``, and goes
back to ``reset_timeout_s`` once the breaker closes after successful probes.

HALF_OPEN admits at most ``half_open_max_calls`` probes; the next caller gets
:class:`~engine.errors.CircuitOpen` at once. When that many probes have succeeded the
breaker closes; any probe that fails (or, while the slow-call rule is on, succeeds too
slowly) opens it again.

What pybreaker alone gets wrong on Trio, and what this wrapper does instead:

- ``trio.Cancelled`` (any ``BaseException`` that is not an ``Exception``) is neither a
  success nor a failure: nothing is recorded, a cancelled probe only frees its slot,
  and the exception is re-raised unchanged.
- Exceptions for which ``is_failure`` says False (by default every
  :class:`~engine.errors.LoadShed`: an inner layer refused before the dependency was
  reached) are ignored the same way; they never count as successes.
- Time is Trio time (``Clock.now``), never ``datetime.now()``, so ``MockClock`` works:
  the wrapper never calls pybreaker's ``open()``, which reads the wall clock.
- Only ``half_open_max_calls`` concurrent probes pass in HALF_OPEN.
- The success path in CLOSED takes no lock and makes no pybreaker call: one or two
  reads of Trio's clock, one bucket increment, and a reset of the failure counter
  only when it is not already zero.

pybreaker keeps the state names (``"closed"``, ``"open"``, ``"half-open"``), the
failure and probe-success counters (in a :class:`pybreaker.CircuitBreakerStorage`
that lives in this module) and its listeners: :attr:`Breaker.circuit` is the
underlying :class:`pybreaker.CircuitBreaker`, whose listeners hear every change of
the three classic states. Treat it as read-only: calling its ``call()``/``open()``
bypasses the rules above.

Every state change emits :class:`~engine.events.BreakerStateChanged` and updates
``triage_breaker_state`` / ``triage_breaker_transitions_total``; failures, slow calls
and refused calls are counted in ``triage_breaker_calls_total``. Successes are not
counted there: a counter increment takes a lock, which the success path avoids.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar, TypeVarTuple

import pybreaker
import trio

from engine.clock import Clock
from engine.errors import CircuitOpen, LoadShed
from engine.events import BreakerStateChanged, EventBus

if TYPE_CHECKING:
    from prometheus_client import Counter

    from engine.metrics import Metrics

__all__ = ["WINDOW_BUCKETS", "Breaker", "BreakerStatistics", "CircuitState"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

log = logging.getLogger("triage.breaker")

WINDOW_BUCKETS = 10
"""Buckets in the rate window: the window slides in steps of ``rate_window_s / 10``."""


class CircuitState(enum.Enum):
    """A breaker's state. The three classic values are pybreaker's own state names."""

    CLOSED = pybreaker.STATE_CLOSED
    OPEN = pybreaker.STATE_OPEN
    HALF_OPEN = pybreaker.STATE_HALF_OPEN
    FORCED_OPEN = "forced-open"
    DISABLED = "disabled"
    METRICS_ONLY = "metrics-only"

    @property
    def code(self) -> int:
        """The value of the ``triage_breaker_state`` gauge for this state."""
        return _CODES[self]

    @property
    def classic(self) -> str:
        """The pybreaker state that stands for this one (forced open is open, ...)."""
        return _CLASSIC[self]


_CODES = {
    CircuitState.CLOSED: 0,
    CircuitState.OPEN: 1,
    CircuitState.HALF_OPEN: 2,
    CircuitState.FORCED_OPEN: 3,
    CircuitState.DISABLED: 4,
    CircuitState.METRICS_ONLY: 5,
}
_CLASSIC = {
    CircuitState.CLOSED: pybreaker.STATE_CLOSED,
    CircuitState.OPEN: pybreaker.STATE_OPEN,
    CircuitState.HALF_OPEN: pybreaker.STATE_HALF_OPEN,
    CircuitState.FORCED_OPEN: pybreaker.STATE_OPEN,
    CircuitState.DISABLED: pybreaker.STATE_CLOSED,
    CircuitState.METRICS_ONLY: pybreaker.STATE_CLOSED,
}
# The input recorder's codes (engine.recorder.Code), as plain ints for the hot path.
_ADMIT, _REJECT, _SUCCESS, _FAILURE, _IGNORED, _MODE, _TUNE, _TRANSITION = range(1, 9)
# States in which before_call() lets every call through without looking further.
_PASSING = frozenset({CircuitState.CLOSED, CircuitState.DISABLED, CircuitState.METRICS_ONLY})
# States in which outcomes are recorded in the window and the failure counter.
_RECORDING = frozenset({CircuitState.CLOSED, CircuitState.METRICS_ONLY})


@dataclass(frozen=True, slots=True)
class BreakerStatistics:
    """A snapshot of a breaker, for ``triage catalog`` and tests."""

    state: CircuitState
    consecutive_failures: int
    window_calls: int
    window_failures: int
    window_slow: int
    trips: int
    half_open_at: float | None
    probes_in_use: int


class _TrioStorage(pybreaker.CircuitBreakerStorage):
    """pybreaker's state storage, in memory, with plain attributes the hot path can read.

    ``opened_at`` is part of pybreaker's interface and holds a ``datetime``; the
    breaker never sets it (it keeps Trio time itself), so it stays None.
    """

    def __init__(self) -> None:
        super().__init__("trio")
        self.failures = 0
        self.successes = 0
        self._state_name = pybreaker.STATE_CLOSED

    @property
    def state(self) -> str:
        return self._state_name

    @state.setter
    def state(self, state: str) -> None:
        self._state_name = state

    def increment_counter(self) -> None:
        self.failures += 1

    def reset_counter(self) -> None:
        self.failures = 0

    def increment_success_counter(self) -> None:
        self.successes += 1

    def reset_success_counter(self) -> None:
        self.successes = 0

    @property
    def counter(self) -> int:
        return self.failures

    @property
    def success_counter(self) -> int:
        return self.successes

    @property
    def opened_at(self) -> datetime | None:
        return None

    @opened_at.setter
    def opened_at(self, value: datetime) -> None:
        """Ignored: open time is Trio time, kept by the breaker."""


def _default_is_failure(exc: BaseException) -> bool:
    return not isinstance(exc, LoadShed)


class Breaker:
    """A circuit breaker for one dependency. See the module docstring for the rules.

    Use :meth:`call` for a whole awaited call, or the synchronous trio
    :meth:`before_call` / :meth:`on_success` / :meth:`on_failure` when the caller
    inlines the call (as :class:`~engine.guard.Guard` does)::

        start = breaker.before_call()          # raises CircuitOpen when refused
        try:
            result = await fn()
        except BaseException as exc:
            breaker.on_failure(exc, start)     # classifies; Cancelled is never counted
            raise
        breaker.on_success(start)
    """

    def __init__(
        self,
        name: str,
        *,
        fail_max: int,
        reset_timeout_s: float,
        reset_timeout_max_s: float,
        reset_backoff_multiplier: float,
        failure_rate_threshold: float,
        rate_window_s: float,
        minimum_calls: int,
        slow_call_s: float,
        slow_call_rate_threshold: float,
        half_open_max_calls: int,
        clock: Clock | None = None,
        events: EventBus | None = None,
        metrics: Metrics | None = None,
        is_failure: Callable[[BaseException], bool] | None = None,
    ) -> None:
        if fail_max < 1:
            raise ValueError(f"breaker {name!r}: fail_max must be >= 1, not {fail_max}")
        if not reset_timeout_s > 0:
            raise ValueError(f"breaker {name!r}: reset_timeout_s must be > 0")
        if reset_timeout_max_s < reset_timeout_s:
            raise ValueError(f"breaker {name!r}: reset_timeout_max_s must be >= reset_timeout_s")
        if reset_backoff_multiplier < 1:
            raise ValueError(f"breaker {name!r}: reset_backoff_multiplier must be >= 1")
        if not failure_rate_threshold > 0 or not slow_call_rate_threshold > 0:
            raise ValueError(f"breaker {name!r}: rate thresholds must be > 0 (above 1 = off)")
        if not rate_window_s > 0 or not slow_call_s > 0:
            raise ValueError(f"breaker {name!r}: rate_window_s and slow_call_s must be > 0")
        if minimum_calls < 1 or half_open_max_calls < 1:
            raise ValueError(
                f"breaker {name!r}: minimum_calls and half_open_max_calls must be >= 1"
            )
        self.name = name
        self.fail_max = fail_max
        self.reset_timeout_s = reset_timeout_s
        self.reset_timeout_max_s = reset_timeout_max_s
        self.reset_backoff_multiplier = reset_backoff_multiplier
        self.failure_rate_threshold = failure_rate_threshold
        self.rate_window_s = rate_window_s
        self.minimum_calls = minimum_calls
        self.slow_call_s = slow_call_s
        self.slow_call_rate_threshold = slow_call_rate_threshold
        self.half_open_max_calls = half_open_max_calls
        self._clock = clock if clock is not None else Clock()
        self._now: Callable[[], float] = trio.current_time if clock is None else clock.now
        self._events = events
        self._metrics = metrics
        self._is_failure = is_failure if is_failure is not None else _default_is_failure
        # A rate threshold above 1 can never be reached: that rule is off, and the
        # success path skips its bookkeeping (and, for the slow-call rule, a clock read).
        self._slow_rule = slow_call_rate_threshold <= 1.0
        self._rate_rule = failure_rate_threshold <= 1.0

        self._storage = _TrioStorage()
        self.circuit = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout_s,
            success_threshold=half_open_max_calls,
            state_storage=self._storage,
            name=name,
            throw_new_error_on_trip=False,
        )

        self._state = CircuitState.CLOSED
        self._passing = True
        self._recording = True
        self._reason = "created"
        self._trips = 0  # consecutive trips without a successful close
        self._half_open_at = math.inf  # Trio time at which OPEN may turn HALF_OPEN
        self._half_open_since = math.inf  # probes are calls that started at or after this
        self._closed_since = -math.inf  # failures of calls started before this are stale
        self._probes = 0  # probe slots taken: probes in flight + probes that succeeded
        self._changed: trio.Event | None = None
        #: The input recorder's tap (:mod:`engine.recorder`), None when nothing records.
        self.tap: Callable[..., None] | None = None

        # Rate window: a ring of per-bucket counts plus the current bucket in scalars.
        self._bucket_s = rate_window_s / WINDOW_BUCKETS
        self._inv_bucket_s = 1.0 / self._bucket_s
        self._epoch = -(2**62)  # absolute index of the current bucket
        self._cur_calls = 0
        self._cur_failures = 0
        self._cur_slow = 0
        self._ring_calls = [0] * WINDOW_BUCKETS
        self._ring_failures = [0] * WINDOW_BUCKETS
        self._ring_slow = [0] * WINDOW_BUCKETS
        self._sum_calls = 0  # totals of the ring (the current bucket not included)
        self._sum_failures = 0
        self._sum_slow = 0

        self._m_failed: Counter | None = None
        self._m_slow: Counter | None = None
        self._m_rejected: Counter | None = None
        if metrics is not None:
            metrics.track(self)
            label = metrics.label("breaker", name)
            self._m_label = label
            self._m_failed = metrics.breaker_calls.labels(label, "failure")
            self._m_slow = metrics.breaker_calls.labels(label, "slow")
            self._m_rejected = metrics.breaker_calls.labels(label, "rejected")
            metrics.breaker_state.labels(label).set(CircuitState.CLOSED.code)

    # -- live tuning (a config reload) ------------------------------------------------

    #: The fields :meth:`retune` changes: the constructor's thresholds and windows.
    TUNABLE: ClassVar[tuple[str, ...]] = (
        "fail_max", "reset_timeout_s", "reset_timeout_max_s", "reset_backoff_multiplier",
        "failure_rate_threshold", "rate_window_s", "minimum_calls", "slow_call_s",
        "slow_call_rate_threshold", "half_open_max_calls",
    )  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """The effective thresholds and windows (what a reload compares and changes)."""
        return {field: getattr(self, field) for field in self.TUNABLE}

    def retune(self, **fields: Any) -> list[str]:
        """Change thresholds and windows in place, keeping the state (an OPEN or HALF_OPEN
        breaker stays so), the trip count and the counts in the rate window; answers one
        line per change. Invalid values raise ``ValueError`` and change nothing.

        A new ``rate_window_s`` keeps the ring's counts and spreads them over the new
        span (the calls counted in the old window count in the new one; said in the
        answer); a new ``reset_timeout_s`` applies from the next trip on."""
        unknown = set(fields) - set(self.TUNABLE)
        if unknown:
            raise ValueError(f"breaker {self.name!r}: not tunable: {', '.join(sorted(unknown))}")
        merged = self.settings() | fields
        Breaker(self.name, **merged)  # the constructor's checks, on a throwaway
        changes: list[str] = []
        for field, value in fields.items():
            old = getattr(self, field)
            if old == value:
                continue
            setattr(self, field, value)
            changes.append(f"breaker {self.name}: {field} {old} -> {value}")
            if field == "rate_window_s":
                self._bucket_s = value / WINDOW_BUCKETS
                self._inv_bucket_s = 1.0 / self._bucket_s
                now = self._now()
                self._epoch = int(now * self._inv_bucket_s)  # the ring ends now, unchanged
                changes[-1] += (
                    f" (the {self._sum_calls + self._cur_calls} calls in the window kept,"
                    f" spread over {value}s)"
                )
        self._slow_rule = self.slow_call_rate_threshold <= 1.0
        self._rate_rule = self.failure_rate_threshold <= 1.0
        self.circuit.fail_max = self.fail_max  # pybreaker's own copies
        self.circuit.reset_timeout = self.reset_timeout_s
        self.circuit.success_threshold = self.half_open_max_calls
        tap = self.tap
        if tap is not None and changes:
            tap(_TUNE, self._now(), self.settings())
        return changes

    # -- observation -----------------------------------------------------------------

    @property
    def state(self) -> CircuitState:
        """The current state; an OPEN breaker whose interval has elapsed turns HALF_OPEN here."""
        if self._state is CircuitState.OPEN:
            try:
                now = self._now()
            except RuntimeError:  # outside Trio: no time to compare with
                return self._state
            if now >= self._half_open_at:
                self._enter_half_open(now)
        return self._state

    @property
    def reason(self) -> str:
        """Why the breaker entered its current state."""
        return self._reason

    def half_open_at(self) -> float | None:
        """Trio time at which an OPEN breaker admits probes; None in any other state."""
        if self._state is CircuitState.OPEN:
            return self._half_open_at
        return None

    def open_interval_s(self, trips: int) -> float:
        """How long the breaker stays open after its ``trips``-th consecutive trip."""
        interval = self.reset_timeout_s * self.reset_backoff_multiplier ** max(trips - 1, 0)
        return min(interval, self.reset_timeout_max_s)

    def statistics(self) -> BreakerStatistics:
        state = self.state
        return BreakerStatistics(
            state=state,
            consecutive_failures=self._storage.failures,
            window_calls=self._sum_calls + self._cur_calls,
            window_failures=self._sum_failures + self._cur_failures,
            window_slow=self._sum_slow + self._cur_slow,
            trips=self._trips,
            half_open_at=self.half_open_at(),
            probes_in_use=self._probes if state is CircuitState.HALF_OPEN else 0,
        )

    async def wait_until_half_open(self) -> None:
        """Return once the breaker would admit a call: at once unless OPEN or FORCED_OPEN.

        An OPEN breaker is waited out until its half-open moment (or an earlier
        reset); a FORCED_OPEN one until a mitigation releases it. Breaker-aware
        supervision awaits this before restarting a child whose breaker is open.
        """
        while True:
            state = self.state
            if state is not CircuitState.OPEN and state is not CircuitState.FORCED_OPEN:
                await trio.lowlevel.checkpoint()
                return
            if self._changed is None:
                self._changed = trio.Event()
            changed = self._changed
            deadline = self._half_open_at if state is CircuitState.OPEN else math.inf
            with trio.move_on_at(deadline):
                await changed.wait()

    # -- the call path ---------------------------------------------------------------

    async def call(self, fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
        """Await ``fn(*args)`` through the breaker; raises CircuitOpen when refused."""
        start = self.before_call()
        try:
            result = await fn(*args)
        except BaseException as exc:
            self.on_failure(exc, start)
            raise
        self.on_success(start)
        return result

    def before_call(self) -> float:
        """Admit a call or raise :class:`~engine.errors.CircuitOpen`; returns its start time.

        Pass the returned value to :meth:`on_success` or :meth:`on_failure`.
        """
        if self._passing:
            now = self._now()
            tap = self.tap
            if tap is not None:
                tap(_ADMIT, now)
            return now
        return self._admit()

    def on_success(self, start: float) -> None:
        """Record that the call admitted at ``start`` succeeded."""
        tap = self.tap
        if tap is not None:
            tap(_SUCCESS, self._now(), start)
        if not self._recording:
            if self._state is CircuitState.HALF_OPEN:
                self._probe_succeeded(start)
            return
        storage = self._storage
        if storage.failures:
            storage.failures = 0
        if self._slow_rule:
            now = self._now()
            slow = now - start >= self.slow_call_s
        elif self._rate_rule:
            now, slow = start, False  # no clock read: the start time picks the bucket
        else:
            return
        epoch = int(now * self._inv_bucket_s)
        if epoch > self._epoch:
            self._rotate(epoch)
        self._cur_calls += 1
        if slow:
            self._record_slow(now)

    def on_failure(self, exc: BaseException, start: float) -> None:
        """Record that the call admitted at ``start`` raised ``exc``.

        ``trio.Cancelled`` and other non-``Exception`` errors, and errors for which
        ``is_failure`` is False, record nothing (a probe's slot is freed).
        """
        if not isinstance(exc, Exception) or not self._is_failure(exc):
            tap = self.tap
            if tap is not None:
                tap(_IGNORED, self._now(), start)
            self._forget(start)
            return
        tap = self.tap
        if tap is not None:
            tap(_FAILURE, self._now(), start, type(exc).__name__)
        state = self._state
        if state in _RECORDING:
            if start < self._closed_since:
                return  # started before the breaker last closed: says nothing new
            now = self._now()
            self._storage.increment_counter()
            if self._m_failed is not None:
                self._m_failed.inc()
            if self._rate_rule or self._slow_rule:
                epoch = int(now * self._inv_bucket_s)
                if epoch > self._epoch:
                    self._rotate(epoch)
                self._cur_calls += 1
                self._cur_failures += 1
            if self._slow_rule and now - start >= self.slow_call_s:
                self._record_slow(now)
                if self._state is not state:
                    return  # the slow-call rule tripped the breaker
            if state is CircuitState.CLOSED:
                self._check_failure_rules(now, exc)
        elif state is CircuitState.HALF_OPEN and start >= self._half_open_since:
            self._trip(self._now(), f"probe failed: {type(exc).__name__}: {exc}")

    # -- mitigations -----------------------------------------------------------------

    def force_open(self, reason: str) -> None:
        """Refuse every call until :meth:`reset` (or another mode) is chosen."""
        self._record_mode("force_open", reason)
        self._transition(CircuitState.FORCED_OPEN, reason)

    def disable(self, reason: str = "disabled") -> None:
        """Let every call through and record nothing."""
        self._record_mode("disable", reason)
        self._transition(CircuitState.DISABLED, reason)

    def force_closed(self, reason: str = "forced closed") -> None:
        """Same as :meth:`disable`: always closed, nothing recorded."""
        self.disable(reason)

    def metrics_only(self, reason: str = "metrics only") -> None:
        """Record windows and metrics as in CLOSED, but never open."""
        self._record_mode("metrics_only", reason)
        self._transition(CircuitState.METRICS_ONLY, reason)

    def reset(self, reason: str = "reset") -> None:
        """Back to CLOSED with every counter cleared and the open interval at its start."""
        self._record_mode("reset", reason)
        self._trips = 0
        if self._state is CircuitState.CLOSED:  # no transition, but still a clean slate
            self._clear_window()
            self._storage.reset_counter()
        self._transition(CircuitState.CLOSED, reason)

    # -- internals -------------------------------------------------------------------

    def _record_mode(self, method: str, reason: str) -> None:
        tap = self.tap
        if tap is not None:
            tap(_MODE, self._now(), method, reason)

    def _admit(self) -> float:
        now = self._now()
        state = self._state
        if state is CircuitState.OPEN:
            if now < self._half_open_at:
                self._reject(now, self._half_open_at - now)
            self._enter_half_open(now)
            state = self._state
        if state is CircuitState.HALF_OPEN:
            if self._probes >= self.half_open_max_calls:
                self._reject(now, None)
            self._probes += 1
        elif state not in _PASSING:  # in _PASSING: changed by a listener meanwhile
            self._reject(now, None)
        tap = self.tap
        if tap is not None:
            tap(_ADMIT, now)
        return now

    def _reject(self, now: float, retry_after_s: float | None) -> NoReturn:
        tap = self.tap
        if tap is not None:
            tap(_REJECT, now)
        if self._m_rejected is not None:
            self._m_rejected.inc()
        raise CircuitOpen(self.name, retry_after_s=retry_after_s)

    def _forget(self, start: float) -> None:
        if (
            self._state is CircuitState.HALF_OPEN
            and start >= self._half_open_since
            and self._probes > 0
        ):
            self._probes -= 1

    def _probe_succeeded(self, start: float) -> None:
        if start < self._half_open_since:
            return  # a call from before the trip, not a probe
        now = self._now()
        if self._slow_rule and now - start >= self.slow_call_s:
            if self._m_slow is not None:
                self._m_slow.inc()
            self._trip(now, f"probe too slow: {now - start:.3f}s >= {self.slow_call_s}s")
            return
        self._storage.increment_success_counter()
        if self._storage.successes >= self.half_open_max_calls:
            self._trips = 0
            self._transition(
                CircuitState.CLOSED, f"{self._storage.successes} probes succeeded", now
            )

    def _record_slow(self, now: float) -> None:
        self._cur_slow += 1
        if self._m_slow is not None:
            self._m_slow.inc()
        if self._state is not CircuitState.CLOSED:
            return
        calls = self._sum_calls + self._cur_calls
        if calls < self.minimum_calls:
            return
        slow = self._sum_slow + self._cur_slow
        if slow >= self.slow_call_rate_threshold * calls:
            self._trip(
                now,
                f"slow-call rate {slow}/{calls} >= {self.slow_call_rate_threshold:g}"
                f" (calls >= {self.slow_call_s}s in {self.rate_window_s}s)",
            )

    def _check_failure_rules(self, now: float, exc: Exception) -> None:
        failures = self._storage.failures
        if failures >= self.fail_max:
            self._trip(now, f"{failures} consecutive failures, last {type(exc).__name__}")
            return
        calls = self._sum_calls + self._cur_calls
        if calls < self.minimum_calls:
            return
        failed = self._sum_failures + self._cur_failures
        if failed >= self.failure_rate_threshold * calls:
            self._trip(
                now,
                f"failure rate {failed}/{calls} >= {self.failure_rate_threshold:g}"
                f" in {self.rate_window_s}s",
            )

    def _rotate(self, epoch: int) -> None:
        """Move the window to bucket ``epoch``, expiring buckets that fell out of it."""
        gap = epoch - self._epoch
        if gap >= WINDOW_BUCKETS:
            self._clear_window()
        else:
            slot = self._epoch % WINDOW_BUCKETS
            self._ring_calls[slot] = self._cur_calls
            self._ring_failures[slot] = self._cur_failures
            self._ring_slow[slot] = self._cur_slow
            self._sum_calls += self._cur_calls
            self._sum_failures += self._cur_failures
            self._sum_slow += self._cur_slow
            # Slots between the old bucket and the new one hold buckets a whole window old.
            for k in range(self._epoch + 1, epoch + 1):
                slot = k % WINDOW_BUCKETS
                self._sum_calls -= self._ring_calls[slot]
                self._sum_failures -= self._ring_failures[slot]
                self._sum_slow -= self._ring_slow[slot]
                self._ring_calls[slot] = self._ring_failures[slot] = self._ring_slow[slot] = 0
        self._cur_calls = self._cur_failures = self._cur_slow = 0
        self._epoch = epoch

    def _clear_window(self) -> None:
        for ring in (self._ring_calls, self._ring_failures, self._ring_slow):
            for i in range(WINDOW_BUCKETS):
                ring[i] = 0
        self._sum_calls = self._sum_failures = self._sum_slow = 0
        self._cur_calls = self._cur_failures = self._cur_slow = 0

    def _trip(self, now: float, reason: str) -> None:
        self._trips += 1
        self._half_open_at = now + self.open_interval_s(self._trips)
        self._transition(CircuitState.OPEN, reason, now)

    def _enter_half_open(self, now: float) -> None:
        self._transition(
            CircuitState.HALF_OPEN,
            f"open for {self.open_interval_s(self._trips)}s (trip {self._trips})",
            now,
        )

    def _transition(self, new: CircuitState, reason: str, now: float | None = None) -> None:
        old = self._state
        if old is new:
            self._reason = reason
            return
        if now is None:
            now = self._now()
        tap = self.tap
        if tap is not None:
            # A HALF_OPEN entered lazily (at the next call or read) is dated when it
            # became due, so a recording and its replay agree whoever looked first.
            due = self._half_open_at if new is CircuitState.HALF_OPEN else now
            tap(_TRANSITION, min(now, due), new.value, reason)
        self._state = new
        self._passing = new in _PASSING
        self._recording = new in _RECORDING
        self._reason = reason
        storage = self._storage
        if new is CircuitState.HALF_OPEN:
            self._half_open_since = now
            self._probes = 0
        else:
            self._half_open_since = math.inf
        if new in _PASSING:
            self._closed_since = now
            self._clear_window()
            storage.reset_counter()
        if new is not CircuitState.OPEN:
            self._half_open_at = math.inf
        # Mirror the classic state into pybreaker, whose listeners hear the change. The
        # state setter builds pybreaker's state object, which resets its counters.
        classic = new.classic
        if storage.state != classic:
            storage.state = classic
            try:
                self.circuit.state = classic
            except Exception:  # a pybreaker listener failed; the breaker itself has moved
                log.exception("pybreaker listener failed on %s -> %s", old.value, new.value)
        if self._metrics is not None:
            self._metrics.breaker_state.labels(self._m_label).set(new.code)
            self._metrics.breaker_transitions.labels(self._m_label, new.value).inc()
        if self._events is not None:
            self._events.emit(
                BreakerStateChanged(
                    at=now,
                    wall=self._clock.wall(),
                    breaker=self.name,
                    old=old.value,
                    new=new.value,
                    reason=reason,
                )
            )
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def __repr__(self) -> str:
        return f"<Breaker {self.name!r} {self._state.value}: {self._reason}>"
