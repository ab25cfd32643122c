"""The scanner pool's logic on trio's autojump clock, with exact times.

clamd is played by a scripted :class:`Scanner` and the database by a list, so the
rules are checked on their own: verdicts written (infected -> quarantined), a
permanent failure retried ``max_attempts`` times then ``failed`` (never clean),
an unreachable clamd waited for without spending attempts, workers scaled one
per poll within their bounds, and row 8's mitigation (every worker, large
uploads gated) while its detector fires. The real clamd and PostgreSQL are in
tests/actors/test_scanner_pool_clamd.py.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from actors.scanner_pool import (
    ScannerPool,
    ScannerState,
    ScannerStatistics,
    Submit,
    scanner_pool_child,
)
from config.schema import ScannerConfig
from engine.actor import ActorRef
from engine.detectors import GaugeSustainedDetector
from providers.blobstore import BlobInfo, BlobNotFound
from providers.clamd import ClamdStats, ClamdUnavailable, ScanError, ScanResult, ScanSizeLimit
from providers.db.attachments import AttachmentStatus, PendingScan, ScanRecord

TENANT = uuid.UUID(int=1)
IDLE = ClamdStats(queue=0, threads_live=1, threads_idle=1, threads_max=4)


class FakeBlobs:
    """An in-memory blob store (the real one is tested in tests/providers)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.held: dict[str, bytes] = {}

    async def put(self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int) -> BlobInfo:
        raise NotImplementedError

    async def get(self, key: str, *, chunk_bytes: int) -> AsyncGenerator[bytes, None]:
        await trio.lowlevel.checkpoint()
        if key not in self.blobs:
            raise BlobNotFound(key)
        yield self.blobs[key]

    async def delete(self, key: str) -> bool:
        return self.blobs.pop(key, None) is not None

    async def quarantine(self, key: str) -> None:
        self.held[key] = self.blobs.pop(key)

    async def exists(self, key: str) -> bool:
        return key in self.blobs

    async def quarantined(self, key: str) -> bool:
        return key in self.held


class FakeClamd:
    """Verdicts by content; ``hold`` makes every scan wait until it is set;
    ``down`` makes every call fail as an unreachable clamd does."""

    def __init__(self) -> None:
        self.hold: trio.Event | None = None
        self.stats_hold: trio.Event | None = None  # STATS waits for it (a frozen clamd)
        self.down = False
        self.fail_with: Exception | None = None
        self.stats_value = IDLE
        self.scans = 0

    async def scan(self, chunks: AsyncIterable[bytes]) -> ScanResult:
        data = b"".join([c async for c in chunks])
        self.scans += 1
        if self.down:
            raise ClamdUnavailable("connection refused")
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_with is not None:
            raise self.fail_with
        if b"EICAR" in data:
            return ScanResult(infected=True, signature="Triage.Test.EICAR.UNOFFICIAL")
        return ScanResult(infected=False)

    async def stats(self) -> ClamdStats:
        await trio.lowlevel.checkpoint()
        if self.stats_hold is not None:
            await self.stats_hold.wait()
        if self.down:
            raise ClamdUnavailable("connection refused")
        return self.stats_value


class FakeStore:
    def __init__(self, pending: list[PendingScan] | None = None) -> None:
        self.records: list[tuple[float, ScanRecord]] = []
        self._pending = pending or []
        self.final: dict[uuid.UUID, AttachmentStatus] = {}

    async def record(self, record: ScanRecord) -> bool:
        await trio.lowlevel.checkpoint()
        if record.id in self.final:
            return False
        self.records.append((trio.current_time(), record))
        if record.status is not AttachmentStatus.PENDING:
            self.final[record.id] = record.status
        return True

    async def pending(self, limit: int) -> list[PendingScan]:
        await trio.lowlevel.checkpoint()
        return [p for p in self._pending if p.id not in self.final][:limit]


def config(**overrides: Any) -> ScannerConfig:
    fields: dict[str, Any] = {
        "min_workers": 1, "max_workers": 3, "scale_up_depth": 2, "poll_interval_s": 1.0,
        "max_attempts": 3, "retry_backoff_s": 1.0, "queue_capacity": 1000,
    }  # fmt: skip
    return ScannerConfig(**{**fields, **overrides})


class Rig:
    def __init__(self, blobs: FakeBlobs, clamd: FakeClamd, store: FakeStore) -> None:
        self.blobs, self.clamd, self.store = blobs, clamd, store
        self.gated: list[tuple[float, int | None]] = []
        self.ref: ActorRef[Any]

    def add(self, data: bytes) -> PendingScan:
        scan = PendingScan(id=uuid.uuid4(), tenant_id=TENANT, blob_key=f"t/{uuid.uuid4()}",
                           size_bytes=len(data))  # fmt: skip
        self.blobs.blobs[scan.blob_key] = data
        return scan

    def stats(self) -> ScannerStatistics:
        s: ScannerStatistics = self.ref.statistics()
        return s


@asynccontextmanager
async def running(
    cfg: ScannerConfig,
    *,
    pending: list[PendingScan] | None = None,
    detector: GaugeSustainedDetector | None = None,
    prepare: Callable[[Rig], None] | None = None,
) -> AsyncIterator[Rig]:
    rig = Rig(FakeBlobs(), FakeClamd(), FakeStore(pending))
    if prepare is not None:
        prepare(rig)
    spec, ref = scanner_pool_child(
        scanner=rig.clamd, blobs=rig.blobs, store=rig.store, config=cfg, backed_up_max_bytes=100,
        capacity=100, shutdown_s=1.0, detector=detector,
        gate=lambda limit: rig.gated.append((trio.current_time(), limit)),
    )  # fmt: skip
    rig.ref = ref
    async with trio.open_nursery() as nursery:
        await nursery.start(spec.start)
        yield rig
        nursery.cancel_scope.cancel()


def statuses(store: FakeStore) -> list[tuple[float, AttachmentStatus, str | None]]:
    return [(t, r.status, r.error or r.signature) for t, r in store.records]


async def test_verdicts_are_written_and_infected_blobs_quarantined(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with running(config()) as rig:
        clean, infected = rig.add(b"hello"), rig.add(b"xx EICAR xx")
        await rig.ref.tell(Submit(clean))
        await rig.ref.tell(Submit(infected))
        await trio.testing.wait_all_tasks_blocked()
        assert rig.store.final == {
            clean.id: AttachmentStatus.CLEAN,
            infected.id: AttachmentStatus.INFECTED,
        }
        assert list(rig.blobs.held) == [infected.blob_key]
        assert infected.blob_key not in rig.blobs.blobs and clean.blob_key in rig.blobs.blobs
        stats = rig.stats()
        assert (stats.clean, stats.infected, stats.pending) == (1, 1, 0)
        assert statuses(rig.store)[1][2] == "Triage.Test.EICAR.UNOFFICIAL"


async def test_a_permanent_failure_is_retried_then_failed_never_clean(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with running(config()) as rig:
        rig.clamd.fail_with = ScanSizeLimit("clamd refused the stream", reply="x")
        scan = rig.add(b"big")
        start = trio.current_time()
        await rig.ref.tell(Submit(scan))
        with trio.fail_after(10):
            while scan.id not in rig.store.final:  # noqa: ASYNC110 - virtual time, polled
                await trio.sleep(0.1)
        got = [(t - start, s) for t, s, _ in statuses(rig.store)]
        # One attempt at 0, again retry_backoff_s after each failure; the third is final.
        assert got == [
            (0.0, AttachmentStatus.PENDING),
            (1.0, AttachmentStatus.PENDING),
            (2.0, AttachmentStatus.FAILED),
        ]
        assert all("ScanSizeLimit" in (e or "") for _, _, e in statuses(rig.store))
        stats = rig.stats()
        assert (stats.failed, stats.retries, stats.clean, stats.pending) == (1, 2, 0, 0)


async def test_a_reloaded_row_keeps_its_spent_attempts(autojump_clock: trio.abc.Clock) -> None:
    scan = PendingScan(id=uuid.uuid4(), tenant_id=TENANT, blob_key="t/x", size_bytes=1, attempts=2)

    def failing(rig: Rig) -> None:
        rig.blobs.blobs["t/x"] = b"x"
        rig.clamd.fail_with = ScanError("clamd answered an error")

    async with running(config(max_attempts=3), pending=[scan], prepare=failing) as rig:
        await trio.testing.wait_all_tasks_blocked()
        # Two attempts were spent before the restart: the third is the last.
        assert [s for _, s, _ in statuses(rig.store)] == [AttachmentStatus.FAILED]


async def test_a_missing_blob_fails_at_once(autojump_clock: trio.abc.Clock) -> None:
    async with running(config()) as rig:
        scan = PendingScan(id=uuid.uuid4(), tenant_id=TENANT, blob_key="t/gone", size_bytes=1)
        await rig.ref.tell(Submit(scan))
        await trio.testing.wait_all_tasks_blocked()
        [(_, status, error)] = statuses(rig.store)
        assert status is AttachmentStatus.FAILED and "BlobNotFound" in (error or "")


async def test_an_unreachable_clamd_is_waited_for_without_spending_attempts(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with running(config(max_attempts=1)) as rig:
        rig.clamd.down = True
        scan = rig.add(b"hello")
        await rig.ref.tell(Submit(scan))
        await trio.sleep(5.5)
        stats = rig.stats()
        assert stats.state is ScannerState.CLAMD_DOWN
        assert rig.store.records == []  # no attempt recorded: clamd is down, not the file
        assert (stats.queued, stats.unreachable) == (1, 1)
        assert rig.clamd.scans == 1  # not dispatched again while down
        rig.clamd.down = False
        await trio.sleep(1.0)  # the next poll's STATS answers
        assert rig.store.final == {scan.id: AttachmentStatus.CLEAN}
        assert rig.stats().state is ScannerState.SCANNING


async def test_workers_scale_one_per_poll_within_bounds(autojump_clock: trio.abc.Clock) -> None:
    async with running(config(min_workers=1, max_workers=3, scale_up_depth=2)) as rig:
        rig.clamd.hold = trio.Event()
        for _ in range(12):
            await rig.ref.tell(Submit(rig.add(b"x")))
        seen = [(rig.stats().workers, rig.stats().scanning)]
        await trio.sleep(0.5)  # sampled between polls (at 1.0, 2.0, ...)
        for _ in range(4):
            await trio.sleep(1.0)
            seen.append((rig.stats().workers, rig.stats().scanning))
        # One more worker per poll while > scale_up_depth wait per worker; never past max.
        assert seen == [(1, 1), (2, 2), (3, 3), (3, 3), (3, 3)]
        rig.clamd.stats_value = ClamdStats(queue=0, threads_live=4, threads_idle=0, threads_max=4)
        rig.clamd.hold.set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(rig.store.final) == 12
        shrink = []
        for _ in range(3):
            await trio.sleep(1.0)
            shrink.append(rig.stats().workers)
        assert shrink == [2, 1, 1]  # one fewer per idle poll, never below min_workers


async def test_no_scaling_up_while_clamd_has_no_idle_thread(autojump_clock: trio.abc.Clock) -> None:
    def busy(rig: Rig) -> None:
        rig.clamd.stats_value = ClamdStats(queue=3, threads_live=4, threads_idle=0, threads_max=4)

    async with running(config(), prepare=busy) as rig:
        rig.clamd.hold = trio.Event()
        for _ in range(12):
            await rig.ref.tell(Submit(rig.add(b"x")))
        await trio.sleep(3.5)
        assert rig.stats().workers == 1
        assert rig.stats().gauge == 12 + 3  # ours plus clamd's queue
        rig.clamd.hold.set()


async def test_row_8_fires_every_worker_and_gates_large_uploads_until_it_clears(
    autojump_clock: trio.abc.Clock,
) -> None:
    detector = GaugeSustainedDetector(
        "scan_stuck", metric="triage_scan_queue_depth", threshold=5, clear_threshold=1,
        for_s=2.0, window_s=1.0,
    )  # fmt: skip
    async with running(config(max_workers=3, scale_up_depth=1000), detector=detector) as rig:
        rig.clamd.hold = trio.Event()
        start = trio.current_time()
        for _ in range(8):
            await rig.ref.tell(Submit(rig.add(b"x")))
        async with trio.open_nursery() as evaluating:

            async def evaluate() -> None:
                await trio.sleep(0.25)  # evaluated between polls: 0.25, 0.75, ...
                while True:
                    detector.evaluate()
                    await trio.sleep(0.5)

            evaluating.start_soon(evaluate)
            await trio.sleep(4.6)
            # The gauge went over 5 at the first poll (1.0); held for_s = 2 s, the detector
            # fired at the evaluation at 3.25; the pool acted at its next poll (4.0).
            assert detector.firing
            stats = rig.stats()
            assert stats.state is ScannerState.BACKED_UP and stats.blocking_large_uploads
            assert stats.workers == 3  # scale_up_depth never allowed more: the mitigation did
            assert [(t - start, limit) for t, limit in rig.gated] == [(4.0, 100)]
            rig.clamd.hold.set()
            await trio.sleep(2.0)
            evaluating.cancel_scope.cancel()
        assert not detector.firing
        # Drained: gauge 0 at the poll at 5.0, cleared at 5.25, the gate opened at 6.0.
        assert [(t - start, limit) for t, limit in rig.gated] == [(4.0, 100), (6.0, None)]
        assert not rig.stats().blocking_large_uploads
        assert len(rig.store.final) == 8


async def test_row_8_firing_takes_every_worker_without_waiting_for_clamds_stats(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The step to max_workers does not wait for clamd's STATS answer (a frozen clamd
    may never give one): the poll after the detector fired gates large uploads and
    allows every worker at once."""
    detector = GaugeSustainedDetector(
        "scan_stuck", metric="triage_scan_queue_depth", threshold=5, clear_threshold=1,
        for_s=2.0, window_s=1.0,
    )  # fmt: skip
    async with running(config(max_workers=3, scale_up_depth=1000), detector=detector) as rig:
        rig.clamd.hold = trio.Event()
        start = trio.current_time()
        for _ in range(8):
            await rig.ref.tell(Submit(rig.add(b"x")))
        await trio.sleep(3.25)  # the polls at 1, 2, 3 fed the gauge: 8 > 5 since 1.0
        detector.evaluate()
        assert detector.firing and rig.stats().workers == 1 and rig.gated == []
        rig.clamd.stats_hold = trio.Event()  # the STATS of the poll at 4.0 never answers
        await trio.sleep(1.0)
        stats = rig.stats()
        assert stats.workers == 3 and stats.blocking_large_uploads
        assert [(t - start, limit) for t, limit in rig.gated] == [(4.0, 100)]
        rig.clamd.stats_hold.set()
        rig.clamd.hold.set()


async def test_pending_rows_are_reloaded_and_a_submit_of_one_is_not_scanned_twice(
    autojump_clock: trio.abc.Clock,
) -> None:
    blobs: dict[str, bytes] = {}
    pending = []
    for n in range(3):
        scan = PendingScan(id=uuid.uuid4(), tenant_id=TENANT, blob_key=f"t/{n}", size_bytes=1)
        blobs[scan.blob_key] = b"x"
        pending.append(scan)

    def seed(rig: Rig) -> None:
        rig.blobs.blobs.update(blobs)
        rig.clamd.hold = trio.Event()

    async with running(config(max_workers=1), pending=pending, prepare=seed) as rig:
        await trio.testing.wait_all_tasks_blocked()
        await rig.ref.tell(Submit(pending[2]))  # also submitted: one scan only
        assert rig.stats().pending == 3
        assert rig.clamd.hold is not None
        rig.clamd.hold.set()
        await trio.testing.wait_all_tasks_blocked()
        assert len(rig.store.records) == 3 and rig.clamd.scans == 3
        assert set(rig.store.final) == {p.id for p in pending}


def test_the_pool_is_named_for_its_module() -> None:
    assert ScannerPool.name == "scanner_pool"
    with pytest.raises(ScanError):
        raise ScanError("x")
