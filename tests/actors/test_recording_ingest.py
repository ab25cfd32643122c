"""The recording ingest on the autojump clock: real files, an in-memory model of its rows.

The model keeps the database's rules (:mod:`providers.db.recordings`, tested on
PostgreSQL in tests/providers/test_recordings_db.py): a recording is registered once,
only a pending row is claimed (under a lease) or settled. File work runs inline, so
the backoff times below are exact (jitter 0).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import trio
import trio.testing
from prometheus_client import CollectorRegistry

from actors.recording_ingest import (
    Ingest,
    RecordingFailed,
    RecordingIngestMessage,
    RecordingIngestStatistics,
    is_retryable,
    recording_ingest_child,
)
from config.schema import MailboxConfig, RecordingsConfig
from engine.actor import ActorRef
from engine.detectors import CountInWindowDetector
from engine.events import Event, EventBus
from engine.retry import RetryPolicy
from engine.runtime import open_runtime
from providers.db.recordings import PendingRecording
from providers.recording_files import RecordingFiles, StoredRecording

T = TypeVar("T")
TENANT = uuid.UUID("5b1f3c52-6f55-4a35-9f3e-0c2c1d1e7a10")
MAILBOX = MailboxConfig(capacity=100, overflow="wait")


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


async def inline(fn: Callable[[], T]) -> T:
    return fn()


@dataclass
class Row:
    item: PendingRecording
    status: str = "pending"
    claimed_until: float | None = None
    attempts: int = 0
    error: str | None = None
    stored: StoredRecording | None = None


@dataclass
class MemoryStore:
    rows: dict[tuple[uuid.UUID, str], Row] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    letters: list[str] = field(default_factory=list)

    async def register(self, item: PendingRecording) -> bool:
        key = (item.tenant_id, item.recording_id)
        if key in self.rows:
            return False
        self.rows[key] = Row(item)
        return True

    async def claim(self, limit: int, lease_s: float) -> list[PendingRecording]:
        now = trio.current_time()
        free = [
            r for r in self.rows.values()
            if r.status == "pending" and (r.claimed_until is None or r.claimed_until < now)
        ][:limit]  # fmt: skip
        for row in free:
            row.claimed_until = now + lease_s
        return [row.item for row in free]

    async def ingested(
        self, item: PendingRecording, attempts: int, stored: StoredRecording
    ) -> bool:
        row = self.rows[(item.tenant_id, item.recording_id)]
        if row.status != "pending":
            return False
        row.status, row.attempts, row.stored = "ingested", row.attempts + attempts, stored
        return True

    async def failed(self, item: PendingRecording, attempts: int, error: str, subject: str) -> bool:
        row = self.rows[(item.tenant_id, item.recording_id)]
        if row.status != "pending":
            return False
        row.status, row.attempts, row.error = "failed", row.attempts + attempts, error
        self.events.append({"subject": subject, "recording_id": item.recording_id, "reason": error})
        self.letters.append(f"{item.tenant_id}/{item.recording_id}")
        return True


class DenyingFiles(RecordingFiles):
    """Opening a path in ``denied`` raises PermissionError ``times`` times (root ignores
    permission bits); every open is logged with its Trio time."""

    def __init__(self, *args: Any, denied: dict[str, int], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.denied = denied
        self.opens: list[tuple[str, float]] = []

    def open_source(self, path: Path) -> BinaryIO:
        self.opens.append((path.name, trio.current_time()))
        left = self.denied.get(path.name, 0)
        if left:
            self.denied[path.name] = left - 1
            raise PermissionError(13, "Permission denied", str(path))
        return super().open_source(path)


@dataclass
class World:
    ref: ActorRef[RecordingIngestMessage]
    store: MemoryStore
    files: DenyingFiles
    events: list[Event]
    t0: float

    def stats(self) -> RecordingIngestStatistics:
        stats: object = self.ref.statistics()
        assert isinstance(stats, RecordingIngestStatistics)
        return stats

    async def ingest(self, recording_id: str, path: str) -> object:
        return await self.ref.ask(
            Ingest(tenant_id=TENANT, recording_id=recording_id, path=path, session_id="s-1"),
            timeout_s=5.0,
        )


def _retry(attempts: int = 4) -> RetryPolicy:
    return RetryPolicy(
        "recording_ingest", max_attempts=attempts, time_budget_s=100.0, backoff_initial_s=1.0,
        backoff_max_s=4.0, backoff_multiplier=2.0, jitter=0.0, is_transient=is_retryable,
    )  # fmt: skip


@asynccontextmanager
async def open_world(
    tmp_path: Path,
    *,
    denied: dict[str, int] | None = None,
    detector: CountInWindowDetector | None = None,
    registry: CollectorRegistry | None = None,
    retry: RetryPolicy | None = None,
    **overrides: Any,
) -> AsyncIterator[World]:
    incoming, stored = tmp_path / "incoming", tmp_path / "store"
    incoming.mkdir(exist_ok=True)
    settings: dict[str, Any] = {
        "path": str(incoming), "store_path": str(stored), "concurrency": 2,
        "resume_interval_s": 10.0, "lease_s": 60.0, "chunk_bytes": 3,
    }  # fmt: skip
    settings.update(overrides)
    config = RecordingsConfig(**settings)
    files = DenyingFiles(incoming, stored, chunk_bytes=3, denied=denied or {})
    store = MemoryStore()
    bus = EventBus()
    seen: list[Event] = []
    bus.on(Event, seen.append)
    async with open_runtime() as runtime:
        spec, ref = recording_ingest_child(
            store=store, config=config, retry=retry or _retry(), mailbox=MAILBOX, shutdown_s=1.0,
            files=files, detector=detector, registry=registry, events=bus, offload=inline,
            deadlines=runtime.deadlines,
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            await nursery.start(spec.start)
            yield World(ref, store, files, seen, t0)
            nursery.cancel_scope.cancel()


async def test_a_recording_is_copied_hashed_and_marked_ingested(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    async with open_world(tmp_path, registry=registry) as world:
        data = b"recording bytes" * 7
        (tmp_path / "incoming" / "visit").mkdir()
        (tmp_path / "incoming" / "visit" / "r1.mp4").write_bytes(data)
        assert await world.ingest("r1", "visit/r1.mp4") is True
        assert await world.ingest("r1", "visit/r1.mp4") is False  # registered once
        await trio.testing.wait_all_tasks_blocked()
        row = world.store.rows[(TENANT, "r1")]
        assert (row.status, row.attempts) == ("ingested", 1)
        assert row.stored is not None
        assert row.stored.sha256 == hashlib.sha256(data).hexdigest()
        assert row.stored.size_bytes == len(data)
        assert _read(row.stored.stored_path) == data
        assert Path(row.stored.stored_path) == tmp_path / "store" / str(TENANT) / "r1"
        assert [p.name for p in (tmp_path / "store" / str(TENANT)).iterdir()] == ["r1"]
        assert registry.get_sample_value("triage_recordings_ingested_total") == 1.0
        assert world.stats().in_flight == 0


async def test_a_denied_path_is_retried_with_backoff_then_ingested(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    async with open_world(tmp_path, denied={"r2.mp4": 2}) as world:
        (tmp_path / "incoming" / "r2.mp4").write_bytes(b"abc")
        await world.ingest("r2", "r2.mp4")
        await trio.testing.wait_all_tasks_blocked()
        assert world.store.rows[(TENANT, "r2")].status == "pending"
        await trio.sleep_until(world.t0 + 3.0)  # waits 1 s, then 2 s
        await trio.testing.wait_all_tasks_blocked()
        assert [t - world.t0 for _, t in world.files.opens] == [0.0, 1.0, 3.0]
        row = world.store.rows[(TENANT, "r2")]
        assert (row.status, row.attempts) == ("ingested", 3)


async def test_a_missing_path_after_the_budget_is_failed_dead_lettered_and_alerted(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    detector = CountInWindowDetector(
        "recording_failed",
        metric="triage_recording_failed_total",
        threshold=0,
        window_s=60,
        buckets=6,
        row=20,
    )
    registry = CollectorRegistry()
    async with open_world(tmp_path, detector=detector, registry=registry) as world:
        await world.ingest("r3", "never/there.mp4")
        await trio.sleep_until(world.t0 + 6.999)  # attempts at 0, 1, 3 and 7 (waits 1, 2, 4)
        await trio.testing.wait_all_tasks_blocked()
        assert world.store.rows[(TENANT, "r3")].status == "pending"
        await trio.sleep_until(world.t0 + 7.0)
        await trio.testing.wait_all_tasks_blocked()
        row = world.store.rows[(TENANT, "r3")]
        assert (row.status, row.attempts) == ("failed", 4)
        assert row.error is not None and "no such file" in row.error
        assert world.store.events == [
            {"subject": "triage.events.recording.failed", "recording_id": "r3", "reason": row.error}
        ]
        assert world.store.letters == [f"{TENANT}/r3"]
        [notice] = [e for e in world.events if isinstance(e, RecordingFailed)]
        assert (notice.recording_id, notice.attempts, notice.severity, notice.row) == (
            "r3",
            4,
            "ticket",
            20,
        )
        assert notice.at == world.t0 + 7.0
        assert detector.evaluate().firing
        assert registry.get_sample_value("triage_recording_failed_total") == 1.0


async def test_a_path_out_of_the_blob_root_is_failed_at_once(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    (tmp_path / "secret").write_bytes(b"x")
    async with open_world(tmp_path) as world:
        (tmp_path / "incoming" / "link").symlink_to(tmp_path / "secret")
        for rid, path in [("a", "../secret"), ("b", "/etc/passwd"), ("c", "link")]:
            await world.ingest(rid, path)
        await trio.testing.wait_all_tasks_blocked()
        assert trio.current_time() == world.t0  # no backoff: never retried
        rows = world.store.rows
        assert [(rows[(TENANT, r)].status, rows[(TENANT, r)].attempts) for r in "abc"] == [
            ("failed", 1)
        ] * 3
        assert "leads out of the blob path" in (rows[(TENANT, "c")].error or "")


async def test_at_most_concurrency_ingests_run_and_the_rest_wait_pending(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    async with open_world(tmp_path, denied={"r0.mp4": 1, "r1.mp4": 1}) as world:
        for n in range(5):
            (tmp_path / "incoming" / f"r{n}.mp4").write_bytes(b"x")
            await world.ingest(f"r{n}", f"r{n}.mp4")
        await trio.testing.wait_all_tasks_blocked()
        # r0 and r1 back off after a denial; nothing else was opened meanwhile.
        assert [name for name, _ in world.files.opens] == ["r0.mp4", "r1.mp4"]
        assert world.stats().in_flight == 2
        await trio.sleep_until(world.t0 + 1.0)
        await trio.testing.wait_all_tasks_blocked()
        assert {r.status for r in world.store.rows.values()} == {"ingested"}
        assert sorted(name for name, _ in world.files.opens[2:4]) == ["r0.mp4", "r1.mp4"]


def test_only_denied_missing_and_store_errors_are_retried() -> None:
    from providers.recording_files import (
        RecordingDenied,
        RecordingMissing,
        RecordingPathRefused,
        RecordingStoreFailed,
    )

    assert all(
        is_retryable(c("p", "x")) for c in (RecordingDenied, RecordingMissing, RecordingStoreFailed)
    )
    assert not is_retryable(RecordingPathRefused("p", "x"))
    assert not is_retryable(ValueError("x"))


def test_the_store_is_created_inside_its_root(tmp_path: Path) -> None:
    files = RecordingFiles(tmp_path / "in", tmp_path / "out", chunk_bytes=4)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "f").write_bytes(b"12345")
    stored = files.ingest("f", "tenant", "../../evil")
    assert Path(stored.stored_path).parent == tmp_path / "out" / "tenant"
    assert Path(stored.stored_path).read_bytes() == b"12345"
