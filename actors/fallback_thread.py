"""Fallback threads after failed virtual visits, without a fallback loop (catalog row 14).

Every session the Jitsi pool gives up on (row 4) becomes a :class:`FallbackRequest`.
The actor opens a secure message thread for the patient in place of the visit --
but repeated failures must not spawn a thread each (row 14, "thread
proliferation"). Three fences, innermost last:

1. **A breaker per patient and day** (``[breakers.<fallback.breaker>]``, default
   ``fail_max = 1``): it counts the patient-day's failed visits. Closed, a request
   may open a thread; once it has opened (after ``fail_max`` failures) later requests
   share the patient-day's newest thread. After its reset interval one request is
   let through as the half-open probe, which opens it again.
2. **The spike detector** (``triage_fallback_initiated_total``, spike over baseline,
   fed with every request): when it fires (mitigation ``open_patient_day_breaker``)
   the actor is CONTAINED: every patient-day breaker that has a thread is forced
   open, and a patient-day that already has a thread gets no other, until the
   detector clears. A ticket :class:`FallbackContained` notice goes out.
3. **The hard cap** ``max_threads_per_patient_day``, kept by the database itself
   (``fallback_threads`` slots, ``0007_virtual_sessions.sql``): however the breakers
   are set and however many replicas race, no patient-day has more threads.

A request whose session already has its thread changes nothing (``linked``), so the
pool may ask again, and so does the sweep: every ``sweep_interval_s`` the failed
sessions without a thread for ``sweep_after_s`` (a request lost in a crash of the
pool or of this actor) are requested again. A database failure retries the request after ``retry_after_s``,
up to ``max_attempts`` times (then it is logged and counted ``abandoned``).

Counters: ``triage_fallback_initiated_total`` (every request: the row's metric) and
``triage_fallback_threads_total{outcome}`` (spawned, reused, linked, refused,
abandoned).

**Replicas** (issue 12): runs on every replica, no lease: the per-patient-day
limit is held by the database, however many replicas sweep.
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter

from engine.actor import Actor, Timer
from engine.breaker import Breaker, CircuitState
from engine.detectors import SpikeOverBaselineDetector
from engine.errors import CircuitOpen, ProviderError
from engine.events import EventBus, Notice
from engine.metrics import families
from engine.statelog import StateLog
from providers.db.virtual_sessions import FallbackFacts, FallbackResult, SessionRef

__all__ = [
    "CONTAIN",
    "RELEASE",
    "ROW",
    "Contain",
    "FallbackContained",
    "FallbackMessage",
    "FallbackRequest",
    "FallbackState",
    "FallbackStatistics",
    "FallbackStore",
    "FallbackThreads",
    "Release",
    "Sweep",
]

log = logging.getLogger("triage.fallback")

ROW: Final = 14  # the catalog row this actor owns: fallback loop


class FallbackRequest(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """A failed visit: open (or share) a fallback thread for its patient-day."""

    tenant_id: uuid.UUID
    session_id: uuid.UUID
    appointment_id: str
    reason: str
    attempt: int = 1
    #: counted in ``triage_fallback_initiated_total`` (False: the sweep asking again)
    initiated: bool = True


class Contain(msgspec.Struct, frozen=True, tag=True):
    """Row 14's detector fired: open the patient-day breakers."""


class Release(msgspec.Struct, frozen=True, tag=True):
    """Row 14's detector cleared."""


class Sweep(msgspec.Struct, frozen=True, tag=True):
    """The timer's turn: ask again for failed sessions that still have no thread."""


CONTAIN = Contain()
RELEASE = Release()
SWEEP = Sweep()
FallbackMessage = FallbackRequest | Contain | Release | Sweep


class FallbackState(enum.Enum):
    NORMAL = "normal"
    CONTAINED = "contained"  # the spike detector fires: one thread per patient-day at most
    STOPPED = "stopped"


class FallbackContained(Notice, frozen=True, kw_only=True):
    """Row 14's mitigation ran (or ended: ``ended``)."""

    breakers_opened: int
    ended: bool = False

    @property
    def resolved(self) -> bool:
        return self.ended


class FallbackStatistics(msgspec.Struct, frozen=True, kw_only=True):
    state: FallbackState
    requests: int
    spawned: int
    reused: int
    linked: int
    refused: int
    abandoned: int
    retried: int
    swept: int  # requests made again by the sweep
    patient_days: int
    forced_open: int  # patient-day breakers forced open by the containment


class FallbackStore(Protocol):
    """Where fallback threads live (``DbFallbackStore`` in ``supervisors.virtual``)."""

    async def facts(self, tenant_id: uuid.UUID, session_id: uuid.UUID) -> FallbackFacts | None: ...

    async def spawn(
        self, tenant_id: uuid.UUID, session_id: uuid.UUID, cap: int, allow_new: bool
    ) -> FallbackResult: ...

    async def without_fallback(self, limit: int, older_than_s: float) -> list[SessionRef]: ...


class _VisitFailed(Exception):
    """What a patient-day breaker counts: one more failed visit of that patient-day."""


def _counts_visit(exc: BaseException) -> bool:
    return isinstance(exc, _VisitFailed)


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.initiated = Counter(
            "triage_fallback_initiated",
            "Fallback message threads requested after a failed virtual visit",
            registry=registry,
        )
        self.threads = Counter(
            "triage_fallback_threads",
            "Fallback requests by outcome (spawned, reused, linked, refused, abandoned)",
            ["outcome"],
            registry=registry,
        )


class FallbackThreads(Actor[FallbackMessage]):
    """See the module docstring. ``breaker`` is the ``[breakers.*]`` profile's keywords."""

    name = "fallback_threads"
    uses_tasks = True  # send_after for retries

    def __init__(
        self,
        *,
        store: FallbackStore,
        breaker: dict[str, Any],
        cap: int,
        max_patient_days: int,
        retry_after_s: float,
        max_attempts: int,
        sweep_interval_s: float,
        sweep_after_s: float,
        sweep_batch: int,
        detector: SpikeOverBaselineDetector | None = None,
        events: EventBus | None = None,
        wall: Callable[[], float] | None = None,
        severity: str = "ticket",
        registry: CollectorRegistry | None = None,
    ) -> None:
        if cap < 1 or max_patient_days < 1 or max_attempts < 1 or not retry_after_s > 0:
            raise ValueError(
                "fallback threads: cap, max_patient_days, max_attempts >= 1 and"
                " retry_after_s > 0 required"
            )
        Breaker("fallback_check", **breaker)  # the profile's values, refused here if bad
        self.store = store
        self.breaker_kwargs = breaker
        self.cap = cap
        self.max_patient_days = max_patient_days
        self.retry_after_s = retry_after_s
        self.max_attempts = max_attempts
        self.sweep_interval_s = sweep_interval_s
        self.sweep_after_s = sweep_after_s
        self.sweep_batch = sweep_batch
        self.detector = detector
        self.events = events
        self.wall = wall
        self.severity = severity
        self.breakers: OrderedDict[str, Breaker] = OrderedDict()
        self.with_thread: set[str] = set()  # patient-days known to have a thread
        self.states = StateLog("fallback threads", FallbackState.NORMAL, log,
                               warn={FallbackState.CONTAINED})  # fmt: skip
        self.counts = dict.fromkeys(
            ("requests", "spawned", "reused", "linked", "refused", "abandoned", "retried",
             "swept"), 0,
        )  # fmt: skip
        self._metrics = families(registry, _Metrics) if registry is not None else None

    def statistics(self) -> FallbackStatistics:
        forced = sum(1 for b in self.breakers.values() if b.state is CircuitState.FORCED_OPEN)
        return FallbackStatistics(
            state=self.states.state,
            patient_days=len(self.breakers),
            forced_open=forced,
            **self.counts,
        )

    def timers(self) -> Sequence[Timer]:
        return [Timer(self.sweep_interval_s, SWEEP)]

    def breaker_for(self, key: str) -> Breaker:
        """The patient-day's breaker (least recently used ones beyond the bound dropped)."""
        breaker = self.breakers.get(key)
        if breaker is None:
            breaker = Breaker(f"fallback:{key}", **self.breaker_kwargs, is_failure=_counts_visit)
            if self.states.state is FallbackState.CONTAINED and key in self.with_thread:
                breaker.force_open("row 14: fallback spike")
            self.breakers[key] = breaker
            while len(self.breakers) > self.max_patient_days:
                old, _ = self.breakers.popitem(last=False)
                self.with_thread.discard(old)
        else:
            self.breakers.move_to_end(key)
        return breaker

    async def handle(self, message: FallbackMessage) -> None:
        match message:
            case FallbackRequest():
                await self._request(message)
            case Contain():
                self._contain()
            case Release():
                self.states.enter(FallbackState.NORMAL, "fallback spike over")
                self._notify(0, ended=True)
            case Sweep():
                await self._sweep()

    # -- one request --------------------------------------------------------------------

    async def _request(self, request: FallbackRequest) -> None:
        if request.attempt == 1 and request.initiated:
            self.counts["requests"] += 1
            if self._metrics is not None:
                self._metrics.initiated.inc()
            if self.detector is not None:
                self.detector.observe(1)
        try:
            facts = await self.store.facts(request.tenant_id, request.session_id)
        except ProviderError as exc:
            self._retry(request, exc)
            return
        if facts is None:
            self._count("refused")
            log.warning(
                "fallback: no session %s (tenant %s)", request.session_id, request.tenant_id
            )
            return
        if facts.linked is not None:
            self._count("linked")
            return
        key = f"{request.tenant_id}:{facts.patient_key}:{facts.day.isoformat()}"
        breaker = self.breaker_for(key)
        start: float | None
        try:
            start = breaker.before_call()
        except CircuitOpen:
            start = None
        contained = self.states.state is FallbackState.CONTAINED and facts.threads > 0
        allow_new = start is not None and not contained
        try:
            result = await self.store.spawn(
                request.tenant_id, request.session_id, self.cap, allow_new
            )
        except ProviderError as exc:
            if start is not None:
                breaker.on_failure(exc, start)  # not a visit: frees a probe slot only
            self._retry(request, exc)
            return
        if start is not None:
            breaker.on_failure(_VisitFailed(request.reason), start)
        if result.thread_id is not None:
            self.with_thread.add(key)
        self._count(result.outcome)
        log.info(
            "fallback: session %s (%s): %s thread %s", request.session_id, request.reason,
            result.outcome, result.thread_id,
        )  # fmt: skip

    async def _sweep(self) -> None:
        """Failed sessions still without a thread: requested again (not counted as
        initiated: the visit's failure was counted when it happened)."""
        try:
            orphans = await self.store.without_fallback(self.sweep_batch, self.sweep_after_s)
        except ProviderError as exc:
            log.warning("fallback: sweep skipped: %s", exc)
            return
        for ref in orphans:
            self.counts["swept"] += 1
            request = FallbackRequest(
                tenant_id=ref.tenant_id, session_id=ref.id, appointment_id=ref.appointment_id,
                reason="sweep", initiated=False,
            )  # fmt: skip
            await self._request(request)

    def _retry(self, request: FallbackRequest, exc: Exception) -> None:
        if request.attempt >= self.max_attempts:
            self._count("abandoned")
            log.error(
                "fallback: session %s abandoned after %d attempts: %s",
                request.session_id, request.attempt, exc,
            )  # fmt: skip
            return
        self.counts["retried"] += 1
        self.send_after(
            self.retry_after_s, msgspec.structs.replace(request, attempt=request.attempt + 1)
        )

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        if self._metrics is not None:
            self._metrics.threads.labels(outcome).inc()

    # -- row 14's mitigation ------------------------------------------------------------

    def _contain(self) -> None:
        opened = 0
        for key, breaker in self.breakers.items():
            if key in self.with_thread and breaker.state is not CircuitState.FORCED_OPEN:
                breaker.force_open("row 14: fallback spike")
                opened += 1
        self.states.enter(FallbackState.CONTAINED, f"fallback spike: {opened} breaker(s) opened")
        self._notify(opened)

    def _notify(self, opened: int, *, ended: bool = False) -> None:
        if self.events is None:
            return
        self.events.emit(
            FallbackContained(
                at=trio.current_time(),
                wall=self.wall() if self.wall is not None else 0.0,
                severity=self.severity,
                row=ROW,
                breakers_opened=opened,
                ended=ended,
            )
        )


def forced_open(breakers: Sequence[Breaker]) -> int:
    """How many of ``breakers`` are forced open (for tests and the scenario)."""
    return sum(1 for b in breakers if b.state is CircuitState.FORCED_OPEN)
