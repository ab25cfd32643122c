"""Chaos scenario 19: template not found (a deploy mismatch), through the real daemon.

The scenario runs the daemon on the scenario config in the channel rig
(:func:`bench.chaos.channels_rig.open_rig`: embedded PostgreSQL and NATS, the
loopback provider emulators, the whole channel wiring). Each tenant has the
``reminder`` SMS template, version 1, and nothing else. Clients then send, over
``POST /v1/dispatches``, good SMS dispatches mixed with bad ones:

* a template name no deploy ever created (``reminder_v2``), and
* a version of ``reminder`` that does not exist (``template_version`` 99).

What the API answers a bad dispatch (``actors/templates.py`` ``TemplateNotFound``,
``actors/dispatch_commands.answer_for_error``): **422** with
``{"error": "template_not_found", "message": "template '...' (...) not found for
tenant ..."}`` and no ``dispatch_id``; the daemon has written a dispatch row
``failed`` reason ``template_not_found`` in the same transaction as an
internal-ops notice in the outbox. A replay of the same key answers 200 with that
row's id and status ``failed`` (nothing counted twice).

Judged from outside:

* **detected**: row 19's detector ``TriageTemplateNotFound`` fired (``detect_s``
  from the first bad dispatch);
* **mitigated**: every bad dispatch was answered 422 ``template_not_found``; its row
  (found by tenant and idempotency key) is ``failed`` / ``template_not_found``;
  no provider emulator saw a request for its key; ``triage_template_not_found_total``
  counts every one; a :class:`~actors.templates.TemplateMissing` event reached the
  bus per bad dispatch; the ops notice (``kind = template_not_found``, naming the
  dispatch) reached JetStream through the outbox relay (subject
  ``triage.events.ops.notice`` of stream ``[relay] stream``, read back with a
  client of our own); and every good dispatch ended ``delivered``.

Accounting: accepted = every dispatch the daemon answered 2xx plus every failed-closed
row it recorded (settled when its row is final: ``delivered`` for good ones,
``failed`` for bad ones); receipts counted by the emulators (duplicates 0).

The detector's window comes from the scenario config (``[detectors.template_not_found]``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import trio

from actors.templates import NOTICE_KIND, TemplateMissing
from bench.chaos.channels_rig import FINAL, Rig, open_rig
from bench.chaos.harness import ChaosContext, Outcome, Scenario
from config.catalog import alert_name
from providers import jetstream
from providers.bridge import run
from providers.db.dispatches import OPS_NOTICE_SUBJECT

__all__ = ["ROW", "SCENARIO", "run_scenario"]

ROW = 19
METRIC = "triage_template_not_found_total"
MISSING_NAME = "reminder_v2"  # a template the deploy never created
MISSING_VERSION = 99  # a version of "reminder" that does not exist
GOOD_TEMPLATE = "reminder"


@dataclass(frozen=True)
class _Load:
    good: int  # good dispatches, spread through the run
    bad_every: int  # one bad dispatch after this many good ones
    pace_s: float
    settle_s: float  # time for every dispatch to reach a final status
    stream_s: float  # time for every notice to reach the stream


QUICK = _Load(good=24, bad_every=4, pace_s=0.02, settle_s=10.0, stream_s=8.0)
FULL = _Load(good=200, bad_every=5, pace_s=0.01, settle_s=30.0, stream_s=20.0)


@dataclass
class _Bad:
    key: str
    tenant: uuid.UUID
    template: str
    version: int | None
    status: int
    error: str | None
    dispatch_id: str | None = None


@dataclass
class _Run:
    good_ids: list[str] = field(default_factory=list)
    bad: list[_Bad] = field(default_factory=list)
    refused_good: list[str] = field(default_factory=list)
    first_bad_at: float | None = None


def _error_code(answer: httpx.Response) -> str | None:
    try:
        body = answer.json()
    except ValueError:
        return None
    code = body.get("error") if isinstance(body, dict) else None
    return code if isinstance(code, str) else None


async def _rows_by_key(url: str, pairs: list[tuple[str, str]]) -> dict[str, dict[str, Any]]:
    """Dispatch rows by idempotency key (read as the owner), for keys the API gave no id for."""
    conn = await asyncpg.connect(url)
    try:
        records = await conn.fetch(
            "SELECT d.id::text AS id, d.idempotency_key AS key, d.status::text AS status,"
            " d.reason, d.provider FROM dispatches d"
            " JOIN unnest($1::uuid[], $2::text[]) AS k(tenant_id, key)"
            " ON d.tenant_id = k.tenant_id AND d.idempotency_key = k.key",
            [uuid.UUID(t) for t, _ in pairs],
            [k for _, k in pairs],
        )
        return {r["key"]: dict(r) for r in records}
    finally:
        await conn.close()


async def _read_notices(url: str, stream: str) -> list[dict[str, Any]]:
    """asyncio side: the ops notices stored in ``stream`` (a client of our own)."""
    client = await jetstream.connect(url, name="chaos-row19")
    try:
        stored = await jetstream.read_stream(client, stream)
    finally:
        await jetstream.close(client)
    notices = []
    for message in stored:
        if message.subject == OPS_NOTICE_SUBJECT:
            payload = json.loads(message.payload)
            if isinstance(payload, dict):
                notices.append(payload)
    return notices


async def _send_load(rig: Rig, load: _Load, state: _Run) -> None:
    tenants = rig.tenants
    bad_made = 0
    for i in range(load.good):
        tenant = tenants[i % len(tenants)]
        answer = await rig.send("sms", f"+1555010{i % 10000:04d}", GOOD_TEMPLATE, tenant=tenant)
        if answer.status_code == 202:
            state.good_ids.append(answer.json()["dispatch_id"])
        else:
            state.refused_good.append(f"{answer.status_code} {_error_code(answer)}")
        if (i + 1) % load.bad_every == 0:
            name, version = (
                (MISSING_NAME, None) if bad_made % 2 == 0 else (GOOD_TEMPLATE, MISSING_VERSION)
            )
            bad_tenant = tenants[bad_made % len(tenants)]
            bad_made += 1
            key = f"bad-{uuid.uuid4().hex}"
            if state.first_bad_at is None:
                state.first_bad_at = trio.current_time()
            answer = await rig.send(
                "sms", "+15550200000", name, tenant=bad_tenant, key=key, version=version
            )
            state.bad.append(
                _Bad(key, bad_tenant, name, version, answer.status_code, _error_code(answer))
            )
        await trio.sleep(load.pace_s)


def _metric(rig: Rig, channel: str) -> float:
    runtime = rig.daemon.runtime
    metrics = runtime.metrics if runtime is not None else None
    if metrics is None:
        return 0.0
    value = metrics.registry.get_sample_value(METRIC, {"channel": channel})
    return float(value or 0.0)


def _provider_requests(rig: Rig, keys: Iterable[str]) -> int:
    """Requests (accepted or not) any provider emulator saw for ``keys``."""
    total = 0
    for key in keys:
        total += rig.emulated.received(key)
        total += sum(emulator.requests[key] for emulator in rig.emulated.http)
    return total


async def run_scenario(ctx: ChaosContext) -> Outcome:
    """Scenario 19 (see the module docstring)."""
    load = QUICK if ctx.quick else FULL
    detector = alert_name(ctx.catalog.row(ROW))
    stream = ctx.config.relay.stream
    state = _Run()
    notes: list[str] = []
    async with open_rig(ctx) as rig:
        await _send_load(rig, load, state)
        board_saw = f"detector:{detector}" in rig.tree.board

        # The failed-closed rows: found by (tenant, key); they count as accepted.
        rows_by_key = await run(
            _rows_by_key,
            rig.owner_url,
            [(str(b.tenant), b.key) for b in state.bad],
            service="postgres",
        )
        for bad in state.bad:
            row = rows_by_key.get(bad.key)
            if row is not None:
                bad.dispatch_id = row["id"]
                rig.keys[row["id"]] = bad.key
                rig.ledger.accept(row["id"])

        # A replay of a refused key answers the stored row, counts nothing again.
        replay_note = "no bad dispatch to replay"
        replay_ok = True
        if state.bad:
            before = _metric(rig, "sms")
            first = state.bad[0]
            again = await rig.client.post(
                "/v1/dispatches",
                json={
                    "tenant_id": str(first.tenant),
                    "channel": "sms",
                    "template": first.template,
                    "recipient": "+15550200000",
                    "data": {"time": "10:30"},
                    **({"template_version": first.version} if first.version is not None else {}),
                },
                headers={"Idempotency-Key": first.key},
            )
            replayed_id = again.json().get("dispatch_id") if again.is_success else None
            replay_ok = replayed_id == first.dispatch_id and _metric(rig, "sms") == before
            replay_note = (
                f"replay of a refused key answered {again.status_code}"
                f" {again.json().get('status', again.json().get('error'))}"
                f" (same row: {replayed_id == first.dispatch_id})"
            )

        rows = await rig.settle(FINAL, timeout_s=load.settle_s)
        rig.count_receipts()

        # The ops notices, through the outbox relay to JetStream.
        nats_url = rig.daemon.backbone.services.nats_url if rig.daemon.backbone else None
        wanted = {b.dispatch_id for b in state.bad if b.dispatch_id is not None}
        notices: list[dict[str, Any]] = []
        if nats_url is not None:
            with trio.move_on_after(load.stream_s):
                while True:
                    notices = await run(_read_notices, nats_url, stream, service="nats")
                    seen = {n.get("dispatch_id") for n in notices if n.get("kind") == NOTICE_KIND}
                    if wanted <= seen:
                        break
                    await trio.sleep(0.2)
        counted = _metric(rig, "sms")
        missing_events = [e for e in rig.events if isinstance(e, TemplateMissing)]
        fired = rig.fired_at(detector)
        provider_hits = _provider_requests(rig, (b.key for b in state.bad))

    refused = state.bad
    answered_422 = sum(1 for b in refused if b.status == 422 and b.error == "template_not_found")
    closed = [
        b
        for b in refused
        if b.dispatch_id is not None
        and rows.get(b.dispatch_id, {}).get("status") == "failed"
        and rows.get(b.dispatch_id, {}).get("reason") == "template_not_found"
    ]
    on_stream = {
        n.get("dispatch_id")
        for n in notices
        if n.get("kind") == NOTICE_KIND and n.get("channel") == "sms"
    }
    noticed = sum(1 for b in refused if b.dispatch_id in on_stream)
    delivered = sum(1 for i in state.good_ids if rows.get(i, {}).get("status") == "delivered")

    mitigated = (
        bool(refused)
        and answered_422 == len(refused)
        and len(closed) == len(refused)
        and provider_hits == 0
        and counted == len(refused)
        and len(missing_events) == len(refused)
        and noticed == len(refused)
        and not state.refused_good
        and delivered == len(state.good_ids) > 0
        and replay_ok
    )
    detect_s = (
        None
        if fired is None or state.first_bad_at is None
        else round(fired - state.first_bad_at, 3)
    )
    notes.append(
        f"bad dispatches={len(refused)} (name {MISSING_NAME!r} / version {MISSING_VERSION}):"
        f" answered 422 template_not_found={answered_422}, rows failed/template_not_found="
        f"{len(closed)}, provider requests for their keys={provider_hits}"
    )
    notes.append(
        f"{METRIC}={counted:g}, TemplateMissing events={len(missing_events)},"
        f" ops notices on {OPS_NOTICE_SUBJECT}={noticed}/{len(refused)},"
        f" alert on the board={board_saw}"
    )
    notes.append(
        f"good dispatches delivered={delivered}/{len(state.good_ids)}"
        + (f", good refused: {state.refused_good[:3]}" if state.refused_good else "")
    )
    notes.append(replay_note)
    return Outcome(
        detected=fired is not None,
        detect_s=detect_s,
        mitigated=mitigated,
        ledger=rig.ledger,
        notes=notes,
    )


SCENARIO = Scenario(ROW, run_scenario)
