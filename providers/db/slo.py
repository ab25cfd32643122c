"""The SLO ledger in PostgreSQL (migration 0010): samples, minute buckets, applied configs.

The samples are written by the ``dispatches_slo_samples`` statement trigger,
whatever moved a dispatch; nothing here writes one. Every function is an asyncio
coroutine that is one unit of work (the Trio caller crosses the bridge once per
call) and runs as the daemon's role: none of these tables holds tenant data.

- :func:`rollup_async` folds up to ``max_samples`` samples into ``slo_buckets``
  (judging send latency against the configured threshold) and answers what it
  counted per SLO; replicas never take one sample twice (SKIP LOCKED).
- :func:`window_counts_async` reads the buckets: per day over the budget
  window, and over the burn-rate windows, in one statement.
- :func:`last_applied_async` / :func:`record_applied_async`: the adapter
  sections a daemon last started with (the error-budget freeze compares them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import date, datetime
from typing import TYPE_CHECKING, TypeAlias

import asyncpg
import msgspec

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
    Source: TypeAlias = asyncpg.Pool[asyncpg.Record] | Connection

__all__ = [
    "SLOS",
    "AppliedConfig",
    "DayCount",
    "Rolled",
    "WindowCount",
    "last_applied_async",
    "record_applied_async",
    "rollup_async",
    "window_counts_async",
]

#: The SLOs the schema counts (slo_samples.slo, slo_buckets.slo).
SLOS = ("dispatch_success", "send_latency")


class Rolled(msgspec.Struct, frozen=True):
    """What one rollup counted for one SLO."""

    slo: str
    good: int
    bad: int


class DayCount(msgspec.Struct, frozen=True):
    """One SLO's events of one (UTC) day."""

    slo: str
    day: date
    good: int
    bad: int


class WindowCount(msgspec.Struct, frozen=True):
    """One SLO's events over the last ``seconds``."""

    slo: str
    seconds: float
    good: int
    bad: int


class AppliedConfig(msgspec.Struct, frozen=True, kw_only=True):
    """A row of ``config_applied``."""

    applied_at: datetime
    digest: str
    sections: dict[str, str]
    source: str
    override: str | None


async def rollup_async(
    source: Source, latency_threshold_s: float, max_samples: int, retain_s: float
) -> list[Rolled]:
    rows = await source.fetch(
        "SELECT slo, good, bad FROM slo_rollup($1, $2, $3)",
        latency_threshold_s,
        max_samples,
        retain_s,
    )
    return [Rolled(r["slo"], int(r["good"]), int(r["bad"])) for r in rows]


_COUNTS = """
SELECT 'day' AS kind, slo, (minute AT TIME ZONE 'UTC')::date AS day, NULL::float8 AS seconds,
       sum(good)::bigint AS good, sum(bad)::bigint AS bad
  FROM slo_buckets
 WHERE minute >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                 - make_interval(days => $1 - 1)
 GROUP BY slo, day
UNION ALL
SELECT 'window', b.slo, NULL, w.seconds,
       coalesce(sum(b.good), 0)::bigint, coalesce(sum(b.bad), 0)::bigint
  FROM unnest($2::float8[]) AS w (seconds)
  JOIN slo_buckets b ON b.minute >= now() - make_interval(secs => w.seconds)
 GROUP BY b.slo, w.seconds
"""


async def window_counts_async(
    source: Source, days: int, windows_s: Sequence[float]
) -> tuple[list[DayCount], list[WindowCount]]:
    """Per SLO: the events of each of the last ``days`` UTC days (today included; days
    without events are absent), and over each of ``windows_s`` back from now."""
    rows = await source.fetch(_COUNTS, days, list(windows_s))
    per_day: list[DayCount] = []
    per_window: list[WindowCount] = []
    for r in rows:
        if r["kind"] == "day":
            per_day.append(DayCount(r["slo"], r["day"], int(r["good"]), int(r["bad"])))
        else:
            per_window.append(
                WindowCount(r["slo"], float(r["seconds"]), int(r["good"]), int(r["bad"]))
            )
    return per_day, per_window


async def last_applied_async(source: Source) -> AppliedConfig | None:
    row = await source.fetchrow(
        "SELECT applied_at, digest, sections, source, override FROM config_applied"
        " ORDER BY id DESC LIMIT 1"
    )
    if row is None:
        return None
    sections = row["sections"]
    return AppliedConfig(
        applied_at=row["applied_at"],
        digest=row["digest"],
        sections=json.loads(sections) if isinstance(sections, str) else dict(sections),
        source=row["source"],
        override=row["override"],
    )


async def record_applied_async(
    source: Source,
    digest: str,
    sections: Mapping[str, str],
    config_source: str,
    override: str | None,
) -> None:
    await source.execute(
        "INSERT INTO config_applied (digest, sections, source, override)"
        " VALUES ($1, $2::jsonb, $3, $4)",
        digest,
        json.dumps(dict(sections), sort_keys=True),
        config_source,
        override,
    )
