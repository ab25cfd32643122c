"""The Ghasi adapter against its loopback emulator: wire format, every fault, status, DLRs."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import msgspec
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
from providers.emulators.sms import GhasiEmulator
from providers.ghasi import GhasiAdapter, GhasiWire, parse_ghasi_receipt
from providers.receipts import BadSignature, MalformedReceipt, ReceiptError, StaleReceipt

API_KEY = "k-secret"
DLR_SECRET = "dlr-secret"
TIMEOUT_S = 0.5


def message(n: int = 1, *, to: str = "+15551230001", key: str | None = None) -> Message:
    return Message(
        client_ref=f"d{n}",
        tenant_id="t1",
        idempotency_key=key or f"key-{n}",
        channel=ChannelName.SMS,
        recipient=to,
        body=f"Your appointment #{n} is tomorrow",
    )


@dataclass
class Rig:
    emulator: GhasiEmulator
    server: EmulatorServer
    adapter: GhasiAdapter
    client: httpx.AsyncClient


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    emulator = GhasiEmulator(api_key=API_KEY, auto_receipts=False)
    async with serve_emulator(emulator) as server, httpx.AsyncClient() as client:
        adapter = GhasiAdapter(
            base_url=server.url,
            api_key=API_KEY,
            sender="CLINIC",
            timeout_s=TIMEOUT_S,
            client=client,
        )
        yield Rig(emulator, server, adapter, client)


class Sink(Emulator):
    def __init__(self) -> None:
        super().__init__("sink")
        self.received: list[Request] = []

    async def handle(self, request: Request) -> Response | None:
        self.received.append(request)
        return Response(204)


async def test_send_speaks_the_wire_format(rig: Rig) -> None:
    seen: list[Request] = []
    original = rig.emulator.handle

    async def spy(request: Request) -> Response | None:
        seen.append(request)
        return await original(request)

    rig.emulator.handle = spy  # type: ignore[method-assign]  # observe the raw request
    assert isinstance(rig.adapter, Adapter)
    accepted = await rig.adapter.send(message(1))
    assert accepted.provider == "ghasi"
    assert accepted.provider_ref == "GH00000001"
    (request,) = seen
    assert (request.method, request.path) == ("POST", "/api/v1/messages")
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert request.headers["idempotency-key"] == "key-1"
    assert msgspec.json.decode(request.body) == {
        "to": "+15551230001",
        "text": "Your appointment #1 is tomorrow",
        "sender": "CLINIC",
        "client_ref": "t1:d1",
    }
    assert rig.emulator.accepted == {"key-1": 1}
    assert rig.emulator.messages["t1:d1"].provider_ref == "GH00000001"


async def test_a_key_sent_twice_is_a_visible_duplicate(rig: Rig) -> None:
    await rig.adapter.send(message(1))
    await rig.adapter.send(message(2))
    assert rig.emulator.duplicates() == 0
    await rig.adapter.send(message(1))
    assert rig.emulator.duplicates() == 1


async def test_status_found_and_not_found(rig: Rig) -> None:
    missing = await rig.adapter.status(message(9))
    assert missing is not None
    assert missing.state is DeliveryState.NOT_FOUND
    await rig.adapter.send(message(1))
    found = await rig.adapter.status(message(1))
    assert found is not None
    assert (found.state, found.provider_ref) == (DeliveryState.ACCEPTED, "GH00000001")
    rig.emulator.messages["t1:d1"].status = "delivered"
    delivered = await rig.adapter.status(message(1))
    assert delivered is not None
    assert delivered.state is DeliveryState.DELIVERED


async def test_query_status_asks_by_the_wire_reference(rig: Rig) -> None:
    assert (await rig.adapter.query_status("t1:d1")) == StatusAnswer(state=DeliveryState.NOT_FOUND)
    await rig.adapter.send(message(1))
    rig.emulator.messages["t1:d1"].status = "expired"
    answer = await rig.adapter.query_status("t1:d1", "ignored")
    assert answer == StatusAnswer(
        state=DeliveryState.FAILED, provider_ref="GH00000001", reason="expired"
    )
    rig.emulator.forget("t1:d1")
    forgotten = await rig.adapter.query_status("t1:d1")
    assert forgotten is not None and forgotten.state is DeliveryState.NOT_FOUND


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, ProviderUnavailable),
        (503, ProviderUnavailable),
        (400, Rejected),
        (422, Rejected),
        (401, AuthFailed),
        (403, AuthFailed),
    ],
)
async def test_injected_status_maps_and_nothing_is_taken(
    rig: Rig, status: int, error: type[ProviderError]
) -> None:
    rig.emulator.set_faults(status=status)
    with pytest.raises(error):
        await rig.adapter.send(message(1))
    assert not rig.emulator.accepted


async def test_rate_limit_carries_retry_after(rig: Rig) -> None:
    rig.emulator.set_faults(rate_limit_per_s=0.001, retry_after_s=2.5)
    await rig.adapter.send(message(1))
    with pytest.raises(RateLimited) as caught:
        await rig.adapter.send(message(2))
    assert caught.value.retry_after_s == 2.5


async def test_refused_is_unavailable(rig: Rig) -> None:
    await rig.server.go_down()
    with pytest.raises(ProviderUnavailable):
        await rig.adapter.send(message(1))
    await rig.server.come_up()
    assert (await rig.adapter.send(message(1))).provider_ref == "GH00000001"


async def test_hang_before_accept_is_an_ambiguous_timeout_settled_not_found(rig: Rig) -> None:
    rig.emulator.set_faults(hang_before_accept=True, remaining=1)
    with pytest.raises(ProviderTimeout):
        await rig.adapter.send(message(1))
    settled = await rig.adapter.status(message(1))
    assert settled is not None
    assert settled.state is DeliveryState.NOT_FOUND


@pytest.mark.parametrize("fault", ["hang_after_accept", "reset_after_accept"])
async def test_no_answer_after_accept_is_a_timeout_settled_by_status(rig: Rig, fault: str) -> None:
    rig.emulator.set_faults(**{fault: True, "remaining": 1})
    with pytest.raises(ProviderTimeout):
        await rig.adapter.send(message(1))
    assert rig.emulator.accepted == {"key-1": 1}
    settled = await rig.adapter.status(message(1))
    assert settled is not None
    assert settled.state is DeliveryState.ACCEPTED


async def test_bad_number_is_rejected_and_wrong_key_is_auth_failed(rig: Rig) -> None:
    with pytest.raises(Rejected, match="422"):
        await rig.adapter.send(message(1, to="555-1234"))
    wrong = GhasiAdapter(
        base_url=rig.server.url, api_key="nope", sender="C", timeout_s=TIMEOUT_S, client=rig.client
    )
    with pytest.raises(AuthFailed):
        await wrong.send(message(2))
    with pytest.raises(AuthFailed):
        await wrong.status(message(2))
    assert not rig.emulator.accepted


async def test_configurable_wire_end_to_end() -> None:
    wire = GhasiWire(
        send_path="/sms/send",
        status_path="/sms/lookup",
        auth_header="X-Api-Key",
        auth_scheme="",
        idempotency_header="X-Request-Id",
        to_field="msisdn",
        text_field="message",
        ref_field="reference",
        id_field="id",
        status_field="state",
    )
    emulator = GhasiEmulator(api_key=API_KEY, wire=wire, auto_receipts=False)
    async with serve_emulator(emulator) as server, httpx.AsyncClient() as client:
        adapter = GhasiAdapter(
            base_url=server.url,
            api_key=API_KEY,
            sender="C",
            timeout_s=TIMEOUT_S,
            wire=wire,
            client=client,
        )
        accepted = await adapter.send(message(1))
        assert emulator.accepted == {"key-1": 1}
        found = await adapter.status(message(1))
        assert found is not None
        assert found.provider_ref == accepted.provider_ref
        default = GhasiAdapter(
            base_url=server.url, api_key=API_KEY, sender="C", timeout_s=TIMEOUT_S, client=client
        )
        with pytest.raises(AuthFailed):  # the default wire's Authorization header is not X-Api-Key
            await default.send(message(2))


async def test_adapter_owns_its_client_when_none_is_given(rig: Rig) -> None:
    adapter = GhasiAdapter(
        base_url=rig.server.url, api_key=API_KEY, sender="C", timeout_s=TIMEOUT_S
    )
    await adapter.send(message(1))
    await adapter.aclose()
    assert rig.emulator.accepted == {"key-1": 1}


# -- receipts ---------------------------------------------------------------------------


async def received_dlr(state: str = "delivered") -> tuple[dict[str, str], bytes, float]:
    """One DLR as the emulator really POSTs it: (headers, body, time received)."""
    sink = Sink()
    async with serve_emulator(sink) as sink_server:
        emulator = GhasiEmulator(
            api_key=API_KEY,
            receipt_url=f"{sink_server.url}/webhooks/dlr/ghasi",
            receipt_secret=DLR_SECRET,
            auto_receipts=state == "delivered",
        )
        async with serve_emulator(emulator) as server, httpx.AsyncClient() as client:
            adapter = GhasiAdapter(
                base_url=server.url, api_key=API_KEY, sender="C", timeout_s=TIMEOUT_S, client=client
            )
            await adapter.send(message(1))
            if state != "delivered":
                await emulator.emit_receipt("t1:d1", state)
            await sink.wait_until(lambda: bool(sink.received))
    (request,) = sink.received
    assert request.path == "/webhooks/dlr/ghasi"
    return dict(request.headers), request.body, time.time()


async def test_receipt_parses_and_verifies() -> None:
    headers, body, now = await received_dlr()
    # An independent computation of the documented signature.
    stamp = headers["x-ghasi-timestamp"]
    expected = hmac.new(
        DLR_SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256
    ).hexdigest()
    assert headers["x-ghasi-signature"] == expected
    receipt = parse_ghasi_receipt(headers, body, secret=DLR_SECRET, now=now, tolerance_s=300)
    assert receipt.provider == "ghasi"
    assert receipt.state is DeliveryState.DELIVERED
    assert (receipt.tenant_id, receipt.client_ref, receipt.provider_ref) == (
        "t1",
        "d1",
        "GH00000001",
    )
    assert receipt.reason is None


async def test_failed_receipt_carries_the_error_code() -> None:
    headers, body, now = await received_dlr("failed")
    receipt = parse_ghasi_receipt(headers, body, secret=DLR_SECRET, now=now, tolerance_s=300)
    assert receipt.state is DeliveryState.FAILED
    assert receipt.reason == "failed:E_CARRIER"


def signed(body: bytes, *, stamp: str = "1700000000", secret: str = DLR_SECRET) -> dict[str, str]:
    sig = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-Ghasi-Timestamp": stamp, "X-Ghasi-Signature": sig}


GOOD = b'{"message_id":"GH1","client_ref":"t1:d1","status":"delivered","error_code":null,"timestamp":1700000000}'


def test_receipt_signature_failures() -> None:
    now = 1700000000.0
    parse_ghasi_receipt(signed(GOOD), GOOD, secret=DLR_SECRET, now=now, tolerance_s=300)
    with pytest.raises(BadSignature, match="does not match"):
        parse_ghasi_receipt(
            signed(GOOD, secret="other"), GOOD, secret=DLR_SECRET, now=now, tolerance_s=300
        )
    with pytest.raises(BadSignature, match="does not match"):
        tampered = GOOD.replace(b"delivered", b"failed")
        parse_ghasi_receipt(signed(GOOD), tampered, secret=DLR_SECRET, now=now, tolerance_s=300)
    with pytest.raises(BadSignature, match="missing"):
        parse_ghasi_receipt({}, GOOD, secret=DLR_SECRET, now=now, tolerance_s=300)
    with pytest.raises(StaleReceipt):
        parse_ghasi_receipt(signed(GOOD), GOOD, secret=DLR_SECRET, now=now + 301, tolerance_s=300)
    with pytest.raises(StaleReceipt):
        parse_ghasi_receipt(signed(GOOD), GOOD, secret=DLR_SECRET, now=now - 301, tolerance_s=300)
    # exactly at the edge of the window is accepted
    parse_ghasi_receipt(signed(GOOD), GOOD, secret=DLR_SECRET, now=now + 300, tolerance_s=300)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"\x00\xffgarbage", "not a JSON object"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"message_id":"GH1","client_ref":"t1:d1","status":"teleported"}', "unknown or missing"),
        (
            b'{"message_id":"GH1","client_ref":"nocolon","status":"delivered"}',
            "not a Triage message reference",
        ),
        (b'{"status":"delivered"}', "neither"),
        (b'{"message_id":7,"status":"delivered"}', "must be a string"),
        (b'{"message_id":"GH1","status":"delivered","timestamp":"soon"}', "Unix time"),
    ],
)
def test_garbage_bodies_are_malformed(body: bytes, problem: str) -> None:
    with pytest.raises(MalformedReceipt, match=problem) as caught:
        parse_ghasi_receipt(
            signed(body), body, secret=DLR_SECRET, now=1700000000.0, tolerance_s=300
        )
    assert isinstance(caught.value, ReceiptError)
