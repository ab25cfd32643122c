"""providers.jetstream_consumer against a real NATS server: create/update, fetch, ack/nak/term."""

from __future__ import annotations

import asyncio
import uuid

import nats.errors
import pytest

from providers import jetstream, jetstream_consumer
from providers.bridge import run
from providers.jetstream import PublishItem
from providers.jetstream_consumer import ConsumerSettings, Settle


def _settings(**overrides: object) -> ConsumerSettings:
    tag = uuid.uuid4().hex[:8]
    fields: dict[str, object] = dict(
        stream=f"S_{tag}", subjects=(f"s{tag}.>",), durable=f"d{tag}", ack_wait_s=0.5,
        max_deliver=3, backoff_s=(), duplicate_window_s=30.0,
    )  # fmt: skip
    fields.update(overrides)
    return ConsumerSettings(**fields)  # type: ignore[arg-type]


async def _publish(client: jetstream.JetStreamClient, subject: str, count: int) -> None:
    items = [PublishItem(f"m{n}", subject, f"body {n}".encode()) for n in range(count)]
    results = await run(jetstream.publish_batch, client, items, 2.0)
    assert not [r for r in results if isinstance(r, Exception)]


def test_settings_refuse_a_backoff_longer_than_max_deliver() -> None:
    with pytest.raises(ValueError, match="backoff_s"):
        _settings(max_deliver=2, backoff_s=(0.1, 0.2))


async def test_fetch_ack_nak_term_and_an_empty_pull(
    nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    client = await run(jetstream.connect, nats_url)
    try:
        settings = _settings()
        consumer = await run(jetstream_consumer.open_consumer, client, settings)
        subject = settings.subjects[0].replace(">", "x")

        assert await run(jetstream_consumer.fetch_batch, consumer, 10, 0.1) == []

        await _publish(client, subject, 3)
        batch = await run(jetstream_consumer.fetch_batch, consumer, 10, 1.0)
        assert [d.data for d in batch] == [b"body 0", b"body 1", b"body 2"]
        assert [d.msg_id for d in batch] == ["m0", "m1", "m2"]
        assert all(d.num_delivered == 1 for d in batch)

        decisions = [(batch[0], Settle.ack()), (batch[1], Settle.nak()), (batch[2], Settle.term())]
        await run(jetstream_consumer.settle_batch, consumer, decisions)
        again = await run(jetstream_consumer.fetch_batch, consumer, 10, 1.0)
        assert [(d.data, d.num_delivered) for d in again] == [(b"body 1", 2)]
        await run(jetstream_consumer.settle_batch, consumer, [(again[0], Settle.ack())])
        assert await run(jetstream_consumer.fetch_batch, consumer, 10, 0.2) == []
        info = await run(jetstream_consumer.consumer_info, consumer)
        assert info.num_ack_pending == 0 and info.num_pending == 0
    finally:
        await run(jetstream.close, client)


async def test_an_unacked_message_comes_back_until_max_deliver(
    nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    client = await run(jetstream.connect, nats_url)
    try:
        settings = _settings(ack_wait_s=0.3, max_deliver=2)
        consumer = await run(jetstream_consumer.open_consumer, client, settings)
        await _publish(client, settings.subjects[0].replace(">", "x"), 1)
        first = await run(jetstream_consumer.fetch_batch, consumer, 1, 1.0)
        await run(jetstream_consumer.settle_batch, consumer, [(first[0], Settle.skip())])
        second = await run(jetstream_consumer.fetch_batch, consumer, 1, 2.0)
        assert [d.num_delivered for d in second] == [2]
        assert await run(jetstream_consumer.fetch_batch, consumer, 1, 0.6) == []
    finally:
        await run(jetstream.close, client)


async def test_reopening_updates_the_durable_consumer(
    nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    client = await run(jetstream.connect, nats_url)
    try:
        settings = _settings()
        await run(jetstream_consumer.open_consumer, client, settings)
        changed = _settings(
            stream=settings.stream, subjects=settings.subjects, durable=settings.durable,
            ack_wait_s=2.0, max_deliver=4, backoff_s=(0.5, 1.0),
        )  # fmt: skip
        consumer = await run(jetstream_consumer.open_consumer, client, changed)
        info = await run(jetstream_consumer.consumer_info, consumer)
        assert info.config.max_deliver == 4
        assert info.config.backoff == [0.5, 1.0]
    finally:
        await run(jetstream.close, client)


class _Expiring:
    """A pull subscription whose fetch ends as nats-py's does when its own wait runs out."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def fetch(self, *_args: object, **_kwargs: object) -> list[object]:
        raise self.error


# asyncio.TimeoutError is the builtin since 3.11; nats' TimeoutError derives from it.
@pytest.mark.parametrize(
    "error", [TimeoutError(), nats.errors.TimeoutError()], ids=["asyncio", "nats"]
)
async def test_a_fetch_that_times_out_either_way_is_an_empty_batch(
    error: BaseException, bridge: asyncio.AbstractEventLoop
) -> None:
    consumer = jetstream_consumer.PullConsumer(
        client=None,  # type: ignore[arg-type]  # fetch_batch touches only the subscription
        settings=_settings(),
        subscription=_Expiring(error),  # type: ignore[arg-type]
    )
    assert await run(jetstream_consumer.fetch_batch, consumer, 10, 0.1) == []
