"""Scenario 9, outbox relay crash loop: poison events in the outbox under a supervised relay.

The scenario owns its servers (embedded PostgreSQL and NATS, as scenario 6) and
runs the relay as the daemon's role under a supervisor with the
``[supervisors.relay]`` intensity of the scenario config, the ``[relay]``
section, and catalog row 9's detector (``[detectors.relay_restarts]`` of the
scenario config if present) fed with the relay's restarts.

Triggers, between good events written by the application's writer:

* poison the relay refuses (no restart): a payload over the stream's
  ``max_msg_size`` (the scenario creates the stream with a 64 KiB cap), headers
  that are a JSON array instead of an object (schema drift, written behind the
  application's back), a subject the stream does not bind;
* poison that *crashes* the relay: events whose payload makes the relay's
  rendering raise. Triage has no renderer that crashes on data, so the scenario
  models one (a bug that some event's data triggers) by wrapping the relay's
  publish step: it raises on a payload marked ``{"render": "crash"}``. Two
  waves of one such event (committed with a good event, so that a batch claims
  both), more than the supervisor's ``period_s`` apart: each costs two restarts (the batch, then the row alone, which is quarantined), so
  the relay restarts four times in five minutes -- more than the detector's
  threshold of 3 -- without ever exceeding the supervisor's intensity.

Judged from outside: the detector fired; every poison event is in
``dead_letters`` and on the DLQ stream (``Nats-Msg-Id`` = ``dlq-outbox-<id>``)
and gone from the outbox; every good event is on the event stream exactly once,
in seq order per aggregate (gaps only at the skipped seqs); the supervisor did
not escalate. ``lost`` counts accepted events neither on a stream nor still
queued; ``duplicates`` counts any event stored twice on either stream.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import asyncpg
import trio

from actors.outbox_relay import RelayState, RelayStatistics, dlq_stream_name, nudge, relay_child
from bench.chaos.fixtures import wait_until
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from bench.chaos.scenario_nats import Writer, open_backbone
from config import engine_kwargs
from engine.breaker import Breaker
from engine.detectors import CountInWindowDetector, make_detector
from engine.events import DetectorFired, Event, EventBus
from engine.supervisor import Supervisor
from providers import jetstream
from providers.bridge import run
from providers.db.dead_letters import DLQ_MSG_ID_PREFIX
from providers.db.outbox import HEADER_AGGREGATE, HEADER_SEQ, HEADER_TENANT, OutboxRow, Publish

if TYPE_CHECKING:
    import nats.js.api

__all__ = ["ROW", "SCENARIO", "run_scenario"]

ROW = 9
DETECTOR = "relay_restarts"
STREAM_MAX_MSG_SIZE = 64 * 1024
CRASH_MARK = '"render": "crash"'


class RenderCrash(RuntimeError):
    """The modelled bug: rendering this event's data raises."""


@dataclass
class _Watch:
    fired_at: float | None = None

    def __call__(self, event: Event) -> None:
        if (
            isinstance(event, DetectorFired)
            and event.detector == DETECTOR
            and self.fired_at is None
        ):
            self.fired_at = event.at


@dataclass
class _Poison:
    """Poison rows written behind the application's back (the superuser), and their aggregates."""

    ids: list[int] = field(default_factory=list)
    seqs: dict[tuple[str, str], set[int]] = field(default_factory=lambda: defaultdict(set))


async def _create_stream(client: jetstream.JetStreamClient, stream: str, subjects: str) -> None:
    """The event stream, made before the relay starts, with a per-message size cap."""
    import nats.js.api

    config: nats.js.api.StreamConfig = nats.js.api.StreamConfig(
        name=stream,
        subjects=[s.strip() for s in subjects.split(",") if s.strip()],
        duplicate_window=120.0,
        max_msg_size=STREAM_MAX_MSG_SIZE,
    )
    await client.js.add_stream(config)


async def _insert_raw(
    url: str, tenant: uuid.UUID, rows: Sequence[tuple[str, str, str, str]]
) -> list[tuple[int, int]]:
    """Outbox rows ``(aggregate, subject, payload, headers)`` in one transaction: their (id, seq)."""
    conn = await asyncpg.connect(url)
    try:
        out = []
        async with conn.transaction():
            for aggregate, subject, payload, headers in rows:
                row = await conn.fetchrow(
                    "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, seq, subject,"
                    " payload, headers) VALUES ($1, 'appointment', $2, 1, $3, $4::jsonb,"
                    " $5::jsonb) RETURNING id, seq",
                    tenant,
                    aggregate,
                    subject,
                    payload,
                    headers,
                )
                assert row is not None
                out.append((int(row["id"]), int(row["seq"])))
        return out
    finally:
        await conn.close()


async def _outbox_and_letters(url: str) -> tuple[list[int], list[tuple[str, str]]]:
    """Ids still in the outbox unpublished; (ref, error) of the pending outbox dead letters."""
    conn = await asyncpg.connect(url)
    try:
        pending = await conn.fetch("SELECT id FROM outbox WHERE published_at IS NULL ORDER BY id")
        letters = await conn.fetch(
            "SELECT ref, error FROM dead_letters WHERE source = 'outbox' AND redriven_at IS NULL"
        )
        return [int(r["id"]) for r in pending], [(r["ref"], r["error"]) for r in letters]
    finally:
        await conn.close()


def _order_problems(
    messages: Sequence[jetstream.StoredMessage], skipped: dict[tuple[str, str], set[int]]
) -> list[str]:
    """Seqs per aggregate must increase, with gaps only at the dead-lettered seqs."""
    last: dict[tuple[str, str], int] = {}
    problems = []
    for message in messages:
        key = (message.headers.get(HEADER_TENANT, ""), message.headers.get(HEADER_AGGREGATE, ""))
        seq = int(message.headers.get(HEADER_SEQ, "0"))
        expected = last.get(key, 0) + 1
        while expected in skipped.get(key, set()):
            expected += 1
        if seq != expected:
            problems.append(f"{key[1]}@{key[0][:8]}: seq {seq}, expected {expected}")
        last[key] = seq
    return problems


async def run_scenario(ctx: ChaosContext) -> Outcome:
    """Scenario 9 (see the module docstring)."""
    config = ctx.config
    relay_config = config.relay
    per_wave = 10 if ctx.quick else 100
    detector_config = config.detectors.get(DETECTOR, ctx.catalog.row(ROW).detector)
    supervisor_fields = (
        engine_kwargs(config.supervisors["relay"]) if "relay" in config.supervisors else {}
    )
    period_s = float(supervisor_fields.get("period_s", 5.0))
    bus = EventBus()
    watch = _Watch()
    bus.on(Event, watch)
    ledger = Ledger()
    notes: list[str] = []
    poison = _Poison()
    crash_rows: list[int] = []
    subject = relay_config.subjects.split(",")[0].strip().replace(">", "appointment")

    async with open_backbone(tenants=2) as backbone:
        url = backbone.postgres.url
        await run(_create_stream, backbone.client, relay_config.stream, relay_config.subjects)
        detector = make_detector(
            DETECTOR, **engine_kwargs(detector_config), row=ROW, events=bus
        ).expect(CountInWindowDetector)
        breaker = Breaker(
            "nats_publish", **engine_kwargs(config.breakers["nats_publish"]), events=bus
        )

        def rendering(real: Publish) -> Publish:
            async def publish(rows: Sequence[OutboxRow]) -> Sequence[object]:
                for row in rows:
                    if CRASH_MARK in row.payload:
                        raise RenderCrash(f"cannot render event {row.id}: unknown field 'render'")
                return await real(rows)

            return publish

        spec, ref = relay_child(
            pool=backbone.pool, client=backbone.client, config=relay_config, breaker=breaker,
            mailbox=config.mailboxes["relay"], shutdown_s=config.supervisors["relay"].shutdown_s,
            restart_sinks=[detector], publish_hook=rendering,
        )  # fmt: skip
        seen: list[RelayStatistics] = []

        def relay() -> RelayStatistics:
            """The relay's statistics; while it restarts, the last ones seen."""
            stats = ref.statistics()
            if stats is not None:
                seen[:] = [stats]
            return seen[0]

        supervisor = Supervisor("relay", [spec], **supervisor_fields)
        writer = Writer(backbone.pool, backbone.tenants, 2, ledger)

        async def add_poison(tenant: uuid.UUID, aggregate: str, subj: str, body: str,
                             headers: str = "{}") -> int:  # fmt: skip
            [(outbox_id, seq)] = await run(
                _insert_raw, url, tenant, [(aggregate, subj, body, headers)]
            )
            ledger.accept(str(outbox_id))
            poison.ids.append(outbox_id)
            poison.seqs[(str(tenant), f"appointment/{aggregate}")].add(seq)
            return outbox_id

        async def add_crash(tenant: uuid.UUID, aggregate: str) -> int:
            """A good event and a crashing one committed together: one batch claims both."""
            rows = [(aggregate, subject, '{"n": "companion"}', "{}"),
                    (aggregate, subject, '{"render": "crash"}', "{}")]  # fmt: skip
            [(good_id, _), (outbox_id, seq)] = await run(_insert_raw, url, tenant, rows)
            ledger.accept(str(good_id))
            ledger.accept(str(outbox_id))
            poison.ids.append(outbox_id)
            poison.seqs[(str(tenant), f"appointment/{aggregate}")].add(seq)
            crash_rows.append(outbox_id)
            return outbox_id

        escalated = False
        started_at = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def supervise(task_status: trio.TaskStatus[None]) -> None:
                nonlocal escalated
                try:
                    await supervisor.run(task_status=task_status)
                except* Exception:
                    escalated = True

            async def evaluate() -> None:
                while True:
                    detector.evaluate()
                    await trio.sleep(config.daemon.detector_tick_s)

            await nursery.start(supervise)
            relay()  # the first statistics, while the relay surely runs
            nursery.start_soon(evaluate)
            tenant_a, tenant_b = backbone.tenants[0], backbone.tenants[1]

            # Wave 1: good events, the refused kinds of poison, one crashing event.
            await writer.write(per_wave)
            await add_poison(tenant_a, "a0", subject, json.dumps({"blob": "x" * 70_000}))
            await add_poison(tenant_a, "a0", subject, '{"n": -1}', '["drift"]')
            await add_poison(tenant_b, "a1", "elsewhere.unbound", '{"n": -2}')
            await add_crash(tenant_b, "a1")
            await writer.write(per_wave)
            nudge(ref)
            first = await wait_until(
                lambda: (
                    relay().dead_lettered >= 4
                    and relay().published >= writer.written + len(crash_rows)
                ),
                30,
            )
            notes.append(
                f"wave 1: drained={first}, restarts={relay().restarts},"
                f" dead-lettered={relay().dead_lettered}"
            )
            # Wave 2, past the supervisor's period: the restarts add up in the detector's window.
            await trio.sleep(period_s + 0.5)
            await add_crash(tenant_a, "a0")
            await writer.write(per_wave)
            nudge(ref)
            second = await wait_until(
                lambda: (
                    relay().dead_lettered >= 5
                    and relay().published >= writer.written + len(crash_rows)
                ),
                30,
            )
            await wait_until(lambda: watch.fired_at is not None, 2)
            notes.append(
                f"wave 2: drained={second}, restarts={relay().restarts},"
                f" quarantined={relay().quarantined}, relay {relay().state.value}"
            )
            relaying = relay().state is RelayState.RELAYING
            quarantined = relay().quarantined
            nursery.cancel_scope.cancel()

        stored = await run(jetstream.read_stream, backbone.client, relay_config.stream)
        dlq: list[jetstream.StoredMessage] = await run(
            partial(jetstream.read_stream, backbone.client, dlq_stream_name(relay_config))
        )
        pending, letters = await run(_outbox_and_letters, url)

    for message in stored:
        ledger.receive(message.msg_id)
    for message in dlq:
        ledger.receive(message.msg_id.removeprefix(DLQ_MSG_ID_PREFIX))
    lettered = {ref for ref, _ in letters}
    on_dlq = {m.msg_id.removeprefix(DLQ_MSG_ID_PREFIX) for m in dlq}
    on_stream = {m.msg_id for m in stored}
    pending_keys = {str(i) for i in pending}
    for key in ledger.accepted:
        if key in pending_keys:
            continue
        if key in on_stream or (key in lettered and key in on_dlq):
            ledger.settle(key)
    ledger.still_queued(pending_keys)
    poison_keys = {str(i) for i in poison.ids}
    good_keys = ledger.accepted - poison_keys
    order = _order_problems(stored, poison.seqs)
    if order:
        notes.append("order broken: " + ", ".join(order[:5]))
    notes.append(
        f"stream: {len(stored)} messages for {len(good_keys)} good events; DLQ: {len(dlq)}"
        f" messages, dead_letters: {len(letters)} for {len(poison_keys)} poison events"
    )
    notes.append(f"escalated={escalated}")
    mitigated = (
        poison_keys <= lettered
        and poison_keys <= on_dlq
        and on_stream == good_keys
        and not (poison_keys & on_stream)
        and not pending
        and not order
        and not escalated
        and relaying
        and quarantined == len(crash_rows)
    )
    detected = watch.fired_at is not None
    return Outcome(
        detected=detected,
        detect_s=None if watch.fired_at is None else watch.fired_at - started_at,
        mitigated=mitigated,
        ledger=ledger,
        notes=notes,
    )


SCENARIO = Scenario(ROW, run_scenario)
