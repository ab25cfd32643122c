"""What scenarios 4 and 14 share: the virtual rooms wired as the daemon wires them.

:func:`open_virtual` starts an embedded PostgreSQL (migrated, tenants) and NATS
(``bench.chaos.scenario_nats.open_backbone``), one Jitsi Videobridge emulator per
node of ``[jitsi] nodes``, the inbox consumer (row 18: scheduling events become
sessions) and :func:`supervisors.virtual.build_virtual`'s supervisor (fallback
threads, the pool, a poller per node), with the rows' detectors evaluated every
``daemon.detector_tick_s`` as the daemon's detector task does. Everything is
judged from outside: the database read as the superuser, the emulators' rooms.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

import asyncpg
import trio
from prometheus_client import CollectorRegistry

from actors.inbox import consumer_settings, inbox_child
from bench.chaos.harness import ChaosContext
from bench.chaos.scenario_nats import Backbone, open_backbone
from engine.detectors import DetectorSet
from engine.events import Event
from engine.metrics import Metrics
from engine.runtime import open_runtime
from providers import jetstream
from providers.bridge import run
from providers.db.pool import DbPool
from providers.emulators.base import EmulatorServer, serve_emulator
from providers.emulators.jitsi import JitsiBridgeEmulator
from providers.jetstream import PublishItem
from supervisors.virtual import Virtual, build_virtual

__all__ = ["SessionRow", "VirtualRig", "open_virtual"]


@dataclass(frozen=True)
class SessionRow:
    appointment_id: str
    patient_id: str | None
    state: str
    node: str | None
    room: str | None
    failures: int
    failovers: int
    fallback_thread_id: uuid.UUID | None


@dataclass
class VirtualRig:
    backbone: Backbone
    virtual: Virtual
    detectors: DetectorSet
    bridges: dict[str, JitsiBridgeEmulator]
    servers: dict[str, EmulatorServer]
    registry: CollectorRegistry
    subject: str
    events: list[Event] = field(default_factory=list)
    published: int = 0

    async def publish(
        self, appointments: Sequence[tuple[uuid.UUID, str, str]], *, starts_at: dt.datetime
    ) -> int:
        """Publish an ``appointment.booked`` event per (tenant, appointment, patient);
        returns how many publishes failed."""
        subject = self.subject
        items = [
            PublishItem(
                appointment,
                subject,
                json.dumps(
                    {
                        "tenant_id": str(tenant),
                        "appointment_id": appointment,
                        "kind": "appointment.booked",
                        "patient_id": patient,
                        "starts_at": starts_at.isoformat(),
                    }
                ).encode(),
            )
            for tenant, appointment, patient in appointments
        ]
        results = await run(jetstream.publish_batch, self.backbone.client, items, 5.0)
        self.published += len(items)
        return sum(1 for r in results if isinstance(r, Exception))

    async def sessions(self) -> list[SessionRow]:
        return await run(_sessions, self.backbone.postgres.url)

    async def fallback_threads(self) -> Counter[tuple[str, str, str]]:
        """Fallback threads per (tenant, patient, day)."""
        return await run(_fallbacks, self.backbone.postgres.url)

    def rooms_of(self, room: str) -> list[str]:
        """The live bridges hosting ``room``."""
        return [n for n, b in self.bridges.items() if room in b.rooms and self.servers[n].is_up]

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels or None) or 0.0


async def _sessions(url: str) -> list[SessionRow]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT appointment_id, patient_id, state, node, room, failures, failovers,"
            " fallback_thread_id FROM virtual_sessions ORDER BY appointment_id"
        )
        return [SessionRow(**dict(r)) for r in rows]
    finally:
        await conn.close()


async def _fallbacks(url: str) -> Counter[tuple[str, str, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT tenant_id, patient_id, day FROM fallback_threads")
        return Counter((str(r["tenant_id"]), r["patient_id"], r["day"].isoformat()) for r in rows)
    finally:
        await conn.close()


@asynccontextmanager
async def open_virtual(ctx: ChaosContext, *, tenants: int) -> AsyncIterator[VirtualRig]:
    config = ctx.config
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_label_values=config.daemon.max_label_values)
    shutdown_s = config.supervisors["default"].shutdown_s
    async with AsyncExitStack() as stack:
        backbone = await stack.enter_async_context(open_backbone(tenants=tenants, pool_max=6))
        runtime = await stack.enter_async_context(
            open_runtime(seed=config.daemon.seed, metrics=metrics)
        )
        bridges: dict[str, JitsiBridgeEmulator] = {}
        servers: dict[str, EmulatorServer] = {}
        for node in config.jitsi.nodes:
            bridges[node.name] = JitsiBridgeEmulator(node.name)
            servers[node.name] = await stack.enter_async_context(
                serve_emulator(bridges[node.name], host=config.emulators.host)
            )
        db = DbPool(backbone.pool, close_s=shutdown_s)
        detectors = DetectorSet()
        virtual = build_virtual(
            config, ctx.catalog, runtime, db, detectors,
            {name: server.url for name, server in servers.items()}, shutdown_s=shutdown_s,
        )  # fmt: skip
        subject = consumer_settings(config.inbox).subjects[0].replace(">", "appointment")
        rig = VirtualRig(backbone, virtual, detectors, bridges, servers, registry, subject)
        runtime.events.on(Event, rig.events.append)
        inbox_spec, _ = inbox_child(
            pool=backbone.pool, client=backbone.client, config=config.inbox,
            mailbox=config.mailboxes["relay"], shutdown_s=shutdown_s, registry=registry,
        )  # fmt: skip
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(inbox_spec.start)
                await nursery.start(virtual.supervisor.run)
                await nursery.start(detectors.run, config.daemon.detector_tick_s)
                yield rig
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                await virtual.aclose()
