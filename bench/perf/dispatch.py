"""The ``dispatch`` perf suite: end-to-end SMS dispatch throughput, the accept path
against baselines that share nothing with us, and failover time.

Every throughput contender runs as in production: the SMS gateway (every
provider emulator) in its own process (:mod:`bench.perf.gateway`, reached by
address, secrets from the environment), the clients in theirs
(:mod:`bench.perf.loadgen`, raw HTTP/1.1 keep-alive); the service alone in the
measured interpreter (``cpu_ms_per_dispatch``: its CPU per timed dispatch).

``accept_vs_asyncpg`` (accepts/s)
    Ours: the rate of ``POST /v1/dispatches`` -> 202 (committed) of the
    ``dispatch`` run (the daemon also sending and applying receipts meanwhile),
    with p50/p99 accept latency in ``details``. Baseline: plain asyncio + asyncpg
    (:mod:`bench.perf.accept_raw`), the same transaction written by hand, one per
    request, same concurrency, a pool of ``[database] pool_max``. Target >= 0.5.
``accept_vs_pgbench`` (accepts/s)
    Ours as above against ``pgbench`` running the same statements (the physical
    limit); reported, no target.

``dispatch`` (dispatches/s)
    Ours: the real daemon in process (:func:`bench.chaos.channels_rig.open_rig`,
    i.e. :class:`supervisors.daemon.Daemon` with the whole channel wiring of
    :func:`supervisors.channels.build_channels`) on ``config/default.toml`` with
    ``[emulators] enabled`` (its ``receipt_delay_s``) and port 0, its own embedded
    NATS and a PostgreSQL the bench starts with ``FAST_POSTGRES`` (both sides: the
    run measures code, not this machine's fsync). N SMS dispatches enter through ``POST /v1/dispatches``
    (the HTTP API, ``Idempotency-Key`` header), ``concurrency`` client requests in
    flight; the channel dispatcher sends each to the Ghasi emulator, whose signed
    receipt comes back through the DLR ingress and marks the row ``delivered``.
    Timed from the first request to the moment all N rows read ``delivered``.
``naive`` (same run, same machine, same embedded PostgreSQL build and settings)
    A hand-written Trio program doing the same I/O without the engine: a thin
    hypercorn-on-Trio ASGI endpoint takes the same request; per request one
    transaction with the very same statement (:func:`accept_async`: idempotency
    row + dispatch row + outbox event), the same httpx POST to a Ghasi emulator
    of the same kind, the same outcome update + outbox event
    (:func:`record_outcome_async`), and a receipt endpoint that verifies the
    same signature (:func:`parse_ghasi_receipt`) and applies the same update
    (:func:`apply_receipts_async`; a receipt that overtook its send record is
    applied again until the row is ``dispatched``, as a careful hand-written
    service would). asyncpg through the same trio-asyncio bridge,
    the same pool size. No guard, breaker, bulkhead, rate limiter, actor,
    mailbox, outbox relay or NATS.

Both sides first send ``concurrency`` warm-up dispatches (connections, pools,
template cache) and wait for them to be delivered; the timed N follow. Both
sides spread the dispatches over ``TENANTS`` tenants (``tenant_sends`` limits
each tenant, not the service). Nothing lost: every timed row must be
``delivered`` (a run whose delivered count stalls ``STALL_S`` ends; the value is
then delivered rows / time of the last delivery and the result fails); the
emulator's duplicate count must be 0. ``details`` also give each side's accept
rate and its sent rate (until the emulator took all N).

``failover_p50`` / ``failover_p99`` (s)
    Ours only (the naive loop has no failover): in one daemon, ``trials`` times:
    the primary's breaker reset and faults cleared, steady sends every
    ``interval_s`` through the HTTP API; at ``t0`` the Ghasi emulator starts
    answering 503; the sample is the time from ``t0`` until the Twilio emulator
    accepts a message whose request was sent at or after ``t0``. Sends stop, the
    fault clears, every dispatch of the trial must reach a final state (lost
    otherwise). The baseline is the guard's ``timeout_s`` of the primary (what a
    failover that waited for the deadline would take); the target is on the value.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

import config
from bench.chaos.channels_rig import Rig, _seed, open_rig
from bench.chaos.harness import ChaosContext
from bench.perf.accept_raw import asyncpg_accepts, pgbench_accepts
from bench.perf.common import Better, Result, Target, Worker, measure_alternating, run_worker
from bench.perf.gateway import Gateway, open_gateway
from providers.bridge import open_bridge, run
from providers.db import DAEMON_ROLE, migrate
from providers.db.dispatches import (
    AcceptRequest,
    DispatchStatus,
    Transition,
    accept_async,
    apply_receipts_async,
    record_outcome_async,
)
from providers.embedded import EmbeddedPostgres
from providers.ghasi import parse_ghasi_receipt
from providers.receipts import ReceiptError
from providers.services import postgres_url_with
from supervisors.daemon import Daemon
from supervisors.emulated import ghasi_wire
from supervisors.vocabulary import METRICS, MITIGATIONS

if TYPE_CHECKING:
    Pool = asyncpg.Pool[asyncpg.Record]

__all__ = ["CASES", "Sizes", "run_suite"]

MODULE = __name__ if __name__ != "__main__" else "bench.perf.dispatch"
#: Tenants the dispatches are spread over (round robin).
TENANTS = 64
TEMPLATE = "reminder"
DATA = {"time": "10:30"}
RECIPIENT = "+15551230000"
#: Both sides' PostgreSQL: no fsync, so the run measures the code, not this disk.
FAST_POSTGRES = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
#: The naive receipt endpoint: a receipt that overtook its send record (row still
#: ``queued``) is applied again every ``EARLY_RETRY_S``, at most ``EARLY_ATTEMPTS`` times.
EARLY_RETRY_S = 0.02
EARLY_ATTEMPTS = 500
#: A run whose delivered count has not moved for this long is over (the rest are lost).
STALL_S = 5.0
#: How often the delivered count is polled (both sides alike).
POLL_S = 0.02
#: How often the gateway is asked how many it took (``sent_seconds``, a detail: each ask
#: is a round trip to the gateway process, paid by the measured one).
SENT_POLL_S = 0.1
#: Deadline for the delivery of every timed dispatch (a stuck run fails, it does not hang).
SETTLE_TIMEOUT_S = 120.0
#: Client timeout of the load generator's HTTP requests.
CLIENT_TIMEOUT_S = 30.0


#: Client requests in flight (the load generator's lanes), both sides.
CONCURRENCY = 64


@dataclass(frozen=True)
class Sizes:
    """What the suite runs: dispatches per sample and failover trials."""

    n: int
    trials: int

    #: seconds of pgbench per sample
    pgbench_s: int = 10

    @classmethod
    def quick(cls) -> Sizes:
        return cls(n=300, trials=20, pgbench_s=3)

    @classmethod
    def full(cls) -> Sizes:
        return cls(n=3000, trials=50, pgbench_s=10)


@dataclass(frozen=True)
class FailoverKnobs:
    """The failover trials' pacing (module doc)."""

    interval_s: float = 0.02  # one send every interval_s
    lead_s: float = 0.1  # steady sends before the fault
    wait_s: float = 5.0  # longest wait for the first secondary success
    settle_s: float = 10.0  # wait for the trial's dispatches to be recorded


# -- shared -----------------------------------------------------------------------------


def bench_config(
    postgres_url: str | None = None,
    providers: dict[str, dict[str, Any]] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
) -> config.TriageConfig:
    """``config/default.toml`` with a free port and, when given, the PostgreSQL the bench
    started (``FAST_POSTGRES``) instead of the daemon's own.

    ``providers`` (from :meth:`bench.perf.gateway.Gateway.provider_settings`): every
    vendor's address, the emulators in their own process, ``[emulators]`` off -- the
    daemon reaches them as it reaches real vendors. Without it the emulators run in
    the daemon (``[emulators] enabled``), as for the failover trials.

    The outbox relay is off (``[relay] enabled = false``, a replica that leaves the
    relaying to another): the naive loop writes the same outbox rows and publishes
    none, so both sides do the same I/O; the relay's own throughput is
    ``bench.perf relay``."""
    cfg = config.load_config(config.default_path("default.toml"))
    services = cfg.services
    if postgres_url is not None:
        services = msgspec.structs.replace(services, postgres_url=postgres_url)
    vendors = cfg.providers
    for name, fields in (providers or {}).items():
        vendors = msgspec.structs.replace(
            vendors, **{name: msgspec.structs.replace(getattr(vendors, name), **fields)}
        )
    for name, fields in (sections or {}).items():
        section = getattr(cfg, name)
        cfg = msgspec.structs.replace(
            cfg, **{name: msgspec.convert(msgspec.to_builtins(section) | fields, type(section))}
        )
    return msgspec.structs.replace(
        cfg,
        daemon=msgspec.structs.replace(cfg.daemon, port=0, log_level="warning"),
        emulators=msgspec.structs.replace(cfg.emulators, enabled=providers is None),
        relay=msgspec.structs.replace(cfg.relay, enabled=False),
        providers=vendors,
        services=services,
    )


@asynccontextmanager
async def _postgres() -> AsyncIterator[EmbeddedPostgres]:
    """An embedded PostgreSQL with ``FAST_POSTGRES`` (both sides alike), stopped at exit."""
    server = EmbeddedPostgres(settings=FAST_POSTGRES)
    await trio.to_thread.run_sync(server.start)
    try:
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.close)


def _context(cfg: config.TriageConfig) -> ChaosContext:
    catalog = config.load_catalog(
        config.catalog_path(cfg, config.default_path("default.toml")),
        metrics=METRICS,
        mitigations=MITIGATIONS,
    )
    return ChaosContext(config=cfg, catalog=catalog, quick=True)


def _body(tenant: uuid.UUID) -> dict[str, Any]:
    return {
        "tenant_id": str(tenant),
        "channel": "sms",
        "template": TEMPLATE,
        "recipient": RECIPIENT,
        "data": dict(DATA),
    }


async def _loadgen(
    port: int, tenants: Sequence[uuid.UUID], n: int, concurrency: int, *, first: int
) -> dict[str, Any]:
    """POST ``n`` dispatches from the load generator's own process (:mod:`bench.perf.loadgen`)."""
    spec = {
        "host": "127.0.0.1",
        "port": port,
        "path": "/v1/dispatches",
        "tenants": [str(t) for t in tenants],
        "n": n,
        "concurrency": concurrency,
        "first": first,
        "body": {"channel": "sms", "template": TEMPLATE, "recipient": RECIPIENT, "data": DATA},
    }
    argv = [sys.executable, "-m", "bench.perf.loadgen", json.dumps(spec)]
    done = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the load generator exited {done.returncode}: {done.stderr.decode()}")
    out: dict[str, Any] = json.loads(done.stdout.decode().splitlines()[-1])
    if out["refused"]:
        raise RuntimeError(f"dispatches refused (status: count): {out['refused']}")
    return out


async def _count_delivered(conn: asyncpg.Connection[asyncpg.Record], ids: list[str]) -> int:
    value = await conn.fetchval(
        "SELECT count(*) FROM dispatches WHERE id = ANY($1::uuid[]) AND status = 'delivered'",
        ids,
    )
    return int(value or 0)


async def _statuses(conn: asyncpg.Connection[asyncpg.Record], ids: list[str]) -> dict[str, str]:
    rows = await conn.fetch(
        "SELECT id::text AS id, status::text AS status FROM dispatches WHERE id = ANY($1::uuid[])",
        ids,
    )
    return {r["id"]: r["status"] for r in rows}


async def _count_all_delivered(conn: asyncpg.Connection[asyncpg.Record]) -> int:
    value = await conn.fetchval("SELECT count(*) FROM dispatches WHERE status = 'delivered'")
    return int(value or 0)


async def _wait_delivered(
    conn: asyncpg.Connection[asyncpg.Record], ids: list[str], timeout_s: float
) -> tuple[int, float]:
    """Poll until every row of ``ids`` is delivered, the count stalls for ``STALL_S`` or
    the time is up; (the count, ``time.monotonic()`` of its last change).

    The poll is cheap (every delivered row, less those delivered before, counted by
    PostgreSQL alone): the exact count of ``ids`` -- thousands of UUIDs encoded in this
    process, the one whose CPU is measured -- is asked only at the start and to
    confirm the end."""
    delivered, changed = 0, time.monotonic()
    exact = await run(_count_delivered, conn, ids, service="postgres")
    before = await run(_count_all_delivered, conn, service="postgres") - exact
    confirmed = False
    with trio.move_on_after(timeout_s):
        while True:
            if confirmed:
                now = await run(_count_delivered, conn, ids, service="postgres")
            else:
                now = await run(_count_all_delivered, conn, service="postgres") - before
            if now != delivered:
                delivered, changed = now, time.monotonic()
            if delivered >= len(ids) and not confirmed:
                # Another row (a late warm-up one) may have counted: make sure.
                confirmed = True
                delivered = await run(_count_delivered, conn, ids, service="postgres")
            if delivered >= len(ids) or time.monotonic() - changed > STALL_S:
                break
            await trio.sleep(POLL_S)
    if not confirmed:
        delivered = await run(_count_delivered, conn, ids, service="postgres")
    return delivered, changed


async def _load(
    port: int,
    owner: asyncpg.Connection[asyncpg.Record],
    tenants: Sequence[uuid.UUID],
    n: int,
    concurrency: int,
    gateway: Gateway,
) -> dict[str, float]:
    """Warm up, then the timed run: N dispatches until all N rows are delivered."""
    warm = await _loadgen(port, tenants, concurrency, concurrency, first=0)
    await _wait_delivered(owner, warm["ids"], SETTLE_TIMEOUT_S)
    base = (await gateway.stats())["ghasi_accepted"]
    sent_at: list[float] = []
    all_sent = trio.Event()

    async def watch_sent() -> None:
        while True:
            if (await gateway.stats())["ghasi_accepted"] >= base + n:
                sent_at.append(time.monotonic())
                all_sent.set()
                return
            await trio.sleep(SENT_POLL_S)

    cpu_before = time.process_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_sent)
        timed = await _loadgen(port, tenants, n, concurrency, first=concurrency)
        with trio.move_on_after(SETTLE_TIMEOUT_S):
            await all_sent.wait()
        nursery.cancel_scope.cancel()
    ids: list[str] = timed["ids"]
    delivered, last = await _wait_delivered(owner, ids, SETTLE_TIMEOUT_S)
    cpu = time.process_time() - cpu_before
    began = float(timed["started"])
    return {
        "seconds": last - began,
        "accept_seconds": float(timed["ended"]) - began,
        "sent_seconds": (sent_at[0] - began) if sent_at else math.inf,
        "accepted": float(len(ids)),
        "delivered": float(delivered),
        "lost": float(n - delivered),
        "accept_p50": float(timed["latency_p50"]),
        "accept_p99": float(timed["latency_p99"]),
        "accept_max": float(timed["latency_max"]),
        # CPU of this process (the service under test) per timed dispatch, in ms.
        "cpu_ms_per_dispatch": cpu / n * 1000,
    }


async def _gateway_stats(gateway: Gateway, out: dict[str, float]) -> dict[str, float]:
    stats = await gateway.stats()
    out["duplicates"] = stats["duplicates"]
    out["secondary"] = stats["twilio_accepted"]
    out["receipt_retries"] = stats["receipt_retries"]  # refused (429/5xx/no answer), re-sent
    return out


# -- ours -------------------------------------------------------------------------------


@asynccontextmanager
async def _daemon(
    cfg: config.TriageConfig, env: dict[str, str]
) -> AsyncIterator[tuple[int, str, list[uuid.UUID]]]:
    """The daemon in this process as in production: the vendors elsewhere (the gateway
    process), every address in its config and every secret in its environment."""
    daemon = Daemon(
        cfg, _context(cfg).catalog, source="bench", handle_signals=False, backbone=True, env=env
    )
    async with open_bridge(), trio.open_nursery() as nursery:
        port = await nursery.start(daemon.run)
        if daemon.backbone is None or not port:
            raise RuntimeError("the bench daemon did not start (see its log)")
        owner_url = daemon.backbone.services.postgres_url
        tenants = await run(_seed, owner_url, TENANTS, service="postgres")
        try:
            yield port, owner_url, tenants
        finally:
            daemon.request_drain("bench over")


async def _ours_main(n: int, concurrency: int) -> dict[str, float]:
    async with _postgres() as postgres, open_gateway(bench_config()) as gateway:
        with tempfile.TemporaryDirectory(prefix="triage-bench-") as keys:
            providers, env, sections = gateway.provider_settings(Path(keys))
            cfg = bench_config(postgres.url, providers, sections)
            async with _daemon(cfg, env) as (port, owner_url, tenants):
                await gateway.command(receipts=f"http://127.0.0.1:{port}")
                owner = await run(asyncpg.connect, owner_url, service="postgres")
                try:
                    out = await _load(port, owner, tenants, n, concurrency, gateway)
                finally:
                    await run(owner.close, service="postgres")
                return await _gateway_stats(gateway, out)


def dispatch_ours(n: int) -> dict[str, float]:
    return trio.run(_ours_main, n, CONCURRENCY)


# -- naive ------------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _NaiveBody(msgspec.Struct, forbid_unknown_fields=True):
    tenant_id: str
    channel: str
    template: str
    recipient: str
    data: dict[str, str] = {}
    template_version: int | None = None


@dataclass
class NaiveApp:
    """The whole naive service: one ASGI callable, two routes, no engine."""

    pool: Pool
    templates: dict[tuple[str, str], tuple[str, str, int]]  # (tenant, name) -> body, cat, ver
    ghasi_url: str
    api_key: str
    receipt_secret: str
    cfg: config.TriageConfig
    http: httpx.AsyncClient
    nursery: trio.Nursery
    dlr_path: str = "/webhooks/dlr/ghasi"
    errors: list[str] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                while True:
                    event = await receive()
                    kind = event["type"].rsplit(".", 1)[-1]
                    await send({"type": f"lifespan.{kind}.complete"})
                    if kind == "shutdown":
                        return
            return
        chunks = []
        while True:
            event = await receive()
            chunks.append(event.get("body", b""))
            if not event.get("more_body", False):
                break
        body = b"".join(chunks)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] == "/v1/dispatches":
            status, answer = await self.dispatch(headers, body)
        elif scope["path"] == self.dlr_path:
            status, answer = await self.receipt(headers, body)
        else:
            status, answer = 404, {"error": "not_found"}
        payload = msgspec.json.encode(answer)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def dispatch(self, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        key = headers.get("idempotency-key")
        if not key:
            return 400, {"error": "missing_idempotency_key"}
        try:
            body = msgspec.json.decode(raw, type=_NaiveBody)
        except msgspec.DecodeError as exc:
            return 400, {"error": f"invalid_json: {exc}"}
        template = self.templates.get((body.tenant_id, body.template))
        if template is None:
            return 422, {"error": "template_not_found"}
        text, category, version = template
        material = msgspec.json.encode(
            [body.channel, body.recipient, body.template, body.template_version,
             sorted(body.data.items())]
        )  # fmt: skip
        dispatch_id = uuid.uuid4()
        req = AcceptRequest(
            dispatch_id=dispatch_id,
            tenant_id=body.tenant_id,
            idempotency_key=key,
            request_hash=hashlib.sha256(material).hexdigest(),
            channel=body.channel,
            template=body.template,
            template_version=version,
            category=category,
            recipient=body.recipient,
            body=text.format(**body.data),
            subject=None,
            data=body.data,
            key_ttl_s=self.cfg.idempotency.key_ttl_s,
        )
        result = await run(accept_async, self.pool, req, service="postgres")
        if not result.created:
            return 200, {"dispatch_id": str(result.dispatch_id), "status": str(result.status)}
        self.nursery.start_soon(self.send_one, req)
        return 202, {"dispatch_id": str(dispatch_id), "status": "queued"}

    async def send_one(self, req: AcceptRequest) -> None:
        wire = ghasi_wire(self.cfg)
        payload = {
            wire.to_field: req.recipient,
            wire.text_field: req.body,
            wire.sender_field: self.cfg.providers.ghasi.sender,
            wire.ref_field: f"{req.tenant_id}:{req.dispatch_id}",
        }
        headers = {
            wire.auth_header: wire.auth_value(self.api_key),
            wire.idempotency_header: req.idempotency_key,
        }
        try:
            answer = await self.http.post(
                self.ghasi_url + wire.send_path, json=payload, headers=headers
            )
            answer.raise_for_status()
            provider_ref = answer.json()[wire.id_field]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            self.errors.append(repr(exc))
            return
        step = Transition(
            req.dispatch_id, DispatchStatus.DISPATCHED, provider="ghasi", provider_ref=provider_ref
        )
        await run(record_outcome_async, self.pool, req.tenant_id, [step], service="postgres")

    async def receipt(self, headers: dict[str, str], raw: bytes) -> tuple[int, Any]:
        try:
            receipt = parse_ghasi_receipt(
                headers,
                raw,
                secret=self.receipt_secret,
                now=time.time(),
                tolerance_s=self.cfg.providers.ghasi.receipt_tolerance_s,
                wire=ghasi_wire(self.cfg),
            )
        except ReceiptError as exc:
            return 400, {"error": str(exc)}
        for _ in range(EARLY_ATTEMPTS):  # overtook its send record: wait for it
            report = await run(apply_receipts_async, self.pool, [receipt], service="postgres")
            if not report.out_of_order:
                break
            await trio.sleep(EARLY_RETRY_S)
        return 200, {"ok": True}


async def _naive_templates(url: str) -> dict[tuple[str, str], tuple[str, str, int]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT tenant_id::text AS t, name, body, category, version FROM templates"
            " WHERE active AND channel = 'sms'"
        )
        return {(r["t"], r["name"]): (r["body"], r["category"], r["version"]) for r in rows}
    finally:
        await conn.close()


@asynccontextmanager
async def _naive_service(
    cfg: config.TriageConfig, gateway: Gateway
) -> AsyncIterator[tuple[int, str, list[uuid.UUID], NaiveApp]]:
    """Embedded PostgreSQL (as ours), the naive app served, the gateway's Ghasi emulator."""
    endpoints = gateway.endpoints
    assert endpoints is not None
    async with _postgres() as postgres, open_bridge():
        await migrate(postgres.url)
        tenants = await run(_seed, postgres.url, TENANTS, service="postgres")
        templates = await run(_naive_templates, postgres.url, service="postgres")
        db = cfg.database
        create = functools.partial(
            asyncpg.create_pool,
            postgres_url_with(postgres.url, user=DAEMON_ROLE),
            min_size=db.pool_min,
            max_size=db.pool_max,
            timeout=db.connect_timeout_s,
            command_timeout=db.command_timeout_s,
        )
        pool: Pool = await run(create, service="postgres")
        timeout = cfg.guards[cfg.providers.ghasi.guard].timeout_s
        try:
            async with (
                httpx.AsyncClient(timeout=timeout) as http,
                trio.open_nursery() as nursery,
            ):
                app = NaiveApp(
                    pool=pool,
                    templates=templates,
                    ghasi_url=endpoints.ghasi_url,
                    api_key=endpoints.ghasi_api_key,
                    receipt_secret=endpoints.ghasi_receipt_secret,
                    cfg=cfg,
                    http=http,
                    nursery=nursery,
                )
                hc = HypercornConfig()
                hc.bind = [f"{cfg.daemon.host}:0"]
                hc.errorlog = None
                hc.accesslog = None
                binds = await nursery.start(
                    functools.partial(serve, app, hc, mode="asgi")  # type: ignore[arg-type]  # hypercorn types ASGI apps with TypedDicts
                )
                base = binds[0]
                await gateway.command(receipts=base)
                yield int(base.rsplit(":", 1)[1]), postgres.url, tenants, app
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await run(pool.close, service="postgres")


async def _naive_main(n: int, concurrency: int) -> dict[str, float]:
    cfg = bench_config()
    async with (
        open_gateway(cfg) as gateway,
        _naive_service(cfg, gateway) as (port, owner_url, tenants, app),
    ):
        owner = await run(asyncpg.connect, owner_url, service="postgres")
        try:
            out = await _load(port, owner, tenants, n, concurrency, gateway)
        finally:
            await run(owner.close, service="postgres")
        out["send_errors"] = float(len(app.errors))
        return await _gateway_stats(gateway, out)


def dispatch_naive(n: int) -> dict[str, float]:
    return trio.run(_naive_main, n, CONCURRENCY)


# -- baselines sharing nothing with us: plain asyncio + asyncpg, and pgbench ----------------


async def _seeded_database(postgres: EmbeddedPostgres) -> list[uuid.UUID]:
    """Set-up, outside any timing: the schema and the tenants, as for ours."""
    async with open_bridge():
        await migrate(postgres.url)
        return await run(_seed, postgres.url, TENANTS, service="postgres")


def accept_asyncpg(n: int) -> dict[str, float]:
    """:func:`bench.perf.accept_raw.asyncpg_accepts` on a fresh embedded PostgreSQL."""
    cfg = bench_config()
    server = EmbeddedPostgres(settings=FAST_POSTGRES)
    server.start()
    try:
        tenants = trio.run(_seeded_database, server)
        return asyncpg_accepts(
            postgres_url_with(server.url, user=DAEMON_ROLE),
            [str(t) for t in tenants],
            n,
            concurrency=CONCURRENCY,
            pool_size=cfg.database.pool_max,
        )
    finally:
        server.close()


def accept_pgbench(seconds: int) -> dict[str, float]:
    """:func:`bench.perf.accept_raw.pgbench_accepts` for ``seconds`` on a fresh embedded
    PostgreSQL: as many clients as our pool has connections, one thread per core."""
    cfg = bench_config()
    server = EmbeddedPostgres(settings=FAST_POSTGRES)
    server.start()
    try:
        tenants = trio.run(_seeded_database, server)
        return pgbench_accepts(
            postgres_url_with(server.url, user=DAEMON_ROLE),
            [str(t) for t in tenants],
            clients=cfg.database.pool_max,
            threads=os.cpu_count() or 1,
            seconds=seconds,
        )
    finally:
        server.close()


# -- failover ---------------------------------------------------------------------------


@dataclass
class _TrialState:
    t0: float = math.inf
    after: list[str] = field(default_factory=list)  # keys sent at or after t0
    ids: list[str] = field(default_factory=list)  # dispatch ids accepted


async def _trial(rig: Rig, sizes: FailoverKnobs, *, first: int) -> tuple[float | None, list[str]]:
    """One failover trial (module doc): the sample (None: no secondary success in time)."""
    channels = rig.tree.channels
    assert channels is not None
    ghasi, twilio = rig.emulated.ghasi, rig.emulated.twilio
    ghasi.clear_faults()
    channels.guards["ghasi"].breaker.reset("bench trial")
    state = _TrialState()

    async def one(i: int) -> None:
        key = uuid.uuid4().hex
        if trio.current_time() >= state.t0:
            state.after.append(key)
        answer = await rig.client.post(
            "/v1/dispatches",
            json=_body(rig.tenants[i % len(rig.tenants)]),
            headers={"Idempotency-Key": key},
        )
        if answer.is_success:
            state.ids.append(answer.json()["dispatch_id"])

    def through_secondary() -> bool:
        return any(twilio.accepted[k] for k in state.after)

    sample: float | None = None
    async with trio.open_nursery() as senders:

        async def steady() -> None:
            i = first
            while True:
                senders.start_soon(one, i)
                i += 1
                await trio.sleep(sizes.interval_s)

        senders.start_soon(steady)
        await trio.sleep(sizes.lead_s)
        state.t0 = trio.current_time()
        ghasi.set_faults(status=503)
        with trio.move_on_after(sizes.wait_s):
            await twilio.wait_until(through_secondary)
        if through_secondary():
            sample = trio.current_time() - state.t0
        senders.cancel_scope.cancel()
    ghasi.clear_faults()
    return sample, state.ids


async def _failover_main(trials: int, sizes: FailoverKnobs) -> dict[str, float]:
    samples: list[float] = []
    missed = lost = sent = 0
    async with (
        _postgres() as postgres,
        open_rig(_context(cfg := bench_config(postgres.url)), tenants=TENANTS) as rig,
    ):
        owner = await run(asyncpg.connect, rig.owner_url, service="postgres")
        try:
            for trial in range(trials):
                sample, ids = await _trial(rig, sizes, first=trial * 10_000)
                if sample is None:
                    missed += 1
                else:
                    samples.append(sample)
                sent += len(ids)
                # Settled for failover: the send's outcome is recorded (receipts are the
                # throughput result's business).
                final = {"dispatched", "delivered", "failed", "undeliverable", "unknown"}
                with trio.move_on_after(sizes.settle_s):
                    while True:
                        rows = await run(_statuses, owner, ids, service="postgres")
                        if all(rows.get(i) in final for i in ids):
                            break
                        await trio.sleep(POLL_S * 5)
                rows = await run(_statuses, owner, ids, service="postgres")
                lost += sum(1 for i in ids if rows.get(i) not in final)
        finally:
            await run(owner.close, service="postgres")
        duplicates = rig.emulated.duplicates()
    samples.sort()
    out: dict[str, float] = {
        "trials": float(trials),
        "missed": float(missed),
        "lost": float(lost),
        "sent": float(sent),
        "duplicates": float(duplicates),
        "guard_timeout_s": cfg.guards[cfg.providers.ghasi.guard].timeout_s,
    }
    for i, value in enumerate(samples):
        out[f"s{i}"] = value
    return out


def failover_ours(n: int) -> dict[str, float]:
    return trio.run(_failover_main, n, FailoverKnobs())


CASES: dict[str, Worker] = {
    "dispatch_ours": dispatch_ours,
    "dispatch_naive": dispatch_naive,
    "failover_ours": failover_ours,
    "accept_asyncpg": accept_asyncpg,
    "accept_pgbench": accept_pgbench,
}


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def run_suite(
    sizes: Sizes, *, repeat: int, progress: Callable[[str], None] | None = None
) -> list[Result]:
    """Ours vs the naive loop, the raw asyncpg loop and pgbench (``repeat`` alternating
    rounds), then the failover trials."""
    if progress is not None:
        progress("dispatch_ours vs dispatch_naive vs accept_asyncpg vs accept_pgbench")
    samples = measure_alternating(
        MODULE,
        [
            ("dispatch_ours", sizes.n),
            ("dispatch_naive", sizes.n),
            ("accept_asyncpg", sizes.n),
            ("accept_pgbench", sizes.pgbench_s),
        ],
        repeat=repeat,
        progress=progress,
    )
    ours, naive = samples["dispatch_ours"], samples["dispatch_naive"]
    raw, pgbench = samples["accept_asyncpg"], samples["accept_pgbench"]
    lost = max(s["lost"] for s in ours) + max(s["lost"] for s in naive)
    duplicates = max(s["duplicates"] for s in ours) + max(s["duplicates"] for s in naive)
    cfg = bench_config()
    throughput = Result.build(
        name="dispatch",
        unit="dispatches/s",
        baseline=(
            "hand-written Trio loop: thin hypercorn endpoint, same accept_async statement,"
            " same httpx POST to a Ghasi emulator, same record_outcome_async and signed"
            " receipt -> apply_receipts_async; same bridge, pool size, PostgreSQL settings;"
            " no engine"
        ),
        samples=[s["delivered"] / s["seconds"] for s in ours],
        baseline_samples=[s["delivered"] / s["seconds"] for s in naive],
        better=Better.HIGHER,
        targets=[Target("ratio", ">=", 0.8), Target("value", ">=", 500.0)],
        note=(
            f"{sizes.n} SMS dispatches via POST /v1/dispatches, {CONCURRENCY} in flight,"
            f" {TENANTS} tenants, until every row is delivered by the Ghasi receipt (with"
            f" losses: delivered rows / time of the last delivery);"
            f" lost {lost:g}, emulator duplicates {duplicates:g}"
        ),
        details={
            "lost": lost,
            "ours_lost": max(s["lost"] for s in ours),
            "naive_lost": max(s["lost"] for s in naive),
            "duplicates": duplicates,
            "ours_accept_per_s": max(sizes.n / s["accept_seconds"] for s in ours),
            "naive_accept_per_s": max(sizes.n / s["accept_seconds"] for s in naive),
            "ours_sent_per_s": max(sizes.n / s["sent_seconds"] for s in ours),
            "naive_sent_per_s": max(sizes.n / s["sent_seconds"] for s in naive),
            "ours_secondary": max(s["secondary"] for s in ours),
            "naive_send_errors": max(s["send_errors"] for s in naive),
            "ours_cpu_ms_per_dispatch": min(s["cpu_ms_per_dispatch"] for s in ours),
            "naive_cpu_ms_per_dispatch": min(s["cpu_ms_per_dispatch"] for s in naive),
        },
    )
    if lost or duplicates:
        throughput.passed = False
    fastest = max(ours, key=lambda s: sizes.n / s["accept_seconds"])
    accept_note = (
        f"ours: POST /v1/dispatches -> 202 (committed) while the daemon also sends and"
        f" applies receipts, {CONCURRENCY} in flight from the load generator's own process;"
        f" accept latency of ours p50 {fastest['accept_p50'] * 1000:.1f} ms,"
        f" p99 {fastest['accept_p99'] * 1000:.1f} ms"
    )
    latency = {
        "accept_p50_s": fastest["accept_p50"],
        "accept_p99_s": fastest["accept_p99"],
        "accept_max_s": fastest["accept_max"],
    }
    accept_vs_asyncpg = Result.build(
        name="accept_vs_asyncpg",
        unit="accepts/s",
        baseline=(
            "plain asyncio + asyncpg (bench/perf/accept_raw.py, no Trio, no bridge):"
            f" {CONCURRENCY} tasks, a pool of [database] pool_max connections, one"
            " transaction per request (tenant, key, row, event) as the daemon's role"
        ),
        samples=[sizes.n / s["accept_seconds"] for s in ours],
        baseline_samples=[s["accepted"] / s["seconds"] for s in raw],
        better=Better.HIGHER,
        targets=[Target("ratio", ">=", 0.5)],
        note=accept_note,
        details={
            **latency,
            "baseline_p50_s": min(s["latency_p50"] for s in raw),
            "baseline_p99_s": min(s["latency_p99"] for s in raw),
        },
    )
    accept_vs_pgbench = Result.build(
        name="accept_vs_pgbench",
        unit="accepts/s",
        baseline=(
            "pgbench (C, prepared statements) running the same transaction, as many"
            " clients as [database] pool_max: the physical limit of this machine"
        ),
        samples=[sizes.n / s["accept_seconds"] for s in ours],
        baseline_samples=[s["tps"] for s in pgbench],
        better=Better.HIGHER,
        targets=[],
        note=accept_note + "; reported, no target: pgbench shares no Python at all",
        details={**latency, "baseline_latency_avg_s": min(s["latency_avg"] for s in pgbench)},
    )
    if progress is not None:
        progress(f"failover_ours: {sizes.trials} trials")
    failover = run_worker(MODULE, "failover_ours", sizes.trials)
    times = [v for k, v in failover.items() if k.startswith("s") and k[1:].isdigit()]
    guard_timeout = failover["guard_timeout_s"]
    ok = failover["missed"] == 0 and failover["lost"] == 0 and failover["duplicates"] == 0
    details = {k: failover[k] for k in ("trials", "missed", "lost", "sent", "duplicates")}
    results = [throughput, accept_vs_asyncpg, accept_vs_pgbench]
    for name, q, targets in (
        ("failover_p50", 50.0, []),
        ("failover_p99", 99.0, [Target("value", "<=", 1.0)]),
    ):
        value = percentile(times, q) if times else math.inf
        result = Result.build(
            name=name,
            unit="s",
            baseline=f"the primary guard's timeout_s ([guards.{cfg.providers.ghasi.guard}])",
            samples=[value],
            baseline_samples=[guard_timeout],
            better=Better.LOWER,
            targets=targets,
            note=(
                f"primary (Ghasi emulator) answers 503 from t0; time until the Twilio emulator"
                f" accepts a message sent at or after t0; {len(times)} of"
                f" {failover['trials']:g} trials, sends every {FailoverKnobs().interval_s:g} s"
            ),
            details=details,
        )
        if not ok:
            result.passed = False
        results.append(result)
    return results


if __name__ == "__main__":  # a worker by hand: python -m bench.perf.dispatch CASE N
    import sys

    print(json.dumps(CASES[sys.argv[1]](int(sys.argv[2]))))
