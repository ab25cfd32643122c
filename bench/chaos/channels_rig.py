"""The rig of the channel scenarios (rows 1, 2, 3, 13, 19): the real daemon, in process.

:func:`open_rig` runs :class:`supervisors.daemon.Daemon` with the scenario's
config (``config/chaos.toml``: ``[emulators] enabled``, port 0, short windows),
its backbone on embedded PostgreSQL and NATS started for this rig alone, the
loopback provider emulators, and the whole channel wiring — so a scenario judges
what production runs, not a copy of it. It gives the scenario:

* :meth:`Rig.send`: a dispatch through ``POST /v1/dispatches`` (what a client
  does), entered in the :class:`~bench.chaos.harness.Ledger` as accepted when the
  daemon answers 2xx;
* :meth:`Rig.statuses` / :meth:`Rig.settle`: the dispatch rows as the owner sees
  them; a dispatch is settled when its row reached the scenario's final states;
* :meth:`Rig.count_receipts`: the emulators' counts per idempotency key, so a
  message any provider took twice is a duplicate;
* :attr:`Rig.fired`: the Trio time each detector first fired (``DetectorFired``
  events on the daemon's bus), and :meth:`Rig.fired_at`.

Tenants and templates are created as the owner: the daemon's role cannot.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import trio

from bench.chaos.harness import ChaosContext, Ledger
from engine.events import DetectorCleared, DetectorFired, Event
from providers.bridge import open_bridge, run
from supervisors.daemon import Daemon
from supervisors.emulated import Emulated
from supervisors.tree import Tree

__all__ = ["FINAL", "Rig", "open_rig"]

#: Dispatch statuses nothing changes any more.
FINAL = frozenset({"delivered", "failed", "undeliverable", "unknown"})

_TEMPLATES = (
    # (name, channel, category, subject, body)
    ("reminder", "sms", "reminder", None, "Reminder: your appointment is at {time}."),
    ("push_reminder", "push", "reminder", "Appointment", "Your appointment is at {time}."),
    ("email_reminder", "email", "reminder", "Your appointment", "See you at {time}."),
)


@dataclass
class Rig:
    daemon: Daemon
    tree: Tree
    emulated: Emulated
    client: httpx.AsyncClient
    owner_url: str
    tenants: list[uuid.UUID]
    ledger: Ledger = field(default_factory=Ledger)
    #: dispatch id -> the idempotency key it was sent with
    keys: dict[str, str] = field(default_factory=dict)
    fired: dict[str, float] = field(default_factory=dict)
    cleared: dict[str, float] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    # -- sending ----------------------------------------------------------------------

    async def send(
        self,
        channel: str,
        recipient: str,
        template: str,
        *,
        tenant: uuid.UUID | None = None,
        data: Mapping[str, str] | None = None,
        key: str | None = None,
        version: int | None = None,
    ) -> httpx.Response:
        """POST one dispatch; a 2xx answer's dispatch id is accepted in the ledger."""
        key = key or uuid.uuid4().hex
        body: dict[str, Any] = {
            "tenant_id": str(tenant or self.tenants[0]),
            "channel": channel,
            "template": template,
            "recipient": recipient,
            "data": dict(data or {"time": "10:30"}),
        }
        if version is not None:
            body["template_version"] = version
        answer = await self.client.post(
            "/v1/dispatches", json=body, headers={"Idempotency-Key": key}
        )
        if answer.is_success:
            dispatch_id = answer.json()["dispatch_id"]
            self.keys[dispatch_id] = key
            self.ledger.accept(dispatch_id)
        return answer

    # -- judging ----------------------------------------------------------------------

    async def statuses(self, ids: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
        """The dispatch rows (id -> status, reason, provider, possible_duplicate), as the owner."""
        wanted = list(ids) if ids is not None else list(self.keys)
        rows = await run(_fetch_statuses, self.owner_url, wanted, service="postgres")
        return rows

    async def settle(
        self, final: frozenset[str] = FINAL, *, timeout_s: float, tick_s: float = 0.1
    ) -> dict[str, dict[str, Any]]:
        """Wait until every accepted dispatch reached ``final`` (or the time is up);
        settle those that did in the ledger; the rows."""
        deadline = trio.current_time() + timeout_s
        while True:
            rows = await self.statuses()
            done = [i for i, r in rows.items() if r["status"] in final]
            if len(done) == len(self.keys) or trio.current_time() >= deadline:
                break
            await trio.sleep(tick_s)
        for dispatch_id in done:
            self.ledger.settle(dispatch_id)
        self.ledger.still_queued(i for i, r in rows.items() if r["status"] == "queued")
        return rows

    def count_receipts(self) -> None:
        """Enter every message the providers took into the ledger (duplicates show)."""
        for dispatch_id, key in self.keys.items():
            for _ in range(self.emulated.received(key)):
                self.ledger.receive(dispatch_id)

    def fired_at(self, prefix: str) -> float | None:
        """When the first detector whose name starts with ``prefix`` fired (Trio time)."""
        times = [t for name, t in self.fired.items() if name.startswith(prefix)]
        return min(times) if times else None

    def _on_event(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, DetectorFired):
            self.fired.setdefault(event.detector, event.at)
        elif isinstance(event, DetectorCleared):
            self.cleared[event.detector] = event.at


async def _fetch_statuses(url: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        records = await conn.fetch(
            "SELECT id::text AS id, status, reason, provider, possible_duplicate"
            " FROM dispatches WHERE id = ANY($1::uuid[])",
            ids,
        )
        return {r["id"]: dict(r) for r in records}
    finally:
        await conn.close()


async def _seed(url: str, count: int) -> list[uuid.UUID]:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            tenants = [
                r["id"]
                for r in await conn.fetch(
                    "INSERT INTO tenants (name) SELECT 'chaos-' || gen_random_uuid()"
                    " FROM generate_series(1, $1) RETURNING id",
                    count,
                )
            ]
            for tenant in tenants:
                for name, channel, category, subject, body in _TEMPLATES:
                    await conn.execute(
                        "INSERT INTO templates (tenant_id, name, version, channel, category,"
                        " subject, body, active) VALUES ($1, $2, 1, $3, $4, $5, $6, true)",
                        tenant, name, channel, category, subject, body,
                    )  # fmt: skip
        return tenants
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def open_rig(
    ctx: ChaosContext, *, tenants: int = 2, env: Mapping[str, str] | None = None
) -> AsyncIterator[Rig]:
    """The daemon on ``ctx.config`` with its own embedded services, until the block exits."""
    daemon = Daemon(
        ctx.config,
        ctx.catalog,
        source="chaos.toml",
        handle_signals=False,
        backbone=True,
        env=dict(env or {}),
    )
    # The scenario's own bridge (its database reads): the daemon's lives in its tasks.
    async with open_bridge(), trio.open_nursery() as nursery:
        port = await nursery.start(daemon.run)
        tree, emulated, backbone = daemon.tree, daemon.emulated, daemon.backbone
        if tree is None or emulated is None or backbone is None or not port:
            raise RuntimeError("the chaos daemon did not start (see its log)")
        owner_url = backbone.services.postgres_url
        made = await run(_seed, owner_url, tenants, service="postgres")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10.0) as client:
            rig = Rig(
                daemon=daemon,
                tree=tree,
                emulated=emulated,
                client=client,
                owner_url=owner_url,
                tenants=made,
            )
            assert daemon.runtime is not None
            unsubscribe = daemon.runtime.events.on(Event, rig._on_event)
            try:
                yield rig
            finally:
                unsubscribe()
                daemon.request_drain("chaos scenario over")
