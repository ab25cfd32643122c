"""Recording ingest: recordings copied from the blob path into the store (catalog row 20).

An actor (:func:`recording_ingest_child`). PostgreSQL is its queue: a recording is
first a ``pending`` row (:class:`Ingest` registers it; registering it again
changes nothing), and the actor works on the rows it *claims* (a lease of
``lease_s``, so two replicas never copy one recording, and a crashed replica's rows
are claimed again once their lease ran out). At most ``concurrency`` ingests run at
once, each a task of the actor's nursery:

1. :meth:`providers.recording_files.RecordingFiles.ingest` in a worker thread --
   the copy into the store, hashed;
2. a denied or missing file (``RecordingError.retryable``) is tried again with the
   backoff and budget of ``[retries.<recordings.retry>]`` (tenacity through
   :class:`~engine.retry.RetryPolicy`, on Trio time); a refused path is not;
3. the task tells the actor :class:`Attempted`; the actor writes the outcome:
   ``ingested`` (size, sha256, stored path), or after the budget ``failed`` with, in
   the same transaction, the ``recording.failed`` event in the outbox (the relay
   publishes it) and the dead letter. Then row 20's count-in-window detector and
   ``triage_recording_failed_total`` count it and a ticket :class:`RecordingFailed`
   notice goes to the alert sink. Nobody has to do anything: a replay from the dead
   letter is the on-call's choice (``triage dlq redrive ID`` puts the recording
   back to pending with a fresh budget; the next resume claims it).

Messages, one ``match``::

    Ingest      register a recording (ask: True new, False known, or the error)
    Resume      claim free pending rows up to the free slots; every resume_interval_s,
                and at once after a registration or a finished ingest
    Attempted   an ingest task's outcome (the actor's own)

If the database refuses an outcome, the row stays pending under its lease and is
claimed and ingested again once the lease runs out (the copy is idempotent: the same
target, renamed whole).

State machine (one log line per change)::

    STARTING --store ready--> INGESTING
    INGESTING --the database refused a claim or an outcome--> DEGRADED
    DEGRADED --a claim or an outcome stored--> INGESTING
    any --the incarnation ends--> STOPPED

**Replicas** (issue 12): runs on every replica, no lease: rows are claimed with a
lease, a dead replica's are claimed again when it runs out.
"""

from __future__ import annotations

import enum
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter

from config.schema import MailboxConfig, RecordingsConfig
from engine.actor import Actor, ActorRef, Overflow, Timer, actor_child, ended_by_error
from engine.clock import Clock
from engine.detectors import CountInWindowDetector
from engine.errors import ProviderError
from engine.events import EventBus, Notice
from engine.metrics import families
from engine.retry import RetryPolicy
from engine.statelog import StateLog
from providers.bridge import run
from providers.db.recordings import (
    PendingRecording,
    claim_pending,
    mark_failed,
    mark_ingested,
    register,
)
from providers.recording_files import RecordingError, RecordingFiles, StoredRecording

if TYPE_CHECKING:
    import asyncpg

    from engine.deadlines import Deadlines
    from engine.metrics import Metrics
    from engine.supervisor import ChildSpec, Restart

__all__ = [
    "ROW",
    "Attempted",
    "DbRecordingStore",
    "Ingest",
    "RecordingFailed",
    "RecordingIngest",
    "RecordingIngestMessage",
    "RecordingIngestState",
    "RecordingIngestStatistics",
    "RecordingStore",
    "Resume",
    "is_retryable",
    "recording_ingest_child",
]

log = logging.getLogger("triage.recording_ingest")

ROW = 20
SEVERITY = "ticket"  # row 20's severity in the catalog


T = TypeVar("T")


#: How blocking file work runs: ``trio.to_thread.run_sync`` (tests: inline, so the
#: autojump clock never moves while a thread works).
class Offload(Protocol):
    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


async def _in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


class RecordingStore(Protocol):
    """The ``recordings`` rows (:class:`DbRecordingStore` in the daemon)."""

    async def register(self, item: PendingRecording) -> bool: ...

    async def claim(self, limit: int, lease_s: float) -> list[PendingRecording]: ...

    async def ingested(
        self, item: PendingRecording, attempts: int, stored: StoredRecording
    ) -> bool: ...

    async def failed(
        self, item: PendingRecording, attempts: int, error: str, subject: str
    ) -> bool: ...


class DbRecordingStore:
    """:class:`RecordingStore` in PostgreSQL (:mod:`providers.db.recordings`)."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        self.pool = pool

    async def register(self, item: PendingRecording) -> bool:
        return await run(register, self.pool, item, service="postgres")

    async def claim(self, limit: int, lease_s: float) -> list[PendingRecording]:
        return await run(claim_pending, self.pool, limit, lease_s, service="postgres")

    async def ingested(
        self, item: PendingRecording, attempts: int, stored: StoredRecording
    ) -> bool:
        return await run(
            mark_ingested, self.pool, item, attempts, stored.size_bytes, stored.sha256,
            stored.stored_path, service="postgres",
        )  # fmt: skip

    async def failed(self, item: PendingRecording, attempts: int, error: str, subject: str) -> bool:
        return await run(mark_failed, self.pool, item, attempts, error, subject, service="postgres")


class RecordingIngestState(enum.Enum):
    STARTING = "starting"
    INGESTING = "ingesting"
    DEGRADED = "degraded"  # the database refused a claim or an outcome
    STOPPED = "stopped"


class Ingest(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    tenant_id: uuid.UUID
    recording_id: str
    path: str  # relative to [recordings] path
    session_id: str | None = None


class Resume(msgspec.Struct, frozen=True, tag=True):
    """Claim free pending recordings and start their ingests."""


class Attempted(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    item: PendingRecording
    attempts: int
    stored: StoredRecording | None = None
    error: str | None = None


RecordingIngestMessage = Ingest | Resume | Attempted
RESUME = Resume()


class RecordingIngestStatistics(msgspec.Struct, frozen=True, kw_only=True):
    state: RecordingIngestState
    registered: int
    in_flight: int
    ingested: int
    failed: int
    attempts: int
    outcome_errors: int


class RecordingFailed(Notice, frozen=True, kw_only=True):
    """Row 20: a recording could not be ingested within its retry budget (dead-lettered)."""

    tenant: str
    recording_id: str
    path: str
    reason: str
    attempts: int
    severity: str = SEVERITY
    row: int | None = ROW

    def alert_key(self) -> str:
        return f"recording_failed:{self.tenant}/{self.recording_id}"


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.failed = Counter(
            "triage_recording_failed_total",
            "Recording ingests that failed (recording.failed events)",
            registry=registry,
        )
        self.ingested = Counter(
            "triage_recordings_ingested_total", "Recordings ingested", registry=registry
        )
        self.attempts = Counter(
            "triage_recording_ingest_attempts_total",
            "Attempts to copy a recording (first tries and retries)",
            registry=registry,
        )


def is_retryable(exc: Exception) -> bool:
    """The retry policy's test: a recording error that may pass later (denied, missing)."""
    return isinstance(exc, RecordingError) and exc.retryable


def _key(item: PendingRecording) -> tuple[uuid.UUID, str]:
    return item.tenant_id, item.recording_id


class RecordingIngest(Actor[RecordingIngestMessage]):
    """See the module docstring. Build it with :func:`recording_ingest_child`."""

    name = "recording_ingest"
    uses_tasks = True

    def __init__(
        self,
        *,
        store: RecordingStore,
        config: RecordingsConfig,
        retry: RetryPolicy,
        files: RecordingFiles | None = None,
        detector: CountInWindowDetector | None = None,
        registry: CollectorRegistry | None = None,
        events: EventBus | None = None,
        clock: Clock | None = None,
        offload: Offload = _in_thread,
    ) -> None:
        self.store = store
        self.offload = offload
        self.config = config
        self.retry = retry
        self.files = (
            files
            if files is not None
            else RecordingFiles(config.path, config.store_path, chunk_bytes=config.chunk_bytes)
        )
        self.detector = detector
        self.events = events
        self.clock = clock if clock is not None else Clock()
        self.states = StateLog(
            "recording ingest", RecordingIngestState.STARTING, log,
            warn={RecordingIngestState.DEGRADED},
        )  # fmt: skip
        self.in_flight: set[tuple[uuid.UUID, str]] = set()
        self.registered = 0
        self.ingested = 0
        self.failed = 0
        self.attempts = 0
        self.outcome_errors = 0
        self._metrics = families(registry, _Metrics) if registry is not None else None

    async def init(self) -> None:
        """The store directory exists (created if missing; refused: the start fails)."""
        store = Path(self.config.store_path)
        await self.offload(functools.partial(store.mkdir, parents=True, exist_ok=True))
        self.states.enter(RecordingIngestState.INGESTING, "started")
        self.tell_self(RESUME)  # rows left pending by an earlier incarnation

    def timers(self) -> Sequence[Timer]:
        return [Timer(self.config.resume_interval_s, RESUME)]

    async def terminate(self, reason: BaseException | None) -> None:
        self.states.enter(
            RecordingIngestState.STOPPED, "crashed" if ended_by_error(reason) else "stopped"
        )

    def statistics(self) -> RecordingIngestStatistics:
        return RecordingIngestStatistics(
            state=self.states.state,
            registered=self.registered,
            in_flight=len(self.in_flight),
            ingested=self.ingested,
            failed=self.failed,
            attempts=self.attempts,
            outcome_errors=self.outcome_errors,
        )

    async def handle(self, message: RecordingIngestMessage) -> object:
        match message:
            case Ingest():
                return await self._register(message)
            case Resume():
                await self._resume()
                return None
            case Attempted():
                await self._record(message)
                return None

    # -- registering and claiming ------------------------------------------------------------

    async def _register(self, message: Ingest) -> bool | Exception:
        item = PendingRecording(
            tenant_id=message.tenant_id, recording_id=message.recording_id,
            session_id=message.session_id, path=message.path, attempts=0,
        )  # fmt: skip
        try:
            new = await self.store.register(item)
        except ProviderError as exc:
            return exc
        except Exception as exc:  # e.g. an unknown tenant: the caller's problem, not ours
            return exc
        if new:
            self.registered += 1
            self.tell_self(RESUME)
        return new

    async def _resume(self) -> None:
        free = min(self.config.concurrency - len(self.in_flight), self.config.resume_batch)
        if free < 1:
            return
        try:
            claimed = await self.store.claim(free, self.config.lease_s)
        except ProviderError as exc:
            self.states.enter(RecordingIngestState.DEGRADED, f"claim refused: {exc}")
            return
        self.states.enter(RecordingIngestState.INGESTING, "claimed")
        for item in claimed:
            if _key(item) in self.in_flight:  # our own lease ran out while we still work on it
                continue
            self.in_flight.add(_key(item))
            self.start_soon(self._work, item)

    # -- one ingest -----------------------------------------------------------------------

    async def _attempt(self, item: PendingRecording, tries: list[int]) -> StoredRecording:
        tries[0] += 1
        self.attempts += 1
        if self._metrics is not None:
            self._metrics.attempts.inc()
        return await self.offload(
            functools.partial(self.files.ingest, item.path, str(item.tenant_id), item.recording_id)
        )

    async def _work(self, item: PendingRecording) -> None:
        tries = [0]
        try:
            stored = await self.retry.call(self._attempt, item, tries)
        except RecordingError as exc:
            outcome = Attempted(item=item, attempts=tries[0], error=str(exc))
        else:
            outcome = Attempted(item=item, attempts=tries[0], stored=stored)
        await self.ref.tell(outcome)

    async def _record(self, message: Attempted) -> None:
        item = message.item
        self.in_flight.discard(_key(item))
        stored = message.stored
        try:
            if stored is not None:
                moved = await self.store.ingested(item, message.attempts, stored)
            else:
                error = message.error or "unknown error"
                moved = await self.store.failed(
                    item, message.attempts, error, self.config.event_subject
                )
        except ProviderError as exc:  # stays pending; claimed again when its lease ran out
            self.outcome_errors += 1
            self.states.enter(RecordingIngestState.DEGRADED, f"outcome refused: {exc}")
            return
        self.states.enter(RecordingIngestState.INGESTING, "outcome stored")
        self.tell_self(RESUME)
        if not moved:
            return  # another replica settled it first
        if stored is not None:
            self.ingested += 1
            if self._metrics is not None:
                self._metrics.ingested.inc()
            return
        self._failed(message)

    def _failed(self, message: Attempted) -> None:
        item = message.item
        self.failed += 1
        if self._metrics is not None:
            self._metrics.failed.inc()
        if self.detector is not None:
            self.detector.observe(1)
        log.warning(
            "recording ingest failed after %d attempts, dead-lettered: %s",
            message.attempts, message.error,
            extra={"tenant_id": str(item.tenant_id), "recording_id": item.recording_id},
        )  # fmt: skip
        if self.events is not None:
            self.events.emit(
                RecordingFailed(
                    at=trio.current_time(),
                    wall=self.clock.wall(),
                    tenant=str(item.tenant_id),
                    recording_id=item.recording_id,
                    path=item.path,
                    reason=message.error or "",
                    attempts=message.attempts,
                )
            )


def recording_ingest_child(
    *,
    store: RecordingStore,
    config: RecordingsConfig,
    retry: RetryPolicy,
    mailbox: MailboxConfig,
    shutdown_s: float,
    files: RecordingFiles | None = None,
    detector: CountInWindowDetector | None = None,
    registry: CollectorRegistry | None = None,
    events: EventBus | None = None,
    clock: Clock | None = None,
    offload: Offload = _in_thread,
    restart: Restart | None = None,
    deadlines: Deadlines | None = None,
    metrics: Metrics | None = None,
    actor: Callable[..., RecordingIngest] = RecordingIngest,
) -> tuple[ChildSpec, ActorRef[RecordingIngestMessage]]:
    """The ingest's child spec (id ``recording_ingest``) and ref."""
    factory: Callable[[], RecordingIngest] = functools.partial(
        actor, store=store, config=config, retry=retry, files=files, detector=detector,
        registry=registry, events=events, clock=clock, offload=offload,
    )  # fmt: skip
    return actor_child(
        RecordingIngest.name,
        factory,
        capacity=mailbox.capacity,
        overflow=Overflow(mailbox.overflow),
        restart=restart,
        shutdown_s=shutdown_s,
        deadlines=deadlines,
        metrics=metrics,
    )
