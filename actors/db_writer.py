"""Row 5, database unavailable: reads fall to a replica, writes are spooled or refused.

Two pieces, wired together by :func:`db_writer_child`::

    gateway = DbGateway(primary, primary_breaker, spool, config.spool,
                        appliers={"inbox": insert_inbox},        # asyncio side, idempotent
                        replica=replica, replica_breaker=replica_breaker,
                        connection_errors=detector, wall=runtime.clock.wall)
    spec, writer = db_writer_child(gateway, mailbox=..., shutdown_s=...)
    # the supervisor runs ``spec``: the writer actor opens the spool and replays it
    rows = await gateway.read(count_rows, tenant)              # primary, else the replica
    outcome = await gateway.write("inbox", key, payload)       # WRITTEN or SPOOLED
    writer.statistics().backlog                                # a frozen DbWriterStatistics

**Why reads and writes are direct calls, not messages.** :meth:`DbGateway.read`
and :meth:`DbGateway.write` run in the caller's task, per request. Through the
actor's mailbox every request would wait for the one before it (an actor handles
one message at a time: the pool's ``pool_max`` connections would serve one
request at a time), on top of the hop itself: an ``ask`` round trip is ~66 µs
here (``python -m bench.perf actors --quick``: 15,161 round trips/s, on 2
shared cores). Neither ``bench.perf dispatch`` nor ``bench.perf relay`` goes
through the gateway (no daemon path calls it per request yet), so they show
no figure for it; the serialisation alone rules the hop out. What the gateway
shares with the actor is the spool, the breaker and its counts; state changes
of the replay are the actor's alone.

**Reads** (:meth:`DbGateway.read`) go to the primary through its breaker
(``breakers.postgres_primary``). When the breaker refuses (open) or the call
fails with a connection error, they go to the replica through its own breaker
(``breakers.postgres_replica``); with no replica, or the replica down too, the
read raises :class:`~engine.errors.DatabaseUnavailable`.

**Writes** (:meth:`DbGateway.write`) name a *kind*; each kind has an *applier*,
an asyncio unit of work ``applier(pool, record)`` that must be idempotent on
``record.key`` (``INSERT ... ON CONFLICT DO NOTHING``): a record may be applied
more than once (a timed-out write that did commit, a replay interrupted by a
crash), never with a second effect. A write goes to the primary through its
breaker, and answers :attr:`WriteOutcome.WRITTEN`. When the primary is
unreachable (breaker open, or a connection error), a kind listed in
``[spool] spoolable_kinds`` is appended to the durable :class:`~providers.spool.Spool`
(fsync'd, stamped with the injected wall clock) and answers
:attr:`WriteOutcome.SPOOLED` ("accepted, spooled"), and the writer actor is
told :class:`Replay`; any other kind raises
:class:`~engine.errors.DatabaseUnavailable` (a 503). While the spool holds
records, writes of spoolable kinds are spooled behind them, so that the spool
replays in the order the writes were accepted. A full spool raises
:class:`~providers.spool.SpoolFull` (a ``LoadShed`` too).

**Replay** (:class:`DbWriter`, the actor): its timer tells it :class:`Replay`
every ``probe_interval_s`` (ticks coalesce), and the gateway tells it one per
spooled write. Whenever the spool holds records and the primary breaker admits
calls, it applies the oldest ``replay_batch`` records in one crossing of the
bridge, in order, drops them from the spool once they committed, and goes on at
once while records remain. A failed batch is retried whole (the appliers are
idempotent) at the next tick, or at the breaker's half-open moment when that
comes first. The replay attempts are also the probes that close the primary
breaker again. State machine (one log line per change)::

    IDLE      --a write spooled / a probe failed--> WAITING      the primary refuses
    WAITING   --a batch replayed--> REPLAYING                     records remain
    REPLAYING --the spool is empty--> IDLE
    WAITING   --the primary answers, nothing spooled--> IDLE

**Detector**: every connection error (``ProviderUnavailable`` /
``ProviderTimeout`` from the primary or the replica) is fed to the
connection-error :class:`~engine.detectors.RateDetector` (catalog row 5,
``triage_db_connection_errors_total``); the daemon (or the scenario) evaluates it.
While the primary breaker is open and there is nothing to replay, the actor
probes the primary with ``SELECT 1`` once it is half-open, so that the detector
keeps seeing the outage and the breaker closes once it is over.

:meth:`DbGateway.unavailable` is the readiness reason (``"database unavailable"``)
while the primary breaker refuses calls.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar, TypeVarTuple

import msgspec

from config.schema import MailboxConfig, SpoolConfig
from engine.actor import Actor, ActorRef, Overflow, Timer, actor_child
from engine.breaker import Breaker, CircuitState
from engine.detectors import RateDetector
from engine.errors import (
    ActorStopped,
    CircuitOpen,
    DatabaseUnavailable,
    MailboxFull,
    ProviderTimeout,
    ProviderUnavailable,
)
from engine.statelog import StateLog
from providers.db.pool import DbPool, Pool
from providers.db.tenancy import run_in_tenant
from providers.spool import Spool, SpoolRecord

if TYPE_CHECKING:
    from engine.deadlines import Deadlines
    from engine.metrics import Metrics
    from engine.supervisor import ChildSpec, Restart
    from providers.db.tenancy import Connection

ROW: Final = 5  # the catalog row this actor owns: database unavailable
__all__ = [
    "REPLAY",
    "UNAVAILABLE",
    "Applier",
    "DbGateway",
    "DbWriter",
    "DbWriterMessage",
    "DbWriterStatistics",
    "Replay",
    "WriteOutcome",
    "WriterState",
    "apply_inbox",
    "db_writer_child",
]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

log = logging.getLogger("triage.db_writer")

UNAVAILABLE = "database unavailable"

Applier = Callable[[Pool, SpoolRecord], Awaitable[object]]
"""An asyncio unit of work that applies one write, idempotently on ``record.key``."""

_CONNECTION_ERRORS = (ProviderUnavailable, ProviderTimeout)
_REFUSING = frozenset({CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.FORCED_OPEN})
#: Breaker states that admit no call at all (half-open admits the probes).
_CLOSED_DOOR = frozenset({CircuitState.OPEN, CircuitState.FORCED_OPEN})


class WriteOutcome(enum.StrEnum):
    """What :meth:`DbGateway.write` did with an accepted write."""

    WRITTEN = "written"
    SPOOLED = "accepted, spooled"


class WriterState(enum.Enum):
    IDLE = "idle"  # nothing spooled, the primary admits calls
    REPLAYING = "replaying"  # the spool is being drained
    WAITING = "waiting"  # the primary refuses: records wait in the spool


class Replay(msgspec.Struct, frozen=True, tag=True):
    """Replay the spool if it holds records (else probe a refusing primary)."""


REPLAY = Replay()

#: The writer's messages (one kind: everything it does is a replay pass).
DbWriterMessage = Replay


class DbWriterStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`DbWriter.statistics` reports; counts are the gateway's, since it was built."""

    state: WriterState
    backlog: int  # writes accepted into the spool and not replayed yet
    written: int
    spooled: int
    refused: int
    replayed: int
    replica_reads: int
    connection_errors: int


_INSERT_INBOX = (
    "INSERT INTO inbox (tenant_id, appointment_id, source, message_key)"
    " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING"
)


async def _insert_inbox(conn: Connection, record: SpoolRecord) -> None:
    payload = record.payload
    await conn.execute(
        _INSERT_INBOX,
        uuid.UUID(payload["tenant"]),
        payload["appointment"],
        payload.get("source", "spool"),
        record.key,
    )


async def apply_inbox(pool: Pool, record: SpoolRecord) -> None:
    """The ``inbox`` kind's applier: an inbox row, once per (tenant, appointment).

    ``record.payload`` is ``{"tenant": UUID text, "appointment": str, "source": str}``;
    the row is inserted in the tenant's transaction, ``ON CONFLICT DO NOTHING``.
    """
    await run_in_tenant(pool, record.payload["tenant"], _insert_inbox, record)


async def _apply_one(pool: Pool, applier: Applier, record: SpoolRecord) -> None:
    await applier(pool, record)


async def _apply_batch(
    pool: Pool, appliers: Mapping[str, Applier], records: Sequence[SpoolRecord]
) -> None:
    """asyncio side: apply ``records`` in order (one crossing for the batch)."""
    for record in records:
        await appliers[record.kind](pool, record)


async def _select_one(pool: Pool) -> object:
    return await pool.fetchval("SELECT 1")


@dataclass(slots=True)
class _Counts:
    written: int = 0
    spooled: int = 0
    refused: int = 0
    replayed: int = 0
    replica_reads: int = 0
    connection_errors: int = 0


class DbGateway:
    """The primary (and optional replica) pool behind breakers, with a write spool.

    Direct calls, in the caller's task (see the module docstring for why).
    """

    def __init__(
        self,
        primary: DbPool,
        primary_breaker: Breaker,
        spool: Spool,
        config: SpoolConfig,
        *,
        appliers: Mapping[str, Applier],
        wall: Callable[[], float],
        replica: DbPool | None = None,
        replica_breaker: Breaker | None = None,
        connection_errors: RateDetector | None = None,
    ) -> None:
        if (replica is None) != (replica_breaker is None):
            raise ValueError("a replica needs its breaker, and a replica breaker its replica")
        unknown = set(config.spoolable_kinds) - set(appliers)
        if unknown:
            raise ValueError(f"spoolable kinds without an applier: {sorted(unknown)}")
        self.primary = primary
        self.primary_breaker = primary_breaker
        self.replica = replica
        self.replica_breaker = replica_breaker
        self.spool = spool
        self.config = config
        self.appliers = dict(appliers)
        self.spoolable = frozenset(config.spoolable_kinds)
        self.connection_errors = connection_errors
        self._wall = wall
        self._counts = _Counts()
        self._replayer: ActorRef[DbWriterMessage] | None = None

    def replay_with(self, ref: ActorRef[DbWriterMessage]) -> None:
        """Tell the writer actor at ``ref`` of every spooled write (:func:`db_writer_child`)."""
        self._replayer = ref

    # -- observation --------------------------------------------------------------------

    def unavailable(self) -> str | None:
        """The readiness reason while the primary breaker refuses calls, else None."""
        return UNAVAILABLE if self.primary_breaker.state in _REFUSING else None

    def _connection_error(self, exc: BaseException) -> None:
        self._counts.connection_errors += 1
        if self.connection_errors is not None:
            self.connection_errors.observe()
        log.warning("database connection error", extra={"error": str(exc)})

    # -- reads --------------------------------------------------------------------------

    async def read(self, fn: Callable[[Pool, *Ts], Awaitable[T]], *args: *Ts) -> T:
        """``fn(pool, *args)`` on the primary; on the replica when the primary is unreachable."""
        try:
            return await self.primary_breaker.call(self.primary.run_unit, fn, *args)
        except CircuitOpen as exc:
            cause: Exception = exc
        except _CONNECTION_ERRORS as exc:
            self._connection_error(exc)
            cause = exc
        if self.replica is None or self.replica_breaker is None:
            raise DatabaseUnavailable("read", reason=f"primary: {cause}; no replica") from cause
        try:
            result = await self.replica_breaker.call(self.replica.run_unit, fn, *args)
        except CircuitOpen as exc:
            raise DatabaseUnavailable("read", reason=f"primary and replica: {exc}") from exc
        except _CONNECTION_ERRORS as exc:
            self._connection_error(exc)
            raise DatabaseUnavailable("read", reason=f"primary and replica: {exc}") from exc
        self._counts.replica_reads += 1
        return result

    # -- writes -------------------------------------------------------------------------

    async def write(self, kind: str, key: str, payload: Any) -> WriteOutcome:
        """Apply a write of ``kind`` on the primary, or spool it, or refuse it (see module doc)."""
        applier = self.appliers.get(kind)
        if applier is None:
            raise ValueError(f"no applier for write kind {kind!r}")
        spoolable = kind in self.spoolable
        if spoolable and self.spool.count:
            return await self._spool(kind, key, payload)  # keep the order behind the backlog
        record = SpoolRecord(seq=0, kind=kind, key=key, payload=payload, spooled_at=self._wall())
        try:
            await self.primary_breaker.call(self.primary.run_unit, _apply_one, applier, record)
        except CircuitOpen as exc:
            cause: Exception = exc
        except _CONNECTION_ERRORS as exc:
            self._connection_error(exc)
            cause = exc
        else:
            self._counts.written += 1
            return WriteOutcome.WRITTEN
        if not spoolable:
            self._counts.refused += 1
            raise DatabaseUnavailable(kind, reason=f"primary unreachable ({cause})") from cause
        return await self._spool(kind, key, payload)

    async def _spool(self, kind: str, key: str, payload: Any) -> WriteOutcome:
        await self.spool.append(kind, key, payload, at=self._wall())
        self._counts.spooled += 1
        if self._replayer is not None:
            # Never blocks the writer's caller: a full mailbox already holds a Replay,
            # and a stopped writer replays when it is back (the tick, at the latest).
            with contextlib.suppress(MailboxFull, ActorStopped):
                self._replayer.tell_nowait(REPLAY)
        return WriteOutcome.SPOOLED

    # -- replay (the writer actor's) ---------------------------------------------------

    async def replay_once(self) -> int:
        """Apply and drop the oldest ``replay_batch`` spooled records; how many were replayed.

        Raises ``CircuitOpen`` or a connection error when the primary refuses.
        """
        batch = await self.spool.peek(self.config.replay_batch)
        if not batch:
            return 0
        try:
            await self.primary_breaker.call(
                self.primary.run_unit, _apply_batch, self.appliers, batch
            )
        except _CONNECTION_ERRORS as exc:
            self._connection_error(exc)
            raise
        await self.spool.drop(len(batch))
        self._counts.replayed += len(batch)
        return len(batch)

    async def probe(self) -> bool:
        """One ``SELECT 1`` on the primary through its breaker: True if it answered."""
        try:
            await self.primary_breaker.call(self.primary.run_unit, _select_one)
        except CircuitOpen:
            return False
        except _CONNECTION_ERRORS as exc:
            self._connection_error(exc)
            return False
        return True


class DbWriter(Actor[DbWriterMessage]):
    """The spool's replay: one pass per :class:`Replay`. Build it with :func:`db_writer_child`."""

    name = "db_writer"

    def __init__(self, gateway: DbGateway, *, probe_interval_s: float) -> None:
        self.gateway = gateway
        self.probe_interval_s = probe_interval_s
        self.states = StateLog("db writer", WriterState.IDLE, log, warn={WriterState.WAITING})

    async def init(self) -> None:
        """Open the spool (records a previous process left are replayed at once)."""
        await self.gateway.spool.open()
        self.tell_self(REPLAY)

    def timers(self) -> Sequence[Timer]:
        return [Timer(self.probe_interval_s, REPLAY)]

    def statistics(self) -> DbWriterStatistics:
        gateway = self.gateway
        counts = gateway._counts
        return DbWriterStatistics(
            state=self.states.state,
            backlog=gateway.spool.count,
            written=counts.written,
            spooled=counts.spooled,
            refused=counts.refused,
            replayed=counts.replayed,
            replica_reads=counts.replica_reads,
            connection_errors=counts.connection_errors,
        )

    async def handle(self, message: DbWriterMessage) -> None:
        match message:
            case Replay():
                await self._pass()

    async def _pass(self) -> None:
        gateway, breaker = self.gateway, self.gateway.primary_breaker
        if breaker.state in _CLOSED_DOOR:  # nothing gets through before half-open
            self.states.enter(WriterState.WAITING, f"breaker {breaker.name} {breaker.state.value}")
            self.wake_at(breaker.half_open_at(), REPLAY, sooner_than_s=self.probe_interval_s)
            return
        if gateway.spool.count:
            try:
                replayed = await gateway.replay_once()
            except (CircuitOpen, *_CONNECTION_ERRORS) as exc:  # the next tick retries
                self.states.enter(WriterState.WAITING, f"replay failed: {exc}")
                self.wake_at(breaker.half_open_at(), REPLAY, sooner_than_s=self.probe_interval_s)
                return
            if replayed:
                log.info(
                    "spool replayed", extra={"records": replayed, "backlog": gateway.spool.count}
                )
            if gateway.spool.count:
                self.states.enter(WriterState.REPLAYING, "records remain")
                self.tell_self(REPLAY)
            else:
                self.states.enter(WriterState.IDLE, "spool replayed")
        elif breaker.state in _REFUSING:  # half-open: probe, so that it closes again
            if await gateway.probe():
                self.states.enter(WriterState.IDLE, "primary answered")
            else:
                self.states.enter(WriterState.WAITING, "probe failed")
                self.wake_at(breaker.half_open_at(), REPLAY, sooner_than_s=self.probe_interval_s)
        else:
            self.states.enter(WriterState.IDLE, "nothing spooled")


def db_writer_child(
    gateway: DbGateway,
    *,
    mailbox: MailboxConfig,
    shutdown_s: float,
    probe_interval_s: float | None = None,
    restart: Restart | None = None,
    deadlines: Deadlines | None = None,
    metrics: Metrics | None = None,
) -> tuple[ChildSpec, ActorRef[DbWriterMessage]]:
    """The writer's child spec (id ``db_writer``) and ref; ``gateway`` tells it of spooled writes.

    ``probe_interval_s`` defaults to the primary breaker's ``reset_timeout_s``.
    """
    interval = (
        gateway.primary_breaker.reset_timeout_s if probe_interval_s is None else probe_interval_s
    )
    spec, ref = actor_child(
        DbWriter.name,
        partial(DbWriter, gateway, probe_interval_s=interval),
        capacity=mailbox.capacity,
        overflow=Overflow(mailbox.overflow),
        restart=restart,
        shutdown_s=shutdown_s,
        deadlines=deadlines,
        metrics=metrics,
    )
    gateway.replay_with(ref)
    return spec, ref
