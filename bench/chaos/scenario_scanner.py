"""Scenario 8, attachment scan stuck: clamd hangs while uploads keep coming.

The scenario runs the daemon's attachment wiring (:mod:`bench.chaos.attachments_rig`:
real PostgreSQL, a real clamd, the HTTP server) with the ``[scanner]`` and
``[uploads]`` of the scenario config (chaos.toml: short timeouts, at most 4
workers, a 16 KiB "backed up" limit) and row 8's detector
(``[detectors.scan_queue_depth]`` if set).

1. Warm-up: a few uploads, scanned at once by one worker.
2. Trigger: clamd is frozen (SIGSTOP: it accepts connections and answers
   nothing, the "hung scanner" of the runbook). Small uploads keep coming: each
   is stored and registered (202), and its scan waits in our queue -- the pool
   finds clamd silent, puts the job back, and stops dispatching until clamd
   answers STATS again.
3. Once row 8 fires: a large upload is tried (refused: 503
   ``scanner_backed_up`` naming the limit) and a small one (accepted).
4. Recovery: clamd is thawed (SIGCONT); the backlog drains with every worker;
   a large upload is accepted again once the detector cleared.

Judged from outside:

- detected: row 8's detector fired (and published its alert event) while clamd
  was frozen;
- mitigated: the pool ran ``max_workers`` workers while it fired, refused the
  large upload with the typed error, accepted small ones, and after the thaw
  every upload ended ``clean`` (the EICAR ones ``infected`` and quarantined),
  the detector cleared, and large uploads were accepted again;
- ``lost``: uploads answered 202 without their final state; ``duplicates``:
  attachment rows beyond one per upload.
"""

from __future__ import annotations

import hashlib
import random
import uuid
from collections import Counter

import trio

from actors.scanner_pool import ROW, ScannerStatistics
from bench.chaos.attachments_rig import EICAR, AttachmentsRig, database_rows, open_attachments
from bench.chaos.fixtures import evaluate_every, wait_until
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from engine.events import DetectorCleared, DetectorFired
from providers.bridge import run

__all__ = ["ROW", "SCENARIO", "run_scenario"]


async def _all_final(rig: AttachmentsRig, count: int, timeout_s: float) -> bool:
    with trio.move_on_after(timeout_s):
        while True:
            rows = await run(database_rows, rig.postgres.url)
            if len(rows) >= count and all(r["status"] != "pending" for r in rows):
                return True
            await trio.sleep(rig.config.scanner.poll_interval_s)
    return False


async def run_scenario(ctx: ChaosContext) -> Outcome:
    ledger = Ledger()
    notes: list[str] = []
    chance = random.Random(8)
    async with open_attachments(ctx.config, ctx.catalog, tenants=2) as rig:
        config = rig.config
        threshold = next(d for d in rig.detectors if d.row == ROW).threshold
        backlog = int(threshold) * 2 if ctx.quick else int(threshold) * 5
        limit = config.uploads.backed_up_max_bytes
        detector = next(d for d in rig.detectors if d.row == ROW)
        sent: dict[uuid.UUID, tuple[uuid.UUID, bytes]] = {}

        async def upload(n: int, size: int) -> int:
            tenant = rig.tenants[n % len(rig.tenants)]
            data = EICAR if n % 10 == 7 else chance.randbytes(size)
            answer = await rig.upload(tenant, data)
            if answer.status == 202 and answer.attachment is not None:
                sent[answer.attachment] = (tenant, data)
                ledger.accept(str(answer.attachment))
            return answer.status

        def stats() -> ScannerStatistics:
            s: ScannerStatistics = rig.attachments.scanner.statistics()
            return s

        frozen_at = trio.current_time()
        fired_at: float | None = None
        large_refused: tuple[int, str, object] | None = None
        small_during = 0
        workers_while_firing = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(evaluate_every, detector, config.daemon.detector_tick_s)
            warm = [await upload(n, 512) for n in range(5)]
            warmed = await wait_until(lambda: stats().pending == 0, 10.0)
            await trio.to_thread.run_sync(rig.clamd.pause)
            try:
                frozen_at = trio.current_time()
                n = 5
                while n < 5 + backlog:
                    await upload(n, chance.randint(64, 4096))
                    n += 1
                    if fired_at is None and detector.firing:  # uploads keep coming meanwhile
                        fired_at = trio.current_time()
                fired = await wait_until(lambda: detector.firing, 15.0)
                if fired:
                    fired_at = trio.current_time() if fired_at is None else fired_at
                    await wait_until(lambda: stats().blocking_large_uploads, 5.0)
                    await wait_until(
                        lambda: rig.attachments.admission.statistics().backed_up_limit is not None,
                        5.0,
                    )
                    workers_while_firing = stats().workers
                    big = await rig.upload(rig.tenants[0], b"L" * (limit + 1))
                    large_refused = (big.status, big.body.get("error", ""), big.body.get("limit"))
                    small_during = await upload(n, 256)
                    n += 1
            finally:
                await trio.to_thread.run_sync(rig.clamd.resume)
            final = await _all_final(rig, len(sent), 30 if ctx.quick else 120)
            cleared = await wait_until(lambda: not detector.firing, 15.0)
            # The pool opens the gate at its next poll after the detector cleared.
            reopened = await wait_until(
                lambda: rig.attachments.admission.statistics().backed_up_limit is None, 5.0
            )
            large_after = await upload(n, limit + 1)
            final = final and await _all_final(rig, len(sent), 15)
            nursery.cancel_scope.cancel()

        rows = await run(database_rows, rig.postgres.url)
        by_id = {r["id"]: r for r in rows}
        for attachment, (tenant, data) in sent.items():
            row = by_id.get(attachment)
            if row is None:
                continue
            key = f"{tenant}/{attachment}"
            if data == EICAR:
                ok = row["status"] == "infected" and await rig.attachments.blobs.quarantined(key)
            else:
                ok = row["status"] == "clean" and row["sha256"] == hashlib.sha256(data).hexdigest()
            if ok:
                ledger.settle(str(attachment))
        for attachment in Counter(r["id"] for r in rows).elements():
            ledger.receive(str(attachment))
        end = stats()
        alerts = [e for e in rig.events if isinstance(e, DetectorFired) and e.row == ROW]
        clears = [e for e in rig.events if isinstance(e, DetectorCleared) and e.row == ROW]

    max_workers = config.scanner.max_workers
    detected = fired_at is not None and bool(alerts)
    mitigated = (
        warmed
        and workers_while_firing == max_workers
        and large_refused == (503, "scanner_backed_up", limit)
        and small_during == 202
        and final
        and cleared
        and reopened
        and bool(clears)
        and large_after == 202
    )
    notes.append(
        f"warm-up {warm}, backlog {backlog} while clamd frozen (threshold {threshold:g}),"
        f" workers while firing {workers_while_firing}/{max_workers}, large upload then"
        f" {large_refused}, small upload then {small_during}, all final {final}, cleared"
        f" {cleared} (gate reopened {reopened}), large upload after {large_after}, alerts {len(alerts)}, scans: clean"
        f" {end.clean} infected {end.infected} failed {end.failed} unreachable"
        f" {end.unreachable}"
    )
    return Outcome(
        detected=detected,
        detect_s=None if fired_at is None else fired_at - frozen_at,
        mitigated=mitigated,
        ledger=ledger,
        notes=notes,
    )


SCENARIO = Scenario(ROW, run_scenario)
