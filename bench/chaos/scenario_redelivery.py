"""Scenario 18, scheduling event re-delivery: JetStream redelivers events whose ack was lost.

The scenario owns its servers (an embedded PostgreSQL, migrated, three tenants,
and an embedded NATS with JetStream) and runs the inbox consumer as the daemon's
role with the ``[inbox]`` section of the scenario config (chaos.toml shortens
``ack_wait_s`` and the backoff) and row 18's detector
(``[detectors.inbox_duplicates]`` if set).

1. N scheduling events ("appointment booked", one appointment each) are
   published with ``Nats-Msg-Id`` = the appointment.
2. Trigger, ack loss: the consumer commits every event, but withholds the ack of
   the first delivery of every third one (:class:`AckLosingConsumer`); JetStream
   delivers those again after the ack wait. On top, a fifth of the events is
   published a second time under a *different* ``Nats-Msg-Id`` (the stream's
   dedupe cannot catch those), and a few a second time under the same id (the
   stream drops those itself).
3. The consumer runs until the durable consumer has nothing pending or
   unacknowledged.

Judged from outside, in the database (as the superuser):

- detected: row 18's detector fired, and the duplicates its metric counted
  (``triage_inbox_duplicates_total``) equal every delivery beyond the one that
  applied its appointment -- at least the dropped acks plus the republished
  events (on a loaded machine an ack that arrives after the ack wait adds a
  redelivery) -- every one was seen and dropped;
- mitigated: every appointment has exactly one inbox row and one session thread,
  no dead letter, and JetStream holds nothing pending;
- ``lost``: appointments without their inbox row; ``duplicates``: session
  threads beyond the first per appointment.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter

import asyncpg
import trio
from prometheus_client import CollectorRegistry

from actors.inbox import (
    ROW,
    InboxConsumer,
    InboxStatistics,
    consumer_settings,
    detector_config,
    inbox_child,
)
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from bench.chaos.scenario_nats import open_backbone
from config import engine_kwargs
from engine.detectors import CountInWindowDetector, make_detector
from providers import jetstream
from providers.bridge import run
from providers.db.inbox import session_topic
from providers.jetstream import PublishItem
from providers.jetstream_consumer import ConsumerSettings, Delivery, Settle, SettleKind

__all__ = ["ROW", "SCENARIO", "AckLosingConsumer", "run_scenario"]

DUPLICATES_METRIC = "triage_inbox_duplicates_total"


class AckLosingConsumer(InboxConsumer):
    """The inbox consumer with a lossy ack path: the first ack of every ``every``-th message
    (by stream sequence) is never sent, as if lost on the network."""

    every = 3

    def settle_for(self, delivery: Delivery, decision: Settle) -> Settle:
        if (
            decision.kind is SettleKind.ACK
            and delivery.num_delivered == 1
            and delivery.stream_seq % self.every == 0
        ):
            return Settle.skip()
        return decision


def _body(tenant: uuid.UUID, appointment: str) -> bytes:
    return json.dumps(
        {"tenant_id": str(tenant), "appointment_id": appointment, "kind": "appointment.booked"}
    ).encode()


async def _unsettled(client: jetstream.JetStreamClient, settings: ConsumerSettings) -> int:
    """asyncio side: the durable consumer's pending plus ack-pending messages."""
    info = await client.js.consumer_info(settings.stream, settings.durable)
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


async def _database_view(url: str) -> tuple[list[str], Counter[str], int]:
    """Inbox appointment ids, session threads per topic, dead letters (read as the superuser)."""
    conn = await asyncpg.connect(url)
    try:
        inbox = [r["appointment_id"] for r in await conn.fetch("SELECT appointment_id FROM inbox")]
        threads = Counter(r["topic"] for r in await conn.fetch("SELECT topic FROM threads"))
        letters = int(
            await conn.fetchval("SELECT count(*) FROM dead_letters WHERE source = 'inbox'")
        )
        return inbox, threads, letters
    finally:
        await conn.close()


async def run_scenario(ctx: ChaosContext) -> Outcome:
    config = ctx.config
    count = 30 if ctx.quick else 300
    republished = count // 5
    same_id = 3
    registry = CollectorRegistry()
    detector = make_detector(
        "inbox_duplicates", row=ROW, **engine_kwargs(detector_config(config, ctx.catalog))
    ).expect(CountInWindowDetector)
    ledger = Ledger()
    notes: list[str] = []

    async with open_backbone(tenants=3) as backbone:
        spec, consumer = inbox_child(
            pool=backbone.pool, client=backbone.client, config=config.inbox,
            mailbox=config.mailboxes["relay"], shutdown_s=config.supervisors["default"].shutdown_s,
            detector=detector, registry=registry, actor=AckLosingConsumer,
        )  # fmt: skip
        settings = consumer_settings(config.inbox)
        subject = settings.subjects[0].replace(">", "appointment")

        appointments = {
            f"apt-{n}": backbone.tenants[n % len(backbone.tenants)] for n in range(count)
        }
        items = [PublishItem(a, subject, _body(t, a)) for a, t in appointments.items()]
        names = list(appointments)
        items += [
            PublishItem(f"re-{a}", subject, _body(appointments[a], a)) for a in names[:republished]
        ]
        items += [PublishItem(a, subject, _body(appointments[a], a)) for a in names[-same_id:]]
        stats: InboxStatistics | None = None
        async with trio.open_nursery() as nursery:
            await nursery.start(spec.start)  # the stream and the durable consumer exist
            results = await run(jetstream.publish_batch, backbone.client, items, 5.0)
            failed = [r for r in results if isinstance(r, Exception)]
            if failed:
                notes.append(f"{len(failed)} publishes failed (first: {failed[0]!r})")
            for appointment in appointments:
                ledger.accept(appointment)

            started = trio.current_time()
            fired_at: float | None = None
            settled = False
            with trio.move_on_after(30 if ctx.quick else 120):
                while True:
                    await trio.sleep(config.inbox.fetch_timeout_s)
                    stats = consumer.statistics()
                    if fired_at is None and detector.evaluate().firing:
                        fired_at = trio.current_time()
                    if stats is not None and stats.fetched >= count + republished:
                        left = await run(_unsettled, backbone.client, settings, service="nats")
                        if left == 0:
                            settled = True
                            break
            stats = consumer.statistics()
            nursery.cancel_scope.cancel()

        inbox, threads, letters = await run(_database_view, backbone.postgres.url)

    for appointment in inbox:
        ledger.settle(appointment)
    for topic, n in threads.items():
        for _ in range(n):
            ledger.receive(topic.removeprefix("appointment:"))

    assert stats is not None, "the consumer ran"
    counted = registry.get_sample_value(DUPLICATES_METRIC) or 0.0
    # Every delivery beyond the one that applied its appointment is a duplicate: the dropped
    # acks and the republished events at least, and on a loaded machine also any event whose
    # ack arrived after the ack wait (JetStream redelivers it too).
    expected = stats.fetched - count
    detected = (
        fired_at is not None
        and counted == expected == stats.duplicates
        and expected >= stats.acks_dropped + republished
    )
    one_each = sorted(inbox) == sorted(appointments) and all(
        threads.get(session_topic(a)) == 1 for a in appointments
    )
    mitigated = settled and one_each and letters == 0 and len(threads) == count
    notes.append(
        f"events {count}, republished {republished} (+{same_id} same id), acks dropped"
        f" {stats.acks_dropped}, fetched {stats.fetched}, duplicates counted {int(counted)}"
        f" (expected {expected}, at least {stats.acks_dropped + republished}),"
        f" applied {stats.applied}, dead letters {letters}, consumer drained {settled}"
    )
    return Outcome(
        detected=detected,
        detect_s=None if fired_at is None else fired_at - started,
        mitigated=mitigated,
        ledger=ledger,
        notes=notes,
    )


SCENARIO = Scenario(ROW, run_scenario)
