"""The ``relay`` perf suite: outbox relay throughput against a raw nats-py JetStream publish loop.

``relay`` (events/s)
    N events are committed to the outbox first (several aggregates of three
    tenants); then :class:`~actors.outbox_relay.OutboxRelay` (``[relay]`` and
    ``breakers.nats_publish`` of ``config/default.toml``, so batches of
    ``batch_size``) runs until every row is marked published, i.e. acknowledged
    by JetStream. Timed from the relay's start (its stream already checked) to
    the last row marked. Then the stream is read back: N messages, one per
    outbox id, in seq order per aggregate (``details.order_ok`` = 1).
``baseline`` (same run, same server build, same stream settings)
    Plain asyncio nats-py: the very same payloads and headers (``Nats-Msg-Id``
    included), published ``batch_size`` at a time with ``js.publish_async`` and
    every ack of a batch awaited under one timeout before the next batch -- the
    relay's own batching (a batch goes out once the one before is acked), without
    the database, the bridge or Trio. It runs on a plain
    ``asyncio.SelectorEventLoop`` made for it: importing our modules installs
    trio-asyncio's event loop policy, under which ``asyncio.run`` would drive the
    baseline with trio-asyncio's loop and understate it (about 3x here).

Besides the rates, ``details`` has each side's CPU time per event
(``cpu_us_per_event`` of the best-rate sample, this process only: the servers'
CPU is not in it), steadier than the rates on a loaded machine.

Each contender runs in a fresh interpreter with its own embedded servers
(start-up, migrations and the seeding of rows are outside the timing).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Sequence

import asyncpg
import nats
import trio

import config
from actors.outbox_relay import RelayStatistics, relay_child
from bench.chaos.scenario_nats import check_order, open_backbone
from bench.perf.common import Better, Result, Target, Worker, measure_alternating
from config import engine_kwargs
from engine.breaker import Breaker
from providers import jetstream
from providers.bridge import run
from providers.db.outbox import HEADER_AGGREGATE, HEADER_SEQ, HEADER_TENANT
from providers.embedded import EmbeddedNats

__all__ = ["CASES", "run_suite"]

MODULE = __name__ if __name__ != "__main__" else "bench.perf.relay"
AGGREGATES_PER_TENANT = 20
TENANTS = 3
SUBJECT = "triage.events.appointment"


def _relay_config() -> config.TriageConfig:
    return config.load_config(config.default_path("default.toml"))


def _payload(n: int, tenant: str, aggregate: str) -> str:
    return json.dumps({"n": n, "tenant": tenant, "aggregate": aggregate, "body": "x" * 64})


async def _seed(url: str, tenants: Sequence[uuid.UUID], n: int) -> None:
    """Commit n events as the superuser, in batches (the trigger assigns id and seq)."""
    conn = await asyncpg.connect(url)
    try:
        rows = []
        for i in range(n):
            tenant = tenants[i % len(tenants)]
            aggregate = f"a{(i // len(tenants)) % AGGREGATES_PER_TENANT}"
            rows.append((tenant, "appointment", aggregate, 1, SUBJECT,
                         _payload(i, str(tenant), aggregate)))  # fmt: skip
        for start in range(0, n, 5000):
            async with conn.transaction():
                await conn.executemany(
                    "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject,"
                    " payload) VALUES ($1, $2, $3, $4, $5, $6::jsonb)",
                    rows[start : start + 5000],
                )
        await conn.execute("ANALYZE outbox")  # what autovacuum does after a bulk write
    finally:
        await conn.close()


async def _relay_main(n: int) -> dict[str, float]:
    cfg = _relay_config()
    async with open_backbone(tenants=TENANTS) as backbone:
        await run(_seed, backbone.postgres.url, backbone.tenants, n)
        breaker = Breaker("nats_publish", **engine_kwargs(cfg.breakers["nats_publish"]))
        spec, relay = relay_child(
            pool=backbone.pool, client=backbone.client, config=cfg.relay, breaker=breaker,
            mailbox=cfg.mailboxes["relay"], shutdown_s=cfg.supervisors["relay"].shutdown_s,
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            await nursery.start(spec.start)
            began, cpu = time.perf_counter(), time.process_time()
            while True:  # polled: the relay's counter is no event (2 ms << the run)
                stats: RelayStatistics = relay.statistics()
                if stats.published >= n:
                    break
                await trio.sleep(0.002)
            elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
            nursery.cancel_scope.cancel()
        stored = await run(jetstream.read_stream, backbone.client, cfg.relay.stream)
    ids = {m.msg_id for m in stored}
    order_ok = len(stored) == n and len(ids) == n and not check_order(stored)
    return {
        "seconds": elapsed, "cpu_s": cpu, "order_ok": 1.0 if order_ok else 0.0,
        "failed": stats.failed, "turns": stats.turns,
    }  # fmt: skip


def relay_ours(n: int) -> dict[str, float]:
    return trio.run(_relay_main, n)


async def _raw_main(url: str, n: int) -> dict[str, float]:
    cfg = _relay_config().relay
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=cfg.stream, subjects=[cfg.subjects],
                        duplicate_window=cfg.duplicate_window_s)  # fmt: skip
    tenants = [str(uuid.uuid4()) for _ in range(TENANTS)]
    seqs: dict[tuple[str, str], int] = {}
    messages = []
    for i in range(n):
        tenant = tenants[i % TENANTS]
        aggregate = f"a{(i // TENANTS) % AGGREGATES_PER_TENANT}"
        seq = seqs[(tenant, aggregate)] = seqs.get((tenant, aggregate), 0) + 1
        headers = {
            jetstream.MSG_ID_HEADER: str(i + 1),
            HEADER_TENANT: tenant,
            HEADER_AGGREGATE: f"appointment/{aggregate}",
            HEADER_SEQ: str(seq),
        }
        messages.append((_payload(i, tenant, aggregate).encode(), headers))
    batch = cfg.batch_size
    began, cpu = time.perf_counter(), time.process_time()
    for start in range(0, n, batch):
        futures = [
            await js.publish_async(SUBJECT, payload, headers=headers)
            for payload, headers in messages[start : start + batch]
        ]
        done, pending = await asyncio.wait(futures, timeout=cfg.ack_timeout_s)
        if pending or any(f.exception() is not None for f in done):
            raise RuntimeError("raw baseline: a publish was not acknowledged")
    elapsed, cpu = time.perf_counter() - began, time.process_time() - cpu
    await nc.close()
    return {"seconds": elapsed, "cpu_s": cpu}


def relay_raw(n: int) -> dict[str, float]:
    # Importing our modules installs trio-asyncio's event loop policy, under which
    # asyncio.run would drive the baseline with trio-asyncio's loop: a plain
    # selector loop, made here, is what a raw nats-py program runs on.
    loop = asyncio.SelectorEventLoop()
    try:
        with EmbeddedNats() as server:
            return loop.run_until_complete(_raw_main(server.url, n))
    finally:
        loop.close()


CASES: dict[str, Worker] = {"relay_ours": relay_ours, "relay_raw": relay_raw}


def run_suite(
    n: int, *, repeat: int, progress: Callable[[str], None] | None = None
) -> list[Result]:
    """Measure the relay against the raw loop, ``repeat`` alternating rounds."""
    if progress is not None:
        progress("relay_ours vs relay_raw")
    samples = measure_alternating(
        MODULE, [("relay_ours", n), ("relay_raw", n)], repeat=repeat, progress=progress
    )
    ours, raw = samples["relay_ours"], samples["relay_raw"]
    order_ok = min(s["order_ok"] for s in ours)
    fastest = min(ours, key=lambda s: s["seconds"])
    fastest_raw = min(raw, key=lambda s: s["seconds"])
    batch = _relay_config().relay.batch_size
    result = Result.build(
        name="relay",
        unit="events/s",
        baseline=(
            f"raw asyncio nats-py js.publish_async loop on a plain SelectorEventLoop, same"
            f" payloads and Nats-Msg-Id headers, {batch} per batch with the batch's acks"
            f" awaited together, same nats-server build"
        ),
        samples=[n / s["seconds"] for s in ours],
        baseline_samples=[n / s["seconds"] for s in raw],
        better=Better.HIGHER,
        targets=[Target("ratio", ">=", 0.8)],
        note=(
            f"{n} committed outbox rows ({TENANTS} tenants x {AGGREGATES_PER_TENANT} aggregates)"
            f" to acked JetStream messages, batch_size {batch}; order per aggregate"
            f" {'verified' if order_ok else 'BROKEN'}"
        ),
        details={
            "order_ok": order_ok,
            "batch_size": float(batch),
            "session_s": _relay_config().relay.session_s,
            "cpu_us_per_event": fastest["cpu_s"] / n * 1e6,
            "baseline_cpu_us_per_event": fastest_raw["cpu_s"] / n * 1e6,
            "turns": fastest["turns"],
        },
    )
    if not order_ok:
        result.passed = False
    return [result]
