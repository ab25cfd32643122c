"""The outbox relay: PostgreSQL outbox rows to NATS JetStream, in order per aggregate (rows 6, 9).

An actor (:func:`relay_child` builds its child spec and ref). Its timer tells it
:class:`Poll` every ``poll_interval_s`` (ticks coalesce: a slow turn is never
followed by a queue of them); a turn that moved a full batch polls again at
once, and :func:`nudge` asks for a turn now (e.g. after a write). While
``BLOCKED``, a poll is also sent for the breaker's half-open moment when that
comes before the next tick. Each turn crosses the bridge once with
:func:`providers.db.outbox.relay_session`: one PostgreSQL transaction (as
``triage_relay``) that, for up to ``[relay] session_s`` while full batches keep
coming, claims a batch, publishes it to JetStream (``Nats-Msg-Id`` = outbox id,
the acks pipelined on the client's one ack inbox), claims the next batches while
the acks arrive, publishes the next once every ack of the one before is in, marks
the acknowledged rows published and, last, reads the lag. See
:mod:`providers.db.outbox` for the claim, the session and the order per aggregate.

State machine (one log line per change, :class:`~engine.statelog.StateLog`)::

    STARTING --stream checked--> RELAYING
    RELAYING --breaker nats_publish opens--> BLOCKED     rows stay in the outbox
    BLOCKED  --half-open probe batch acked--> RELAYING   the backlog replays in order
    RELAYING/BLOCKED --database unreachable--> DEGRADED  retried every poll
    DEGRADED --a batch or a lag read succeeds--> RELAYING (or BLOCKED)
    any      --the incarnation ends--> STOPPED

Breaker accounting (``breakers.nats_publish``): a session with any failed publish
(a timeout, a refusal, the client reconnecting) is one failure -- the session
ends at the first one; a session whose batches were all acked one success,
timed by its slowest batch's publish (not by the whole session, which would
make every long session a slow call). A turn that never reached NATS (empty
batch, database error) is reported as :class:`PublishNotAttempted`, a
:class:`~engine.errors.LoadShed`, which the breaker ignores (it frees a
half-open probe slot and counts nothing).

Lag: after every turn (also while BLOCKED, from a plain read) the age of the
oldest pending row goes to the lag detectors with ``set_age`` (each an
:class:`~engine.detectors.AgeOfNewestDetector`: catalog row 6's and/or
``[detectors.outbox_lag]``), and is reported in :class:`RelayStatistics`. An
age-of-newest detector nobody feeds counts from its start, so a daemon that
builds these detectors must run the relay that feeds them.

Poison events and crash loops (catalog row 9): every turn passes the
dead-letter target (:class:`~providers.db.outbox.DeadLetterTo`) to
:func:`~providers.db.outbox.relay_batch`, which moves a row to ``dead_letters``
and the DLQ subject (``[relay] dlq_subject``, on the stream ``<stream>_DLQ``
created at start unless the relay's own subjects cover it) in the same
transaction when its publish is refused for good (:class:`PoisonEvent`: the
stream's error answer such as "message size exceeds maximum", a subject outside
the relay's subjects, a payload over the server's max payload, undecodable
stored data) or fails ``max_attempts`` times. Later events of the aggregate go
on; the DLQ message names the skipped seq (see :mod:`providers.db.dead_letters`).

A turn that *crashes* (an exception that is neither a database nor a NATS
failure, e.g. a bug that one event's data triggers) re-raises, so its supervisor
restarts the relay (each restart counts in ``restarts`` and feeds the row 9
detector through ``restart_sinks``). Before re-raising, the relay attributes the
crash in its :class:`RelayMemory` (created once with the child, like its
mailbox, so it outlives the incarnation): a crash on a batch of several rows (the batch in flight: what the
session's batches before it marked is committed) switches the relay to
*isolation* -- sessions of one batch of one row, until as many rows as
the crashed batch held went through; a crash on a single row quarantines that row
at once (dead letter + DLQ, in its own unit of work). A poison row thus costs
two restarts (batch, then alone) and the relay goes on past it, well within a
supervisor intensity of a few restarts: the intensity limit stays the last
resort, for crashes no row explains (e.g. before any claim).

Start-up check: the stream's duplicate window must cover the relay's retry
horizon, the longest a publish that timed out (and may have been stored) can
wait before it is sent again: ``ack_timeout_s + breaker.reset_timeout_max_s +
poll_interval_s + session_s`` (a session rolled back publishes again what it
had marked). A shorter window, or a stream with one replica (an acked
write lives on one server, and until the server's ``sync_interval`` fsync an OS
crash loses it), is logged as a warning.

**Replicas** (issue 12): runs on every replica, no lease. The claim (``FOR UPDATE
SKIP LOCKED`` plus the per-aggregate transaction advisory lock of
:mod:`providers.db.outbox`) gives each batch to one relay, and the order per
aggregate holds however many relays run; a SIGKILLed relay's transaction rolls
back and its rows are claimed again (``Nats-Msg-Id`` dedupes a publish it made).
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Final, Protocol

import msgspec
import nats.js.errors
import trio

from config.schema import MailboxConfig, RelayConfig
from engine.actor import Actor, ActorRef, Overflow, Timer, actor_child, ended_by_error
from engine.breaker import Breaker, CircuitState
from engine.errors import (
    ActorStopped,
    CircuitOpen,
    LoadShed,
    MailboxFull,
    ProviderError,
    ProviderUnavailable,
)
from engine.statelog import StateLog
from providers import jetstream
from providers.bridge import run
from providers.db.dead_letters import Redact
from providers.db.outbox import (
    BatchReport,
    DeadLetterTo,
    OutboxRow,
    PoisonEvent,
    Publish,
    pending_age_s,
    quarantine_async,
    relay_session,
)

if TYPE_CHECKING:
    import asyncpg

    from engine.deadlines import Deadlines
    from engine.metrics import Metrics
    from engine.supervisor import ChildSpec, Restart

LAG_ROW: Final = 6  # the catalog row this actor owns: NATS unavailable (outbox lag)
CRASH_LOOP_ROW: Final = 9  # the catalog row this actor owns: outbox relay crash loop
__all__ = [
    "POLL",
    "NatsPublishFailed",
    "OutboxRelay",
    "Poll",
    "PublishHook",
    "PublishNotAttempted",
    "RelayMemory",
    "RelayMessage",
    "RelayState",
    "RelayStatistics",
    "dlq_stream_name",
    "nudge",
    "relay_child",
    "retry_horizon_s",
]

log = logging.getLogger("triage.relay")


class RelayState(enum.Enum):
    STARTING = "starting"
    RELAYING = "relaying"
    BLOCKED = "blocked"  # the publish breaker is open: rows wait in the outbox
    DEGRADED = "degraded"  # the database is unreachable
    STOPPED = "stopped"


class Poll(msgspec.Struct, frozen=True, tag=True):
    """Run a turn now: the timer's tick, a nudge, or the relay's own "again"."""


POLL = Poll()

#: The relay's messages (one kind: everything it does is a turn).
RelayMessage = Poll

#: Wraps the relay's publish step (the asyncio side): a seam for fault injection.
PublishHook = Callable[[Publish], Publish]


@dataclass(slots=True)
class RelayMemory:
    """What outlives an incarnation of the relay: crash attribution and the totals.

    Created once with the child (:func:`relay_child`), as the mailbox is; each
    incarnation reads and updates it. ``isolate`` is the number of rows still to
    relay one at a time after a crash on a batch.
    """

    starts: int = 0
    isolate: int = 0
    turns: int = 0
    published: int = 0  # rows marked published
    failed: int = 0  # row publishes that failed
    crashes: int = 0  # turns that raised an unexpected exception
    dead_lettered: int = 0  # poison rows moved to dead_letters + DLQ (quarantines included)
    quarantined: int = 0  # rows dead-lettered because they crashed the relay alone
    warnings: list[str] = field(default_factory=list)


class RelayStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`OutboxRelay.statistics` reports; counts are totals across restarts."""

    state: RelayState
    lag_s: float | None
    turns: int
    published: int
    failed: int
    starts: int
    restarts: int
    crashes: int
    dead_lettered: int
    quarantined: int
    warnings: tuple[str, ...]


class NatsPublishFailed(ProviderUnavailable):
    """The publish of a whole batch failed before any ack (NATS unreachable)."""


class PublishNotAttempted(LoadShed):
    """A relay turn that never reached NATS: the breaker records nothing for it."""


class RestartSink(Protocol):
    """What the relay counts its restarts in: a :class:`~engine.detectors.CountInWindowDetector`."""

    def observe(self, count: int = 1) -> None: ...


def dlq_stream_name(config: RelayConfig) -> str:
    """The stream the relay creates for its DLQ subject."""
    return f"{config.stream}_DLQ"


class LagSink(Protocol):
    """What the relay feeds its lag to: an :class:`~engine.detectors.AgeOfNewestDetector`."""

    def set_age(self, age_s: float | None) -> None: ...


def retry_horizon_s(config: RelayConfig, breaker: Breaker) -> float:
    """The longest a maybe-stored publish waits before its retry (see the module docstring)."""
    return (
        config.ack_timeout_s + breaker.reset_timeout_max_s + config.poll_interval_s
        + config.session_s
    )  # fmt: skip


def _refused_for_good(error: Exception) -> bool:
    """A JetStream error answer about this message (not the service being unavailable)."""
    if isinstance(error, nats.js.errors.ServiceUnavailableError):
        return False
    if isinstance(error, nats.js.errors.APIError):
        return error.code is not None and 400 <= error.code < 500
    return False


@dataclass(slots=True)
class _Limits:
    """What a message must fit: the relay's subjects, the stream's and the server's size caps."""

    subjects: Sequence[str]
    max_payload: int
    max_msg_size: int = -1  # the stream's, read at start
    _bound: dict[str, bool] = field(default_factory=dict)  # subject -> matched (a few subjects)

    def binds(self, subject: str) -> bool:
        """Whether the relay's subjects cover ``subject`` (answers remembered, 1024 at most)."""
        known = self._bound.get(subject)
        if known is None:
            known = any(jetstream.subject_matches(p, subject) for p in self.subjects)
            if len(self._bound) >= 1024:
                self._bound.clear()
            self._bound[subject] = known
        return known


def _check_row(row: OutboxRow, limits: _Limits) -> jetstream.PublishItem:
    """The row's message, or :class:`PoisonEvent` if it can never be published as it is."""
    if row.defect is not None:
        raise PoisonEvent(row.defect)
    if limits.subjects and not limits.binds(row.subject):
        raise PoisonEvent(f"subject {row.subject!r} is not bound to the relay's stream")
    item = row.to_item()
    headers = item.headers
    size = (
        len(item.payload) + sum(map(len, headers)) + sum(map(len, headers.values()))
        + 4 * len(headers)
    )  # fmt: skip
    if size + 64 > limits.max_payload:
        raise PoisonEvent(
            f"message of {size} bytes exceeds the server's max payload {limits.max_payload}"
        )
    if 0 < limits.max_msg_size < len(item.payload):
        raise PoisonEvent(
            f"message of {len(item.payload)} bytes exceeds the stream's max_msg_size"
            f" {limits.max_msg_size}"
        )
    return item


async def _publish_rows(
    client: jetstream.JetStreamClient,
    ack_timeout_s: float,
    limits: _Limits,
    rows: Sequence[OutboxRow],
) -> list[object]:
    """asyncio side, inside the relay's transaction: publish the batch, one result per row.

    Rows that can never be published get a :class:`PoisonEvent` result without
    being sent; a stream's refusal of one message (4xx error answer) becomes one
    too. nats-py loses such answers in a batch (the message times out), so when
    part of a batch was acked, each timed-out message is published again alone
    to learn its fate (``Nats-Msg-Id`` makes that safe).
    """
    results: list[object] = [None] * len(rows)
    items: list[jetstream.PublishItem] = []
    where: list[int] = []
    for i, row in enumerate(rows):
        try:
            items.append(_check_row(row, limits))
            where.append(i)
        except PoisonEvent as exc:
            results[i] = exc
    if not items:
        return results
    try:
        sent: list[object] = list(await jetstream.publish_batch(client, items, ack_timeout_s))
    except Exception as exc:
        raise NatsPublishFailed(f"nats: batch not published ({type(exc).__name__}: {exc})") from exc
    if any(not isinstance(r, Exception) for r in sent):  # the server answers: probe the silent
        for k, result in enumerate(sent):
            if isinstance(result, TimeoutError):
                sent[k] = await jetstream.publish_one(client, items[k], ack_timeout_s)
    for i, result in zip(where, sent, strict=True):
        if isinstance(result, Exception) and _refused_for_good(result):
            results[i] = PoisonEvent(f"stream refused the event: {result}")
        else:
            results[i] = result
    return results


async def _publish_dlq(
    client: jetstream.JetStreamClient, ack_timeout_s: float, items: Sequence[jetstream.PublishItem]
) -> None:
    """asyncio side, inside the relay's transaction: publish DLQ messages, all acked or raise."""
    results = await jetstream.publish_batch(client, items, ack_timeout_s)
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise NatsPublishFailed(f"nats: {len(errors)} DLQ publishes failed (first: {errors[0]})")


class OutboxRelay(Actor[RelayMessage]):
    """The relay: one turn per :class:`Poll`. Build it with :func:`relay_child`."""

    name = "outbox_relay"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool[asyncpg.Record],
        client: jetstream.JetStreamClient,
        config: RelayConfig,
        breaker: Breaker,
        memory: RelayMemory,
        lag: LagSink | Sequence[LagSink] | None = None,
        ensure_stream: bool = True,
        restart_sinks: Sequence[RestartSink] = (),
        publish_hook: PublishHook | None = None,
        redact: Redact | None = None,
    ) -> None:
        self.pool = pool
        self.client = client
        self.config = config
        self.breaker = breaker
        self.memory = memory
        self.lag: tuple[LagSink, ...] = (
            () if lag is None else tuple(lag) if isinstance(lag, Sequence) else (lag,)
        )
        self.ensure_stream = ensure_stream
        self.states = StateLog(
            "outbox relay",
            RelayState.STARTING,
            log,
            warn={RelayState.BLOCKED, RelayState.DEGRADED},
        )
        self.lag_s: float | None = None
        self.restart_sinks = tuple(restart_sinks)
        self.subjects = [s.strip() for s in config.subjects.split(",") if s.strip()]
        max_payload = int(client.nc.max_payload or 1024 * 1024)
        self._limits = _Limits(self.subjects, max_payload)
        publish: Publish = partial(_publish_rows, client, config.ack_timeout_s, self._limits)
        self._publish = publish if publish_hook is None else publish_hook(publish)
        self._dead_letter = DeadLetterTo(
            publish=partial(_publish_dlq, client, config.ack_timeout_s),
            subject=config.dlq_subject,
            max_payload=max_payload,
            max_attempts=config.max_attempts,
            redact=redact,  # row 11: a dead letter is redacted before it is written
        )

    # -- the actor -----------------------------------------------------------------------

    async def init(self) -> None:
        """Count the start (every one after the first is a restart), check the stream."""
        memory = self.memory
        memory.starts += 1
        if memory.starts > 1:
            for sink in self.restart_sinks:
                sink.observe()
        await self._check_stream()
        self.states.enter(RelayState.RELAYING, "started")
        self.tell_self(POLL)  # the first turn at once, not a tick later

    def timers(self) -> Sequence[Timer]:
        return [Timer(self.config.poll_interval_s, POLL)]

    def statistics(self) -> RelayStatistics:
        memory = self.memory
        return RelayStatistics(
            state=self.states.state,
            lag_s=self.lag_s,
            turns=memory.turns,
            published=memory.published,
            failed=memory.failed,
            starts=memory.starts,
            restarts=max(memory.starts - 1, 0),
            crashes=memory.crashes,
            dead_lettered=memory.dead_lettered,
            quarantined=memory.quarantined,
            warnings=tuple(memory.warnings),
        )

    async def handle(self, message: RelayMessage) -> None:
        match message:
            case Poll():
                if await self._turn():
                    self.tell_self(POLL)
                elif self.states.state is RelayState.BLOCKED:
                    self.wake_at(
                        self.breaker.half_open_at(), POLL, sooner_than_s=self.config.poll_interval_s
                    )

    async def terminate(self, reason: BaseException | None) -> None:
        # The supervisor logs a crash itself; here it is only named.
        self.states.enter(RelayState.STOPPED, "crashed" if ended_by_error(reason) else "stopped")

    async def _turn(self) -> bool:
        """One turn; True if a full batch went out (poll again at once)."""
        self.memory.turns += 1
        try:
            start = self.breaker.before_call()
        except CircuitOpen:
            self.states.enter(RelayState.BLOCKED, f"breaker {self.breaker.name} is open")
            await self._read_lag()
            return False
        memory = self.memory
        isolating = memory.isolate > 0
        limit = 1 if isolating else self.config.batch_size
        session_s = 0.0 if isolating else self.config.session_s
        claimed: list[int] = []
        before_crash: list[BatchReport] = []
        session = partial(
            relay_session, self.pool, self._publish, limit, self._dead_letter, claimed, session_s,
            before_crash=before_crash,
        )  # fmt: skip
        try:
            report = await run(session, service="postgres")
        except NatsPublishFailed as exc:  # the session reports these; in case one escapes
            self.breaker.on_failure(exc, start)
            self._after_failure(exc)
            await self._read_lag()
            return False
        except ProviderError as exc:  # the database: the session rolled back
            self.breaker.on_failure(PublishNotAttempted(str(exc)), start)
            self.states.enter(RelayState.DEGRADED, str(exc))
            return False
        except Exception as exc:  # a crash: attribute it, then let the supervisor restart us
            self.breaker.on_failure(PublishNotAttempted("turn crashed"), start)
            for done in before_crash:  # the session's batches before the crash are committed
                memory.published += done.published
                memory.failed += done.failed
                memory.dead_lettered += done.dead_lettered
            await self._on_crash(claimed, exc)
            raise
        except BaseException:
            self.breaker.on_failure(PublishNotAttempted("turn interrupted"), start)
            raise
        if isolating and report.stopped_by is None:
            memory.isolate = 0 if report.claimed == 0 else memory.isolate - report.claimed
        memory.dead_lettered += report.dead_lettered
        self._account(report, start)
        return report.more and report.failed == 0 and report.stopped_by is None

    async def _on_crash(self, claimed: Sequence[int], exc: Exception) -> None:
        """Attribute a crashed turn: isolate a batch, quarantine a single row (module docstring)."""
        memory = self.memory
        memory.crashes += 1
        error = f"relay crashed on this event: {type(exc).__name__}: {exc}"
        if len(claimed) > 1:
            memory.isolate = max(memory.isolate, len(claimed))
            log.error(
                "outbox relay: crashed on a batch of %d rows (%s); relaying them one at a time",
                len(claimed), error,
            )  # fmt: skip
            return
        if not claimed:
            log.error("outbox relay: crashed before claiming any row: %s", error)
            return
        [outbox_id] = claimed
        quarantine = partial(quarantine_async, self.pool, outbox_id, error, self._dead_letter)
        moved = False
        try:
            with trio.CancelScope(shield=True), trio.move_on_after(self.config.ack_timeout_s * 2):
                moved = await run(quarantine, service="postgres")
        except Exception as quarantine_error:  # the crash itself is re-raised
            log.error(
                "outbox relay: could not quarantine event %d: %s", outbox_id, quarantine_error
            )
            return
        if moved:
            memory.quarantined += 1
            memory.dead_lettered += 1
            log.error(
                "outbox relay: event %d quarantined to the dead letters: %s", outbox_id, error
            )

    def _account(self, report: BatchReport, start: float) -> None:
        self.memory.published += report.published
        self.memory.failed += report.failed
        problem: Exception | None = report.stopped_by
        if problem is None and report.failed:
            problem = NatsPublishFailed(f"nats: {report.failed} of {report.claimed} publishes"
                                        f" failed (first: {report.first_error})")  # fmt: skip
        if problem is not None:
            self.breaker.on_failure(problem, start)
            self._after_failure(problem)
        elif report.claimed == 0:
            self.breaker.on_failure(PublishNotAttempted("nothing to publish"), start)
        else:
            # Timed as its slowest batch: the session's other time is not the call's.
            self.breaker.on_success(start + max(0.0, report.elapsed_s - report.slowest_publish_s))
        if problem is None or self.states.state is RelayState.DEGRADED:
            self.states.enter(
                RelayState.RELAYING
                if self.breaker.state is not CircuitState.OPEN
                else RelayState.BLOCKED,
                "batch relayed",
            )
        self._set_lag(report.lag_s)

    def _after_failure(self, exc: Exception) -> None:
        if self.breaker.state is CircuitState.OPEN:
            self.states.enter(RelayState.BLOCKED, str(exc))
        else:
            log.warning("outbox relay: publish failed: %s", exc)

    async def _read_lag(self) -> None:
        try:
            age = await run(pending_age_s, self.pool, service="postgres")
        except ProviderError as exc:
            self.states.enter(RelayState.DEGRADED, str(exc))
            return
        if self.states.state is RelayState.DEGRADED:
            blocked = self.breaker.state is CircuitState.OPEN
            self.states.enter(
                RelayState.BLOCKED if blocked else RelayState.RELAYING, "database reachable"
            )
        self._set_lag(age)

    def _set_lag(self, age_s: float | None) -> None:
        self.lag_s = age_s
        for sink in self.lag:
            sink.set_age(age_s)

    # -- start-up ----------------------------------------------------------------------

    async def _check_stream(self) -> None:
        config = self.config
        subjects = self.subjects
        if self.ensure_stream:
            settings = await run(
                jetstream.ensure_stream, self.client, config.stream, subjects,
                config.duplicate_window_s, service="nats",
            )  # fmt: skip
            if not any(jetstream.subject_matches(p, config.dlq_subject) for p in subjects):
                await run(
                    jetstream.ensure_stream, self.client, dlq_stream_name(config),
                    [config.dlq_subject], config.duplicate_window_s, service="nats",
                )  # fmt: skip
        else:
            settings = await run(
                jetstream.stream_settings, self.client, config.stream, service="nats"
            )
        self._limits.max_msg_size = settings.max_msg_size
        horizon = retry_horizon_s(config, self.breaker)
        if settings.duplicate_window_s < horizon:
            self._warn(
                f"stream {settings.name}: duplicate window {settings.duplicate_window_s:g}s is"
                f" shorter than the relay's retry horizon {horizon:g}s (ack_timeout_s +"
                " breaker reset_timeout_max_s + poll_interval_s): a publish that timed out but"
                " was stored can be stored twice"
            )
        if settings.duplicate_window_s < config.duplicate_window_s:
            self._warn(
                f"stream {settings.name}: duplicate window {settings.duplicate_window_s:g}s is"
                f" below [relay] duplicate_window_s = {config.duplicate_window_s:g}s"
            )
        if settings.replicas < 3:
            self._warn(
                f"stream {settings.name}: {settings.replicas} replica(s): an acknowledged event"
                " lives on one server and, until its sync_interval fsync (2 min by default), an"
                " OS crash loses it; use 3 replicas or sync_interval: always"
            )

    def _warn(self, message: str) -> None:
        if message not in self.memory.warnings:  # once, not again at every restart
            self.memory.warnings.append(message)
        log.warning("outbox relay: %s", message)


def nudge(ref: ActorRef[RelayMessage]) -> None:
    """Ask the relay at ``ref`` for a turn now rather than at its next tick (never blocks).

    A full mailbox already holds a turn, and a stopped relay polls when it is
    back: either way the nudge is not needed and is dropped.
    """
    with contextlib.suppress(MailboxFull, ActorStopped):
        ref.tell_nowait(POLL)


def relay_child(
    *,
    pool: asyncpg.Pool[asyncpg.Record],
    client: jetstream.JetStreamClient,
    config: RelayConfig,
    breaker: Breaker,
    mailbox: MailboxConfig,
    shutdown_s: float,
    lag: LagSink | Sequence[LagSink] | None = None,
    ensure_stream: bool = True,
    restart_sinks: Sequence[RestartSink] = (),
    publish_hook: PublishHook | None = None,
    redact: Redact | None = None,
    restart: Restart | None = None,
    deadlines: Deadlines | None = None,
    metrics: Metrics | None = None,
) -> tuple[ChildSpec, ActorRef[RelayMessage]]:
    """The relay's child spec (id ``outbox_relay``) and ref, its mailbox from ``mailbox``.

    One :class:`RelayMemory` is made here and handed to every incarnation.
    """
    factory = partial(
        OutboxRelay,
        pool=pool,
        client=client,
        config=config,
        breaker=breaker,
        memory=RelayMemory(),
        lag=lag,
        ensure_stream=ensure_stream,
        restart_sinks=restart_sinks,
        publish_hook=publish_hook,
        redact=redact,
    )
    return actor_child(
        OutboxRelay.name,
        factory,
        capacity=mailbox.capacity,
        overflow=Overflow(mailbox.overflow),
        restart=restart,
        shutdown_s=shutdown_s,
        deadlines=deadlines,
        metrics=metrics,
    )
