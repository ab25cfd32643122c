"""Every accepted dispatch ends after a ``kill -9`` of the daemon (issue 13), on real processes.

A real ``triage run`` process on the session's PostgreSQL, NATS and Redis, its providers
the emulators of *this* test process (their records and counters survive the daemon),
killed with SIGKILL and started again on the same database; the test sends nothing to
the second daemon and watches the rows reach their final states within the configured
times (short ones, in the overlay):

* **the queued backlog**: dispatches of several tenants accepted while every SMS
  provider is down stay ``queued``; after the restart, with the providers back, every
  one is sent (once) within ``max(requeue_after_s, resume_lease_s) + resume_interval_s``
  of readiness -- the tenants never speak to the second daemon;
* **lost receipts**: SMS and email taken by their providers, whose receipts fire while
  the daemon is down until the gateway's retries run out; after the restart the status
  sweep asks Ghasi (delivered), ends the messages the gateway forgot ``unknown``
  (``feedback_stale:not_found``) and the emails ``unknown`` (``feedback_stale``: SMTP
  answers no status query) after their deadline.
"""

from __future__ import annotations

import asyncio
import re
import signal
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import trio

from providers.bridge import run
from supervisors.demo import DEMO_TENANT_ID
from supervisors.emulated import Emulated, open_emulators
from tests.supervisors.test_daemon import dev_config
from tests.supervisors.test_dispatch_crash import FAST_RESUME, _config_text, _env, daemon_process

SLACK_S = 5.0  # a loaded 2-core machine: a turn, a send and a commit may lag this much

STATUS_SWEEP = {
    "query_after_s": 2.0,
    "query_interval_s": 1.0,
    "query_timeout_s": 1.0,
    "sms_stale_after_s": 6.0,
    "email_stale_after_s": 6.0,
    "sweep_interval_s": 0.5,
}


def _table(name: str, keys: Mapping[str, float]) -> str:
    return f"\n[{name}]\n" + "".join(f"{key} = {value!r}\n" for key, value in keys.items())


async def _tenants_async(url: str, n: int) -> list[str]:
    """``n`` more tenants, each with the demo's SMS ``reminder`` template (as the owner)."""
    conn = await asyncpg.connect(url)
    try:
        out = []
        for i in range(n):
            tenant = await conn.fetchval(
                "INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"liveness-{i}"
            )
            await conn.execute(
                "INSERT INTO templates (tenant_id, name, version, channel, category, body, active)"
                " VALUES ($1, 'reminder', 1, 'sms', 'reminder', 'See you at {time}.', true)",
                tenant,
            )
            out.append(str(tenant))
        return out
    finally:
        await conn.close()


async def _rows_async(url: str, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    conn = await asyncpg.connect(url)
    try:
        records = await conn.fetch(
            "SELECT id::text AS id, status::text AS status, reason FROM dispatches"
            " WHERE id = ANY($1::uuid[])",
            [uuid.UUID(i) for i in ids],
        )
    finally:
        await conn.close()
    return {r["id"]: (r["status"], r["reason"]) for r in records}


async def rows(url: str, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    found: dict[str, tuple[str, str | None]] = await run(_rows_async, url, ids, service="postgres")
    return found


async def until(
    url: str, ids: list[str], done: Callable[[dict[str, tuple[str, str | None]]], bool]
) -> dict[str, tuple[str, str | None]]:
    """The rows once ``done(rows)`` holds (polled); the caller bounds the wait."""
    while True:
        found = await rows(url, ids)
        if done(found):
            return found
        await trio.sleep(0.2)


async def post_all(url: str, bodies: Mapping[str, dict[str, Any]]) -> dict[str, str]:
    """POST every body (key -> body) at once; key -> dispatch id, each answered 202."""
    answered: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=url, timeout=20) as client:

        async def post(key: str, payload: dict[str, Any]) -> None:
            answer = await client.post(
                "/v1/dispatches", json=payload, headers={"Idempotency-Key": key}
            )
            assert answer.status_code == 202, answer.text
            answered[key] = answer.json()["dispatch_id"]

        async with trio.open_nursery() as nursery:
            for key, payload in bodies.items():
                nursery.start_soon(post, key, payload)
    return answered


def sms(tenant: str, n: int) -> dict[str, Any]:
    return {
        "tenant_id": tenant, "channel": "sms", "template": "reminder",
        "recipient": f"+1555{n:07d}", "data": {"time": "10:30"},
    }  # fmt: skip


def email(n: int) -> dict[str, Any]:
    return {
        "tenant_id": str(DEMO_TENANT_ID), "channel": "email", "template": "email_reminder",
        "recipient": f"pat{n}@example.org", "data": {"time": "10:30"},
    }  # fmt: skip


def _sms_down(emulated: Emulated, down: bool) -> None:
    for emulator in (emulated.ghasi, emulated.twilio):
        if down:
            emulator.set_faults(status=503)
        else:
            emulator.clear_faults()


async def test_a_queued_backlog_of_every_tenant_is_resumed_after_a_sigkill(
    tmp_path: Path,
    postgres_url: str,
    nats_url: str,
    redis_url: str,
    bridge: asyncio.AbstractEventLoop,
) -> None:
    per_tenant = 20
    async with open_emulators(dev_config()) as emulated:
        config = tmp_path / "triage.toml"
        config.write_text(_config_text(emulated, tmp_path, dispatch=FAST_RESUME))
        env = _env(emulated, postgres_url, nats_url, redis_url)
        _sms_down(emulated, True)  # every SMS provider refuses: the sends back up
        async with daemon_process(config, env, emulated) as first:
            others = await run(_tenants_async, postgres_url, 2, service="postgres")
            tenants = [str(DEMO_TENANT_ID), *others]
            bodies = {
                f"backlog-{t}-{n}": sms(tenant, 100 * t + n)
                for t, tenant in enumerate(tenants)
                for n in range(per_tenant)
            }
            ids = await post_all(first.url, bodies)
            # The first daemon holds them, parked for their requeue; its resumer renews
            # their claims meanwhile (what a second replica would respect).
            await trio.sleep(3 * FAST_RESUME["resume_interval_s"])
            before = await rows(postgres_url, list(ids.values()))
            first.process.send_signal(signal.SIGKILL)
            with trio.fail_after(10):
                await first.process.wait()
        assert {status for status, _ in before.values()} == {"queued"}
        assert sum(emulated.received(k) for k in bodies) == 0  # nothing was sent

        _sms_down(emulated, False)
        async with daemon_process(config, env, emulated) as second:  # same database
            bound = (
                max(FAST_RESUME["requeue_after_s"], FAST_RESUME["resume_lease_s"])
                + FAST_RESUME["resume_interval_s"]
                + SLACK_S
            )
            # Nobody sends anything to the second daemon: it finds every tenant's rows.
            with trio.fail_after(bound):
                after = await until(
                    postgres_url,
                    list(ids.values()),
                    lambda found: all(s != "queued" for s, _ in found.values()),
                )
            async with httpx.AsyncClient(base_url=second.url) as client:
                metrics = (await client.get("/metrics")).text
        assert {status for status, _ in after.values()} <= {"dispatched", "delivered"}
        assert len(after) == len(bodies) == 3 * per_tenant
        with trio.fail_after(SLACK_S):
            await emulated.ghasi.wait_until(lambda: all(emulated.received(k) for k in bodies))
        assert {k: emulated.received(k) for k in bodies} == dict.fromkeys(bodies, 1)
        assert emulated.duplicates() == 0
        assert 'triage_dispatch_resumed_total{channel="sms"} 60.0' in metrics


async def test_sms_and_email_whose_receipts_were_lost_end_after_a_sigkill(
    tmp_path: Path,
    postgres_url: str,
    nats_url: str,
    redis_url: str,
    bridge: asyncio.AbstractEventLoop,
) -> None:
    n_sms, n_forgotten, n_email = 24, 8, 4
    receipt_delay_s = 4.0  # the receipts fire once the daemon is dead
    async with open_emulators(dev_config()) as emulated:
        ghasi = emulated.ghasi
        ghasi.receipt_delay_s = receipt_delay_s
        ghasi.receipt_attempts, ghasi.receipt_retry_s = 2, 0.1  # then the gateway gives up
        config = tmp_path / "triage.toml"
        overlay = _config_text(emulated, tmp_path, extra=_table("status_sweep", STATUS_SWEEP))
        config.write_text(overlay)
        env = _env(emulated, postgres_url, nats_url, redis_url)
        texts = {f"lost-{n}": sms(str(DEMO_TENANT_ID), n) for n in range(n_sms)}
        mails = {f"mail-{n}": email(n) for n in range(n_email)}
        async with daemon_process(config, env, emulated) as first:
            ids = await post_all(first.url, {**texts, **mails})
            with trio.fail_after(receipt_delay_s - 1):  # all taken, before any receipt
                await until(
                    postgres_url,
                    list(ids.values()),
                    lambda found: (
                        len(found) == len(ids) and all(s == "dispatched" for s, _ in found.values())
                    ),
                )
            first.process.send_signal(signal.SIGKILL)
            with trio.fail_after(10):
                await first.process.wait()
        # The gateway's receipts find the daemon down, and it gives up on each.
        with trio.fail_after(receipt_delay_s + 5):
            await ghasi.wait_until(lambda: ghasi.receipt_statuses[0] == 2 * n_sms)
        assert dict(ghasi.receipt_statuses) == {0: 2 * n_sms}  # none ever arrived
        assert ghasi.messages[f"{DEMO_TENANT_ID}:{ids['lost-0']}"].status == "delivered"
        forgotten = [ids[f"lost-{n}"] for n in range(n_forgotten)]
        for dispatch_id in forgotten:  # the gateway lost its records of these
            ghasi.forget(f"{DEMO_TENANT_ID}:{dispatch_id}")
        remembered = [ids[f"lost-{n}"] for n in range(n_forgotten, n_sms)]
        mail_ids = [ids[k] for k in mails]

        async with daemon_process(config, env, emulated) as second:
            # Asked once older than query_after_s (it is already): delivered at the
            # sweep's first turn.
            with trio.fail_after(STATUS_SWEEP["sweep_interval_s"] + SLACK_S):
                await until(
                    postgres_url,
                    remembered,
                    lambda found: all(s == "delivered" for s, _ in found.values()),
                )
            # Not settled by the deadline: unknown, saying why, by the deadline plus a
            # claim and a turn.
            bound = (
                max(STATUS_SWEEP["sms_stale_after_s"], STATUS_SWEEP["email_stale_after_s"])
                + STATUS_SWEEP["query_interval_s"]
                + STATUS_SWEEP["sweep_interval_s"]
                + SLACK_S
            )
            with trio.fail_after(bound):
                ended = await until(
                    postgres_url,
                    forgotten + mail_ids,
                    lambda found: all(s == "unknown" for s, _ in found.values()),
                )
            async with httpx.AsyncClient(base_url=second.url) as client:
                metrics = (await client.get("/metrics")).text
        assert {ended[i] for i in forgotten} == {("unknown", "feedback_stale:not_found")}
        assert {ended[i] for i in mail_ids} == {("unknown", "feedback_stale")}
        assert {s for s, _ in (await rows(postgres_url, remembered)).values()} == {"delivered"}
        asked = {
            frozenset(labels.split(",")): float(value)
            for labels, value in re.findall(
                r"(?m)^triage_status_queries_total\{(.*)\} (\S+)$", metrics
            )
        }
        delivered = frozenset({'provider="ghasi"', 'answer="delivered"'})
        assert asked.get(delivered) == len(remembered), asked  # each asked once, settled
        assert emulated.duplicates() == 0
