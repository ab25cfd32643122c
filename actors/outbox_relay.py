"""The outbox relay: PostgreSQL outbox rows to NATS JetStream, in order per aggregate (rows 6, 9).

A supervised poll loop (a child whose ``start`` is :meth:`OutboxRelay.run`).
Each turn crosses the bridge once with :func:`providers.db.outbox.relay_batch`:
one PostgreSQL transaction (as ``triage_relay``) that claims a batch, publishes
it to JetStream (``Nats-Msg-Id`` = outbox id, all acks awaited concurrently),
marks the acknowledged rows published and reads the lag. See
:mod:`providers.db.outbox` for the claim and the order per aggregate.

State machine (logged on every transition)::

    STARTING --stream checked--> RELAYING
    RELAYING --breaker nats_publish opens--> BLOCKED     rows stay in the outbox
    BLOCKED  --half-open probe batch acked--> RELAYING   the backlog replays in order
    RELAYING/BLOCKED --database unreachable--> DEGRADED  retried every poll
    DEGRADED --a batch or a lag read succeeds--> RELAYING (or BLOCKED)
    any      --cancelled--> STOPPED

Breaker accounting (``breakers.nats_publish``): a batch with any failed publish
(a timeout, a refusal, the client reconnecting) is one failure; an acked batch
one success. A turn that never reached NATS (empty batch, database error) is
reported as :class:`PublishNotAttempted`, a :class:`~engine.errors.LoadShed`,
which the breaker ignores (it frees a half-open probe slot and counts nothing).

Lag: after every turn (also while BLOCKED, from a plain read) the age of the
oldest pending row goes to the lag detectors with ``set_age`` (each an
:class:`~engine.detectors.AgeOfNewestDetector`: catalog row 6's and/or
``[detectors.outbox_lag]``), and is kept in :attr:`OutboxRelay.lag_s`. An
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
crash: a crash on a batch of several rows switches the relay (the same object
across restarts) to *isolation* -- batches of one row, until as many rows as the
crashed batch held went through; a crash on a single row quarantines that row
at once (dead letter + DLQ, in its own unit of work). A poison row thus costs
two restarts (batch, then alone) and the relay goes on past it, well within a
supervisor intensity of a few restarts: the intensity limit stays the last
resort, for crashes no row explains (e.g. before any claim).

Start-up check: the stream's duplicate window must cover the relay's retry
horizon, the longest a publish that timed out (and may have been stored) can
wait before it is sent again: ``ack_timeout_s + breaker.reset_timeout_max_s +
poll_interval_s``. A shorter window, or a stream with one replica (an acked
write lives on one server, and until the server's ``sync_interval`` fsync an OS
crash loses it), is logged as a warning.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Final, Protocol

import nats.js.errors
import trio

from config.schema import RelayConfig
from engine.breaker import Breaker, CircuitState
from engine.errors import CircuitOpen, LoadShed, ProviderError, ProviderUnavailable
from engine.supervisor import ChildSpec, Restart
from providers import jetstream
from providers.bridge import run
from providers.db.outbox import (
    BatchReport,
    DeadLetterTo,
    OutboxRow,
    PoisonEvent,
    Publish,
    pending_age_s,
    quarantine_async,
    relay_batch,
)

if TYPE_CHECKING:
    import asyncpg

LAG_ROW: Final = 6  # the catalog row this actor owns: NATS unavailable (outbox lag)
CRASH_LOOP_ROW: Final = 9  # the catalog row this actor owns: outbox relay crash loop
__all__ = [
    "NatsPublishFailed",
    "OutboxRelay",
    "PublishNotAttempted",
    "RelayState",
    "dlq_stream_name",
    "retry_horizon_s",
]

log = logging.getLogger("triage.relay")


class RelayState(enum.Enum):
    STARTING = "starting"
    RELAYING = "relaying"
    BLOCKED = "blocked"  # the publish breaker is open: rows wait in the outbox
    DEGRADED = "degraded"  # the database is unreachable
    STOPPED = "stopped"


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
    return config.ack_timeout_s + breaker.reset_timeout_max_s + config.poll_interval_s


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


def _check_row(row: OutboxRow, limits: _Limits) -> jetstream.PublishItem:
    """The row's message, or :class:`PoisonEvent` if it can never be published as it is."""
    if row.defect is not None:
        raise PoisonEvent(row.defect)
    if limits.subjects and not any(
        jetstream.subject_matches(p, row.subject) for p in limits.subjects
    ):
        raise PoisonEvent(f"subject {row.subject!r} is not bound to the relay's stream")
    item = row.to_item()
    size = len(item.payload) + sum(len(k) + len(v) + 4 for k, v in item.headers.items())
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


class OutboxRelay:
    """The relay's state and its loop. Build one, run :meth:`run` under a supervisor."""

    name = "outbox_relay"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool[asyncpg.Record],
        client: jetstream.JetStreamClient,
        config: RelayConfig,
        breaker: Breaker,
        lag: LagSink | Sequence[LagSink] | None = None,
        ensure_stream: bool = True,
        restart_sinks: Sequence[RestartSink] = (),
    ) -> None:
        self.pool = pool
        self.client = client
        self.config = config
        self.breaker = breaker
        self.lag: tuple[LagSink, ...] = (
            () if lag is None else tuple(lag) if isinstance(lag, Sequence) else (lag,)
        )
        self.ensure_stream = ensure_stream
        self.state = RelayState.STARTING
        self.lag_s: float | None = None
        self.published = 0  # rows marked published by this relay
        self.failed = 0  # row publishes that failed
        self.turns = 0
        self.warnings: list[str] = []
        self.restart_sinks = tuple(restart_sinks)
        self.starts = 0  # runs of :meth:`run`: every one after the first is a restart
        self.restarts = 0
        self.crashes = 0  # turns that raised an unexpected exception
        self.dead_lettered = 0  # poison rows moved to dead_letters + DLQ (quarantines included)
        self.quarantined = 0  # rows dead-lettered because they crashed the relay alone
        self._isolate = 0  # rows still to relay one at a time after a crash
        self._nudged = trio.Event()
        self.subjects = [s.strip() for s in config.subjects.split(",") if s.strip()]
        max_payload = int(client.nc.max_payload or 1024 * 1024)
        self._limits = _Limits(self.subjects, max_payload)
        self._publish: Publish = partial(_publish_rows, client, config.ack_timeout_s, self._limits)
        self._dead_letter = DeadLetterTo(
            publish=partial(_publish_dlq, client, config.ack_timeout_s),
            subject=config.dlq_subject,
            max_payload=max_payload,
            max_attempts=config.max_attempts,
        )

    # -- outside API -----------------------------------------------------------------

    def nudge(self) -> None:
        """Poll now rather than at the end of the interval (e.g. after a write)."""
        self._nudged.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The child's body: check the stream, signal started, then relay until cancelled."""
        self.starts += 1
        if self.starts > 1:
            self.restarts += 1
            for sink in self.restart_sinks:
                sink.observe()
        try:
            await self._check_stream()
            self._enter(RelayState.RELAYING, "started")
            task_status.started()
            while True:
                full = await self.step()
                if not full:
                    await self._wait()
        finally:
            self._enter(RelayState.STOPPED, "stopped")

    def child_spec(self, *, shutdown_s: float = 5.0, restart: Restart | None = None) -> ChildSpec:
        """A supervisor child running :meth:`run`."""
        return ChildSpec.of(self, shutdown_s=shutdown_s, restart=restart)

    # -- one turn ----------------------------------------------------------------------

    async def step(self) -> bool:
        """One turn; True if a full batch went out (poll again at once)."""
        self.turns += 1
        try:
            start = self.breaker.before_call()
        except CircuitOpen:
            self._enter(RelayState.BLOCKED, f"breaker {self.breaker.name} is open")
            await self._read_lag()
            return False
        limit = 1 if self._isolate > 0 else self.config.batch_size
        claimed: list[int] = []
        batch = partial(relay_batch, self.pool, self._publish, limit, self._dead_letter, claimed)
        try:
            report = await run(batch, service="postgres")
        except NatsPublishFailed as exc:
            self.breaker.on_failure(exc, start)
            self._after_failure(exc)
            await self._read_lag()
            return False
        except ProviderError as exc:  # the database: nothing reached NATS
            self.breaker.on_failure(PublishNotAttempted(str(exc)), start)
            self._enter(RelayState.DEGRADED, str(exc))
            return False
        except Exception as exc:  # a crash: attribute it, then let the supervisor restart us
            self.breaker.on_failure(PublishNotAttempted("turn crashed"), start)
            await self._on_crash(claimed, exc)
            raise
        except BaseException:
            self.breaker.on_failure(PublishNotAttempted("turn interrupted"), start)
            raise
        if self._isolate > 0:
            self._isolate = 0 if report.claimed == 0 else self._isolate - report.claimed
        self.dead_lettered += report.dead_lettered
        self._account(report, start)
        return report.claimed >= limit and report.failed == 0

    async def _on_crash(self, claimed: Sequence[int], exc: Exception) -> None:
        """Attribute a crashed turn: isolate a batch, quarantine a single row (module docstring)."""
        self.crashes += 1
        error = f"relay crashed on this event: {type(exc).__name__}: {exc}"
        if len(claimed) > 1:
            self._isolate = max(self._isolate, len(claimed))
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
            self.quarantined += 1
            self.dead_lettered += 1
            log.error(
                "outbox relay: event %d quarantined to the dead letters: %s", outbox_id, error
            )

    def _account(self, report: BatchReport, start: float) -> None:
        self.published += report.published
        self.failed += report.failed
        if report.claimed == 0:
            self.breaker.on_failure(PublishNotAttempted("nothing to publish"), start)
        elif report.failed:
            error = NatsPublishFailed(f"nats: {report.failed} of {report.claimed} publishes failed"
                                      f" (first: {report.first_error})")  # fmt: skip
            self.breaker.on_failure(error, start)
            self._after_failure(error)
        else:
            self.breaker.on_success(start)
        if report.failed == 0 or self.state is RelayState.DEGRADED:
            self._enter(
                RelayState.RELAYING
                if self.breaker.state is not CircuitState.OPEN
                else RelayState.BLOCKED,
                "batch relayed",
            )
        self._set_lag(report.lag_s)

    def _after_failure(self, exc: Exception) -> None:
        if self.breaker.state is CircuitState.OPEN:
            self._enter(RelayState.BLOCKED, str(exc))
        else:
            log.warning("outbox relay: publish failed: %s", exc)

    async def _read_lag(self) -> None:
        try:
            age = await run(pending_age_s, self.pool, service="postgres")
        except ProviderError as exc:
            self._enter(RelayState.DEGRADED, str(exc))
            return
        if self.state is RelayState.DEGRADED:
            blocked = self.breaker.state is CircuitState.OPEN
            self._enter(
                RelayState.BLOCKED if blocked else RelayState.RELAYING, "database reachable"
            )
        self._set_lag(age)

    def _set_lag(self, age_s: float | None) -> None:
        self.lag_s = age_s
        for sink in self.lag:
            sink.set_age(age_s)

    async def _wait(self) -> None:
        interval = self.config.poll_interval_s
        if self.state is RelayState.BLOCKED:
            half_open = self.breaker.half_open_at()
            if half_open is not None and math.isfinite(half_open):
                interval = min(interval, max(0.0, half_open - trio.current_time()))
        with trio.move_on_after(interval):
            await self._nudged.wait()
        if self._nudged.is_set():
            self._nudged = trio.Event()

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
        self.warnings.append(message)
        log.warning("outbox relay: %s", message)

    def _enter(self, state: RelayState, reason: str) -> None:
        if state is self.state:
            return
        old, self.state = self.state, state
        level = (
            logging.WARNING if state in (RelayState.BLOCKED, RelayState.DEGRADED) else logging.INFO
        )
        log.log(level, "outbox relay: %s -> %s (%s)", old.value, state.value, reason)
