"""Dispatch rows and their status machine: asyncio units of work, one bridge crossing each.

Every function taking a ``pool`` is one unit of work for
:meth:`~providers.db.pool.DbPool.run_unit` (``await db.run_unit(accept_async, req)``):
it acquires a connection, opens one transaction and runs its statements on the
asyncio side. Every status change writes its outbox event in the same
transaction, subject ``triage.events.dispatch.<status>``, aggregate
``("dispatch", id)``, and a payload without PHI (never the recipient, the body
or the data)::

    id, tenant, channel, category, template, status, reason, provider,
    provider_ref, possible_duplicate

The status machine itself is the database's (``dispatches_guard`` in
``0001_core.sql``); the statements here only ever ask for an allowed move, so a
duplicate or an out-of-order receipt changes nothing and is *counted*, never raised.

:func:`accept_batch_async` is the hot path: ONE statement for a whole batch of
requests (``accept_dispatches``, migration 0005; the group commit of
:mod:`actors.group_commit` fills the batches), each request under its own
tenant and in its own subtransaction: the idempotency row (a key already there
changes nothing), the dispatch row (``queued``) and its outbox event, the
category's block state and whether the recipient is dead. A disabled category
or a dead recipient ends the new row at once (``failed`` / ``undeliverable``)
with its second event: nothing is sent. :func:`accept_async` is the same
statement for one request in a tenant transaction (with a refusal or notices).

Dead recipients and category blocks are :mod:`providers.db.categories`' (one
implementation each); the accept statement only reads them, inline.

Cross-tenant work
    The system sweeps run as ``triage_relay``, which ``0003_channels`` and
    ``0004_claims`` grant SELECT of the non-PHI columns of *queued* and *dispatched*
    rows, the claim column (``claimed_until``) and the move to ``unknown``, never a
    recipient or a payload: :func:`mark_stale_unknown_async` (row 2),
    :func:`claim_unsettled_async` / :func:`mark_unknown_async` (the SMS/email status
    sweep) and the claim half of :func:`claim_backlog_async` (the crash backlog), whose
    read half then runs under each claimed row's tenant. A claim is set by the
    statement that locks the rows (``FOR UPDATE SKIP LOCKED``): two replicas never
    take one row.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import asyncpg
import msgspec

from engine.errors import TriageError
from providers.channel import DeliveryState, Receipt
from providers.db.categories import BlockState, mark_dead_in
from providers.db.tenancy import (
    relay_transaction,
    run_as_relay,
    run_in_tenant,
    switch_tenant,
    tenant_transaction,
)

if TYPE_CHECKING:
    from providers.db.tenancy import Connection

    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "AGGREGATE",
    "MAX_TEMPLATE_VERSION",
    "OPS_NOTICE_SUBJECT",
    "STALE_REASON",
    "SUBJECT_PREFIX",
    "AcceptRequest",
    "AcceptResult",
    "BacklogClaim",
    "CategoryState",
    "DeadRecipient",
    "DispatchStatus",
    "OutcomeRecord",
    "QueuedDispatch",
    "ReceiptOutcome",
    "ReceiptReport",
    "ReceiptResult",
    "Transition",
    "TransitionOutcome",
    "TransitionResult",
    "UnknownTenant",
    "Unsettled",
    "UnstorableValue",
    "accept_async",
    "accept_batch_async",
    "apply_receipt_batch_async",
    "apply_receipts_async",
    "claim_backlog_async",
    "claim_unsettled_async",
    "event_subject",
    "mark_stale_unknown_async",
    "mark_unknown_async",
    "ops_notice_async",
    "record_outcome_async",
    "record_outcomes_async",
    "release_claims_async",
    "transition_async",
]

AGGREGATE = "dispatch"
SUBJECT_PREFIX = "triage.events.dispatch."
OPS_NOTICE_SUBJECT = "triage.events.ops.notice"
STALE_REASON = "feedback_stale"
#: ``dispatches.template_version`` and ``templates.version`` are PostgreSQL ``integer``s:
#: a fact of the schema (not a tunable), checked at the door so the database never sees more.
MAX_TEMPLATE_VERSION: Final = 2**31 - 1


class UnknownTenant(TriageError):
    """The tenant id is well formed but names no tenant (the rows' foreign key refused it)."""

    def __init__(self, tenant_id: str) -> None:
        super().__init__(f"no tenant {tenant_id}")
        self.tenant_id = tenant_id


class UnstorableValue(TriageError):
    """PostgreSQL refused a value of the request (out of range, a NUL byte, ...): nothing
    was written. The door's validation should have caught it; this is the backstop."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"a value cannot be stored: {problem}")
        self.problem = problem


class DispatchStatus(enum.StrEnum):
    QUEUED = "queued"
    DISPATCHED = "dispatched"
    DELIVERED = "delivered"
    FAILED = "failed"
    UNDELIVERABLE = "undeliverable"
    UNKNOWN = "unknown"


CategoryState = BlockState
"""A category's block (``throttled`` / ``disabled``): the one enum of
:mod:`providers.db.categories`, under the name this module's results use."""


def event_subject(status: DispatchStatus | str) -> str:
    return f"{SUBJECT_PREFIX}{status}"


# The event payload (no PHI) is built in SQL: ``dispatch_event_payload`` (migration 0005).


# -- accept ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AcceptRequest:
    """A validated, rendered dispatch ready to be stored ``queued``.

    ``dispatch_id`` is made by the caller (so a cache entry can name it before the
    row exists); ``request_hash`` identifies the request body for the idempotency key.
    """

    dispatch_id: uuid.UUID
    tenant_id: str
    idempotency_key: str
    request_hash: str
    channel: str
    template: str
    template_version: int | None
    category: str
    recipient: str
    body: str
    subject: str | None
    data: dict[str, str]
    key_ttl_s: float


@dataclass(frozen=True, slots=True)
class AcceptResult:
    """What :func:`accept_async` did.

    ``created``: this call wrote the row. Otherwise ``dispatch_id`` is the existing
    dispatch for the key and ``same_request`` says whether its request hash matches
    (False: an idempotency conflict). ``status`` is the row's status after the call.
    ``category_state`` is the category's block (THROTTLED matters to the caller: the
    row stays queued and the sender must pace it).
    """

    dispatch_id: uuid.UUID | None
    created: bool
    same_request: bool
    status: DispatchStatus | None
    category_state: CategoryState | None = None
    reason: str | None = None


# One statement for a whole batch: ``accept_dispatches`` (migration 0005) stores each
# item under its own tenant (row-level security judges each), in its own
# subtransaction, and answers one row per item in order.
_ACCEPT_BATCH = "SELECT * FROM accept_dispatches($1::jsonb)"

_ENCODER = msgspec.json.Encoder()


def _item(req: AcceptRequest, refuse: tuple[DispatchStatus, str] | None) -> dict[str, Any]:
    return {
        "tenant": req.tenant_id,
        "id": str(req.dispatch_id),
        "key": req.idempotency_key,
        "hash": req.request_hash,
        "ttl_s": req.key_ttl_s,
        "channel": req.channel,
        "template": req.template,
        "version": req.template_version,
        "category": req.category,
        "recipient": req.recipient,
        "payload": {"body": req.body, "subject": req.subject, "data": req.data},
        "refuse_status": str(refuse[0]) if refuse is not None else None,
        "refuse_reason": refuse[1] if refuse is not None else None,
    }


def _accepted(req: AcceptRequest, row: asyncpg.Record) -> AcceptResult | TriageError:
    """The item's result, or the error that refused it (nothing was written for it)."""
    error = row["error"]
    if error == "foreign_key":
        if (row["detail"] or "").endswith("_tenant_id_fkey"):
            return UnknownTenant(req.tenant_id)
        raise RuntimeError(f"accept of {req.dispatch_id}: foreign key {row['detail']}")
    if error == "unstorable":
        return UnstorableValue(row["detail"])
    block = CategoryState(row["block"]) if row["block"] is not None else None
    if not row["created"]:
        old_status = row["old_status"]
        return AcceptResult(
            dispatch_id=row["old_id"],
            created=False,
            same_request=row["old_hash"] == req.request_hash,
            status=DispatchStatus(old_status) if old_status is not None else None,
            category_state=block,
        )
    return AcceptResult(
        req.dispatch_id, True, True, DispatchStatus(row["status"]), block, row["reason"]
    )


async def accept_batch_async(
    pool: Pool, reqs: Sequence[AcceptRequest]
) -> list[AcceptResult | TriageError]:
    """Unit of work: store every request of ``reqs`` as :func:`accept_async` does, in ONE
    statement (one round trip, one transaction; each request judged under its own tenant
    and in its own subtransaction). One result per request, in order: its
    :class:`AcceptResult`, or the :class:`UnknownTenant` / :class:`UnstorableValue` that
    refused it alone. The group commit of :mod:`actors.group_commit` calls it."""
    if not reqs:
        return []
    async with pool.acquire() as conn:
        return await _accept_batch(conn, reqs)


async def _accept_batch(
    conn: Connection, reqs: Sequence[AcceptRequest]
) -> list[AcceptResult | TriageError]:
    payload = _ENCODER.encode([_item(req, None) for req in reqs]).decode()
    try:
        rows = await conn.fetch(_ACCEPT_BATCH, payload)
    except asyncpg.DataError as exc:  # the batch's JSON refused (a NUL): each alone
        if len(reqs) == 1:
            return [UnstorableValue(str(exc))]
        return [item for req in reqs for item in await _accept_batch(conn, [req])]
    return [_accepted(req, row) for req, row in zip(reqs, rows, strict=True)]


async def accept_async(
    pool: Pool,
    req: AcceptRequest,
    refuse: tuple[DispatchStatus, str] | None = None,
    notices: Sequence[dict[str, Any]] = (),
) -> AcceptResult:
    """Unit of work: store ``req`` as ``queued`` (idempotently), in one tenant transaction.

    ``refuse`` = ``(FAILED | UNDELIVERABLE, reason)`` stores the new row and ends it at
    once (template missing, PHI guard): both events are written, nothing is sent.
    ``notices`` are internal-ops notice payloads written (``triage.events.ops.notice``)
    in the same transaction when the row is new.

    Raises :class:`UnknownTenant` when no tenant has ``req.tenant_id`` and
    :class:`UnstorableValue` when PostgreSQL refuses a value; nothing is written then.
    """
    payload = _ENCODER.encode([_item(req, refuse)]).decode()
    async with pool.acquire() as conn, tenant_transaction(conn, req.tenant_id):
        try:
            rows = await conn.fetch(_ACCEPT_BATCH, payload)
        except asyncpg.DataError as exc:
            raise UnstorableValue(str(exc)) from exc
        result = _accepted(req, rows[0])
        if isinstance(result, TriageError):
            raise result
        if result.created:
            for notice in notices:
                await _notice(conn, req.tenant_id, notice)
        return result


# -- transitions ------------------------------------------------------------------------

# One implementation of a status change and its event: ``dispatch_transition``
# (migration 0005), also what ``record_transitions`` runs per step of a batch.
_TRANSITION = "SELECT old, moved FROM dispatch_transition($1::uuid, $2, $3, $4, $5, $6)"
_RECORD_BATCH = "SELECT item, step, old, moved FROM record_transitions($1::jsonb)"


class TransitionOutcome(enum.StrEnum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"  # already in that status: a no-op
    OUT_OF_ORDER = "out_of_order"  # the machine does not allow the move: a no-op
    UNKNOWN_DISPATCH = "unknown_dispatch"  # no such dispatch for this tenant


@dataclass(frozen=True, slots=True)
class TransitionResult:
    outcome: TransitionOutcome
    old_status: DispatchStatus | None


async def _transition(
    conn: Connection,
    dispatch_id: uuid.UUID,
    status: DispatchStatus,
    reason: str | None,
    provider: str | None,
    provider_ref: str | None,
    possible_duplicate: bool,
) -> TransitionResult:
    row = await conn.fetchrow(
        _TRANSITION, dispatch_id, str(status), reason, provider, provider_ref, possible_duplicate
    )
    return _judged(row, status)


def _judged(row: asyncpg.Record | None, status: DispatchStatus) -> TransitionResult:
    if row is None:
        return TransitionResult(TransitionOutcome.UNKNOWN_DISPATCH, None)
    old = DispatchStatus(row["old"])
    if row["moved"]:
        return TransitionResult(TransitionOutcome.APPLIED, old)
    if old is status:
        return TransitionResult(TransitionOutcome.DUPLICATE, old)
    return TransitionResult(TransitionOutcome.OUT_OF_ORDER, old)


@dataclass(frozen=True, slots=True)
class Transition:
    """One status change to write (see :func:`transition_async`)."""

    dispatch_id: uuid.UUID
    status: DispatchStatus
    reason: str | None = None
    provider: str | None = None
    provider_ref: str | None = None
    possible_duplicate: bool = False


async def _transitions(conn: Connection, steps: Sequence[Transition]) -> list[TransitionResult]:
    out = []
    for s in steps:
        out.append(
            await _transition(
                conn,
                s.dispatch_id,
                s.status,
                s.reason,
                s.provider,
                s.provider_ref,
                s.possible_duplicate,
            )
        )
    return out


async def transition_async(
    pool: Pool, tenant_id: str | uuid.UUID, steps: Sequence[Transition]
) -> list[TransitionResult]:
    """Unit of work: apply ``steps`` in order in one tenant transaction (e.g. dispatched
    then unknown). ``failed``/``undeliverable``/``unknown`` need a ``reason``;
    ``dispatched`` sets ``dispatched_at``; ``possible_duplicate`` is sticky."""
    for step in steps:
        if step.status in _NEEDS_REASON and not step.reason:
            raise ValueError(f"a {step.status} dispatch needs a reason")
    return await run_in_tenant(pool, tenant_id, _transitions, steps)


_NEEDS_REASON = frozenset(
    {DispatchStatus.FAILED, DispatchStatus.UNDELIVERABLE, DispatchStatus.UNKNOWN}
)


# -- receipts ---------------------------------------------------------------------------

_RECEIPT_STATUS = {
    DeliveryState.DELIVERED: DispatchStatus.DELIVERED,
    DeliveryState.FAILED: DispatchStatus.FAILED,
    DeliveryState.UNDELIVERABLE: DispatchStatus.UNDELIVERABLE,
}

# One statement for a whole batch: ``apply_receipts`` (migration 0009) resolves each
# receipt's dispatch under its own tenant (row-level security judges each), then
# applies them in dispatch-id order (one lock order for every batch) and keeps those
# that overtook their send in ``early_receipts``.
_RECEIPT_BATCH = "SELECT item, dispatch_id, old, moved, early FROM apply_receipts($1::jsonb)"


class ReceiptOutcome(enum.StrEnum):
    """What became of one receipt (:func:`apply_receipt_batch_async`)."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"  # the dispatch already had that status (or the batch said it)
    OUT_OF_ORDER = "out_of_order"  # a move the machine refuses (e.g. delivered after failed)
    UNKNOWN = "unknown"  # no such dispatch (or no tenant / malformed reference)
    IGNORED = "ignored"  # a state that moves nothing (accepted, not_found)
    EARLY = "early"  # the dispatch is still queued: kept, applied at its send


@dataclass(frozen=True, slots=True)
class ReceiptResult:
    """One receipt's outcome and the dispatch it named (None: none found)."""

    outcome: ReceiptOutcome
    dispatch_id: uuid.UUID | None = None


@dataclass(slots=True)
class ReceiptReport:
    """What :func:`apply_receipts_async` did with a batch (every receipt counted once)."""

    applied: int = 0
    duplicates: int = 0  # the dispatch already had that status
    out_of_order: int = 0  # a move the machine refuses (e.g. delivered after failed)
    unknown: int = 0  # no such dispatch (or no tenant / malformed reference)
    ignored: int = 0  # states that move nothing (accepted, not_found)
    early: int = 0  # arrived while the dispatch was still queued: kept, applied at its send
    applied_ids: list[uuid.UUID] = field(default_factory=list)

    def count(self, result: ReceiptResult) -> None:
        match result.outcome:
            case ReceiptOutcome.APPLIED:
                self.applied += 1
                if result.dispatch_id is not None:
                    self.applied_ids.append(result.dispatch_id)
            case ReceiptOutcome.DUPLICATE:
                self.duplicates += 1
            case ReceiptOutcome.OUT_OF_ORDER:
                self.out_of_order += 1
            case ReceiptOutcome.UNKNOWN:
                self.unknown += 1
            case ReceiptOutcome.IGNORED:
                self.ignored += 1
            case ReceiptOutcome.EARLY:
                self.early += 1


def _uuid(text: str | None) -> uuid.UUID | None:
    if text is None:
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


_EARLY_TAKE = """
DELETE FROM early_receipts WHERE dispatch_id = $1
RETURNING state, reason, provider, provider_ref, received_at
"""


async def _apply_early(conn: Connection, dispatch_id: uuid.UUID) -> list[TransitionResult]:
    """Receipts that arrived while ``dispatch_id`` was still queued, now that it left
    ``queued``: applied in the order they came (the status machine keeps the first final)."""
    rows = await conn.fetch(_EARLY_TAKE, dispatch_id)
    out = []
    for row in sorted(rows, key=lambda r: r["received_at"]):
        status = DispatchStatus(row["state"])
        out.append(await _transition(conn, dispatch_id, status, row["reason"], None, None, False))
    return out


_IGNORED: Final = ReceiptResult(ReceiptOutcome.IGNORED)
_UNKNOWN: Final = ReceiptResult(ReceiptOutcome.UNKNOWN)
_DUPLICATE: Final = ReceiptResult(ReceiptOutcome.DUPLICATE)


def _receipt_item(receipt: Receipt, tenant: uuid.UUID, status: DispatchStatus) -> dict[str, Any]:
    reason = None if status is DispatchStatus.DELIVERED else (receipt.reason or str(status))
    dispatch_id = _uuid(receipt.client_ref)
    return {
        "tenant": str(tenant),
        "id": str(dispatch_id) if dispatch_id is not None else None,
        "provider": receipt.provider,
        "provider_ref": receipt.provider_ref,
        "status": str(status),
        "reason": reason,
    }


def _receipt_judged(row: asyncpg.Record, status: DispatchStatus) -> ReceiptResult:
    dispatch_id = row["dispatch_id"]
    if dispatch_id is None:
        return _UNKNOWN
    if row["early"]:
        return ReceiptResult(ReceiptOutcome.EARLY, dispatch_id)
    if row["moved"]:
        return ReceiptResult(ReceiptOutcome.APPLIED, dispatch_id)
    if row["old"] == status:
        return ReceiptResult(ReceiptOutcome.DUPLICATE, dispatch_id)
    return ReceiptResult(ReceiptOutcome.OUT_OF_ORDER, dispatch_id)


async def apply_receipt_batch_async(
    pool: Pool, receipts: Sequence[Receipt]
) -> list[ReceiptResult | TriageError]:
    """Unit of work: apply delivery receipts (of any tenants) in ONE statement, each under
    its own tenant; one :class:`ReceiptResult` per receipt, in order. The group commit of
    :mod:`actors.group_commit` fills the batches.

    A receipt names its tenant (``tenant_id``, from the wire reference) and its
    dispatch by ``client_ref`` (else ``provider`` + ``provider_ref``). A state that
    moves nothing is IGNORED, a receipt without a readable tenant UNKNOWN, a repeat of
    an earlier receipt of the batch (same reference, same state) a DUPLICATE; none of
    them reaches the database. Applying a receipt twice is applying it once.
    """
    results: list[ReceiptResult | TriageError | None] = [None] * len(receipts)
    items: list[dict[str, Any]] = []
    statuses: list[DispatchStatus] = []
    where: list[int] = []
    seen: set[tuple[uuid.UUID, str | None, str | None, str | None, DispatchStatus]] = set()
    for i, receipt in enumerate(receipts):
        status = _RECEIPT_STATUS.get(receipt.state)
        if status is None:
            results[i] = _IGNORED
            continue
        tenant = _uuid(receipt.tenant_id)
        if tenant is None:
            results[i] = _UNKNOWN
            continue
        client = _uuid(receipt.client_ref)
        key = (
            (tenant, str(client), None, None, status)
            if client is not None
            else (tenant, None, receipt.provider, receipt.provider_ref, status)
        )
        if key in seen:
            results[i] = _DUPLICATE
            continue
        seen.add(key)
        items.append(_receipt_item(receipt, tenant, status))
        statuses.append(status)
        where.append(i)
    if items:
        async with pool.acquire() as conn:
            done = await _receipt_batch(conn, items, statuses)
        for j, result in zip(where, done, strict=True):
            results[j] = result
    return [r if r is not None else _UNKNOWN for r in results]


async def _receipt_batch(
    conn: Connection, items: list[dict[str, Any]], statuses: list[DispatchStatus]
) -> list[ReceiptResult | TriageError]:
    try:
        rows = await conn.fetch(_RECEIPT_BATCH, _ENCODER.encode(items).decode())
    except asyncpg.DataError as exc:  # the batch's JSON refused (a NUL): each alone
        if len(items) == 1:
            return [UnstorableValue(str(exc))]
        out: list[ReceiptResult | TriageError] = []
        for item, status in zip(items, statuses, strict=True):
            out.extend(await _receipt_batch(conn, [item], [status]))
        return out
    judged: list[ReceiptResult | TriageError | None] = [None] * len(items)
    for row in rows:
        index = row["item"]
        judged[index] = _receipt_judged(row, statuses[index])
    return [r if r is not None else _UNKNOWN for r in judged]


async def apply_receipts_async(pool: Pool, receipts: Iterable[Receipt]) -> ReceiptReport:
    """Unit of work: apply delivery receipts in one statement (:func:`apply_receipt_batch_async`),
    counted in a :class:`ReceiptReport`. Raises the error a receipt was refused with."""
    report = ReceiptReport()
    for result in await apply_receipt_batch_async(pool, list(receipts)):
        if isinstance(result, TriageError):
            raise result
        report.count(result)
    return report


# -- the row-2 sweep (relay role) -------------------------------------------------------

_STALE_LOCK = """
SELECT id, tenant_id, channel::text AS channel, category, provider, provider_ref
FROM dispatches
WHERE channel = $1 AND status = 'dispatched'
  AND dispatched_at < now() - make_interval(secs => $2)
ORDER BY dispatched_at
LIMIT $3
FOR UPDATE SKIP LOCKED
"""

# No RETURNING: the relay role may not read a row once it is 'unknown'.
_STALE_MARK = f"""
UPDATE dispatches SET status = 'unknown', reason = '{STALE_REASON}'
WHERE id = ANY($1::uuid[]) AND status = 'dispatched'
"""

_OUTBOX_INSERT = """
INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject, payload)
VALUES ($1, $2, $3, 1, $4, $5::jsonb)
"""


async def _unknown_events(
    conn: Connection, rows: Sequence[asyncpg.Record], reasons: Mapping[uuid.UUID, str]
) -> None:
    """The ``unknown`` event of each row the relay role just marked (locked ``rows``)."""
    for row in rows:
        payload = {
            "id": str(row["id"]),
            "tenant": str(row["tenant_id"]),
            "channel": row["channel"],
            "category": row["category"],
            "template": None,  # not readable by the relay role (not needed to settle)
            "status": str(DispatchStatus.UNKNOWN),
            "reason": reasons[row["id"]],
            "provider": row["provider"],
            "provider_ref": row["provider_ref"],
            "possible_duplicate": None,  # idem
        }
        await conn.execute(
            _OUTBOX_INSERT, row["tenant_id"], AGGREGATE, str(row["id"]),
            event_subject(DispatchStatus.UNKNOWN), json.dumps(payload),
        )  # fmt: skip


async def _mark_stale(
    conn: Connection, channel: str, older_than_s: float, limit: int
) -> list[uuid.UUID]:
    rows = await conn.fetch(_STALE_LOCK, channel, older_than_s, limit)
    if not rows:
        return []
    ids = [row["id"] for row in rows]
    await conn.execute(_STALE_MARK, ids)
    await _unknown_events(conn, rows, dict.fromkeys(ids, STALE_REASON))
    return ids


async def mark_stale_unknown_async(
    pool: Pool, channel: str, older_than_s: float, limit: int
) -> list[uuid.UUID]:
    """Unit of work as ``triage_relay``: ``dispatched`` rows of ``channel`` whose
    ``dispatched_at`` is older than ``older_than_s`` become ``unknown`` (reason
    ``feedback_stale``), at most ``limit``, each with its outbox event. Their ids."""
    if older_than_s < 0 or limit < 1:
        raise ValueError("older_than_s must be >= 0 and limit >= 1")
    return await run_as_relay(pool, _mark_stale, channel, older_than_s, limit)


_OUTSTANDING = """
SELECT count(id) FROM dispatches WHERE channel = $1 AND status = 'dispatched'
"""


async def _outstanding(conn: Connection, channel: str) -> int:
    return int(await conn.fetchval(_OUTSTANDING, channel) or 0)


async def outstanding_async(pool: Pool, channel: str) -> int:
    """Unit of work as ``triage_relay``: how many ``channel`` dispatches wait for feedback
    (``dispatched``, every tenant). Row 2's watchdog calls a silence a stall only then."""
    return await run_as_relay(pool, _outstanding, channel)


# -- the crash backlog (claimed as the relay role, read as the tenant) -------------------


@dataclass(frozen=True, slots=True)
class QueuedDispatch:
    """A dispatch left ``queued`` (by a crash, or waiting for a requeue): enough to send it."""

    dispatch_id: uuid.UUID
    tenant_id: str
    idempotency_key: str
    channel: str
    template: str
    category: str
    recipient: str
    body: str
    subject: str | None
    data: dict[str, str]
    age_s: float
    category_state: CategoryState | None


# As triage_relay (0004): the due queued rows of one channel, oldest first, claimed by
# the statement that locks them, so no other resumer takes one before claimed_until.
_CLAIM_QUEUED = """
WITH due AS (
    SELECT id FROM dispatches
    WHERE channel = $1 AND status = 'queued'
      AND created_at < now() - make_interval(secs => $2)
      AND (claimed_until IS NULL OR claimed_until < now())
    ORDER BY created_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
UPDATE dispatches d SET claimed_until = now() + make_interval(secs => $4)
FROM due WHERE d.id = due.id
RETURNING d.id, d.tenant_id
"""

# As the tenant (RLS): what sending a claimed row needs. Still queued: a row another
# path settled between the claim and this read is not sent.
_CLAIMED = """
SELECT d.id, d.idempotency_key, d.channel::text AS channel, d.template, d.category,
       d.recipient, d.payload::text AS payload,
       extract(epoch FROM now() - d.created_at)::float8 AS age_s,
       (SELECT b.state FROM category_blocks b
        WHERE b.channel = d.channel AND b.category = d.category) AS block
FROM dispatches d
WHERE d.id = ANY($1::uuid[]) AND d.status = 'queued'
"""

# As triage_relay: the rows this replica's dispatchers hold (parked, waiting, sending)
# keep their claim while the replica lives: renewed when it would lapse within
# renew_within_s (a row never claimed lapses older_than_s after its creation).
_RENEW = """
UPDATE dispatches SET claimed_until = now() + make_interval(secs => $2)
WHERE id = ANY($1::uuid[]) AND status = 'queued'
  AND coalesce(claimed_until, created_at + make_interval(secs => $3))
      < now() + make_interval(secs => $4)
"""

_RELEASE = """
UPDATE dispatches SET claimed_until = NULL
WHERE id = ANY($1::uuid[]) AND status = 'queued'
"""


def _queued_dispatch(row: asyncpg.Record, tenant: str) -> QueuedDispatch:
    payload = json.loads(row["payload"])
    return QueuedDispatch(
        dispatch_id=row["id"],
        tenant_id=tenant,
        idempotency_key=row["idempotency_key"] or str(row["id"]),
        channel=row["channel"],
        template=row["template"],
        category=row["category"],
        recipient=row["recipient"],
        body=str(payload.get("body", "")),
        subject=payload.get("subject"),
        data={str(k): str(v) for k, v in (payload.get("data") or {}).items()},
        age_s=float(row["age_s"]),
        category_state=CategoryState(row["block"]) if row["block"] else None,
    )


@dataclass(frozen=True, slots=True)
class BacklogClaim:
    """What :func:`claim_backlog_async` did: the rows claimed (oldest first) and how many
    held rows had their claim renewed."""

    rows: list[QueuedDispatch]
    renewed: int


async def claim_backlog_async(
    pool: Pool,
    limits: Mapping[str, int],
    held: Sequence[uuid.UUID],
    older_than_s: float,
    lease_s: float,
    renew_within_s: float = 0.0,
) -> BacklogClaim:
    """Unit of work: claim the ``queued`` dispatches of every tenant created more than
    ``older_than_s`` ago and not claimed now, at most ``limits[channel]`` per channel,
    oldest first, for ``lease_s``; then read them to send.

    The claim runs as ``triage_relay`` (it sees the queued rows' ids and tenants, no
    recipient nor payload) and commits before the read: a concurrent resumer (another
    replica) skips the locked rows and then sees them claimed, so two never take one
    row. In the same transaction, first, the claims of the ``held`` rows (the caller's
    dispatchers have them in hand) that would lapse within ``renew_within_s`` are
    renewed for ``lease_s``, so no other replica takes a row this one is still sending
    or has parked. The read
    runs under each claimed row's tenant (RLS), in one read-only transaction. A claim
    that lapses (its resumer died) makes the row due again; :func:`release_claims_async`
    ends one at once.
    """
    if older_than_s < 0 or renew_within_s < 0 or not lease_s > 0:
        raise ValueError("older_than_s and renew_within_s must be >= 0, lease_s > 0")
    if any(n < 0 for n in limits.values()):
        raise ValueError("every limit must be >= 0")
    by_tenant: dict[uuid.UUID, list[uuid.UUID]] = {}
    renewed = 0
    async with pool.acquire() as conn:
        async with relay_transaction(conn):
            if held:
                status = await conn.execute(
                    _RENEW, list(held), lease_s, older_than_s, renew_within_s
                )
                renewed = int(status.split()[-1])
            for channel, limit in limits.items():
                if not limit:
                    continue
                rows = await conn.fetch(_CLAIM_QUEUED, channel, older_than_s, limit, lease_s)
                for row in rows:
                    by_tenant.setdefault(row["tenant_id"], []).append(row["id"])
        out: list[QueuedDispatch] = []
        groups = list(by_tenant.items())
        if groups:
            async with tenant_transaction(conn, groups[0][0], readonly=True):
                for n, (tenant, ids) in enumerate(groups):
                    if n:
                        await switch_tenant(conn, tenant)
                    rows = await conn.fetch(_CLAIMED, ids)
                    out.extend(_queued_dispatch(row, str(tenant)) for row in rows)
    out.sort(key=lambda q: -q.age_s)
    return BacklogClaim(out, renewed)


async def _release(conn: Connection, ids: Sequence[uuid.UUID]) -> int:
    status = await conn.execute(_RELEASE, list(ids))
    return int(status.split()[-1])


async def release_claims_async(pool: Pool, ids: Sequence[uuid.UUID]) -> int:
    """Unit of work as ``triage_relay``: the claims on these still queued dispatches end
    (a resumer that could not hand them over): due again at once. How many."""
    if not ids:
        return 0
    return await run_as_relay(pool, _release, ids)


# -- the SMS / email status sweep (relay role) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Unsettled:
    """A ``dispatched`` row whose receipt has not come: what the relay role may read."""

    dispatch_id: uuid.UUID
    tenant_id: str
    provider: str | None
    provider_ref: str | None
    age_s: float  # since the provider took it (dispatched_at)


_CLAIM_UNSETTLED = """
WITH due AS (
    SELECT id FROM dispatches
    WHERE channel = $1 AND status = 'dispatched'
      AND (claimed_until IS NULL OR claimed_until < now())
      AND (dispatched_at < now() - make_interval(secs => $4)
           OR (provider = ANY($2::text[])
               AND dispatched_at < now() - make_interval(secs => $3)))
    ORDER BY dispatched_at
    LIMIT $5
    FOR UPDATE SKIP LOCKED
)
UPDATE dispatches d SET claimed_until = now() + make_interval(secs => $6)
FROM due WHERE d.id = due.id
RETURNING d.id, d.tenant_id, d.provider, d.provider_ref,
          extract(epoch FROM now() - d.dispatched_at)::float8 AS age_s
"""


async def _claim_unsettled(
    conn: Connection,
    channel: str,
    askable: list[str],
    ask_after_s: float,
    stale_after_s: float,
    limit: int,
    lease_s: float,
) -> list[Unsettled]:
    rows = await conn.fetch(
        _CLAIM_UNSETTLED, channel, askable, ask_after_s, stale_after_s, limit, lease_s
    )
    out = [
        Unsettled(
            dispatch_id=row["id"],
            tenant_id=str(row["tenant_id"]),
            provider=row["provider"],
            provider_ref=row["provider_ref"],
            age_s=float(row["age_s"]),
        )
        for row in rows
    ]
    out.sort(key=lambda u: -u.age_s)
    return out


async def claim_unsettled_async(
    pool: Pool,
    channel: str,
    askable: Sequence[str],
    *,
    ask_after_s: float,
    stale_after_s: float,
    limit: int,
    lease_s: float,
) -> list[Unsettled]:
    """Unit of work as ``triage_relay``: claim, for ``lease_s``, at most ``limit``
    ``dispatched`` rows of ``channel`` (every tenant, oldest first) that are not claimed
    now and are due: taken by a provider in ``askable`` (those that answer a status
    query) more than ``ask_after_s`` ago, or by any provider more than
    ``stale_after_s`` ago (the deadline). The claim and the lock are one statement
    (``FOR UPDATE SKIP LOCKED``): two sweeps never take one row."""
    if ask_after_s < 0 or stale_after_s < 0 or limit < 1 or not lease_s > 0:
        raise ValueError("ask_after_s, stale_after_s must be >= 0, limit >= 1, lease_s > 0")
    return await run_as_relay(
        pool, _claim_unsettled, channel, list(askable), ask_after_s, stale_after_s, limit,
        lease_s,
    )  # fmt: skip


_UNKNOWN_LOCK = """
SELECT id, tenant_id, channel::text AS channel, category, provider, provider_ref
FROM dispatches
WHERE id = ANY($1::uuid[]) AND status = 'dispatched'
ORDER BY id
FOR UPDATE
"""

_UNKNOWN_MARK = """
UPDATE dispatches d SET status = 'unknown', reason = m.reason
FROM unnest($1::uuid[], $2::text[]) AS m(id, reason)
WHERE d.id = m.id AND d.status = 'dispatched'
"""


async def _mark_unknown(conn: Connection, reasons: dict[uuid.UUID, str]) -> list[uuid.UUID]:
    rows = await conn.fetch(_UNKNOWN_LOCK, list(reasons))
    if not rows:
        return []
    ids = [row["id"] for row in rows]
    await conn.execute(_UNKNOWN_MARK, ids, [reasons[i] for i in ids])
    await _unknown_events(conn, rows, reasons)
    return ids


async def mark_unknown_async(pool: Pool, reasons: Mapping[uuid.UUID, str]) -> list[uuid.UUID]:
    """Unit of work as ``triage_relay``: each dispatch named in ``reasons`` that is still
    ``dispatched`` becomes ``unknown`` with its reason, with its outbox event; the ids
    it moved (a receipt that came meanwhile wins: that row is left as it is)."""
    if any(not reason for reason in reasons.values()):
        raise ValueError("an unknown dispatch needs a reason")
    if not reasons:
        return []
    return await run_as_relay(pool, _mark_unknown, dict(reasons))


# -- ops notices --------------------------------------------------------------------------


async def _notice(conn: Connection, tenant_id: str, notice: dict[str, Any]) -> None:
    aggregate_id = str(notice.get("kind", "notice"))
    await conn.execute(
        _OUTBOX_INSERT, uuid.UUID(str(tenant_id)), "ops", aggregate_id, OPS_NOTICE_SUBJECT,
        json.dumps(notice),
    )  # fmt: skip


async def ops_notice_async(pool: Pool, tenant_id: str | uuid.UUID, notice: dict[str, Any]) -> None:
    """Unit of work: one internal-ops notice event (``triage.events.ops.notice``)."""

    async def write(conn: Connection) -> None:
        await _notice(conn, str(tenant_id), notice)

    await run_in_tenant(pool, tenant_id, write)


# -- the dispatcher's one write per outcome ----------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadRecipient:
    channel: str
    recipient: str
    reason: str


async def _record_outcome(
    conn: Connection, steps: Sequence[Transition], dead: DeadRecipient | None
) -> list[TransitionResult]:
    results = await _transitions(conn, steps)
    for step, result in zip(steps, results, strict=True):
        if (
            result.outcome is TransitionOutcome.APPLIED
            and result.old_status is DispatchStatus.QUEUED
        ):
            await _apply_early(conn, step.dispatch_id)
    if dead is not None:
        await mark_dead_in(conn, dead.channel, dead.recipient, dead.reason)
    return results


@dataclass(frozen=True, slots=True)
class OutcomeRecord:
    """One send's outcome for :func:`record_outcomes_async`: its tenant, its transitions
    and, for a recipient that is gone, the dead-recipient mark."""

    tenant_id: str | uuid.UUID
    steps: Sequence[Transition]
    dead: DeadRecipient | None = None


async def record_outcomes_async(
    pool: Pool, records: Sequence[OutcomeRecord]
) -> list[list[TransitionResult] | TriageError]:
    """Unit of work: the outcomes of several sends (of any tenants) in ONE transaction,
    each under its own tenant, as :func:`record_outcome_async` writes one. The group
    commit of :mod:`actors.group_commit` fills the batches.

    The sends are written in dispatch-id order (the receipt batches' lock order, so the
    two never wait on each other crosswise); without a recipient to mark dead the one
    statement is its own transaction (no BEGIN and COMMIT round trips)."""
    for record in records:
        for step in record.steps:
            if step.status in _NEEDS_REASON and not step.reason:
                raise ValueError(f"a {step.status} dispatch needs a reason")
    order = sorted(range(len(records)), key=lambda i: _lock_key(records[i]))
    items = [
        {
            "tenant": str(record.tenant_id),
            "steps": [
                {"id": str(s.dispatch_id), "status": str(s.status), "reason": s.reason,
                 "provider": s.provider, "provider_ref": s.provider_ref,
                 "possible_duplicate": s.possible_duplicate}
                for s in record.steps
            ],
        }
        for record in (records[i] for i in order)
    ]  # fmt: skip
    payload = _ENCODER.encode(items).decode()
    async with pool.acquire() as conn:
        if all(record.dead is None for record in records):
            rows = await conn.fetch(_RECORD_BATCH, payload)
        else:
            async with conn.transaction():
                rows = await conn.fetch(_RECORD_BATCH, payload)
                for record in records:
                    if record.dead is not None:
                        dead = record.dead
                        await switch_tenant(conn, record.tenant_id)
                        await mark_dead_in(conn, dead.channel, dead.recipient, dead.reason)
    found = {(order[row["item"]], row["step"]): row for row in rows}
    return [
        [_judged(found.get((i, j)), step.status) for j, step in enumerate(record.steps)]
        for i, record in enumerate(records)
    ]


def _lock_key(record: OutcomeRecord) -> uuid.UUID:
    return record.steps[0].dispatch_id if record.steps else _NIL


_NIL: Final = uuid.UUID(int=0)


async def record_outcome_async(
    pool: Pool,
    tenant_id: str | uuid.UUID,
    steps: Sequence[Transition],
    dead: DeadRecipient | None = None,
) -> list[TransitionResult]:
    """Unit of work: a send's outcome -- its transitions (with their events) and, for a
    recipient that is gone, the dead-recipient mark -- in one tenant transaction."""
    for step in steps:
        if step.status in _NEEDS_REASON and not step.reason:
            raise ValueError(f"a {step.status} dispatch needs a reason")
    return await run_in_tenant(pool, tenant_id, _record_outcome, steps, dead)
