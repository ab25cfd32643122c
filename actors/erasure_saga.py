"""Catalog row 15: the GDPR erasure saga, its reconciler and the signed receipt.

**The saga** (:class:`ErasureSaga`, an actor). :class:`Erase` names a tenant, a
patient and the patient's recipient addresses. One run erases, step by step, every
place the patient's data lives, each step idempotent (a delete of what matches) and
recorded (``erasure_steps``, migration 0013):

===================  ==========  ===================================================
data class           store       what goes
===================  ==========  ===================================================
idempotency_db       postgres    keys of the patient's dispatches, responses naming them
attachments          postgres +  rows referenced by the patient's dispatch payloads,
                     blob store  and their blobs
recordings           postgres +  rows of the patient's virtual sessions, stored copies
                     files       and incoming files
dispatches           postgres    recipient is one of the patient's, or payload names them
outbox               postgres    payload names the patient, or the patient's subject
virtual_sessions     postgres    ``patient_id``
threads              postgres    the patient's fallback threads, participant rows
dead_letters         postgres    payload names the patient (any tenant or none)
idempotency_redis    redis       the cached keys above, and cached answers naming them
jetstream            JetStream   ``$JS.API.STREAM.PURGE.<stream>`` ``filter``
                                 ``<prefix>.<tenant>.<token>.>``
===================  ==========  ===================================================

Subject naming: an event about a patient is published under
``<[erasure] subject_prefix>.<tenant>.<token>.<kind>`` where ``<token>`` is
:meth:`ErasureSaga.patient_token` (an HMAC of the patient id: no PII in a subject),
so one purge by filter removes a patient's messages. The saga refuses to start
(:class:`PurgeDenied`) on a stream created with ``deny_purge``.

Streams whose subjects others name (``[erasure] scan_streams``: the scheduling
inbox's, where the scheduling service publishes appointments naming the patient, and
the relay's DLQ) cannot be purged by subject: the saga reads each whole (one batch
at a time) and deletes by sequence every message whose body or headers hold one of
the patient's needles as a JSON string; the server overwrites a deleted message. It
refuses to start on such a stream created with ``deny_delete``. The reconciler reads
each scanned stream once per turn for every erasure it re-searches.

The key (``[erasure] receipt_key_file``, else one random key kept in PostgreSQL,
migration 0014) is the same for every replica and every restart: a patient token
made with another key would not find the subjects published under the first.

A class listed in ``[erasure] exempt`` (legal retention of medical records) is not
erased: its step is recorded ``exempt`` with the reason, and the receipt says so.

**The receipt** (:class:`Receipt`): what was erased where (per class, the store and
the count), the exemptions, and the horizons of what cannot be erased at once (WAL
segments, backups), signed with HMAC-SHA256 (:func:`verify_receipt`).

**The reconciler**: every ``reconcile_interval_s`` (:class:`Reconcile`) it searches
every store for each finished erasure; residue (an event the saga missed: a late
outbox row, a dead letter written after it, a cached answer) is counted on
``triage_erasure_residue_total`` (row 15's detector), noticed (:class:`ErasureResidue`,
ticket) and the saga is replayed for that patient.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import msgspec
import nats.js.errors
import trio
from prometheus_client import CollectorRegistry, Counter

from config.schema import ErasureConfig
from engine.actor import Actor, Timer
from engine.clock import Clock
from engine.detectors import CountInWindowDetector
from engine.errors import TriageError
from engine.events import EventBus, Notice
from engine.metrics import families
from providers import jetstream as jetstream_api
from providers.bridge import run
from providers.db.erasure import (
    DB_CLASSES,
    ErasedRows,
    ErasureRow,
    StepRecord,
    erase_dead_letters_async,
    erase_rows_async,
    finished_async,
    mark_reconciled_async,
    receipt_async,
    record_run_async,
    request_async,
    residue_async,
    saga_key_async,
)
from providers.redis_cache import KEY_PREFIX, cache_name

if TYPE_CHECKING:
    from providers.blobstore import BlobStore
    from providers.db.pool import DbPool
    from providers.jetstream import JetStreamClient
    from providers.redis_cache import Client as RedisClient

__all__ = [
    "ROW",
    "Erase",
    "ErasureMessage",
    "ErasureResidue",
    "ErasureSaga",
    "GetReceipt",
    "PurgeDenied",
    "Receipt",
    "Reconcile",
    "load_receipt_key",
    "verify_receipt",
]

ROW = 15
log = logging.getLogger("triage.erasure")

_STORE = {
    "dispatches": "postgres",
    "outbox": "postgres",
    "idempotency_db": "postgres",
    "virtual_sessions": "postgres",
    "threads": "postgres",
    "dead_letters": "postgres",
    "attachments": "postgres+blobstore",
    "recordings": "postgres+files",
    "idempotency_redis": "redis",
    "jetstream": "jetstream",
}


class PurgeDenied(TriageError):
    """A stream was created with ``deny_purge`` (or a scanned one with ``deny_delete``):
    a patient's messages could not be erased."""


class ErasureRefused(TriageError, ValueError):
    """An erasure request that names no tenant or no patient."""


class Erase(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: uuid.UUID
    patient_id: str
    identifiers: tuple[str, ...] = ()


class GetReceipt(msgspec.Struct, frozen=True, kw_only=True):
    tenant_id: uuid.UUID
    patient_id: str


class Reconcile(msgspec.Struct, frozen=True):
    """The reconciler's turn (the timer's), or an operator's ``now``."""


ErasureMessage: TypeAlias = Erase | GetReceipt | Reconcile


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    body: dict[str, Any]
    signature: str  # hex HMAC-SHA256 of the canonical JSON of body


class ErasureResidue(Notice, frozen=True, kw_only=True):
    """The reconciler found data an erasure should have removed; the saga was replayed."""

    tenant: str
    erasure_id: str
    found: dict[str, int]

    def alert_key(self) -> str:
        return f"ErasureResidue:{self.erasure_id}"


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    searched: int
    residue: int
    replayed: int


def canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def verify_receipt(receipt: Receipt, key: bytes) -> bool:
    want = hmac.new(key, canonical(receipt.body), hashlib.sha256).hexdigest()
    return hmac.compare_digest(want, receipt.signature)


def _key_id(key: bytes, source: str) -> str:
    return f"{source}sha256:" + hashlib.sha256(key).hexdigest()[:16]


def load_receipt_key(config: ErasureConfig) -> bytes | None:
    """The key file's bytes (>= 32); None without a file (the saga reads the kept key)."""
    if config.receipt_key_file is None:
        return None
    path = Path(config.receipt_key_file)
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ErasureRefused(f"erasure.receipt_key_file: cannot read {path}: {exc}") from exc
    if len(key) < 32:
        raise ErasureRefused(f"erasure.receipt_key_file: {path} holds {len(key)} bytes, needs 32")
    return key


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.residue = Counter(
            "triage_erasure_residue",
            "Rows with personal data found by the GDPR erasure reconciler",
            ["data_class"],
            registry=registry,
        )
        self.erased = Counter(
            "triage_erasure_erased",
            "Items erased by the GDPR erasure saga",
            ["data_class"],
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class ErasureStatistics:
    runs: int
    reconciles: int
    residue: int


class ErasureSaga(Actor[ErasureMessage]):
    name = "erasure_saga"

    def __init__(
        self,
        pool: DbPool,
        config: ErasureConfig,
        *,
        key: bytes | None = None,
        redis: RedisClient | None = None,
        blobs: BlobStore | None = None,
        recordings_incoming: str | None = None,
        jetstream: JetStreamClient | None = None,
        detector: CountInWindowDetector | None = None,
        registry: CollectorRegistry | None = None,
        events: EventBus | None = None,
        clock: Clock | None = None,
        severity: str = "ticket",
    ) -> None:
        self.pool = pool
        self.config = config
        self._key = key
        self.key_id = "" if key is None else _key_id(key, "")
        self.redis = redis
        self.blobs = blobs
        self.incoming = Path(recordings_incoming) if recordings_incoming else None
        self.js = jetstream
        self.detector = detector
        self._metrics = families(registry, _Metrics) if registry is not None else None
        self.events = events
        self.clock = clock if clock is not None else Clock()
        self.severity = severity
        self.runs = 0
        self.reconciles = 0
        self.residue = 0

    # -- lifecycle -------------------------------------------------------------------

    async def init(self) -> None:
        if self._key is None:
            self._key = await self.pool.run_unit(saga_key_async, secrets.token_bytes(32))
            self.key_id = _key_id(self._key, "db:")
        if self.js is not None:
            await self._check_streams()

    @property
    def key(self) -> bytes:
        """The signing and token key (the kept one is read by :meth:`init`)."""
        if self._key is None:
            raise TriageError("erasure saga: the key is read when the saga starts")
        return self._key

    def timers(self) -> Sequence[Timer]:
        return (Timer(self.config.reconcile_interval_s, Reconcile()),)

    def statistics(self) -> ErasureStatistics:
        return ErasureStatistics(runs=self.runs, reconciles=self.reconciles, residue=self.residue)

    async def handle(self, message: ErasureMessage) -> object:
        match message:
            case Erase(tenant_id=tenant, patient_id=patient, identifiers=ids):
                if not patient or any(not i for i in ids):
                    raise ErasureRefused("an erasure names a patient and non-empty identifiers")
                row = await self.pool.run_unit(request_async, tenant, patient, ids)
                return await self._run(row, residue=0)
            case GetReceipt(tenant_id=tenant, patient_id=patient):
                got = await self.pool.run_unit(receipt_async, tenant, patient)
                return None if got is None else Receipt(body=got[0], signature=got[1])
            case Reconcile():
                return await self._reconcile()

    # -- JetStream ------------------------------------------------------------------

    async def _js_api(self, subject: str, body: Mapping[str, Any]) -> dict[str, Any]:
        assert self.js is not None
        nc = self.js.nc

        timeout = self.config.api_timeout_s

        async def call() -> bytes:
            msg = await nc.request(subject, json.dumps(body).encode(), timeout=timeout)
            return bytes(msg.data)

        answer: dict[str, Any] = json.loads(await run(call, service="nats"))
        error = answer.get("error")
        if error:
            raise TriageError(f"{subject}: {error.get('description', error)}")
        return answer

    async def _check_streams(self) -> None:
        wanted = [(self.config.stream, "deny_purge", "purged")]
        wanted += [(name, "deny_delete", "deleted") for name in self.config.scan_streams]
        for stream, flag, verb in wanted:
            try:
                info = await self._js_api(f"$JS.API.STREAM.INFO.{stream}", {})
            except TriageError as exc:
                # Not created yet (the relay, the inbox create theirs): a refusal to
                # purge or delete is the step's failure, recorded, replayed.
                log.info("erasure: stream %s not checked for %s: %s", stream, flag, exc)
                continue
            if info.get("config", {}).get(flag):
                raise PurgeDenied(
                    f"stream {stream} was created with {flag}: a patient's messages could not"
                    f" be {verb}; recreate it without {flag}"
                )

    def patient_token(self, tenant: uuid.UUID, patient: str) -> str:
        return hmac.new(self.key, f"{tenant}:{patient}".encode(), hashlib.sha256).hexdigest()[:32]

    def subject_prefix(self, tenant: uuid.UUID, patient: str) -> str:
        """The subject prefix of a patient's events (ends in a dot)."""
        return f"{self.config.subject_prefix}.{tenant}.{self.patient_token(tenant, patient)}."

    async def _purge(self, prefix: str) -> int:
        answer = await self._js_api(
            f"$JS.API.STREAM.PURGE.{self.config.stream}", {"filter": prefix + ">"}
        )
        return int(answer.get("purged", 0))

    async def _scan(self, needles: Sequence[Sequence[str]]) -> list[dict[str, list[int]]]:
        """Per needle set, the sequences of the messages of each scanned stream holding one.

        One read of each stream for every set (the reconciler's turn reads once).
        """
        assert self.js is not None
        client, batch, idle = self.js, self.config.scan_batch, self.config.scan_idle_s
        # A needle as a whole JSON string, ASCII-escaped or not (as a producer wrote it).
        encoded = [
            {
                e
                for n in ns
                for e in (json.dumps(n).encode(), json.dumps(n, ensure_ascii=False).encode())
            }
            for ns in needles
        ]
        found: list[dict[str, list[int]]] = [{} for _ in needles]

        async def read(stream: str) -> None:
            try:
                async for m in jetstream_api.iter_stream(
                    client, stream, batch=batch, idle_timeout_s=idle
                ):
                    text = m.payload + json.dumps(m.headers, ensure_ascii=False).encode()
                    for i, wanted in enumerate(encoded):
                        if any(w in text for w in wanted):
                            found[i].setdefault(stream, []).append(m.stream_seq)
            except nats.js.errors.NotFoundError:
                return  # not created yet: nothing of anyone's in it

        for stream in self.config.scan_streams:
            await run(read, stream, service="nats")
        return found

    async def _delete_scanned(self, found: Mapping[str, Sequence[int]]) -> int:
        assert self.js is not None
        n = 0
        for stream, seqs in found.items():
            n += await run(jetstream_api.delete_messages, self.js, stream, seqs, service="nats")
        return n

    async def _erase_streams(self, row: ErasureRow, prefix: str) -> int:
        purged = await self._purge(prefix)
        (found,) = await self._scan([row.needles])
        return purged + await self._delete_scanned(found)

    async def _stream_count(self, prefix: str) -> int:
        info = await self._js_api(
            f"$JS.API.STREAM.INFO.{self.config.stream}", {"subjects_filter": prefix + ">"}
        )
        subjects = info.get("state", {}).get("subjects") or {}
        return int(sum(subjects.values()))

    # -- Redis ----------------------------------------------------------------------

    async def _redis_names(self, row: ErasureRow, keys: Sequence[str]) -> list[str]:
        """Cached keys of the patient: the named keys, and any cached answer naming them."""
        assert self.redis is not None
        client = self.redis
        needles = [json.dumps(n).encode() for n in row.needles]
        wanted = {cache_name(row.tenant_id, k) for k in keys}

        async def scan() -> list[str]:
            found = []
            async for name in client.scan_iter(match=f"{KEY_PREFIX}{row.tenant_id}:*", count=500):
                text = name.decode() if isinstance(name, bytes) else str(name)
                if text in wanted:
                    found.append(text)
                    continue
                value = await client.get(name)
                if value is not None and any(n in value for n in needles):
                    found.append(text)
            return found

        return await run(scan, service="redis")

    async def _redis_delete(self, names: Sequence[str]) -> int:
        if not names:
            return 0
        assert self.redis is not None
        client = self.redis

        async def delete() -> int:
            return int(await client.delete(*names))

        return await run(delete, service="redis")

    # -- files ----------------------------------------------------------------------

    def _file(self, ref: str) -> Path | None:
        if ref.startswith("incoming:"):
            return None if self.incoming is None else self.incoming / ref.removeprefix("incoming:")
        return Path(ref)

    async def _remove_files(self, refs: Sequence[str]) -> int:
        def remove() -> int:
            n = 0
            for ref in refs:
                path = self._file(ref)
                if path is not None and path.is_file():
                    path.unlink()
                    n += 1
            return n

        return await trio.to_thread.run_sync(remove)

    async def _files_left(self, refs: Sequence[str]) -> int:
        def count() -> int:
            return sum(1 for r in refs if (p := self._file(r)) is not None and p.is_file())

        return await trio.to_thread.run_sync(count)

    # -- the saga ---------------------------------------------------------------------

    async def _previous(self, row: ErasureRow) -> dict[str, Any]:
        got = await self.pool.run_unit(receipt_async, row.tenant_id, row.patient_id)
        return {} if got is None else {**got[2], "erased_total": got[0].get("erased_total", {})}

    async def _run(self, row: ErasureRow, *, residue: int) -> Receipt:
        exempt = self.config.exempt
        prefix = self.subject_prefix(row.tenant_id, row.patient_id)
        previous = await self._previous(row)
        steps: list[StepRecord] = []
        erased = ErasedRows()
        try:
            erased = await self.pool.run_unit(
                erase_rows_async, row.tenant_id, row.patient_id, row.needles, prefix, list(exempt)
            )
        except Exception as exc:  # recorded, the reconciler replays it
            log.warning("erasure %s: database step failed: %s", row.id, exc)
            steps += [StepRecord(c, "failed", detail=type(exc).__name__) for c in DB_CLASSES]
        blob_keys = sorted({*previous.get("blob_keys", ()), *erased.blob_keys})
        files = sorted({*previous.get("recording_files", ()), *erased.recording_files})
        idem_keys = sorted({*previous.get("idempotency_keys", ()), *erased.idempotency_keys})
        if not steps:
            for cls in DB_CLASSES:
                if cls in exempt:
                    steps.append(StepRecord(cls, "exempt", detail=exempt[cls]))
                    continue
                n = erased.counts.get(cls, 0)
                detail = ""
                if cls == "attachments" and self.blobs is not None:
                    gone = 0
                    for key in blob_keys:
                        gone += bool(await self.blobs.delete(key))
                    n, detail = n + gone, f"{gone} blobs"
                elif cls == "recordings":
                    gone = await self._remove_files(files)
                    n, detail = n + gone, f"{gone} files"
                steps.append(StepRecord(cls, "done", n, detail))
        steps.append(await self._step("dead_letters", self._erase_letters(row, prefix)))
        if self.redis is not None:
            steps.append(await self._step("idempotency_redis", self._erase_redis(row, idem_keys)))
        if self.js is not None:
            steps.append(await self._step("jetstream", self._erase_streams(row, prefix)))
        if self._metrics is not None:
            for s in steps:
                if s.erased:
                    self._metrics.erased.labels(s.data_class).inc(s.erased)
        body = self._receipt_body(row, steps, previous)
        signature = hmac.new(self.key, canonical(body), hashlib.sha256).hexdigest()
        traces = {"blob_keys": blob_keys, "recording_files": files, "idempotency_keys": idem_keys}
        await self.pool.run_unit(
            record_run_async, row.tenant_id, row.id, steps, body, signature, traces, residue
        )
        self.runs += 1
        return Receipt(body=body, signature=signature)

    async def _erase_letters(self, row: ErasureRow, prefix: str) -> int:
        return await self.pool.run_unit(
            erase_dead_letters_async, row.tenant_id, row.needles, prefix
        )

    async def _erase_redis(self, row: ErasureRow, keys: Sequence[str]) -> int:
        return await self._redis_delete(await self._redis_names(row, keys))

    async def _step(self, cls: str, work: Any) -> StepRecord:
        if cls in self.config.exempt:
            work.close()
            return StepRecord(cls, "exempt", detail=self.config.exempt[cls])
        try:
            return StepRecord(cls, "done", int(await work))
        except Exception as exc:
            log.warning("erasure step %s failed: %s", cls, exc)
            return StepRecord(cls, "failed", detail=f"{type(exc).__name__}: {exc}"[:200])

    def _receipt_body(
        self,
        row: ErasureRow,
        steps: Sequence[StepRecord],
        previous: Mapping[str, Any],
    ) -> dict[str, Any]:
        now = self.clock.wall()
        totals: dict[str, int] = dict(previous.get("erased_total", {}))
        for s in steps:
            totals[s.data_class] = totals.get(s.data_class, 0) + s.erased
        return {
            "erasure_id": str(row.id),
            "tenant_id": str(row.tenant_id),
            "patient_token": self.patient_token(row.tenant_id, row.patient_id),
            "attempt": row.attempts + 1,
            "completed_at": now,
            "steps": [
                {
                    "data_class": s.data_class,
                    "store": _STORE[s.data_class],
                    "status": s.status,
                    "erased": s.erased,
                    "detail": s.detail,
                }
                for s in steps
            ],
            "erased_total": totals,
            "exemptions": [
                {"data_class": c, "reason": r} for c, r in sorted(self.config.exempt.items())
            ],
            "horizons": {
                "wal": {
                    "until": now + self.config.wal_horizon_s,
                    "why": "WAL segments holding the deleted rows recycle by then",
                },
                "backups": {
                    "until": now + self.config.backup_horizon_days * 86400.0,
                    "why": "the last backup holding the data expires by then",
                },
            },
            "key_id": self.key_id,
        }

    # -- the reconciler -------------------------------------------------------------

    async def search(
        self, row: ErasureRow, scanned: Mapping[str, Sequence[int]] | None = None
    ) -> dict[str, int]:
        """What of the patient is left in every store (exempt classes not counted).

        ``scanned``: the patient's messages in the scanned streams, when the caller
        read them already (the reconciler, for every erasure at once).
        """
        prefix = self.subject_prefix(row.tenant_id, row.patient_id)
        previous = await self._previous(row)
        found = await self.pool.run_unit(
            residue_async,
            row.tenant_id,
            row.patient_id,
            row.needles,
            prefix,
            list(previous.get("blob_keys", ())),
        )
        if self.blobs is not None:
            left = 0
            for key in previous.get("blob_keys", ()):
                left += bool(await self.blobs.exists(key) or await self.blobs.quarantined(key))
            found["attachments"] += left
        found["recordings"] = await self._files_left(list(previous.get("recording_files", ())))
        if self.redis is not None:
            names = await self._redis_names(row, list(previous.get("idempotency_keys", ())))
            found["idempotency_redis"] = len(names)
        if self.js is not None and "jetstream" not in self.config.exempt:
            if scanned is None:
                (scanned,) = await self._scan([row.needles])
            found["jetstream"] = await self._stream_count(prefix) + sum(
                len(seqs) for seqs in scanned.values()
            )
        return {c: n for c, n in found.items() if c not in self.config.exempt}

    async def _reconcile(self) -> ReconcileResult:
        self.reconciles += 1
        rows = await self.pool.run_unit(finished_async, self.config.reconcile_max_requests)
        total = replayed = 0
        scans: list[dict[str, list[int]]] = [{} for _ in rows]
        if self.js is not None and rows and "jetstream" not in self.config.exempt:
            scans = await self._scan([row.needles for row in rows])
        for row, scanned in zip(rows, scans, strict=True):
            found = {c: n for c, n in (await self.search(row, scanned)).items() if n}
            count = sum(found.values())
            if count:
                total += count
                if self._metrics is not None:
                    for c, n in found.items():
                        self._metrics.residue.labels(c).inc(n)
                if self.detector is not None:
                    self.detector.observe(count)
                if self.events is not None:
                    self.events.emit(
                        ErasureResidue(
                            at=trio.current_time(),
                            wall=self.clock.wall(),
                            severity=self.severity,
                            row=ROW,
                            tenant=str(row.tenant_id),
                            erasure_id=str(row.id),
                            found=found,
                        )
                    )
                log.warning("erasure %s: residue %s, replaying the saga", row.id, found)
                await self._run(row, residue=count)
                replayed += 1
            await self.pool.run_unit(mark_reconciled_async, row.tenant_id, row.id)
        self.residue += total
        return ReconcileResult(searched=len(rows), residue=total, replayed=replayed)
