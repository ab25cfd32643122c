"""Chaos scenario 1: SMS provider outage (the Ghasi gateway answers 5xx, hangs, then is gone).

The scenario runs the daemon on the scenario config in the channel rig
(:func:`bench.chaos.channels_rig.open_rig`: embedded PostgreSQL and NATS, the
loopback provider emulators, the whole channel wiring). A steady SMS load goes
through ``POST /v1/dispatches`` the whole time; ``[channels] sms`` routes it to
the primary (Ghasi) and fails over to the secondary (Twilio). The primary's
emulator then:

1. **5xx**: answers every send 503. The per-provider error-ratio detector
   ``TriageSmsProviderOutage_ghasi`` must fire (``detect_s`` from here), the
   ``ghasi`` breaker must open, and dispatches must fail over to Twilio at once
   and end ``delivered`` (Twilio's emulator posts signed status callbacks to the
   daemon). The time from the first 503 to the first dispatch delivered through
   Twilio is measured;
2. **hang**: takes the message, then never answers (``hang_after_accept``). Only
   the breaker's half-open probes reach it: a probe times out on the guard's
   ``timeout_s``, the status query finds the message taken, the dispatch stays
   with Ghasi -- no failover, no duplicate. The probe's delivery report overtakes
   the settle (it comes before the guard's timeout): the daemon keeps it and
   applies it when the row is written ``dispatched``;
3. **down**: the port closes (connection refused) -- probes fail at once;
4. **recovery**: the port comes back, faults cleared. The breaker half-opens and
   closes, new sends go to Ghasi again, the detector clears.

Judged from outside: detector fired and on the alert board; breaker open then
closed (``BreakerStateChanged`` on the daemon's bus and the guard's breaker);
rows' ``provider`` (twilio during the outage, ghasi for the hung probes and after
recovery); every accepted dispatch ends ``delivered`` (``lost`` counts those that
did not); the emulators' counts per idempotency key across BOTH providers show no
duplicate. The load is paced so the detector's window holds ``min_volume`` calls
before the breaker cuts the primary's traffic down to its probes.

Windows and timings come from the scenario config (``config/chaos.toml``:
``[detectors.sms_provider_errors]``, ``[breakers.sms_primary]``,
``[guards.sms_primary]``, ``[dispatch] settle_timeout_s``, ``[emulators]``).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import trio

from bench.chaos import timeline
from bench.chaos.channels_rig import Rig, open_rig
from bench.chaos.harness import ChaosContext, Outcome, Scenario
from config.catalog import alert_name
from engine.breaker import CircuitState
from engine.events import BreakerStateChanged

__all__ = ["ROW", "SCENARIO", "run_scenario"]

ROW = 1
PRIMARY = "ghasi"
SECONDARY = "twilio"
DELIVERED = frozenset({"delivered"})
POLL_S = 0.1


@dataclass(frozen=True)
class _Timing:
    rate_per_s: float  # steady SMS dispatches per second (keep the window near min_volume)
    steady_s: float
    fault_min_s: float  # 5xx phase: at least this long
    fault_max_s: float  # 5xx phase: then at most this long for detector + breaker + failover
    hang_max_s: float  # hang phase: at most this long for one probe settled by status
    down_min_s: float
    down_max_s: float  # down phase: at most this long for one refused probe
    recover_max_s: float  # recovery: breaker closed, ghasi again, detector cleared
    settle_s: float


QUICK = _Timing(
    rate_per_s=6.0, steady_s=1.5, fault_min_s=1.0, fault_max_s=6.0, hang_max_s=7.0,
    down_min_s=0.5, down_max_s=5.0, recover_max_s=12.0, settle_s=8.0,
)  # fmt: skip
FULL = _Timing(
    rate_per_s=8.0, steady_s=4.0, fault_min_s=4.0, fault_max_s=10.0, hang_max_s=12.0,
    down_min_s=3.0, down_max_s=8.0, recover_max_s=20.0, settle_s=15.0,
)  # fmt: skip


@dataclass
class _Sent:
    dispatch_id: str
    at: float
    phase: str


@dataclass
class _Run:
    phase: str = "steady"
    stopping: bool = False
    sent: list[_Sent] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)
    first_twilio_delivered_at: float | None = None
    board_saw: bool = False


async def _load(rig: Rig, state: _Run, rate_per_s: float) -> None:
    """Steady SMS dispatches over both tenants until told to stop."""
    interval = 1.0 / rate_per_s
    start = trio.current_time()
    n = 0
    while not state.stopping:
        tenant = rig.tenants[n % len(rig.tenants)]
        phase = state.phase
        answer = await rig.send(
            "sms", f"+1555030{n % 10000:04d}", "reminder", tenant=tenant, key=uuid.uuid4().hex
        )
        if answer.is_success:
            state.sent.append(_Sent(answer.json()["dispatch_id"], trio.current_time(), phase))
        else:
            state.refused.append(f"{answer.status_code} {answer.text[:80]}")
        n += 1
        await trio.sleep_until(start + n * interval)


async def _watch_failover(rig: Rig, state: _Run, trigger: float) -> None:
    """Poll the rows sent since ``trigger`` until one is delivered through the secondary."""
    while state.first_twilio_delivered_at is None and not state.stopping:
        ids = [s.dispatch_id for s in state.sent if s.at >= trigger]
        rows = await rig.statuses(ids)
        if any(r["provider"] == SECONDARY and r["status"] == "delivered" for r in rows.values()):
            state.first_twilio_delivered_at = trio.current_time()
            return
        await trio.sleep(POLL_S)


def _transitions(rig: Rig, after: float, new: str, old: str | None = None) -> list[float]:
    return [
        e.at
        for e in rig.events
        if isinstance(e, BreakerStateChanged)
        and e.breaker == PRIMARY
        and e.new == new
        and (old is None or e.old == old)
        and e.at >= after
    ]


async def _wait(max_s: float, done: Any) -> bool:
    """Poll ``done()`` (async) every POLL_S until true or ``max_s`` passed."""
    with trio.move_on_after(max_s):
        while True:
            if await done():
                return True
            await trio.sleep(POLL_S)
    return False


async def run_scenario(ctx: ChaosContext, *, hold_hung_receipts: bool = False) -> Outcome:
    """Scenario 1 (see the module docstring).

    ``hold_hung_receipts`` holds the hung probes' receipts until their rows are written
    ``dispatched`` (a gateway whose delivery report comes after the client's timeout and
    status query). By default the receipt races the settle: with ``[emulators]
    receipt_delay_s`` shorter than the guard's ``timeout_s`` it arrives while the row is
    still ``queued``; the daemon keeps it (``early_receipts``) and applies it with the send.
    """
    timing = QUICK if ctx.quick else FULL
    detector = alert_name(ctx.catalog.row(ROW)) + f"_{PRIMARY}"
    other_detector = alert_name(ctx.catalog.row(ROW)) + f"_{SECONDARY}"
    state = _Run()
    notes: list[str] = []
    async with open_rig(ctx) as rig:
        channels = rig.tree.channels
        assert channels is not None, "the rig runs the channels"
        breaker = channels.guards[PRIMARY].breaker
        failover = channels.failovers["sms"]
        ghasi = rig.emulated.ghasi
        server = rig.emulated.servers[PRIMARY]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_load, rig, state, timing.rate_per_s)
            await trio.sleep(timing.steady_s)

            # 1. 5xx ----------------------------------------------------------------
            state.phase = "5xx"
            ghasi.set_faults(status=503)
            timeline.fault_started("Ghasi 503")
            trigger = state.marks["trigger"] = trio.current_time()

            nursery.start_soon(_watch_failover, rig, state, trigger)

            async def outage_seen() -> bool:
                if f"detector:{detector}" in rig.tree.board:
                    state.board_saw = True
                return (
                    state.first_twilio_delivered_at is not None
                    and rig.fired_at(detector) is not None
                    and state.board_saw
                    and bool(_transitions(rig, trigger, "open"))
                )

            await trio.sleep(timing.fault_min_s)
            await _wait(timing.fault_max_s, outage_seen)

            # 2. hang after accept: only probes get through ----------------------------
            timeline.fault_ended("Ghasi 503")
            state.phase = "hang"
            settled_before = failover.stats.settled_taken
            accepted_before = dict(ghasi.accepted)
            ghasi.set_faults(hang_after_accept=True, receipts_paused=hold_hung_receipts)
            state.marks["hang"] = trio.current_time()
            timeline.fault_started("Ghasi hangs after accept")

            def hung_keys() -> set[str]:
                return {k for k, n in ghasi.accepted.items() if n > accepted_before.get(k, 0)}

            async def probe_settled() -> bool:
                if failover.stats.settled_taken <= settled_before:
                    return False
                # The settled probe's row is written 'dispatched' before its receipt is let go.
                ids = [i for i, k in rig.keys.items() if k in hung_keys()]
                rows = await rig.statuses(ids)
                return bool(rows) and all(r["status"] != "queued" for r in rows.values())

            await _wait(timing.hang_max_s, probe_settled)
            hang_keys = hung_keys()
            hang_settled = failover.stats.settled_taken - settled_before
            ghasi.set_faults(hang_after_accept=True)  # the held receipts go out now

            timeline.fault_ended("Ghasi hangs after accept")
            # 3. the port goes down: connection refused ----------------------------------
            state.phase = "down"
            await server.go_down()
            timeline.fault_started("Ghasi port down")
            down_at = state.marks["down"] = trio.current_time()

            async def probe_refused() -> bool:
                return bool(_transitions(rig, down_at, "open", "half-open"))

            await trio.sleep(timing.down_min_s)
            refused_probe = await _wait(timing.down_max_s, probe_refused)

            # 4. recovery ---------------------------------------------------------------
            state.phase = "recovered"
            ghasi.clear_faults()
            await server.come_up()
            timeline.fault_ended("Ghasi port down")
            up_at = state.marks["up"] = trio.current_time()

            async def recovered() -> bool:
                closed = _transitions(rig, up_at, "closed")
                if not closed or breaker.state is not CircuitState.CLOSED:
                    return False
                ids = [s.dispatch_id for s in state.sent if s.at > closed[0]]
                rows = await rig.statuses(ids)
                back = any(
                    r["provider"] == PRIMARY and r["status"] == "delivered" for r in rows.values()
                )
                return back and detector in rig.cleared and rig.cleared[detector] >= up_at

            back_on_primary = await _wait(timing.recover_max_s, recovered)
            state.stopping = True
        end = trio.current_time()

        rows = await rig.settle(DELIVERED, timeout_s=timing.settle_s)
        rig.count_receipts()
        twilio_keys = {k for k, n in rig.emulated.twilio.accepted.items() if n}
        stats = failover.stats
        fired = rig.fired_at(detector)
        cleared = rig.cleared.get(detector)
        other_fired = rig.fired_at(other_detector)
        final_breaker = breaker.state

    # -- the verdict -----------------------------------------------------------------------
    by_phase: dict[str, dict[str, int]] = {}
    for sent in state.sent:
        row = rows.get(sent.dispatch_id, {})
        counts = by_phase.setdefault(sent.phase, {})
        label = f"{row.get('provider')}/{row.get('status')}"
        counts[label] = counts.get(label, 0) + 1
    outage = [rows.get(s.dispatch_id, {}) for s in state.sent if s.phase in ("5xx", "down")]
    via_twilio = sum(1 for r in outage if r.get("provider") == SECONDARY)
    opened = _transitions(rig, state.marks["trigger"], "open")
    half_opened = _transitions(rig, state.marks["up"], "half-open")
    closed_after = _transitions(rig, state.marks["up"], "closed")
    key_of = {v: k for k, v in rig.keys.items()}  # idempotency key -> dispatch id
    hang_rows = [rows.get(key_of[k], {}) for k in hang_keys if k in key_of]
    hang_ok = (
        hang_settled > 0
        and len(hang_rows) == len(hang_keys) > 0
        and all(r.get("provider") == PRIMARY and r.get("status") == "delivered" for r in hang_rows)
        and not (hang_keys & twilio_keys)
    )
    after_close = [
        rows.get(s.dispatch_id, {}) for s in state.sent if closed_after and s.at > closed_after[0]
    ]
    primary_again = sum(1 for r in after_close if r.get("provider") == PRIMARY)
    ledger = rig.ledger
    mitigated = (
        bool(opened)
        and state.first_twilio_delivered_at is not None
        and via_twilio > 0
        and hang_ok
        and bool(half_opened)
        and bool(closed_after)
        and final_breaker is CircuitState.CLOSED
        and back_on_primary
        and primary_again > 0
        and cleared is not None
        and stats.possible_duplicates == 0
        and not state.refused
    )
    marks = state.marks

    def rel(t: float | None) -> str:
        return "-" if t is None else f"{t - marks['trigger']:.2f}s"

    failover_s = (
        None
        if state.first_twilio_delivered_at is None
        else state.first_twilio_delivered_at - marks["trigger"]
    )
    notes.append(
        f"load {timing.rate_per_s:g}/s, {len(state.sent)} dispatches; by phase (provider/status):"
        + "; ".join(f" {p}: {c}" for p, c in by_phase.items())
    )
    notes.append(
        f"5xx at 0: breaker open at {rel(opened[0] if opened else None)},"
        f" detector fired at {rel(fired)} (on the board: {state.board_saw}),"
        f" first dispatch delivered through {SECONDARY} at "
        + ("-" if failover_s is None else f"{failover_s:.2f}s (polled every {POLL_S}s)")
    )
    notes.append(
        f"hang from {rel(marks['hang'])}: {len(hang_keys)} probe(s) taken and left hanging,"
        f" {hang_settled} settled by the status query, kept by {PRIMARY}: {hang_ok}"
    )
    notes.append(
        f"down from {rel(marks['down'])}: a refused probe re-opened the breaker: {refused_probe}"
    )
    notes.append(
        f"up at {rel(marks['up'])}: half-open at {rel(half_opened[0] if half_opened else None)},"
        f" closed at {rel(closed_after[0] if closed_after else None)},"
        f" {primary_again}/{len(after_close)} later sends by {PRIMARY},"
        f" detector cleared at {rel(cleared)}, load stopped at {rel(end)}"
    )
    notes.append(
        f"failover stats: calls={stats.calls} failed={stats.failed_calls}"
        f" failovers={stats.failovers} settled_taken={stats.settled_taken}"
        f" possible_duplicates={stats.possible_duplicates} queued={stats.queued};"
        f" {other_detector} fired: {other_fired is not None}"
    )
    if state.refused:
        notes.append(f"{len(state.refused)} sends refused, first: {state.refused[0]}")
    return Outcome(
        detected=fired is not None,
        detect_s=None if fired is None else round(fired - marks["trigger"], 3),
        mitigated=mitigated,
        ledger=ledger,
        notes=notes,
    )


SCENARIO = Scenario(ROW, run_scenario)
