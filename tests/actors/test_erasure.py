"""Row 15 on real PostgreSQL, Redis and NATS JetStream: the erasure saga, its receipt,
the reconciler's replay, exemptions and the ``deny_purge`` refusal."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats.js.api
import pytest
import trio
from prometheus_client import CollectorRegistry

from actors.erasure_saga import (
    Erase,
    ErasureResidue,
    ErasureSaga,
    GetReceipt,
    PurgeDenied,
    Receipt,
    Reconcile,
    verify_receipt,
)
from bench.chaos.erasure_rig import (
    Patient,
    Stores,
    inject_late_events,
    search_everything,
    seed_patient,
)
from bench.chaos.fixtures import create_tenants
from config.schema import ERASURE_CLASSES, DatabaseConfig, ErasureConfig
from engine.actor import actor_child
from engine.errors import TriageError
from engine.events import Event, EventBus
from providers import jetstream
from providers.blobstore import LocalBlobStore
from providers.bridge import run
from providers.db.migrate import migrate
from providers.db.pool import open_pool
from providers.db.roles import DAEMON_ROLE
from providers.redis_cache import close_client, open_client
from providers.services import postgres_url_with

KEY = b"k" * 32
STREAM = "TRIAGE_EVENTS"
# The streams the saga reads whole (ErasureConfig's defaults), a subject of each.
SCANNED = (("TRIAGE_SCHEDULING", "triage.scheduling.appointment.booked"),
           ("TRIAGE_EVENTS_DLQ", "triage.dlq.outbox"))  # fmt: skip


@dataclass
class World:
    stores: Stores
    saga: Any
    ref: Any
    tenants: list[uuid.UUID]
    bus: EventBus
    seen: list[Event]
    registry: CollectorRegistry


def _saga(
    w_pool: Any, stores: Stores, config: ErasureConfig, bus: EventBus, registry: CollectorRegistry
) -> ErasureSaga:
    return ErasureSaga(
        w_pool,
        config,
        key=KEY,
        redis=stores.redis,
        blobs=stores.blobs,
        recordings_incoming=str(stores.incoming),
        jetstream=stores.js,
        registry=registry,
        events=bus,
    )


@pytest.fixture
async def world(
    bridge: object, postgres_url: str, nats_url: str, redis_url: str, tmp_path: Path
) -> AsyncIterator[World]:
    await migrate(postgres_url)
    tenants = await run(create_tenants, postgres_url, 2)
    js = await run(jetstream.connect, nats_url, service="nats")
    await run(jetstream.ensure_stream, js, STREAM, ["triage.events.>"], 120.0, service="nats")
    for name, subject in SCANNED:
        await run(jetstream.ensure_stream, js, name, [subject], 120.0, service="nats")
    redis = await run(open_client, redis_url, 2.0, service="redis")
    stores = Stores(
        owner_url=postgres_url,
        redis=redis,
        blobs=LocalBlobStore(tmp_path / "blobs", fsync=False),
        incoming=tmp_path / "incoming",
        store=tmp_path / "store",
        js=js,
        stream=STREAM,
        scanned=SCANNED,
    )
    daemon = postgres_url_with(postgres_url, user=DAEMON_ROLE)
    bus, registry = EventBus(), CollectorRegistry()
    seen: list[Event] = []
    bus.on(Event, seen.append)
    config = ErasureConfig(reconcile_interval_s=3600.0)
    try:
        async with open_pool(daemon, DatabaseConfig(), close_s=2.0) as pool:
            saga = _saga(pool, stores, config, bus, registry)
            spec, ref = actor_child("erasure_saga", lambda: saga, capacity=8, shutdown_s=2.0)
            async with trio.open_nursery() as nursery:
                await nursery.start(spec.start)
                yield World(stores, saga, ref, tenants, bus, seen, registry)
                nursery.cancel_scope.cancel()
    finally:
        await run(close_client, redis, service="redis")
        await run(jetstream.close, js, service="nats")


def _patients(w: World) -> tuple[Patient, Patient]:
    return (
        Patient(w.tenants[0], "pat-a1b2c3", "+15550001001"),
        Patient(w.tenants[0], "pat-d4e5f6", "+15550001002"),
    )


async def _erase(w: World, p: Patient) -> Receipt:
    got = await w.ref.ask(
        Erase(tenant_id=p.tenant_id, patient_id=p.patient_id, identifiers=(p.phone,)),
        timeout_s=None,
    )
    assert isinstance(got, Receipt)
    return got


async def test_erasure_leaves_nothing_in_any_store_and_the_receipt_lists_each(world: World) -> None:
    w = world
    target, other = _patients(w)
    for p in (target, other):
        await seed_patient(w.stores, p, w.saga.subject_prefix(p.tenant_id, p.patient_id), items=3)
    prefix = w.saga.subject_prefix(target.tenant_id, target.patient_id)
    before = await search_everything(w.stores, target, prefix)
    assert {
        "redis",
        "files",
        "jetstream:TRIAGE_EVENTS",
        "jetstream:TRIAGE_SCHEDULING",
        "jetstream:TRIAGE_EVENTS_DLQ",
        "postgres:dispatches",
        "postgres:outbox",
        "postgres:dead_letters(payload)",
        "postgres:virtual_sessions",
        "postgres:fallback_threads",
        "postgres:thread_participants",
        "postgres:recordings",
    } <= before.keys()
    receipt = await _erase(w, target)
    assert await search_everything(w.stores, target, prefix) == {}
    # The other patient keeps everything.
    other_prefix = w.saga.subject_prefix(other.tenant_id, other.patient_id)
    assert await search_everything(w.stores, other, other_prefix) == before
    assert verify_receipt(receipt, KEY)
    steps = {s["data_class"]: s for s in receipt.body["steps"]}
    assert set(steps) == set(ERASURE_CLASSES)
    assert all(s["status"] == "done" for s in steps.values())
    # 3 purged by the patient's subject, 1 deleted from each scanned stream
    assert (steps["dispatches"]["erased"], steps["jetstream"]["erased"]) == (3, 5)
    assert (steps["idempotency_db"]["erased"], steps["idempotency_redis"]["erased"]) == (3, 3)
    assert steps["attachments"]["erased"] == 6  # 3 rows + 3 blobs
    assert steps["recordings"]["erased"] == 3  # the row, the stored copy, the incoming file
    assert steps["outbox"]["erased"] == 6 and steps["dead_letters"]["erased"] == 1
    assert receipt.body["patient_token"] not in (target.patient_id, target.phone)
    assert target.patient_id not in str(receipt.body) and target.phone not in str(receipt.body)
    assert set(receipt.body["horizons"]) == {"wal", "backups"}
    # A tampered receipt does not verify.
    forged = Receipt(body={**receipt.body, "attempt": 9}, signature=receipt.signature)
    assert not verify_receipt(forged, KEY)
    # Fetched again, it is the stored one.
    stored = await w.ref.ask(
        GetReceipt(tenant_id=target.tenant_id, patient_id=target.patient_id), timeout_s=None
    )
    assert stored == receipt
    # Replayed: each step is idempotent (nothing more erased), the attempt counted.
    again = await _erase(w, target)
    assert [s["erased"] for s in again.body["steps"]] == [0] * len(ERASURE_CLASSES)
    assert again.body["attempt"] == 2
    assert again.body["erased_total"] == receipt.body["erased_total"]


async def test_the_reconciler_finds_residue_and_replays_the_saga(world: World) -> None:
    w = world
    target, _ = _patients(w)
    prefix = w.saga.subject_prefix(target.tenant_id, target.patient_id)
    await seed_patient(w.stores, target, prefix)
    await _erase(w, target)
    clean = await w.ref.ask(Reconcile(), timeout_s=None)
    assert (clean.searched, clean.residue, clean.replayed) == (1, 0, 0)
    await inject_late_events(w.stores, target, prefix)
    assert await search_everything(w.stores, target, prefix) != {}
    result = await w.ref.ask(Reconcile(), timeout_s=None)
    assert (result.searched, result.residue, result.replayed) == (1, 6, 1)
    [notice] = [e for e in w.seen if isinstance(e, ErasureResidue)]
    # jetstream: one under the patient's subject, one in each scanned stream
    assert notice.found == {"outbox": 1, "dead_letters": 1, "idempotency_redis": 1, "jetstream": 3}
    assert notice.severity == "ticket" and notice.row == 15
    assert (
        w.registry.get_sample_value("triage_erasure_residue_total", {"data_class": "outbox"}) == 1.0
    )
    assert await search_everything(w.stores, target, prefix) == {}
    assert (await w.ref.ask(Reconcile(), timeout_s=None)).residue == 0


async def test_an_exempt_class_is_kept_and_the_receipt_says_why(world: World) -> None:
    w = world
    target, _ = _patients(w)
    reason = "medical record retention: 10 years"
    w.saga.config = msgspec.structs.replace(w.saga.config, exempt={"recordings": reason})
    prefix = w.saga.subject_prefix(target.tenant_id, target.patient_id)
    await seed_patient(w.stores, target, prefix)
    receipt = await _erase(w, target)
    steps = {s["data_class"]: s for s in receipt.body["steps"]}
    assert (steps["recordings"]["status"], steps["recordings"]["detail"]) == ("exempt", reason)
    assert receipt.body["exemptions"] == [{"data_class": "recordings", "reason": reason}]
    left = await search_everything(w.stores, target, prefix)
    assert left == {"postgres:recordings": 1, "files": 2}  # the row, the copy, the incoming file
    assert (
        await w.ref.ask(Reconcile(), timeout_s=None)
    ).residue == 0  # the exempt class is not residue


@pytest.mark.parametrize(
    ("flag", "config"),
    [
        ("deny_purge", ErasureConfig(stream="LOCKED", scan_streams=())),
        ("deny_delete", ErasureConfig(scan_streams=("TRIAGE_SCHEDULING", "LOCKED"))),
    ],
)
async def test_the_saga_refuses_a_stream_it_could_not_erase_from(
    bridge: object, postgres_url: str, nats_url: str, flag: str, config: ErasureConfig
) -> None:
    """deny_purge on the stream purged by subject, deny_delete on a scanned one."""
    await migrate(postgres_url)
    js = await run(jetstream.connect, nats_url, service="nats")

    async def add() -> None:
        await js.js.add_stream(
            nats.js.api.StreamConfig(name="LOCKED", subjects=["locked.>"], **{flag: True})
        )

    try:
        await run(add, service="nats")
        daemon = postgres_url_with(postgres_url, user=DAEMON_ROLE)
        async with open_pool(daemon, DatabaseConfig(), close_s=2.0) as pool:
            saga = ErasureSaga(pool, config, key=KEY, jetstream=js)
            with pytest.raises(PurgeDenied, match=f"stream LOCKED was created with {flag}"):
                await saga.init()
    finally:
        await run(jetstream.close, js, service="nats")


async def test_without_a_key_file_every_saga_on_the_database_shares_one_kept_key(
    bridge: object, postgres_url: str
) -> None:
    """Two replicas racing on a new database, and a restart, make the same patient
    tokens and verify each other's receipts: the key is kept in PostgreSQL (0014), and
    the tenant role cannot read it."""
    await migrate(postgres_url)
    tenant = uuid.uuid4()
    daemon = postgres_url_with(postgres_url, user=DAEMON_ROLE)
    config = ErasureConfig()
    async with open_pool(daemon, DatabaseConfig(), close_s=2.0) as pool:
        first, second = ErasureSaga(pool, config), ErasureSaga(pool, config)
        with pytest.raises(TriageError, match="read when the saga starts"):
            first.patient_token(tenant, "p-1")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.init)
            nursery.start_soon(second.init)
        assert first.key == second.key and len(first.key) == 32
        assert first.key_id == second.key_id and first.key_id.startswith("db:sha256:")
        token = first.patient_token(tenant, "p-1")
    async with open_pool(daemon, DatabaseConfig(), close_s=2.0) as pool:  # a restart
        again = ErasureSaga(pool, config)
        await again.init()
        assert again.patient_token(tenant, "p-1") == token
        assert again.patient_token(tenant, "p-2") != token

    async def tenant_reads() -> None:
        conn = await asyncpg.connect(daemon)
        try:
            async with conn.transaction():
                await conn.execute("SET LOCAL ROLE triage_app")
                await conn.fetchval("SELECT secret FROM erasure_keys")
        finally:
            await conn.close()

    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await run(tenant_reads, service="postgres")


async def test_the_http_door_erases_and_fetches_the_receipt(world: World) -> None:
    from supervisors.erasure import PATH, ErasureApi

    w = world
    target, other = _patients(w)
    await seed_patient(w.stores, target, w.saga.subject_prefix(target.tenant_id, target.patient_id))
    api = ErasureApi(w.ref, timeout_s=None)  # the fixture runs without a runtime's deadlines
    body = msgspec.json.encode(
        {"tenant_id": str(target.tenant_id), "patient_id": target.patient_id,
         "identifiers": [target.phone]}
    )  # fmt: skip
    status, answer = await api._serve(PATH, body)
    assert status == 200
    assert verify_receipt(Receipt(body=answer["receipt"], signature=answer["signature"]), KEY)
    ask = {"tenant_id": str(target.tenant_id), "patient_id": target.patient_id}
    status, fetched = await api._serve(PATH + "/receipt", msgspec.json.encode(ask))
    assert (status, fetched) == (200, answer)
    missing = {**ask, "patient_id": other.patient_id}
    assert (await api._serve(PATH + "/receipt", msgspec.json.encode(missing)))[0] == 404
    status, bad = await api._serve(PATH, b'{"tenant_id": "x"}')
    assert (status, bad["error"]) == (400, "invalid_request")


async def test_triage_erase_asks_the_daemon_and_prints_the_receipt(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI over real HTTP (the daemon's server and app, this saga): erase prints the
    signed receipt, --receipt fetches the same one, a refusal exits 1 with the answer."""
    from supervisors.cli import main
    from supervisors.erasure import PATH, ErasureApi
    from supervisors.http import HealthApp, HttpServer
    from tests.supervisors.test_http import Probe

    w = world
    target, _ = _patients(w)
    await seed_patient(w.stores, target, w.saga.subject_prefix(target.tenant_id, target.patient_id))
    app = HealthApp(
        readiness=Probe(), registry=CollectorRegistry(),
        mounts={PATH: ErasureApi(w.ref, timeout_s=None, max_body_bytes=4096)},
    )  # fmt: skip
    server = HttpServer(app, host="127.0.0.1", port=0, graceful_timeout_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        url = f"http://127.0.0.1:{server.port}"
        who = ["--url", url, "--tenant", str(target.tenant_id), "--patient", target.patient_id]
        code = await trio.to_thread.run_sync(
            main, ["erase", *who, "--identifier", target.phone, "--json"]
        )
        erased = json.loads(capsys.readouterr().out)
        assert code == 0
        assert verify_receipt(Receipt(body=erased["receipt"], signature=erased["signature"]), KEY)
        assert await trio.to_thread.run_sync(main, ["erase", *who, "--receipt", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == erased
        bad = ["erase", "--url", url, "--tenant", "not-a-uuid", "--patient", "p"]
        assert await trio.to_thread.run_sync(main, bad) == 1
        refused = capsys.readouterr().err
        assert "400" in refused and "invalid_request" in refused
        nursery.cancel_scope.cancel()
