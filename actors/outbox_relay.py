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
from functools import partial
from typing import TYPE_CHECKING, Protocol

import trio

from config.schema import RelayConfig
from engine.breaker import Breaker, CircuitState
from engine.errors import CircuitOpen, LoadShed, ProviderError, ProviderUnavailable
from engine.supervisor import ChildSpec, Restart
from providers import jetstream
from providers.bridge import run
from providers.db.outbox import BatchReport, OutboxRow, pending_age_s, relay_batch

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "NatsPublishFailed",
    "OutboxRelay",
    "PublishNotAttempted",
    "RelayState",
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


class LagSink(Protocol):
    """What the relay feeds its lag to: an :class:`~engine.detectors.AgeOfNewestDetector`."""

    def set_age(self, age_s: float | None) -> None: ...


def retry_horizon_s(config: RelayConfig, breaker: Breaker) -> float:
    """The longest a maybe-stored publish waits before its retry (see the module docstring)."""
    return config.ack_timeout_s + breaker.reset_timeout_max_s + config.poll_interval_s


async def _publish_rows(
    client: jetstream.JetStreamClient, ack_timeout_s: float, rows: Sequence[OutboxRow]
) -> list[object]:
    """asyncio side, inside the relay's transaction: publish the batch, one result per row."""
    try:
        results = await jetstream.publish_batch(
            client, [row.to_item() for row in rows], ack_timeout_s
        )
    except Exception as exc:
        raise NatsPublishFailed(f"nats: batch not published ({type(exc).__name__}: {exc})") from exc
    return list(results)


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
        self._nudged = trio.Event()
        self._publish = partial(_publish_rows, client, config.ack_timeout_s)

    # -- outside API -----------------------------------------------------------------

    def nudge(self) -> None:
        """Poll now rather than at the end of the interval (e.g. after a write)."""
        self._nudged.set()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The child's body: check the stream, signal started, then relay until cancelled."""
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
        return ChildSpec(
            id=self.name,
            start=self.run,
            restart=restart if restart is not None else Restart.PERMANENT,
            shutdown_s=shutdown_s,
        )

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
        try:
            report = await run(
                relay_batch, self.pool, self._publish, self.config.batch_size, service="postgres"
            )
        except NatsPublishFailed as exc:
            self.breaker.on_failure(exc, start)
            self._after_failure(exc)
            await self._read_lag()
            return False
        except ProviderError as exc:  # the database: nothing reached NATS
            self.breaker.on_failure(PublishNotAttempted(str(exc)), start)
            self._enter(RelayState.DEGRADED, str(exc))
            return False
        except BaseException:
            self.breaker.on_failure(PublishNotAttempted("turn interrupted"), start)
            raise
        self._account(report, start)
        return report.claimed >= self.config.batch_size and report.failed == 0

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
        subjects = [s.strip() for s in config.subjects.split(",") if s.strip()]
        if self.ensure_stream:
            settings = await run(
                jetstream.ensure_stream, self.client, config.stream, subjects,
                config.duplicate_window_s, service="nats",
            )  # fmt: skip
        else:
            settings = await run(
                jetstream.stream_settings, self.client, config.stream, service="nats"
            )
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
