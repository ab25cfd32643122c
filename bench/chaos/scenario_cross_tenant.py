"""Scenario 12, cross-tenant participant: a bug bypasses the tenant check; RLS holds.

The scenario owns its server: an embedded PostgreSQL, migrated, two tenants A
and B, each with one thread. The thread service runs as the daemon's role
(``triage_daemon``: no superuser, no BYPASSRLS) with ``[threads]`` and row 12's
detector (``[detectors.tenant_check_violations]`` if set).

1. Load: participants of each tenant join their own tenant's thread through the
   service (the application check on).
2. Trigger, the bug: :class:`CheckBypassingThreadService` -- the same service with
   its application check switched off on purpose -- writes cross-tenant
   participants in the two shapes such a bug takes: B's participant into A's
   thread acting as A, and A's participant row written while acting as B. A few
   go through the real service too, which its application check refuses.
3. More legitimate load after the attack: the service keeps working.

Judged from outside, in the database (as the superuser, who sees every tenant):

- detected: row 12's detector fired (its ``DetectorFired`` is the alert the sink
  pages with), and ``triage_tenant_check_violations_total`` counted every
  refusal -- ``check="database"`` for each bypassed write (each one refused with
  SQLSTATE 42501), ``check="application"`` for each the check caught;
- mitigated: no participant row anywhere whose tenant differs from its thread's,
  no intruder in any thread, and the restrictive policies of migration 0011 are
  in place;
- ``lost``: legitimate participants missing from their thread;
  ``duplicates``: a participant present twice.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import trio
from prometheus_client import CollectorRegistry

from actors.thread_service import (
    APPLICATION,
    DATABASE,
    METRIC,
    ROW,
    CrossTenantParticipant,
    Participant,
    ThreadService,
    detector_config,
)
from bench.chaos.fixtures import create_tenants
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from bench.chaos.scenario_db import FAST_POSTGRES
from config import engine_kwargs
from config.catalog import alert_name
from engine.detectors import CountInWindowDetector, make_detector
from engine.events import DetectorFired, Event, EventBus
from providers.bridge import open_bridge, run
from providers.db import DAEMON_ROLE, migrate
from providers.db.pool import open_pool
from providers.db.threads import RLS_REFUSED
from providers.embedded import EmbeddedPostgres
from providers.services import postgres_url_with

__all__ = ["ROW", "SCENARIO", "CheckBypassingThreadService", "run_scenario"]

POLICIES = ("participant_joins_own_thread", "participant_stays_in_own_thread")


class CheckBypassingThreadService(ThreadService):
    """The bug of row 12, on purpose: the application check lets everything through."""

    def check(self, tenant_id: uuid.UUID, thread_id: uuid.UUID, participant: Participant) -> None:
        return None


@dataclass
class _View:
    """What the superuser sees after the run."""

    participants: Counter[tuple[str, str]] = field(default_factory=Counter)
    mismatched: int = 0
    intruders: int = 0
    policies: set[str] = field(default_factory=set)


async def _database_view(url: str) -> _View:
    conn = await asyncpg.connect(url)
    try:
        view = _View()
        for r in await conn.fetch("SELECT thread_id, participant_id FROM thread_participants"):
            view.participants[(str(r["thread_id"]), r["participant_id"])] += 1
        view.mismatched = int(
            await conn.fetchval(
                "SELECT count(*) FROM thread_participants p JOIN threads t ON t.id = p.thread_id"
                " WHERE p.tenant_id <> t.tenant_id"
            )
        )
        view.intruders = int(
            await conn.fetchval(
                "SELECT count(*) FROM thread_participants WHERE participant_id LIKE 'intruder-%'"
            )
        )
        rows = await conn.fetch(
            "SELECT policyname FROM pg_policies WHERE tablename = 'thread_participants'"
            " AND permissive = 'RESTRICTIVE'"
        )
        view.policies = {r["policyname"] for r in rows}
        return view
    finally:
        await conn.close()


async def run_scenario(ctx: ChaosContext) -> Outcome:
    config = ctx.config
    legit = 20 if ctx.quick else 200
    bypassed = 6 if ctx.quick else 60
    app_caught = 2 if ctx.quick else 20
    registry = CollectorRegistry()
    bus = EventBus()
    fired: list[int | None] = []  # the rows of the detectors that fired

    def on_fired(event: Event) -> None:
        if isinstance(event, DetectorFired):
            fired.append(event.row)

    bus.on(DetectorFired, on_fired)
    detector = make_detector(
        alert_name(ctx.catalog.row(ROW)),
        row=ROW,
        **engine_kwargs(detector_config(config, ctx.catalog)),
        events=bus,
    ).expect(CountInWindowDetector)
    ledger = Ledger()
    notes: list[str] = []
    refusals: Counter[tuple[str, str | None]] = Counter()
    accepted_through_bug = 0

    postgres = EmbeddedPostgres(settings=FAST_POSTGRES)
    try:
        await trio.to_thread.run_sync(postgres.start)
        async with open_bridge():
            await migrate(postgres.url)
            a, b = await run(create_tenants, postgres.url, 2)
            daemon_url = postgres_url_with(postgres.url, user=DAEMON_ROLE)
            async with open_pool(daemon_url, config.database, close_s=2.0) as pool:
                service, buggy = (
                    cls(pool, config.threads, registry=registry, events=bus, detector=detector)
                    for cls in (ThreadService, CheckBypassingThreadService)
                )
                threads = {a: await service.create_thread(a), b: await service.create_thread(b)}

                async def join(n: int) -> None:
                    tenant = (a, b)[n % 2]
                    who = Participant(tenant_id=tenant, participant_id=f"p-{n}", role="patient")
                    ledger.accept(f"{threads[tenant]}:p-{n}")
                    await service.add_participant(tenant, threads[tenant], who)

                for n in range(legit // 2):
                    await join(n)

                started = trio.current_time()
                fired_at: float | None = None
                for n in range(bypassed):
                    if n % 2 == 0:  # B's participant into A's thread, acting as A
                        acting, row_tenant = a, b
                    else:  # A's participant row, written while acting as B
                        acting, row_tenant = b, a
                    who = Participant(
                        tenant_id=row_tenant, participant_id=f"intruder-{n}", role="staff"
                    )
                    try:
                        await buggy.add_participant(acting, threads[a], who)
                    except CrossTenantParticipant as refused:
                        refusals[(refused.check, refused.sqlstate)] += 1
                    else:
                        accepted_through_bug += 1
                    if fired_at is None and detector.evaluate().firing:
                        fired_at = trio.current_time()
                for n in range(app_caught):
                    who = Participant(tenant_id=b, participant_id=f"intruder-app-{n}", role="staff")
                    try:
                        await service.add_participant(a, threads[a], who)
                    except CrossTenantParticipant as refused:
                        refusals[(refused.check, refused.sqlstate)] += 1

                for n in range(legit // 2, legit):
                    await join(n)
                if fired_at is None and detector.evaluate().firing:
                    fired_at = trio.current_time()
            view = await run(_database_view, postgres.url)
    finally:
        await trio.to_thread.run_sync(postgres.close)

    for (thread, participant), count in view.participants.items():
        key = f"{thread}:{participant}"
        if key in ledger.accepted:
            ledger.settle(key)
        for _ in range(count):
            ledger.receive(key)

    counted_db = registry.get_sample_value(METRIC, {"check": DATABASE}) or 0.0
    counted_app = registry.get_sample_value(METRIC, {"check": APPLICATION}) or 0.0
    alerted = ROW in fired
    detected = (
        fired_at is not None
        and alerted
        and refusals[(DATABASE, RLS_REFUSED)] == bypassed
        and refusals[(APPLICATION, None)] == app_caught
        and counted_db == bypassed
        and counted_app == app_caught
    )
    mitigated = (
        accepted_through_bug == 0
        and view.mismatched == 0
        and view.intruders == 0
        and set(POLICIES) <= view.policies
    )
    notes.append(
        f"legitimate joins {legit}, bypassed writes {bypassed} (refused by RLS with 42501:"
        f" {refusals[(DATABASE, RLS_REFUSED)]}, accepted {accepted_through_bug}), caught by the"
        f" application check {refusals[(APPLICATION, None)]} of {app_caught}; counted"
        f" database={int(counted_db)} application={int(counted_app)}; alert fired {alerted};"
        f" rows across tenants {view.mismatched}, intruders {view.intruders},"
        f" restrictive policies {sorted(view.policies)}"
    )
    return Outcome(
        detected=detected,
        detect_s=None if fired_at is None else fired_at - started,
        mitigated=mitigated,
        ledger=ledger,
        notes=notes,
    )


SCENARIO = Scenario(ROW, run_scenario)
