"""The transactional outbox, relay side: asyncio units of work run as ``triage_relay``.

Writers insert events with their state change (:func:`enqueue_async`, in the
writer's tenant transaction); the trigger of ``0001_core.sql`` assigns ``id``
(the publish identity, ``Nats-Msg-Id``) and ``seq`` (per aggregate, from 1).
The relay crosses the bridge once per batch with :func:`relay_batch`::

    report = await bridge.run(relay_batch, pool, publish, batch_size, service="postgres")

which, in ONE transaction under ``SET LOCAL ROLE triage_relay``: claims a batch,
awaits ``publish(rows)`` (the JetStream publish of the whole batch), marks the
acknowledged rows published, records the failures, and reads the lag. The row
locks are held across the publish, so no other replica publishes the same rows
meanwhile; a cancellation or an error rolls everything back and the rows stay.

Order per aggregate across replicas (the choice made here)
    The claim takes, in id order, unpublished rows ``FOR UPDATE SKIP LOCKED``
    *and only of aggregates whose transaction-scoped advisory lock it obtains*
    (``pg_try_advisory_xact_lock(class, hashtext(tenant/type/id))``). The lock is
    tried only for the distinct aggregates of the oldest ``batch`` pending rows
    whose aggregate no other transaction holds (read from ``pg_locks``), a set
    materialised first: a lock function in a plain WHERE would be tried on every
    row the planner scans and hold aggregates the batch never takes. The batch is
    the rows of that window whose aggregate it locked: for each aggregate, a
    prefix of its pending rows (the window is in id order). A replica
    therefore owns whole aggregates for the length of its transaction: another
    replica skips every row of them, including rows committed after the claim,
    which it would otherwise publish ahead of the earlier ones still in flight.
    Within an aggregate, seq order = id order = commit order (the trigger
    serialises writers on the aggregate's counter row), so the visible rows of an
    aggregate are always a prefix and SKIP LOCKED never skips a middle row. A hash
    collision only makes two aggregates share a lock (less parallelism, same
    order). The alternative, claiming only the lowest unpublished seq of each
    aggregate, would publish one event per aggregate per batch.

    After the publish, a row is marked published only if it and every earlier
    row of its aggregate in the batch were acknowledged; after a failure the rest
    of that aggregate stays unpublished and is sent again (in order) by a later
    batch -- if it was stored anyway, the duplicate window acknowledges it as a
    duplicate. Each failed row gets ``attempts + 1`` and ``last_error``.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from engine.errors import TriageError
from providers.db.dead_letters import DlqPublish, dead_letter_async
from providers.db.tenancy import relay_transaction, tenant_transaction
from providers.jetstream import PublishItem

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "AGGREGATE_LOCK_CLASS",
    "BatchReport",
    "DeadLetterTo",
    "NewEvent",
    "OutboxRow",
    "PoisonEvent",
    "Publish",
    "claim_batch_async",
    "enqueue_async",
    "mark_published_async",
    "pending_age_async",
    "pending_age_s",
    "quarantine_async",
    "record_failures_async",
    "relay_batch",
]

#: The first key of the relay's two-key advisory locks (int4 "class"): "tx" + "ob".
AGGREGATE_LOCK_CLASS = 0x74786F62

# Headers every published event carries besides Nats-Msg-Id, so that a consumer can
# check the order per aggregate without parsing the payload.
HEADER_TENANT = "Triage-Tenant"
HEADER_AGGREGATE = "Triage-Aggregate"
HEADER_SEQ = "Triage-Seq"

_AGGREGATE_KEY = "hashtext(tenant_id::text || '/' || aggregate_type || '/' || aggregate_id)"

_CLAIM = f"""
WITH held AS MATERIALIZED (
    SELECT objid::bigint AS key FROM pg_catalog.pg_locks
    WHERE locktype = 'advisory' AND classid = {AGGREGATE_LOCK_CLASS} AND objsubid = 2
), window_rows AS MATERIALIZED (
    SELECT id, tenant_id, aggregate_type, aggregate_id FROM outbox
    WHERE published_at IS NULL
      AND ({_AGGREGATE_KEY}::bigint & 4294967295) NOT IN (SELECT key FROM held)
    ORDER BY id LIMIT $1
), mine AS MATERIALIZED (
    SELECT tenant_id, aggregate_type, aggregate_id
    FROM (SELECT DISTINCT tenant_id, aggregate_type, aggregate_id FROM window_rows) AS aggregates
    WHERE pg_try_advisory_xact_lock({AGGREGATE_LOCK_CLASS}, {_AGGREGATE_KEY})
)
SELECT o.id, o.tenant_id, o.aggregate_type, o.aggregate_id, o.seq, o.subject,
       o.payload::text AS payload, o.headers::text AS headers, o.attempts
FROM outbox AS o
WHERE o.id IN (SELECT w.id FROM window_rows AS w JOIN mine USING (tenant_id, aggregate_type, aggregate_id))
  AND o.published_at IS NULL
ORDER BY o.id
FOR UPDATE OF o SKIP LOCKED
"""

_MARK = "UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY($1::bigint[])"

# Mark and read the lag in one round trip: the main query does not see the CTE's
# update, so it leaves the marked ids out itself.
_MARK_AND_AGE = """
WITH marked AS (
    UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY($1::bigint[]) RETURNING id
)
SELECT (SELECT count(*) FROM marked) AS marked,
       (SELECT extract(epoch FROM clock_timestamp() - min(created_at))::float8
        FROM (SELECT created_at FROM outbox
              WHERE published_at IS NULL AND id <> ALL($1::bigint[])
              ORDER BY id LIMIT 100) AS p) AS age
"""

_FAIL = """
UPDATE outbox AS o SET attempts = o.attempts + 1, last_error = f.error
FROM unnest($1::bigint[], $2::text[]) AS f(id, error)
WHERE o.id = f.id
"""

# The age of the oldest pending row: among the lowest ids (ids follow insert order,
# created_at is the writer's transaction start), so the partial index answers it.
_AGE = """
SELECT extract(epoch FROM clock_timestamp() - min(created_at))::float8
FROM (SELECT created_at FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 100) AS p
"""

_INSERT = """
INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject, payload, headers)
VALUES ($1, $2, $3, 1, $4, $5::jsonb, $6::jsonb)
RETURNING id, seq
"""


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A claimed event. ``payload`` is the JSON text the stream receives."""

    id: int
    tenant_id: str
    aggregate_type: str
    aggregate_id: str
    seq: int
    subject: str
    payload: str
    headers: dict[str, str]
    attempts: int
    defect: str | None = None  # why the stored row cannot become a message (schema drift)

    @property
    def aggregate(self) -> tuple[str, str, str]:
        return (self.tenant_id, self.aggregate_type, self.aggregate_id)

    def to_item(self) -> PublishItem:
        """The JetStream message: ``Nats-Msg-Id`` is the outbox id."""
        headers = {
            **self.headers,
            HEADER_TENANT: self.tenant_id,
            HEADER_AGGREGATE: f"{self.aggregate_type}/{self.aggregate_id}",
            HEADER_SEQ: str(self.seq),
        }
        return PublishItem(
            msg_id=str(self.id),
            subject=self.subject,
            payload=self.payload.encode(),
            headers=headers,
        )


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to write to the outbox (seq and id are assigned by the trigger)."""

    aggregate_type: str
    aggregate_id: str
    subject: str
    payload: Any
    headers: dict[str, str] | None = None


@dataclass(frozen=True, slots=True)
class BatchReport:
    """What one :func:`relay_batch` did. ``lag_s`` is None when nothing is pending after it."""

    claimed: int
    published: int
    failed: int
    first_error: str | None
    lag_s: float | None
    dead_lettered: int = 0


class PoisonEvent(TriageError):
    """A publish result: this event can never be published as it is (dead-letter it at once)."""


#: ``publish(rows)`` -> one result per row: an Exception if that row's publish failed.
Publish: TypeAlias = Callable[[Sequence[OutboxRow]], Awaitable[Sequence[object]]]


def _row(record: asyncpg.Record) -> OutboxRow:
    defect: str | None = None
    headers: dict[str, str] = {}
    try:
        decoded = json.loads(record["headers"]) if record["headers"] else {}
        if not isinstance(decoded, dict):
            raise TypeError(f"headers are a JSON {type(decoded).__name__}, not an object")
        headers = {str(k): str(v) for k, v in decoded.items()}
    except (ValueError, TypeError) as exc:
        defect = f"undecodable headers: {exc}"
    return OutboxRow(
        id=int(record["id"]),
        tenant_id=str(record["tenant_id"]),
        aggregate_type=record["aggregate_type"],
        aggregate_id=record["aggregate_id"],
        seq=int(record["seq"]),
        subject=record["subject"],
        payload=record["payload"],
        headers=headers,
        attempts=int(record["attempts"]),
        defect=defect,
    )


async def claim_batch_async(conn: Connection, limit: int) -> list[OutboxRow]:
    """Inside a relay transaction: lock and return up to ``limit`` publishable rows, in id order."""
    return [_row(record) for record in await conn.fetch(_CLAIM, limit)]


async def mark_published_async(conn: Connection, ids: Sequence[int]) -> None:
    """Inside a relay transaction: set ``published_at`` on ``ids``."""
    if ids:
        await conn.execute(_MARK, list(ids))


async def record_failures_async(conn: Connection, failures: Sequence[tuple[int, str]]) -> None:
    """Inside a relay transaction: ``attempts + 1`` and ``last_error`` for each ``(id, error)``."""
    if failures:
        await conn.execute(_FAIL, [i for i, _ in failures], [e[:2000] for _, e in failures])


async def pending_age_async(conn: Connection) -> float | None:
    """Inside a relay transaction: seconds since the oldest pending row was written (None: none)."""
    age = await conn.fetchval(_AGE)
    return None if age is None else max(0.0, float(age))


def _settle(
    rows: Sequence[OutboxRow], results: Sequence[object]
) -> tuple[list[int], list[tuple[int, str]]]:
    """The ids to mark published (per-aggregate prefixes of acks) and the failures."""
    published, failures, _ = _triage(rows, results, max_attempts=None)
    return published, failures


def _triage(
    rows: Sequence[OutboxRow], results: Sequence[object], *, max_attempts: int | None
) -> tuple[list[int], list[tuple[int, str]], list[tuple[int, str]]]:
    """Published ids, retryable failures and poison rows (only when ``max_attempts`` is given).

    A poison row (a :class:`PoisonEvent` result, or a failure that is the row's
    ``max_attempts``-th) leaves the outbox, so it does not break its aggregate's prefix.
    """
    if len(results) != len(rows):
        raise ValueError(f"publish returned {len(results)} results for {len(rows)} rows")
    published: list[int] = []
    failures: list[tuple[int, str]] = []
    poison: list[tuple[int, str]] = []
    broken: set[tuple[str, str, str]] = set()
    for row, result in zip(rows, results, strict=True):
        if isinstance(result, BaseException):
            error = f"{type(result).__name__}: {result}"
            if max_attempts is not None and (
                isinstance(result, PoisonEvent) or row.attempts + 1 >= max_attempts
            ):
                poison.append((row.id, error))
            else:
                failures.append((row.id, error))
                broken.add(row.aggregate)
        elif row.aggregate not in broken:
            published.append(row.id)
    return published, failures, poison


@dataclass(frozen=True, slots=True)
class DeadLetterTo:
    """Where :func:`relay_batch` sends poison rows: the DLQ publish, its subject, the size cap."""

    publish: DlqPublish
    subject: str
    max_payload: int
    max_attempts: int


async def relay_batch(
    pool: Pool,
    publish: Publish,
    limit: int,
    dead_letter: DeadLetterTo | None = None,
    claimed: list[int] | None = None,
) -> BatchReport:
    """One relay unit of work (asyncio side): claim, publish, mark, record, read the lag.

    An exception from ``publish`` (e.g. NATS unavailable) rolls the transaction
    back: nothing is marked, the rows stay pending, and the exception propagates.
    With ``dead_letter``, poison rows are dead-lettered in the same transaction
    (see the module docstring). ``claimed`` (if given) receives the claimed ids
    before the publish, so that a caller can tell which rows a crash concerned.
    """
    async with pool.acquire() as conn, relay_transaction(conn):
        rows = await claim_batch_async(conn, limit)
        if claimed is not None:
            claimed[:] = [row.id for row in rows]
        if not rows:
            return BatchReport(
                claimed=0, published=0, failed=0, first_error=None,
                lag_s=await pending_age_async(conn),
            )  # fmt: skip
        results = await publish(rows)
        max_attempts = None if dead_letter is None else dead_letter.max_attempts
        published, failures, poison = _triage(rows, results, max_attempts=max_attempts)
        await record_failures_async(conn, failures)
        dead = 0
        if dead_letter is not None and poison:
            dead = await dead_letter_async(
                conn, poison, dead_letter.publish, dead_letter.subject, dead_letter.max_payload
            )
        record = await conn.fetchrow(_MARK_AND_AGE, published)
        assert record is not None
        lag = None if record["age"] is None else max(0.0, float(record["age"]))
    return BatchReport(
        claimed=len(rows),
        published=len(published),
        failed=len(failures),
        first_error=failures[0][1] if failures else None,
        lag_s=lag,
        dead_lettered=dead,
    )


_LOCK_ONE = "SELECT id FROM outbox WHERE id = $1 AND published_at IS NULL FOR UPDATE SKIP LOCKED"


async def quarantine_async(pool: Pool, outbox_id: int, error: str, to: DeadLetterTo) -> bool:
    """Unit of work (asyncio side): dead-letter one pending row (e.g. one that crashed the relay).

    False if the row is gone, published, or locked by another relay.
    """
    async with pool.acquire() as conn, relay_transaction(conn):
        if await conn.fetchval(_LOCK_ONE, outbox_id) is None:
            return False
        await dead_letter_async(conn, [(outbox_id, error)], to.publish, to.subject, to.max_payload)
        return True


async def pending_age_s(pool: Pool) -> float | None:
    """Unit of work (asyncio side): the outbox lag, read as the relay role."""
    async with pool.acquire() as conn, relay_transaction(conn):
        return await pending_age_async(conn)


async def enqueue_async(
    pool: Pool, tenant_id: uuid.UUID | str, events: Iterable[NewEvent]
) -> list[tuple[int, int]]:
    """Unit of work (asyncio side): write ``events`` in one tenant transaction; their (id, seq)."""
    out: list[tuple[int, int]] = []
    async with pool.acquire() as conn, tenant_transaction(conn, tenant_id):
        for event in events:
            record = await conn.fetchrow(
                _INSERT,
                uuid.UUID(str(tenant_id)),
                event.aggregate_type,
                event.aggregate_id,
                event.subject,
                json.dumps(event.payload),
                json.dumps(event.headers or {}),
            )
            assert record is not None
            out.append((int(record["id"]), int(record["seq"])))
    return out
