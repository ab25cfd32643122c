"""A durable JetStream pull consumer (asyncio side: cross the bridge once per unit of work).

Three units of work, each one asyncio coroutine for :func:`providers.bridge.run`::

    consumer = await run(open_consumer, client, settings, service="nats")   # create or update
    batch = await run(fetch_batch, consumer, 100, 1.0, service="nats")     # [] when idle
    await run(settle_batch, consumer, [(delivery, Settle.ack()), ...], service="nats")

:func:`open_consumer` makes sure the stream exists (:func:`providers.jetstream.ensure_stream`)
and creates the durable consumer, or updates it to ``settings`` (explicit acks,
``ack_wait``, ``max_deliver``, ``backoff``), then binds a pull subscription.

:func:`fetch_batch` pulls up to ``batch`` messages in one request. A pull that
finds nothing raises nats' ``TimeoutError`` (or, depending on which of nats-py's
waits runs out, asyncio's plain one); here either is an empty batch, never a
:class:`~engine.errors.ProviderTimeout` (DESIGN.md section 7).

:func:`settle_batch` sends every ack, nak (with an optional redelivery delay) or
term of a batch, then flushes once, so a batch is settled in one crossing. A
JetStream ack is fire-and-forget: an ack lost on the way means the message is
delivered again after ``ack_wait`` -- consumers must be idempotent (the inbox is).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

import nats.js.api
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from providers import jetstream

__all__ = [
    "ConsumerSettings",
    "Delivery",
    "PullConsumer",
    "Settle",
    "SettleKind",
    "consumer_info",
    "fetch_batch",
    "open_consumer",
    "settle_batch",
]


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    """The stream and the durable pull consumer on it (see ``[inbox]`` in the config)."""

    stream: str
    subjects: tuple[str, ...]
    durable: str
    ack_wait_s: float
    max_deliver: int
    backoff_s: tuple[float, ...] = ()
    duplicate_window_s: float = 120.0
    filter_subject: str | None = None

    def __post_init__(self) -> None:
        if self.max_deliver < 1 or not self.ack_wait_s > 0:
            raise ValueError("max_deliver must be >= 1 and ack_wait_s > 0")
        if self.backoff_s and len(self.backoff_s) >= self.max_deliver:
            raise ValueError("backoff_s must have fewer entries than max_deliver")


@dataclass(slots=True)
class PullConsumer:
    """A bound pull subscription (an asyncio object: use it via the bridge)."""

    client: jetstream.JetStreamClient
    settings: ConsumerSettings
    subscription: JetStreamContext.PullSubscription


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivered message; ``msg`` stays on the asyncio side (settle it with :func:`settle_batch`)."""

    subject: str
    data: bytes
    headers: dict[str, str]
    stream_seq: int
    num_delivered: int
    msg: Msg = field(repr=False, compare=False)

    @property
    def msg_id(self) -> str | None:
        return self.headers.get(jetstream.MSG_ID_HEADER)


class SettleKind(enum.Enum):
    ACK = "ack"  # done: never delivered again
    NAK = "nak"  # failed now: deliver again (after ``delay_s`` if set)
    TERM = "term"  # never deliver again (poison, or dead-lettered)
    SKIP = "skip"  # send nothing: redelivered after ack_wait (simulates a lost ack)


@dataclass(frozen=True, slots=True)
class Settle:
    kind: SettleKind
    delay_s: float | None = None

    @classmethod
    def ack(cls) -> Settle:
        return cls(SettleKind.ACK)

    @classmethod
    def nak(cls, delay_s: float | None = None) -> Settle:
        return cls(SettleKind.NAK, delay_s)

    @classmethod
    def term(cls) -> Settle:
        return cls(SettleKind.TERM)

    @classmethod
    def skip(cls) -> Settle:
        return cls(SettleKind.SKIP)


def _consumer_config(settings: ConsumerSettings) -> nats.js.api.ConsumerConfig:
    return nats.js.api.ConsumerConfig(
        durable_name=settings.durable,
        ack_policy=nats.js.api.AckPolicy.EXPLICIT,
        deliver_policy=nats.js.api.DeliverPolicy.ALL,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        backoff=list(settings.backoff_s) or None,
        filter_subject=settings.filter_subject,
    )


async def open_consumer(
    client: jetstream.JetStreamClient, settings: ConsumerSettings
) -> PullConsumer:
    """asyncio side: ensure the stream, create or update the durable consumer, bind to it."""
    await jetstream.ensure_stream(
        client, settings.stream, settings.subjects, settings.duplicate_window_s
    )
    # CONSUMER.DURABLE.CREATE creates the consumer, or updates the editable fields
    # (ack_wait, max_deliver, backoff) of an existing one with the same name.
    await client.js.add_consumer(settings.stream, config=_consumer_config(settings))
    subscription = await client.js.pull_subscribe_bind(
        durable=settings.durable, stream=settings.stream
    )
    return PullConsumer(client=client, settings=settings, subscription=subscription)


async def consumer_info(consumer: PullConsumer) -> nats.js.api.ConsumerInfo:
    """asyncio side: the server's view of the consumer (pending, ack-pending, redelivered)."""
    settings = consumer.settings
    info: nats.js.api.ConsumerInfo = await consumer.client.js.consumer_info(
        settings.stream, settings.durable
    )
    return info


async def fetch_batch(consumer: PullConsumer, batch: int, timeout_s: float) -> list[Delivery]:
    """asyncio side: up to ``batch`` messages waiting at most ``timeout_s``; [] when there are none."""
    try:
        messages = await consumer.subscription.fetch(batch, timeout=timeout_s)
    except TimeoutError:
        # No message: nats' TimeoutError, or asyncio's plain one when nats-py's own
        # wait for the pull's first message runs out (both are the builtin class).
        return []
    deliveries = []
    for msg in messages:
        meta = msg.metadata
        deliveries.append(
            Delivery(
                subject=msg.subject,
                data=bytes(msg.data),
                headers=dict(msg.headers or {}),
                stream_seq=int(meta.sequence.stream),
                num_delivered=int(meta.num_delivered),
                msg=msg,
            )
        )
    return deliveries


async def settle_batch(
    consumer: PullConsumer, decisions: Sequence[tuple[Delivery, Settle]]
) -> None:
    """asyncio side: send each decision's ack/nak/term, then flush once."""
    for delivery, decision in decisions:
        msg = delivery.msg
        if decision.kind is SettleKind.ACK:
            await msg.ack()
        elif decision.kind is SettleKind.NAK:
            await msg.nak(delay=decision.delay_s)
        elif decision.kind is SettleKind.TERM:
            await msg.term()
    if any(d.kind is not SettleKind.SKIP for _, d in decisions):
        await consumer.client.nc.flush()
