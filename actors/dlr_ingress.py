"""The DLR ingress: delivery-receipt and bounce webhooks, catalog row 13 (DLR callback flood).

:class:`DlrIngress` is an ASGI app (mounted at ``/webhooks/`` by the daemon's
:class:`~supervisors.http.HealthApp`, served by hypercorn on Trio) and the owner
of a bounded queue drained by a pool of DLR workers::

    POST /webhooks/dlr/{provider}       a provider's delivery receipts
    POST /webhooks/bounces/{provider}   bounces (DSN or a provider's event webhook)

A request goes through these steps, cheapest first; each refusal is typed JSON
``{"error": code, "message": ...}`` and changes nothing (the sink sees nothing):

=====================================  ====  ======================================
wrong path / method                    404 / 405 (``Allow: POST``)
no parser for ``{provider}``           404   unknown_provider
``Content-Length`` over the cap        413   payload_too_large (nothing read)
provider's token bucket empty          429   rate_limited (``Retry-After``)
body over the cap while reading        413   payload_too_large (reading stops)
signature missing or wrong             401   bad_signature (the parser verifies)
body unreadable                        400   malformed_receipt
more receipts than the queue holds     413   too_many_receipts
ingress not running                    503   not_ready
the queue cannot take them             429   queue_full (``Retry-After``; shed)
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
its acknowledgement has its receipts in one of those two places, so the waiting
requests are bounded too.

**Workers** are tasks in the ingress's own nursery (:meth:`DlrIngress.run`),
``workers_min`` of them always. When the queue depth stays at or above
``scale_up_depth`` for ``scale_up_after_s`` one more worker starts (another
after each further ``scale_up_after_s`` while it holds), up to
``workers_max``. A worker that has waited ``scale_down_after_s`` without work
stops, unless only ``workers_min`` are left. Idle workers are woken last-in
first-out, so under light traffic the same few stay busy and the extra ones
time out. Each worker takes up to ``batch_max`` receipts (whole requests) and
hands them to the sink in one call. Gauges: ``triage_dlr_workers``,
``triage_dlr_queue_depth``; counters ``triage_dlr_shed_total{provider}``,
``triage_dlr_refused_total{provider,reason}``, ``triage_dlr_receipts_applied_total``.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import msgspec
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from prometheus_client import CollectorRegistry, Counter, Gauge

from engine.errors import RateLimitExceeded
from engine.metrics import families
from engine.ratelimit import RateLimiter
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

ROW: Final = 13  # the catalog row this actor owns: DLR callback flood
__all__ = [
    "UNKNOWN_PROVIDER",
    "BodyTooLarge",
    "CallbackObserver",
    "ClientDisconnected",
    "DlrIngress",
    "DlrIngressStatistics",
    "Outcome",
    "Parser",
    "QueuedCallback",
    "ReceiptSink",
    "WebhookKind",
    "declared_length",
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
    FAILED = "failed"  # the sink raised, or the ingress stopped
    ABANDONED = "abandoned"  # the request stopped waiting (ack timeout); skipped if still queued


def _retry_after(seconds: float) -> tuple[bytes, bytes]:
    return (b"retry-after", str(max(1, math.ceil(seconds))).encode())


class _Refusal(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    error: str
    message: str
    provider: str | None = None


class _Accepted(msgspec.Struct, frozen=True, kw_only=True):
    accepted: int


# -- the ingress -----------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class QueuedCallback:
    """One callback's receipts in the queue; ``done`` is set once ``outcome`` is final."""

    provider: str
    receipts: Sequence[Receipt]
    done: trio.Event = field(default_factory=trio.Event)
    outcome: Outcome = Outcome.PENDING

    def settle(self, outcome: Outcome) -> None:
        if self.outcome is Outcome.PENDING:
            self.outcome = outcome
        self.done.set()


@dataclass(eq=False, slots=True)
class _Worker:
    number: int
    busy: bool = False
    wake: trio.Event = field(default_factory=trio.Event)


@dataclass(frozen=True, slots=True)
class DlrIngressStatistics:
    workers: int
    busy_workers: int
    queue_depth: int  # receipts waiting
    queue_capacity: int
    max_queue_depth: int  # the highest depth ever reached (never above capacity)
    callbacks: int  # POSTs to a webhook route
    accepted: int  # requests answered 200
    applied_receipts: int
    shed: int  # requests refused 429 queue_full
    rate_limited: int
    refused: int  # every other typed 4xx/5xx (bad signature, malformed, oversize...)
    started_workers: int  # workers started beyond the first workers_min
    stopped_workers: int  # workers stopped for being idle


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


class DlrIngress:
    """The webhook ASGI app, its bounded queue and its worker pool.

    Serve it (mount it) and run :meth:`run` (a supervised child); requests that
    arrive while :meth:`run` is not running get 503 ``not_ready``.

    Every number comes from the caller (``[dlr]`` in the config):
    ``max_body_bytes``, ``queue_capacity`` (receipts), ``workers_min``,
    ``workers_max``, ``scale_up_depth``, ``scale_up_after_s``,
    ``scale_down_after_s``, ``ack_timeout_s``, ``batch_max`` (receipts per sink
    call) and ``retry_after_s`` (the ``Retry-After`` of a shed or timed-out
    callback). ``limiter`` is the per-provider token bucket (keyed by provider).
    """

    name = "dlr_ingress"

    def __init__(
        self,
        *,
        sink: ReceiptSink,
        limiter: RateLimiter,
        dlr_parsers: Mapping[str, Parser],
        bounce_parsers: Mapping[str, Parser],
        max_body_bytes: int,
        queue_capacity: int,
        workers_min: int,
        workers_max: int,
        scale_up_depth: int,
        scale_up_after_s: float,
        scale_down_after_s: float,
        ack_timeout_s: float,
        batch_max: int,
        retry_after_s: float,
        public_base_url: str | None = None,
        prefix: str = "/webhooks",
        detector: CallbackObserver | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if min(max_body_bytes, queue_capacity, workers_min, batch_max) < 1:
            raise ValueError(
                "max_body_bytes, queue_capacity, workers_min and batch_max must be >= 1"
            )
        if workers_max < workers_min:
            raise ValueError(f"workers_max ({workers_max}) must be >= workers_min ({workers_min})")
        if not 1 <= scale_up_depth <= queue_capacity:
            raise ValueError(f"scale_up_depth must be in 1..queue_capacity ({queue_capacity})")
        for knob, value in (
            ("scale_up_after_s", scale_up_after_s),
            ("scale_down_after_s", scale_down_after_s),
            ("ack_timeout_s", ack_timeout_s),
            ("retry_after_s", retry_after_s),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{knob} must be > 0, got {value!r}")
        self.sink = sink
        self.limiter = limiter
        self.parsers: dict[WebhookKind, dict[str, Parser]] = {
            WebhookKind.DLR: dict(dlr_parsers),
            WebhookKind.BOUNCES: dict(bounce_parsers),
        }
        self.max_body_bytes = max_body_bytes
        self.queue_capacity = queue_capacity
        self.workers_min = workers_min
        self.workers_max = workers_max
        self.scale_up_depth = scale_up_depth
        self.scale_up_after_s = scale_up_after_s
        self.scale_down_after_s = scale_down_after_s
        self.ack_timeout_s = ack_timeout_s
        self.batch_max = batch_max
        self.retry_after_s = retry_after_s
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.prefix = prefix.rstrip("/")
        self.detector = detector
        self._metrics = _dlr_metrics(registry) if registry is not None else None

        self._jobs: deque[QueuedCallback] = deque()
        self._depth = 0
        self._max_depth = 0
        self._workers: list[_Worker] = []
        self._idle: list[_Worker] = []  # parked workers; the last one parked is woken first
        self._numbered = 0
        self._nursery: trio.Nursery | None = None
        self._above_since: float | None = None  # when the depth reached scale_up_depth
        self._above_changed = trio.Event()
        self._counts = {
            "callbacks": 0, "accepted": 0, "applied": 0, "shed": 0, "rate_limited": 0,
            "refused": 0, "started": 0, "stopped": 0,
        }  # fmt: skip

    # -- running -------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start ``workers_min`` workers and the scaler; ``started()`` once they run."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for _ in range(self.workers_min):
                    self._spawn(counted=False)
                nursery.start_soon(self._scaler)
                task_status.started()
        finally:
            self._nursery = None
            # The nursery is gone: nobody will apply what is left. Every waiting
            # request answers 503 now (its provider retries); nothing is dropped silently.
            while self._jobs:
                self._jobs.popleft().settle(Outcome.FAILED)
            self._set_depth(0)

    def child_spec(self, *, shutdown_s: float, restart: Restart | None = None) -> ChildSpec:
        """A supervisor child running :meth:`run`."""
        return ChildSpec.of(self, shutdown_s=shutdown_s, restart=restart)

    @property
    def running(self) -> bool:
        return self._nursery is not None

    def statistics(self) -> DlrIngressStatistics:
        counts = self._counts
        return DlrIngressStatistics(
            workers=len(self._workers),
            busy_workers=sum(1 for w in self._workers if w.busy),
            queue_depth=self._depth,
            queue_capacity=self.queue_capacity,
            max_queue_depth=self._max_depth,
            callbacks=counts["callbacks"],
            accepted=counts["accepted"],
            applied_receipts=counts["applied"],
            shed=counts["shed"],
            rate_limited=counts["rate_limited"],
            refused=counts["refused"],
            started_workers=counts["started"],
            stopped_workers=counts["stopped"],
        )

    # -- the queue -------------------------------------------------------------------------

    def offer(self, provider: str, receipts: Sequence[Receipt]) -> QueuedCallback | None:
        """Queue ``receipts`` as one job, or None when they do not all fit (shed)."""
        if self._nursery is None:
            raise RuntimeError("the DLR ingress is not running")
        if self._depth + len(receipts) > self.queue_capacity:
            return None
        job = QueuedCallback(provider, receipts)
        self._jobs.append(job)
        self._set_depth(self._depth + len(receipts))
        if self._idle:
            worker = self._idle.pop()
            worker.wake.set()
        return job

    async def deliver(self, provider: str, receipts: Sequence[Receipt]) -> Outcome | None:
        """Queue ``receipts`` and wait for them: APPLIED, FAILED, ABANDONED (ack timeout),
        or None when the queue could not take them. What the webhook does after parsing."""
        job = self.offer(provider, receipts)
        if job is None:
            return None
        with trio.move_on_after(self.ack_timeout_s):
            await job.done.wait()
        if job.outcome is Outcome.PENDING:
            job.outcome = Outcome.ABANDONED  # still queued: the workers skip it
        return job.outcome

    def _set_depth(self, depth: int) -> None:
        self._depth = depth
        if depth > self._max_depth:
            self._max_depth = depth
        if self._metrics is not None:
            self._metrics.depth.set(depth)
        if depth >= self.scale_up_depth:
            if self._above_since is None:
                self._above_since = trio.current_time()
                self._above_changed.set()
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

    # -- workers ---------------------------------------------------------------------------

    def _spawn(self, *, counted: bool) -> None:
        assert self._nursery is not None  # only called while run() holds the nursery
        self._numbered += 1
        worker = _Worker(self._numbered)
        self._workers.append(worker)
        if counted:
            self._counts["started"] += 1
        if self._metrics is not None:
            self._metrics.workers.set(len(self._workers))
        self._nursery.start_soon(self._work, worker)

    async def _work(self, worker: _Worker) -> None:
        try:
            while True:
                batch = self._take_batch()
                if batch:
                    worker.busy = True
                    try:
                        await self._apply(batch)
                    finally:
                        worker.busy = False
                    continue
                if not await self._park(worker):
                    return
        finally:
            self._workers.remove(worker)
            if worker in self._idle:
                self._idle.remove(worker)
            if self._metrics is not None:
                self._metrics.workers.set(len(self._workers))
            # Pass the baton: work queued for this worker goes to another one.
            if self._jobs and self._idle:
                self._idle.pop().wake.set()

    async def _park(self, worker: _Worker) -> bool:
        """Wait for work; False when idle for ``scale_down_after_s`` and above the minimum."""
        while True:
            worker.wake = trio.Event()
            self._idle.append(worker)
            with trio.move_on_after(self.scale_down_after_s):
                await worker.wake.wait()
            if worker.wake.is_set():  # offer() popped it from the idle stack
                return True
            self._idle.remove(worker)
            if self._jobs:  # work arrived for someone else; look again
                return True
            if len(self._workers) > self.workers_min:
                self._counts["stopped"] += 1
                log.info("dlr: idle worker %d stops (%d left)", worker.number,
                         len(self._workers) - 1)  # fmt: skip
                return False

    async def _apply(self, batch: list[QueuedCallback]) -> None:
        receipts = [receipt for job in batch for receipt in job.receipts]
        try:
            await self.sink.apply(receipts)
        except Exception:
            log.exception("dlr: the sink failed on %d receipts; their callbacks get 503",
                          len(receipts))  # fmt: skip
            for job in batch:
                job.settle(Outcome.FAILED)
        else:
            self._counts["applied"] += len(receipts)
            if self._metrics is not None:
                self._metrics.applied.inc(len(receipts))
            for job in batch:
                job.settle(Outcome.APPLIED)
        finally:  # cancelled mid-apply: the callbacks answer 503, the providers retry
            for job in batch:
                job.settle(Outcome.FAILED)

    async def _scaler(self) -> None:
        """One more worker each time the depth held at/above ``scale_up_depth`` for
        ``scale_up_after_s`` (measured from when it got there, then from the last start)."""
        while True:
            since = self._above_since
            if since is None:
                self._above_changed = trio.Event()
                await self._above_changed.wait()
                continue
            await trio.sleep_until(since + self.scale_up_after_s)
            if self._above_since != since:
                continue  # the depth fell back meanwhile (and maybe rose again)
            if len(self._workers) < self.workers_max:
                self._spawn(counted=True)
                log.info("dlr: queue depth %d held; worker %d started (%d running)",
                         self._depth, self._numbered, len(self._workers))  # fmt: skip
            self._above_since = trio.current_time()

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
        route = self._route(scope["path"])
        if route is None:
            await self._refuse(send, None, 404, "not_found", f"no webhook at {scope['path']!r}")
            return
        if scope["method"] != "POST":
            await self._refuse(
                send, None, 405, "method_not_allowed",
                f"{scope['method']} is not allowed; use POST",
                extra_headers=[(b"allow", b"POST")],
            )  # fmt: skip
            return
        kind, provider = route
        parser = self.parsers[kind].get(provider)
        self._count_callback(provider if parser is not None else UNKNOWN_PROVIDER)
        if parser is None:
            await self._refuse(
                send, UNKNOWN_PROVIDER, 404, "unknown_provider",
                f"no {kind.value} webhook for provider {provider[:64]!r}", named=False,
            )  # fmt: skip
            return
        try:
            declared = declared_length(scope)
        except ValueError as exc:
            await self._refuse(send, provider, 400, "invalid_content_length", str(exc))
            return
        if declared is not None and declared > self.max_body_bytes:
            message = str(BodyTooLarge(self.max_body_bytes, declared=declared))
            await self._refuse(send, provider, 413, "payload_too_large", message)
            return
        try:
            self.limiter.acquire_or_raise(provider)
        except RateLimitExceeded as exc:
            self._counts["rate_limited"] += 1
            await self._refuse(
                send, provider, 429, "rate_limited",
                f"too many callbacks from {provider!r}; retry later",
                extra_headers=[_retry_after(exc.retry_after_s)], reason="rate_limited",
            )  # fmt: skip
            return
        try:
            body = await read_body(receive, max_bytes=self.max_body_bytes)
        except BodyTooLarge as exc:
            await self._refuse(send, provider, 413, "payload_too_large", str(exc))
            return
        except ClientDisconnected:
            self._refused(provider, "disconnected")
            return
        try:
            receipts = list(parser(self._url(scope), request_headers(scope), body))
        except BadSignature as exc:
            await self._refuse(send, provider, 401, "bad_signature", str(exc))
            return
        except ValueError as exc:  # MalformedReceipt, or any parser's ValueError
            await self._refuse(send, provider, 400, "malformed_receipt", str(exc))
            return
        except Exception as exc:
            log.exception("dlr: the %s parser failed", provider)
            await self._refuse(
                send, provider, 500, "internal_error", f"parser failed ({type(exc).__name__})"
            )
            return
        await self._enqueue(send, provider, receipts)

    async def _enqueue(
        self, send: ASGISendCallable, provider: str, receipts: list[Receipt]
    ) -> None:
        if not receipts:
            self._counts["accepted"] += 1
            await send_json(send, 200, msgspec.json.encode(_Accepted(accepted=0)))
            return
        if len(receipts) > self.queue_capacity:
            await self._refuse(
                send, provider, 413, "too_many_receipts",
                f"{len(receipts)} receipts in one callback; at most {self.queue_capacity}",
            )  # fmt: skip
            return
        if not self.running:
            await self._refuse(
                send, provider, 503, "not_ready", "the DLR ingress is not running",
                extra_headers=[_retry_after(self.retry_after_s)],
            )  # fmt: skip
            return
        outcome = await self.deliver(provider, receipts)
        if outcome is Outcome.APPLIED:
            self._counts["accepted"] += 1
            await send_json(send, 200, msgspec.json.encode(_Accepted(accepted=len(receipts))))
            return
        retry = [_retry_after(self.retry_after_s)]
        if outcome is None:
            self._counts["shed"] += 1
            if self._metrics is not None:
                self._metrics.shed.labels(provider).inc()
            await self._refuse(
                send, provider, 429, "queue_full",
                "the DLR queue is full; retry later", extra_headers=retry, reason="queue_full",
            )  # fmt: skip
        elif outcome is Outcome.ABANDONED:
            await self._refuse(
                send, provider, 503, "ack_timeout",
                f"the receipts were not applied within {self.ack_timeout_s}s; retry later",
                extra_headers=retry,
            )  # fmt: skip
        else:
            await self._refuse(
                send, provider, 503, "sink_failed",
                "the receipts could not be stored; retry later", extra_headers=retry,
            )  # fmt: skip

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

    async def _refuse(
        self,
        send: ASGISendCallable,
        provider: str | None,
        status: int,
        code: str,
        message: str,
        *,
        extra_headers: Iterable[tuple[bytes, bytes]] = (),
        reason: str | None = None,
        named: bool = True,
    ) -> None:
        """Answer a typed refusal; ``named``: the body names the provider."""
        self._refused(provider, reason or code)
        refusal = _Refusal(error=code, message=message, provider=provider if named else None)
        body = msgspec.json.encode(refusal)
        await send_json(send, status, body, extra_headers=extra_headers)
