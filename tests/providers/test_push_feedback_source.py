"""Push delivery feedback: the Pub/Sub-style pull subscription of the push emulators,
FeedbackSource pulling and acking it, a stalled session and its recovery by reset;
plus the helpers both push adapters share."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NamedTuple

import httpx
import msgspec
import pytest
import trio
import trio.testing

from engine.errors import (
    AuthFailed,
    ProviderTimeout,
    ProviderUnavailable,
    Rejected,
)
from providers.apns import ApnsAdapter, apns_client
from providers.channel import ChannelName, DeliveryState, Message, Receipt
from providers.emulators.base import EmulatorServer, serve_emulator
from providers.emulators.push import (
    ApnsEmulator,
    FcmEmulator,
    Subscription,
    generate_apns_key,
    generate_service_account,
)
from providers.fcm import FcmAdapter
from providers.push_feedback import (
    FeedbackSource,
    MalformedPull,
    PushFeedback,
    push_platform,
)
from providers.receipts import MalformedReceipt

TIMEOUT_S = 0.5
SUBSCRIPTION = "projects/triage/subscriptions/apns-feedback"
TEAM, KID, TOPIC = "TEAM123456", "KEY1234567", "org.triage.patient"
DEVICE = "cd" * 32


@dataclass
class Rig:
    emulator: ApnsEmulator
    server: EmulatorServer
    adapter: ApnsAdapter

    def source(self, *, max_messages: int = 10, subscription: str = SUBSCRIPTION) -> FeedbackSource:
        return FeedbackSource("apns", self.server.url, subscription, TIMEOUT_S, max_messages)

    async def send(self, n: int) -> Message:
        message = Message(
            client_ref=str(uuid.uuid4()),
            tenant_id="clinic-a",
            idempotency_key=f"key-{n}",
            channel=ChannelName.PUSH,
            recipient=f"apns:{DEVICE}",
            body="Your appointment is tomorrow",
        )
        await self.adapter.send(message)
        return message


@asynccontextmanager
async def rig(**knobs: float) -> AsyncIterator[Rig]:
    private_pem, public_pem = generate_apns_key()
    emulator = ApnsEmulator(keys={KID: (TEAM, public_pem)}, subscription=SUBSCRIPTION, **knobs)  # type: ignore[arg-type]  # float knobs only
    async with serve_emulator(emulator) as server:
        adapter = ApnsAdapter(
            "apns",
            client=apns_client(timeout_s=TIMEOUT_S),
            team_id=TEAM,
            key_id=KID,
            private_key=private_pem,
            topic=TOPIC,
            token_refresh_s=1800.0,
            expiration_s=0.0,
            base_url=server.url,
        )
        try:
            yield Rig(emulator, server, adapter)
        finally:
            await adapter.aclose()


class Pulled(NamedTuple):
    receipts: list[Receipt]
    ack_ids: list[str]


async def pull_n(source: FeedbackSource, n: int) -> Pulled:
    batch = Pulled(*await source.pull())
    assert len(batch.ack_ids) == n, batch
    return batch


# -- pull and ack --------------------------------------------------------------------


async def test_each_accepted_message_is_reported_delivered_and_acked() -> None:
    async with rig() as r:
        sent = [await r.send(n) for n in range(3)]
        await r.emulator.wait_until(lambda: r.emulator.feedback.published == 3)
        source = r.source()
        batch = await pull_n(source, 3)
        assert source.last_malformed == []
        assert sorted(x.client_ref or "" for x in batch.receipts) == sorted(
            m.client_ref for m in sent
        )
        for receipt in batch.receipts:
            assert receipt.provider == "apns"
            assert receipt.state is DeliveryState.DELIVERED
            assert receipt.tenant_id == "clinic-a"
            assert receipt.provider_ref == receipt.client_ref  # apns-id = the dispatch id
            assert receipt.occurred_at is not None
        assert r.emulator.feedback.backlog == 3  # nothing is acked by pull
        await source.ack(batch.ack_ids)
        assert r.emulator.feedback.backlog == 0
        assert r.emulator.feedback.acked == 3
        assert await source.pull() == ([], [])
        assert source.session in r.emulator.sessions
        await source.aclose()


async def test_max_messages_bounds_a_pull_and_leased_items_wait() -> None:
    async with rig() as r:
        for n in range(3):
            await r.send(n)
        await r.emulator.wait_until(lambda: r.emulator.feedback.published == 3)
        source = r.source(max_messages=2)
        await pull_n(source, 2)
        await pull_n(source, 1)  # the first two are leased (ack deadline not reached)
        await pull_n(source, 0)
        await source.aclose()


async def test_unacked_feedback_is_redelivered_with_a_new_ack_id() -> None:
    async with rig(ack_deadline_s=0.0) as r:
        message = await r.send(1)
        await r.emulator.wait_until(lambda: r.emulator.feedback.published == 1)
        source = r.source()
        first = await pull_n(source, 1)
        again = await pull_n(source, 1)
        assert again.receipts[0].client_ref == first.receipts[0].client_ref == message.client_ref
        assert again.ack_ids != first.ack_ids
        await source.ack(first.ack_ids)  # a superseded ack id acks nothing
        assert r.emulator.feedback.backlog == 1
        await source.ack(again.ack_ids)
        assert r.emulator.feedback.backlog == 0
        await source.aclose()


async def test_paused_receipts_are_held_then_published() -> None:
    async with rig() as r:
        r.emulator.set_faults(receipts_paused=True)
        await r.send(1)
        source = r.source()
        await pull_n(source, 0)
        assert r.emulator.accepted == {"key-1": 1}
        r.emulator.clear_faults()
        await r.emulator.wait_until(lambda: r.emulator.feedback.published == 1)
        await pull_n(source, 1)
        await source.aclose()


async def test_an_emitted_undeliverable_receipt_reads_back() -> None:
    async with rig(auto_receipts=False) as r, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        message = await r.send(1)
        answer = await client.post(
            f"{r.server.url}/_emulator/receipts",
            json={"reference": message.reference, "state": "undeliverable"},
        )
        assert answer.status_code == 200
        bad = await client.post(
            f"{r.server.url}/_emulator/receipts",
            json={"reference": message.reference, "state": "exploded"},
        )
        assert bad.status_code == 400
        source = r.source()
        batch = await pull_n(source, 1)
        assert batch.receipts[0].state is DeliveryState.UNDELIVERABLE
        await source.aclose()


async def test_fcm_emulator_publishes_feedback_too() -> None:
    account, public_pem = generate_service_account(
        project_id="p", client_email="e@p.iam", token_uri="http://unset/token"
    )
    emulator = FcmEmulator(
        project_id="p",
        client_email="e@p.iam",
        public_key=public_pem,
        subscription="projects/p/subscriptions/fcm-feedback",
    )
    async with serve_emulator(emulator) as server:
        account = msgspec.structs.replace(account, token_uri=f"{server.url}/token")
        adapter = FcmAdapter(
            "fcm",
            client=httpx.AsyncClient(timeout=TIMEOUT_S),
            account=account,
            refresh_margin_s=300.0,
            token_lifetime_s=3600.0,
            base_url=server.url,
        )
        message = Message(
            client_ref="d-1",
            tenant_id="clinic-b",
            idempotency_key="k-1",
            channel=ChannelName.PUSH,
            recipient="fcm:tok-1",
            body="hi",
        )
        accepted = await adapter.send(message)
        await emulator.wait_until(lambda: emulator.feedback.published == 1)
        source = FeedbackSource(
            "fcm", server.url, "projects/p/subscriptions/fcm-feedback", TIMEOUT_S, 10
        )
        batch = await pull_n(source, 1)
        receipt = batch.receipts[0]
        assert (receipt.client_ref, receipt.tenant_id) == ("d-1", "clinic-b")
        assert receipt.provider_ref == accepted.provider_ref
        await source.ack(batch.ack_ids)
        assert emulator.feedback.backlog == 0
        await source.aclose()
        await adapter.aclose()


# -- bad feedback --------------------------------------------------------------------


async def test_malformed_items_are_typed_errors_and_still_acked() -> None:
    async with rig() as r:
        good = await r.send(1)
        await r.emulator.wait_until(lambda: r.emulator.feedback.published == 1)
        publish = r.emulator.feedback.publish
        now = "2026-11-28T13:00:00Z"
        publish(b"not json", {}, now)
        item = {"state": "delivered", "reference": "no-colon", "occurred_at": 1.0}
        publish(msgspec.json.encode(item), {}, now)
        publish(msgspec.json.encode({**item, "reference": "t:c", "state": "exploded"}), {}, now)
        publish(msgspec.json.encode({**item, "reference": "t:c", "extra": 1}), {}, now)
        seen: list[MalformedReceipt] = []
        source = FeedbackSource(
            "apns", r.server.url, SUBSCRIPTION, TIMEOUT_S, 10, on_malformed=seen.append
        )
        batch = await pull_n(source, 5)  # every ack id, the unreadable items' too
        assert [x.client_ref for x in batch.receipts] == [good.client_ref]
        assert len(seen) == 4
        assert source.last_malformed == seen
        assert source.malformed == 4
        assert all(isinstance(e, MalformedReceipt) for e in seen)
        assert "not a Triage message reference" in str(seen[1])
        await source.ack(batch.ack_ids)
        assert r.emulator.feedback.backlog == 0
        await source.aclose()


async def test_bad_base64_is_malformed() -> None:
    answer = {"receivedMessages": [{"ackId": "a1", "message": {"data": "***", "messageId": "9"}}]}
    client = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda request: httpx.Response(200, json=answer))
    )
    source = FeedbackSource("apns", "http://feedback.invalid", SUBSCRIPTION, TIMEOUT_S, 10, client)
    assert await source.pull() == ([], ["a1"])
    [error] = source.last_malformed
    assert isinstance(error, MalformedReceipt)
    assert "'9'" in str(error)
    await client.aclose()


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (200, b"<html>", MalformedReceipt),
        (200, b'{"receivedMessages": [{"message": {}}]}', MalformedReceipt),
        (500, b"{}", ProviderUnavailable),
        (403, b"{}", AuthFailed),
        (400, b"{}", Rejected),
    ],
)
async def test_bad_pull_answers_are_typed(status: int, body: bytes, error: type[Exception]) -> None:
    client = httpx.AsyncClient(
        transport=httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    )
    source = FeedbackSource("fcm", "http://feedback.invalid", SUBSCRIPTION, TIMEOUT_S, 10, client)
    with pytest.raises(error) as caught:
        await source.pull()
    if error is MalformedReceipt:  # and transient to the puller, which catches ProviderError
        assert isinstance(caught.value, MalformedPull)
        assert isinstance(caught.value, ProviderUnavailable)
    await client.aclose()


async def test_an_unknown_subscription_is_rejected_and_a_dead_port_unavailable() -> None:
    async with rig() as r:
        source = r.source(subscription="projects/triage/subscriptions/nope")
        with pytest.raises(Rejected, match="404"):
            await source.pull()
        await r.server.go_down()
        with pytest.raises(ProviderUnavailable):
            await r.source().pull()
        await source.aclose()


# -- stall and recovery ----------------------------------------------------------------


async def test_a_stalled_session_hangs_until_reset_opens_a_fresh_one() -> None:
    async with rig() as r:
        source = r.source()
        await pull_n(source, 0)
        r.emulator.stall_session()
        message = await r.send(1)
        await r.emulator.wait_until(lambda: r.emulator.feedback.published == 1)
        with pytest.raises(ProviderTimeout):
            await source.pull()
        # A reconnect alone does not help: the session, not the connection, is stalled.
        with pytest.raises(ProviderTimeout):
            await source.pull()
        assert r.emulator.stalled_pulls == 2
        assert r.emulator.feedback.backlog == 1  # nothing was lost meanwhile
        old_session = source.session
        await source.reset()
        assert source.session != old_session
        assert source.resets == 1
        batch = await pull_n(source, 1)
        assert batch.receipts[0].client_ref == message.client_ref
        await source.ack(batch.ack_ids)
        assert r.emulator.feedback.backlog == 0
        await source.aclose()


async def test_reset_does_not_close_a_client_the_caller_owns() -> None:
    async with rig() as r, httpx.AsyncClient(timeout=TIMEOUT_S) as owned:
        source = FeedbackSource("apns", r.server.url, SUBSCRIPTION, TIMEOUT_S, 10, owned)
        await pull_n(source, 0)
        await source.reset()
        assert not owned.is_closed
        await pull_n(source, 0)
        await source.aclose()
        assert not owned.is_closed


# -- helpers shared by the push adapters ----------------------------------------------------


def test_push_platform_routes_and_refuses() -> None:
    assert push_platform("fcm:abc-DEF_1:2") == ("fcm", "abc-DEF_1:2")
    assert push_platform("apns:" + DEVICE) == ("apns", DEVICE)
    for bad in ("", "fcm", "fcm:", "sms:+1555", "apns:a b", "apns:../x", "fcm:a/b"):
        with pytest.raises(Rejected):
            push_platform(bad)


def test_feedback_items_round_trip() -> None:
    item = PushFeedback(state=DeliveryState.FAILED, reference="t:c", occurred_at=5.0, reason="x")
    raw = base64.b64encode(msgspec.json.encode(item))
    assert msgspec.json.decode(base64.b64decode(raw), type=PushFeedback) == item


def test_bad_knobs_are_refused() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        FeedbackSource("x", "http://h", SUBSCRIPTION, 0.0, 10)
    with pytest.raises(ValueError, match="max_messages"):
        FeedbackSource("x", "http://h", SUBSCRIPTION, 1.0, 0)


# -- the subscription itself (no sockets: exact virtual time) ------------------------------


async def test_the_backlog_is_bounded_oldest_first() -> None:
    subscription = Subscription(ack_deadline_s=10.0, pull_wait_s=0.0, max_backlog=2)
    for n in range(3):
        subscription.publish(str(n).encode(), {}, "2026-11-28T13:00:00Z")
    assert (subscription.backlog, subscription.dropped) == (2, 1)
    pulled = await subscription.pull(10)
    assert [base64.b64decode(m["message"]["data"]) for m in pulled] == [b"1", b"2"]


async def test_a_pull_waits_up_to_pull_wait_s_for_a_publish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    subscription = Subscription(ack_deadline_s=10.0, pull_wait_s=5.0, max_backlog=10)
    start = trio.current_time()
    assert await subscription.pull(10) == []
    assert trio.current_time() - start == 5.0

    async def publish_later() -> None:
        await trio.sleep(2.0)
        subscription.publish(b"x", {}, "2026-11-28T13:00:00Z")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(publish_later)
        start = trio.current_time()
        pulled = await subscription.pull(10)
    assert len(pulled) == 1
    assert trio.current_time() - start == 2.0
    assert subscription.ack([pulled[0]["ackId"]]) == 1
    assert subscription.backlog == 0


async def test_stall_and_unregister_over_the_control_routes() -> None:
    async with rig() as r, httpx.AsyncClient(timeout=TIMEOUT_S) as client:
        source = r.source()
        await pull_n(source, 0)  # a session the emulator has seen
        stall = await client.post(f"{r.server.url}/_emulator/stall")
        assert stall.status_code == 200 and stall.json() == {"stalled_sessions": 1}
        assert r.emulator.stalled == r.emulator.sessions
        gone = await client.post(f"{r.server.url}/_emulator/unregister", json={"token": "t9"})
        assert gone.json() == {"unregistered": 1} and "t9" in r.emulator.unregistered
        assert (await client.delete(f"{r.server.url}/_emulator/stall")).status_code == 200
        assert r.emulator.stalled == set()
        missing = await client.post(f"{r.server.url}/_emulator/nope")
        assert missing.status_code == 404
        await source.aclose()
