"""providers.jetstream against a real NATS server: stream set-up, batch publish with dedupe, fail-fast."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
import trio

from engine.errors import ProviderUnavailable
from providers import jetstream
from providers.bridge import run
from providers.embedded import EmbeddedNats
from providers.jetstream import PublishItem


async def _until(predicate: Callable[[], bool], timeout_s: float) -> None:
    with trio.fail_after(timeout_s):
        while True:
            if predicate():
                return
            await trio.sleep(0.01)


def _names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"T_{tag}", f"t{tag}.events"


async def test_ensure_stream_creates_then_widens_the_duplicate_window(
    nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    stream, subject = _names()
    client = await run(jetstream.connect, nats_url)
    try:
        created = await run(jetstream.ensure_stream, client, stream, [f"{subject}.>"], 30.0)
        assert created.duplicate_window_s == pytest.approx(30.0)
        assert created.replicas == 1
        widened = await run(jetstream.ensure_stream, client, stream, [f"{subject}.>"], 90.0)
        assert widened.duplicate_window_s == pytest.approx(90.0)
        kept = await run(jetstream.ensure_stream, client, stream, [f"{subject}.>"], 10.0)
        assert kept.duplicate_window_s == pytest.approx(90.0)  # never lowered
        assert (await run(jetstream.stream_settings, client, stream)).subjects == (f"{subject}.>",)
    finally:
        await run(jetstream.close, client)


async def test_publish_batch_in_order_and_deduplicated_by_msg_id(
    nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    stream, subject = _names()
    client = await run(jetstream.connect, nats_url)
    try:
        await run(jetstream.ensure_stream, client, stream, [f"{subject}.>"], 60.0)
        items = [
            PublishItem(msg_id=str(i), subject=f"{subject}.a", payload=f"{i}".encode(),
                        headers={"X-N": str(i)})
            for i in range(1, 51)
        ]  # fmt: skip
        acks = await run(jetstream.publish_batch, client, items, 2.0)
        assert all(not isinstance(a, Exception) and not a.duplicate for a in acks)
        again = await run(jetstream.publish_batch, client, items[:10], 2.0)
        assert all(not isinstance(a, Exception) and a.duplicate for a in again)
        stored = await run(jetstream.read_stream, client, stream)
        assert [m.msg_id for m in stored] == [str(i) for i in range(1, 51)]
        assert [m.stream_seq for m in stored] == list(range(1, 51))
        assert stored[4].headers["X-N"] == "5" and stored[4].payload == b"5"
    finally:
        await run(jetstream.close, client)


async def test_publish_fails_fast_while_the_server_is_down(
    bridge: asyncio.AbstractEventLoop,
) -> None:
    with EmbeddedNats() as server:
        client = await run(jetstream.connect, server.url)
        try:
            await run(jetstream.ensure_stream, client, "DOWN", ["down.>"], 60.0)
            server.stop()
            await _until(lambda: not client.connected, 5)  # it notices the closed socket
            with pytest.raises(ProviderUnavailable, match="not connected"):
                await run(
                    jetstream.publish_batch,
                    client,
                    [PublishItem(msg_id="1", subject="down.x", payload=b"x")],
                    1.0,
                )
            server.start()
            await _until(lambda: client.connected, 10)  # nats-py reconnects by itself
            [ack] = await run(
                jetstream.publish_batch,
                client,
                [PublishItem(msg_id="1", subject="down.x", payload=b"x")],
                2.0,
            )
            assert not isinstance(ack, Exception) and ack.stream == "DOWN"
        finally:
            await run(jetstream.close, client)


async def test_acks_come_back_on_one_inbox_and_nothing_stays_awaited(
    nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    stream, subject = _names()
    client = await run(jetstream.connect, nats_url)
    try:
        await run(jetstream.ensure_stream, client, stream, [f"{subject}.>"], 60.0)
        subscriptions = len(client.nc._subs)
        for batch in range(3):
            items = [
                PublishItem(msg_id=f"{batch}-{i}", subject=f"{subject}.a", payload=b"x")
                for i in range(40)
            ]
            acks = await run(jetstream.publish_batch, client, items, 2.0)
            assert [a.seq for a in acks if isinstance(a, jetstream.Ack)] == list(
                range(batch * 40 + 1, batch * 40 + 41)
            )
            assert client.acks is not None and client.acks.awaited == 0
        assert len(client.nc._subs) == subscriptions + 1  # one ack inbox, whatever the batches
    finally:
        await run(jetstream.close, client)


async def _subscribe_silently(client: jetstream.JetStreamClient, subject: str) -> None:
    """A core subscriber that never answers: a publish to it gets no ack and no 503."""

    async def ignore(_msg: object) -> None:
        return None

    await client.nc.subscribe(subject, cb=ignore)
    await client.nc.flush()


async def test_each_message_gets_its_own_result_ack_refusal_silence_or_no_stream(
    nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    import nats.errors
    import nats.js.api
    import nats.js.errors

    stream, subject = _names()
    client = await run(jetstream.connect, nats_url)
    try:
        config = nats.js.api.StreamConfig(
            name=stream, subjects=[f"{subject}.>"], duplicate_window=60.0, max_msg_size=64
        )
        await run(client.js.add_stream, config)
        await run(_subscribe_silently, client, f"silent{stream}")
        items = [
            PublishItem(msg_id="1", subject=f"{subject}.a", payload=b"small"),
            PublishItem(msg_id="2", subject=f"{subject}.a", payload=b"x" * 200),  # over 64 B
            PublishItem(msg_id="3", subject=f"silent{stream}", payload=b"x"),  # nobody acks
            PublishItem(msg_id="4", subject=f"nostream{stream}", payload=b"x"),  # no responders
            PublishItem(msg_id="5", subject=f"{subject}.a", payload=b"small"),
        ]
        ok, refused, silent, nobody, last = await run(jetstream.publish_batch, client, items, 0.3)
        assert isinstance(ok, jetstream.Ack) and (ok.stream, ok.seq) == (stream, 1)
        assert isinstance(refused, nats.js.errors.APIError) and refused.err_code == 10054
        assert isinstance(silent, TimeoutError)
        assert isinstance(nobody, nats.errors.NoRespondersError)
        assert isinstance(last, jetstream.Ack) and last.seq == 2
        assert client.acks is not None and client.acks.awaited == 0  # the silent one given up
    finally:
        await run(jetstream.close, client)
