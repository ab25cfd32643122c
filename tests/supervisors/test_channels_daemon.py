"""The channels end to end in the real daemon: dev.toml, the backbone, the emulators.

One daemon per test (``config/dev.toml`` with port 0, the session's PostgreSQL and
NATS through ``env``, the loopback provider emulators, the demo tenant seeded):
dispatches through ``POST /v1/dispatches``, the NATS command subject and
``triage send`` reach the providers once and end delivered / dispatched; the
webhooks refuse garbage, forgeries, unknown providers and oversize bodies with
their typed 4xx and change nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
import trio

from actors.answers import STATUS_HEADER
from providers import jetstream
from providers.bridge import run
from providers.ghasi import ghasi_signature
from supervisors import cli_send
from supervisors.daemon import Daemon
from supervisors.demo import DEMO_TENANT_ID
from supervisors.emulated import Emulated
from tests.supervisors.test_daemon import dev_config, shipped_catalog, start
from tests.supervisors.test_daemon_services import service_env

START_S = 30.0  # the daemon's start (migrations, emulators)
SETTLE_S = 10.0  # a dispatch reaching its final status
APNS_TOKEN = "ab" * 32  # APNs device tokens are hex
APPLIED = re.compile(r"(?m)^triage_dlr_receipts_applied_total (\S+)$")


@dataclass
class Live:
    daemon: Daemon
    emulated: Emulated
    client: httpx.AsyncClient
    url: str
    owner_url: str


@contextlib.asynccontextmanager
async def live_daemon(postgres_url: str, nats_url: str) -> AsyncIterator[Live]:
    daemon = Daemon(
        dev_config(),
        shipped_catalog(),
        handle_signals=False,
        backbone=True,
        env=service_env(postgres_url, nats_url),
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_S):
            running = await start(nursery, daemon)
        assert daemon.emulated is not None
        async with httpx.AsyncClient(base_url=running.url, timeout=10.0) as client:
            yield Live(daemon, daemon.emulated, client, running.url, postgres_url)
        daemon.request_drain("test over")


def body(channel: str, template: str, recipient: str) -> dict[str, Any]:
    return {
        "tenant_id": str(DEMO_TENANT_ID),
        "channel": channel,
        "template": template,
        "recipient": recipient,
        "data": {"time": "10:30"},
    }


async def _rows_async(url: str, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    conn = await asyncpg.connect(url)
    try:
        records = await conn.fetch(
            "SELECT id::text AS id, status, provider FROM dispatches WHERE id = ANY($1::uuid[])",
            ids,
        )
        return {r["id"]: (r["status"], r["provider"]) for r in records}
    finally:
        await conn.close()


async def rows(live: Live, ids: Iterable[str]) -> dict[str, tuple[str, str | None]]:
    result: dict[str, tuple[str, str | None]] = await run(
        _rows_async, live.owner_url, list(ids), service="postgres"
    )
    return result


async def settled(live: Live, wanted: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    """Wait until every dispatch id has its wanted status; the rows then (or at the deadline)."""
    with trio.move_on_after(SETTLE_S):
        while True:
            found = await rows(live, wanted)
            if all(found.get(i, ("",))[0] == status for i, status in wanted.items()):
                return found
            await trio.sleep(0.05)
    return await rows(live, wanted)


async def applied(live: Live) -> float:
    text = (await live.client.get("/metrics")).text
    match = APPLIED.search(text)
    return float(match.group(1)) if match else 0.0


async def test_dispatches_through_every_door_are_sent_once_and_settle(
    postgres_url: str,
    nats_url: str,
    bridge: asyncio.AbstractEventLoop,
    capsys: pytest.CaptureFixture[str],
) -> None:
    async with live_daemon(postgres_url, nats_url) as live:
        # (a) POST /v1/dispatches: sms, push (fcm and apns), email.
        sends = {
            "sms": body("sms", "reminder", "+15550100001"),
            "fcm": body("push", "push_reminder", "fcm:device-token-1"),
            "apns": body("push", "push_reminder", f"apns:{APNS_TOKEN}"),
            "smtp": body("email", "email_reminder", "pat@example.org"),
        }
        keys = {name: uuid.uuid4().hex for name in sends}
        ids: dict[str, str] = {}
        for name, payload in sends.items():
            answer = await live.client.post(
                "/v1/dispatches", json=payload, headers={"Idempotency-Key": keys[name]}
            )
            assert answer.status_code == 202, answer.text
            ids[name] = answer.json()["dispatch_id"]
        wanted = {ids["sms"]: "delivered", ids["fcm"]: "delivered", ids["apns"]: "delivered"}
        wanted[ids["smtp"]] = "dispatched"
        found = await settled(live, wanted)
        assert found == {
            ids["sms"]: ("delivered", "ghasi"),
            ids["fcm"]: ("delivered", "fcm"),
            ids["apns"]: ("delivered", "apns"),
            ids["smtp"]: ("dispatched", "smtp"),
        }
        # The same key again: 200, the same dispatch, nothing sent twice.
        again = await live.client.post(
            "/v1/dispatches", json=sends["sms"], headers={"Idempotency-Key": keys["sms"]}
        )
        assert again.status_code == 200, again.text
        assert again.json()["dispatch_id"] == ids["sms"]
        assert {name: live.emulated.received(key) for name, key in keys.items()} == dict.fromkeys(
            keys, 1
        )
        assert live.emulated.duplicates() == 0

        # (b) the NATS command subject, request/reply.
        client = await run(jetstream.connect, nats_url)
        try:
            command_key = uuid.uuid4().hex
            command = {**body("sms", "reminder", "+15550100002"), "idempotency_key": command_key}
            reply = await run(
                partial(
                    client.nc.request,
                    live.daemon.config.dispatch.nats_subject,
                    msgspec.json.encode(command),
                    timeout=5.0,
                ),
                service="nats",
            )
        finally:
            await run(jetstream.close, client)
        assert int((reply.headers or {})[STATUS_HEADER]) == 202
        by_nats = msgspec.json.decode(reply.data)["dispatch_id"]
        assert await settled(live, {by_nats: "delivered"}) == {by_nats: ("delivered", "ghasi")}
        assert live.emulated.received(command_key) == 1

        # (d) `triage send` against the running daemon.
        parser = argparse.ArgumentParser(prog="triage")
        cli_send.add_parser(parser.add_subparsers(dest="command"))
        cli_key = uuid.uuid4().hex
        args = parser.parse_args(
            ["send", "--url", live.url, "--channel", "sms", "--to", "+15550100003",
             "--template", "reminder", "--data", "time=10:30", "--idempotency-key", cli_key,
             "--json"]
        )  # fmt: skip
        capsys.readouterr()
        code = await trio.to_thread.run_sync(cli_send.send, args)
        printed = capsys.readouterr().out
        assert code == 0, printed
        answer = json.loads(printed.strip().splitlines()[-1])
        assert answer["status_code"] == 202 and answer["idempotency_key"] == cli_key
        by_cli = answer["answer"]["dispatch_id"]
        assert by_cli in printed
        assert await settled(live, {by_cli: "delivered"}) == {by_cli: ("delivered", "ghasi")}
        assert live.emulated.received(cli_key) == 1
        assert live.emulated.duplicates() == 0


async def test_webhooks_refuse_bad_callbacks_with_typed_4xx_and_change_nothing(
    postgres_url: str, nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    async with live_daemon(postgres_url, nats_url) as live:
        key = uuid.uuid4().hex
        answer = await live.client.post(
            "/v1/dispatches",
            json=body("sms", "reminder", "+15550100009"),
            headers={"Idempotency-Key": key},
        )
        assert answer.status_code == 202, answer.text
        dispatch_id = answer.json()["dispatch_id"]
        before = await settled(live, {dispatch_id: "delivered"})
        assert before == {dispatch_id: ("delivered", "ghasi")}
        applied_before = await applied(live)
        assert applied_before >= 1

        ghasi = live.emulated.ghasi
        wire = ghasi.wire
        [message] = [m for m in ghasi.by_provider_ref.values() if m.idempotency_key == key]
        genuine = ghasi.receipt_for(message, "failed")
        assert genuine is not None
        secret = live.emulated.endpoints.ghasi_receipt_secret
        stamp = str(int(time.time()))
        garbage = b"\x00{not json"
        signed_garbage = {
            "content-type": "application/json",
            wire.timestamp_header: stamp,
            wire.signature_header: ghasi_signature(secret, stamp, garbage),
        }
        forged = {**genuine.headers, wire.signature_header: "0" * 64}
        dlr, bounces = "/webhooks/dlr/", "/webhooks/bounces/"
        cap = live.daemon.config.dlr.max_body_bytes
        cases = [
            ("garbage body", dlr + "ghasi", garbage, signed_garbage, 400, "malformed_receipt"),
            ("bad signature", dlr + "ghasi", genuine.content, forged, 401, "bad_signature"),
            ("unknown provider", dlr + "nexmo", genuine.content, dict(genuine.headers), 404,
             "unknown_provider"),
            ("oversize body", bounces + "smtp", b"x" * (cap + 1), {"content-type": "message/rfc822"},
             413, "payload_too_large"),
        ]  # fmt: skip
        for what, path, content, headers, status, code in cases:
            refused = await live.client.post(path, content=content, headers=headers)
            assert (refused.status_code, refused.json()["error"]) == (status, code), what
        assert await rows(live, [dispatch_id]) == before
        assert await applied(live) == applied_before
        # The genuine receipt still goes through (the refusals left the ingress working).
        accepted = await live.client.post(
            dlr + "ghasi", content=genuine.content, headers=dict(genuine.headers)
        )
        assert accepted.status_code == 200, accepted.text
        assert await applied(live) == applied_before + 1
