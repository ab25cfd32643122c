"""Chaos scenario 3: email bounce spike (a bad template, or the domain's reputation).

The scenario runs the real daemon on the chaos config through the channels rig
(:mod:`bench.chaos.channels_rig`: embedded PostgreSQL and NATS, the loopback SMTP
emulator, the whole channel wiring). Two tenants send the seeded
``email_reminder`` template (category ``reminder``); the second is the control.
Every email goes to an address of its own (a hard bounce marks its address dead).

1. **warm**: both tenants send; nothing bounces;
2. **trigger**: the SMTP emulator bounces a share (``BOUNCE_FRACTION``) of the
   first tenant's emails, hard (signed RFC 3464 DSNs POSTed to the daemon's
   ``/webhooks/bounces/smtp``); the control tenant's load goes on, unbounced;
3. the bounce tracker's ratio for (tenant, ``reminder``) crosses the row's
   threshold with the minimum volume: the category is **throttled** (a
   ``category_blocks`` row, a ``BounceAlert`` page on the bus); the first
   tenant stops sending then, and after ``[bounces] disable_after_s`` above the
   threshold the category is **disabled** (the row says ``disabled``, a second page);
4. **probes**: the first tenant's further reminders are refused (422
   ``category_disabled``): each row is ``failed`` / ``category_disabled`` and the
   emulator never saw it; the control tenant is accepted and sent all along;
5. **operator**: the template is fixed (bounces stop) and the category is
   re-enabled through the CLI (``triage category enable``, its handler with
   ``--dsn`` the owner URL, in a thread); the first tenant's reminders are sent again.

Judged from outside: ``detect_s`` is the first ``DetectorFired`` of the row's
detector (the email-wide bounce ratio) after the trigger; the tracker's page
for the key is reported too. Mitigated when the block rows went throttled then
disabled, both pages came, every probe was refused and nothing was sent for it,
the control tenant was never blocked, and sends resumed after the enable.
Accounting: accepted = dispatches the daemon answered 2xx; settled = their rows
reached ``dispatched`` / ``undeliverable`` / ``failed``; duplicates are counted
by the SMTP emulator per idempotency key.

Thresholds and windows come from ``config/chaos.toml`` (``[detectors.email_bounce_ratio]``,
``[bounces]``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import trio

from actors.bounce_tracker import BounceAlert
from bench.chaos.channels_rig import Rig, open_rig
from bench.chaos.harness import ChaosContext, Outcome, Scenario
from config.catalog import alert_name
from engine.events import DetectorFired
from providers.bridge import run
from supervisors import cli_category

__all__ = ["ROW", "SCENARIO", "run_scenario"]

ROW = 3
TEMPLATE = "email_reminder"
CATEGORY = "reminder"
CHANNEL = "email"
SETTLED = frozenset({"dispatched", "undeliverable", "failed"})

# Load shape (not detection tuning: thresholds and windows come from the config).
BOUNCE_FRACTION = 0.4  # share of the first tenant's emails that bounce once triggered
PACE_S = 0.05  # between two emails of the bounced tenant
CONTROL_PACE_S = 0.1  # between two emails of the control tenant
TICK_S = 0.05  # how often the scenario looks at the bus and the rows
BOARD_MAX_S = 2.0  # the alert sink's mailbox is asynchronous: the page shows within this


@dataclass(frozen=True)
class _Timing:
    warm: int  # emails per tenant before the trigger
    trigger_max: int  # at most this many bounced-tenant emails after the trigger
    throttle_max_s: float
    disable_max_s: float  # beyond disable_after_s
    probes: int  # emails of the disabled category
    resumed: int  # emails after the operator's enable
    settle_max_s: float


QUICK = _Timing(
    warm=12, trigger_max=60, throttle_max_s=10.0, disable_max_s=8.0, probes=5, resumed=5,
    settle_max_s=10.0,
)  # fmt: skip
FULL = _Timing(
    warm=40, trigger_max=200, throttle_max_s=20.0, disable_max_s=10.0, probes=20, resumed=20,
    settle_max_s=20.0,
)  # fmt: skip


@dataclass
class _Sent:
    """Emails sent through ``POST /v1/dispatches``: per tenant, what the daemon answered."""

    accepted: dict[str, str] = field(default_factory=dict)  # dispatch id -> tenant
    refused: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # key -> (tenant, ...)
    control_stop: bool = False

    async def one(self, rig: Rig, tenant: uuid.UUID, address: str) -> tuple[int, str]:
        key = uuid.uuid4().hex
        answer = await rig.send(CHANNEL, address, TEMPLATE, tenant=tenant, key=key)
        if answer.is_success:
            self.accepted[answer.json()["dispatch_id"]] = str(tenant)
            return answer.status_code, ""
        error = str(answer.json().get("error", "")) if answer.content else ""
        self.refused[key] = (str(tenant), answer.status_code, error)
        return answer.status_code, error


def _address(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}@{tag}.example"


async def _control_load(rig: Rig, sent: _Sent, tenant: uuid.UUID) -> None:
    while not sent.control_stop:
        await sent.one(rig, tenant, _address("control"))
        await trio.sleep(CONTROL_PACE_S)


async def _blocks(url: str) -> dict[tuple[str, str], str]:
    conn = await asyncpg.connect(url)
    try:
        records = await conn.fetch(
            "SELECT tenant_id::text AS tenant, category, state FROM category_blocks"
            " WHERE channel = 'email'"
        )
        return {(r["tenant"], r["category"]): r["state"] for r in records}
    finally:
        await conn.close()


async def _rows_by_key(url: str, keys: list[str]) -> dict[str, dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        records = await conn.fetch(
            "SELECT idempotency_key, status, reason FROM dispatches"
            " WHERE idempotency_key = ANY($1::text[])",
            keys,
        )
        return {r["idempotency_key"]: dict(r) for r in records}
    finally:
        await conn.close()


async def _wait_for(predicate: Callable[[], Awaitable[bool]], max_s: float) -> bool:
    with trio.move_on_after(max_s):
        while True:
            if await predicate():
                return True
            await trio.sleep(TICK_S)
    return False


def _enable_with_cli(tenant: str, dsn: str) -> tuple[int, str]:
    """``triage category enable TENANT email reminder --dsn DSN`` (blocking: run in a thread)."""
    parser = argparse.ArgumentParser(prog="triage")
    cli_category.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["category", "enable", tenant, CHANNEL, CATEGORY, "--dsn", dsn])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code: int = args.handler(args)
    return code, out.getvalue().strip()


async def run_scenario(ctx: ChaosContext) -> Outcome:
    """Scenario 3 (see the module docstring)."""
    timing = QUICK if ctx.quick else FULL
    async with open_rig(ctx, tenants=2) as rig:
        return await _drive(rig, ctx, timing)


async def _drive(rig: Rig, ctx: ChaosContext, timing: _Timing) -> Outcome:
    detector = alert_name(ctx.catalog.row(ROW))
    smtp = rig.emulated.smtp
    channels = rig.tree.channels
    if channels is None:
        raise RuntimeError("the chaos daemon runs without its channels")
    tracker = channels.tracker
    bounced, control = rig.tenants[0], rig.tenants[1]
    key = (str(bounced), CATEGORY)
    sent = _Sent()
    notes: list[str] = []
    states_seen: list[str] = []  # the key's block states, in the order the rows showed them
    probe_answers: Counter[str] = Counter()
    enable_code, enable_out = -1, ""

    def alerts(action: str) -> list[BounceAlert]:
        return [
            e for e in rig.events
            if isinstance(e, BounceAlert) and e.action == action and e.tenant == str(bounced)
            and e.category == CATEGORY
        ]  # fmt: skip

    async def state_is(wanted: str) -> bool:
        blocks = await run(_blocks, rig.owner_url, service="postgres")
        state = blocks.get(key)
        if state is not None and (not states_seen or states_seen[-1] != state):
            states_seen.append(state)
        return state == wanted

    async with trio.open_nursery() as nursery:
        # 1. warm: both tenants send, nothing bounces.
        for _ in range(timing.warm):
            await sent.one(rig, bounced, _address("warm"))
        nursery.start_soon(_control_load, rig, sent, control)

        # 2. the trigger: a share of the first tenant's emails bounce, hard.
        addresses = [_address("bounced") for _ in range(timing.trigger_max)]
        smtp.bounce(*addresses, fraction=BOUNCE_FRACTION, hard=True)
        trigger_at = trio.current_time()
        sent_after_trigger = 0
        with trio.move_on_after(timing.throttle_max_s):
            for address in addresses:
                if alerts("throttled") or alerts("disabled"):
                    break  # the tenant's sender backs off once paged
                await sent.one(rig, bounced, address)
                sent_after_trigger += 1
                await trio.sleep(PACE_S)
            while True:  # the last emails' bounces may still be on their way
                if alerts("throttled") or alerts("disabled"):
                    break
                await trio.sleep(TICK_S)
        throttled_at = alerts("throttled")[0].at if alerts("throttled") else None

        # 3. throttled, then disabled after disable_after_s above the threshold.
        disabled = await _wait_for(
            lambda: state_is("disabled"), ctx.config.bounces.disable_after_s + timing.disable_max_s
        )
        disabled_at = alerts("disabled")[0].at if alerts("disabled") else None
        board_key = f"notice:bounce_spike:{bounced}:{CHANNEL}:{CATEGORY}"

        async def on_board() -> bool:
            return board_key in rig.tree.board

        paged_on_board = await _wait_for(on_board, BOARD_MAX_S)

        # 4. probes: the disabled category is refused; the control goes on.
        probe_keys_before = set(sent.refused)
        for _ in range(timing.probes):
            _status, error = await sent.one(rig, bounced, _address("probe"))
            probe_answers[error or "accepted"] += 1
        probe_keys = [k for k in sent.refused if k not in probe_keys_before]

        # 5. the operator fixes the template and re-enables the category.
        smtp.stop_bouncing()
        enable_code, enable_out = await trio.to_thread.run_sync(
            _enable_with_cli, str(bounced), rig.owner_url
        )
        cleared = await _wait_for(lambda: _not_blocked(rig.owner_url, key), timing.settle_max_s)
        resumed_before = set(sent.accepted)
        for _ in range(timing.resumed):
            await sent.one(rig, bounced, _address("resumed"))
        resumed = [i for i in sent.accepted if i not in resumed_before and i in rig.keys]
        resumed = [i for i in resumed if sent.accepted[i] == str(bounced)]
        sent.control_stop = True

    rows = await rig.settle(SETTLED, timeout_s=timing.settle_max_s)
    rig.count_receipts()
    ledger = rig.ledger
    probe_rows = await run(_rows_by_key, rig.owner_url, probe_keys, service="postgres")
    final_blocks = await run(_blocks, rig.owner_url, service="postgres")

    fired = [
        e.at for e in rig.events
        if isinstance(e, DetectorFired) and e.detector == detector and e.at >= trigger_at
    ]  # fmt: skip
    early = [
        e.at for e in rig.events
        if isinstance(e, DetectorFired) and e.detector == detector and e.at < trigger_at
    ]  # fmt: skip
    detect_s = round(fired[0] - trigger_at, 3) if fired else None
    detected = bool(fired) and not early

    pages = [a for a in alerts("throttled") + alerts("disabled") if a.severity == "page"]
    probes_refused = len(probe_keys) == timing.probes and all(
        probe_rows.get(k, {}).get("status") == "failed"
        and probe_rows.get(k, {}).get("reason") == "category_disabled"
        and smtp.accepted[k] == 0
        for k in probe_keys
    )
    control_ids = [i for i, t in sent.accepted.items() if t == str(control)]
    control_refused = [k for k, (t, _, _) in sent.refused.items() if t == str(control)]
    control_blocked = any(t == str(control) for t, _ in final_blocks) or any(
        isinstance(e, BounceAlert) and e.tenant == str(control) for e in rig.events
    )
    control_sent = all(rows.get(i, {}).get("status") == "dispatched" for i in control_ids)
    resumed_sent = len(resumed) == timing.resumed and all(
        rows.get(i, {}).get("status") == "dispatched" and smtp.accepted[rig.keys[i]] == 1
        for i in resumed
    )
    mitigated = (
        states_seen[:2] == ["throttled", "disabled"]
        and disabled
        and len(pages) >= 2
        and paged_on_board
        and probes_refused
        and not control_blocked
        and not control_refused
        and control_sent
        and enable_code == cli_category.EXIT_OK
        and cleared
        and resumed_sent
    )

    statuses = Counter((sent.accepted[i] == str(control), r["status"]) for i, r in rows.items())
    stats = tracker.ref.statistics()  # None only while the tracker restarts
    if early:
        notes.append(f"{detector} fired {len(early)}x before the trigger")
    notes.append(
        f"bounced tenant: {timing.warm} warm + {sent_after_trigger} after the trigger"
        f" (fraction {BOUNCE_FRACTION}); tracker sent={getattr(stats, 'sent', None)}"
        f" hard bounces={getattr(stats, 'hard_bounces', None)} DSNs posted={smtp.bounces_sent}"
        f" statuses={dict(smtp.bounce_statuses)}"
    )
    page_s = None if throttled_at is None else round(throttled_at - trigger_at, 3)
    held_s = (
        None
        if disabled_at is None or throttled_at is None
        else round(disabled_at - throttled_at, 3)
    )
    notes.append(
        f"block states seen={states_seen}; tracker page (throttled) {page_s}s after the trigger,"
        f" disabled {held_s}s after the throttle; pages={len(pages)}"
        f" on the alert board={paged_on_board}"
    )
    notes.append(
        f"probes={dict(probe_answers)} rows failed/category_disabled and unsent={probes_refused}"
    )
    notes.append(
        f"control: accepted={len(control_ids)} refused={len(control_refused)}"
        f" all dispatched={control_sent} blocked={control_blocked}"
    )
    notes.append(
        f"operator enable exit={enable_code} ({enable_out!r}); block cleared={cleared};"
        f" resumed sends dispatched={resumed_sent} ({len(resumed)})"
    )
    notes.append(
        "final rows (control?, status)="
        + str({f"{'control' if c else 'bounced'}:{s}": n for (c, s), n in statuses.items()})
        + f" smtp duplicates={smtp.duplicates()}"
    )
    return Outcome(
        detected=detected, detect_s=detect_s, mitigated=mitigated, ledger=ledger, notes=notes
    )


async def _not_blocked(url: str, key: tuple[str, str]) -> bool:
    blocks = await run(_blocks, url, service="postgres")
    return key not in blocks


SCENARIO = Scenario(ROW, run_scenario)
