"""The thread service: threads, their participants and read receipts (catalog row 12).

::

    threads = ThreadService.for_runtime(pool, runtime, config=config.threads, detector=row12)
    thread = await threads.create_thread(tenant, "visit 42")
    await threads.add_participant(tenant, thread, Participant(tenant, "patient-7", "patient"))
    await threads.participants(tenant, thread)        # [ParticipantRow, ...]
    await threads.mark_read(tenant, thread, "patient-7")   # ReceiptRow, read_at by the database
    await threads.receipts(tenant, thread)            # in database-clock order

A direct-call store, not an actor: every call is one request's own unit of work
(one crossing of the bridge), and a mailbox hop would queue every request of
every tenant behind one task. The state it keeps is counters only.

**Two checks, one count.** A participant carries its tenant. Adding one to a
thread of another tenant -- a thread is the caller's tenant's, or invisible to
it -- is refused twice over:

1. the application check (:meth:`ThreadService.check`, no database) refuses a
   participant whose tenant is not the acting tenant with
   :class:`CrossTenantParticipant` (``check="application"``);
2. with that check bypassed (the bug of row 12), row-level security refuses the
   row (migration 0011: the row, its thread and ``current_tenant_id()`` must name
   one tenant), and the database's refusal (SQLSTATE 42501, or 23503/23514 for a
   role outside RLS) comes back as :class:`CrossTenantParticipant`
   (``check="database"``, the SQLSTATE kept).

Each refusal counts once in ``triage_tenant_check_violations_total{check=...}``,
feeds row 12's count-in-window detector (threshold 0: one refusal fires it; the
alert sink pages) and emits a :class:`CrossTenantRefused` notice naming the
acting tenant, the participant's tenant, the thread and the check -- the logged
request the runbook asks for. Messages name tenants and threads by id only:
never a participant's id, role or a thread's topic (personal data).

A thread the acting tenant cannot see is :class:`ThreadNotFound` (it may not
exist, or be another tenant's: RLS hides which, and so does the answer); that is
not counted as a violation.

Read receipts (:meth:`ThreadService.mark_read`) take their time from the
database's ``clock_timestamp()`` (the trigger of migration 0011), never from
this host: ordered by the database clock, they stay in order however skewed the
daemons' clocks are (row 16's mitigation, ``use_safe_clock``).
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any, Final

import msgspec
from prometheus_client import CollectorRegistry, Counter

from config.catalog import Catalog, alert_name, row_detector
from config.schema import DetectorConfig, ThreadsConfig, TriageConfig, engine_kwargs
from engine.clock import Clock
from engine.detectors import CountInWindowDetector, make_detector
from engine.errors import TriageError
from engine.events import EventBus, Notice
from engine.metrics import families
from providers.db.threads import (
    NO_THREAD,
    PRESENT,
    ParticipantRow,
    ReceiptRow,
    create_thread,
    insert_participant,
    list_participants,
    list_receipts,
    record_receipt,
    refusal_sqlstate,
)

if TYPE_CHECKING:
    from engine.runtime import Runtime
    from providers.db.pool import DbPool

__all__ = [
    "APPLICATION",
    "DATABASE",
    "DETECTOR_OVERRIDE",
    "METRIC",
    "ROW",
    "CrossTenantParticipant",
    "CrossTenantRefused",
    "Participant",
    "ThreadError",
    "ThreadNotFound",
    "ThreadService",
    "ThreadStatistics",
    "build_detector",
    "detector_config",
]

log = logging.getLogger("triage.threads")

ROW = 12
METRIC = "triage_tenant_check_violations_total"
#: A ``[detectors.<name>]`` with this name replaces row 12's detector settings.
DETECTOR_OVERRIDE = "tenant_check_violations"
#: Which check refused (the ``check`` label).
APPLICATION: Final = "application"
DATABASE: Final = "database"


class ThreadError(TriageError):
    """A thread operation refused."""


class ThreadNotFound(ThreadError):
    """The acting tenant has no such thread (it may be another tenant's: RLS hides which)."""

    def __init__(self, tenant_id: uuid.UUID, thread_id: uuid.UUID) -> None:
        super().__init__(f"thread {thread_id} not found for tenant {tenant_id}")
        self.tenant_id = tenant_id
        self.thread_id = thread_id


class CrossTenantParticipant(ThreadError):
    """A participant of another tenant refused; names both tenants, never the participant.

    ``check`` is ``application`` or ``database``; ``sqlstate`` the database's code.
    """

    def __init__(
        self,
        acting_tenant: uuid.UUID,
        participant_tenant: uuid.UUID,
        *,
        check: str,
        sqlstate: str | None = None,
    ) -> None:
        code = f", SQLSTATE {sqlstate}" if sqlstate is not None else ""
        super().__init__(
            f"cross-tenant participant refused by the {check} check{code}: tenant"
            f" {acting_tenant} may not add a participant of tenant {participant_tenant}"
        )
        self.acting_tenant = acting_tenant
        self.participant_tenant = participant_tenant
        self.check = check
        self.sqlstate = sqlstate


class CrossTenantRefused(Notice, frozen=True, kw_only=True):
    """Row 12's notice: one cross-tenant write refused (ids only, no personal data)."""

    acting_tenant: str
    participant_tenant: str
    thread_id: str
    check: str
    sqlstate: str | None
    row: int | None = ROW

    def alert_key(self) -> str:
        return f"cross_tenant:{self.acting_tenant}:{self.participant_tenant}"


class Participant(msgspec.Struct, frozen=True, kw_only=True):
    """Someone to add to a thread, with the tenant they belong to."""

    tenant_id: uuid.UUID
    participant_id: str
    role: str


class ThreadStatistics(msgspec.Struct, frozen=True, kw_only=True):
    threads_created: int
    participants_added: int
    refused_application: int
    refused_database: int
    receipts: int


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.violations = Counter(
            METRIC.removesuffix("_total"),
            "Cross-tenant writes refused by row-level security or the application check",
            ["check"],
            registry=registry,
        )
        # Both series exist from the start at 0: Prometheus' increase() does not see the
        # first refusal of a series that appears with it.
        for check in (APPLICATION, DATABASE):
            self.violations.labels(check=check)


def detector_config(config: TriageConfig, catalog: Catalog) -> DetectorConfig:
    """Row 12's detector: ``[detectors.tenant_check_violations]`` if set, else the row's."""
    return row_detector(config, catalog, ROW, DETECTOR_OVERRIDE)


def build_detector(
    config: TriageConfig, catalog: Catalog, *, runtime: Runtime | None = None
) -> CountInWindowDetector:
    """Row 12's detector, named like its alert, on the runtime's bus and clock."""
    common: dict[str, Any] = {}
    if runtime is not None:
        common = {"clock": runtime.clock, "events": runtime.events, "metrics": runtime.metrics}
    return make_detector(
        alert_name(catalog.row(ROW)),
        row=ROW,
        **engine_kwargs(detector_config(config, catalog)),
        **common,
    ).expect(CountInWindowDetector)


class ThreadService:
    """Threads for every request; see the module docstring."""

    def __init__(
        self,
        db: DbPool,
        config: ThreadsConfig,
        *,
        registry: CollectorRegistry | None = None,
        events: EventBus | None = None,
        clock: Clock | None = None,
        detector: CountInWindowDetector | None = None,
    ) -> None:
        self.db = db
        self.config = config
        self.events = events
        self.clock = clock if clock is not None else Clock()
        self.detector = detector
        self._metrics = families(registry, _Metrics) if registry is not None else None
        self.threads_created = 0
        self.participants_added = 0
        self.refused = {APPLICATION: 0, DATABASE: 0}
        self.receipts_written = 0

    @classmethod
    def for_runtime(
        cls,
        db: DbPool,
        runtime: Runtime,
        *,
        config: ThreadsConfig,
        detector: CountInWindowDetector | None = None,
    ) -> ThreadService:
        metrics = runtime.metrics
        return cls(
            db,
            config,
            registry=metrics.registry if metrics is not None else None,
            events=runtime.events,
            clock=runtime.clock,
            detector=detector,
        )

    def statistics(self) -> ThreadStatistics:
        return ThreadStatistics(
            threads_created=self.threads_created,
            participants_added=self.participants_added,
            refused_application=self.refused[APPLICATION],
            refused_database=self.refused[DATABASE],
            receipts=self.receipts_written,
        )

    # -- threads and participants ----------------------------------------------------------

    async def create_thread(self, tenant_id: uuid.UUID, topic: str | None = None) -> uuid.UUID:
        thread = await self.db.run_unit(create_thread, tenant_id, topic)
        self.threads_created += 1
        return thread

    def check(self, tenant_id: uuid.UUID, thread_id: uuid.UUID, participant: Participant) -> None:
        """The application check: the participant must be of the acting tenant.

        Raises :class:`CrossTenantParticipant`. The chaos scenario of row 12
        overrides this (a subclass that lets everything through) to show that
        row-level security holds without it.
        """
        if participant.tenant_id != tenant_id:
            raise CrossTenantParticipant(tenant_id, participant.tenant_id, check=APPLICATION)

    async def add_participant(
        self, tenant_id: uuid.UUID, thread_id: uuid.UUID, participant: Participant
    ) -> bool:
        """Add ``participant`` to the acting tenant's thread; False if already there.

        Raises :class:`CrossTenantParticipant` (counted, alerted) or
        :class:`ThreadNotFound`.
        """
        try:
            self.check(tenant_id, thread_id, participant)
        except CrossTenantParticipant as refused:
            self._refused(refused, thread_id)
            raise
        try:
            outcome = await self.db.run_unit(
                insert_participant, tenant_id, thread_id, participant.tenant_id,
                participant.participant_id, participant.role,
            )  # fmt: skip
        except Exception as exc:
            sqlstate = refusal_sqlstate(exc)
            if sqlstate is None:
                raise
            by_database = CrossTenantParticipant(
                tenant_id, participant.tenant_id, check=DATABASE, sqlstate=sqlstate
            )
            self._refused(by_database, thread_id)
            raise by_database from exc
        if outcome == NO_THREAD:
            raise ThreadNotFound(tenant_id, thread_id)
        added = outcome != PRESENT
        self.participants_added += added
        return added

    async def participants(
        self, tenant_id: uuid.UUID, thread_id: uuid.UUID
    ) -> list[ParticipantRow]:
        """The thread's current participants, oldest first (at most ``list_limit``)."""
        return await self.db.run_unit(
            list_participants, tenant_id, thread_id, self.config.list_limit
        )

    # -- read receipts ---------------------------------------------------------------------

    async def mark_read(
        self, tenant_id: uuid.UUID, thread_id: uuid.UUID, participant_id: str
    ) -> ReceiptRow:
        """Record that the participant read the thread, at the database's time."""
        receipt = await self.db.run_unit(record_receipt, tenant_id, thread_id, participant_id)
        self.receipts_written += 1
        return receipt

    async def receipts(self, tenant_id: uuid.UUID, thread_id: uuid.UUID) -> list[ReceiptRow]:
        """The thread's receipts in database-clock order (at most ``list_limit``)."""
        return await self.db.run_unit(list_receipts, tenant_id, thread_id, self.config.list_limit)

    # -- refusals --------------------------------------------------------------------------

    def _refused(self, refused: CrossTenantParticipant, thread_id: uuid.UUID) -> None:
        self.refused[refused.check] += 1
        if self._metrics is not None:
            self._metrics.violations.labels(check=refused.check).inc()
        if self.detector is not None:
            self.detector.observe(1)
        log.error(
            "cross-tenant participant refused",
            extra={
                "row": ROW,
                "check": refused.check,
                "sqlstate": refused.sqlstate,
                "acting_tenant": str(refused.acting_tenant),
                "participant_tenant": str(refused.participant_tenant),
                "thread_id": str(thread_id),
            },
        )
        if self.events is not None:
            self.events.emit(
                CrossTenantRefused(
                    at=self.clock.now(),
                    wall=self.clock.wall(),
                    severity=self.config.severity,
                    acting_tenant=str(refused.acting_tenant),
                    participant_tenant=str(refused.participant_tenant),
                    thread_id=str(thread_id),
                    check=refused.check,
                    sqlstate=refused.sqlstate,
                )
            )
