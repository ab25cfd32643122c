"""The PHI guard's writes (catalog row 11): the trip, the scanner's finds and its reads.

Asyncio units of work, one bridge crossing each (``await db.run_unit(fn, ...)``):

* :func:`trip_async` -- a push payload carried PHI. In ONE tenant transaction:
  the category is halted (``category_blocks`` ``disabled`` reason ``phi_guard``, as
  :func:`providers.db.categories.block_async` writes it: an operator lifts it with
  ``triage category enable``), the template version retired (``retired_at``,
  ``retired_reason``; no longer active), and the incident written (ref
  ``dispatch:<id>``). All or nothing: a crash leaves none of it, and the dispatch
  was not sent either way. Repeating it changes nothing more (each step is
  idempotent; the incident is unique per ref).
* :func:`record_finds_async` -- the scanner's finds, as ``triage_relay`` (a dead
  letter may be any tenant's, a log line nobody's): the refs not recorded before
  are returned, so a find is paged once however often it is read.
* :func:`dead_letters_after_async` -- the next dead letters to scan, as
  ``triage_relay``, by id.
* :func:`incidents_async` -- the operator's read (owner/admin URL).

Nothing here ever sees a PHI value: the caller passes the redacted excerpt.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from providers.db.categories import BlockState, validate_key
from providers.db.tenancy import run_as_relay, run_in_tenant

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]

__all__ = [
    "HALT_REASON",
    "KIND",
    "Find",
    "Incident",
    "ScannedLetter",
    "Trip",
    "TripResult",
    "dead_letters_after_async",
    "incidents_async",
    "record_finds_async",
    "trip_async",
]

KIND = "phi_leak"
HALT_REASON = "phi_guard"


@dataclass(frozen=True, slots=True)
class Trip:
    """One push the guard refused: what to halt, retire and record."""

    tenant_id: str
    dispatch_id: str
    channel: str
    category: str
    template: str
    version: int
    rule: str
    location: str
    excerpt: str  # redacted


@dataclass(frozen=True, slots=True)
class TripResult:
    block_state: BlockState  # the category's block as it now stands (disabled)
    retired: bool  # this trip retired the version (False: it was retired already)
    incident_id: int | None  # None: the incident was recorded before


@dataclass(frozen=True, slots=True)
class Find:
    """One find of the scanner (``source`` ``log`` or ``dlq``)."""

    source: str
    ref: str
    tenant_id: str | None
    rule: str
    location: str
    excerpt: str  # redacted


@dataclass(frozen=True, slots=True)
class ScannedLetter:
    id: int
    tenant_id: str | None
    payload: bytes
    error: str
    headers: str


@dataclass(frozen=True, slots=True)
class Incident:
    id: int
    tenant_id: str | None
    kind: str
    source: str
    ref: str
    template: str | None
    template_version: int | None
    channel: str | None
    category: str | None
    rule: str
    location: str
    excerpt: str
    detected_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant_id": self.tenant_id,
            "kind": self.kind,
            "source": self.source,
            "ref": self.ref,
            "template": self.template,
            "template_version": self.template_version,
            "channel": self.channel,
            "category": self.category,
            "rule": self.rule,
            "location": self.location,
            "excerpt": self.excerpt,
            "detected_at": self.detected_at.isoformat(),
        }


_HALT = """
INSERT INTO category_blocks AS b (tenant_id, channel, category, state, reason)
VALUES (current_setting('triage.tenant_id')::uuid, $1::dispatch_channel, $2, 'disabled', $3)
ON CONFLICT (tenant_id, channel, category) DO UPDATE
SET state = 'disabled',
    reason = CASE WHEN b.state = 'disabled' THEN b.reason ELSE EXCLUDED.reason END,
    since = CASE WHEN b.state = 'disabled' THEN b.since ELSE now() END
RETURNING state
"""

_RETIRE = """
UPDATE templates SET active = false, retired_at = now(), retired_reason = $3
WHERE name = $1 AND version = $2 AND retired_at IS NULL
RETURNING version
"""

_INCIDENT = """
INSERT INTO incidents (tenant_id, kind, source, ref, template, template_version, channel,
                       category, rule, location, excerpt)
VALUES ($1::uuid, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
ON CONFLICT (source, ref) DO NOTHING
RETURNING id
"""

_FINDS = """
INSERT INTO incidents (tenant_id, kind, source, ref, rule, location, excerpt)
SELECT f.tenant_id, $1, f.source, f.ref, f.rule, f.location, f.excerpt
FROM unnest($2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[])
     AS f(tenant_id, source, ref, rule, location, excerpt)
ON CONFLICT (source, ref) DO NOTHING
RETURNING source, ref
"""

_LETTERS = """
SELECT id, tenant_id, payload, error, headers::text AS headers
FROM dead_letters WHERE id > $1 ORDER BY id LIMIT $2
"""

_LIST = """
SELECT id, tenant_id, kind, source, ref, template, template_version, channel, category,
       rule, location, excerpt, detected_at
FROM incidents ORDER BY id
"""


async def _trip(conn: Connection, trip: Trip) -> TripResult:
    state = await conn.fetchval(_HALT, trip.channel, trip.category, HALT_REASON)
    retired = await conn.fetchval(
        _RETIRE, trip.template, trip.version, f"{HALT_REASON}: {trip.rule}"
    )
    incident = await conn.fetchval(
        _INCIDENT, uuid.UUID(trip.tenant_id), KIND, "push_guard", f"dispatch:{trip.dispatch_id}",
        trip.template, trip.version, trip.channel, trip.category, trip.rule, trip.location,
        trip.excerpt,
    )  # fmt: skip
    return TripResult(
        block_state=BlockState(state),
        retired=retired is not None,
        incident_id=None if incident is None else int(incident),
    )


async def trip_async(pool: Pool, trip: Trip) -> TripResult:
    """Unit of work: halt, retire and record one trip, in one tenant transaction."""
    tenant, _, _ = validate_key(trip.tenant_id, trip.channel, trip.category)
    return await run_in_tenant(pool, tenant, _trip, trip)


async def _record(conn: Connection, finds: list[Find]) -> list[tuple[str, str]]:
    rows = await conn.fetch(
        _FINDS, KIND,
        [None if f.tenant_id is None else uuid.UUID(f.tenant_id) for f in finds],
        [f.source for f in finds], [f.ref for f in finds], [f.rule for f in finds],
        [f.location for f in finds], [f.excerpt for f in finds],
    )  # fmt: skip
    return [(r["source"], r["ref"]) for r in rows]


async def record_finds_async(pool: Pool, finds: list[Find]) -> list[tuple[str, str]]:
    """Unit of work (as ``triage_relay``): record the finds; the (source, ref) of the new ones."""
    if not finds:
        return []
    return await run_as_relay(pool, _record, finds)


async def _letters(conn: Connection, after_id: int, limit: int) -> list[ScannedLetter]:
    rows = await conn.fetch(_LETTERS, after_id, limit)
    return [
        ScannedLetter(
            id=int(r["id"]),
            tenant_id=None if r["tenant_id"] is None else str(r["tenant_id"]),
            payload=bytes(r["payload"]),
            error=r["error"],
            headers=r["headers"],
        )
        for r in rows
    ]


async def dead_letters_after_async(pool: Pool, after_id: int, limit: int) -> list[ScannedLetter]:
    """Unit of work (as ``triage_relay``): at most ``limit`` dead letters with id > ``after_id``."""
    return await run_as_relay(pool, _letters, after_id, limit)


async def incidents_async(url: str) -> list[Incident]:
    """asyncio side, the operator's URL: every incident the role may see, by id."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(_LIST)
    finally:
        await conn.close()
    return [
        Incident(
            id=int(r["id"]),
            tenant_id=None if r["tenant_id"] is None else str(r["tenant_id"]),
            kind=r["kind"],
            source=r["source"],
            ref=r["ref"],
            template=r["template"],
            template_version=r["template_version"],
            channel=r["channel"],
            category=r["category"],
            rule=r["rule"],
            location=r["location"],
            excerpt=r["excerpt"],
            detected_at=r["detected_at"],
        )
        for r in rows
    ]
