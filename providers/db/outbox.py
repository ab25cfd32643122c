"""The transactional outbox, relay side: asyncio units of work run as ``triage_relay``.

Writers insert events with their state change (:func:`enqueue_async`, in the
writer's tenant transaction); the trigger of ``0001_core.sql`` assigns ``id``
(the publish identity, ``Nats-Msg-Id``) and ``seq`` (per aggregate, from 1).
The relay crosses the bridge once per *session* with :func:`relay_session`::

    report = await bridge.run(relay_session, pool, publish, batch_size, dead_letter,
                              claimed, session_s, service="postgres")

which, in ONE transaction under ``SET LOCAL ROLE triage_relay``, relays batch
after batch while the backlog lasts and ``session_s`` has not run out: claims a
batch, starts ``publish(rows)`` (the JetStream publish of the whole batch), claims
the next batches (up to two ahead) while the acks arrive, then -- the acks in --
at once starts publishing the next batch; the acknowledged rows are marked
published by the next claim statement (one round trip per batch: ``_MARK_AND_CLAIM``), or
by a statement of their own when the batch had failures (recorded) or poison
(dead-lettered), in a savepoint. A batch is published only once every row
before it in the session was acknowledged, so a failure ends the session with
nothing of the failed aggregate sent after it. The last statement reads the lag.
:func:`relay_batch` is a session of one batch.

The row locks are held across the publishes, so no other replica publishes the
same rows meanwhile. A cancellation or a database error rolls the whole session
back: its rows stay pending and are published again later, acknowledged by the
stream as duplicates (``Nats-Msg-Id``) -- so the relay's retry horizon includes
``session_s``. A *crash* in the publish step (an exception that is neither a
database nor a provider failure, e.g. a bug one event's data triggers) commits
what the batches before it marked, then propagates: the crash concerns the
batch in flight (``claimed``), not the ones before.

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

import asyncio
import collections
import json
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import msgspec

from engine.errors import ProviderError, TriageError
from providers.db.dead_letters import DlqPublish, Redact, dead_letter_async
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
    "relay_session",
]

#: The first key of the relay's two-key advisory locks (int4 "class"): "tx" + "ob".
AGGREGATE_LOCK_CLASS = 0x74786F62

# Headers every published event carries besides Nats-Msg-Id, so that a consumer can
# check the order per aggregate without parsing the payload.
HEADER_TENANT = "Triage-Tenant"
HEADER_AGGREGATE = "Triage-Aggregate"
HEADER_SEQ = "Triage-Seq"

_AGGREGATE_KEY = "hashtext(tenant_id::text || '/' || aggregate_type || '/' || aggregate_id)"

# $2: ids this transaction claimed and has not marked yet (the session's batch in
# flight, and the ones $3 marks), left out of the window; the session's own
# aggregate locks are not "held" (they are ours).
_CLAIM_CTES = f"""held AS MATERIALIZED (
    SELECT objid::bigint AS key FROM pg_catalog.pg_locks
    WHERE locktype = 'advisory' AND classid = {AGGREGATE_LOCK_CLASS} AND objsubid = 2
      AND pid <> pg_backend_pid()
), window_rows AS MATERIALIZED (
    SELECT id, tenant_id, aggregate_type, aggregate_id FROM outbox
    WHERE published_at IS NULL AND id NOT IN (SELECT unnest($2::bigint[]))
      AND ({_AGGREGATE_KEY}::bigint & 4294967295) NOT IN (SELECT key FROM held)
    ORDER BY id LIMIT $1
), mine AS MATERIALIZED (
    SELECT tenant_id, aggregate_type, aggregate_id
    FROM (SELECT DISTINCT tenant_id, aggregate_type, aggregate_id FROM window_rows) AS aggregates
    WHERE pg_try_advisory_xact_lock({AGGREGATE_LOCK_CLASS}, {_AGGREGATE_KEY})
)"""

_CLAIM_SELECT = """
SELECT o.id, o.tenant_id::text AS tenant_id, o.aggregate_type, o.aggregate_id, o.seq, o.subject,
       o.payload::text AS payload, o.headers::text AS headers, o.attempts
FROM outbox AS o
WHERE o.id IN (SELECT w.id FROM window_rows AS w JOIN mine USING (tenant_id, aggregate_type, aggregate_id))
  AND o.published_at IS NULL
ORDER BY o.id
FOR UPDATE OF o SKIP LOCKED
"""

_CLAIM = f"WITH {_CLAIM_CTES}{_CLAIM_SELECT}"

# The session's marks of the batch before, in the round trip of the next claim. The
# claim does not see the CTE's update (one snapshot): $2 holds the marked ids too.
_MARK_AND_CLAIM = f"""WITH marked AS (
    UPDATE outbox SET published_at = clock_timestamp() WHERE id = ANY($3::bigint[]) RETURNING id
), {_CLAIM_CTES}{_CLAIM_SELECT}"""

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


class OutboxRow(msgspec.Struct, frozen=True):
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
        headers = self.headers.copy() if self.headers else {}
        headers[HEADER_TENANT] = self.tenant_id
        headers[HEADER_AGGREGATE] = f"{self.aggregate_type}/{self.aggregate_id}"
        headers[HEADER_SEQ] = str(self.seq)
        return PublishItem(str(self.id), self.subject, self.payload.encode(), headers)


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
    """What one :func:`relay_session` did. ``lag_s`` is None when nothing is pending after it.

    ``claimed`` counts the rows of the batches whose publish came back (a batch
    NATS never took, ``stopped_by``, is not counted; its rows stay as they were).
    ``more``: the session ended on a full batch (time was up, the backlog may go
    on). ``slowest_publish_s``: the longest publish of one batch, start to last
    ack; ``elapsed_s``: the whole session.
    """

    claimed: int
    published: int
    failed: int
    first_error: str | None
    lag_s: float | None
    dead_lettered: int = 0
    batches: int = 0
    more: bool = False
    stopped_by: ProviderError | None = None
    slowest_publish_s: float = 0.0
    elapsed_s: float = 0.0


class PoisonEvent(TriageError):
    """A publish result: this event can never be published as it is (dead-letter it at once)."""


#: ``publish(rows)`` -> one result per row: an Exception if that row's publish failed.
Publish: TypeAlias = Callable[[Sequence[OutboxRow]], Awaitable[Sequence[object]]]


def _headers(text: str | None) -> tuple[dict[str, str], str | None]:
    """The stored headers (a JSON object of strings) and the defect, if they are not that."""
    if not text or text == "{}":
        return {}, None
    try:
        decoded = json.loads(text)
        if not isinstance(decoded, dict):
            raise TypeError(f"headers are a JSON {type(decoded).__name__}, not an object")
        return {str(k): str(v) for k, v in decoded.items()}, None
    except (ValueError, TypeError) as exc:
        return {}, f"undecodable headers: {exc}"


def _row(record: asyncpg.Record) -> OutboxRow:
    # Columns by position, in _CLAIM's order: id, tenant_id (text), aggregate_type,
    # aggregate_id, seq, subject, payload, headers, attempts.
    headers, defect = _headers(record[7])
    return OutboxRow(
        record[0], record[1], record[2], record[3], record[4], record[5], record[6],
        headers, record[8], defect,
    )  # fmt: skip


_NONE: list[int] = []


async def claim_batch_async(
    conn: Connection, limit: int, exclude: Sequence[int] = (), mark: Sequence[int] = ()
) -> list[OutboxRow]:
    """Inside a relay transaction: lock and return up to ``limit`` publishable rows, in id order.

    ``exclude``: ids already claimed by this transaction and not marked yet.
    ``mark``: ids (claimed by this transaction, acknowledged) to mark published in
    the same statement, before the claim in effect: they are not claimed again.
    """
    if mark:
        ids = [*exclude, *mark]
        records = await conn.fetch(_MARK_AND_CLAIM, limit, ids, list(mark))
    else:
        records = await conn.fetch(_CLAIM, limit, list(exclude) if exclude else _NONE)
    return [_row(record) for record in records]


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
    redact: Redact | None = None  # row 11: payloads redacted before they are written


async def relay_batch(
    pool: Pool,
    publish: Publish,
    limit: int,
    dead_letter: DeadLetterTo | None = None,
    claimed: list[int] | None = None,
) -> BatchReport:
    """One relay unit of work (asyncio side): a :func:`relay_session` of one batch.

    An exception from ``publish`` that is not a :class:`~engine.errors.ProviderError`
    propagates, after the transaction ended (nothing of the batch is marked); a
    ProviderError (NATS unavailable) is the report's ``stopped_by``.
    """
    return await relay_session(pool, publish, limit, dead_letter, claimed, 0.0)


@dataclass(frozen=True, slots=True)
class _Crash:
    """A crash of the publish step, carried out of the session's transaction (which commits)."""

    error: Exception
    report: BatchReport  # what the batches before it did (committed)


@dataclass(slots=True)
class _Tally:
    claimed: int = 0
    published: int = 0
    failed: int = 0
    dead: int = 0
    batches: int = 0
    first_error: str | None = None
    slowest_s: float = 0.0

    def report(
        self, lag: float | None, elapsed_s: float, *, more: bool = False,
        stopped_by: ProviderError | None = None,
    ) -> BatchReport:  # fmt: skip
        return BatchReport(
            claimed=self.claimed, published=self.published, failed=self.failed,
            first_error=self.first_error, lag_s=lag, dead_lettered=self.dead,
            batches=self.batches, more=more, stopped_by=stopped_by,
            slowest_publish_s=self.slowest_s, elapsed_s=elapsed_s,
        )  # fmt: skip


async def _timed(publish: Publish, rows: Sequence[OutboxRow]) -> tuple[Sequence[object], float]:
    """``publish(rows)`` and how long it took (the loop's clock)."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    results = await publish(rows)
    return results, loop.time() - began


async def relay_session(
    pool: Pool,
    publish: Publish,
    limit: int,
    dead_letter: DeadLetterTo | None = None,
    claimed: list[int] | None = None,
    session_s: float = 0.0,
    *,
    before_crash: list[BatchReport] | None = None,
) -> BatchReport:
    """The relay's unit of work (asyncio side): batches back to back for up to ``session_s``.

    See the module docstring. With ``dead_letter``, poison rows are dead-lettered
    in the batch's own savepoint. ``claimed`` (if given) holds the ids of the
    batch being published, so that a caller can tell which rows a crash
    concerned; ``before_crash`` (if given) receives, when the publish step
    crashes, the report of what the batches before it did (committed) before the
    crash propagates. A :class:`~engine.errors.ProviderError` from ``publish`` (or
    from the DLQ publish) ends the session as the report's ``stopped_by``: what
    was marked before stays marked, that batch stays pending.
    """
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with pool.acquire() as conn, relay_transaction(conn):
        outcome = await _session(conn, publish, limit, dead_letter, claimed, began + session_s)
    if isinstance(outcome, _Crash):
        if before_crash is not None:
            before_crash.append(outcome.report)
        raise outcome.error
    return outcome


#: Batches claimed ahead of the one being published (the database works while NATS acks).
_AHEAD = 2

_Flight: TypeAlias = "asyncio.Future[tuple[Sequence[object], float]]"


async def _session(
    conn: Connection,
    publish: Publish,
    limit: int,
    dead_letter: DeadLetterTo | None,
    claimed: list[int] | None,
    deadline: float,
) -> BatchReport | _Crash:
    """The session's two pipelines: the database claims (and marks) ahead, NATS publishes in turn.

    One batch is published at a time, in claim order, and only once every ack of
    the batch before it is in without a failure. Meanwhile the connection claims
    up to ``_AHEAD`` batches ahead, each claim statement also marking the rows
    acknowledged since the last one. Only one statement runs on the connection
    at a time (``claiming``); the troubled writes and the final statements wait for it.
    """
    loop = asyncio.get_running_loop()
    began = loop.time()
    tally = _Tally()
    max_attempts = None if dead_letter is None else dead_letter.max_attempts
    ready: collections.deque[list[OutboxRow]] = collections.deque()
    unmarked: list[int] = []  # acknowledged, to be marked by the next statement
    flying: list[OutboxRow] = []
    flight: _Flight | None = None
    claiming: asyncio.Future[list[OutboxRow]] | None = None
    exhausted = False  # a claim came back short: the backlog is drained

    def claim() -> asyncio.Future[list[OutboxRow]]:
        nonlocal unmarked
        exclude = [row.id for row in flying]
        for batch in ready:
            exclude.extend(row.id for row in batch)
        marks, unmarked = unmarked, []
        return asyncio.ensure_future(claim_batch_async(conn, limit, exclude, marks))

    async def settled() -> None:
        """Let the running claim finish: the connection is free after this."""
        nonlocal claiming, exhausted
        if claiming is not None:
            batch = await claiming
            claiming = None
            exhausted = exhausted or len(batch) < limit
            if batch:
                ready.append(batch)

    async def finish(
        *, stopped_by: ProviderError | None = None, failed: bool = False
    ) -> BatchReport:
        await settled()
        lag = await _mark_and_age(conn, unmarked)
        more = not exhausted and not failed and stopped_by is None
        return tally.report(lag, loop.time() - began, more=more, stopped_by=stopped_by)

    async def crashed(error: Exception) -> _Crash:
        await settled()
        if unmarked:
            await mark_published_async(conn, unmarked)
        return _Crash(error, tally.report(None, loop.time() - began))

    first = await claim_batch_async(conn, limit)
    if not first:
        return tally.report(await pending_age_async(conn), loop.time() - began)
    exhausted = len(first) < limit
    ready.append(first)
    try:
        while True:
            if flight is None and ready:
                flying = ready.popleft()
                if claimed is not None:
                    claimed[:] = [row.id for row in flying]
                flight = asyncio.ensure_future(_timed(publish, flying))
            if (
                claiming is None and not exhausted and len(ready) < _AHEAD
                and loop.time() < deadline
            ):  # fmt: skip
                claiming = claim()
            if flight is None:
                if claiming is None:
                    return await finish()  # nothing out, nothing more to claim
                await settled()  # the batches went faster than the claims
                continue
            waiting: list[asyncio.Future[Any]] = [flight]
            if claiming is not None:
                waiting.append(claiming)
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if claiming is not None and claiming.done():
                await settled()
            if not flight.done():
                continue
            rows, done, flight = flying, flight, None
            try:
                results, took = done.result()
                published, failures, poison = _triage(rows, results, max_attempts=max_attempts)
            except ProviderError as exc:  # NATS did not take the batch: it stays pending
                return await finish(stopped_by=exc)
            except Exception as exc:  # a crash: what the batches before did is kept
                return await crashed(exc)
            tally.batches += 1
            tally.claimed += len(rows)
            tally.slowest_s = max(tally.slowest_s, took)
            if not (failures or poison):
                unmarked.extend(published)
                tally.published += len(published)
                continue
            await settled()
            try:
                dead = await _write_troubled(conn, published, failures, poison, dead_letter)
            except ProviderError as exc:  # the DLQ publish: this batch's writes are undone
                return await finish(stopped_by=exc)
            except Exception as exc:  # undone too (a savepoint); the batches before are kept
                return await crashed(exc)
            tally.published += len(published)
            tally.failed += len(failures)
            tally.dead += dead
            if failures:  # nothing of a failed aggregate goes out after it
                if tally.first_error is None:
                    tally.first_error = failures[0][1]
                return await finish(failed=True)
    finally:
        # Cancelled or failed: stop both, and wait for them -- the transaction's
        # ROLLBACK must not meet a claim still running on the connection.
        running = [t for t in (flight, claiming) if t is not None and not t.done()]
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running)


async def _write_troubled(
    conn: Connection,
    published: Sequence[int],
    failures: Sequence[tuple[int, str]],
    poison: Sequence[tuple[int, str]],
    dead_letter: DeadLetterTo | None,
) -> int:
    """A batch's writes when some rows failed or are poison, in a savepoint: all or none."""
    async with conn.transaction():
        await record_failures_async(conn, failures)
        dead = 0
        if dead_letter is not None and poison:
            dead = await dead_letter_async(
                conn, poison, dead_letter.publish, dead_letter.subject, dead_letter.max_payload,
                dead_letter.redact,
            )  # fmt: skip
        await mark_published_async(conn, published)
    return dead


async def _mark_and_age(conn: Connection, published: Sequence[int]) -> float | None:
    """Mark ``published`` and read the lag in one round trip."""
    record = await conn.fetchrow(_MARK_AND_AGE, list(published))
    assert record is not None
    return None if record["age"] is None else max(0.0, float(record["age"]))


_LOCK_ONE = "SELECT id FROM outbox WHERE id = $1 AND published_at IS NULL FOR UPDATE SKIP LOCKED"


async def quarantine_async(pool: Pool, outbox_id: int, error: str, to: DeadLetterTo) -> bool:
    """Unit of work (asyncio side): dead-letter one pending row (e.g. one that crashed the relay).

    False if the row is gone, published, or locked by another relay.
    """
    async with pool.acquire() as conn, relay_transaction(conn):
        if await conn.fetchval(_LOCK_ONE, outbox_id) is None:
            return False
        await dead_letter_async(
            conn, [(outbox_id, error)], to.publish, to.subject, to.max_payload, to.redact
        )
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
