"""Scenario 4, virtual room unreachable: a Jitsi Videobridge node goes down under its rooms.

Real components: an embedded PostgreSQL and NATS, the inbox consumer (scheduling
events become sessions, row 18), three Jitsi Videobridge emulators on loopback
(``[jitsi] nodes`` of the scenario config), and the virtual rooms wired by
``supervisors.virtual.build_virtual`` as the daemon wires them (chaos.toml
shortens the polls, the breakers and row 4's window).

1. N appointments are booked (events on JetStream); the pool places every session,
   spread over the three nodes by load (least loaded first).
2. Trigger: the node hosting the most rooms goes down (its port closed: connections
   refused). Its breaker opens after its failed polls; its sessions fail
   (``bridge_lost``), each gets a fallback thread, and they are placed again on the
   two healthy nodes. M more appointments are booked during the outage, while one of
   the two left refuses rooms (its health still 200, its stress the lowest): each new
   session fails over to the last node in its placement turn, none fails.
3. The scenario waits until row 4's detector fired and every session is placed.

Judged from outside (the database as the superuser, the emulators' rooms):

- detected: row 4's detector fired (more than 5 failed sessions in its window), and
  the failed sessions counted in ``triage_virtual_session_failed_total`` equal the
  sessions the lost node hosted;
- mitigated: every failed session has a fallback thread, fallback threads stay
  within the cap per patient-day, the lost node was taken out of the pool (breaker
  forced open) with a page notice, every session ends placed on a healthy node,
  and every session booked during the outage was placed on the last node, by
  failover (the refusing node took no room), without a failure;
- ``lost``: appointments without a placed session; ``duplicates``: sessions beyond
  one per appointment plus rooms of one session held by two live bridges.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter

import trio

from actors.jitsi_pool import ROW, PoolFailedOver
from bench.chaos.fixtures import wait_until
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from bench.chaos.virtual_rig import SessionRow, open_virtual
from engine.breaker import CircuitState

__all__ = ["ROW", "SCENARIO", "run_scenario"]

FAILED_METRIC = "triage_virtual_session_failed_total"


def _all_placed(rows: list[SessionRow], count: int, away_from: str | None = None) -> bool:
    return len(rows) == count and all(
        r.state == "placed" and (away_from is None or r.node != away_from) for r in rows
    )


async def run_scenario(ctx: ChaosContext) -> Outcome:
    config = ctx.config
    before, during = (30, 12) if ctx.quick else (300, 100)
    patients = 10 if ctx.quick else 60
    budget_s = 30.0 if ctx.quick else 120.0
    ledger = Ledger()
    notes: list[str] = []
    today = dt.datetime.now(dt.UTC).replace(microsecond=0)

    async with open_virtual(ctx, tenants=3) as rig:
        tenants = rig.backbone.tenants
        booked = [
            (tenants[n % len(tenants)], f"apt-{n}", f"patient-{n % patients}")
            for n in range(before + during)
        ]
        for _, appointment, _ in booked:
            ledger.accept(appointment)
        failed_publish = await rig.publish(booked[:before], starts_at=today)

        rows: list[SessionRow] = []

        async def placed(count: int, away_from: str | None = None) -> bool:
            nonlocal rows
            with trio.move_on_after(budget_s):
                while True:
                    rows = await rig.sessions()
                    if _all_placed(rows, count, away_from):
                        return True
                    await trio.sleep(0.1)
            return False

        first_ok = await placed(before)
        spread = Counter(r.node for r in rows if r.node is not None)
        victim = max(sorted(spread), key=spread.__getitem__) if spread else "jvb1"
        hosted = spread[victim]
        breaker = rig.virtual.breakers[victim]

        # Trigger: the node goes down; its port refuses connections.
        started = trio.current_time()
        await rig.servers[victim].go_down()
        detector = rig.virtual.pool_detector
        fired = await wait_until(lambda: detector.firing, budget_s)
        fired_at = trio.current_time() if fired else None
        # The lost node's sessions are placed again on the two others before the next step.
        await placed(before, away_from=victim)
        # During the outage one healthy-looking node refuses rooms (its health still 200)
        # and reports the lowest stress, so placement tries it first: every new session
        # must fail over to the last node within its placement turn.
        refusing, last = sorted(n for n in rig.bridges if n != victim)
        rig.bridges[refusing].set_bridge_faults(allocate_status=503, stress_level=0.0)
        rig.bridges[last].set_bridge_faults(stress_level=0.5)
        await trio.sleep(3 * config.jitsi.poll_interval_s)  # the polls see the new stress
        rooms_before = len(rig.bridges[refusing].rooms)
        failed_publish += await rig.publish(booked[before:], starts_at=today)
        settled = await placed(before + during, away_from=victim)
        refused_rooms = len(rig.bridges[refusing].rooms) - rooms_before
        fallback = rig.virtual.fallback
        await wait_until(
            lambda: fallback.queued() == 0 and (fallback.statistics() is not None), budget_s
        )
        await trio.sleep(0.5)
        fb_stats = fallback.statistics()
        rows = await rig.sessions()
        threads = await rig.fallback_threads()
        forced = breaker.state is CircuitState.FORCED_OPEN
        pages = [e for e in rig.events if isinstance(e, PoolFailedOver) and victim in e.nodes]
        counted = rig.metric(FAILED_METRIC, reason="bridge_lost")
        stats = rig.virtual.pool.ref.statistics()
        hosts = Counter(room for r in rows if r.room is not None for room in [r.room]
                        for _ in rig.rooms_of(room))  # fmt: skip

    by_appointment = Counter(r.appointment_id for r in rows)
    late = {a for _, a, _ in booked[before:]}
    late_failed = [r for r in rows if r.appointment_id in late and r.failures > 0]
    late_elsewhere = [r for r in rows if r.appointment_id in late and r.node != last]
    failed_rows = [r for r in rows if r.failures > 0]
    without_thread = [r for r in failed_rows if r.fallback_thread_id is None]
    cap = config.fallback.max_threads_per_patient_day
    over_cap = {k: n for k, n in threads.items() if n > cap}
    for row in rows:
        if row.state == "placed" and row.node != victim and row.node is not None:
            ledger.settle(row.appointment_id)
        for _ in range(by_appointment[row.appointment_id]):
            ledger.receive(f"session:{row.appointment_id}")
        for _ in range(hosts[row.room] if row.room is not None else 0):
            ledger.receive(f"room:{row.appointment_id}")

    detected = fired and counted == hosted and hosted > 5
    mitigated = (
        first_ok
        and settled
        and not without_thread
        and not over_cap
        and forced
        and bool(pages)
        and not late_failed
        and not late_elsewhere
        and refused_rooms == 0
        and stats is not None
        and stats.failovers >= 1
    )
    notes.append(
        f"sessions {before}+{during}, spread {dict(sorted(spread.items()))}, {victim} down"
        f" hosting {hosted}; failed counted {int(counted)}, with fallback thread"
        f" {len(failed_rows) - len(without_thread)}/{len(failed_rows)}, fallback threads"
        f" {sum(threads.values())} for {len(threads)} patient-days (cap {cap}, over {len(over_cap)});"
        f" {victim} breaker {breaker.state.value}, page notices {len(pages)};"
        f" {refusing} refusing rooms: failovers {stats.failovers if stats is not None else '?'},"
        f" booked during the outage: {len(late) - len(late_elsewhere)}/{len(late)} on {last},"
        f" failed {len(late_failed)}; publishes failed {failed_publish};"
        f" fallback requests {fb_stats.requests if fb_stats else '?'}"
    )
    return Outcome(
        detected=detected,
        detect_s=None if fired_at is None else fired_at - started,
        mitigated=mitigated,
        ledger=ledger,
        notes=notes,
    )


SCENARIO = Scenario(ROW, run_scenario)
