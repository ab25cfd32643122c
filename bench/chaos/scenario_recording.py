"""Scenario 20, recording ingest failure: blob paths denied or missing.

The scenario owns its servers (an embedded PostgreSQL, migrated, two tenants, and an
embedded NATS with JetStream), a blob directory and a store directory, and runs the
recording ingest actor with ``[recordings]`` and ``[retries.recording_ingest]`` of
the scenario config (the directories are the scenario's), row 20's detector
(``[detectors.recording_failed]`` if set) and the outbox relay (``[relay]``), which
publishes the ``recording.failed`` events to JetStream.

Trigger: of N recordings registered, some paths are denied for a while (the first
two opens refused, as a blob mount with wrong permissions that an operator fixes;
the tests run as root, which permission bits do not stop, so the denial is
injected at the one place files are opened), some files arrive late (the recorder
still uploading: missing at the first attempt, there from the second), and some are
denied or missing for good.

Judged from outside (the database as the superuser, the stream, the store):

- detected: row 20's detector fired (``triage_recording_failed_total``);
- mitigated: the transiently denied and late recordings were retried and
  ingested (attempts > 1), every stored copy has its source's sha256; each
  recording denied or missing for good ended ``failed`` with exactly one dead letter
  and exactly one ``recording.failed`` event in JetStream, and one ticket notice;
  no recording is left pending;
- ``lost``: recordings neither ingested nor failed with their event;
  ``duplicates``: stored copies or events beyond one per recording.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, BinaryIO

import asyncpg
import msgspec
import trio

from actors.outbox_relay import relay_child
from actors.recording_ingest import (
    ROW,
    DbRecordingStore,
    Ingest,
    RecordingFailed,
    RecordingIngestStatistics,
    recording_ingest_child,
)
from bench.chaos.fixtures import evaluate_every
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from bench.chaos.scenario_nats import open_backbone
from config import engine_kwargs
from config.catalog import row_detector
from engine.breaker import Breaker
from engine.detectors import CountInWindowDetector, make_detector
from engine.events import DetectorFired, Event, EventBus
from engine.runtime import open_runtime
from providers import jetstream
from providers.bridge import run
from providers.recording_files import RecordingFiles, RecordingMissing
from supervisors.recordings import retry_policy

__all__ = ["DETECTOR_OVERRIDE", "ROW", "SCENARIO", "DenyingFiles", "run_scenario"]

DETECTOR_OVERRIDE = "recording_failed"
_FAULTS = ("ok", "ok", "denied_once", "late", "ok", "denied_for_good", "ok", "missing")


class DenyingFiles(RecordingFiles):
    """Opens of a file named in ``denied`` are refused (PermissionError) that many times;
    ``-1``: always."""

    def __init__(
        self, *args: Any, denied: dict[str, int], late: dict[str, bytes], **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.denied = denied
        self.late = late  # relative path -> bytes the recorder finishes uploading after
        # the first look found nothing

    def resolve(self, relative: str) -> Path:
        try:
            return super().resolve(relative)
        except RecordingMissing:
            data = self.late.pop(relative, None)
            if data is not None:  # the upload completes right after the first attempt
                (self.source / relative).write_bytes(data)
            raise

    def open_source(self, path: Path) -> BinaryIO:
        left = self.denied.get(path.name, 0)
        if left:
            self.denied[path.name] = left - 1 if left > 0 else left
            raise PermissionError(13, "Permission denied", str(path))
        return super().open_source(path)


async def _database_view(url: str) -> tuple[list[asyncpg.Record], Counter[str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT recording_id, status, attempts, sha256, stored_path, last_error FROM recordings"
        )
        letters = Counter(
            r["ref"].split("/", 1)[1]
            for r in await conn.fetch("SELECT ref FROM dead_letters WHERE source = 'recording'")
        )
        return list(rows), letters
    finally:
        await conn.close()


async def _pending(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM recordings WHERE status = 'pending'"))
    finally:
        await conn.close()


async def run_scenario(ctx: ChaosContext) -> Outcome:
    config = ctx.config
    count = 20 if ctx.quick else 200
    fields = engine_kwargs(row_detector(config, ctx.catalog, ROW, DETECTOR_OVERRIDE))
    bus = EventBus()
    seen: list[Event] = []
    bus.on(Event, seen.append)
    detector = make_detector(DETECTOR_OVERRIDE, row=ROW, events=bus, **fields).expect(
        CountInWindowDetector
    )
    ledger = Ledger()
    notes: list[str] = []
    budget = config.retries[config.recordings.retry]

    # Which recording meets which fault (by index).
    kinds = [_FAULTS[n % len(_FAULTS)] for n in range(count)]
    names = [f"rec-{n}" for n in range(count)]
    expect_failed = {names[n] for n in range(count) if kinds[n] in ("denied_for_good", "missing")}

    with tempfile.TemporaryDirectory(prefix="triage-recordings-") as root:
        incoming, store_dir = Path(root) / "incoming", Path(root) / "store"
        incoming.mkdir()
        rec_config = msgspec.structs.replace(
            config.recordings, path=str(incoming), store_path=str(store_dir)
        )
        digests: dict[str, str] = {}
        denied: dict[str, int] = {}
        late: dict[str, bytes] = {}
        for name, kind in zip(names, kinds, strict=True):
            data = f"{name} ".encode() * 1000
            digests[name] = hashlib.sha256(data).hexdigest()
            if kind == "denied_once":
                denied[f"{name}.mp4"] = 2
            elif kind == "denied_for_good":
                denied[f"{name}.mp4"] = -1
            if kind == "late":
                late[f"{name}.mp4"] = data
            elif kind != "missing":
                (incoming / f"{name}.mp4").write_bytes(data)
        files = DenyingFiles(
            incoming, store_dir, chunk_bytes=rec_config.chunk_bytes, denied=denied, late=late
        )

        async with open_backbone(tenants=2) as backbone, open_runtime() as runtime:
            shutdown_s = config.supervisors["default"].shutdown_s
            spec, ref = recording_ingest_child(
                store=DbRecordingStore(backbone.pool), config=rec_config,
                retry=retry_policy(config, runtime), mailbox=config.mailboxes["recordings"],
                shutdown_s=shutdown_s, files=files, detector=detector, events=bus,
                deadlines=runtime.deadlines,
            )  # fmt: skip
            breaker = Breaker("nats_publish", **engine_kwargs(config.breakers["nats_publish"]))
            relay_spec, _ = relay_child(
                pool=backbone.pool, client=backbone.client, config=config.relay, breaker=breaker,
                mailbox=config.mailboxes["relay"], shutdown_s=config.supervisors["relay"].shutdown_s,
            )  # fmt: skip

            def stats() -> RecordingIngestStatistics:
                got: object = ref.statistics()
                assert isinstance(got, RecordingIngestStatistics)
                return got

            async with trio.open_nursery() as nursery:
                await nursery.start(relay_spec.start)
                await nursery.start(spec.start)
                nursery.start_soon(evaluate_every, detector, config.daemon.detector_tick_s)
                started = trio.current_time()
                for n, name in enumerate(names):
                    answer = await ref.ask(
                        Ingest(
                            tenant_id=backbone.tenants[n % 2],
                            recording_id=name,
                            path=f"{name}.mp4",
                            session_id=f"session-{n}",
                        ),
                        timeout_s=rec_config.ask_timeout_s,
                    )
                    if answer is True:
                        ledger.accept(name)
                    else:
                        notes.append(f"{name}: registration answered {answer!r}")

                async def settled() -> bool:
                    return (
                        stats().in_flight == 0 and await run(_pending, backbone.postgres.url) == 0
                    )

                done = False
                with trio.move_on_after(budget.time_budget_s * 2 + 10):
                    while True:
                        done = await settled()
                        if done:
                            break
                        await trio.sleep(0.1)
                # The relay publishes the failed events.
                published: list[jetstream.StoredMessage] = []

                async def read() -> list[jetstream.StoredMessage]:
                    return await run(
                        jetstream.read_stream, backbone.client, config.relay.stream,
                        service="nats",
                    )  # fmt: skip

                async def all_published() -> bool:
                    nonlocal published
                    published = [m for m in await read() if m.subject == rec_config.event_subject]
                    return len(published) >= len(expect_failed)

                with trio.move_on_after(10):
                    while True:
                        if await all_published():
                            break
                        await trio.sleep(0.2)
                elapsed = trio.current_time() - started
                final = stats()
                nursery.cancel_scope.cancel()
            rows, letters = await run(_database_view, backbone.postgres.url)

        by_id = {r["recording_id"]: r for r in rows}
        events = Counter(json.loads(m.payload)["recording_id"] for m in published)
        stored = Counter(p.name for p in store_dir.rglob("*") if p.is_file())
        for name in names:
            row = by_id.get(name)
            if row is None:
                continue
            if row["status"] == "ingested":
                ledger.settle(name)
                for _ in range(stored[name]):
                    ledger.receive(name)
            elif row["status"] == "failed" and events[name] >= 1 and letters[name] >= 1:
                ledger.settle(name)
                for _ in range(events[name]):
                    ledger.receive(name)

    denied_once = [n for n, k in zip(names, kinds, strict=True) if k == "denied_once"]
    late_names = [n for n, k in zip(names, kinds, strict=True) if k == "late"]
    alarms = [e for e in seen if isinstance(e, DetectorFired) and e.row == ROW]
    notices = [e for e in seen if isinstance(e, RecordingFailed)]
    failed = {n for n, r in by_id.items() if r["status"] == "failed"}
    ingested_right = all(
        by_id[n]["status"] != "ingested" or by_id[n]["sha256"] == digests[n] for n in by_id
    )
    mitigated = (
        done
        and failed == expect_failed
        # Two opens refused, the third ingests; a late file is found by the second attempt.
        and all(by_id[n]["status"] == "ingested" and by_id[n]["attempts"] == 3 for n in denied_once)
        and all(by_id[n]["status"] == "ingested" and by_id[n]["attempts"] == 2 for n in late_names)
        and ingested_right
        and all(letters[n] == 1 and events[n] == 1 for n in expect_failed)
        and sorted(e.recording_id for e in notices) == sorted(expect_failed)
        and all(e.severity == "ticket" for e in notices)
    )
    attempts = Counter(int(r["attempts"]) for r in rows)
    notes.append(
        f"{count} recordings: {len(by_id) - len(failed)} ingested ({len(denied_once)} denied"
        f" twice, {len(late_names)} uploaded late), {len(failed)} failed with {sum(letters.values())} dead letters and"
        f" {len(published)} recording.failed events in JetStream; attempts {dict(sorted(attempts.items()))};"
        f" {final.attempts} file attempts in {elapsed:.2f}s; settled {done}"
    )
    return Outcome(
        detected=bool(alarms),
        detect_s=alarms[0].at - started if alarms else None,
        mitigated=mitigated,
        ledger=ledger,
        notes=notes,
    )


SCENARIO = Scenario(ROW, run_scenario)
