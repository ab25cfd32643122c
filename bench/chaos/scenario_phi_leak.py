"""Chaos scenario 11: a template version leaks PHI into push payloads, through the real daemon.

The scenario runs the daemon on the scenario config in the channel rig
(:func:`bench.chaos.channels_rig.open_rig`: embedded PostgreSQL and NATS, the loopback
FCM / APNs emulators, the whole channel wiring), with JSON logging to a file of its
own (``[daemon] log_file``, redacted at the source as ``triage run`` does) and one
more PHI rule: ``[[phi.templates]]`` ``lab_push`` version 2, field ``result``.

Each tenant has the push template ``lab_push`` (category ``lab``): version 1 says
"your results are ready", version 2 -- the bug, the active one for tenant A only --
puts the test and its result into the push text. Clients send, over ``POST
/v1/dispatches``, good pushes (``push_reminder``, category ``reminder``) all through
the run, and:

* tenant A: ``lab_push`` (the active version, 2) with ``{"test": "HIV", "result": ...}``:
  the guard trips -- 422 ``phi_guard``; the dispatches after it: ``lab_push`` again
  (its newest version is retired: 422 ``template_retired``) and ``lab_push`` version 1
  (clean text, but its category is halted for the tenant: 422 ``category_disabled``);
* tenant B: ``lab_push`` version 1 -- delivered: the halt is tenant A's alone.

Meanwhile something writes around the redaction: a raw JSON line with a PHI field
straight into the log file (a library with a handler of its own), and a dead letter
with PHI in its payload straight into ``dead_letters`` (an older release's). The
scanner must find both.

Judged from outside:

* **detected**: row 11's detector fired (``detect_s`` from the first leaking
  dispatch), and the scanner recorded its finds (a ``log`` and a ``dlq`` incident);
* **mitigated**: the leaking dispatch answered 422 ``phi_guard``, its row ``failed`` /
  ``phi_guard``; tenant A's ``(push, lab)`` block is ``disabled`` reason ``phi_guard``
  and ``lab_push`` version 2 is retired (reason ``phi_guard: ...``), tenant B's are
  not; the incident (``push_guard``, ``lab_push@2``, the rule) keeps a redacted
  excerpt without the result; the dispatches after it were refused
  ``template_retired`` / ``category_disabled``; no provider emulator saw a request
  for any refused key, nor a message carrying the PHI; the PHI values logged by the
  daemon's own loggers never reached the log file; every good push ended
  ``delivered``.

Accounting: accepted = every 2xx plus every refused row the daemon recorded (found by
tenant and key; settled once final); duplicates from the emulators' counts per key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import msgspec
import trio

from actors.phi_rules import phi_rules
from bench.chaos.channels_rig import FINAL, Rig, open_rig
from bench.chaos.harness import ChaosContext, Outcome, Scenario
from config.catalog import alert_name
from config.schema import PhiTemplateRule, TriageConfig
from providers.bridge import run
from supervisors.logging import json_logging

__all__ = ["ROW", "SCENARIO", "run_scenario"]

ROW = 11
METRIC = "triage_phi_guard_hits_total"
LEAKY = "lab_push"
GOOD = "push_reminder"
CATEGORY = "lab"
# The PHI of the run: none of these may reach a provider, the log file or an incident.
RESULT = "positive-7Q4Z"
LOGGED_MRN = "MRN:83927461"  # logged by a daemon logger: redacted at the source
LOGGED_DIAGNOSIS = "asthma-X2"
RAW_DIAGNOSIS = "diabetes-K9"  # written around the redaction: the scanner finds it
DLQ_SSN = "123-45-6789"


@dataclass(frozen=True)
class _Load:
    good: int  # good pushes, spread through the run
    pace_s: float
    settle_s: float
    scan_s: float  # time for the scanner to find what got by


QUICK = _Load(good=16, pace_s=0.03, settle_s=8.0, scan_s=5.0)
FULL = _Load(good=120, pace_s=0.02, settle_s=25.0, scan_s=15.0)


@dataclass
class _Refused:
    key: str
    tenant: uuid.UUID
    what: str
    status: int
    error: str | None
    dispatch_id: str | None = None


@dataclass
class _Run:
    good_ids: list[str] = field(default_factory=list)
    refused_good: list[str] = field(default_factory=list)
    refused: list[_Refused] = field(default_factory=list)
    tenant_b_ids: list[str] = field(default_factory=list)
    first_leak_at: float | None = None


def _config(ctx: ChaosContext, log_file: str) -> TriageConfig:
    config = ctx.config
    phi = msgspec.structs.replace(
        config.phi,
        templates=[
            *config.phi.templates,
            PhiTemplateRule(template=LEAKY, versions=[2], fields=["result"]),
        ],
    )
    daemon = msgspec.structs.replace(config.daemon, log_file=log_file)
    return msgspec.structs.replace(config, phi=phi, daemon=daemon)


def _error_code(answer: httpx.Response) -> str | None:
    try:
        body = answer.json()
    except ValueError:
        return None
    code = body.get("error") if isinstance(body, dict) else None
    return code if isinstance(code, str) else None


async def _seed(url: str, tenant_a: uuid.UUID, tenant_b: uuid.UUID) -> None:
    """``lab_push`` v1 (clean) for both tenants; v2 (the leak) active for tenant A."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            insert = (
                "INSERT INTO templates (tenant_id, name, version, channel, category, subject,"
                " body, active) VALUES ($1, $2, $3, 'push', $4, 'Results', $5, $6)"
            )
            for tenant in (tenant_a, tenant_b):
                await conn.execute(
                    insert,
                    tenant,
                    LEAKY,
                    1,
                    CATEGORY,
                    "Your results are ready.",
                    tenant == tenant_b,
                )
            await conn.execute(
                insert, tenant_a, LEAKY, 2, CATEGORY, "Your {test} result: {result}.", True
            )
    finally:
        await conn.close()


async def _inject_dead_letter(url: str, tenant: uuid.UUID) -> None:
    """A dead letter with PHI, written as an older release would have (no redaction)."""
    conn = await asyncpg.connect(url)
    try:
        payload = msgspec.json.encode({"kind": "note", "patient_ssn": f"ssn {DLQ_SSN}"})
        await conn.execute(
            "INSERT INTO dead_letters (tenant_id, source, ref, subject, payload, error)"
            " VALUES ($1, 'chaos', $2, 'triage.events.note', $3, 'schema drift')",
            tenant, uuid.uuid4().hex, payload,
        )  # fmt: skip
    finally:
        await conn.close()


async def _owner_read(url: str, tenant_a: uuid.UUID) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        blocks = [
            dict(r)
            for r in await conn.fetch(
                "SELECT tenant_id, state, reason FROM category_blocks"
                " WHERE channel = 'push' AND category = $1",
                CATEGORY,
            )
        ]
        templates = [
            dict(r)
            for r in await conn.fetch(
                "SELECT tenant_id, version, active, retired_at IS NOT NULL AS retired,"
                " retired_reason FROM templates WHERE name = $1 ORDER BY tenant_id, version",
                LEAKY,
            )
        ]
        incidents = [
            dict(r)
            for r in await conn.fetch(
                "SELECT tenant_id, source, ref, template, template_version, rule, location,"
                " excerpt FROM incidents ORDER BY id"
            )
        ]
        return {"blocks": blocks, "templates": templates, "incidents": incidents, "a": tenant_a}
    finally:
        await conn.close()


async def _rows_by_key(url: str, pairs: list[tuple[str, str]]) -> dict[str, str]:
    conn = await asyncpg.connect(url)
    try:
        records = await conn.fetch(
            "SELECT d.id::text AS id, d.idempotency_key AS key FROM dispatches d"
            " JOIN unnest($1::uuid[], $2::text[]) AS k(tenant_id, key)"
            " ON d.tenant_id = k.tenant_id AND d.idempotency_key = k.key",
            [uuid.UUID(t) for t, _ in pairs],
            [k for _, k in pairs],
        )
        return {r["key"]: r["id"] for r in records}
    finally:
        await conn.close()


def _metric(rig: Rig, source: str) -> float:
    runtime = rig.daemon.runtime
    metrics = runtime.metrics if runtime is not None else None
    if metrics is None:
        return 0.0
    return float(metrics.registry.get_sample_value(METRIC, {"source": source}) or 0.0)


def _sent_phi(rig: Rig, keys: list[str]) -> tuple[int, int]:
    """(requests any emulator saw for ``keys``, stored messages carrying the PHI)."""
    requests = sum(rig.emulated.received(k) for k in keys)
    requests += sum(e.requests[k] for e in rig.emulated.http for k in keys)
    carrying = 0
    for emulator in rig.emulated.http:
        for message in getattr(emulator, "messages", {}).values():
            text = message.body + " ".join(message.fields.values())
            carrying += int(RESULT in text)
    return requests, carrying


@contextlib.contextmanager
def _logging(config: TriageConfig) -> Iterator[None]:
    """JSON lines to ``[daemon] log_file`` (and nowhere else), redacted: as ``triage run``."""
    with (
        open(os.devnull, "w", encoding="utf-8") as sink,
        json_logging(
            "info",
            wall=time.time,
            stream=sink,
            log_file=config.daemon.log_file,
            redact=phi_rules(config.phi).redact_value,
        ),
    ):
        yield


async def _push(
    rig: Rig, state: _Run, what: str, tenant: uuid.UUID, data: dict[str, str], **kw: Any
) -> _Refused | None:
    key = f"{what}-{uuid.uuid4().hex}"
    answer = await rig.send("push", "fcm:tok-lab", LEAKY, tenant=tenant, data=data, key=key, **kw)
    if answer.is_success:
        if tenant != rig.tenants[0]:
            state.tenant_b_ids.append(answer.json()["dispatch_id"])
        return None
    refused = _Refused(key, tenant, what, answer.status_code, _error_code(answer))
    state.refused.append(refused)
    return refused


async def _send_load(rig: Rig, load: _Load, state: _Run) -> None:
    tenant_a, tenant_b = rig.tenants[0], rig.tenants[1]
    leak_at = load.good // 4
    for i in range(load.good):
        tenant = rig.tenants[i % 2]
        # APNs device tokens are hex; FCM's are opaque.
        token = f"fcm:tok-{i}" if i % 2 == 0 else f"apns:{secrets.token_hex(32)}"
        answer = await rig.send("push", token, GOOD, tenant=tenant)
        if answer.status_code == 202:
            state.good_ids.append(answer.json()["dispatch_id"])
        else:
            state.refused_good.append(f"{answer.status_code} {_error_code(answer)}")
        if i == leak_at:
            state.first_leak_at = trio.current_time()
            await _push(rig, state, "leak", tenant_a, {"test": "HIV", "result": RESULT})
            # The daemon's own loggers log PHI (a bug elsewhere): redacted at the source.
            logging.getLogger("triage.chaos").warning(
                "patient %s", LOGGED_MRN, extra={"diagnosis": LOGGED_DIAGNOSIS}
            )
        if i == leak_at + 1:
            await _push(rig, state, "again", tenant_a, {"test": "HIV", "result": RESULT})
            await _push(rig, state, "v1_halted", tenant_a, {}, version=1)
            await _push(rig, state, "tenant_b", tenant_b, {}, version=1)
        await trio.sleep(load.pace_s)


def _write_raw_line(path: str) -> None:
    """A line written around the daemon's formatter (a library's own handler)."""
    line = msgspec.json.encode(
        {"ts": time.time(), "level": "info", "logger": "vendor.sdk", "diagnosis": RAW_DIAGNOSIS}
    )
    with open(path, "ab") as file:
        file.write(line + b"\n")


async def run_scenario(ctx: ChaosContext) -> Outcome:
    """Scenario 11 (see the module docstring)."""
    load = QUICK if ctx.quick else FULL
    detector = alert_name(ctx.catalog.row(ROW))
    state = _Run()
    with tempfile.TemporaryDirectory(prefix="triage-chaos-phi-") as folder:
        log_file = os.path.join(folder, "daemon.jsonl")
        config = _config(ctx, log_file)
        with _logging(config):
            scoped = ChaosContext(config=config, catalog=ctx.catalog, quick=ctx.quick)
            async with open_rig(scoped) as rig:
                tenant_a = rig.tenants[0]
                await run(_seed, rig.owner_url, tenant_a, rig.tenants[1], service="postgres")
                await _send_load(rig, load, state)
                await trio.to_thread.run_sync(_write_raw_line, log_file)
                await run(_inject_dead_letter, rig.owner_url, tenant_a, service="postgres")

                rows_by_key = await run(
                    _rows_by_key, rig.owner_url,
                    [(str(r.tenant), r.key) for r in state.refused], service="postgres",
                )  # fmt: skip
                for refused in state.refused:
                    found = rows_by_key.get(refused.key)
                    if found is not None:
                        refused.dispatch_id = found
                        rig.keys[found] = refused.key
                        rig.ledger.accept(found)

                seen: dict[str, Any] = {}
                with trio.move_on_after(load.scan_s):
                    while True:
                        seen = await run(_owner_read, rig.owner_url, tenant_a, service="postgres")
                        sources = {i["source"] for i in seen["incidents"]}
                        if {"log", "dlq", "push_guard"} <= sources:
                            break
                        await trio.sleep(0.1)
                rows = await rig.settle(FINAL, timeout_s=load.settle_s)
                rig.count_receipts()
                fired = rig.fired_at(detector)
                counted = {s: _metric(rig, s) for s in ("push_guard", "log", "dlq")}
                requests, carrying = _sent_phi(rig, [r.key for r in state.refused])
                leaks = [e for e in rig.events if type(e).__name__ == "PhiLeak"]
        logged = await trio.Path(log_file).read_text(encoding="utf-8", errors="replace")

    by = {r.what: r for r in state.refused}
    answers = {w: (r.status, r.error) for w, r in by.items()}
    a = str(seen.get("a", ""))
    incidents = seen.get("incidents", [])
    guard = [i for i in incidents if i["source"] == "push_guard"]
    blocks = {str(b["tenant_id"]): b for b in seen.get("blocks", [])}
    versions = {(str(t["tenant_id"]), t["version"]): t for t in seen.get("templates", [])}
    leak_row = rows.get(by["leak"].dispatch_id or "", {}) if "leak" in by else {}
    v2 = versions.get((a, 2), {})
    b_versions = [t for (tenant, _), t in versions.items() if tenant != a]
    incident_ok = (
        len(guard) == 1
        and str(guard[0]["tenant_id"]) == a
        and (guard[0]["template"], guard[0]["template_version"]) == (LEAKY, 2)
        and "result" in guard[0]["rule"]
        and all(RESULT not in str(i["excerpt"]) for i in incidents)
        and all(RAW_DIAGNOSIS not in str(i["excerpt"]) for i in incidents)
        and all(DLQ_SSN not in str(i["excerpt"]) for i in incidents)
    )
    delivered = sum(1 for i in state.good_ids if rows.get(i, {}).get("status") == "delivered")
    b_delivered = sum(1 for i in state.tenant_b_ids if rows.get(i, {}).get("status") == "delivered")
    scanner_found = {"log", "dlq"} <= {i["source"] for i in incidents}
    redacted_at_source = (
        LOGGED_MRN not in logged and LOGGED_DIAGNOSIS not in logged and RESULT not in logged
    )
    mitigated = (
        answers.get("leak") == (422, "phi_guard")
        and (leak_row.get("status"), leak_row.get("reason")) == ("failed", "phi_guard")
        and answers.get("again") == (422, "template_retired")
        and answers.get("v1_halted") == (422, "category_disabled")
        and "tenant_b" not in answers
        and b_delivered == len(state.tenant_b_ids) == 1
        and blocks.get(a, {}).get("state") == "disabled"
        and blocks.get(a, {}).get("reason") == "phi_guard"
        and len(blocks) == 1
        and bool(v2.get("retired"))
        and not v2.get("active")
        and str(v2.get("retired_reason", "")).startswith("phi_guard: ")
        and not any(t["retired"] for t in b_versions)
        and incident_ok
        and requests == 0
        and carrying == 0
        and redacted_at_source
        and not state.refused_good
        and delivered == len(state.good_ids) > 0
    )
    detect_s = (
        None
        if fired is None or state.first_leak_at is None
        else round(fired - state.first_leak_at, 3)
    )
    notes = [
        f"refused: {answers}; leaking row {leak_row.get('status')}/{leak_row.get('reason')}",
        f"tenant A's (push, {CATEGORY}) block: {blocks.get(a, {}).get('state')}"
        f" ({blocks.get(a, {}).get('reason')}); blocks in all={len(blocks)};"
        f" {LEAKY}@2 retired={v2.get('retired')} ({v2.get('retired_reason')});"
        f" tenant B's versions retired={sum(bool(t['retired']) for t in b_versions)},"
        f" tenant B's v1 pushes delivered={b_delivered}/{len(state.tenant_b_ids)}",
        f"incidents: {[(i['source'], i['rule'], i['excerpt']) for i in incidents]}",
        f"{METRIC} by source={counted}, PhiLeak pages={len(leaks)},"
        f" scanner found log+dlq={scanner_found}",
        f"emulator requests for refused keys={requests}, stored messages with the PHI="
        f"{carrying}, PHI logged by the daemon in its file={not redacted_at_source}",
        f"good pushes delivered={delivered}/{len(state.good_ids)}"
        + (f", good refused: {state.refused_good[:3]}" if state.refused_good else ""),
    ]
    return Outcome(
        detected=fired is not None and scanner_found,
        detect_s=detect_s,
        mitigated=mitigated,
        ledger=rig.ledger,
        notes=notes,
    )


SCENARIO = Scenario(ROW, run_scenario)
