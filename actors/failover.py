"""Provider failover in the spirit of happy eyeballs: the next provider at once, never blindly.

A :class:`Failover` holds the ordered routes of one channel, each an adapter and
the engine :class:`~engine.guard.Guard` around it (bulkhead → breaker → deadline).
:meth:`Failover.attempt` walks the routes for one message; per route:

=====================================  ==============================================
the guarded ``send`` ended in          the failover
=====================================  ==============================================
``Accepted``                           done: DISPATCHED by that provider
``CircuitOpen``, ``BulkheadFull``,     the next route AT ONCE (nothing was sent)
``RateLimitExceeded``
``ProviderUnavailable``,               the next route AT ONCE (definitely not taken)
``RateLimited``, ``AuthFailed``
``RecipientGone``                      stop: UNDELIVERABLE (the caller marks it dead)
``Rejected``                           stop: FAILED (the message itself is bad)
``ProviderTimeout`` (ambiguous)        settle with ``adapter.status(message)``:
                                       ACCEPTED / DELIVERED → done, no failover;
                                       NOT_FOUND / FAILED → the next route;
                                       UNDELIVERABLE → stop; ``None``, an error or no
                                       answer within ``status_timeout_s`` → the next
                                       route, and the outcome carries
                                       ``possible_duplicate=True`` (counted, logged)
=====================================  ==============================================

A *round* is one walk of the routes. When every route failed definitely, the
failover backs off with the ``rounds`` :class:`~engine.retry.RetryPolicy`'s
profile (``max_attempts`` rounds, ``time_budget_s``, exponential backoff with
jitter from its seeded :class:`~engine.clock.Chance`, at least a ``Retry-After``
hint) and walks again. Once the policy is spent, :meth:`attempt` answers
QUEUED (``possible_duplicate`` when a provider that timed out never answered its
status query): the dispatch stays ``queued``. The channel's dispatcher
(:class:`~actors.dispatcher.ChannelDispatcher`) parks it for ``requeue_after_s``
and attempts again until ``give_up_after_s`` after its acceptance, then ends it
FAILED ``providers_exhausted`` -- or UNKNOWN ``ambiguous_timeout`` if it may have
been sent. Within an attempt, a route left unsettled is asked again at the start
of every later round.

The guards must not retry (``max_attempts == 1``): a retry inside a guard would
resend after a timeout without settling it, and would delay the failover.

Every guarded call is recorded for the row-1 metric ``triage_sms_provider_error_ratio``
(``_numerator_total``: failed calls -- unavailable, timeout, rate limited, auth, and
calls the provider's open breaker refused; ``_denominator_total``: calls made or
refused by the breaker; label ``provider``; our own load shedding -- a full bulkhead,
a rate limit -- counts in neither) and fed to the row-1
:class:`~engine.detectors.RatioDetector` if one is given (one for all, or per provider).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import trio
from prometheus_client import CollectorRegistry, Counter

from engine.detectors import RatioDetector
from engine.errors import (
    AuthFailed,
    BulkheadFull,
    CircuitOpen,
    ProviderTimeout,
    RateLimited,
    RateLimitExceeded,
    Rejected,
    TransientProviderError,
)
from engine.guard import Guard
from engine.metrics import families
from engine.retry import RetryPolicy
from providers.channel import Accepted, Adapter, DeliveryState, Message, RecipientGone

ROW: Final = 1  # the catalog row this actor owns: SMS provider outage
__all__ = [
    "AMBIGUOUS_REASON",
    "EXHAUSTED_REASON",
    "Attempt",
    "AttemptResult",
    "Failover",
    "FailoverStats",
    "Outcome",
    "OutcomeKind",
    "Route",
]

log = logging.getLogger("triage.failover")

EXHAUSTED_REASON = "providers_exhausted"
AMBIGUOUS_REASON = "ambiguous_timeout"


class OutcomeKind(enum.StrEnum):
    DISPATCHED = "dispatched"
    FAILED = "failed"
    UNDELIVERABLE = "undeliverable"
    UNKNOWN = "unknown"  # a provider may have taken it; nobody could say
    QUEUED = "queued"  # every provider failed definitely: requeue later


class AttemptResult(enum.StrEnum):
    ACCEPTED = "accepted"
    SKIPPED = "skipped"  # breaker open, bulkhead full, rate limit: nothing sent
    UNAVAILABLE = "unavailable"  # definitely not taken
    REJECTED = "rejected"
    RECIPIENT_GONE = "recipient_gone"
    TIMEOUT_TAKEN = "timeout_taken"  # the status query says it was taken
    TIMEOUT_NOT_TAKEN = "timeout_not_taken"  # the status query says NOT_FOUND / FAILED
    TIMEOUT_UNSETTLED = "timeout_unsettled"  # no status answer: possible duplicate


@dataclass(frozen=True, slots=True)
class Attempt:
    provider: str
    result: AttemptResult
    at: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How :meth:`Failover.attempt` ended for one message."""

    kind: OutcomeKind
    provider: str | None = None
    provider_ref: str | None = None
    reason: str | None = None
    possible_duplicate: bool = False
    recipient_gone: bool = False
    rounds: int = 0
    attempts: tuple[Attempt, ...] = ()
    retry_at: float | None = None  # QUEUED: when the requeue is due (Trio time)


@dataclass(frozen=True, slots=True)
class Route:
    adapter: Adapter
    guard: Guard


@dataclass(slots=True)
class FailoverStats:
    calls: int = 0
    failed_calls: int = 0
    rounds: int = 0
    failovers: int = 0  # moves to the next route after a failure or a refusal
    settled_taken: int = 0
    settled_not_taken: int = 0
    possible_duplicates: int = 0
    queued: int = 0
    per_provider: dict[str, list[int]] = field(default_factory=dict)  # [failed, calls]


class _ProviderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.failed = Counter(
            "triage_sms_provider_error_ratio_numerator",
            "SMS provider calls that failed (5xx, timeout, refused, rate limited)",
            ["provider"],
            registry=registry,
        )
        self.calls = Counter(
            "triage_sms_provider_error_ratio_denominator",
            "SMS provider calls made",
            ["provider"],
            registry=registry,
        )
        self.possible_duplicates = Counter(
            "triage_dispatch_possible_duplicates",
            "Messages failed over after a timeout no status query could settle",
            ["channel"],
            registry=registry,
        )


class _Settle(enum.Enum):
    TAKEN = "taken"
    NOT_TAKEN = "not_taken"
    GONE = "gone"
    UNSETTLED = "unsettled"


class Failover:
    """Ordered routes for one channel; see the module docstring for the rules."""

    def __init__(
        self,
        name: str,
        routes: Sequence[Route],
        *,
        rounds: RetryPolicy,
        status_timeout_s: float,
        requeue_after_s: float,
        give_up_after_s: float,
        registry: CollectorRegistry | None = None,
        error_ratio: RatioDetector | Mapping[str, RatioDetector] | None = None,
    ) -> None:
        if not routes:
            raise ValueError(f"failover {name!r}: needs at least one route")
        for route in routes:
            if route.guard.retry.max_attempts != 1:
                raise ValueError(
                    f"failover {name!r}: guard {route.guard.name!r} retries"
                    f" ({route.guard.retry.max_attempts} attempts); the failover does the"
                    " retrying, a guard retry would resend an unsettled timeout"
                )
        if not status_timeout_s > 0 or requeue_after_s < 0 or give_up_after_s < 0:
            raise ValueError(
                f"failover {name!r}: status_timeout_s > 0, requeue_after_s and"
                " give_up_after_s >= 0 required"
            )
        self.name = name
        self.routes = tuple(routes)
        self.rounds = rounds
        self.status_timeout_s = status_timeout_s
        self.requeue_after_s = requeue_after_s
        self.give_up_after_s = give_up_after_s
        self.error_ratio = error_ratio
        self.stats = FailoverStats()
        self._metrics = families(registry, _ProviderMetrics) if registry is not None else None

    def route_for(self, name: str) -> Route:
        for route in self.routes:
            if route.adapter.name == name:
                return route
        raise KeyError(name)

    async def attempt(self, message: Message, *, probe: bool = False) -> Outcome:
        """Rounds over the routes until one takes the message, the message is refused,
        or the ``rounds`` policy is spent (QUEUED, ``retry_at`` set).

        ``probe``: the message may have been sent before (a dispatch resumed after a
        crash between the send and its record): every provider that answers status
        queries is asked first, and one that already took it ends the attempt with
        nothing sent again. A provider that cannot tell is sent to as usual."""
        if probe:
            for route in self.routes:
                outcome, _ = await self._ask(route, message)
                if outcome is not None:
                    return outcome
        return await self._attempt(message, [])

    # -- rounds ---------------------------------------------------------------------------

    async def _attempt(self, message: Message, unsettled: list[Route]) -> Outcome:
        policy = self.rounds
        started = trio.current_time()
        attempts: list[Attempt] = []
        round_no = 0
        while True:
            round_no += 1
            self.stats.rounds += 1
            outcome, hint = await self._round(message, unsettled, attempts)
            if outcome is not None:
                return _with(outcome, tuple(attempts), round_no)
            wait = policy.backoff_s(round_no)
            if policy.jitter:
                wait *= 1.0 - policy.jitter * policy.chance.random()
            if hint is not None and hint > wait:
                wait = hint
            now = trio.current_time()
            if round_no >= policy.max_attempts or now + wait >= started + policy.time_budget_s:
                self.stats.queued += 1
                return Outcome(
                    kind=OutcomeKind.QUEUED,
                    reason=EXHAUSTED_REASON,
                    rounds=round_no,
                    attempts=tuple(attempts),
                    retry_at=now + self.requeue_after_s,
                    possible_duplicate=bool(unsettled),
                )
            await trio.sleep(wait)

    async def _round(
        self, message: Message, unsettled: list[Route], attempts: list[Attempt]
    ) -> tuple[Outcome | None, float | None]:
        """One walk of the routes: an outcome, or None and the longest Retry-After seen."""
        # A provider that timed out earlier may answer its status query by now.
        for route in tuple(unsettled):
            outcome, settle = await self._ask(route, message)
            if settle in (_Settle.TAKEN, _Settle.NOT_TAKEN):
                unsettled.remove(route)
            if outcome is not None:
                return outcome, None
        hint: float | None = None
        now = trio.current_time
        for index, route in enumerate(self.routes):
            if index:
                self.stats.failovers += 1
            name = route.adapter.name
            try:
                # Keyed by tenant: the rate limit is per tenant ([rate_limits.tenant_sends])
                # and one tenant holds at most a partition of the provider's bulkhead.
                accepted: Accepted = await route.guard.call(
                    route.adapter.send, message, key=message.tenant_id
                )
            except CircuitOpen as exc:
                # The provider is known down: the call failed as surely as a refused
                # connection. Counting it keeps the row-1 ratio high while the outage
                # lasts, however many calls succeeded before it (the window stays honest).
                self._record(name, failed=True)
                attempts.append(Attempt(name, AttemptResult.SKIPPED, now(), _text(exc)))
                continue
            except (BulkheadFull, RateLimitExceeded) as exc:
                attempts.append(Attempt(name, AttemptResult.SKIPPED, now(), _text(exc)))
                continue
            except RecipientGone as exc:
                self._record(name, failed=False)
                attempts.append(Attempt(name, AttemptResult.RECIPIENT_GONE, now(), _text(exc)))
                return Outcome(
                    kind=OutcomeKind.UNDELIVERABLE,
                    provider=name,
                    reason=f"recipient_gone: {exc.reason}",
                    recipient_gone=True,
                    possible_duplicate=bool(unsettled),
                ), None
            except AuthFailed as exc:
                self._record(name, failed=True)
                attempts.append(Attempt(name, AttemptResult.UNAVAILABLE, now(), _text(exc)))
                continue
            except Rejected as exc:
                self._record(name, failed=False)
                attempts.append(Attempt(name, AttemptResult.REJECTED, now(), _text(exc)))
                return Outcome(
                    kind=OutcomeKind.FAILED,
                    provider=name,
                    reason=f"rejected: {exc}",
                    possible_duplicate=bool(unsettled),
                ), None
            except ProviderTimeout as exc:
                self._record(name, failed=True)
                settle, answer_ref = await self._settle(route, message)
                if settle is _Settle.TAKEN:
                    self.stats.settled_taken += 1
                    attempts.append(Attempt(name, AttemptResult.TIMEOUT_TAKEN, now(), _text(exc)))
                    return Outcome(
                        kind=OutcomeKind.DISPATCHED,
                        provider=name,
                        provider_ref=answer_ref,
                        possible_duplicate=bool(unsettled),
                    ), None
                if settle is _Settle.GONE:
                    attempts.append(Attempt(name, AttemptResult.RECIPIENT_GONE, now(), _text(exc)))
                    return Outcome(
                        kind=OutcomeKind.UNDELIVERABLE,
                        provider=name,
                        reason="recipient_gone",
                        recipient_gone=True,
                        possible_duplicate=bool(unsettled),
                    ), None
                if settle is _Settle.NOT_TAKEN:
                    self.stats.settled_not_taken += 1
                    attempts.append(
                        Attempt(name, AttemptResult.TIMEOUT_NOT_TAKEN, now(), _text(exc))
                    )
                    continue
                attempts.append(Attempt(name, AttemptResult.TIMEOUT_UNSETTLED, now(), _text(exc)))
                if route not in unsettled:
                    unsettled.append(route)
                    self._possible_duplicate(message, name)
                continue
            except TransientProviderError as exc:  # ProviderUnavailable, RateLimited, others
                self._record(name, failed=True)
                if isinstance(exc, RateLimited) and exc.retry_after_s is not None:
                    hint = exc.retry_after_s if hint is None else max(hint, exc.retry_after_s)
                attempts.append(Attempt(name, AttemptResult.UNAVAILABLE, now(), _text(exc)))
                continue
            self._record(name, failed=False)
            attempts.append(Attempt(name, AttemptResult.ACCEPTED, now()))
            return Outcome(
                kind=OutcomeKind.DISPATCHED,
                provider=accepted.provider or name,
                provider_ref=accepted.provider_ref,
                possible_duplicate=bool(unsettled),
            ), None
        return None, hint

    async def _ask(self, route: Route, message: Message) -> tuple[Outcome | None, _Settle]:
        """Settle ``message`` with ``route``'s provider: the outcome it decides (taken:
        dispatched there; gone: undeliverable), or None, and the settle itself."""
        settle, answer_ref = await self._settle(route, message)
        if settle is _Settle.TAKEN:
            self.stats.settled_taken += 1
            outcome = Outcome(
                kind=OutcomeKind.DISPATCHED,
                provider=route.adapter.name,
                provider_ref=answer_ref,
            )
            return outcome, settle
        if settle is _Settle.GONE:
            outcome = Outcome(
                kind=OutcomeKind.UNDELIVERABLE,
                provider=route.adapter.name,
                reason="recipient_gone",
                recipient_gone=True,
            )
            return outcome, settle
        return None, settle

    async def _settle(self, route: Route, message: Message) -> tuple[_Settle, str | None]:
        """Ask ``route``'s provider what became of ``message``, within ``status_timeout_s``."""
        answer = None
        with trio.move_on_after(self.status_timeout_s):
            try:
                answer = await route.adapter.status(message)
            except Exception as exc:  # any failure leaves it unsettled, never "not sent"
                log.warning(
                    "failover %s: status query to %s failed: %r", self.name, route.adapter.name, exc
                )
                answer = None
        if answer is None:
            return _Settle.UNSETTLED, None
        if answer.state in (DeliveryState.ACCEPTED, DeliveryState.DELIVERED):
            return _Settle.TAKEN, answer.provider_ref
        if answer.state is DeliveryState.UNDELIVERABLE:
            return _Settle.GONE, answer.provider_ref
        return _Settle.NOT_TAKEN, None

    # -- accounting ---------------------------------------------------------------------------

    def _record(self, provider: str, *, failed: bool) -> None:
        stats = self.stats
        stats.calls += 1
        counts = stats.per_provider.setdefault(provider, [0, 0])
        counts[1] += 1
        if failed:
            stats.failed_calls += 1
            counts[0] += 1
        if self._metrics is not None:
            self._metrics.calls.labels(provider).inc()
            numerator = self._metrics.failed.labels(provider)  # the series exists from 0
            if failed:
                numerator.inc()
        detector = self.error_ratio
        if isinstance(detector, RatioDetector):
            detector.observe(failed)
        elif detector is not None:
            one = detector.get(provider)
            if one is not None:
                one.observe(failed)

    def _possible_duplicate(self, message: Message, provider: str) -> None:
        self.stats.possible_duplicates += 1
        if self._metrics is not None:
            self._metrics.possible_duplicates.labels(str(message.channel)).inc()
        log.warning(
            "failover %s: %s timed out on %s and no status query settled it: failing over,"
            " possible duplicate",
            self.name,
            provider,
            message.client_ref,
        )

    def __repr__(self) -> str:
        names = ", ".join(r.adapter.name for r in self.routes)
        return f"<Failover {self.name!r} [{names}]>"


def _with(outcome: Outcome, attempts: tuple[Attempt, ...], rounds: int) -> Outcome:
    return Outcome(
        kind=outcome.kind,
        provider=outcome.provider,
        provider_ref=outcome.provider_ref,
        reason=outcome.reason,
        possible_duplicate=outcome.possible_duplicate,
        recipient_gone=outcome.recipient_gone,
        rounds=rounds,
        attempts=attempts,
        retry_at=outcome.retry_at,
    )


def _text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"
