"""The DLR ingress: delivery-receipt and bounce webhooks, catalog row 13 (DLR callback flood).

:class:`DlrIngress` is an ASGI app (mounted at ``/webhooks/`` by the daemon's
:class:`~supervisors.http.HealthApp`, served by hypercorn on Trio) that offers
every callback to :class:`DlrPool`, the actor owning a bounded queue drained by
a pool of DLR workers::

    POST /webhooks/dlr/{provider}       a provider's delivery receipts
    POST /webhooks/bounces/{provider}   bounces (DSN or a provider's event webhook)

A request goes through these steps, cheapest first; each refusal is a typed
:class:`WebhookRefused`, answered from the one answer table (:data:`DLR_RULES`
before :data:`actors.answers.RULES`: status, code, ``Retry-After``) as JSON
``{"error": code, "message": ..., "provider"?: ...}``, and changes nothing (the sink
sees nothing):

=====================================  ====  ======================================
wrong path / method                    404 / 405 (``Allow: POST``)
no parser for ``{provider}``           404   unknown_provider
``Content-Length`` over the cap        413   payload_too_large (nothing read)
provider's token bucket empty          429   rate_limited (``Retry-After``)
body over the cap while reading        413   payload_too_large (reading stops)
signature missing or wrong             401   bad_signature (the parser verifies)
body unreadable                        400   malformed_receipt
more receipts than the queue holds     413   too_many_receipts
pool not running                       503   not_ready
the pool cannot take them              429   queue_full (``Retry-After``; shed)
not applied within ``ack_timeout_s``   503   ack_timeout (``Retry-After``)
the sink failed                        503   sink_failed (``Retry-After``)
applied                                200   {"accepted": n}
=====================================  ====  ======================================

The rate limit comes before the body is read and verified: a flood -- genuine
retries or forgeries -- is refused before it costs an HMAC (the row's impact is
CPU saturation). Forged requests therefore spend the provider's tokens; the
genuine callbacks they displace get a 429 and are retried by the provider.

**The acknowledgement contract.** 2xx is sent only for receipts the
:class:`ReceiptSink` has applied (durably: the sink is the database writer).
A request waits for its receipts at most ``ack_timeout_s``; otherwise it gets a
503 and the provider retries (every provider retries on non-2xx). So nothing
answered 2xx is ever lost, and nothing shed is ever answered 2xx. The price is
that a timed-out request's receipts may still be applied after the 503 (if a
worker already took them), so the retry applies them again: the sink must be
idempotent (a receipt is a state assignment, so applying it twice is the same
as once). A timed-out request still waiting in the queue is skipped by the
workers.

**Bounded.** The queue holds at most ``queue_capacity`` receipts (never more:
a request whose receipts do not all fit is shed whole with 429 and counted in
``triage_dlr_shed_total``). In flight beyond it: at most one batch per worker
(``batch_max`` receipts, or one request if larger). Every request waiting for
its acknowledgement has its receipts in one of those two places, or in the
pool's mailbox on their way in, so the waiting requests are bounded too.

**The pool is an actor.** :class:`DlrPool` (child id ``dlr_ingress``) owns the
queue, the workers and the scaler; the webhook front (:class:`DlrIngress`, a
plain ASGI object) offers each callback to its mailbox with ``tell_nowait``
(:class:`Deliver`, carrying the request's :class:`QueuedCallback`, which is its
reply slot). A full mailbox -- ``queue_capacity`` callbacks the pool has not
looked at yet -- is a 429 ``queue_full`` at once, as is a callback whose
receipts do not fit the queue (the pool settles it ``SHED``). The mailbox is
``wait``: the front never waits on it (``tell_nowait`` refuses when full), and
the pool's own worker tasks wait for room to report (:class:`BatchDone`), so
no report is ever lost. Its state is one :class:`PoolState` in a
:class:`~engine.statelog.StateLog` (``IDLE``, ``BUSY``, ``BACKLOGGED`` while
the depth is at or above ``scale_up_depth``).

**Workers** are slots of the pool, ``workers_min`` of them always; a worker
with a batch runs it as a task of the actor (``start_soon``) that hands the
receipts to the sink in one call and reports back. When the queue depth stays
at or above ``scale_up_depth`` for ``scale_up_after_s`` one more worker starts
(another after each further ``scale_up_after_s`` while it holds), up to
``workers_max`` -- a :class:`ScaleUp` the pool sends itself with ``send_after``
when the depth gets there, ignored if the depth fell back meanwhile. A worker
that has waited ``scale_down_after_s`` without work stops (:class:`IdleCheck`,
also ``send_after``, at most one pending per worker), unless only
``workers_min`` are left. Idle workers are given work last-in first-out, so
under light traffic the same few stay busy and the extra ones time out. Each
batch takes up to ``batch_max`` receipts (whole requests). Gauges:
``triage_dlr_workers``, ``triage_dlr_queue_depth``; counters
``triage_dlr_shed_total{provider}``,
``triage_dlr_refused_total{provider,reason}``,
``triage_dlr_receipts_applied_total``. The pool's numbers:
``ref.statistics()`` (:class:`DlrPoolStatistics`); the front's:
:meth:`DlrIngress.statistics`.

**Row 13.** Every POST to a webhook route counts in
``triage_dlr_callbacks_total{provider}`` (an unknown provider as ``_unknown``)
and is observed by the row's :class:`~engine.detectors.SpikeOverBaselineDetector`
when one is given.

Parsers are plain callables ``parser(url, headers, body) -> Sequence[Receipt]``
(the vendor modules' ``parse_*`` functions, wrapped with their secrets). They
raise :class:`~providers.receipts.BadSignature` or
:class:`~providers.receipts.MalformedReceipt` (any other ``ValueError`` counts
as malformed). ``url`` is the URL the provider called: ``public_base_url`` plus
the path and query when set (Twilio signs the URL it saw), else rebuilt from the
request.

The ASGI helpers it uses (:func:`~providers.asgi.read_body`,
:func:`~providers.asgi.send_json` ...) live in :mod:`providers.asgi` and are
re-exported here for older imports.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Final, Protocol

import msgspec
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from prometheus_client import CollectorRegistry, Counter, Gauge

from actors.answers import RULES, Rule, ruling_for
from engine.actor import Actor, ActorRef, Overflow, actor_child
from engine.errors import ActorStopped, MailboxFull, RateLimitExceeded, TriageError
from engine.metrics import families
from engine.ratelimit import RateLimiter
from engine.statelog import StateLog
from engine.supervisor import ChildSpec, Restart
from providers.asgi import (
    BodyTooLarge,
    ClientDisconnected,
    declared_length,
    header_value,
    lifespan,
    read_body,
    request_headers,
    send_json,
    serve_scope,
)
from providers.channel import Receipt
from providers.receipts import BadSignature

if TYPE_CHECKING:
    from engine.metrics import Metrics

ROW: Final = 13  # the catalog row this actor owns: DLR callback flood
__all__ = [
    "DLR_RULES",
    "UNKNOWN_PROVIDER",
    "BatchDone",
    "BodyTooLarge",
    "CallbackObserver",
    "ClientDisconnected",
    "Deliver",
    "DlrIngress",
    "DlrIngressStatistics",
    "DlrMessage",
    "DlrPool",
    "DlrPoolStatistics",
    "IdleCheck",
    "Outcome",
    "Parser",
    "PoolState",
    "QueuedCallback",
    "ReceiptSink",
    "ScaleUp",
    "WebhookKind",
    "WebhookRefused",
    "declared_length",
    "dlr_pool_child",
    "header_value",
    "lifespan",
    "read_body",
    "send_json",
]

log = logging.getLogger("triage.dlr_ingress")

Parser = Callable[[str, Mapping[str, str], bytes], Sequence[Receipt]]
"""``parser(url, headers, body)``: verify the signature, then read the receipts."""

#: The provider label for callbacks to a provider nobody configured.
UNKNOWN_PROVIDER: Final = "_unknown"


class ReceiptSink(Protocol):
    """Where the workers hand receipts (the dispatch store writes them to the database)."""

    async def apply(self, receipts: Sequence[Receipt]) -> None:
        """Apply every receipt durably, or raise (the callbacks get 503 and are retried).

        Must be idempotent: a receipt may be applied again after a provider's retry.
        """
        ...


class CallbackObserver(Protocol):
    """What the ingress feeds with every callback: row 13's
    :class:`~engine.detectors.SpikeOverBaselineDetector` fits."""

    def observe(self, count: int = 1) -> None: ...


class WebhookKind(enum.StrEnum):
    DLR = "dlr"
    BOUNCES = "bounces"


class Outcome(enum.Enum):
    """What became of one request's receipts."""

    PENDING = "pending"
    APPLIED = "applied"
    FAILED = "failed"  # the sink raised, or the pool stopped
    SHED = "shed"  # the queue could not take them all (429)
    ABANDONED = "abandoned"  # the request stopped waiting (ack timeout); skipped if still queued


# -- the refusals and their answers ------------------------------------------------------


class WebhookRefused(TriageError):
    """A callback the front refused before (or instead of) applying its receipts.

    ``provider`` is the one the answer names (None: named nowhere in the body).
    Answered by :data:`DLR_RULES`, read before the shared :data:`~actors.answers.RULES`.
    """

    def __init__(self, message: str, *, provider: str | None = None) -> None:
        super().__init__(message)
        self.provider = provider


class NoWebhook(WebhookRefused):
    """Nothing is served at the path (404 ``not_found``)."""


class MethodNotAllowed(WebhookRefused):
    """Only POST is (405 ``method_not_allowed``, ``Allow: POST``)."""


class UnknownProvider(WebhookRefused):
    """No parser for the path's provider (404 ``unknown_provider``)."""


class InvalidContentLength(WebhookRefused):
    """``Content-Length`` is not a number (400 ``invalid_content_length``)."""


class PayloadTooLarge(WebhookRefused):
    """The body is over ``max_body_bytes`` (413 ``payload_too_large``)."""


class CallbackRateLimited(WebhookRefused):
    """The provider's token bucket is empty (429 ``rate_limited``, its own Retry-After)."""

    def __init__(self, provider: str, retry_after_s: float) -> None:
        super().__init__(f"too many callbacks from {provider!r}; retry later", provider=provider)
        self.retry_after_s = retry_after_s


class BadCallbackSignature(WebhookRefused):
    """The signature is missing or wrong (401 ``bad_signature``)."""


class MalformedCallback(WebhookRefused):
    """The parser could not read the body (400 ``malformed_receipt``)."""


class ParserFailed(WebhookRefused):
    """The parser itself broke (500 ``internal_error``; logged)."""


class TooManyReceipts(WebhookRefused):
    """More receipts in one callback than the queue holds (413 ``too_many_receipts``)."""


class NotReady(WebhookRefused):
    """No incarnation of the pool runs (503 ``not_ready``)."""


class QueueFull(WebhookRefused):
    """The pool could not take the receipts: shed (429 ``queue_full``)."""


class AckTimeout(WebhookRefused):
    """Not applied within ``ack_timeout_s`` (503 ``ack_timeout``)."""


class SinkFailed(WebhookRefused):
    """The sink failed, or the pool stopped, on the receipts (503 ``sink_failed``)."""


class Disconnected(WebhookRefused):
    """The provider went away while sending the body: counted, nobody to answer."""


#: The webhooks' rows of the one answer table (:mod:`actors.answers`), read first:
#: status, code, and Retry-After (``own``: the bucket's wait; ``door``: ``retry_after_s``).
DLR_RULES: Final[tuple[Rule, ...]] = (
    Rule(NoWebhook, 404, "not_found"),
    Rule(MethodNotAllowed, 405, "method_not_allowed"),
    Rule(UnknownProvider, 404, "unknown_provider"),
    Rule(InvalidContentLength, 400, "invalid_content_length"),
    Rule(PayloadTooLarge, 413, "payload_too_large"),
    Rule(CallbackRateLimited, 429, "rate_limited", retry="own"),
    Rule(BadCallbackSignature, 401, "bad_signature"),
    Rule(MalformedCallback, 400, "malformed_receipt"),
    Rule(ParserFailed, 500, "internal_error"),
    Rule(TooManyReceipts, 413, "too_many_receipts"),
    Rule(NotReady, 503, "not_ready", retry="door"),
    Rule(QueueFull, 429, "queue_full", retry="door"),
    Rule(AckTimeout, 503, "ack_timeout", retry="door"),
    Rule(SinkFailed, 503, "sink_failed", retry="door"),
)
_ANSWERS: Final = (*DLR_RULES, *RULES)


class _Refusal(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    error: str
    message: str
    provider: str | None = None


class _Accepted(msgspec.Struct, frozen=True, kw_only=True):
    accepted: int


# -- the pool (an actor) ---------------------------------------------------------------


@dataclass(eq=False, slots=True)
class QueuedCallback:
    """One callback's receipts and its reply slot: ``done`` is set once ``outcome`` is final.

    The front waits on ``done``; a front that gave up (ack timeout) marks it
    ``ABANDONED`` and the pool skips it if it is still queued.
    """

    provider: str
    receipts: Sequence[Receipt]
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Outcome = Outcome.PENDING

    def settle(self, outcome: Outcome) -> None:
        if self.outcome is Outcome.PENDING:
            self.outcome = outcome
        self.done.set()


class _Worker:
    """One worker slot of the pool; while ``busy`` its batch runs as a task of the actor."""

    __slots__ = ("busy", "idle_since", "number", "watched")

    def __init__(self, number: int) -> None:
        self.number = number
        self.busy = False
        self.idle_since = 0.0
        self.watched = False  # an IdleCheck is on its way


class Deliver(msgspec.Struct, frozen=True, tag=True):
    """From the front: queue this callback's receipts (or settle it ``SHED``)."""

    job: QueuedCallback


class BatchDone(msgspec.Struct, frozen=True, tag=True):
    """From a worker's task: its batch is settled (``applied`` receipts, 0 if the sink failed)."""

    worker: _Worker
    applied: int


class ScaleUp(msgspec.Struct, frozen=True, tag=True):
    """``send_after``: the depth reached ``scale_up_depth`` at ``since``; does it still hold?"""

    since: float


class IdleCheck(msgspec.Struct, frozen=True, tag=True):
    """``send_after``: has ``worker`` been idle for ``scale_down_after_s``?"""

    worker: _Worker


DlrMessage = Deliver | BatchDone | ScaleUp | IdleCheck


class PoolState(enum.Enum):
    IDLE = "idle"  # nothing queued, no batch running
    BUSY = "busy"  # batches running, the depth below scale_up_depth
    BACKLOGGED = "backlogged"  # the depth at or above scale_up_depth
    STOPPED = "stopped"


class DlrPoolStatistics(msgspec.Struct, frozen=True, kw_only=True):
    state: PoolState
    workers: int
    busy_workers: int
    queue_depth: int  # receipts waiting (an abandoned request counts until skipped)
    queue_capacity: int
    max_queue_depth: int  # the highest depth this incarnation reached (never above capacity)
    applied_receipts: int
    shed: int  # callbacks the queue could not take
    started_workers: int  # workers started beyond the first workers_min
    stopped_workers: int  # workers stopped for being idle


class DlrIngressStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """The front's numbers (:meth:`DlrIngress.statistics`)."""

    callbacks: int  # POSTs to a webhook route
    accepted: int  # requests answered 200
    shed: int  # requests refused 429 queue_full (a full mailbox or a full queue)
    rate_limited: int
    refused: int  # every other typed 4xx/5xx (bad signature, malformed, oversize...)


class _DlrMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.callbacks = Counter(
            "triage_dlr_callbacks_total",
            "Delivery-receipt and bounce callbacks received, by provider (catalog row 13)",
            ["provider"],
            registry=registry,
        )
        self.refused = Counter(
            "triage_dlr_refused_total",
            "Callbacks answered with a refusal, by provider and reason",
            ["provider", "reason"],
            registry=registry,
        )
        self.shed = Counter(
            "triage_dlr_shed_total",
            "Callbacks shed with 429 because the DLR queue was full",
            ["provider"],
            registry=registry,
        )
        self.applied = Counter(
            "triage_dlr_receipts_applied_total",
            "Receipts applied by the DLR workers",
            registry=registry,
        )
        self.workers = Gauge("triage_dlr_workers", "DLR workers running", registry=registry)
        self.depth = Gauge(
            "triage_dlr_queue_depth", "Receipts waiting in the DLR queue", registry=registry
        )


def _dlr_metrics(registry: CollectorRegistry) -> _DlrMetrics:
    return families(registry, _DlrMetrics)


class DlrPool(Actor[DlrMessage]):
    """The bounded receipt queue, its workers and the scaler; see the module docstring."""

    name = "dlr_ingress"
    uses_tasks = True

    def __init__(
        self,
        *,
        sink: ReceiptSink,
        queue_capacity: int,
        workers_min: int,
        workers_max: int,
        scale_up_depth: int,
        scale_up_after_s: float,
        scale_down_after_s: float,
        batch_max: int,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.sink = sink
        self.queue_capacity = queue_capacity
        self.workers_min = workers_min
        self.workers_max = workers_max
        self.scale_up_depth = scale_up_depth
        self.scale_up_after_s = scale_up_after_s
        self.scale_down_after_s = scale_down_after_s
        self.batch_max = batch_max
        self._metrics = _dlr_metrics(registry) if registry is not None else None
        self.states = StateLog(self.name, PoolState.IDLE, log)
        self._jobs: deque[QueuedCallback] = deque()
        self._depth = 0
        self._max_depth = 0
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []  # the last one parked is given work first
        self._numbered = 0
        self._above_since: float | None = None  # when the depth reached scale_up_depth
        self._counts = dict.fromkeys(("applied", "shed", "started", "stopped"), 0)

    # -- the actor's life ------------------------------------------------------------------

    async def init(self) -> None:
        for _ in range(self.workers_min):
            self._spawn(counted=False)

    async def terminate(self, reason: BaseException | None) -> None:
        # The incarnation's tasks are gone: nobody will apply what is left. Every
        # waiting request answers 503 now (its provider retries); nothing is dropped
        # silently. (Batches in flight settled themselves FAILED when cancelled.)
        while self._jobs:
            self._jobs.popleft().settle(Outcome.FAILED)
        self._set_depth(0)
        self._workers.clear()
        self._idle.clear()
        if self._metrics is not None:
            self._metrics.workers.set(0)
        self.states.enter(PoolState.STOPPED, "stopped" if reason is None else repr(reason))

    def statistics(self) -> DlrPoolStatistics:
        counts = self._counts
        return DlrPoolStatistics(
            state=self.states.state,
            workers=len(self._workers),
            busy_workers=sum(1 for w in self._workers if w.busy),
            queue_depth=self._depth,
            queue_capacity=self.queue_capacity,
            max_queue_depth=self._max_depth,
            applied_receipts=counts["applied"],
            shed=counts["shed"],
            started_workers=counts["started"],
            stopped_workers=counts["stopped"],
        )

    async def handle(self, message: DlrMessage) -> object:
        match message:
            case Deliver(job=job):
                if job.outcome is Outcome.ABANDONED:
                    return None  # its request stopped waiting before it got here
                size = len(job.receipts)
                if self._depth + size > self.queue_capacity:
                    self._counts["shed"] += 1
                    job.settle(Outcome.SHED)
                    return None
                self._jobs.append(job)
                self._set_depth(self._depth + size)
                self._dispatch()
            case BatchDone(worker=worker, applied=applied):
                if worker not in self._workers:
                    return None  # an earlier incarnation's worker
                worker.busy = False
                if applied:
                    self._counts["applied"] += applied
                    if self._metrics is not None:
                        self._metrics.applied.inc(applied)
                batch = self._take_batch()
                if batch:
                    self._run(worker, batch)
                else:
                    self._park(worker)
            case ScaleUp(since=since):
                if self._above_since != since:
                    return None  # the depth fell back meanwhile (and maybe rose again)
                if len(self._workers) < self.workers_max:
                    self._spawn(counted=True)
                    log.info("dlr: queue depth %d held; worker %d started (%d running)",
                             self._depth, self._numbered, len(self._workers))  # fmt: skip
                now = trio.current_time()
                self._above_since = now
                self.send_after(self.scale_up_after_s, ScaleUp(now))
            case IdleCheck(worker=worker):
                worker.watched = False
                if worker not in self._idle:
                    return None  # busy again, or gone
                due = worker.idle_since + self.scale_down_after_s - trio.current_time()
                if due > 0:
                    self._watch(worker, due)
                elif len(self._workers) > self.workers_min:
                    self._stop(worker)
                else:
                    self._watch(worker, self.scale_down_after_s)
        self._update_state()
        return None

    # -- the queue -------------------------------------------------------------------------

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if depth > self._max_depth:
            self._max_depth = depth
        if self._metrics is not None:
            self._metrics.depth.set(depth)
        if depth >= self.scale_up_depth:
            if self._above_since is None:
                now = trio.current_time()
                self._above_since = now
                self.send_after(self.scale_up_after_s, ScaleUp(now))
        else:
            self._above_since = None

    def _take_batch(self) -> list[QueuedCallback]:
        """Whole jobs, oldest first, up to ``batch_max`` receipts (at least one job)."""
        batch: list[QueuedCallback] = []
        taken = 0
        depth = self._depth
        while self._jobs:
            job = self._jobs[0]
            if job.outcome is Outcome.ABANDONED:
                self._jobs.popleft()
                depth -= len(job.receipts)
                continue
            if batch and taken + len(job.receipts) > self.batch_max:
                break
            self._jobs.popleft()
            batch.append(job)
            taken += len(job.receipts)
            depth -= len(job.receipts)
        if depth != self._depth:
            self._set_depth(depth)
        return batch

    def _update_state(self) -> None:
        if self._above_since is not None:
            self.states.enter(PoolState.BACKLOGGED, f"queue depth {self._depth}")
        elif self._jobs or any(w.busy for w in self._workers):
            self.states.enter(PoolState.BUSY, "batches running")
        else:
            self.states.enter(PoolState.IDLE, "queue empty")

    # -- workers ---------------------------------------------------------------------------

    def _spawn(self, *, counted: bool) -> None:
        self._numbered += 1
        worker = _Worker(self._numbered)
        self._workers.append(worker)
        if counted:
            self._counts["started"] += 1
        if self._metrics is not None:
            self._metrics.workers.set(len(self._workers))
        self._park(worker)

    def _park(self, worker: _Worker) -> None:
        worker.idle_since = trio.current_time()
        self._idle.append(worker)
        if not worker.watched:
            self._watch(worker, self.scale_down_after_s)
        self._dispatch()

    def _watch(self, worker: _Worker, delay_s: float) -> None:
        worker.watched = True
        self.send_after(delay_s, IdleCheck(worker))

    def _dispatch(self) -> None:
        """Give queued work to idle workers, the last one parked first."""
        while self._idle and self._jobs:
            batch = self._take_batch()
            if not batch:
                return
            self._run(self._idle.pop(), batch)

    def _run(self, worker: _Worker, batch: list[QueuedCallback]) -> None:
        worker.busy = True
        self.start_soon(self._apply, worker, batch)

    def _stop(self, worker: _Worker) -> None:
        self._idle.remove(worker)
        self._workers.remove(worker)
        self._counts["stopped"] += 1
        if self._metrics is not None:
            self._metrics.workers.set(len(self._workers))
        log.info("dlr: idle worker %d stops (%d left)", worker.number, len(self._workers))

    async def _apply(self, worker: _Worker, batch: list[QueuedCallback]) -> None:
        """A worker's batch: one sink call; settle every job, then report back."""
        receipts = [receipt for job in batch for receipt in job.receipts]
        applied = 0
        try:
            await self.sink.apply(receipts)
        except Exception:
            log.exception("dlr: the sink failed on %d receipts; their callbacks get 503",
                          len(receipts))  # fmt: skip
            for job in batch:
                job.settle(Outcome.FAILED)
        else:
            applied = len(receipts)
            for job in batch:
                job.settle(Outcome.APPLIED)
        finally:  # cancelled mid-apply: the callbacks answer 503, the providers retry
            for job in batch:
                job.settle(Outcome.FAILED)
        await self.ref.tell(BatchDone(worker, applied))


def dlr_pool_child(
    *,
    sink: ReceiptSink,
    queue_capacity: int,
    workers_min: int,
    workers_max: int,
    scale_up_depth: int,
    scale_up_after_s: float,
    scale_down_after_s: float,
    batch_max: int,
    shutdown_s: float,
    restart: Restart | None = None,
    registry: CollectorRegistry | None = None,
    metrics: Metrics | None = None,
) -> tuple[ChildSpec, ActorRef[DlrMessage]]:
    """The pool's child spec (id ``dlr_ingress``) and its ref; every number checked now.

    The mailbox holds ``queue_capacity`` callbacks (each has at least one receipt,
    so a full mailbox means the queue could not take them either) and is ``wait``
    (see the module docstring).
    """
    if min(queue_capacity, workers_min, batch_max) < 1:
        raise ValueError("queue_capacity, workers_min and batch_max must be >= 1")
    if workers_max < workers_min:
        raise ValueError(f"workers_max ({workers_max}) must be >= workers_min ({workers_min})")
    if not 1 <= scale_up_depth <= queue_capacity:
        raise ValueError(f"scale_up_depth must be in 1..queue_capacity ({queue_capacity})")
    _positive("scale_up_after_s", scale_up_after_s)
    _positive("scale_down_after_s", scale_down_after_s)
    factory = partial(
        DlrPool, sink=sink, queue_capacity=queue_capacity, workers_min=workers_min,
        workers_max=workers_max, scale_up_depth=scale_up_depth,
        scale_up_after_s=scale_up_after_s, scale_down_after_s=scale_down_after_s,
        batch_max=batch_max, registry=registry,
    )  # fmt: skip
    return actor_child(
        DlrPool.name, factory, capacity=queue_capacity, overflow=Overflow.WAIT,
        restart=restart, shutdown_s=shutdown_s, metrics=metrics,
    )  # fmt: skip


def _positive(knob: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{knob} must be > 0, got {value!r}")


# -- the front ---------------------------------------------------------------------------


class DlrIngress:
    """The webhook ASGI app: checks, parses, and offers each callback to the pool.

    Serve it (mount it) and run the pool (:func:`dlr_pool_child`) under a
    supervisor; requests that arrive while no incarnation of the pool runs get
    503 ``not_ready``.

    Every number comes from the caller (``[dlr]`` in the config):
    ``max_body_bytes``, ``queue_capacity`` (receipts: a bigger callback is 413),
    ``ack_timeout_s`` and ``retry_after_s`` (the ``Retry-After`` of a shed or
    timed-out callback). ``limiter`` is the per-provider token bucket (keyed by
    provider).
    """

    def __init__(
        self,
        *,
        pool: ActorRef[DlrMessage],
        limiter: RateLimiter,
        dlr_parsers: Mapping[str, Parser],
        bounce_parsers: Mapping[str, Parser],
        max_body_bytes: int,
        queue_capacity: int,
        ack_timeout_s: float,
        retry_after_s: float,
        public_base_url: str | None = None,
        prefix: str = "/webhooks",
        detector: CallbackObserver | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if min(max_body_bytes, queue_capacity) < 1:
            raise ValueError("max_body_bytes and queue_capacity must be >= 1")
        _positive("ack_timeout_s", ack_timeout_s)
        _positive("retry_after_s", retry_after_s)
        self.pool = pool
        self.limiter = limiter
        self.parsers: dict[WebhookKind, dict[str, Parser]] = {
            WebhookKind.DLR: dict(dlr_parsers),
            WebhookKind.BOUNCES: dict(bounce_parsers),
        }
        self.max_body_bytes = max_body_bytes
        self.queue_capacity = queue_capacity
        self.ack_timeout_s = ack_timeout_s
        self.retry_after_s = retry_after_s
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.prefix = prefix.rstrip("/")
        self.detector = detector
        self._metrics = _dlr_metrics(registry) if registry is not None else None
        self._counts = dict.fromkeys(
            ("callbacks", "accepted", "shed", "rate_limited", "refused"), 0
        )

    @property
    def running(self) -> bool:
        """Whether an incarnation of the pool runs now."""
        return self.pool.statistics() is not None

    def statistics(self) -> DlrIngressStatistics:
        counts = self._counts
        return DlrIngressStatistics(
            callbacks=counts["callbacks"],
            accepted=counts["accepted"],
            shed=counts["shed"],
            rate_limited=counts["rate_limited"],
            refused=counts["refused"],
        )

    def offer(self, provider: str, receipts: Sequence[Receipt]) -> QueuedCallback | None:
        """Offer ``receipts`` to the pool as one job; None when its mailbox is full (shed)."""
        if not self.running:
            raise RuntimeError("the DLR pool is not running")
        return self._offer(provider, receipts)

    def _offer(self, provider: str, receipts: Sequence[Receipt]) -> QueuedCallback | None:
        job = QueuedCallback(provider, receipts)
        try:
            self.pool.tell_nowait(Deliver(job))
        except MailboxFull:
            return None
        return job

    async def deliver(self, provider: str, receipts: Sequence[Receipt]) -> Outcome:
        """Offer ``receipts`` and wait for them: APPLIED, FAILED, SHED (the pool could not
        take them) or ABANDONED (ack timeout). What the webhook does after parsing."""
        if not self.running:
            raise RuntimeError("the DLR pool is not running")
        return await self._deliver(provider, receipts)

    async def _deliver(self, provider: str, receipts: Sequence[Receipt]) -> Outcome:
        """:meth:`deliver` once the caller saw the pool running (one look per callback:
        it builds the pool's statistics)."""
        try:
            job = self._offer(provider, receipts)
        except ActorStopped:  # removed for good between the check and the offer
            return Outcome.FAILED
        if job is None:
            return Outcome.SHED
        with trio.move_on_after(self.ack_timeout_s):
            await job.done.wait()
        if job.outcome is Outcome.PENDING:
            job.outcome = Outcome.ABANDONED  # still queued: the pool skips it
        return job.outcome

    # -- ASGI ------------------------------------------------------------------------------

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await serve_scope(scope, receive, send, self._http)

    def _route(self, path: str) -> tuple[WebhookKind, str] | None:
        if not path.startswith(self.prefix + "/"):
            return None
        parts = path[len(self.prefix) + 1 :].split("/")
        if len(parts) != 2 or not parts[1]:
            return None
        try:
            kind = WebhookKind(parts[0])
        except ValueError:
            return None
        return kind, parts[1]

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        try:
            accepted = await self._receive(scope, receive)
        except Disconnected as exc:  # nobody to answer
            self._refused(exc.provider, "disconnected")
            return
        except WebhookRefused as exc:
            await self._refuse(send, exc)
            return
        self._counts["accepted"] += 1
        await send_json(send, 200, msgspec.json.encode(_Accepted(accepted=accepted)))

    async def _receive(self, scope: HTTPScope, receive: ASGIReceiveCallable) -> int:
        """Check, read, parse and deliver one callback: the receipts applied.

        Every refusal is raised, typed; :meth:`_refuse` answers it from the table.
        """
        route = self._route(scope["path"])
        if route is None:
            raise NoWebhook(f"no webhook at {scope['path']!r}")
        if scope["method"] != "POST":
            raise MethodNotAllowed(f"{scope['method']} is not allowed; use POST")
        kind, provider = route
        parser = self.parsers[kind].get(provider)
        self._count_callback(provider if parser is not None else UNKNOWN_PROVIDER)
        if parser is None:
            raise UnknownProvider(f"no {kind.value} webhook for provider {provider[:64]!r}")
        try:
            declared = declared_length(scope)
        except ValueError as exc:
            raise InvalidContentLength(str(exc), provider=provider) from exc
        if declared is not None and declared > self.max_body_bytes:
            too_large = BodyTooLarge(self.max_body_bytes, declared=declared)
            raise PayloadTooLarge(str(too_large), provider=provider)
        try:
            self.limiter.acquire_or_raise(provider)
        except RateLimitExceeded as exc:
            self._counts["rate_limited"] += 1
            raise CallbackRateLimited(provider, exc.retry_after_s) from exc
        try:
            body = await read_body(receive, max_bytes=self.max_body_bytes)
        except BodyTooLarge as exc:
            raise PayloadTooLarge(str(exc), provider=provider) from exc
        except ClientDisconnected as exc:
            raise Disconnected(str(exc), provider=provider) from exc
        try:
            receipts = list(parser(self._url(scope), request_headers(scope), body))
        except BadSignature as exc:
            raise BadCallbackSignature(str(exc), provider=provider) from exc
        except ValueError as exc:  # MalformedReceipt, or any parser's ValueError
            raise MalformedCallback(str(exc), provider=provider) from exc
        except Exception as exc:
            log.exception("dlr: the %s parser failed", provider)
            raise ParserFailed(f"parser failed ({type(exc).__name__})", provider=provider) from exc
        return await self._enqueue(provider, receipts)

    async def _enqueue(self, provider: str, receipts: list[Receipt]) -> int:
        """Deliver ``receipts`` and wait for them: their count, or the refusal raised."""
        if not receipts:
            return 0
        if len(receipts) > self.queue_capacity:
            raise TooManyReceipts(
                f"{len(receipts)} receipts in one callback; at most {self.queue_capacity}",
                provider=provider,
            )
        if not self.running:
            raise NotReady("the DLR pool is not running", provider=provider)
        outcome = await self._deliver(provider, receipts)
        if outcome is Outcome.APPLIED:
            return len(receipts)
        if outcome is Outcome.SHED:
            self._counts["shed"] += 1
            if self._metrics is not None:
                self._metrics.shed.labels(provider).inc()
            raise QueueFull("the DLR queue is full; retry later", provider=provider)
        if outcome is Outcome.ABANDONED:
            raise AckTimeout(
                f"the receipts were not applied within {self.ack_timeout_s}s; retry later",
                provider=provider,
            )
        raise SinkFailed("the receipts could not be stored; retry later", provider=provider)

    def _url(self, scope: HTTPScope) -> str:
        query = scope["query_string"].decode("latin-1")
        tail = scope["path"] + (f"?{query}" if query else "")
        if self.public_base_url is not None:
            return self.public_base_url + tail
        host = header_value(scope, b"host")
        if host is None:
            server = scope.get("server")
            host = f"{server[0]}:{server[1]}" if server and server[1] is not None else "localhost"
        return f"{scope['scheme']}://{host}{tail}"

    def _count_callback(self, provider: str) -> None:
        self._counts["callbacks"] += 1
        if self._metrics is not None:
            self._metrics.callbacks.labels(provider).inc()
        if self.detector is not None:
            self.detector.observe()

    def _refused(self, provider: str | None, reason: str) -> None:
        if reason not in ("rate_limited", "queue_full"):
            self._counts["refused"] += 1
        if self._metrics is not None and provider is not None:
            self._metrics.refused.labels(provider, reason).inc()

    async def _refuse(self, send: ASGISendCallable, exc: WebhookRefused) -> None:
        """Answer a refusal from the one table (status, code, Retry-After) in the
        webhooks' body, ``{"error", "message", "provider"?}``."""
        ruling = ruling_for(exc, retry_after_s=self.retry_after_s, rules=_ANSWERS)
        provider = exc.provider
        # An unknown provider is counted under one label and named nowhere.
        self._refused(UNKNOWN_PROVIDER if isinstance(exc, UnknownProvider) else provider,
                      ruling.code)  # fmt: skip
        refusal = _Refusal(error=ruling.code, message=ruling.message, provider=provider)
        extra: list[tuple[bytes, bytes]] = []
        if ruling.status == 405:
            extra.append((b"allow", b"POST"))
        if ruling.retry_after_s is not None:
            extra.append((b"retry-after", str(max(1, math.ceil(ruling.retry_after_s))).encode()))
        await send_json(send, ruling.status, msgspec.json.encode(refusal), extra_headers=extra)
