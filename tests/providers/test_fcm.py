"""The FCM HTTP v1 adapter against the loopback FCM emulator: OAuth2 token, send, errors."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import jwt
import msgspec
import pytest
import trio

from engine.errors import (
    AuthFailed,
    ConfigError,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    Rejected,
)
from providers.channel import Adapter, ChannelName, Message, RecipientGone
from providers.emulators.base import EmulatorServer, serve_emulator
from providers.emulators.push import FcmEmulator, generate_apns_key, generate_service_account
from providers.fcm import FCM_SCOPE, FcmAdapter, ServiceAccount

TIMEOUT_S = 0.5
T0 = 1_800_000_000.0
PROJECT = "triage-test"
EMAIL = "push@triage-test.iam.gserviceaccount.com"
LIFETIME_S = 3600.0
MARGIN_S = 300.0
TLS = httpx.create_ssl_context()  # one CA bundle load for the module, not one per client


class FakeWall:
    """The wall clock both the adapter and the emulator read; tests move it."""

    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(scope="module")
def keys() -> tuple[ServiceAccount, str, ServiceAccount]:
    """(account, its public key PEM, an account with another key): RSA keys are slow to make."""
    account, public_pem = generate_service_account(
        project_id=PROJECT, client_email=EMAIL, token_uri="http://unset/token"
    )
    other, _ = generate_service_account(
        project_id=PROJECT, client_email=EMAIL, token_uri="http://unset/token"
    )
    return account, public_pem, other


@dataclass
class Rig:
    emulator: FcmEmulator
    server: EmulatorServer
    adapter: FcmAdapter
    account: ServiceAccount
    wall: FakeWall

    def adapter_with(self, account: ServiceAccount) -> FcmAdapter:
        return FcmAdapter(
            "fcm",
            client=httpx.AsyncClient(timeout=TIMEOUT_S, verify=TLS),
            account=account,
            refresh_margin_s=MARGIN_S,
            token_lifetime_s=LIFETIME_S,
            base_url=self.server.url,
            now=self.wall,
        )


@asynccontextmanager
async def rig(keys: tuple[ServiceAccount, str, ServiceAccount]) -> AsyncIterator[Rig]:
    account, public_pem, _ = keys
    wall = FakeWall()
    emulator = FcmEmulator(
        project_id=PROJECT,
        client_email=EMAIL,
        public_key=public_pem,
        token_lifetime_s=LIFETIME_S,
        auto_receipts=False,
        clock=wall,
    )
    async with serve_emulator(emulator) as server:
        account = msgspec.structs.replace(account, token_uri=f"{server.url}/token")
        r = Rig(emulator, server, None, account, wall)  # type: ignore[arg-type]  # set below
        r.adapter = r.adapter_with(account)
        try:
            yield r
        finally:
            await r.adapter.aclose()


def message(n: int = 1, *, recipient: str = "fcm:device-token-1") -> Message:
    return Message(
        client_ref=str(uuid.uuid4()),
        tenant_id="clinic-a",
        idempotency_key=f"key-{n}",
        channel=ChannelName.PUSH,
        recipient=recipient,
        body="Your appointment is tomorrow at 9:00",
        subject="Reminder",
        data={"kind": "reminder"},
    )


async def test_send_is_accepted_and_carries_the_key_and_reference(
    keys: tuple[ServiceAccount, str, ServiceAccount],
) -> None:
    async with rig(keys) as r:
        assert isinstance(r.adapter, Adapter)
        msg = message()
        accepted = await r.adapter.send(msg)
        assert accepted.provider == "fcm"
        assert accepted.provider_ref == f"projects/{PROJECT}/messages/0:00000001"
        stored = r.emulator.messages[msg.reference]
        assert stored.provider_ref == accepted.provider_ref
        assert stored.recipient == "device-token-1"
        assert stored.body == msg.body
        assert stored.fields == {
            "kind": "reminder",
            "triage_ref": "clinic-a:" + msg.client_ref,
            "triage_key": "key-1",
        }
        assert r.emulator.accepted == {"key-1": 1}
        assert await r.adapter.status(msg) is None


async def test_the_assertion_is_a_service_account_jwt(
    keys: tuple[ServiceAccount, str, ServiceAccount],
) -> None:
    async with rig(keys) as r:
        assertion = r.adapter.assertion()
        claims = jwt.decode(
            assertion,
            keys[1],
            algorithms=["RS256"],
            audience=r.account.token_uri,
            options={"verify_exp": False, "verify_iat": False},
        )
        assert claims == {
            "iss": EMAIL,
            "scope": FCM_SCOPE,
            "aud": f"{r.server.url}/token",
            "iat": int(T0),
            "exp": int(T0 + LIFETIME_S),
        }
        assert jwt.get_unverified_header(assertion)["kid"] == r.account.private_key_id


async def test_token_is_reused_and_refreshed_refresh_margin_before_expiry(
    keys: tuple[ServiceAccount, str, ServiceAccount],
) -> None:
    async with rig(keys) as r:
        await r.adapter.send(message(1))
        assert r.emulator.tokens_issued == 1
        r.wall.t = T0 + LIFETIME_S - MARGIN_S - 1
        await r.adapter.send(message(2))
        assert r.emulator.tokens_issued == 1
        r.wall.t = T0 + LIFETIME_S - MARGIN_S
        await r.adapter.send(message(3))
        assert r.emulator.tokens_issued == 2
        assert r.adapter.token_refreshes == 2
        assert r.emulator.accepted == {"key-1": 1, "key-2": 1, "key-3": 1}


async def test_concurrent_sends_share_one_refresh(
    keys: tuple[ServiceAccount, str, ServiceAccount],
) -> None:
    async with rig(keys) as r:
        async with trio.open_nursery() as nursery:
            for n in range(20):
                nursery.start_soon(r.adapter.send, message(n))
        assert r.emulator.tokens_issued == 1
        assert sum(r.emulator.accepted.values()) == 20


async def test_a_failed_refresh_keeps_the_old_token_until_it_expires(
    keys: tuple[ServiceAccount, str, ServiceAccount],
) -> None:
    async with rig(keys) as r:
        await r.adapter.send(message(1))
        r.emulator.token_status = 503
        r.wall.t = T0 + LIFETIME_S - 1  # inside the margin, not expired
        await r.adapter.send(message(2))
        assert r.emulator.tokens_issued == 1
        r.wall.t = T0 + LIFETIME_S  # expired: no token to fall back on
        with pytest.raises(ProviderUnavailable, match="token endpoint"):
            await r.adapter.send(message(3))
        assert r.emulator.accepted == {"key-1": 1, "key-2": 1}
        r.emulator.token_status = None
        await r.adapter.send(message(3))
        assert r.emulator.tokens_issued == 2


async def test_a_refused_assertion_is_auth_failed(
    keys: tuple[ServiceAccount, str, ServiceAccount],
) -> None:
    async with rig(keys) as r:
        forged = msgspec.structs.replace(keys[2], token_uri=r.account.token_uri)
        adapter = r.adapter_with(forged)
        with pytest.raises(AuthFailed, match="invalid_grant"):
            await adapter.send(message())
        await adapter.aclose()
        assert r.emulator.tokens_issued == 0
        assert not r.emulator.requests


async def test_token_endpoint_answers_map_onto_the_tree(
    keys: tuple[ServiceAccount, str, ServiceAccount],
) -> None:
    async with rig(keys) as r:
        for status, error in ((500, ProviderUnavailable), (429, RateLimited), (401, AuthFailed)):
            r.emulator.token_status = status
            with pytest.raises(error):
                await r.adapter.send(message())
        assert not r.emulator.requests  # nothing reached the send endpoint


async def test_a_revoked_token_is_auth_failed_and_dropped(
    keys: tuple[ServiceAccount, str, ServiceAccount],
) -> None:
    async with rig(keys) as r:
        await r.adapter.send(message(1))
        r.emulator.revoke_tokens()
        with pytest.raises(AuthFailed, match="401"):
            await r.adapter.send(message(2))
        await r.adapter.send(message(2))  # no retry inside; the next call signs in again
        assert r.emulator.tokens_issued == 2
        assert r.emulator.accepted == {"key-1": 1, "key-2": 1}


async def test_unregistered_token_is_recipient_gone(
    keys: tuple[ServiceAccount, str, ServiceAccount],
) -> None:
    async with rig(keys) as r:
        r.emulator.unregister("dead-token")
        with pytest.raises(RecipientGone) as caught:
            await r.adapter.send(message(recipient="fcm:dead-token"))
        assert caught.value.recipient == "fcm:dead-token"
        assert caught.value.reason == "UNREGISTERED"
        assert not r.emulator.accepted


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (400, Rejected, "INVALID_ARGUMENT"),
        (403, Rejected, "SENDER_ID_MISMATCH"),
        (404, RecipientGone, "UNREGISTERED"),
        (429, RateLimited, "QUOTA_EXCEEDED"),
        (500, ProviderUnavailable, "INTERNAL"),
        (503, ProviderUnavailable, "UNAVAILABLE"),
        (401, AuthFailed, "THIRD_PARTY_AUTH_ERROR"),
    ],
)
async def test_fcm_error_codes_map_onto_the_tree(
    keys: tuple[ServiceAccount, str, ServiceAccount],
    status: int,
    error: type[ProviderError],
    code: str,
) -> None:
    async with rig(keys) as r:
        r.emulator.set_faults(status=status)
        with pytest.raises(error) as caught:
            await r.adapter.send(message())
        assert type(caught.value) is error  # not a subclass: 400 is not RecipientGone
        assert not r.emulator.accepted
        if error is AuthFailed:
            r.emulator.clear_faults()
            await r.adapter.send(message(2))
            assert r.emulator.tokens_issued == 2  # the token was dropped
        if error is not RecipientGone:
            assert code in str(caught.value)


async def test_rate_limit_carries_retry_after(
    keys: tuple[ServiceAccount, str, ServiceAccount],
) -> None:
    async with rig(keys) as r:
        r.emulator.set_faults(rate_limit_per_s=0.001, retry_after_s=7)
        await r.adapter.send(message(1))
        with pytest.raises(RateLimited) as caught:
            await r.adapter.send(message(2))
        assert caught.value.retry_after_s == 7.0
        assert r.emulator.accepted == {"key-1": 1}


async def test_silence_and_resets_after_sending_are_ambiguous_timeouts(
    keys: tuple[ServiceAccount, str, ServiceAccount],
) -> None:
    async with rig(keys) as r:
        await r.adapter.access_token()
        r.emulator.set_faults(hang_before_accept=True)
        with pytest.raises(ProviderTimeout):
            await r.adapter.send(message(1))
        r.emulator.set_faults(hang_after_accept=True)
        with pytest.raises(ProviderTimeout):
            await r.adapter.send(message(2))
        r.emulator.set_faults(reset_after_accept=True)
        with pytest.raises(ProviderTimeout):
            await r.adapter.send(message(3))
        assert r.emulator.accepted == {"key-2": 1, "key-3": 1}  # taken, never answered


async def test_a_server_that_is_down_is_unavailable(
    keys: tuple[ServiceAccount, str, ServiceAccount],
) -> None:
    async with rig(keys) as r:
        await r.server.go_down()
        with pytest.raises(ProviderUnavailable):
            await r.adapter.send(message())


async def test_bad_recipients_are_rejected_before_any_request(
    keys: tuple[ServiceAccount, str, ServiceAccount],
) -> None:
    async with rig(keys) as r:
        for recipient in ("apns:abcd", "sms:+15550100", "fcm:", "fcm:bad/token"):
            with pytest.raises(Rejected):
                await r.adapter.send(message(recipient=recipient))
        assert r.emulator.tokens_issued == 0
        assert not r.emulator.requests


async def test_a_malformed_send_is_invalid_argument(
    keys: tuple[ServiceAccount, str, ServiceAccount],
) -> None:
    async with rig(keys) as r, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        token = await r.adapter.access_token()
        answer = await client.post(
            f"{r.server.url}/v1/projects/{PROJECT}/messages:send",
            content=b'{"message": {"data": {"n": 1}}}',
            headers={"authorization": f"Bearer {token}"},
        )
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert error["status"] == "INVALID_ARGUMENT"
        assert error["details"][0]["errorCode"] == "INVALID_ARGUMENT"


def test_bad_credentials_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="client_email"):
        ServiceAccount.from_json(b'{"project_id": "p", "private_key": "x", "token_uri": "u"}')
    account = ServiceAccount.from_json(
        b'{"type": "service_account", "project_id": "p", "client_email": "e",'
        b' "private_key": "not a key", "token_uri": "u"}'
    )
    with pytest.raises(ConfigError, match="PEM"):
        FcmAdapter(
            "fcm",
            client=httpx.AsyncClient(),
            account=account,
            refresh_margin_s=MARGIN_S,
            token_lifetime_s=LIFETIME_S,
        )
    ec_pem, _ = generate_apns_key()
    with pytest.raises(ConfigError, match="RSA"):
        FcmAdapter(
            "fcm",
            client=httpx.AsyncClient(),
            account=msgspec.structs.replace(account, private_key=ec_pem),
            refresh_margin_s=MARGIN_S,
            token_lifetime_s=LIFETIME_S,
        )
