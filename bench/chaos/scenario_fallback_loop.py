"""Scenario 14, fallback loop: repeated virtual-visit failures must not each spawn a thread.

Real components as in scenario 4 (``bench.chaos.virtual_rig``: embedded PostgreSQL
and NATS, the inbox, three Jitsi Videobridge emulators, the virtual rooms wired as
the daemon wires them).

1. Baseline: the bridges refuse allocations for a while; a few visits fail, each
   gets its fallback thread (the spike detector's baseline is these requests).
2. Trigger, the loop: every bridge goes down, and a few patients each have many
   visits booked that day: every one fails and asks for a fallback thread.
   Meanwhile a "second replica" whose breaker is bypassed spawns threads for one
   more patient's failed visits directly, racing, as many as it can.
3. The scenario waits until every failed visit is linked to a fallback thread.

Judged from outside (the database as the superuser):

- detected: row 14's spike detector (``triage_fallback_initiated_total``) fired;
- mitigated: the fallback actor was contained (a notice, patient-day breakers forced
  open); each loop patient-day has exactly one thread (its breaker), the bypassed
  replica's patient-day no more than the cap (the database's), and every failed
  visit has a thread;
- ``lost``: failed visits without a fallback thread; ``duplicates``: threads beyond
  one per breaker-governed patient-day.
"""

from __future__ import annotations

import datetime as dt
import uuid

import trio

from actors.fallback_thread import ROW, FallbackContained
from bench.chaos.fixtures import wait_until
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from bench.chaos.virtual_rig import open_virtual
from engine.breaker import CircuitState
from providers.bridge import run
from providers.db.virtual_sessions import spawn_fallback

__all__ = ["ROW", "SCENARIO", "run_scenario"]

BYPASS_PATIENT = "patient-bypass"


async def _session_ids(url: str, patient: str) -> list[tuple[uuid.UUID, uuid.UUID]]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT tenant_id, id FROM virtual_sessions WHERE patient_id = $1", patient
        )
        return [(r["tenant_id"], r["id"]) for r in rows]
    finally:
        await conn.close()


async def run_scenario(ctx: ChaosContext) -> Outcome:
    config = ctx.config
    warm = 5
    loop_patients, visits = (4, 12) if ctx.quick else (20, 25)
    bypass_visits = 8 if ctx.quick else 30
    budget_s = 30.0 if ctx.quick else 120.0
    cap = config.fallback.max_threads_per_patient_day
    ledger = Ledger()
    notes: list[str] = []
    today = dt.datetime.now(dt.UTC).replace(microsecond=0)

    async with open_virtual(ctx, tenants=1) as rig:
        [tenant] = rig.backbone.tenants
        fallback = rig.virtual.fallback
        detector = rig.virtual.fallback_detector

        def handled(count: int) -> bool:
            stats = fallback.statistics()
            done = 0 if stats is None else stats.spawned + stats.reused + stats.linked
            return done + (0 if stats is None else stats.refused + stats.abandoned) >= count

        # 1. Baseline: the bridges refuse rooms for a moment; a few visits fail.
        await wait_until(lambda: bool(rig.virtual.pool.ref.statistics()), budget_s)
        for bridge in rig.bridges.values():
            bridge.set_bridge_faults(allocate_status=503)
        await rig.publish(
            [(tenant, f"warm-{n}", f"warm-patient-{n}") for n in range(warm)], starts_at=today
        )
        warmed = await wait_until(lambda: handled(warm), budget_s)
        for bridge in rig.bridges.values():
            bridge.clear_bridge_faults()
        # The baseline is folded from buckets leaving the spike window: let them leave.
        spike = rig.detectors[detector.name]
        await trio.sleep(3 * (spike.window_s or 1.0))

        # 2. Trigger: every bridge down, and the loop of failing visits.
        for server in rig.servers.values():
            await server.go_down()
        no_bridge = await wait_until(
            lambda: all(b.state is CircuitState.OPEN for b in rig.virtual.breakers.values()),
            budget_s,
        )
        started = trio.current_time()
        booked = [
            (tenant, f"loop-{p}-{v}", f"patient-{p}")
            for v in range(visits)
            for p in range(loop_patients)
        ]
        booked += [(tenant, f"bypass-{v}", BYPASS_PATIENT) for v in range(bypass_visits)]
        failed_publish = await rig.publish(booked, starts_at=today)
        fired = await wait_until(lambda: detector.firing, budget_s)
        fired_at = trio.current_time() if fired else None

        # The second replica without a breaker: every failed bypass visit, at once.
        pool = rig.virtual.pool.ref
        await wait_until(
            lambda: (s := pool.statistics()) is not None and s.failed >= warm + len(booked),
            budget_s,
        )
        bypass = await run(_session_ids, rig.backbone.postgres.url, BYPASS_PATIENT)
        results = await run(_race, rig.backbone.pool, bypass, cap)
        total = warm + len(booked)
        linked_all = await wait_until(lambda: handled(total), budget_s)
        await trio.sleep(0.2)
        rows = await rig.sessions()
        threads = await rig.fallback_threads()
        contained = [e for e in rig.events if isinstance(e, FallbackContained) and not e.ended]
        stats = fallback.statistics()
        forced = stats.forced_open if stats is not None else 0

    failed_rows = [r for r in rows if r.failures > 0]
    for row in failed_rows:
        ledger.accept(row.appointment_id)
        if row.fallback_thread_id is not None:
            ledger.settle(row.appointment_id)
    per_patient = {patient: n for (_, patient, _), n in threads.items()}
    for patient, n in per_patient.items():
        if patient != BYPASS_PATIENT:
            for _ in range(n):
                ledger.receive(patient)
    loop_ok = all(per_patient.get(f"patient-{p}") == 1 for p in range(loop_patients))
    bypass_threads = per_patient.get(BYPASS_PATIENT, 0)
    spawned_by_replica = sum(1 for r in results if r == "spawned")
    detected = fired
    mitigated = (
        warmed
        and no_bridge
        and linked_all
        and bool(contained)
        and forced > 0
        and loop_ok
        and 1 <= bypass_threads <= cap
        and len(failed_rows) == warm + len(booked)
    )
    notes.append(
        f"baseline failures {warm}, loop {loop_patients} patients x {visits} visits, bypassed"
        f" replica {bypass_visits} visits (cap {cap}): threads per patient"
        f" {dict(sorted(per_patient.items()))}, the replica spawned {spawned_by_replica}"
        f" (outcomes {sorted(set(results))}); contained notices {len(contained)}, breakers"
        f" forced open {forced}; fallback {stats}; publishes failed {failed_publish}"
    )
    return Outcome(
        detected=detected,
        detect_s=None if fired_at is None else fired_at - started,
        mitigated=mitigated,
        ledger=ledger,
        notes=notes,
    )


async def _race(pool: object, sessions: list[tuple[uuid.UUID, uuid.UUID]], cap: int) -> list[str]:
    """asyncio side: spawn for every session at once, as replicas without a breaker would."""
    import asyncio

    results = await asyncio.gather(
        *(spawn_fallback(pool, t, s, cap, True) for t, s in sessions),  # type: ignore[arg-type]
        return_exceptions=True,
    )
    return [r.outcome if not isinstance(r, BaseException) else type(r).__name__ for r in results]


SCENARIO = Scenario(ROW, run_scenario)
