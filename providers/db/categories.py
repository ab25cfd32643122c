"""Category blocks and dead recipients (catalog row 3, and the channels' dead tokens).

``category_blocks`` holds one row per (tenant, channel, category) that is
**throttled** or **disabled** after a bounce spike; no row means the category
sends normally. The two states are not equals::

    (none) --spike--> throttled --ratio cleared--> (none)      automatic
    (none)/throttled --sustained or ceiling--> disabled          automatic
    disabled --`triage category enable`--> (none)                operator only

so :func:`block_async` never turns a ``disabled`` row back into ``throttled``
and :func:`unblock_async` lifts a throttle only, never a ``disabled`` row:
only :func:`enable_async` (the operator's command) removes that.

``dead_recipients`` holds device tokens and addresses a provider said are gone
(UNREGISTERED, 410, hard bounce 5.1.1): :func:`mark_dead_async` records one,
:func:`is_dead_async` answers whether one is. (The dispatch accept statement in
:mod:`providers.db.dispatches` reads both tables inline, in its one statement.)

Every function here is an asyncio coroutine that is **one unit of work**: the
Trio caller crosses the bridge once per call
(``await bridge.run(block_async, pool, ...)``). The ``*_in`` variants take a
connection that is already inside the caller's tenant transaction, so a
dispatcher can check a block and a dead recipient in its own unit of work
without another crossing.

The daemon's functions run in the tenant's transaction (row-level security
admits that tenant's rows only). :func:`list_blocks_async` and
:func:`enable_async` are the operator's: they take the owner/admin URL the CLI
uses (like ``triage dlq``); a superuser reads every tenant, any other role runs
as ``triage_app`` in the named tenant (it must be a member).
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from engine.errors import TriageError
from providers.channel import ChannelName
from providers.db.roles import APP_ROLE, TENANT_SETTING
from providers.db.tenancy import run_in_tenant

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    Source: TypeAlias = asyncpg.Pool[asyncpg.Record] | Connection

__all__ = [
    "BlockState",
    "CategoryBlock",
    "CategoryError",
    "block_async",
    "enable_async",
    "is_dead_async",
    "is_dead_in",
    "list_blocks_async",
    "load_blocks_async",
    "lookup_block_async",
    "lookup_block_in",
    "mark_dead_async",
    "mark_dead_in",
    "unblock_async",
    "validate_key",
]


class BlockState(enum.StrEnum):
    THROTTLED = "throttled"
    DISABLED = "disabled"


class CategoryError(TriageError, ValueError):
    """A tenant id, channel or category that cannot name a category block; says which."""


@dataclass(frozen=True, slots=True)
class CategoryBlock:
    """One ``category_blocks`` row."""

    tenant_id: str
    channel: str
    category: str
    state: BlockState
    reason: str
    since: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "channel": self.channel,
            "category": self.category,
            "state": self.state.value,
            "reason": self.reason,
            "since": self.since.isoformat(),
        }


def _tenant(tenant_id: uuid.UUID | str) -> str:
    try:
        return str(tenant_id if isinstance(tenant_id, uuid.UUID) else uuid.UUID(tenant_id))
    except (TypeError, ValueError, AttributeError):
        raise CategoryError(f"tenant id must be a UUID, got {tenant_id!r}") from None


def validate_key(tenant_id: uuid.UUID | str, channel: str, category: str) -> tuple[str, str, str]:
    """``(tenant, channel, category)`` in canonical text; :class:`CategoryError` names what is wrong."""
    tenant = _tenant(tenant_id)
    try:
        channel_name = ChannelName(channel).value
    except ValueError:
        raise CategoryError(
            f"channel must be one of {[c.value for c in ChannelName]}, got {channel!r}"
        ) from None
    if not isinstance(category, str) or not category.strip() or category != category.strip():
        raise CategoryError(
            f"category must be a non-empty name without surrounding spaces, got {category!r}"
        )
    return tenant, channel_name, category


def _block(record: asyncpg.Record) -> CategoryBlock:
    return CategoryBlock(
        tenant_id=str(record["tenant_id"]),
        channel=str(record["channel"]),
        category=record["category"],
        state=BlockState(record["state"]),
        reason=record["reason"],
        since=record["since"],
    )


# A disabled row stays disabled; ``since`` moves only when the state changes.
_UPSERT = """
INSERT INTO category_blocks AS b (tenant_id, channel, category, state, reason)
VALUES (current_setting('triage.tenant_id')::uuid, $1::dispatch_channel, $2, $3, $4)
ON CONFLICT (tenant_id, channel, category) DO UPDATE
SET state = CASE WHEN b.state = 'disabled' THEN 'disabled' ELSE EXCLUDED.state END,
    reason = CASE WHEN b.state = 'disabled' THEN b.reason ELSE EXCLUDED.reason END,
    since = CASE WHEN b.state = EXCLUDED.state OR b.state = 'disabled' THEN b.since
                 ELSE now() END
RETURNING tenant_id, channel::text AS channel, category, state, reason, since
"""

_LIFT_THROTTLE = """
DELETE FROM category_blocks
WHERE channel = $1::dispatch_channel AND category = $2 AND state = 'throttled'
RETURNING category
"""

_LOOKUP = """
SELECT tenant_id, channel::text AS channel, category, state, reason, since
FROM category_blocks WHERE channel = $1::dispatch_channel AND category = $2
"""

_ALL = """
SELECT tenant_id, channel::text AS channel, category, state, reason, since
FROM category_blocks ORDER BY tenant_id, channel, category
"""

_ENABLE = """
DELETE FROM category_blocks
WHERE tenant_id = $1::uuid AND channel = $2::dispatch_channel AND category = $3
  AND state = 'disabled'
RETURNING tenant_id, channel::text AS channel, category, state, reason, since
"""

_STATE_OF = """
SELECT state FROM category_blocks
WHERE tenant_id = $1::uuid AND channel = $2::dispatch_channel AND category = $3
"""

_MARK_DEAD = """
INSERT INTO dead_recipients (tenant_id, channel, recipient, reason)
VALUES (current_setting('triage.tenant_id')::uuid, $1::dispatch_channel, $2, $3)
ON CONFLICT (tenant_id, channel, recipient) DO NOTHING
RETURNING recipient
"""

_IS_DEAD = """
SELECT EXISTS (
    SELECT 1 FROM dead_recipients WHERE channel = $1::dispatch_channel AND recipient = $2
)
"""

_IS_SUPERUSER = "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user"
_SET_TENANT = f"SELECT pg_catalog.set_config('{TENANT_SETTING}', $1, true)"


# -- the daemon's units of work (tenant-scoped) ------------------------------------------


async def block_async(
    pool: Source,
    tenant_id: uuid.UUID | str,
    channel: str,
    category: str,
    state: BlockState,
    reason: str,
) -> CategoryBlock:
    """Throttle or disable ``category`` for the tenant; the row as it now stands.

    Idempotent. A ``disabled`` row is never downgraded: blocking it again as
    ``throttled`` returns it unchanged.
    """
    tenant, channel, category = validate_key(tenant_id, channel, category)
    state = BlockState(state)
    if not reason.strip():
        raise CategoryError("a category block needs a reason")

    async def work(conn: Connection) -> CategoryBlock:
        record = await conn.fetchrow(_UPSERT, channel, category, state.value, reason)
        assert record is not None  # an upsert with RETURNING always returns its row
        return _block(record)

    return await run_in_tenant(pool, tenant, work)


async def unblock_async(
    pool: Source, tenant_id: uuid.UUID | str, channel: str, category: str
) -> bool:
    """Lift a *throttle*; True if one was lifted. A ``disabled`` row is left alone."""
    tenant, channel, category = validate_key(tenant_id, channel, category)

    async def work(conn: Connection) -> bool:
        return await conn.fetchval(_LIFT_THROTTLE, channel, category) is not None

    return await run_in_tenant(pool, tenant, work)


async def lookup_block_in(conn: Connection, channel: str, category: str) -> CategoryBlock | None:
    """Inside the caller's tenant transaction: the block on ``category``, if any."""
    record = await conn.fetchrow(_LOOKUP, channel, category)
    return None if record is None else _block(record)


async def lookup_block_async(
    pool: Source, tenant_id: uuid.UUID | str, channel: str, category: str
) -> CategoryBlock | None:
    """The tenant's block on ``category`` (None: it sends normally)."""
    tenant, channel, category = validate_key(tenant_id, channel, category)
    return await run_in_tenant(pool, tenant, lookup_block_in, channel, category)


async def load_blocks_async(
    pool: asyncpg.Pool[asyncpg.Record], tenant_ids: list[str]
) -> list[CategoryBlock]:
    """Every block of the given tenants, one tenant transaction each, one connection.

    The daemon's role sees one tenant at a time (row-level security), so the
    caller names the tenants it cares about (those it has seen or been given).
    """
    canonical = [_tenant(t) for t in tenant_ids]
    blocks: list[CategoryBlock] = []
    async with pool.acquire() as conn:
        for tenant in canonical:
            blocks.extend(_block(r) for r in await run_in_tenant(conn, tenant, _fetch_all))
    return blocks


async def _fetch_all(conn: Connection) -> list[asyncpg.Record]:
    return await conn.fetch(_ALL)


async def mark_dead_async(
    pool: Source, tenant_id: uuid.UUID | str, channel: str, recipient: str, reason: str
) -> bool:
    """Record that ``recipient`` is gone; True if it was not marked before."""
    tenant, channel, _ = validate_key(tenant_id, channel, "recipient")
    if not recipient or not reason.strip():
        raise CategoryError("a dead recipient needs a recipient and a reason")

    return await run_in_tenant(pool, tenant, mark_dead_in, channel, recipient, reason)


async def mark_dead_in(conn: Connection, channel: str, recipient: str, reason: str) -> bool:
    """Inside the caller's tenant transaction: mark ``recipient`` dead; True if newly marked."""
    return await conn.fetchval(_MARK_DEAD, channel, recipient, reason) is not None


async def is_dead_in(conn: Connection, channel: str, recipient: str) -> bool:
    """Inside the caller's tenant transaction: whether ``recipient`` is marked dead."""
    return bool(await conn.fetchval(_IS_DEAD, channel, recipient))


async def is_dead_async(
    pool: Source, tenant_id: uuid.UUID | str, channel: str, recipient: str
) -> bool:
    """Whether the tenant's ``recipient`` on ``channel`` is marked dead."""
    tenant, channel, _ = validate_key(tenant_id, channel, "recipient")
    return await run_in_tenant(pool, tenant, is_dead_in, channel, recipient)


# -- the operator's (CLI, owner/admin URL) ----------------------------------------------


async def _scope(conn: Connection, tenant: str | None) -> None:
    """Inside a transaction: see every tenant as a superuser, else the one tenant as the app."""
    if await conn.fetchval(_IS_SUPERUSER):
        return
    if tenant is None:
        raise CategoryError(
            "listing every tenant's blocks needs a superuser URL; pass --tenant to list one"
        )
    await conn.execute(f"SET LOCAL ROLE {APP_ROLE}")
    await conn.execute(_SET_TENANT, tenant)


async def list_blocks_async(url: str, *, tenant_id: str | None = None) -> list[CategoryBlock]:
    """Every block (or one tenant's), ordered by tenant, channel and category."""
    tenant = None if tenant_id is None else _tenant(tenant_id)
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction(readonly=True):
            await _scope(conn, tenant)
            blocks = [_block(r) for r in await conn.fetch(_ALL)]
    finally:
        await conn.close()
    return [b for b in blocks if tenant is None or b.tenant_id == tenant]


async def enable_async(
    url: str, tenant_id: str, channel: str, category: str
) -> tuple[CategoryBlock | None, BlockState | None]:
    """Remove a ``disabled`` block: ``(the removed row, None)``.

    When nothing was disabled: ``(None, the current state)`` -- ``throttled``
    (automatic: it lifts when the bounce ratio clears) or None (no block).
    """
    tenant, channel, category = validate_key(tenant_id, channel, category)
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await _scope(conn, tenant)
            record = await conn.fetchrow(_ENABLE, tenant, channel, category)
            if record is not None:
                return _block(record), None
            state = await conn.fetchval(_STATE_OF, tenant, channel, category)
            return None, None if state is None else BlockState(state)
    finally:
        await conn.close()
