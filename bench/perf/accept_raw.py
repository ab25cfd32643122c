"""Baselines of the accept path that share nothing with Triage: plain asyncio + asyncpg, and pgbench.

Both run the accept transaction as a careful hand-written service would, with
SQL written here (not Triage's statements), as the daemon's role under the
tenant's row-level security, against the same tables, triggers and indexes:

    BEGIN
    SELECT set_config('triage.tenant_id', <tenant>, true)   -- the RLS tenant
    INSERT INTO idempotency_keys ...                          -- the key
    INSERT INTO dispatches ... 'queued'                       -- the row
    INSERT INTO outbox ...                                    -- its event
    COMMIT

:func:`asyncpg_accepts` is an asyncio program (no Trio, no trio-asyncio: its own
:class:`asyncio.SelectorEventLoop`, whatever loop policy is installed): a pool
of ``pool_size`` connections, ``concurrency`` tasks taking requests from one
queue, each request one transaction. :func:`pgbench_accepts` runs PostgreSQL's
own ``pgbench`` with the same statements (the physical limit: C clients, the
extended protocol with prepared statements, no Python).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import asyncpg

__all__ = ["PGBENCH_SCRIPT", "asyncpg_accepts", "pgbench_accepts"]

_TENANT = "SELECT set_config('triage.tenant_id', $1, true)"
_KEY = (
    "INSERT INTO idempotency_keys (tenant_id, key, request_hash, response, expires_at)"
    " VALUES ($1, $2, $3, $4::jsonb, now() + interval '1 day')"
)
_ROW = (
    "INSERT INTO dispatches (id, tenant_id, idempotency_key, channel, template,"
    " template_version, category, recipient, payload)"
    " VALUES ($1, $2, $3, 'sms', $4, 1, $5, $6, $7::jsonb)"
)
_EVENT = (
    "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject, payload)"
    " VALUES ($1, 'dispatch', $2, 1, 'triage.events.dispatch.queued', $3::jsonb)"
)

#: The same transaction for pgbench (``:t`` picks one of the seeded tenants: the daemon's
#: role sees no tenant row outside its tenant, so their ids are written into the script).
PGBENCH_SCRIPT = """\
\\set t random(1, {count})
SELECT (ARRAY[{tenants}])[:t] AS tid, gen_random_uuid()::text AS did, md5(random()::text) AS k \\gset
BEGIN;
SELECT set_config('triage.tenant_id', :tid::text, true);
INSERT INTO idempotency_keys (tenant_id, key, request_hash, response, expires_at) VALUES (:tid::uuid, :k::text, md5(:k::text), jsonb_build_object('dispatch_id', :did::text), now() + interval '1 day');
INSERT INTO dispatches (id, tenant_id, idempotency_key, channel, template, template_version, category, recipient, payload) VALUES (:did::uuid, :tid::uuid, :k::text, 'sms', 'reminder', 1, 'reminders', '+15551230000', '{{"body": "Reminder: your appointment is at 10:30", "subject": null, "data": {{"time": "10:30"}}}}');
INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject, payload) VALUES (:tid::uuid, 'dispatch', :did::text, 1, 'triage.events.dispatch.queued', jsonb_build_object('id', :did::text, 'status', 'queued'));
COMMIT;
"""


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


async def _asyncpg_main(
    url: str, tenants: Sequence[str], n: int, concurrency: int, pool_size: int
) -> dict[str, float]:
    pool = await asyncpg.create_pool(url, min_size=pool_size, max_size=pool_size)
    assert pool is not None
    todo = iter(range(n))
    latencies: list[float] = []

    async def accept_one(i: int) -> None:
        tenant = tenants[i % len(tenants)]
        dispatch_id, key = uuid.uuid4(), uuid.uuid4().hex
        payload = json.dumps(
            {"body": "Reminder: your appointment is at 10:30", "subject": None,
             "data": {"time": "10:30"}}
        )  # fmt: skip
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(_TENANT, tenant)
            await conn.execute(
                _KEY, tenant, key, key[:16], json.dumps({"dispatch_id": str(dispatch_id)})
            )
            await conn.execute(
                _ROW, dispatch_id, tenant, key, "reminder", "reminders", "+15551230000", payload
            )
            await conn.execute(
                _EVENT, tenant, str(dispatch_id),
                json.dumps({"id": str(dispatch_id), "status": "queued"}),
            )  # fmt: skip

    async def lane() -> None:
        for i in todo:
            began = time.perf_counter()
            await accept_one(i)
            latencies.append(time.perf_counter() - began)

    try:
        for i in range(pool_size):  # warm: every connection opened, statements prepared
            await accept_one(n + i)
        started = time.perf_counter()
        await asyncio.gather(*(lane() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    finally:
        await pool.close()
    latencies.sort()
    return {
        "seconds": seconds,
        "accepted": float(n),
        "latency_p50": _percentile(latencies, 50),
        "latency_p99": _percentile(latencies, 99),
    }


def asyncpg_accepts(
    url: str, tenants: Sequence[str], n: int, *, concurrency: int, pool_size: int
) -> dict[str, float]:
    """``n`` accept transactions, ``concurrency`` in flight over ``pool_size`` connections.

    On a plain :class:`asyncio.SelectorEventLoop`, named explicitly: importing Triage's
    modules installs trio-asyncio's loop policy, under which ``asyncio.run`` would run
    the baseline on trio-asyncio's loop (slower: it understated the baseline)."""
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(_asyncpg_main(url, tenants, n, concurrency, pool_size))


_TPS = re.compile(r"tps = ([0-9.]+) \((?:without initial connection time|excluding connections)")
_LATENCY = re.compile(r"latency average = ([0-9.]+) ms")


def pgbench_accepts(
    url: str, tenants: Sequence[str], *, clients: int, threads: int, seconds: float
) -> dict[str, float]:
    """pgbench running :data:`PGBENCH_SCRIPT` for ``seconds``: transactions per second."""
    binary = shutil.which("pgbench")
    if binary is None:
        raise RuntimeError("pgbench is not installed (Debian: postgresql-client)")
    with tempfile.TemporaryDirectory(prefix="triage-pgbench-") as tmp:
        script = Path(tmp) / "accept.sql"
        ids = ", ".join(f"'{uuid.UUID(t)}'" for t in tenants)  # uuids: nothing to escape
        script.write_text(PGBENCH_SCRIPT.format(count=len(tenants), tenants=ids))
        argv = [
            binary, "--no-vacuum", "--protocol=prepared", f"--client={clients}",
            f"--jobs={threads}", f"--time={max(1, round(seconds))}", f"--file={script}", url,
        ]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"pgbench exited {done.returncode}: {done.stderr.strip()}")
    tps = _TPS.search(done.stdout)
    if tps is None:
        raise RuntimeError(f"no tps in pgbench's output:\n{done.stdout}")
    latency = _LATENCY.search(done.stdout)
    return {
        "tps": float(tps.group(1)),
        "latency_avg": float(latency.group(1)) / 1000 if latency else math.nan,
    }
