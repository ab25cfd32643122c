"""Scenario 15, GDPR erase partial: events the saga missed land after it.

The scenario owns its servers (an embedded PostgreSQL, migrated, two tenants; an
embedded NATS with JetStream; an embedded Redis), a blob store and the recording
directories, and runs the erasure saga actor (``[erasure]`` of the scenario config:
its reconciler every ``reconcile_interval_s``) with row 15's detector
(``[detectors.erasure_residue]`` if set).

Setup: N patients over the two tenants, each seeded in every store
(:mod:`bench.chaos.erasure_rig`); half are erased, the other half must keep every
item. First the saga refuses a stream created with ``deny_purge``.

Trigger: "the event stream missed an event": right after the saga answered, events
still in flight for some erased patients land: an outbox row, a dead letter of no
tenant, a cached idempotency answer in Redis and a message on the patient's subject
in JetStream.

Judged from outside (the owner's search of every table, Redis, the files, the stream):

- detected: row 15's detector fired (``triage_erasure_residue_total``);
- mitigated: the reconciler replayed the saga for exactly the patients hit, and a
  search of every store finds nothing of any erased patient; the kept patients keep
  all their items; each receipt verifies and lists every data class with its store;
- ``lost``: erased patients with anything left; ``duplicates``: erasure records
  beyond one per patient.
"""

from __future__ import annotations

import tempfile
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import msgspec
import nats.js.api
import trio

from actors.erasure_saga import (
    ROW,
    Erase,
    ErasureResidue,
    ErasureSaga,
    PurgeDenied,
    Receipt,
    verify_receipt,
)
from actors.outbox_relay import dlq_stream_name
from bench.chaos.erasure_rig import (
    Patient,
    Stores,
    inject_late_events,
    search_everything,
    seed_patient,
)
from bench.chaos.fixtures import evaluate_every
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from bench.chaos.scenario_nats import open_backbone
from config import engine_kwargs
from config.catalog import row_detector
from config.nats_names import subject_list
from config.schema import ERASURE_CLASSES, ErasureConfig
from engine.actor import actor_child
from engine.detectors import CountInWindowDetector, make_detector
from engine.events import DetectorFired, Event, EventBus
from engine.runtime import open_runtime
from providers import jetstream
from providers.blobstore import LocalBlobStore
from providers.bridge import run
from providers.db.pool import DbPool
from providers.embedded import EmbeddedRedis
from providers.redis_cache import close_client, open_client

__all__ = ["DETECTOR_OVERRIDE", "ROW", "SCENARIO", "run_scenario"]

DETECTOR_OVERRIDE = "erasure_residue"
_BOOKED = "triage.scheduling.appointment.booked"  # where the scheduling service publishes
KEY = b"chaos-scenario-15-receipt-key-0123456789"


async def _erasure_records(url: str) -> Counter[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT patient_id, attempts FROM erasures")
        return Counter({r["patient_id"]: int(r["attempts"]) for r in rows}) + Counter(
            r["patient_id"] + ":record" for r in rows
        )
    finally:
        await conn.close()


async def _deny_purge_refused(stores: Stores, pool: DbPool, config: ErasureConfig) -> bool:
    async def add() -> None:
        await stores.js.js.add_stream(
            nats.js.api.StreamConfig(name="LOCKED", subjects=["locked.>"], deny_purge=True)
        )

    await run(add, service="nats")
    saga = ErasureSaga(
        pool,
        msgspec.structs.replace(config, stream="LOCKED"),
        key=KEY,
        jetstream=stores.js,
    )
    try:
        await saga.init()
    except PurgeDenied:
        return True
    return False


async def run_scenario(ctx: ChaosContext) -> Outcome:
    config = ctx.config
    section = config.erasure
    count = 6 if ctx.quick else 40
    items = 2 if ctx.quick else 3
    fields = engine_kwargs(row_detector(config, ctx.catalog, ROW, DETECTOR_OVERRIDE))
    bus = EventBus()
    seen: list[Event] = []
    bus.on(Event, seen.append)
    detector = make_detector(DETECTOR_OVERRIDE, row=ROW, events=bus, **fields).expect(
        CountInWindowDetector
    )
    ledger = Ledger()
    notes: list[str] = []
    redis_server = EmbeddedRedis()
    await trio.to_thread.run_sync(redis_server.start)
    try:
        with tempfile.TemporaryDirectory(prefix="triage-erasure-") as root:
            async with open_backbone(tenants=2) as backbone, open_runtime() as runtime:
                await run(
                    jetstream.ensure_stream,
                    backbone.client,
                    section.stream,
                    [config.relay.subjects],
                    config.relay.duplicate_window_s,
                    service="nats",
                )
                # The streams the saga reads whole: the inbox's (appointments naming the
                # patient) and the relay's DLQ, each as its owner creates it.
                owned = (
                    (config.inbox.stream, subject_list(config.inbox.subjects)),
                    (dlq_stream_name(config.relay), [config.relay.dlq_subject]),
                )
                for name, subjects in owned:
                    await run(
                        jetstream.ensure_stream, backbone.client, name, subjects,
                        config.relay.duplicate_window_s, service="nats",
                    )  # fmt: skip
                scanned = (
                    (config.inbox.stream, _BOOKED),
                    (dlq_stream_name(config.relay), config.relay.dlq_subject),
                )
                redis = await run(open_client, redis_server.url, 2.0, service="redis")
                pool = DbPool(backbone.pool, close_s=2.0)
                stores = Stores(
                    owner_url=backbone.postgres.url,
                    redis=redis,
                    blobs=LocalBlobStore(Path(root) / "blobs", fsync=False),
                    incoming=Path(root) / "incoming",
                    store=Path(root) / "store",
                    js=backbone.client,
                    stream=section.stream,
                    scanned=scanned,
                )
                try:
                    return await _drive(
                        ctx,
                        stores,
                        pool,
                        runtime,
                        detector,
                        bus,
                        seen,
                        ledger,
                        notes,
                        count,
                        items,
                    )
                finally:
                    await run(close_client, redis, service="redis")
    finally:
        await trio.to_thread.run_sync(redis_server.close)


async def _drive(
    ctx: ChaosContext,
    stores: Stores,
    pool: DbPool,
    runtime: object,
    detector: CountInWindowDetector,
    bus: EventBus,
    seen: list[Event],
    ledger: Ledger,
    notes: list[str],
    count: int,
    items: int,
) -> Outcome:
    config = ctx.config
    section = config.erasure
    refused = await _deny_purge_refused(stores, pool, section)
    saga = ErasureSaga(
        pool,
        section,
        key=KEY,
        redis=stores.redis,
        blobs=stores.blobs,
        recordings_incoming=str(stores.incoming),
        jetstream=stores.js,
        detector=detector,
        events=bus,
    )
    mailbox = config.mailboxes["monitor"]
    spec, ref = actor_child(
        "erasure_saga",
        lambda: saga,
        capacity=mailbox.capacity,
        shutdown_s=config.supervisors["default"].shutdown_s,
        deadlines=runtime.deadlines,  # type: ignore[attr-defined]
    )
    tenants = await run(_tenants, stores.owner_url, service="postgres")
    patients = [Patient(tenants[n % 2], f"pat-{n:04d}x", f"+1555{n:07d}") for n in range(count)]
    erased, kept = patients[::2], patients[1::2]
    late = erased[::2]  # the patients whose in-flight events land after the saga
    receipts: dict[str, Receipt] = {}
    before: dict[str, dict[str, int]] = {}
    for p in patients:
        await seed_patient(stores, p, saga.subject_prefix(p.tenant_id, p.patient_id), items=items)
    for p in kept:
        before[p.patient_id] = await search_everything(
            stores, p, saga.subject_prefix(p.tenant_id, p.patient_id)
        )
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        nursery.start_soon(evaluate_every, detector, config.daemon.detector_tick_s)
        for p in erased:
            ledger.accept(p.patient_id)
            got = await ref.ask(
                Erase(tenant_id=p.tenant_id, patient_id=p.patient_id, identifiers=(p.phone,)),
                timeout_s=section.ask_timeout_s,
            )
            assert isinstance(got, Receipt)
        started = trio.current_time()
        injected = 0
        for p in late:
            injected += await inject_late_events(
                stores, p, saga.subject_prefix(p.tenant_id, p.patient_id)
            )
        replayed: set[str] = set()
        with trio.move_on_after(section.reconcile_interval_s * 5 + 20):
            while True:
                replayed = {e.erasure_id for e in seen if isinstance(e, ErasureResidue)}
                if len(replayed) >= len(late) and saga.reconciles >= 2:
                    break
                await trio.sleep(0.1)
        # One more turn of the reconciler after the replays: it finds nothing.
        after = saga.reconciles
        with trio.move_on_after(section.reconcile_interval_s * 3 + 10):
            while True:
                if saga.reconciles > after:
                    break
                await trio.sleep(0.1)
        residue_at_end = saga.residue
        elapsed = trio.current_time() - started
        nursery.cancel_scope.cancel()
    left: dict[str, dict[str, int]] = {}
    for p in erased:
        prefix = saga.subject_prefix(p.tenant_id, p.patient_id)
        found = await search_everything(stores, p, prefix)
        got = await ref_receipt(pool, p)
        if got is not None:
            receipts[p.patient_id] = got
        if found:
            left[p.patient_id] = found
            continue
        if got is not None and verify_receipt(got, KEY):
            ledger.settle(p.patient_id)
    records = await run(_erasure_records, stores.owner_url, service="postgres")
    for p in erased:
        for _ in range(records[p.patient_id + ":record"]):
            ledger.receive(p.patient_id)
    kept_intact = True
    for p in kept:
        now = await search_everything(stores, p, saga.subject_prefix(p.tenant_id, p.patient_id))
        kept_intact = kept_intact and now == before[p.patient_id] and bool(now)
    late_ids = {p.patient_id for p in late}
    every_class = all(
        {s["data_class"] for s in r.body["steps"]} == set(ERASURE_CLASSES)
        and all(s["status"] == "done" for s in r.body["steps"])
        and set(r.body["horizons"]) == {"wal", "backups"}
        for r in receipts.values()
    )
    # A patient whose late items straddled a reconciler turn may be replayed twice.
    attempts_right = all(
        records[p.patient_id] >= 2 if p.patient_id in late_ids else records[p.patient_id] == 1
        for p in erased
    )
    alarms = [e for e in seen if isinstance(e, DetectorFired) and e.row == ROW]
    notices = [e for e in seen if isinstance(e, ErasureResidue)]
    mitigated = (
        refused
        and not left
        and kept_intact
        and len(receipts) == len(erased)
        and every_class
        and attempts_right
        and len({n.erasure_id for n in notices}) == len(late)
        and all(n.severity == "ticket" for n in notices)
    )
    notes.append(
        f"{count} patients x {items} items in 10 data classes over PostgreSQL, Redis, the blob"
        f" store and JetStream (its subjects and {len(stores.scanned)} scanned streams);"
        f" {len(erased)} erased, {len(kept)} kept"
        f" ({'intact' if kept_intact else 'DAMAGED'}); {injected} late items for {len(late)}"
        f" patients; reconciler: {saga.reconciles} turns, residue {residue_at_end},"
        f" {len(notices)} replays in {elapsed:.2f}s; deny_purge refused: {refused};"
        f" receipts verified {sum(verify_receipt(r, KEY) for r in receipts.values())}"
        f"/{len(erased)}; left: {left or 'nothing'}"
    )
    return Outcome(
        detected=bool(alarms),
        detect_s=alarms[0].at - started if alarms else None,
        mitigated=mitigated,
        ledger=ledger,
        notes=notes,
    )


async def _tenants(url: str) -> list[uuid.UUID]:
    conn = await asyncpg.connect(url)
    try:
        return [r["id"] for r in await conn.fetch("SELECT id FROM tenants ORDER BY name")]
    finally:
        await conn.close()


async def ref_receipt(pool: DbPool, p: Patient) -> Receipt | None:
    from providers.db.erasure import receipt_async

    got = await pool.run_unit(receipt_async, p.tenant_id, p.patient_id)
    return None if got is None else Receipt(body=got[0], signature=got[1])


SCENARIO = Scenario(ROW, run_scenario)
