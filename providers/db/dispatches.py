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

:func:`accept_async` is the hot path and runs ONE data statement in the tenant's
transaction: the idempotency row (``ON CONFLICT DO NOTHING``), the dispatch row
(``queued``) and its outbox event, plus, read in the same statement, the
category's block state and whether the recipient is dead. A disabled category
or a dead recipient ends the new row at once (``failed`` / ``undeliverable``)
in the same transaction, with its second event: nothing is sent.

Dead recipients and category blocks are :mod:`providers.db.categories`' (one
implementation each); the accept statement only reads them, inline.

Cross-tenant work
    :func:`mark_stale_unknown_async` runs as ``triage_relay`` (``0003_channels``
    grants it SELECT of the non-PHI columns of *dispatched* rows and the move to
    ``unknown``). :func:`queued_backlog_async` cannot: the relay role sees no
    ``queued`` row (and must never read recipients or payloads), so it reads
    the backlog tenant by tenant, for the tenants the caller knows.
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import asyncpg

from engine.errors import TriageError
from providers.channel import DeliveryState, Receipt
from providers.db.categories import BlockState, mark_dead_in
from providers.db.tenancy import (
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
    "CategoryState",
    "DeadRecipient",
    "DispatchStatus",
    "QueuedDispatch",
    "ReceiptReport",
    "Transition",
    "TransitionOutcome",
    "TransitionResult",
    "UnknownTenant",
    "UnstorableValue",
    "accept_async",
    "apply_receipts_async",
    "event_subject",
    "mark_stale_unknown_async",
    "ops_notice_async",
    "queued_backlog_async",
    "record_outcome_async",
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


# The event payload, built in SQL from a dispatch row aliased ``x`` (no PHI in it).
def _payload_sql(x: str) -> str:
    return (
        f"jsonb_build_object('id', {x}.id::text, 'tenant', {x}.tenant_id::text,"
        f" 'channel', {x}.channel::text, 'category', {x}.category,"
        f" 'template', {x}.template, 'status', {x}.status::text, 'reason', {x}.reason,"
        f" 'provider', {x}.provider, 'provider_ref', {x}.provider_ref,"
        f" 'possible_duplicate', {x}.possible_duplicate)"
    )


def _outbox_from(x: str) -> str:
    return (
        "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject, payload)"
        f" SELECT {x}.tenant_id, '{AGGREGATE}', {x}.id::text, 1,"
        f" '{SUBJECT_PREFIX}' || {x}.status::text, {_payload_sql(x)} FROM {x}"
    )


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


_ACCEPT = f"""
WITH idem AS (
    INSERT INTO idempotency_keys (tenant_id, key, request_hash, response, expires_at)
    VALUES (current_tenant_id(), $2::text, $3::text,
            jsonb_build_object('dispatch_id', $1::uuid::text),
            now() + make_interval(secs => $4::float8))
    ON CONFLICT (tenant_id, key) DO NOTHING
    RETURNING key
), d AS (
    INSERT INTO dispatches (id, tenant_id, idempotency_key, channel, template,
                            template_version, category, recipient, payload)
    SELECT $1::uuid, current_tenant_id(), $2::text, $5::text, $6::text, $7::integer,
           $8::text, $9::text, $10::jsonb
    FROM idem
    RETURNING *
), o AS (
    {_outbox_from("d")}
    RETURNING id
)
SELECT (SELECT count(*) FROM o) AS created,
       (SELECT request_hash FROM idempotency_keys WHERE key = $2) AS old_hash,
       (SELECT id FROM dispatches WHERE idempotency_key = $2) AS old_id,
       (SELECT status::text FROM dispatches WHERE idempotency_key = $2) AS old_status,
       (SELECT state FROM category_blocks WHERE channel = $5 AND category = $8) AS block,
       EXISTS (SELECT 1 FROM dead_recipients WHERE channel = $5 AND recipient = $9) AS dead
"""

# The conflicting row committed after our statement's snapshot (a concurrent duplicate).
_EXISTING = """
SELECT k.request_hash AS old_hash, d.id AS old_id, d.status::text AS old_status
FROM idempotency_keys k LEFT JOIN dispatches d ON d.idempotency_key = k.key
WHERE k.key = $1
"""


def _payload(req: AcceptRequest) -> str:
    return json.dumps({"body": req.body, "subject": req.subject, "data": req.data})


async def _accept(
    conn: Connection, req: AcceptRequest, refuse: tuple[DispatchStatus, str] | None
) -> AcceptResult:
    row = await conn.fetchrow(
        _ACCEPT, req.dispatch_id, req.idempotency_key, req.request_hash, req.key_ttl_s,
        req.channel, req.template, req.template_version, req.category, req.recipient,
        _payload(req),
    )  # fmt: skip
    assert row is not None
    block = CategoryState(row["block"]) if row["block"] is not None else None
    if not row["created"]:
        old_hash, old_id, old_status = row["old_hash"], row["old_id"], row["old_status"]
        if old_hash is None:
            again = await conn.fetchrow(_EXISTING, req.idempotency_key)
            if again is None:  # pragma: no cover - the conflicting key cannot vanish
                raise RuntimeError(f"idempotency key {req.idempotency_key!r} vanished")
            old_hash, old_id, old_status = again["old_hash"], again["old_id"], again["old_status"]
        return AcceptResult(
            dispatch_id=old_id,
            created=False,
            same_request=old_hash == req.request_hash,
            status=DispatchStatus(old_status) if old_status is not None else None,
            category_state=block,
        )
    # The new row: refused before sending (caller's reason first, then blocks, then dead).
    if refuse is None and block is CategoryState.DISABLED:
        refuse = (DispatchStatus.FAILED, "category_disabled")
    if refuse is None and row["dead"]:
        refuse = (DispatchStatus.UNDELIVERABLE, "recipient_dead")
    if refuse is not None:
        await _transition(conn, req.dispatch_id, refuse[0], refuse[1], None, None, False)
        return AcceptResult(req.dispatch_id, True, True, refuse[0], block, refuse[1])
    return AcceptResult(req.dispatch_id, True, True, DispatchStatus.QUEUED, block)


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
    try:
        async with pool.acquire() as conn, tenant_transaction(conn, req.tenant_id):
            result = await _accept(conn, req, refuse)
            if result.created:
                for notice in notices:
                    await _notice(conn, req.tenant_id, notice)
            return result
    except asyncpg.ForeignKeyViolationError as exc:
        if (exc.constraint_name or "").endswith("_tenant_id_fkey"):
            raise UnknownTenant(req.tenant_id) from exc
        raise
    except asyncpg.DataError as exc:
        raise UnstorableValue(str(exc)) from exc


# -- transitions ------------------------------------------------------------------------

_TRANSITION = f"""
WITH cur AS (
    SELECT id, status::text AS status FROM dispatches WHERE id = $1::uuid FOR UPDATE
), d AS (
    UPDATE dispatches x SET
        status = $2::text,
        reason = coalesce($3::text, x.reason),
        provider = coalesce($4::text, x.provider),
        provider_ref = coalesce($5::text, x.provider_ref),
        dispatched_at = CASE WHEN $2::text = 'dispatched' THEN now() ELSE x.dispatched_at END,
        possible_duplicate = x.possible_duplicate OR $6::boolean
    FROM cur
    WHERE x.id = cur.id AND cur.status <> $2::text
      AND dispatch_transition_allowed(cur.status, $2::text)
    RETURNING x.*
), o AS (
    {_outbox_from("d")}
    RETURNING id
)
SELECT cur.status AS old, (SELECT count(*) FROM o) AS moved FROM cur
"""


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

_BY_PROVIDER_REF = "SELECT id FROM dispatches WHERE provider = $1 AND provider_ref = $2 LIMIT 1"


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


def _uuid(text: str | None) -> uuid.UUID | None:
    if text is None:
        return None
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


_EARLY_INSERT = """
INSERT INTO early_receipts (tenant_id, dispatch_id, state, reason, provider, provider_ref)
VALUES (current_tenant_id(), $1, $2, $3, $4, $5)
ON CONFLICT DO NOTHING
"""
_EARLY_TAKE = """
DELETE FROM early_receipts WHERE dispatch_id = $1
RETURNING state, reason, provider, provider_ref, received_at
"""


async def _resolve_receipts(
    conn: Connection,
    tenant: uuid.UUID,
    receipts: Sequence[Receipt],
    report: ReceiptReport,
    resolved: dict[tuple[uuid.UUID, DispatchStatus], tuple[uuid.UUID, Receipt]],
) -> None:
    """Each receipt's dispatch (by client_ref, else provider_ref under ``tenant``);
    a batch's repeats of one receipt count once."""
    for receipt in receipts:
        status = _RECEIPT_STATUS[receipt.state]
        dispatch_id = _uuid(receipt.client_ref)
        if dispatch_id is None and receipt.provider_ref is not None:
            dispatch_id = await conn.fetchval(
                _BY_PROVIDER_REF, receipt.provider, receipt.provider_ref
            )
        if dispatch_id is None:
            report.unknown += 1
            continue
        if (dispatch_id, status) in resolved:
            report.duplicates += 1
            continue
        resolved[(dispatch_id, status)] = (tenant, receipt)


async def _apply_resolved(
    conn: Connection,
    resolved: dict[tuple[uuid.UUID, DispatchStatus], tuple[uuid.UUID, Receipt]],
    report: ReceiptReport,
    tenant: uuid.UUID | None,
) -> None:
    # One lock order for every batch, whatever its tenants (by dispatch id): two DLR
    # workers applying overlapping batches (a provider re-sending its receipts) can
    # then never deadlock. The tenant setting follows the receipt being applied.
    for (dispatch_id, status), (owner, receipt) in sorted(
        resolved.items(), key=lambda kv: kv[0][0]
    ):
        if owner != tenant:
            await switch_tenant(conn, owner)
            tenant = owner
        reason = None if status is DispatchStatus.DELIVERED else (receipt.reason or str(status))
        result = await _transition(conn, dispatch_id, status, reason, None, None, False)
        if result.outcome is TransitionOutcome.APPLIED:
            report.applied += 1
            report.applied_ids.append(dispatch_id)
        elif result.outcome is TransitionOutcome.DUPLICATE:
            report.duplicates += 1
        elif result.old_status is DispatchStatus.QUEUED:
            # The receipt overtook the send it reports on: keep it for the
            # transaction that records the send (see _apply_early).
            await conn.execute(
                _EARLY_INSERT, dispatch_id, str(status), reason, receipt.provider,
                receipt.provider_ref,
            )  # fmt: skip
            report.early += 1
        elif result.outcome is TransitionOutcome.OUT_OF_ORDER:
            report.out_of_order += 1
        else:
            report.unknown += 1


async def _apply_early(conn: Connection, dispatch_id: uuid.UUID) -> list[TransitionResult]:
    """Receipts that arrived while ``dispatch_id`` was still queued, now that it left
    ``queued``: applied in the order they came (the status machine keeps the first final)."""
    rows = await conn.fetch(_EARLY_TAKE, dispatch_id)
    out = []
    for row in sorted(rows, key=lambda r: r["received_at"]):
        status = DispatchStatus(row["state"])
        out.append(await _transition(conn, dispatch_id, status, row["reason"], None, None, False))
    return out


async def apply_receipts_async(pool: Pool, receipts: Iterable[Receipt]) -> ReceiptReport:
    """Unit of work: apply delivery receipts, one tenant transaction per tenant, in order.

    A receipt names its tenant (``tenant_id``, from the wire reference) and its
    dispatch by ``client_ref`` (else ``provider`` + ``provider_ref``). Duplicates and
    moves the status machine refuses are no-ops, counted in the report.
    """
    report = ReceiptReport()
    by_tenant: dict[uuid.UUID, list[Receipt]] = {}
    for receipt in receipts:
        if receipt.state not in _RECEIPT_STATUS:
            report.ignored += 1
            continue
        tenant = _uuid(receipt.tenant_id)
        if tenant is None:
            report.unknown += 1
            continue
        by_tenant.setdefault(tenant, []).append(receipt)
    if not by_tenant:
        return report
    # One connection and one transaction for the batch, the tenant switched before each
    # tenant's receipts (the setting is transaction-local, RLS reads it per statement):
    # a batch spanning many tenants costs one BEGIN/COMMIT, not one per tenant.
    tenants = iter(by_tenant.items())
    first, first_batch = next(tenants)
    resolved: dict[tuple[uuid.UUID, DispatchStatus], tuple[uuid.UUID, Receipt]] = {}
    async with pool.acquire() as conn, tenant_transaction(conn, first):
        await _resolve_receipts(conn, first, first_batch, report, resolved)
        current = first
        for tenant, batch in tenants:
            await switch_tenant(conn, tenant)
            current = tenant
            await _resolve_receipts(conn, tenant, batch, report, resolved)
        await _apply_resolved(conn, resolved, report, current)
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


async def _mark_stale(
    conn: Connection, channel: str, older_than_s: float, limit: int
) -> list[uuid.UUID]:
    rows = await conn.fetch(_STALE_LOCK, channel, older_than_s, limit)
    if not rows:
        return []
    ids = [row["id"] for row in rows]
    await conn.execute(_STALE_MARK, ids)
    for row in rows:
        payload = {
            "id": str(row["id"]),
            "tenant": str(row["tenant_id"]),
            "channel": row["channel"],
            "category": row["category"],
            "template": None,  # not readable by the relay role (not needed to settle)
            "status": str(DispatchStatus.UNKNOWN),
            "reason": STALE_REASON,
            "provider": row["provider"],
            "provider_ref": row["provider_ref"],
            "possible_duplicate": None,  # idem
        }
        await conn.execute(
            _OUTBOX_INSERT, row["tenant_id"], AGGREGATE, str(row["id"]),
            event_subject(DispatchStatus.UNKNOWN), json.dumps(payload),
        )  # fmt: skip
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


# -- the crash backlog ------------------------------------------------------------------


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


_BACKLOG = """
SELECT d.id, d.idempotency_key, d.channel::text AS channel, d.template, d.category,
       d.recipient, d.payload::text AS payload,
       extract(epoch FROM now() - d.created_at)::float8 AS age_s,
       (SELECT b.state FROM category_blocks b
        WHERE b.channel = d.channel AND b.category = d.category) AS block
FROM dispatches d
WHERE d.status = 'queued' AND d.created_at < now() - make_interval(secs => $1)
ORDER BY d.created_at
LIMIT $2
"""


async def _backlog(
    conn: Connection, tenant: str, older_than_s: float, limit: int
) -> list[QueuedDispatch]:
    out: list[QueuedDispatch] = []
    for row in await conn.fetch(_BACKLOG, older_than_s, limit):
        payload = json.loads(row["payload"])
        out.append(
            QueuedDispatch(
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
        )
    return out


async def queued_backlog_async(
    pool: Pool, tenant_ids: Iterable[str | uuid.UUID], older_than_s: float, limit: int
) -> list[QueuedDispatch]:
    """Unit of work: ``queued`` dispatches older than ``older_than_s``, oldest first, at
    most ``limit`` in all, read tenant by tenant (one read-only transaction each) for
    ``tenant_ids``: no role may read every tenant's queued rows (see the module doc)."""
    out: list[QueuedDispatch] = []
    for tenant in tenant_ids:
        if len(out) >= limit:
            break
        text = str(tenant)
        async with pool.acquire() as conn, tenant_transaction(conn, text, readonly=True):
            out.extend(await _backlog(conn, text, older_than_s, limit - len(out)))
    return out


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
