"""The inbox consumer: scheduling events from a durable JetStream pull consumer (row 18).

An actor (:func:`inbox_child` builds its child spec and ref). Each :class:`Fetch`
is one turn; a turn that reached NATS asks for the next at once (the fetch is a
long poll of ``fetch_timeout_s``), and a timer tells it :class:`Fetch` every
``fetch_timeout_s`` too (ticks coalesce), which is what retries after NATS or
the database breaker refused. While the database breaker is open nothing is
fetched, and a fetch is sent for its half-open moment. Each turn crosses the
bridge three times, once per unit of work:

1. :func:`providers.jetstream_consumer.fetch_batch` -- up to ``batch_size``
   messages (an idle pull is an empty batch);
2. :func:`providers.db.inbox.apply_batch` -- per event, ONE transaction as its
   tenant: the inbox row (unique tenant + appointment id) and the effect (the
   appointment's session thread) commit together, or neither does;
3. :func:`providers.jetstream_consumer.settle_batch` -- ack/nak/term, sent only
   AFTER the commits of step 2 (and any dead letters).

Per message:

=========================================  ==========================================
body does not decode (typed error)         dead letter (source 'inbox') + term
event new                                  committed, ack
event already in the inbox (redelivery,    nothing changes, ack; counted in
republish with another Nats-Msg-Id)        ``triage_inbox_duplicates_total`` and fed
                                           to row 18's count-in-window detector
database unreachable (transient)           nak with the backoff delay: JetStream
                                           delivers it again
transient, and this was delivery           dead letter + term (the event is kept in
``max_deliver``                            ``dead_letters``, never dropped)
other database error (e.g. unknown         dead letter + term
tenant)
=========================================  ==========================================

A lost ack (or a crash between commit and ack) means the message is delivered
again after ``ack_wait_s``; the inbox row turns that into a counted duplicate.

State machine (one log line per change, :class:`~engine.statelog.StateLog`)::

    STARTING --consumer created/updated--> CONSUMING
    CONSUMING --database unreachable--> DEGRADED    events nak'ed, redelivered later
    CONSUMING/DEGRADED --NATS unreachable--> DISCONNECTED   retried every fetch_timeout_s
    DEGRADED/DISCONNECTED --a batch applied--> CONSUMING
    any --the incarnation ends--> STOPPED

Counts (:class:`InboxStatistics`, through ``ref.statistics()``) are this
incarnation's; the Prometheus counters (``triage_inbox_*_total``) are the totals.

Known gap: if the database is down on an event's last delivery, the dead
letter cannot be written either; the message is nak'ed and JetStream stops
delivering it (it stays in the stream, and the server emits a max-deliveries
advisory). Choose ``max_deliver`` x backoff longer than a tolerated outage.

**Replicas** (issue 12): runs on every replica, no lease. Every replica binds the
same durable (``[inbox] durable``): JetStream hands each message to one of them
(queue semantics); a message a dead replica fetched and never acked is
redelivered after ``ack_wait_s``, and the unique (tenant, appointment_id) makes
that redelivery a no-op.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client import CollectorRegistry, Counter

from config.catalog import Catalog, alert_name, row_detector
from config.schema import DetectorConfig, InboxConfig, MailboxConfig, TriageConfig, engine_kwargs
from engine.actor import Actor, ActorRef, Overflow, Timer, actor_child, ended_by_error
from engine.breaker import Breaker, CircuitState
from engine.detectors import CountInWindowDetector, make_detector
from engine.errors import CircuitOpen, ProviderError
from engine.metrics import families
from engine.statelog import StateLog
from providers import jetstream, jetstream_consumer
from providers.bridge import run, translate_error
from providers.db.inbox import (
    DeadLetter,
    InboxItem,
    SchedulingEvent,
    apply_batch,
    dead_letter_batch,
)
from providers.jetstream_consumer import ConsumerSettings, Delivery, PullConsumer, Settle

if TYPE_CHECKING:
    import asyncpg

    from engine.deadlines import Deadlines
    from engine.metrics import Metrics
    from engine.runtime import Runtime
    from engine.supervisor import ChildSpec, Restart

__all__ = [
    "DETECTOR_OVERRIDE",
    "FETCH",
    "ROW",
    "Fetch",
    "InboxConsumer",
    "InboxMessage",
    "InboxState",
    "InboxStatistics",
    "build_detector",
    "consumer_settings",
    "decode_event",
    "detector_config",
    "inbox_child",
]

log = logging.getLogger("triage.inbox")

ROW = 18
#: A ``[detectors.<name>]`` section with this name replaces row 18's detector settings.
DETECTOR_OVERRIDE = "inbox_duplicates"

_decoder = msgspec.json.Decoder(SchedulingEvent)


class InboxState(enum.Enum):
    STARTING = "starting"
    CONSUMING = "consuming"
    DEGRADED = "degraded"  # the database is unreachable: events are nak'ed
    DISCONNECTED = "disconnected"  # NATS is unreachable
    STOPPED = "stopped"


class Fetch(msgspec.Struct, frozen=True, tag=True):
    """Run a turn: fetch a batch, apply it, settle it."""


FETCH = Fetch()

#: The consumer's messages (one kind: everything it does is a turn).
InboxMessage = Fetch


class InboxStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`InboxConsumer.statistics` reports (this incarnation's counts)."""

    state: InboxState
    turns: int
    fetched: int
    applied: int  # new events committed (inbox row + effect)
    duplicates: int  # redelivered/republished events that changed nothing
    naks: int  # transient failures handed back to JetStream
    dead_lettered: int  # poison or exhausted events stored in dead_letters
    acks_dropped: int  # acks withheld by :meth:`InboxConsumer.settle_for` (fault injection)


class _InboxMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.applied = Counter(
            "triage_inbox_applied_total", "Scheduling events applied", registry=registry
        )
        self.duplicates = Counter(
            "triage_inbox_duplicates_total",
            "Scheduling events delivered again and dropped by the inbox key",
            registry=registry,
        )
        self.naks = Counter(
            "triage_inbox_naks_total",
            "Scheduling events handed back to JetStream after a transient failure",
            registry=registry,
        )
        self.dead_lettered = Counter(
            "triage_inbox_dead_lettered_total",
            "Scheduling events stored in dead_letters (poison or max deliveries)",
            registry=registry,
        )


def _inbox_metrics(registry: CollectorRegistry) -> _InboxMetrics:
    return families(registry, _InboxMetrics)


def detector_config(config: TriageConfig, catalog: Catalog) -> DetectorConfig:
    """Row 18's detector: ``[detectors.inbox_duplicates]`` if set, else the catalog row's."""
    return row_detector(config, catalog, ROW, DETECTOR_OVERRIDE)


def build_detector(
    config: TriageConfig, catalog: Catalog, *, runtime: Runtime | None = None
) -> CountInWindowDetector:
    """Row 18's detector, from ``[detectors.inbox_duplicates]`` or the catalog row."""
    common: dict[str, Any] = {}
    if runtime is not None:
        common = {"clock": runtime.clock, "events": runtime.events, "metrics": runtime.metrics}
    return make_detector(
        alert_name(catalog.row(ROW)),
        row=ROW,
        **engine_kwargs(detector_config(config, catalog)),
        **common,
    ).expect(CountInWindowDetector)


def consumer_settings(config: InboxConfig) -> ConsumerSettings:
    """The durable pull consumer described by ``[inbox]``."""
    return ConsumerSettings(
        stream=config.stream,
        subjects=tuple(s.strip() for s in config.subjects.split(",") if s.strip()),
        durable=config.durable,
        ack_wait_s=config.ack_wait_s,
        max_deliver=config.max_deliver,
        backoff_s=tuple(config.backoff_s),
        duplicate_window_s=config.duplicate_window_s,
    )


def decode_event(data: bytes) -> SchedulingEvent:
    """The typed event in ``data``; raises :class:`msgspec.ValidationError` or ``DecodeError``."""
    return _decoder.decode(data)


#: Breaker states in which the database is not worth a fetch.
_REFUSING = frozenset({CircuitState.OPEN, CircuitState.FORCED_OPEN})


def _transient(exc: Exception) -> bool:
    """A connection-level failure (already translated or not): the event may succeed later."""
    return (
        isinstance(exc, (ProviderError, CircuitOpen))
        or translate_error(exc, service="postgres") is not None
    )


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class InboxConsumer(Actor[InboxMessage]):
    """The consumer: one turn per :class:`Fetch`. Build it with :func:`inbox_child`."""

    name = "inbox_consumer"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool[asyncpg.Record],
        client: jetstream.JetStreamClient,
        config: InboxConfig,
        detector: CountInWindowDetector | None = None,
        registry: CollectorRegistry | None = None,
        breaker: Breaker | None = None,
    ) -> None:
        self.pool = pool
        #: The database's breaker (the daemon shares the primary's): while it is open
        #: the consumer fetches nothing, so events wait in JetStream instead of
        #: burning their deliveries on naks.
        self.breaker = breaker
        self.client = client
        self.config = config
        self.settings = consumer_settings(config)
        self.detector = detector
        self.states = StateLog(
            "inbox consumer",
            InboxState.STARTING,
            log,
            warn={InboxState.DEGRADED, InboxState.DISCONNECTED},
        )
        self.consumer: PullConsumer | None = None
        self.turns = 0
        self.fetched = 0
        self.applied = 0
        self.duplicates = 0
        self.naks = 0
        self.dead_lettered = 0
        self.acks_dropped = 0
        self._metrics = _inbox_metrics(registry) if registry is not None else None

    # -- the actor -----------------------------------------------------------------------

    async def init(self) -> None:
        """Ensure the stream and the durable consumer (created, or updated to ``[inbox]``)."""
        self.consumer = await run(
            jetstream_consumer.open_consumer, self.client, self.settings, service="nats"
        )
        self.states.enter(InboxState.CONSUMING, "started")
        self.tell_self(FETCH)  # the first fetch at once, not a tick later

    def timers(self) -> Sequence[Timer]:
        return [Timer(self.config.fetch_timeout_s, FETCH)]

    def statistics(self) -> InboxStatistics:
        return InboxStatistics(
            state=self.states.state,
            turns=self.turns,
            fetched=self.fetched,
            applied=self.applied,
            duplicates=self.duplicates,
            naks=self.naks,
            dead_lettered=self.dead_lettered,
            acks_dropped=self.acks_dropped,
        )

    async def handle(self, message: InboxMessage) -> None:
        match message:
            case Fetch():
                breaker = self.breaker
                if breaker is not None and breaker.state in _REFUSING:
                    self.states.enter(InboxState.DEGRADED, "database breaker open: not fetching")
                    self.wake_at(
                        breaker.half_open_at(), FETCH, sooner_than_s=self.config.fetch_timeout_s
                    )
                elif await self._turn():
                    self.tell_self(FETCH)

    async def terminate(self, reason: BaseException | None) -> None:
        # The supervisor logs a crash itself; here it is only named.
        self.states.enter(InboxState.STOPPED, "crashed" if ended_by_error(reason) else "stopped")

    def settle_for(self, delivery: Delivery, decision: Settle) -> Settle:
        """The decision actually sent for ``delivery``: a hook for fault injection.

        The chaos scenario overrides it to drop acks (``Settle.skip()``), which is
        what an ack lost on the network looks like to JetStream.
        """
        return decision

    # -- one turn ----------------------------------------------------------------------

    async def _turn(self) -> bool:
        """One turn: fetch, apply, dead-letter, settle. False if NATS refused the fetch."""
        consumer = self.consumer
        assert consumer is not None, "init opens the consumer"
        config = self.config
        self.turns += 1
        try:
            batch = await run(
                jetstream_consumer.fetch_batch, consumer, config.batch_size,
                config.fetch_timeout_s, service="nats",
            )  # fmt: skip
        except ProviderError as exc:  # the tick retries, fetch_timeout_s later
            self.states.enter(InboxState.DISCONNECTED, str(exc))
            return False
        if not batch:
            return True
        self.fetched += len(batch)
        decisions = await self._process(batch)
        sent = [(d, self.settle_for(d, s)) for d, s in decisions]
        self.acks_dropped += sum(
            1
            for (_, wanted), (_, actual) in zip(decisions, sent, strict=True)
            if wanted.kind is jetstream_consumer.SettleKind.ACK
            and actual.kind is jetstream_consumer.SettleKind.SKIP
        )
        try:
            await run(jetstream_consumer.settle_batch, consumer, sent, service="nats")
        except ProviderError as exc:  # unsettled messages come back after ack_wait
            self.states.enter(InboxState.DISCONNECTED, str(exc))
            return False
        return True

    async def _process(self, batch: Sequence[Delivery]) -> list[tuple[Delivery, Settle]]:
        decisions: dict[int, Settle] = {}
        letters: dict[int, DeadLetter] = {}
        items: list[tuple[int, InboxItem]] = []
        for index, delivery in enumerate(batch):
            try:
                event = decode_event(delivery.data)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                letters[index] = self._letter(delivery, None, f"undecodable event: {exc}")
                continue
            key = delivery.msg_id or f"{self.settings.stream}:{delivery.stream_seq}"
            items.append((index, InboxItem(event, message_key=key, subject=delivery.subject)))

        if items:
            results = await self._apply([item for _, item in items])
            transient = False
            for (index, item), result in zip(items, results, strict=True):
                delivery = batch[index]
                if result is True:
                    self.applied += 1
                    decisions[index] = Settle.ack()
                elif result is False:
                    self.duplicates += 1
                    decisions[index] = Settle.ack()
                elif _transient(result):
                    transient = True
                    if delivery.num_delivered >= self.settings.max_deliver:
                        error = f"max deliveries ({delivery.num_delivered}): {_describe(result)}"
                        letters[index] = self._letter(delivery, item.event, error)
                    else:
                        decisions[index] = Settle.nak(self._nak_delay(delivery))
                else:
                    letters[index] = self._letter(delivery, item.event, _describe(result))
            self._count_outcomes(results)
            if transient:
                self.states.enter(InboxState.DEGRADED, "database unreachable: events nak'ed")
            else:
                self.states.enter(InboxState.CONSUMING, "batch applied")

        if letters:
            try:
                await run(dead_letter_batch, self.pool, list(letters.values()), service="postgres")
            except ProviderError as exc:
                log.warning("inbox: dead letters not stored, redelivery instead: %s", exc)
                for index in letters:
                    decisions[index] = Settle.nak(self._nak_delay(batch[index]))
            else:
                for index in letters:
                    decisions[index] = Settle.term()
                self.dead_lettered += len(letters)
                if self._metrics is not None:
                    self._metrics.dead_lettered.inc(len(letters))
        naks = sum(1 for d in decisions.values() if d.kind is jetstream_consumer.SettleKind.NAK)
        self.naks += naks
        if self._metrics is not None and naks:
            self._metrics.naks.inc(naks)
        return [(batch[i], decisions[i]) for i in sorted(decisions)]

    async def _apply(self, items: list[InboxItem]) -> list[bool | Exception]:
        breaker = self.breaker
        try:
            start = breaker.before_call() if breaker is not None else 0.0
        except CircuitOpen as exc:  # every item waits for a redelivery
            return [exc] * len(items)
        try:
            results = await run(apply_batch, self.pool, items, service="postgres")
        except ProviderError as exc:  # e.g. the pool itself failed: every item is transient
            if breaker is not None:
                breaker.on_failure(exc, start)
            return [exc] * len(items)
        except BaseException as exc:
            if breaker is not None:
                breaker.on_failure(exc, start)
            raise
        if breaker is not None:
            failed = next((r for r in results if isinstance(r, Exception) and _transient(r)), None)
            if failed is not None:
                breaker.on_failure(failed, start)
            else:
                breaker.on_success(start)
        return results

    def _count_outcomes(self, results: Sequence[bool | Exception]) -> None:
        new = sum(1 for r in results if r is True)
        duplicates = sum(1 for r in results if r is False)
        if duplicates:
            log.info("inbox: %d redelivered event(s) dropped as duplicates", duplicates)
            if self.detector is not None:
                self.detector.observe(duplicates)
        if self._metrics is not None:
            self._metrics.applied.inc(new)
            self._metrics.duplicates.inc(duplicates)

    def _nak_delay(self, delivery: Delivery) -> float | None:
        backoff = self.config.backoff_s
        if not backoff:
            return None
        return backoff[min(delivery.num_delivered, len(backoff)) - 1]

    def _letter(self, delivery: Delivery, event: SchedulingEvent | None, error: str) -> DeadLetter:
        return DeadLetter(
            ref=f"{self.settings.stream}:{delivery.stream_seq}",
            payload=delivery.data,
            error=error,
            attempts=delivery.num_delivered,
            tenant_id=event.tenant_id if event is not None else None,
            subject=delivery.subject,
            headers=delivery.headers,
        )


def inbox_child(
    *,
    pool: asyncpg.Pool[asyncpg.Record],
    client: jetstream.JetStreamClient,
    config: InboxConfig,
    mailbox: MailboxConfig,
    shutdown_s: float,
    detector: CountInWindowDetector | None = None,
    registry: CollectorRegistry | None = None,
    breaker: Breaker | None = None,
    actor: Callable[..., InboxConsumer] = InboxConsumer,
    restart: Restart | None = None,
    deadlines: Deadlines | None = None,
    metrics: Metrics | None = None,
) -> tuple[ChildSpec, ActorRef[InboxMessage]]:
    """The consumer's child spec (id ``inbox_consumer``) and ref, its mailbox from ``mailbox``.

    ``actor`` makes each incarnation from the keywords (a subclass for fault
    injection, e.g. one that overrides :meth:`InboxConsumer.settle_for`).
    """
    factory = functools.partial(
        actor, pool=pool, client=client, config=config, detector=detector, registry=registry,
        breaker=breaker,
    )  # fmt: skip
    return actor_child(
        InboxConsumer.name,
        factory,
        capacity=mailbox.capacity,
        overflow=Overflow(mailbox.overflow),
        restart=restart,
        shutdown_s=shutdown_s,
        deadlines=deadlines,
        metrics=metrics,
    )
