"""Row 15's rig: one patient's data seeded in every store, and a search of every store.

Used by chaos scenario 15 and the erasure tests. The seed writes as the owner (the
superuser: past RLS) what the daemon's actors write in normal operation: dispatches
and their idempotency keys, outbox rows (on the dispatch subjects and the patient's
own subject), a dead letter, a virtual session with its recording (the stored copy
and the incoming file), a fallback thread with the patient as participant, an
attachment and its blob, the cached idempotency answer in Redis, the patient's
events in JetStream under the patient's subject, and, in each scanned stream
(``Stores.scanned``: the scheduling inbox's, the relay's DLQ), a message on a subject
that does not name the patient but whose body does (an appointment booked for them,
a dead-lettered event with their phone number).

The search (:func:`search_everything`) knows nothing of the saga: it reads every
table of the schema row by row as text (dead letters' bytes as bytes), every Redis
key and value, every file under the blob, recording and incoming directories, and
every message of every stream, and counts what holds one of the patient's needles.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from providers import jetstream
from providers.blobstore import LocalBlobStore
from providers.bridge import run
from providers.redis_cache import CachedKey, Client, cache_name, encode_entry

__all__ = ["Patient", "Stores", "inject_late_events", "search_everything", "seed_patient"]

#: The erasure's own record keeps the patient id (the reconciler searches by it).
_NOT_SEARCHED = frozenset({"erasures", "erasure_steps", "schema_migrations"})


@dataclass(frozen=True, slots=True)
class Patient:
    tenant_id: uuid.UUID
    patient_id: str
    phone: str

    @property
    def needles(self) -> tuple[str, str]:
        return (self.patient_id, self.phone)


@dataclass(slots=True)
class Stores:
    owner_url: str  # the superuser: seeds and searches past RLS
    redis: Client
    blobs: LocalBlobStore
    incoming: Path
    store: Path
    js: jetstream.JetStreamClient
    stream: str
    #: (stream, subject): streams the saga reads whole, a subject of each to seed on
    scanned: tuple[tuple[str, str], ...] = ()


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _publish(stores: Stores, subject: str, body: object) -> None:
    item = jetstream.PublishItem(
        subject=subject, payload=json.dumps(body).encode(), msg_id=uuid.uuid4().hex
    )
    ack = await run(jetstream.publish_one, stores.js, item, 5.0, service="nats")
    if isinstance(ack, Exception):
        raise ack


async def _seed_rows(url: str, p: Patient, subject: str, items: int) -> list[tuple[str, str]]:
    """The tenant rows; returns (idempotency key, dispatch id) pairs and the attachment ids."""
    conn = await asyncpg.connect(url)
    out: list[tuple[str, str]] = []
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('triage.fallback_cap', '3', true)")
            appointment = f"appt-{p.patient_id}"
            thread = await conn.fetchval(
                "INSERT INTO threads (tenant_id, topic) VALUES ($1, 'visit fallback') RETURNING id",
                p.tenant_id,
            )
            await conn.execute(
                "INSERT INTO thread_participants (thread_id, tenant_id, participant_id, role)"
                " VALUES ($1, $2, $3, 'patient'), ($1, $2, $4, 'clinician')",
                thread,
                p.tenant_id,
                p.patient_id,
                f"dr-of-{p.patient_id}",
            )
            await conn.execute(
                "INSERT INTO fallback_threads (tenant_id, patient_id, day, slot, thread_id,"
                " appointment_id) VALUES ($1, $2, current_date, 1, $3, $4)",
                p.tenant_id,
                p.patient_id,
                thread,
                appointment,
            )
            await conn.execute(
                "INSERT INTO virtual_sessions (tenant_id, appointment_id, patient_id,"
                " fallback_thread_id) VALUES ($1, $2, $3, $4)",
                p.tenant_id,
                appointment,
                p.patient_id,
                thread,
            )
            for i in range(items):
                key = f"k-{p.patient_id}-{i}"
                attachment = uuid.uuid4()
                did = await conn.fetchval(
                    "INSERT INTO dispatches (tenant_id, idempotency_key, channel, template,"
                    " recipient, payload) VALUES ($1, $2, 'sms', 'reminder', $3, $4::jsonb)"
                    " RETURNING id",
                    p.tenant_id,
                    key,
                    p.phone,
                    json.dumps({"patient_id": p.patient_id, "attachment": str(attachment)}),
                )
                await conn.execute(
                    "INSERT INTO idempotency_keys (tenant_id, key, request_hash, response,"
                    " expires_at) VALUES ($1, $2, 'h', $3::jsonb, now() + interval '1 day')",
                    p.tenant_id,
                    key,
                    json.dumps({"dispatch_id": str(did), "status": "queued"}),
                )
                await conn.execute(
                    "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject,"
                    " payload) VALUES ($1, 'dispatch', $2, 0, 'triage.events.dispatch.queued',"
                    " $3::jsonb), ($1, 'patient', $4, 0, $5, $6::jsonb)",
                    p.tenant_id,
                    str(did),
                    json.dumps({"id": str(did), "recipient": p.phone}),
                    p.patient_id,
                    subject + "reminder",
                    json.dumps({"n": i}),
                )
                digest = hashlib.sha256(b"scan").hexdigest()
                await conn.execute(
                    "INSERT INTO attachments (id, tenant_id, blob_key, filename, size_bytes, sha256)"
                    " VALUES ($1, $2, $3, 'scan.pdf', 4, $4)",
                    attachment,
                    p.tenant_id,
                    f"att-{attachment.hex}",
                    digest,
                )
                out.append((key, str(did)))
            await conn.execute(
                "INSERT INTO recordings (tenant_id, recording_id, session_id, path, status,"
                " stored_path) VALUES ($1, $2, $3, $4, 'ingested', $5)",
                p.tenant_id,
                f"rec-{p.patient_id}",
                appointment,
                f"{p.patient_id}.mp4",
                "",  # replaced below once the store path is known
            )
            await conn.execute(
                "INSERT INTO dead_letters (tenant_id, source, ref, subject, payload, error)"
                " VALUES ($1, 'outbox', $2, 'triage.events.dispatch.queued', $3, 'poison')",
                p.tenant_id,
                f"dl-{p.patient_id}",
                json.dumps({"recipient": p.phone, "patient_id": p.patient_id}).encode(),
            )
        return out
    finally:
        await conn.close()


async def _set_stored_path(url: str, p: Patient, stored: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "UPDATE recordings SET stored_path = $3 WHERE tenant_id = $1 AND recording_id = $2",
            p.tenant_id,
            f"rec-{p.patient_id}",
            stored,
        )
        rows = await conn.fetch(
            "SELECT blob_key FROM attachments a JOIN dispatches d ON strpos(d.payload::text,"
            " a.id::text) > 0 WHERE d.recipient = $1",
            p.phone,
        )
        return [r["blob_key"] for r in rows]
    finally:
        await conn.close()


async def seed_patient(stores: Stores, p: Patient, subject_prefix: str, *, items: int = 2) -> None:
    """Seed ``p``'s data in every store; ``subject_prefix`` is the saga's for the patient."""
    pairs = await run(_seed_rows, stores.owner_url, p, subject_prefix, items, service="postgres")
    recording = f"recording of {p.patient_id} {p.phone}".encode()
    stores.store.mkdir(parents=True, exist_ok=True)
    stores.incoming.mkdir(parents=True, exist_ok=True)
    stored = stores.store / f"{p.patient_id}.mp4"
    stored.write_bytes(recording)
    (stores.incoming / f"{p.patient_id}.mp4").write_bytes(recording)
    keys = await run(_set_stored_path, stores.owner_url, p, str(stored), service="postgres")
    for key in keys:
        await stores.blobs.put(key, _chunks(f"scan of {p.phone}".encode()), max_bytes=1 << 20)
    client = stores.redis

    async def cache() -> None:
        for key, did in pairs:
            entry = CachedKey("h", {"dispatch_id": did, "status": "queued"})
            await client.set(cache_name(p.tenant_id, key), encode_entry(entry))

    await run(cache, service="redis")
    for i in range(items):
        await _publish(stores, subject_prefix + "reminder", {"patient_id": p.patient_id, "n": i})
    await _publish_scanned(stores, p, "seed")


async def _publish_scanned(stores: Stores, p: Patient, why: str) -> int:
    """One message naming ``p`` in each scanned stream, on a subject that does not."""
    for _, subject in stores.scanned:
        body = {
            "tenant_id": str(p.tenant_id),
            "appointment_id": f"appt-{why}-{p.patient_id}",
            "kind": "appointment.booked",
            "patient_id": p.patient_id,
            "contact": p.phone,
        }
        await _publish(stores, subject, body)
    return len(stores.scanned)


async def _late_rows(url: str, p: Patient, subject: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject, payload)"
            " VALUES ($1, 'patient', $2, 0, $3, $4::jsonb)",
            p.tenant_id,
            p.patient_id,
            subject + "late",
            json.dumps({"recipient": p.phone}),
        )
        await conn.execute(
            "INSERT INTO dead_letters (tenant_id, source, ref, subject, payload, error)"
            " VALUES (NULL, 'inbox', $1, 'triage.inbox.late', $2, 'late poison')",
            f"late-{p.patient_id}",
            json.dumps({"patient_id": p.patient_id}).encode(),
        )
    finally:
        await conn.close()


async def inject_late_events(stores: Stores, p: Patient, subject_prefix: str) -> int:
    """What the saga missed: events in flight that landed after it (4 items in 4 stores,
    and one in each scanned stream); returns how many."""
    await run(_late_rows, stores.owner_url, p, subject_prefix, service="postgres")
    client = stores.redis

    async def cache() -> None:
        entry = CachedKey("h", {"recipient": p.phone})
        await client.set(cache_name(p.tenant_id, f"late-{p.patient_id}"), encode_entry(entry))

    await run(cache, service="redis")
    await _publish(stores, subject_prefix + "late", {"patient_id": p.patient_id})
    return 4 + await _publish_scanned(stores, p, "late")


async def _search_db(url: str, needles: Sequence[str]) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    found: dict[str, int] = {}
    try:
        tables = [
            r["tablename"]
            for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        for table in sorted(set(tables) - _NOT_SEARCHED):
            n = await conn.fetchval(
                f'SELECT count(*) FROM "{table}" x WHERE EXISTS (SELECT 1 FROM unnest($1::text[]) n'
                " WHERE strpos(x::text, n) > 0)",
                list(needles),
            )
            if n:
                found[f"postgres:{table}"] = int(n)
        n = await conn.fetchval(
            "SELECT count(*) FROM dead_letters WHERE EXISTS (SELECT 1 FROM unnest($1::text[]) n"
            " WHERE position(convert_to(n, 'UTF8') IN payload) > 0)",
            list(needles),
        )
        if n:
            found["postgres:dead_letters(payload)"] = int(n)
        return found
    finally:
        await conn.close()


async def search_everything(stores: Stores, p: Patient, subject_prefix: str) -> dict[str, int]:
    """Every place that still holds one of ``p``'s needles, with a count (empty: nothing)."""
    needles = p.needles
    found = await run(_search_db, stores.owner_url, needles, service="postgres")
    raw = [n.encode() for n in needles]
    client = stores.redis

    async def redis_search() -> int:
        n = 0
        async for name in client.scan_iter(match="*", count=500):
            value = await client.get(name)
            if any(r in name for r in raw) or (value is not None and any(r in value for r in raw)):
                n += 1
        return n

    # A cached answer names the dispatch, not the patient: count the patient's keys too.
    n = await run(redis_search, service="redis")
    prefix = f"k-{p.patient_id}-".encode()

    async def redis_keys() -> int:
        return len([k async for k in client.scan_iter(match=b"*" + prefix + b"*", count=500)])

    n += await run(redis_keys, service="redis")
    if n:
        found["redis"] = n
    files = 0
    for root in (stores.blobs.root, stores.incoming, stores.store):
        if root.is_dir():
            for path in root.rglob("*"):
                if path.is_file() and any(r in path.read_bytes() for r in raw):
                    files += 1
    if files:
        found["files"] = files
    for stream in (stores.stream, *(name for name, _ in stores.scanned)):
        messages = await run(jetstream.read_stream, stores.js, stream, service="nats")
        left = [
            m
            for m in messages
            if m.subject.startswith(subject_prefix) or any(r in m.payload for r in raw)
        ]
        if left:
            found[f"jetstream:{stream}"] = len(left)
    return found
