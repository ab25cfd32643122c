"""The join-token and recording HTTP doors: issue, verify (401 with the typed reason), register."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import msgspec
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from actors.key_ring import JoinTokens, key_ring_child
from config import ConfigError, default_path, load_config, load_config_text
from config.schema import MailboxConfig, TokensConfig
from engine.clock import Clock
from engine.runtime import open_runtime
from supervisors.join_tokens import JoinTokenApi, token_problems
from supervisors.recordings import recording_problems
from tests.actors.test_key_ring import MemoryStore, inline

TENANT = "5b1f3c52-6f55-4a35-9f3e-0c2c1d1e7a10"
WALL0 = 1_800_000_000.0


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://triage")


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "k1.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    config = TokensConfig(key_dir=str(tmp_path), ttl_s=600.0, nbf_skew_s=30.0, max_body_bytes=2048)
    async with open_runtime() as runtime:
        spec, ref = key_ring_child(
            store=MemoryStore(), config=config, shutdown_s=1.0, offload=inline,
            mailbox=MailboxConfig(capacity=100, overflow="reject"), deadlines=runtime.deadlines,
            clock=Clock(lambda: WALL0),
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            await nursery.start(spec.start)
            api = JoinTokenApi(JoinTokens(ref, timeout_s=2.0), max_body_bytes=2048)
            async with _client(api) as http:
                yield http
            nursery.cancel_scope.cancel()


BODY = {"tenant_id": TENANT, "session_id": "s-1", "room": "visit-1",
        "user": {"id": "patient-1", "name": "Pat", "moderator": False}}  # fmt: skip


async def test_issue_then_verify(client: httpx.AsyncClient) -> None:
    issued = await client.post("/v1/join-tokens", json=BODY)
    assert issued.status_code == 201, issued.text
    answer = issued.json()
    assert (answer["kid"], answer["room"], answer["session_id"]) == ("k1", "visit-1", "s-1")
    assert (answer["nbf"], answer["exp"]) == (WALL0 - 30, WALL0 + 600)
    verified = await client.post(
        "/v1/join-tokens/verify", json={"token": answer["token"], "room": "visit-1"}
    )
    assert verified.status_code == 200
    assert verified.json()["claims"]["jti"] == answer["jti"]
    wrong = await client.post(
        "/v1/join-tokens/verify", json={"token": answer["token"], "room": "visit-2"}
    )
    assert wrong.status_code == 401 and wrong.json()["error"] == "wrong_room"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("garbage", "malformed"),
        (
            jwt.encode({"room": "visit-1"}, "k" * 40, algorithm="HS256", headers={"kid": "nope"}),
            "unknown_kid",
        ),
        ("eyJhbGciOiJub25lIn0.eyJyb29tIjoidmlzaXQtMSJ9.", "algorithm_refused"),
    ],
)
async def test_a_refused_token_is_a_401_with_its_reason(
    client: httpx.AsyncClient, token: str, reason: str
) -> None:
    answer = await client.post("/v1/join-tokens/verify", json={"token": token, "room": "visit-1"})
    assert answer.status_code == 401
    assert answer.json()["error"] == reason


async def test_bad_requests(client: httpx.AsyncClient) -> None:
    assert (await client.post("/v1/join-tokens", content=b"{")).json()["error"] == "invalid_request"
    wildcard = await client.post("/v1/join-tokens", json={**BODY, "room": "*"})
    assert wildcard.status_code == 400  # a wildcard room is never issued
    assert (await client.get("/v1/join-tokens")).status_code == 405
    assert (await client.post("/v1/join-tokens/other", json={})).status_code == 404


def test_check_config_names_a_bad_key_file_and_missing_profiles(tmp_path: Path) -> None:
    (tmp_path / "k1.hs256").write_bytes(b"short")
    shipped = load_config(default_path("default.toml"))
    mailboxes = {k: v for k, v in shipped.mailboxes.items() if k != "key_ring"}
    mailboxes["recordings"] = MailboxConfig(capacity=5, overflow="drop_newest")
    config = msgspec.structs.replace(
        shipped, tokens=TokensConfig(key_dir=str(tmp_path)), mailboxes=mailboxes
    )
    [no_mailbox, bad_key] = sorted(token_problems(config, "x.toml"), key=lambda p: p.path)
    assert bad_key.path == "$.tokens.key_dir" and str(tmp_path / "k1.hs256") in bad_key.message
    assert no_mailbox.path == "$.mailboxes.key_ring"
    [overflow] = recording_problems(config, "x.toml")
    assert overflow.path == "$.mailboxes.recordings.overflow"
    short = msgspec.structs.replace(
        config, recordings=msgspec.structs.replace(config.recordings, lease_s=600.0)
    )
    lease = recording_problems(short, "x.toml")[0]
    assert lease.path == "$.recordings.lease_s" and "time_budget_s = 600.0" in lease.message


def test_the_schema_refuses_an_nbf_skew_past_the_ttl() -> None:
    text = (
        default_path("default.toml").read_text().replace("nbf_skew_s = 30.0", "nbf_skew_s = 7200.0")
    )
    with pytest.raises(ConfigError, match=r"\$\.tokens\.nbf_skew_s: must be below ttl_s"):
        load_config_text(text, source=str(default_path("default.toml")))
