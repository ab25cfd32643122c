"""Nothing accepted is lost: ``kill -9`` of the daemon mid-accept, with Redis on.

A real ``triage run`` process (``config/dev.toml`` with every provider pointed at
emulators that live in *this* test process, so their send counters survive the
daemon) on the session's PostgreSQL, NATS and Redis. Many ``POST /v1/dispatches``
are in flight when the daemon is SIGKILLed; it is started again on the same
database and every key is retried. Then:

* every key has exactly one dispatch row, and every answer (before the kill and
  after) names that row -- a retry is never answered with an id that does not exist;
* a key acknowledged before the kill is answered 200 with the same id after it;
* every key is sent exactly once across all providers (the emulators count sends
  per idempotency key), the ones left ``queued`` by the crash by the backlog task.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import trio

from config import default_path
from providers.bridge import run
from providers.services import ENV_NATS_URL, ENV_POSTGRES_URL, ENV_REDIS_URL
from supervisors.demo import DEMO_TENANT_ID
from supervisors.emulated import Emulated, open_emulators
from tests.supervisors.test_daemon import DEV_TEXT, REPO, Lines, dev_config

KEYS = 400  # dispatches posted before the kill
IN_FLIGHT = 48  # concurrent requests (the client's connection pool)
#: Tries of a retried request whose connection dropped unanswered (same key each time).
RETRIES = 5
KILL_AFTER = 150  # acknowledgements seen before the SIGKILL
START_S = 30.0
SETTLE_S = 25.0

#: The fast resume of what a crash left queued (config, like every number).
FAST_RESUME: Mapping[str, float] = {
    "requeue_after_s": 1.0,
    "resume_interval_s": 0.5,
    "resume_lease_s": 2.0,
}


def _config_text(
    emulated: Emulated,
    tmp_path: Path,
    *,
    dispatch: Mapping[str, float] = FAST_RESUME,
    extra: str = "",
) -> str:
    """An overlay on dev.toml: the emulators off, every provider at this process's
    emulators, ``dispatch`` as its ``[dispatch]`` keys, and ``extra`` (more tables)."""
    e = emulated.endpoints
    account = tmp_path / "fcm.json"
    account.write_bytes(json.dumps({
        "project_id": e.fcm_account.project_id, "client_email": e.fcm_account.client_email,
        "private_key": e.fcm_account.private_key, "token_uri": e.fcm_account.token_uri,
        "private_key_id": e.fcm_account.private_key_id,
    }).encode())  # fmt: skip
    apns_key = tmp_path / "apns.p8"
    apns_key.write_text(e.apns_private_key)
    dev = tmp_path / "dev.toml"
    dev.write_text(DEV_TEXT)
    q = json.dumps
    dispatch_keys = "\n".join(f"{key} = {value!r}" for key, value in dispatch.items())
    # The videobridges too, each at its emulator (the nodes of [jitsi], rows 4 and 14).
    bridges = "".join(
        f"\n[[jitsi.nodes]]\nname = {q(name)}\nurl = {q(url)}\n" for name, url in e.jitsi_nodes
    )
    return f"""extends = {q(str(dev))}
catalog = {q(str(default_path("failures.toml")))}

[daemon]
port = 0
log_level = "info"

[dispatch]
{dispatch_keys}

[emulators]
enabled = false

[providers.ghasi]
base_url = {q(e.ghasi_url)}

[providers.twilio]
base_url = {q(e.twilio_url)}

[providers.fcm]
base_url = {q(e.fcm_url)}
service_account_file = {q(str(account))}

[providers.apns]
base_url = {q(e.apns_url)}
key_file = {q(str(apns_key))}

[providers.smtp]
host = {q(e.smtp_host)}
port = {e.smtp_port}
{bridges}{extra}"""


def _env(emulated: Emulated, postgres_url: str, nats_url: str, redis_url: str) -> dict[str, str]:
    e = emulated.endpoints
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        ENV_POSTGRES_URL: postgres_url,
        ENV_NATS_URL: nats_url,
        ENV_REDIS_URL: redis_url,
        "TRIAGE_GHASI_API_KEY": e.ghasi_api_key,
        "TRIAGE_GHASI_RECEIPT_SECRET": e.ghasi_receipt_secret,
        "TRIAGE_TWILIO_AUTH_TOKEN": e.twilio_auth_token,
        "TRIAGE_SMTP_BOUNCE_SECRET": e.smtp_bounce_secret,
        "TRIAGE_UPLOAD_SIGNING_SECRET": "u" * 40,  # [uploads]: the pre-signed URLs' key
    }


@dataclass
class Running:
    process: trio.Process
    url: str
    lines: Lines


@asynccontextmanager
async def daemon_process(
    config: Path, env: dict[str, str], emulated: Emulated
) -> AsyncIterator[Running]:
    """``triage run`` as a process, ready; killed (SIGKILL) when the block exits."""
    command = [sys.executable, "-m", "supervisors.cli", "run", "--config", str(config)]
    lines = Lines()
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process, command, cwd=REPO, env=env, check=False,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
        )  # fmt: skip
        assert process.stderr is not None
        nursery.start_soon(lines.read, process.stderr)
        try:
            with trio.fail_after(START_S):
                listening = await lines.wait_for(lambda e: e["msg"] == "http listening")
                url = f"http://127.0.0.1:{listening['port']}"
                emulated.point_receipts_at(url)
                async with httpx.AsyncClient(base_url=url) as client:
                    while True:
                        try:
                            ready = (await client.get("/readyz")).status_code == 200
                        except httpx.TransportError:
                            ready = False
                        if ready:
                            break
                        await trio.sleep(0.05)
            yield Running(process, url, lines)
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGKILL)
            with trio.move_on_after(10):
                await process.wait()
            log = config.with_name(f"daemon-{process.pid}.log")
            log.write_text("\n".join(lines.lines))  # for the reader of a failure


def body(n: int) -> dict[str, Any]:
    return {
        "tenant_id": str(DEMO_TENANT_ID),
        "channel": "sms",
        "template": "reminder",
        "recipient": f"+1555{n:07d}",
        "data": {"time": "10:30"},
    }


async def _rows_async(url: str) -> dict[str, list[str]]:
    conn = await asyncpg.connect(url)
    try:
        records = await conn.fetch("SELECT idempotency_key, id::text AS id FROM dispatches")
    finally:
        await conn.close()
    out: dict[str, list[str]] = {}
    for record in records:
        out.setdefault(record["idempotency_key"], []).append(record["id"])
    return out


# httpx's request bodies cut short by the kill are collected unexhausted: not our code.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*ByteStream:pytest.PytestUnraisableExceptionWarning"
)
async def test_a_sigkill_mid_accept_loses_no_acknowledged_dispatch(
    tmp_path: Path,
    postgres_url: str,
    nats_url: str,
    redis_url: str,
    bridge: asyncio.AbstractEventLoop,
) -> None:
    keys = [f"crash-{n}-{uuid.uuid4().hex[:8]}" for n in range(KEYS)]
    acked: dict[str, str] = {}  # key -> dispatch id answered before the kill
    async with open_emulators(dev_config()) as emulated:
        config = tmp_path / "triage.toml"
        config.write_text(_config_text(emulated, tmp_path))
        env = _env(emulated, postgres_url, nats_url, redis_url)

        async with daemon_process(config, env, emulated) as first:
            enough = trio.Event()
            limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
            async with httpx.AsyncClient(base_url=first.url, limits=limits, timeout=20) as client:

                async def post(n: int) -> None:
                    try:
                        answer = await client.post(
                            "/v1/dispatches", json=body(n), headers={"Idempotency-Key": keys[n]}
                        )
                    except httpx.TransportError:
                        return  # the daemon died under it: unacknowledged, retried below
                    assert answer.status_code in (200, 202), answer.text
                    acked[keys[n]] = answer.json()["dispatch_id"]
                    if len(acked) >= KILL_AFTER:
                        enough.set()

                async with trio.open_nursery() as nursery:
                    for n in range(KEYS):
                        nursery.start_soon(post, n)
                    with trio.fail_after(START_S):
                        await enough.wait()
                    first.process.send_signal(signal.SIGKILL)  # many requests still in flight
            with trio.fail_after(10):
                await first.process.wait()
        assert KILL_AFTER <= len(acked) < KEYS, "the kill must land mid-accept"

        async with daemon_process(config, env, emulated) as second:  # same database
            answered: dict[str, str] = {}
            async with httpx.AsyncClient(base_url=second.url, limits=limits, timeout=20) as client:

                async def retry(n: int) -> None:
                    for _ in range(RETRIES):  # a client retries a request left unanswered
                        try:
                            answer = await client.post(
                                "/v1/dispatches", json=body(n), headers={"Idempotency-Key": keys[n]}
                            )
                            break
                        except httpx.TransportError:
                            await trio.sleep(0.2)
                    else:
                        raise AssertionError(f"key {keys[n]}: no answer in {RETRIES} tries")
                    assert answer.status_code in (200, 202), answer.text
                    if keys[n] in acked:
                        assert answer.status_code == 200, answer.text
                    answered[keys[n]] = answer.json()["dispatch_id"]

                async with trio.open_nursery() as nursery:
                    for n in range(KEYS):
                        nursery.start_soon(retry, n)
                metrics = (await client.get("/metrics")).text

            rows: dict[str, list[str]] = await run(_rows_async, postgres_url, service="postgres")
            assert {k: len(v) for k, v in rows.items()} == dict.fromkeys(keys, 1)
            assert {k: rows[k][0] for k in keys} == answered  # every answer names its row
            assert {k: answered[k] for k in acked} == acked  # same id before and after the kill
            hits = re.search(r"(?m)^triage_idempotency_cache_hit_ratio_numerator_total (\S+)$",
                             metrics)  # fmt: skip
            assert hits is not None and float(hits.group(1)) > 0  # Redis answered retries

            # Every key sent exactly once, across every provider (the backlog sends
            # what the crash left queued; a send the crash cut short is probed, not resent).
            with trio.move_on_after(SETTLE_S):
                while not all(emulated.received(k) >= 1 for k in keys):  # noqa: ASYNC110 - several emulators, no one event
                    await trio.sleep(0.1)
            await trio.sleep(1.0)  # a duplicate would have had time to arrive
            assert {k: emulated.received(k) for k in keys} == dict.fromkeys(keys, 1)
            assert emulated.duplicates() == 0
