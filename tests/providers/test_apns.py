"""The APNs adapter against the loopback APNs emulator, over real HTTP/2 (h2c)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import jwt
import pytest

from engine.errors import (
    AuthFailed,
    ConfigError,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    Rejected,
)
from providers.apns import ApnsAdapter, apns_client
from providers.channel import Adapter, ChannelName, Message, RecipientGone
from providers.emulators.base import EmulatorServer, serve_emulator
from providers.emulators.push import ApnsEmulator, generate_apns_key

TIMEOUT_S = 0.5
T0 = 1_800_000_000.0
TEAM = "TEAM123456"
KID = "KEY1234567"
TOPIC = "org.triage.patient"
REFRESH_S = 1800.0
EXPIRATION_S = 86400.0
DEVICE = "ab" * 32
TLS = httpx.create_ssl_context()  # one CA bundle load for the module, not one per client


class FakeWall:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def keys() -> tuple[str, str, str]:
    """(private PEM, public PEM, another private PEM)."""
    private_pem, public_pem = generate_apns_key()
    other, _ = generate_apns_key()
    return private_pem, public_pem, other


@dataclass
class Rig:
    emulator: ApnsEmulator
    server: EmulatorServer
    wall: FakeWall
    adapters: list[ApnsAdapter]

    def adapter(
        self, private_pem: str, *, key_id: str = KID, client: httpx.AsyncClient | None = None
    ) -> ApnsAdapter:
        adapter = ApnsAdapter(
            "apns",
            client=client or apns_client(timeout_s=TIMEOUT_S, tls=TLS),
            team_id=TEAM,
            key_id=key_id,
            private_key=private_pem,
            topic=TOPIC,
            token_refresh_s=REFRESH_S,
            expiration_s=EXPIRATION_S,
            priority=5,
            base_url=self.server.url,
            now=self.wall,
        )
        self.adapters.append(adapter)
        return adapter


@asynccontextmanager
async def rig(keys: tuple[str, str, str], **emulator_knobs: float) -> AsyncIterator[Rig]:
    wall = FakeWall()
    emulator = ApnsEmulator(
        keys={KID: (TEAM, keys[1])},
        topics=frozenset({TOPIC}),
        auto_receipts=False,
        clock=wall,
        **emulator_knobs,  # type: ignore[arg-type]  # float knobs only
    )
    async with serve_emulator(emulator) as server:
        r = Rig(emulator, server, wall, [])
        try:
            yield r
        finally:
            for adapter in r.adapters:
                await adapter.aclose()


def message(
    n: int = 1, *, recipient: str = f"apns:{DEVICE}", client_ref: str | None = None
) -> Message:
    return Message(
        client_ref=client_ref or str(uuid.uuid4()),
        tenant_id="clinic-a",
        idempotency_key=f"key-{n}",
        channel=ChannelName.PUSH,
        recipient=recipient,
        body="Your appointment is tomorrow at 9:00",
        subject="Reminder",
        data={"kind": "reminder"},
    )


async def test_send_over_http2_is_accepted_with_the_dispatch_id_as_apns_id(
    keys: tuple[str, str, str],
) -> None:
    async with rig(keys) as r:
        adapter = r.adapter(keys[0])
        assert isinstance(adapter, Adapter)
        msg = message()
        accepted = await adapter.send(msg)
        assert accepted.provider == "apns"
        assert accepted.provider_ref == msg.client_ref
        assert adapter.last_http_version == "HTTP/2"
        assert r.emulator.http_versions == {"2": 1}
        stored = r.emulator.messages[msg.reference]
        assert stored.provider_ref == msg.client_ref
        assert stored.idempotency_key == "key-1"
        assert stored.recipient == DEVICE
        assert stored.body == msg.body
        assert stored.fields == {
            "topic": TOPIC,
            "push_type": "alert",
            "priority": "5",
            "expiration": str(int(T0 + EXPIRATION_S)),
        }
        assert r.emulator.accepted == {"key-1": 1}
        assert await adapter.status(msg) is None


async def test_the_wire_is_http2_and_http1_is_refused(keys: tuple[str, str, str]) -> None:
    async with rig(keys) as r:
        adapter = r.adapter(keys[0])
        url = f"{r.server.url}/3/device/{DEVICE}"
        body = b'{"aps": {"alert": "hi"}, "triage": {"ref": "t:1", "key": "k"}}'
        headers = {"authorization": f"bearer {adapter.provider_token()}", "apns-topic": TOPIC}
        async with apns_client(timeout_s=TIMEOUT_S) as h2:
            response = await h2.post(url, content=body, headers=headers)
        assert response.http_version == "HTTP/2"
        assert response.status_code == 200
        uuid.UUID(response.headers["apns-id"])  # generated when the client sent none
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as h1:
            refused = await h1.post(url, content=body, headers=headers)
        assert refused.http_version == "HTTP/1.1"
        assert refused.status_code == 505
        assert r.emulator.accepted == {"k": 1}


async def test_a_non_uuid_dispatch_id_gets_the_apns_id_apple_generates(
    keys: tuple[str, str, str],
) -> None:
    async with rig(keys) as r:
        msg = message(client_ref="dispatch-42")
        accepted = await r.adapter(keys[0]).send(msg)
        assert str(uuid.UUID(accepted.provider_ref)) == accepted.provider_ref
        assert r.emulator.messages[msg.reference].provider_ref == accepted.provider_ref


async def test_provider_token_is_es256_reused_and_regenerated(keys: tuple[str, str, str]) -> None:
    async with rig(keys) as r:
        adapter = r.adapter(keys[0])
        first = adapter.provider_token()
        assert jwt.get_unverified_header(first) == {"alg": "ES256", "kid": KID, "typ": "JWT"}
        claims = jwt.decode(first, keys[1], algorithms=["ES256"], options={"verify_iat": False})
        assert claims == {"iss": TEAM, "iat": int(T0)}
        await adapter.send(message(1))
        r.wall.t = T0 + REFRESH_S - 1
        await adapter.send(message(2))
        assert adapter.provider_token() == first
        assert adapter.tokens_signed == 1
        r.wall.t = T0 + REFRESH_S
        await adapter.send(message(3))
        assert adapter.tokens_signed == 2
        assert adapter.provider_token() != first
        assert r.emulator.accepted == {"key-1": 1, "key-2": 1, "key-3": 1}


async def test_an_expired_provider_token_is_auth_failed_then_replaced(
    keys: tuple[str, str, str],
) -> None:
    async with rig(keys, token_max_age_s=600.0) as r:
        adapter = r.adapter(keys[0])
        await adapter.send(message(1))
        r.wall.t = T0 + 601
        with pytest.raises(AuthFailed, match="ExpiredProviderToken"):
            await adapter.send(message(2))
        assert adapter.tokens_signed == 1  # no retry inside the adapter
        await adapter.send(message(2))
        assert adapter.tokens_signed == 2
        assert r.emulator.accepted == {"key-1": 1, "key-2": 1}


async def test_a_token_signed_with_the_wrong_key_is_auth_failed(
    keys: tuple[str, str, str],
) -> None:
    async with rig(keys) as r:
        with pytest.raises(AuthFailed, match="InvalidProviderToken"):
            await r.adapter(keys[2]).send(message())
        with pytest.raises(AuthFailed, match="InvalidProviderToken"):
            await r.adapter(keys[0], key_id="UNKNOWNKID").send(message())
        assert not r.emulator.requests


async def test_unregistered_and_bad_device_tokens_are_recipient_gone(
    keys: tuple[str, str, str],
) -> None:
    async with rig(keys) as r:
        adapter = r.adapter(keys[0])
        r.emulator.unregister(DEVICE)
        with pytest.raises(RecipientGone) as gone:
            await adapter.send(message())
        assert (gone.value.recipient, gone.value.reason) == (f"apns:{DEVICE}", "Unregistered")
        with pytest.raises(RecipientGone) as bad:
            await adapter.send(message(recipient="apns:not-hex"))
        assert bad.value.reason == "BadDeviceToken"
        assert not r.emulator.accepted


@pytest.mark.parametrize(
    ("status", "error", "reason"),
    [
        (400, Rejected, "BadTopic"),
        (410, RecipientGone, "Unregistered"),
        (413, Rejected, "PayloadTooLarge"),
        (403, AuthFailed, "InvalidProviderToken"),
        (429, RateLimited, "TooManyRequests"),
        (500, ProviderUnavailable, "InternalServerError"),
        (503, ProviderUnavailable, "ServiceUnavailable"),
    ],
)
async def test_apns_reasons_map_onto_the_tree(
    keys: tuple[str, str, str], status: int, error: type[ProviderError], reason: str
) -> None:
    async with rig(keys) as r:
        adapter = r.adapter(keys[0])
        r.emulator.set_faults(status=status)
        with pytest.raises(error) as caught:
            await adapter.send(message())
        assert type(caught.value) is error
        assert reason in str(caught.value) or getattr(caught.value, "reason", None) == reason
        assert adapter.tokens_signed == 1
        if error is AuthFailed:
            adapter.provider_token()
            assert adapter.tokens_signed == 2  # the refused token was dropped


async def test_rate_limit_with_retry_after(keys: tuple[str, str, str]) -> None:
    async with rig(keys) as r:
        adapter = r.adapter(keys[0])
        r.emulator.set_faults(rate_limit_per_s=0.001, retry_after_s=3)
        await adapter.send(message(1))
        with pytest.raises(RateLimited) as caught:
            await adapter.send(message(2))
        assert caught.value.retry_after_s == 3.0


async def test_silence_resets_and_a_dead_port(keys: tuple[str, str, str]) -> None:
    async with rig(keys) as r:
        adapter = r.adapter(keys[0])
        r.emulator.set_faults(hang_before_accept=True)
        with pytest.raises(ProviderTimeout):
            await adapter.send(message(1))
        r.emulator.set_faults(reset_after_accept=True)
        with pytest.raises(ProviderTimeout):
            await adapter.send(message(2))
        r.emulator.clear_faults()
        await adapter.send(message(3))  # a fresh HTTP/2 connection
        assert r.emulator.accepted == {"key-2": 1, "key-3": 1}
        await r.server.go_down()
        # The pooled HTTP/2 connection is dead but httpcore does not know yet: the first
        # send finds out (a failed write, or a hang-up while reading); then refused.
        with pytest.raises((ProviderUnavailable, ProviderTimeout)):
            await adapter.send(message(4))
        with pytest.raises(ProviderUnavailable, match="not delivered"):
            await adapter.send(message(4))
        with pytest.raises(ProviderUnavailable, match="not delivered"):
            await r.adapter(keys[0]).send(message(4))


async def test_bad_recipients_are_rejected_before_any_request(keys: tuple[str, str, str]) -> None:
    async with rig(keys) as r:
        adapter = r.adapter(keys[0])
        for recipient in ("fcm:abcd", DEVICE, "apns:", "apns:ab/../cd"):
            with pytest.raises(Rejected):
                await adapter.send(message(recipient=recipient))
        assert not r.emulator.requests


def test_bad_configuration_is_a_config_error(keys: tuple[str, str, str]) -> None:
    def make(**overrides: object) -> ApnsAdapter:
        knobs: dict[str, object] = {
            "client": httpx.AsyncClient(),
            "team_id": TEAM,
            "key_id": KID,
            "private_key": keys[0],
            "topic": TOPIC,
            "token_refresh_s": REFRESH_S,
            "expiration_s": 0.0,
        }
        knobs.update(overrides)
        return ApnsAdapter("apns", **knobs)  # type: ignore[arg-type]  # knobs typed loosely

    with pytest.raises(ConfigError, match="token_refresh_s"):
        make(token_refresh_s=3600.0)
    with pytest.raises(ConfigError, match="expiration_s"):
        make(expiration_s=-1.0)
    with pytest.raises(ConfigError, match="PEM"):
        make(private_key="nope")
    with pytest.raises(ConfigError, match="priority"):
        make(priority=7)
