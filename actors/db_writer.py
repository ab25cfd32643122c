"""Row 5, database unavailable: reads fall to a replica, writes are spooled or refused.

::

    writer = DbWriter(primary, primary_breaker, spool, config.spool,
                      appliers={"inbox": insert_inbox},          # asyncio side, idempotent
                      replica=replica, replica_breaker=replica_breaker,
                      connection_errors=detector)
    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)                          # the replay task
        rows = await writer.read(count_rows, tenant)             # primary, else the replica
        outcome = await writer.write("inbox", key, payload)      # WRITTEN or SPOOLED

**Reads** (:meth:`DbWriter.read`) go to the primary through its breaker
(``breakers.postgres_primary``). When the breaker refuses (open) or the call
fails with a connection error, they go to the replica through its own breaker
(``breakers.postgres_replica``); with no replica, or the replica down too, the
read raises :class:`~engine.errors.DatabaseUnavailable`.

**Writes** (:meth:`DbWriter.write`) name a *kind*; each kind has an *applier*,
an asyncio unit of work ``applier(pool, record)`` that must be idempotent on
``record.key`` (``INSERT ... ON CONFLICT DO NOTHING``): a record may be applied
more than once (a timed-out write that did commit, a replay interrupted by a
crash), never with a second effect. A write goes to the primary through its
breaker, and answers :attr:`WriteOutcome.WRITTEN`. When the primary is
unreachable (breaker open, or a connection error), a kind listed in
``[spool] spoolable_kinds`` is appended to the durable :class:`~providers.spool.Spool`
(fsync'd) and answers :attr:`WriteOutcome.SPOOLED` ("accepted, spooled"); any
other kind raises :class:`~engine.errors.DatabaseUnavailable` (a 503). While
the spool holds records, writes of spoolable kinds are spooled behind them, so
that the spool replays in the order the writes were accepted. A full spool
raises :class:`~providers.spool.SpoolFull` (a ``LoadShed`` too).

**Replay** (:meth:`DbWriter.run`, a supervised child): whenever the spool
holds records, it waits until the primary breaker admits calls, then applies
the oldest ``replay_batch`` records in one crossing of the bridge, in order,
and drops them from the spool once they committed. A failed batch is retried
whole (the appliers are idempotent), after the breaker's open interval. The
replay attempts are also the probes that close the primary breaker again.

**Detector**: every connection error (``ProviderUnavailable`` /
``ProviderTimeout`` from the primary or the replica) is fed to the
connection-error :class:`~engine.detectors.RateDetector` (catalog row 5,
``triage_db_connection_errors_total``); the daemon (or the scenario) evaluates it.
While the primary breaker is open and there is nothing to replay, the replay
task probes the primary with ``SELECT 1`` every ``probe_interval_s`` so that
the detector keeps seeing the outage and the breaker closes once it is over.

:meth:`DbWriter.unavailable` is the readiness reason (``"database unavailable"``)
while the primary breaker refuses calls.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar, TypeVarTuple

import trio

from config.schema import SpoolConfig
from engine.breaker import Breaker, CircuitState
from engine.detectors import RateDetector
from engine.errors import CircuitOpen, DatabaseUnavailable, ProviderTimeout, ProviderUnavailable
from providers.db.pool import DbPool, Pool
from providers.db.tenancy import run_in_tenant
from providers.spool import Spool, SpoolRecord

if TYPE_CHECKING:
    from providers.db.tenancy import Connection

ROW: Final = 5  # the catalog row this actor owns: database unavailable
__all__ = ["UNAVAILABLE", "Applier", "DbWriter", "WriteOutcome", "apply_inbox"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

log = logging.getLogger("triage.db_writer")

UNAVAILABLE = "database unavailable"

Applier = Callable[[Pool, SpoolRecord], Awaitable[object]]
"""An asyncio unit of work that applies one write, idempotently on ``record.key``."""

_CONNECTION_ERRORS = (ProviderUnavailable, ProviderTimeout)
_REFUSING = frozenset({CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.FORCED_OPEN})


class WriteOutcome(enum.StrEnum):
    """What :meth:`DbWriter.write` did with an accepted write."""

    WRITTEN = "written"
    SPOOLED = "accepted, spooled"


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


class DbWriter:
    """The primary (and optional replica) pool behind breakers, with a write spool."""

    def __init__(
        self,
        primary: DbPool,
        primary_breaker: Breaker,
        spool: Spool,
        config: SpoolConfig,
        *,
        appliers: Mapping[str, Applier],
        replica: DbPool | None = None,
        replica_breaker: Breaker | None = None,
        connection_errors: RateDetector | None = None,
        probe_interval_s: float | None = None,
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
        self.probe_interval_s = (
            primary_breaker.reset_timeout_s if probe_interval_s is None else probe_interval_s
        )
        self.written = 0
        self.spooled = 0
        self.refused = 0
        self.replayed = 0
        self.replica_reads = 0
        self.connection_error_count = 0
        self._wake = trio.Event()

    # -- observation --------------------------------------------------------------------

    def unavailable(self) -> str | None:
        """The readiness reason while the primary breaker refuses calls, else None."""
        return UNAVAILABLE if self.primary_breaker.state in _REFUSING else None

    @property
    def backlog(self) -> int:
        """Writes accepted into the spool and not replayed yet."""
        return self.spool.count

    def _connection_error(self, exc: BaseException) -> None:
        self.connection_error_count += 1
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
        self.replica_reads += 1
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
        record = SpoolRecord(seq=0, kind=kind, key=key, payload=payload, spooled_at=time.time())
        try:
            await self.primary_breaker.call(self.primary.run_unit, _apply_one, applier, record)
        except CircuitOpen as exc:
            cause: Exception = exc
        except _CONNECTION_ERRORS as exc:
            self._connection_error(exc)
            cause = exc
        else:
            self.written += 1
            return WriteOutcome.WRITTEN
        if not spoolable:
            self.refused += 1
            raise DatabaseUnavailable(kind, reason=f"primary unreachable ({cause})") from cause
        return await self._spool(kind, key, payload)

    async def _spool(self, kind: str, key: str, payload: Any) -> WriteOutcome:
        await self.spool.append(kind, key, payload, at=time.time())
        self.spooled += 1
        self._wake.set()
        return WriteOutcome.SPOOLED

    # -- replay -------------------------------------------------------------------------

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
        self.replayed += len(batch)
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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The replay task: drains the spool through the primary whenever it admits calls."""
        await self.spool.open()
        task_status.started()
        while True:
            if self.spool.count:
                await self.primary_breaker.wait_until_half_open()
                try:
                    replayed = await self.replay_once()
                except (CircuitOpen, *_CONNECTION_ERRORS):
                    await trio.sleep(self.probe_interval_s)
                    continue
                if replayed:
                    log.info(
                        "spool replayed",
                        extra={"records": replayed, "backlog": self.spool.count},
                    )
                await trio.lowlevel.checkpoint()
            elif self.primary_breaker.state in _REFUSING:
                await self.primary_breaker.wait_until_half_open()
                if not await self.probe():
                    with trio.move_on_after(self.probe_interval_s):
                        await self._wait_for_spool()
            else:
                with trio.move_on_after(self.probe_interval_s):
                    await self._wait_for_spool()

    async def _wait_for_spool(self) -> None:
        if not self.spool.count:
            self._wake = trio.Event()
            await self._wake.wait()
