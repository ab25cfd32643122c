"""Retry policies on tenacity, kept off the success path.

:meth:`RetryPolicy.call` makes the first attempt itself, directly: a call that
succeeds never builds a tenacity object (that costs ~30 µs a call). Only when the
first attempt raises a transient error does tenacity take over, with that failure
as its first attempt's outcome, and decide from there:

- **stop**: after ``max_attempts`` attempts in all (the first one included), or when
  the next attempt would start at or after ``started_at + time_budget_s``, whichever
  comes first. The budget is on Trio time (tenacity's own ``stop_after_delay`` reads
  ``time.monotonic()``, which ``MockClock`` does not move);
- **wait** before attempt ``n + 1``: ``min(backoff_initial_s * backoff_multiplier **
  (n - 1), backoff_max_s)``, reduced by jitter to ``base * (1 - jitter * u)`` with
  ``u`` uniform in ``[0, 1)`` drawn from a seedable :class:`~engine.clock.Chance`
  (tenacity's jitter uses the global ``random``). Jitter only shortens a wait, so
  ``backoff_max_s`` stays a true maximum and waits at the cap do not synchronise.
  An error that carries ``retry_after_s`` (``RateLimited``) waits at least that long;
- **retry** only errors for which ``is_transient`` is True (by default
  :class:`~engine.errors.TransientProviderError`). Permanent errors and ``LoadShed``
  are raised at once; ``trio.Cancelled`` is never caught, retried or counted;
- **sleep** is ``trio.sleep``; the error raised in the end is the last attempt's
  own, never tenacity's ``RetryError``.

A policy holds no per-call state: a fresh ``AsyncRetrying`` is built per retried
call (tenacity keeps its iteration state in a thread-local, which concurrent Trio
tasks would share).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple, cast

import tenacity
import trio

from engine.clock import Chance
from engine.errors import TransientProviderError

if TYPE_CHECKING:
    from prometheus_client import Counter

    from engine.metrics import Metrics

__all__ = ["RetryPolicy"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


def _default_is_transient(exc: Exception) -> bool:
    return isinstance(exc, TransientProviderError)


class _StopAtDeadline(tenacity.stop.stop_base):
    """Stop when the next attempt would start at or after ``deadline`` (Trio time)."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        return trio.current_time() + retry_state.upcoming_sleep >= self.deadline


class RetryPolicy:
    """When and how often to try a failed call again. See the module docstring."""

    def __init__(
        self,
        name: str,
        *,
        max_attempts: int,
        time_budget_s: float,
        backoff_initial_s: float,
        backoff_max_s: float,
        backoff_multiplier: float,
        jitter: float,
        chance: Chance | None = None,
        metrics: Metrics | None = None,
        is_transient: Callable[[Exception], bool] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"retry {name!r}: max_attempts must be >= 1")
        if not time_budget_s > 0 or backoff_initial_s < 0 or backoff_max_s < backoff_initial_s:
            raise ValueError(
                f"retry {name!r}: need time_budget_s > 0 and 0 <= backoff_initial_s <= backoff_max_s"
            )
        if backoff_multiplier < 1 or not 0 <= jitter <= 1:
            raise ValueError(f"retry {name!r}: need backoff_multiplier >= 1 and 0 <= jitter <= 1")
        self.name = name
        self.max_attempts = max_attempts
        self.time_budget_s = time_budget_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.backoff_multiplier = backoff_multiplier
        self.jitter = jitter
        self.chance = chance if chance is not None else Chance()
        self.is_transient: Callable[[Exception], bool] = (
            is_transient if is_transient is not None else _default_is_transient
        )
        self._m_attempts: Counter | None = None
        if metrics is not None:
            self._m_attempts = metrics.retry_attempts.labels(metrics.label("policy", name))

    def backoff_s(self, attempt: int) -> float:
        """The wait after failed attempt number ``attempt`` (1-based), before jitter."""
        base = self.backoff_initial_s * self.backoff_multiplier ** (attempt - 1)
        return min(base, self.backoff_max_s)

    def will_retry(self, exc: BaseException) -> bool:
        """Whether a failed first attempt with ``exc`` would be tried again at all."""
        return self.max_attempts > 1 and isinstance(exc, Exception) and self.is_transient(exc)

    async def call(self, fn: Callable[[*Ts], Awaitable[T]], *args: *Ts) -> T:
        """``await fn(*args)``, tried again on transient errors per the policy."""
        started_at = trio.current_time()
        try:
            return await fn(*args)
        except Exception as exc:
            if not self.will_retry(exc):
                raise
            error = exc
        return await self.after_failure(error, started_at, fn, *args)

    async def after_failure(
        self,
        error: Exception,
        started_at: float,
        fn: Callable[[*Ts], Awaitable[T]],
        *args: *Ts,
    ) -> T:
        """Go on after a first attempt, begun at ``started_at``, failed with ``error``.

        For callers that make the first attempt themselves (the Guard). Raises
        ``error`` itself when it is not worth retrying.
        """
        if not self.will_retry(error):
            raise error
        replay: list[Exception] = [error]
        m_attempts = self._m_attempts

        async def attempt() -> T:
            if replay:  # tenacity's first attempt is the one already made
                raise replay.pop()
            if m_attempts is not None:
                m_attempts.inc()
            return await fn(*args)

        # Looked up at call time, so tests can prove the success path never gets here.
        retrying = tenacity.AsyncRetrying(
            sleep=trio.sleep,
            stop=(
                tenacity.stop_after_attempt(self.max_attempts)
                | _StopAtDeadline(started_at + self.time_budget_s)
            ),
            wait=self._wait,
            retry=tenacity.retry_if_exception(self._should_retry),
            reraise=True,
            name=self.name,
        )
        return cast("T", await retrying(attempt))

    def _should_retry(self, exc: BaseException) -> bool:
        return isinstance(exc, Exception) and self.is_transient(exc)

    def _wait(self, retry_state: tenacity.RetryCallState) -> float:
        wait = self.backoff_s(retry_state.attempt_number)
        if self.jitter:
            wait *= 1.0 - self.jitter * self.chance.random()
        outcome = retry_state.outcome
        hint: Any = getattr(outcome.exception(), "retry_after_s", None) if outcome else None
        if isinstance(hint, int | float) and hint > wait:
            wait = float(hint)
        return wait

    def __repr__(self) -> str:
        return (
            f"<RetryPolicy {self.name!r} attempts={self.max_attempts}"
            f" budget={self.time_budget_s}s backoff={self.backoff_initial_s}s"
            f"x{self.backoff_multiplier}<= {self.backoff_max_s}s jitter={self.jitter}>"
        )
