"""The threads API over ASGI, on the thread service and a real PostgreSQL (row 12)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
from prometheus_client import CollectorRegistry

from actors.alerts import ActiveAlerts
from actors.thread_service import METRIC, ThreadService
from config.schema import DatabaseConfig, ThreadsConfig
from providers.bridge import run
from providers.db import DAEMON_ROLE, migrate
from providers.db.pool import open_pool
from providers.services import postgres_url_with
from supervisors.http import HealthApp
from supervisors.threads_api import ThreadsApi
from supervisors.tree import Readiness

DB_CONFIG = DatabaseConfig(pool_min=1, pool_max=2, connect_timeout_s=2.0, command_timeout_s=2.0)
JSON = {"Content-Type": "application/json"}


@dataclass
class World:
    client: httpx.AsyncClient
    registry: CollectorRegistry
    a: str
    b: str


async def _tenants(url: str) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("INSERT INTO tenants (name) VALUES ('a'), ('b') RETURNING id")
        return [str(r["id"]) for r in rows]
    finally:
        await conn.close()


@pytest.fixture
async def world(bridge: object, postgres_url: str) -> AsyncIterator[World]:
    await migrate(postgres_url)
    a, b = await run(_tenants, postgres_url)
    registry = CollectorRegistry()
    async with open_pool(
        postgres_url_with(postgres_url, user=DAEMON_ROLE), DB_CONFIG, close_s=2.0
    ) as db:
        api = ThreadsApi(ThreadService(db, ThreadsConfig(), registry=registry), max_body_bytes=512)
        # Mounted as the daemon mounts it.
        app = HealthApp(
            readiness=Readiness(ActiveAlerts()), registry=registry, mounts={"/v1/threads": api}
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://triage") as client:
            yield World(client, registry, a, b)


async def test_create_join_list_and_refuse_a_cross_tenant_participant(world: World) -> None:
    client, a, b = world.client, world.a, world.b
    created = await client.post("/v1/threads", json={"tenant_id": a, "topic": "visit"})
    assert created.status_code == 201
    thread = created.json()["thread_id"]
    uuid.UUID(thread)
    join = {
        "tenant_id": a,
        "participant": {"tenant_id": a, "participant_id": "p-1", "role": "patient"},
    }
    first = await client.post(f"/v1/threads/{thread}/participants", json=join)
    again = await client.post(f"/v1/threads/{thread}/participants", json=join)
    assert (first.status_code, first.json()) == (201, {"added": True})
    assert (again.status_code, again.json()) == (200, {"added": False})

    intruder = {
        "tenant_id": a,
        "participant": {"tenant_id": b, "participant_id": "p-secret", "role": "staff"},
    }
    refused = await client.post(f"/v1/threads/{thread}/participants", json=intruder)
    assert refused.status_code == 403
    body = refused.json()
    assert body["error"] == "cross_tenant"
    assert a in body["message"] and b in body["message"] and "p-secret" not in body["message"]
    assert world.registry.get_sample_value(METRIC, {"check": "application"}) == 1.0

    listed = await client.get(f"/v1/threads/{thread}/participants", params={"tenant_id": a})
    assert listed.status_code == 200
    assert [(p["participant_id"], p["role"]) for p in listed.json()["participants"]] == [
        ("p-1", "patient")
    ]
    # B cannot see A's thread: not found, and nothing listed.
    foreign = dict(join, tenant_id=b, participant=dict(join["participant"], tenant_id=b))
    hidden = await client.post(f"/v1/threads/{thread}/participants", json=foreign)
    assert (hidden.status_code, hidden.json()["error"]) == (404, "thread_not_found")
    seen_by_b = await client.get(f"/v1/threads/{thread}/participants", params={"tenant_id": b})
    assert seen_by_b.json() == {"participants": []}


@pytest.mark.parametrize(
    ("method", "path", "content", "headers", "status", "code"),
    [
        ("POST", "/v1/threads", b"{", JSON, 400, "invalid_request"),
        ("POST", "/v1/threads", b'{"tenant_id": "x"}', JSON, 400, "invalid_request"),
        (
            "POST",
            "/v1/threads",
            b"{}",
            {"Content-Type": "text/plain"},
            415,
            "unsupported_media_type",
        ),
        ("POST", "/v1/threads", b"{" + b" " * 600 + b"}", JSON, 413, "payload_too_large"),
        ("GET", "/v1/threads", b"", {}, 405, "method_not_allowed"),
        ("POST", "/v1/threads/nope", b"{}", JSON, 404, "not_found"),
        ("GET", f"/v1/threads/{uuid.UUID(int=1)}/participants", b"", {}, 400, "invalid_request"),
    ],
)
async def test_bad_requests_get_typed_answers(
    world: World,
    method: str,
    path: str,
    content: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    answer = await world.client.request(method, path, content=content, headers=headers)
    assert (answer.status_code, answer.json()["error"]) == (status, code)
