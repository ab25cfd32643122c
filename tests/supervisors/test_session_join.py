"""Joining a visit: a scheduling event becomes a session, the Jitsi pool places it, and
``POST /v1/virtual-sessions/{id}/join`` answers a join token for the placed room.

Against the daemon in process (dev.toml: the videobridge emulators, its key ring)
on the session's PostgreSQL and NATS; the refusals (not found for another tenant,
not placed yet, failed with its fallback thread) at the app with a lookup of the
same shape.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import asyncpg
import httpx
import jwt
import pytest
import trio

from actors.inbox import consumer_settings
from providers import jetstream
from providers.db.virtual_sessions import JoinTarget
from providers.jetstream import PublishItem
from supervisors.daemon import Daemon
from supervisors.join_tokens import VirtualSessionsApi
from tests.supervisors.test_daemon import dev_config, shipped_catalog, start
from tests.supervisors.test_daemon_services import service_env

USER = {"id": "patient-7", "name": "Pat", "moderator": False}


async def _tenant(_pool: object, owner_url: str) -> uuid.UUID:
    conn = await asyncpg.connect(owner_url)
    try:
        tenant: uuid.UUID = await conn.fetchval(
            "INSERT INTO tenants (name) VALUES ($1) RETURNING id", f"visits-{uuid.uuid4()}"
        )
        return tenant
    finally:
        await conn.close()


async def _publish(
    _pool: object, client: jetstream.JetStreamClient, subject: str, body: dict[str, Any]
) -> list[object]:
    item = PublishItem(body["appointment_id"], subject, json.dumps(body).encode())
    return list(await jetstream.publish_batch(client, [item], 5.0))


async def _session(_pool: object, owner_url: str, appointment: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(owner_url)
    try:
        return await conn.fetchrow(
            "SELECT id, state, node, room FROM virtual_sessions WHERE appointment_id = $1",
            appointment,
        )
    finally:
        await conn.close()


async def test_a_placed_visit_is_joined_with_a_token_for_its_room(
    postgres_url: str, nats_url: str
) -> None:
    config = dev_config()
    daemon = Daemon(
        config, shipped_catalog(), handle_signals=False, backbone=True,
        env=service_env(postgres_url, nats_url),
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            running = await start(nursery, daemon)
        backbone = daemon.backbone
        assert backbone is not None
        pool = backbone.pool
        tenant = await pool.run_unit(_tenant, postgres_url)
        other = await pool.run_unit(_tenant, postgres_url)
        subject = consumer_settings(config.inbox).subjects[0].replace(">", "appointment")
        event = {
            "tenant_id": str(tenant), "appointment_id": "appt-42", "kind": "appointment.booked",
            "patient_id": "patient-7", "starts_at": dt.datetime.now(dt.UTC).isoformat(),
        }  # fmt: skip
        await pool.run_unit(_publish, backbone.nats, subject, event)
        row = None
        with trio.fail_after(20):  # the inbox makes the session, the pool places it
            while row is None or row["state"] != "placed":
                await trio.sleep(0.1)
                row = await pool.run_unit(_session, postgres_url, "appt-42")
        session_id = row["id"]
        async with httpx.AsyncClient(base_url=running.url) as client:
            joined = await client.post(
                f"/v1/virtual-sessions/{session_id}/join",
                json={"tenant_id": str(tenant), "user": USER},
            )
            assert joined.status_code == 201, joined.text
            answer = joined.json()
            # The token is for the room the pool placed the visit in, on its node.
            assert (answer["room"], answer["node"]) == (row["room"], row["node"])
            assert (answer["session_id"], answer["appointment_id"]) == (str(session_id), "appt-42")
            claims = jwt.decode(answer["token"], options={"verify_signature": False})
            assert claims["room"] == row["room"] and claims["context"]["user"]["id"] == "patient-7"
            # ... which the key ring verifies for that room, and refuses for another.
            verified = await client.post(
                "/v1/join-tokens/verify", json={"token": answer["token"], "room": row["room"]}
            )
            assert verified.status_code == 200, verified.text
            elsewhere = await client.post(
                "/v1/join-tokens/verify", json={"token": answer["token"], "room": "other-room"}
            )
            assert elsewhere.json()["error"] == "wrong_room"
            # Another tenant does not see the session (RLS): 404, no token.
            foreign = await client.post(
                f"/v1/virtual-sessions/{session_id}/join",
                json={"tenant_id": str(other), "user": USER},
            )
            assert (foreign.status_code, foreign.json()["error"]) == (404, "session_not_found")
            garbage = await client.post(
                f"/v1/virtual-sessions/{session_id}/join", content=b"{not json"
            )
            assert (garbage.status_code, garbage.json()["error"]) == (400, "invalid_request")
            # Booked over HTTP: the appointment the inbox already made answers its session...
            again = await client.post(
                "/v1/virtual-sessions",
                json={"tenant_id": str(tenant), "appointment_id": "appt-42"},
            )
            assert (again.status_code, again.json()) == (
                200, {"session_id": str(session_id), "state": "placed", "created": False},
            )  # fmt: skip
            # ... a new one is made pending, placed by the pool, and joined.
            booked = await client.post(
                "/v1/virtual-sessions",
                json={"tenant_id": str(tenant), "appointment_id": "appt-43",
                      "patient_id": "patient-8"},
            )  # fmt: skip
            assert booked.status_code == 201 and booked.json()["created"] is True
            fresh = booked.json()["session_id"]
            with trio.fail_after(20):
                while True:
                    joined = await client.post(
                        f"/v1/virtual-sessions/{fresh}/join",
                        json={"tenant_id": str(tenant), "user": USER},
                    )
                    if joined.status_code != 409:
                        break
                    assert joined.json()["error"] == "session_not_placed"
                    await trio.sleep(0.1)
            assert joined.status_code == 201 and joined.json()["appointment_id"] == "appt-43"
            nobody = await client.post(
                "/v1/virtual-sessions",
                json={"tenant_id": str(uuid.uuid4()), "appointment_id": "appt-44"},
            )
            assert (nobody.status_code, nobody.json()["error"]) == (404, "tenant_not_found")
        nursery.cancel_scope.cancel()


class _Tokens:
    """Counts issues: a refused join must never reach the key ring."""

    def __init__(self) -> None:
        self.issued = 0

    async def issue(self, **_: Any) -> Any:
        self.issued += 1
        raise AssertionError("a refused join was issued a token")


def _app(target: JoinTarget | None, tokens: _Tokens) -> httpx.AsyncClient:
    async def lookup(_tenant: uuid.UUID, _session: uuid.UUID) -> JoinTarget | None:
        await trio.lowlevel.checkpoint()
        return target

    app = VirtualSessionsApi(
        tokens,  # type: ignore[arg-type]  # the same issue() shape as JoinTokens
        lookup, max_body_bytes=512, retry_after_s=1.5,
    )  # fmt: skip
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://triage")


SESSION = uuid.UUID("0d9c7c36-6c1b-4c1f-9c55-59d5e2b5a0b1")
TENANT = "5b1f3c52-6f55-4a35-9f3e-0c2c1d1e7a10"


@pytest.mark.parametrize(
    ("state", "thread", "error"),
    [("pending", None, "session_not_placed"), ("failed", uuid.uuid4(), "session_failed")],
)
async def test_a_visit_without_a_room_is_refused_with_its_state(
    state: str, thread: uuid.UUID | None, error: str
) -> None:
    tokens = _Tokens()
    target = JoinTarget(
        id=SESSION, appointment_id="a", state=state, room=None, node=None,
        fallback_thread_id=thread,
    )  # fmt: skip
    async with _app(target, tokens) as client:
        answer = await client.post(
            f"/v1/virtual-sessions/{SESSION}/join", json={"tenant_id": TENANT, "user": USER}
        )
    assert answer.status_code == 409 and answer.json()["error"] == error
    assert answer.headers["retry-after"] == "2"
    assert answer.json().get("fallback_thread_id") == (None if thread is None else str(thread))
    assert tokens.issued == 0


async def test_bad_join_requests_name_the_problem() -> None:
    tokens = _Tokens()
    async with _app(None, tokens) as client:
        url = f"/v1/virtual-sessions/{SESSION}/join"
        missing = await client.post(url, json={"tenant_id": TENANT, "user": USER})
        assert (missing.status_code, missing.json()["error"]) == (404, "session_not_found")
        unknown_field = await client.post(
            url, json={"tenant_id": TENANT, "user": USER, "room": "mine"}
        )
        assert unknown_field.status_code == 400 and "room" in unknown_field.json()["message"]
        big = await client.post(url, content=b"x" * 600)
        assert big.status_code == 413
        assert (await client.get(url)).status_code == 405
        assert (
            await client.post("/v1/virtual-sessions/not-a-uuid/join", json={})
        ).status_code == 404
    assert tokens.issued == 0
