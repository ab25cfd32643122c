"""The Twilio adapter against its loopback emulator: wire format, faults, status, callbacks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import pytest

from engine.errors import (
    AuthFailed,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    Rejected,
)
from providers.channel import Adapter, ChannelName, DeliveryState, Message, StatusAnswer
from providers.emulators.base import Emulator, EmulatorServer, Request, Response, serve_emulator
from providers.emulators.sms import TwilioEmulator
from providers.receipts import BadSignature, MalformedReceipt
from providers.twilio import TwilioAdapter, parse_twilio_receipt

SID = "AC0123456789abcdef0123456789abcdef"
TOKEN = "twilio-token"
FROM = "+15550000001"
TIMEOUT_S = 0.5
NOW = 1_800_000_000.0  # 2027-01-15, a fixed wall clock for both sides


def message(n: int = 1, *, to: str = "+15551230001", body: str | None = None) -> Message:
    return Message(
        client_ref=f"d{n}",
        tenant_id="t1",
        idempotency_key=f"key-{n}",
        channel=ChannelName.SMS,
        recipient=to,
        body=body or f"Your appointment #{n} is tomorrow",
    )


class Sink(Emulator):
    def __init__(self) -> None:
        super().__init__("sink")
        self.received: list[Request] = []

    async def handle(self, request: Request) -> Response | None:
        self.received.append(request)
        return Response(204)


@dataclass
class Rig:
    emulator: TwilioEmulator
    server: EmulatorServer
    adapter: TwilioAdapter
    client: httpx.AsyncClient
    sink: Sink
    sink_url: str

    def adapter_with(self, **changes: str) -> TwilioAdapter:
        kwargs = {"account_sid": SID, "auth_token": TOKEN} | changes
        return TwilioAdapter(
            base_url=self.server.url,
            from_number=FROM,
            timeout_s=TIMEOUT_S,
            client=self.client,
            clock=lambda: NOW,
            **kwargs,
        )


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    emulator = TwilioEmulator(
        account_sid=SID, auth_token=TOKEN, auto_receipts=False, clock=lambda: NOW
    )
    sink = Sink()
    async with (
        serve_emulator(sink) as sink_server,
        serve_emulator(emulator) as server,
        httpx.AsyncClient() as client,
    ):
        adapter = TwilioAdapter(
            base_url=server.url,
            account_sid=SID,
            auth_token=TOKEN,
            from_number=FROM,
            timeout_s=TIMEOUT_S,
            callback_base=sink_server.url,
            client=client,
            clock=lambda: NOW,
        )
        yield Rig(emulator, server, adapter, client, sink, sink_server.url)


def spy_on(emulator: TwilioEmulator) -> list[Request]:
    """Every raw request the emulator is sent from now on."""
    seen: list[Request] = []
    original = emulator.handle

    async def spy(request: Request) -> Response | None:
        seen.append(request)
        return await original(request)

    emulator.handle = spy  # type: ignore[method-assign]  # observe the raw request
    return seen


async def test_send_speaks_the_wire_format(rig: Rig) -> None:
    seen = spy_on(rig.emulator)
    assert isinstance(rig.adapter, Adapter)
    accepted = await rig.adapter.send(message(1))
    assert accepted.provider == "twilio"
    assert accepted.provider_ref.startswith("SM") and len(accepted.provider_ref) == 34
    (request,) = seen
    assert (request.method, request.path) == ("POST", f"/2010-04-01/Accounts/{SID}/Messages.json")
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    basic = base64.b64encode(f"{SID}:{TOKEN}".encode()).decode()
    assert request.headers["authorization"] == f"Basic {basic}"
    assert request.headers["i-twilio-idempotency-token"] == "key-1"
    assert request.form() == {
        "To": "+15551230001",
        "From": FROM,
        "Body": "Your appointment #1 is tomorrow",
        "StatusCallback": f"{rig.sink_url}/webhooks/dlr/twilio?ref=t1%3Ad1",
    }
    assert rig.emulator.messages["t1:d1"].provider_ref == accepted.provider_ref
    assert rig.emulator.accepted == {"key-1": 1}


async def test_a_key_sent_twice_is_a_visible_duplicate(rig: Rig) -> None:
    await rig.adapter.send(message(1))
    await rig.adapter.send(message(1))
    assert rig.emulator.accepted == {"key-1": 2}
    assert rig.emulator.duplicates() == 1


async def test_status_by_recipient_day_and_body(rig: Rig) -> None:
    nothing = await rig.adapter.status(message(1))
    assert nothing is not None
    assert nothing.state is DeliveryState.NOT_FOUND
    accepted = await rig.adapter.send(message(1))
    await rig.adapter.send(message(2))  # same recipient, another body
    one = await rig.adapter.status(message(1))
    assert one is not None
    assert (one.state, one.provider_ref, one.reason) == (
        DeliveryState.ACCEPTED,
        accepted.provider_ref,
        "queued",
    )
    other_number = await rig.adapter.status(message(1, to="+15559999999"))
    assert other_number is not None
    assert other_number.state is DeliveryState.NOT_FOUND
    rig.emulator.messages["t1:d1"].status = "delivered"
    delivered = await rig.adapter.status(message(1))
    assert delivered is not None
    assert delivered.state is DeliveryState.DELIVERED


async def test_query_status_fetches_the_message_resource_by_sid(rig: Rig) -> None:
    seen = spy_on(rig.emulator)
    accepted = await rig.adapter.send(message(1))
    sid = accepted.provider_ref
    queued = await rig.adapter.query_status("t1:d1", sid)
    assert queued == StatusAnswer(state=DeliveryState.ACCEPTED, provider_ref=sid, reason="queued")
    assert (seen[-1].method, seen[-1].path) == (
        "GET", f"/2010-04-01/Accounts/{SID}/Messages/{sid}.json",
    )  # fmt: skip
    rig.emulator.messages["t1:d1"].status = "delivered"
    delivered = await rig.adapter.query_status("t1:d1", sid)
    assert delivered is not None and delivered.state is DeliveryState.DELIVERED
    rig.emulator.messages["t1:d1"].status = "undelivered"
    gone = await rig.adapter.query_status("t1:d1", sid)
    assert gone == StatusAnswer(
        state=DeliveryState.UNDELIVERABLE, provider_ref=sid, reason="undelivered:30003"
    )
    rig.emulator.forget("t1:d1")  # Twilio's records lost: its 404, code 20404
    missing = await rig.adapter.query_status("t1:d1", sid)
    assert missing == StatusAnswer(state=DeliveryState.NOT_FOUND)
    assert await rig.adapter.query_status("t1:d1", None) is None  # no sid: cannot tell
    with pytest.raises(AuthFailed):
        await rig.adapter_with(auth_token="wrong").query_status("t1:d1", sid)


async def test_status_cannot_tell_between_two_identical_messages(rig: Rig) -> None:
    await rig.adapter.send(message(1, body="same"))
    await rig.adapter.send(message(2, body="same"))
    assert await rig.adapter.status(message(1, body="same")) is None


async def test_status_cannot_tell_when_the_list_has_more_pages(rig: Rig) -> None:
    rig.emulator.page_size = 1
    await rig.adapter.send(message(1))
    await rig.adapter.send(message(2))
    assert await rig.adapter.status(message(1)) is None


async def test_status_looks_at_the_day_sent(rig: Rig) -> None:
    await rig.adapter.send(message(1))
    tomorrow = TwilioAdapter(
        base_url=rig.server.url,
        account_sid=SID,
        auth_token=TOKEN,
        from_number=FROM,
        timeout_s=TIMEOUT_S,
        client=rig.client,
        clock=lambda: NOW + 86_400,
    )
    answer = await tomorrow.status(message(1))
    assert answer is not None
    assert answer.state is DeliveryState.NOT_FOUND


@pytest.mark.parametrize(
    ("status", "error"),
    [(500, ProviderUnavailable), (503, ProviderUnavailable), (400, Rejected), (401, AuthFailed)],
)
async def test_injected_status_maps(rig: Rig, status: int, error: type[ProviderError]) -> None:
    rig.emulator.set_faults(status=status)
    with pytest.raises(error):
        await rig.adapter.send(message(1))
    assert not rig.emulator.accepted


async def test_rate_limit_is_20429_with_retry_after(rig: Rig) -> None:
    rig.emulator.set_faults(rate_limit_per_s=0.001, retry_after_s=3)
    await rig.adapter.send(message(1))
    with pytest.raises(RateLimited, match="20429") as caught:
        await rig.adapter.send(message(2))
    assert caught.value.retry_after_s == 3.0


async def test_invalid_to_is_21211_rejected(rig: Rig) -> None:
    with pytest.raises(Rejected, match="21211"):
        await rig.adapter.send(message(1, to="12345"))
    assert not rig.emulator.accepted


async def test_wrong_credentials_are_auth_failed(rig: Rig) -> None:
    with pytest.raises(AuthFailed, match="20003"):
        await rig.adapter_with(auth_token="wrong").send(message(1))
    with pytest.raises(AuthFailed):
        await rig.adapter_with(auth_token="wrong").status(message(1))
    assert not rig.emulator.requests


async def test_refused_is_unavailable(rig: Rig) -> None:
    await rig.server.go_down()
    with pytest.raises(ProviderUnavailable):
        await rig.adapter.send(message(1))
    with pytest.raises(ProviderUnavailable):
        await rig.adapter.status(message(1))
    await rig.server.come_up()
    await rig.adapter.send(message(1))
    assert rig.emulator.accepted == {"key-1": 1}


@pytest.mark.parametrize("fault", ["hang_after_accept", "reset_after_accept"])
async def test_no_answer_after_accept_is_a_timeout(rig: Rig, fault: str) -> None:
    rig.emulator.set_faults(**{fault: True, "remaining": 1})
    with pytest.raises(ProviderTimeout):
        await rig.adapter.send(message(1))
    assert rig.emulator.accepted == {"key-1": 1}
    settled = await rig.adapter.status(message(1))
    assert settled is not None
    assert settled.state is DeliveryState.ACCEPTED


async def test_hang_before_accept_is_a_timeout_with_nothing_taken(rig: Rig) -> None:
    rig.emulator.set_faults(hang_before_accept=True, remaining=1)
    with pytest.raises(ProviderTimeout):
        await rig.adapter.send(message(1))
    assert not rig.emulator.accepted


# -- status callbacks -------------------------------------------------------------------


def expected_signature(url: str, params: dict[str, str]) -> str:
    data = url + "".join(k + params[k] for k in sorted(params))
    return base64.b64encode(hmac.new(TOKEN.encode(), data.encode(), hashlib.sha1).digest()).decode()


async def callback(rig: Rig, state: str) -> Request:
    await rig.adapter.send(message(1))
    await rig.emulator.emit_receipt("t1:d1", state)
    (request,) = rig.sink.received
    return request


async def test_delivered_callback_parses_and_verifies(rig: Rig) -> None:
    request = await callback(rig, "delivered")
    assert request.path == "/webhooks/dlr/twilio"
    params = request.form()
    assert request.headers["x-twilio-signature"] == expected_signature(request.url, params)
    receipt = parse_twilio_receipt(request.url, request.headers, request.body, auth_token=TOKEN)
    assert receipt.provider == "twilio"
    assert receipt.state is DeliveryState.DELIVERED
    assert receipt.provider_ref == rig.emulator.messages["t1:d1"].provider_ref
    assert (receipt.tenant_id, receipt.client_ref) == ("t1", "d1")
    assert receipt.reason is None


async def test_undelivered_callback_carries_the_error_code(rig: Rig) -> None:
    request = await callback(rig, "undelivered")
    receipt = parse_twilio_receipt(request.url, request.headers, request.body, auth_token=TOKEN)
    assert receipt.state is DeliveryState.UNDELIVERABLE
    assert receipt.reason == "undelivered:30003"
    assert receipt.permanent


async def test_auto_receipt_reaches_the_callback() -> None:
    emulator = TwilioEmulator(account_sid=SID, auth_token=TOKEN)
    sink = Sink()
    async with (
        serve_emulator(sink) as sink_server,
        serve_emulator(emulator) as server,
        httpx.AsyncClient() as client,
    ):
        adapter = TwilioAdapter(
            base_url=server.url,
            account_sid=SID,
            auth_token=TOKEN,
            from_number=FROM,
            timeout_s=TIMEOUT_S,
            callback_base=sink_server.url,
            client=client,
        )
        await adapter.send(message(1))
        await sink.wait_until(lambda: bool(sink.received))
        (request,) = sink.received
        receipt = parse_twilio_receipt(request.url, request.headers, request.body, auth_token=TOKEN)
        assert receipt.state is DeliveryState.DELIVERED
        found = await adapter.status(message(1))
        assert found is not None
        assert found.state is DeliveryState.DELIVERED


URL = "https://triage.example/webhooks/dlr/twilio?ref=t1%3Ad1"
PARAMS = {
    "MessageSid": "SM1",
    "MessageStatus": "failed",
    "ErrorCode": "30008",
    "To": "+1555",
    "AccountSid": SID,
}


def test_callback_signature_failures() -> None:
    body = urllib.parse.urlencode(PARAMS).encode()
    good = {"X-Twilio-Signature": expected_signature(URL, PARAMS)}
    receipt = parse_twilio_receipt(URL, good, body, auth_token=TOKEN)
    assert (receipt.state, receipt.reason, receipt.tenant_id) == (
        DeliveryState.FAILED,
        "failed:30008",
        "t1",
    )
    with pytest.raises(BadSignature, match="missing"):
        parse_twilio_receipt(URL, {}, body, auth_token=TOKEN)
    with pytest.raises(BadSignature, match="does not match"):
        parse_twilio_receipt(URL, good, body, auth_token="other")
    with pytest.raises(BadSignature, match="does not match"):  # another tenant's URL
        parse_twilio_receipt(URL.replace("t1", "t2"), good, body, auth_token=TOKEN)
    with pytest.raises(BadSignature, match="does not match"):
        parse_twilio_receipt(URL, good, body.replace(b"failed", b"delivered"), auth_token=TOKEN)
    with pytest.raises(BadSignature, match="form-encoded"):
        parse_twilio_receipt(URL, good, b"\xff\xfe garbage", auth_token=TOKEN)


@pytest.mark.parametrize(
    ("url", "params", "problem"),
    [
        (URL, {"MessageStatus": "delivered"}, "MessageSid"),
        (URL, {"MessageSid": "SM1", "MessageStatus": "teleported"}, "MessageStatus"),
        (
            URL.replace("t1%3Ad1", "nocolon"),
            {"MessageSid": "SM1", "MessageStatus": "sent"},
            "reference",
        ),
    ],
)
def test_signed_but_unreadable_callbacks_are_malformed(
    url: str, params: dict[str, str], problem: str
) -> None:
    body = urllib.parse.urlencode(params).encode()
    headers = {"X-Twilio-Signature": expected_signature(url, params)}
    with pytest.raises(MalformedReceipt, match=problem):
        parse_twilio_receipt(url, headers, body, auth_token=TOKEN)
