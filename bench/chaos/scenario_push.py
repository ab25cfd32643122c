"""Chaos scenario 2: push feedback stall (FCM / APNs feedback stops flowing).

The scenario runs the real daemon on the chaos config through the channels rig
(:mod:`bench.chaos.channels_rig`: embedded PostgreSQL and NATS, the loopback FCM
and APNs emulators, the whole channel wiring) and keeps a push load going
(``fcm:<token>`` and ``apns:<token>`` recipients in turn) from start to end, so
the feedback age never grows because the system is merely idle:

1. **warm**: pushes are dispatched and their feedback flows (rows ``delivered``);
2. **trigger**: both emulators stall every feedback session seen so far
   (:meth:`~providers.emulators.push.PushEmulator.stall_session`): the daemon's
   pulls hang while a new session would pull normally; pushes keep going out;
3. **refresh**: row 2's age detector must fire, and the feedback actor's
   watchdog must raise ``FeedbackStalled`` so its supervisor restarts it with a
   fresh session (``FeedbackStallAlert`` and ``ActorRestarted`` on the bus);
   the pushes sent during the stall are then ``delivered``;
4. **withheld**: APNs stops publishing feedback (``receipts_paused``) while FCM
   feedback goes on; the APNs pushes stay ``dispatched`` past
   ``[push_feedback] stale_after_s`` and the stale sweep marks them ``unknown``
   (reason ``feedback_stale``).

Judged from outside: ``detect_s`` is the first ``DetectorFired`` of the row's
detector after the trigger (the detector must have been clear at the trigger:
the daemon's start-up, before any feedback, may fire it once on idleness);
mitigated when the actor was restarted by its watchdog, the stalled pushes were
delivered through the fresh session, and the withheld ones were swept to
``unknown``. Accounting: every accepted dispatch must end ``delivered`` or
``unknown`` (both settled: never lost); duplicates are counted by the
emulators per idempotency key.

Timings come from ``config/chaos.toml`` (``[push_feedback]``,
``[detectors.push_feedback_age]``, ``[emulators] receipt_delay_s``).
"""

from __future__ import annotations

import inspect
import secrets
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from actors.push_feedback import FeedbackStallAlert, FeedbackStatistics, SweepStatistics
from bench.chaos.channels_rig import Rig, open_rig
from bench.chaos.harness import ChaosContext, Outcome, Scenario
from config.catalog import alert_name
from engine.actor import ActorRef
from engine.events import ActorRestarted, DetectorCleared, DetectorFired

__all__ = ["ROW", "SCENARIO", "run_scenario"]

S = TypeVar("S")

ROW = 2
TEMPLATE = "push_reminder"
FINAL = frozenset({"delivered", "unknown"})
CHILD = "push_feedback"  # the supervised child the watchdog restarts


async def _statistics(ref: ActorRef[Any], kind: type[S], wait_s: float) -> S:
    """The actor's statistics, waiting up to ``wait_s`` for an incarnation (a restart)."""
    with trio.fail_after(wait_s):
        while (stats := ref.statistics()) is None:  # noqa: ASYNC110  # polls the ref
            await trio.sleep(0.01)
    assert isinstance(stats, kind)
    return stats


# Load shape (not detection tuning: windows and thresholds come from the config).
PACE_S = 0.1  # one push every PACE_S, platforms in turn
TICK_S = 0.05  # how often the scenario looks at the bus and the rows


@dataclass(frozen=True)
class _Timing:
    warm_s: float  # load before the trigger
    flow_max_s: float  # the warm pushes must be delivered within this
    refresh_max_s: float  # the watchdog's restart must come within this of the trigger
    after_s: float  # load after the refresh
    withheld_s: float  # load while APNs withholds its feedback
    settle_max_s: float  # beyond stale_after_s + sweep_interval_s


QUICK = _Timing(
    warm_s=1.0, flow_max_s=5.0, refresh_max_s=10.0, after_s=1.0, withheld_s=1.0, settle_max_s=8.0
)
FULL = _Timing(
    warm_s=4.0, flow_max_s=8.0, refresh_max_s=15.0, after_s=4.0, withheld_s=4.0, settle_max_s=12.0
)


@dataclass
class _Load:
    """The push load: which platforms get pushes now, and what was sent when."""

    platforms: tuple[str, ...] = ("fcm", "apns")
    phase: str = "warm"
    stopping: bool = False
    sent: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (phase, platform)
    refused: Counter[int] = field(default_factory=Counter)  # HTTP status of non-2xx answers
    count: int = 0

    def ids(self, *, phase: str | None = None, platform: str | None = None) -> list[str]:
        return [
            i
            for i, (ph, pl) in self.sent.items()
            if (phase is None or ph == phase) and (platform is None or pl == platform)
        ]


def _recipient(platform: str) -> str:
    if platform == "apns":
        return f"apns:{secrets.token_hex(32)}"  # APNs device tokens are hex
    return f"fcm:tok-{uuid.uuid4().hex}"


async def _drive_load(rig: Rig, load: _Load) -> None:
    while not load.stopping:
        platforms = load.platforms
        platform = platforms[load.count % len(platforms)]
        load.count += 1
        answer = await rig.send("push", _recipient(platform), TEMPLATE)
        if answer.is_success:
            load.sent[answer.json()["dispatch_id"]] = (load.phase, platform)
        else:
            load.refused[answer.status_code] += 1
        await trio.sleep(PACE_S)


async def _wait_for(predicate: Callable[[], object], max_s: float) -> bool:
    """Poll ``predicate()`` (sync, or returning an awaitable) every TICK_S until true
    or ``max_s`` passed."""
    with trio.move_on_after(max_s):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return True
            await trio.sleep(TICK_S)
    return False


async def _all_in(rig: Rig, ids: list[str], states: frozenset[str]) -> bool:
    rows = await rig.statuses(ids)
    return len(rows) == len(ids) and all(r["status"] in states for r in rows.values())


def _detection(rig: Rig, detector: str, trigger_at: float) -> tuple[float | None, bool, int]:
    """(first fire after the trigger, firing at the trigger?, fires before the trigger)."""
    firing = False
    early = 0
    for event in rig.events:
        if isinstance(event, DetectorFired | DetectorCleared) and event.detector == detector:
            if event.at >= trigger_at:
                if isinstance(event, DetectorFired):
                    return event.at, firing, early
                continue
            firing = isinstance(event, DetectorFired)
            early += firing
    return None, firing, early


async def run_scenario(ctx: ChaosContext) -> Outcome:
    """Scenario 2 (see the module docstring)."""
    timing = QUICK if ctx.quick else FULL
    detector = alert_name(ctx.catalog.row(ROW))
    pf = ctx.config.push_feedback
    async with open_rig(ctx) as rig:
        return await _drive(rig, ctx, timing, detector, pf.stale_after_s + pf.sweep_interval_s)


async def _drive(
    rig: Rig, ctx: ChaosContext, timing: _Timing, detector: str, stale_s: float
) -> Outcome:
    channels = rig.tree.channels
    if channels is None:
        raise RuntimeError("the chaos daemon runs without its channels")
    feedback, sweep = channels.feedback, channels.sweep
    fcm, apns = rig.emulated.fcm, rig.emulated.apns
    load = _Load()
    notes: list[str] = []
    trigger_at = refreshed_at = 0.0
    flowing = refreshed = stalled_delivered = False

    def restarts() -> list[ActorRestarted]:
        return [e for e in rig.events if isinstance(e, ActorRestarted) and e.child == CHILD]

    def alerts() -> list[FeedbackStallAlert]:
        return [e for e in rig.events if isinstance(e, FeedbackStallAlert)]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drive_load, rig, load)
        # 1. warm: feedback flows.
        await trio.sleep(timing.warm_s)
        warm = load.ids(phase="warm")
        flowing = await _wait_for(
            lambda: _all_in(rig, warm, frozenset({"delivered"})), timing.flow_max_s
        )
        applied_before = (
            await _statistics(feedback, FeedbackStatistics, timing.refresh_max_s)
        ).applied

        # 2. the trigger: every feedback session so far hangs; pushes go on.
        load.phase = "stall"
        fcm.stall_session()
        apns.stall_session()
        trigger_at = trio.current_time()
        refreshed = await _wait_for(lambda: restarts() and alerts(), timing.refresh_max_s)
        if refreshed:
            refreshed_at = restarts()[0].at

        # 3. after the refresh: feedback flows through the fresh session.
        load.phase = "after"
        await trio.sleep(timing.after_s)
        stalled = load.ids(phase="stall")
        stalled_delivered = await _wait_for(
            lambda: _all_in(rig, stalled, frozenset({"delivered"})), timing.flow_max_s
        )

        # 4. APNs withholds its feedback (FCM's flows on, so the watchdog stays calm);
        # the APNs pushes sent so far get theirs first.
        load.platforms = ("fcm",)
        apns_so_far = load.ids(platform="apns")
        await _wait_for(
            lambda: _all_in(rig, apns_so_far, frozenset({"delivered"})), timing.flow_max_s
        )
        apns.set_faults(receipts_paused=True)
        load.phase = "withheld"
        load.platforms = ("fcm", "apns")
        await trio.sleep(timing.withheld_s)
        # FCM pushes go on until the sweep took the withheld ones: without any feedback
        # while they wait, the watchdog would (rightly) call it a stall again.
        load.platforms = ("fcm",)
        withheld = load.ids(phase="withheld", platform="apns")
        await _wait_for(
            lambda: _all_in(rig, withheld, frozenset({"unknown"})), stale_s + timing.settle_max_s
        )
        load.stopping = True

    rows = await rig.settle(FINAL, timeout_s=timing.settle_max_s)
    rig.count_receipts()
    ledger = rig.ledger

    fired_at, firing_at_trigger, early = _detection(rig, detector, trigger_at)
    detected = fired_at is not None and not firing_at_trigger
    detect_s = None if fired_at is None else round(fired_at - trigger_at, 3)

    statuses = Counter(r["status"] for r in rows.values())
    stale = {i for i, r in rows.items() if r["status"] == "unknown"}
    stale_reasons = Counter(rows[i]["reason"] for i in stale)
    withheld_swept = bool(withheld) and all(
        rows.get(i, {}).get("status") == "unknown"
        and rows.get(i, {}).get("reason") == "feedback_stale"
        for i in withheld
    )
    others_delivered = all(
        rows.get(i, {}).get("status") == "delivered" for i in load.sent if i not in stale
    )
    fed = await _statistics(feedback, FeedbackStatistics, timing.refresh_max_s)
    swept = await _statistics(sweep, SweepStatistics, timing.refresh_max_s)
    mitigated = (
        flowing
        and refreshed
        and stalled_delivered
        and fed.resets >= 1
        and withheld_swept
        and others_delivered
    )

    if early:
        notes.append(
            f"{detector} fired {early}x before the trigger (start-up, before the first feedback)"
        )
    if firing_at_trigger:
        notes.append(f"{detector} was still firing at the trigger")
    notes.append(
        f"pushes accepted={len(load.sent)} refused={dict(load.refused)}"
        f" final={dict(statuses)} feedback applied before trigger={applied_before}"
        f" total={fed.applied}"
    )
    if refreshed:
        alert = alerts()[0]
        notes.append(
            f"watchdog restart {refreshed_at - trigger_at:.2f}s after the trigger"
            f" (silent {alert.silent_s:.2f}s, {alert.outstanding} waiting);"
            f" refreshes={fed.refreshes} resets={fed.resets}"
            f" restarts={len(restarts())} stalled pulls fcm={fcm.stalled_pulls}"
            f" apns={apns.stalled_pulls}"
        )
        if fired_at is not None:
            notes.append(f"{detector} fired {refreshed_at - fired_at:.2f}s before the restart")
    else:
        notes.append(f"no watchdog restart within {timing.refresh_max_s}s of the trigger")
    notes.append(
        f"stall-phase pushes={len(load.ids(phase='stall'))}"
        f" all delivered after the refresh={stalled_delivered}"
    )
    notes.append(
        f"APNs feedback withheld for {len(withheld)} pushes: swept={withheld_swept}"
        f" (unknown={len(stale)} reasons={dict(stale_reasons)} sweep marked={swept.marked})"
    )
    notes.append(
        f"emulator duplicates fcm={fcm.duplicates()} apns={apns.duplicates()}"
        f" config quick={ctx.quick}"
    )
    return Outcome(
        detected=detected, detect_s=detect_s, mitigated=mitigated, ledger=ledger, notes=notes
    )


SCENARIO = Scenario(ROW, run_scenario)
