"""The scanner pool: every stored upload scanned by clamd before it may be served (row 8).

An actor (:func:`scanner_pool_child` builds its child spec and ref) that owns
**our own pending-scan queue** and a bounded set of **scan workers**. clamd
refuses work past its ``MaxQueue`` (100 by default), so the queue that can
grow -- and that row 8 watches -- is ours: attachments submitted by the upload
admission (:class:`Submit`) or reloaded from the database (every ``pending``
row, at start and whenever the pool is idle: nothing submitted is lost to a
full mailbox or a restart).

**Workers** are slots of the pool (as in :mod:`actors.dlr_ingress`): a worker
with a job runs it as a task of the actor (``start_soon``), so a worker that
crashes crashes the pool, which its supervisor restarts; the new incarnation
reloads the pending rows. A job is one attachment:

1. stream the blob from the blob store into clamd's ``zINSTREAM``;
2. map the verdict and write it (as the tenant) in ONE unit of work:

=======================================  ==========================================
``stream: OK``                           ``clean`` -- the only state ever served
``stream: <sig> FOUND``                  ``infected`` (the signature), then the blob
                                         is moved to quarantine: never served
clamd ERROR / its size limit / the       one failed attempt (``last_error``); again
blob missing (permanent)                 after ``retry_backoff_s``; ``failed`` after
                                         ``max_attempts`` -- never "clean"
clamd unreachable or silent (transient)  back to the head of the queue, no attempt
                                         counted; the pool stops dispatching until
                                         clamd answers STATS again (``CLAMD_DOWN``)
database unreachable                     back to the queue after ``retry_backoff_s``
=======================================  ==========================================

3. report :class:`ScanDone` to the pool, which frees the slot.

**clamd's health is the pool's breaker**: a scan that finds clamd unreachable or
silent opens it (``CLAMD_DOWN``: nothing dispatched, so no scan burns its attempts
on a dead clamd), and the next ``STATS`` that answers is the half-open probe that
closes it. The workers bound is the bulkhead (row 8's "bulkhead + queue depth").

**Every** ``poll_interval_s`` (:class:`Poll`) the pool asks clamd ``STATS`` (in
a task: a hung clamd never blocks the actor), then sets the row-8 gauge
``triage_scan_queue_depth`` = our pending scans (queued, being scanned, waiting
to retry) + clamd's ``QUEUE`` and feeds row 8's gauge-sustained detector, and
scales: one worker more while more than ``scale_up_depth`` scans wait per
worker and clamd reports an idle thread; one fewer while nothing waits; always
within ``[min_workers, max_workers]``.

**Row 8's mitigation**, while its detector fires (evaluated by the daemon's
detector set; the alert comes from the detector's event): every worker
(``max_workers``), large uploads refused (``gate(limit)``: the upload admission
refuses uploads over ``backed_up_max_bytes`` until the detector clears, then
``gate(None)``), and a warning in the log. State (:class:`ScannerState`)::

    STARTING --pending rows loaded--> SCANNING
    SCANNING --row 8 fires--> BACKED_UP --clears--> SCANNING
    any --clamd unreachable--> CLAMD_DOWN --STATS answered--> SCANNING / BACKED_UP
    any --the incarnation ends--> STOPPED
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import logging
import math
import uuid
from collections.abc import AsyncIterable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge

from config.catalog import Catalog, alert_name, row_detector
from config.schema import DetectorConfig, ScannerConfig, TriageConfig, engine_kwargs
from engine.actor import Actor, ActorRef, Overflow, Timer, actor_child, ended_by_error
from engine.detectors import GaugeSustainedDetector, make_detector
from engine.errors import PermanentProviderError, ProviderError, TransientProviderError
from engine.metrics import families
from engine.statelog import StateLog
from providers.blobstore import BlobNotFound, BlobStore, BlobStoreError
from providers.bridge import run, translate_error
from providers.clamd import ClamdStats, ScanResult
from providers.db.attachments import (
    AttachmentStatus,
    PendingScan,
    ScanRecord,
    pending_attachments,
    record_scans,
)

if TYPE_CHECKING:
    import asyncpg

    from engine.deadlines import Deadlines
    from engine.metrics import Metrics
    from engine.runtime import Runtime
    from engine.supervisor import ChildSpec, Restart

__all__ = [
    "DETECTOR_OVERRIDE",
    "POLL",
    "ROW",
    "DbScanStore",
    "Poll",
    "ScanDone",
    "ScanOutcome",
    "ScanStore",
    "Scanner",
    "ScannerMessage",
    "ScannerPool",
    "ScannerState",
    "ScannerStatistics",
    "Submit",
    "build_detector",
    "detector_config",
    "scanner_pool_child",
]

log = logging.getLogger("triage.scanner")

ROW = 8
#: A ``[detectors.<name>]`` section with this name (or on the row's metric) overrides row 8's.
DETECTOR_OVERRIDE = "scan_queue_depth"


class Scanner(Protocol):
    """What the pool needs of clamd (:class:`providers.clamd.ClamdClient`)."""

    async def scan(self, chunks: AsyncIterable[bytes]) -> ScanResult: ...

    async def stats(self) -> ClamdStats: ...


class ScanStore(Protocol):
    """Where scan results go and pending scans come from (the database, in the daemon)."""

    async def record(self, record: ScanRecord) -> bool:
        """Write one result (True: the row moved; False: it was no longer pending)."""
        ...

    async def pending(self, limit: int) -> list[PendingScan]:
        """The oldest ``limit`` pending attachments of every tenant."""
        ...


class ScannerState(enum.Enum):
    STARTING = "starting"
    SCANNING = "scanning"
    BACKED_UP = "backed_up"  # row 8 fires: every worker, large uploads refused
    CLAMD_DOWN = "clamd_down"  # clamd unreachable: nothing dispatched until it answers
    STOPPED = "stopped"


class ScanOutcome(enum.Enum):
    CLEAN = "clean"
    INFECTED = "infected"
    FAILED = "failed"  # final: max_attempts permanent failures
    RETRY = "retry"  # a permanent failure with attempts left: again after the backoff
    UNREACHABLE = "unreachable"  # clamd did not answer: requeued, no attempt counted
    UNRECORDED = "unrecorded"  # the database refused the result: requeued after the backoff
    GONE = "gone"  # the row was no longer pending (another replica finished it)


class Submit(msgspec.Struct, frozen=True, tag=True):
    """Scan this stored attachment (its row is written ``pending`` already)."""

    scan: PendingScan


class Poll(msgspec.Struct, frozen=True, tag=True):
    """The timer: clamd's STATS, the row-8 gauge, scaling, reloading pending rows."""


class ClamdPolled(msgspec.Struct, frozen=True, tag=True):
    stats: ClamdStats | None
    error: str | None = None


class ScanDone(msgspec.Struct, frozen=True, tag=True):
    """A worker finished a job (its task reports it)."""

    scan: PendingScan
    outcome: ScanOutcome
    attempts: int
    detail: str = ""


class Reloaded(msgspec.Struct, frozen=True, tag=True):
    scans: list[PendingScan]
    error: str | None = None


class Retry(msgspec.Struct, frozen=True, tag=True):
    scan: PendingScan


POLL = Poll()

ScannerMessage = Submit | Poll | ClamdPolled | ScanDone | Reloaded | Retry


class ScannerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """This incarnation's numbers (``ref.statistics()``)."""

    state: ScannerState
    queued: int  # waiting for a worker
    scanning: int  # being scanned now
    retrying: int  # waiting out a backoff
    pending: int  # all three: our side of the row-8 gauge
    workers: int  # the current worker bound
    clamd_queue: int | None
    clamd_idle_threads: int | None
    gauge: float  # the last value fed to row 8's detector
    clean: int
    infected: int
    failed: int
    retries: int
    unreachable: int
    blocking_large_uploads: bool
    max_workers_seen: int


class _ScannerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.depth = Gauge(
            "triage_scan_queue_depth",
            "Attachments waiting for an antivirus scan",
            registry=registry,
        )
        self.workers = Gauge("triage_scan_workers", "Scan workers allowed now", registry=registry)
        self.clamd_queue = Gauge(
            "triage_clamd_queue", "Requests queued inside clamd (its STATS)", registry=registry
        )
        self.clamd_idle = Gauge(
            "triage_clamd_idle_threads", "Idle clamd threads (its STATS)", registry=registry
        )
        self.scans = Counter(
            "triage_scans_total", "Finished scans by result", ["result"], registry=registry
        )


def _scanner_metrics(registry: CollectorRegistry) -> _ScannerMetrics:
    return families(registry, _ScannerMetrics)


def detector_config(config: TriageConfig, catalog: Catalog) -> DetectorConfig:
    """Row 8's detector: ``[detectors.scan_queue_depth]`` if set, else the catalog row's."""
    return row_detector(config, catalog, ROW, DETECTOR_OVERRIDE)


def build_detector(
    config: TriageConfig, catalog: Catalog, *, runtime: Runtime | None = None
) -> GaugeSustainedDetector:
    common: dict[str, Any] = {}
    if runtime is not None:
        common = {"clock": runtime.clock, "events": runtime.events, "metrics": runtime.metrics}
    return make_detector(
        alert_name(catalog.row(ROW)), row=ROW, **engine_kwargs(detector_config(config, catalog)),
        **common,
    ).expect(GaugeSustainedDetector)  # fmt: skip


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class ScannerPool(Actor[ScannerMessage]):
    """The pool (child id ``scanner_pool``); see the module docstring."""

    name = "scanner_pool"
    uses_tasks = True

    def __init__(
        self,
        *,
        scanner: Scanner,
        blobs: BlobStore,
        store: ScanStore,
        config: ScannerConfig,
        backed_up_max_bytes: int,
        gate: Callable[[int | None], None] | None = None,
        detector: GaugeSustainedDetector | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.scanner = scanner
        self.blobs = blobs
        self.store = store
        self.config = config
        self.backed_up_max_bytes = backed_up_max_bytes
        self.gate = gate
        self.detector = detector
        self.states = StateLog(
            "scanner pool",
            ScannerState.STARTING,
            log,
            warn={ScannerState.BACKED_UP, ScannerState.CLAMD_DOWN},
        )
        self.queue: collections.deque[PendingScan] = collections.deque()
        self.attempts: dict[uuid.UUID, int] = {}  # permanent failures so far, per attachment
        self.known: set[uuid.UUID] = set()  # queued, scanning or retrying
        self.scanning: set[uuid.UUID] = set()
        self.retrying: set[uuid.UUID] = set()
        self.workers = config.min_workers
        self.max_workers_seen = self.workers
        self.clamd: ClamdStats | None = None
        self.clamd_up = True
        self.polling = False
        self.reloading = False
        self.blocking = False
        self.gauge = math.nan
        self.counts: collections.Counter[str] = collections.Counter()
        self._metrics = _scanner_metrics(registry) if registry is not None else None

    # -- the actor -----------------------------------------------------------------------

    async def init(self) -> None:
        if self._metrics is not None:
            self._metrics.workers.set(self.workers)
        self._reload()

    def timers(self) -> Sequence[Timer]:
        return [Timer(self.config.poll_interval_s, POLL)]

    def statistics(self) -> ScannerStatistics:
        clamd = self.clamd
        return ScannerStatistics(
            state=self.states.state,
            queued=len(self.queue),
            scanning=len(self.scanning),
            retrying=len(self.retrying),
            pending=len(self.known),
            workers=self.workers,
            clamd_queue=clamd.queue if clamd is not None else None,
            clamd_idle_threads=clamd.threads_idle if clamd is not None else None,
            gauge=self.gauge,
            clean=self.counts["clean"],
            infected=self.counts["infected"],
            failed=self.counts["failed"],
            retries=self.counts["retry"],
            unreachable=self.counts["unreachable"],
            blocking_large_uploads=self.blocking,
            max_workers_seen=self.max_workers_seen,
        )

    async def handle(self, message: ScannerMessage) -> None:
        match message:
            case Submit(scan=scan):
                self._enqueue(scan)
            case Poll():
                self._poll()
            case ClamdPolled(stats=stats, error=error):
                self.polling = False
                self._polled(stats, error)
            case ScanDone():
                self._done(message)
            case Reloaded(scans=scans, error=error):
                self.reloading = False
                if error is not None:
                    log.warning("scanner pool: pending scans not reloaded: %s", error)
                for scan in scans:
                    self._enqueue(scan)
                if self.states.state is ScannerState.STARTING:
                    self.states.enter(ScannerState.SCANNING, f"{len(scans)} pending scan(s) loaded")
            case Retry(scan=scan):
                self.retrying.discard(scan.id)
                self.known.discard(scan.id)
                self._enqueue(scan)
        self._dispatch()

    async def terminate(self, reason: BaseException | None) -> None:
        self.states.enter(ScannerState.STOPPED, "crashed" if ended_by_error(reason) else "stopped")
        if self.blocking and self.gate is not None:
            self.gate(None)  # the next incarnation decides again from its own detector reading

    # -- the queue -----------------------------------------------------------------------

    def _enqueue(self, scan: PendingScan, *, front: bool = False) -> None:
        if scan.id in self.known:
            return  # submitted and reloaded both: one scan
        if len(self.known) >= self.config.queue_capacity:
            return  # the row stays pending in the database; a later reload brings it
        self.known.add(scan.id)
        if front:
            self.queue.appendleft(scan)
        else:
            self.queue.append(scan)

    def _dispatch(self) -> None:
        if not self.clamd_up:
            return
        while self.queue and len(self.scanning) < self.workers:
            scan = self.queue.popleft()
            self.scanning.add(scan.id)
            self.start_soon(self._scan, scan, self.attempts.get(scan.id, scan.attempts))

    def _reload(self) -> None:
        if self.reloading:
            return
        self.reloading = True
        self.start_soon(self._load_pending)

    async def _load_pending(self) -> None:
        try:
            scans = await self.store.pending(self.config.resume_batch)
        except ProviderError as exc:
            await self.ref.tell(Reloaded([], _describe(exc)))
            return
        await self.ref.tell(Reloaded(scans))

    # -- clamd's numbers, the gauge, scaling, row 8's mitigation --------------------------------

    def _poll(self) -> None:
        if not self.polling:
            self.polling = True
            self.start_soon(self._stats)
        if not self.known and not self.reloading:
            self._reload()  # anything written pending that never reached us
        self._judge(scale=False)  # the gauge keeps flowing while STATS is slow

    async def _stats(self) -> None:
        try:
            stats = await self.scanner.stats()
        except ProviderError as exc:
            await self.ref.tell(ClamdPolled(None, _describe(exc)))
            return
        await self.ref.tell(ClamdPolled(stats))

    def _polled(self, stats: ClamdStats | None, error: str | None) -> None:
        if stats is None:
            self.clamd_up = False
            self.states.enter(ScannerState.CLAMD_DOWN, error or "no STATS")
        else:
            self.clamd = stats
            if not self.clamd_up:
                self.clamd_up = True
                self.states.enter(ScannerState.SCANNING, "clamd answers again")
            if self._metrics is not None:
                self._metrics.clamd_queue.set(stats.queue)
                self._metrics.clamd_idle.set(stats.threads_idle)
        self._judge(scale=True)

    def _judge(self, *, scale: bool) -> None:
        """Feed the gauge, act on the detector's verdict, and (once per poll, with
        clamd's fresh numbers) scale."""
        clamd_queue = self.clamd.queue if self.clamd is not None and self.clamd_up else 0
        self.gauge = float(len(self.known) + clamd_queue)
        if self._metrics is not None:
            self._metrics.depth.set(self.gauge)
        detector = self.detector
        if detector is not None:
            detector.set(self.gauge)
        firing = detector is not None and detector.firing
        if firing and not self.blocking:
            self.blocking = True
            log.warning(
                "scanner pool: scan queue backed up (%d pending, clamd queue %d): %d workers,"
                " uploads over %d bytes refused", len(self.known), clamd_queue,
                self.config.max_workers, self.backed_up_max_bytes,
            )  # fmt: skip
            if self.gate is not None:
                self.gate(self.backed_up_max_bytes)
        elif not firing and self.blocking:
            self.blocking = False
            log.info("scanner pool: scan queue drained; large uploads accepted again")
            if self.gate is not None:
                self.gate(None)
        if self.clamd_up:
            wanted = ScannerState.BACKED_UP if firing else ScannerState.SCANNING
            if self.states.state is not ScannerState.STARTING:
                self.states.enter(wanted, f"scan queue depth {self.gauge:g}")
        # Scaling waits for clamd's fresh numbers, except the step to every worker: row 8
        # firing takes it at once, not at the next poll (clamd may not answer one).
        if scale or (firing and self.workers < self.config.max_workers):
            self._scale(firing)

    def _scale(self, firing: bool) -> None:
        config = self.config
        workers = self.workers
        idle = self.clamd.threads_idle if self.clamd is not None else 0
        if firing:
            workers = config.max_workers
        elif len(self.queue) > config.scale_up_depth * workers and idle > 0:
            workers += 1
        elif not self.queue and not self.scanning:
            workers -= 1
        workers = max(config.min_workers, min(config.max_workers, workers))
        if workers != self.workers:
            log.info("scanner pool: %d -> %d workers", self.workers, workers)
            self.workers = workers
            self.max_workers_seen = max(self.max_workers_seen, workers)
            if self._metrics is not None:
                self._metrics.workers.set(workers)

    # -- one job -------------------------------------------------------------------------

    def _done(self, done: ScanDone) -> None:
        scan = done.scan
        self.scanning.discard(scan.id)
        outcome = done.outcome
        self.counts[outcome.value] += 1
        if self._metrics is not None:
            self._metrics.scans.labels(result=outcome.value).inc()
        if outcome is ScanOutcome.UNREACHABLE:
            self.known.discard(scan.id)
            self._enqueue(scan, front=True)
            if self.clamd_up:
                self.clamd_up = False
                self.states.enter(ScannerState.CLAMD_DOWN, done.detail)
            return
        if outcome in (ScanOutcome.RETRY, ScanOutcome.UNRECORDED):
            if outcome is ScanOutcome.RETRY:
                self.attempts[scan.id] = done.attempts
            self.retrying.add(scan.id)
            self.send_after(self.config.retry_backoff_s, Retry(scan))
            return
        if outcome is ScanOutcome.INFECTED:
            log.warning(
                "scanner pool: attachment %s infected (%s): quarantined", scan.id, done.detail
            )
        elif outcome is ScanOutcome.FAILED:
            log.error("scanner pool: attachment %s not scanned: %s", scan.id, done.detail)
        self.known.discard(scan.id)
        self.attempts.pop(scan.id, None)

    async def _scan(self, scan: PendingScan, attempts: int) -> None:
        done = await self._run_job(scan, attempts)
        await self.ref.tell(done)

    async def _run_job(self, scan: PendingScan, attempts: int) -> ScanDone:
        chunk = self.config.chunk_bytes
        try:
            async with contextlib.aclosing(
                self.blobs.get(scan.blob_key, chunk_bytes=chunk)
            ) as body:
                result = await self.scanner.scan(body)
        except TransientProviderError as exc:
            return ScanDone(scan, ScanOutcome.UNREACHABLE, attempts, _describe(exc))
        except (PermanentProviderError, BlobNotFound, BlobStoreError) as exc:
            attempts += 1
            error = _describe(exc)
            final = attempts >= self.config.max_attempts or isinstance(exc, BlobNotFound)
            record = ScanRecord(
                id=scan.id, tenant_id=scan.tenant_id,
                status=AttachmentStatus.FAILED if final else AttachmentStatus.PENDING, error=error,
            )  # fmt: skip
            outcome = ScanOutcome.FAILED if final else ScanOutcome.RETRY
            return await self._write(scan, record, outcome, attempts, error)
        if result.infected:
            signature = result.signature or "unknown"
            record = ScanRecord(
                id=scan.id, tenant_id=scan.tenant_id, status=AttachmentStatus.INFECTED,
                signature=signature,
            )  # fmt: skip
            done = await self._write(scan, record, ScanOutcome.INFECTED, attempts, signature)
            if done.outcome in (ScanOutcome.INFECTED, ScanOutcome.GONE):
                # The row says infected first, so the blob is never served even if this
                # move fails; the move is retried by no one then (it stays unserved).
                try:
                    await self.blobs.quarantine(scan.blob_key)
                except BlobStoreError as exc:
                    log.error("scanner pool: quarantine of %s failed: %s", scan.blob_key, exc)
            return done
        record = ScanRecord(id=scan.id, tenant_id=scan.tenant_id, status=AttachmentStatus.CLEAN)
        return await self._write(scan, record, ScanOutcome.CLEAN, attempts, "")

    async def _write(
        self, scan: PendingScan, record: ScanRecord, outcome: ScanOutcome, attempts: int,
        detail: str,
    ) -> ScanDone:  # fmt: skip
        try:
            moved = await self.store.record(record)
        except ProviderError as exc:
            return ScanDone(scan, ScanOutcome.UNRECORDED, attempts, _describe(exc))
        if not moved:
            return ScanDone(scan, ScanOutcome.GONE, attempts, "no longer pending")
        return ScanDone(scan, outcome, attempts, detail)


def scanner_pool_child(
    *,
    scanner: Scanner,
    blobs: BlobStore,
    store: ScanStore,
    config: ScannerConfig,
    backed_up_max_bytes: int,
    capacity: int,
    shutdown_s: float,
    gate: Callable[[int | None], None] | None = None,
    detector: GaugeSustainedDetector | None = None,
    registry: CollectorRegistry | None = None,
    restart: Restart | None = None,
    deadlines: Deadlines | None = None,
    metrics: Metrics | None = None,
) -> tuple[ChildSpec, ActorRef[ScannerMessage]]:
    """The pool's child spec (id ``scanner_pool``) and ref.

    The mailbox (``capacity``) is ``wait``: the upload admission offers with
    ``tell_nowait`` (a full mailbox leaves the row pending, for the next reload),
    while the pool's own tasks wait for room to report, so no result is lost.
    """
    factory = functools.partial(
        ScannerPool, scanner=scanner, blobs=blobs, store=store, config=config,
        backed_up_max_bytes=backed_up_max_bytes, gate=gate, detector=detector, registry=registry,
    )  # fmt: skip
    return actor_child(
        ScannerPool.name, factory, capacity=capacity, overflow=Overflow.WAIT, restart=restart,
        shutdown_s=shutdown_s, deadlines=deadlines, metrics=metrics,
    )  # fmt: skip


class DbScanStore:
    """:class:`ScanStore` on PostgreSQL (:mod:`providers.db.attachments`), one crossing each.

    A result the database refuses for another reason than reachability is a
    :class:`~engine.errors.PermanentProviderError` here: the pool retries it after
    the backoff (the row stays pending, never taken for clean)."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        self.pool = pool

    async def record(self, record: ScanRecord) -> bool:
        [result] = await run(record_scans, self.pool, [record], service="postgres")
        if isinstance(result, Exception):
            mapped = translate_error(result, service="postgres")
            if mapped is not None:
                raise mapped from result
            raise PermanentProviderError(
                f"the database refused a scan result: {result}"
            ) from result
        return result

    async def pending(self, limit: int) -> list[PendingScan]:
        return await run(pending_attachments, self.pool, limit, service="postgres")
