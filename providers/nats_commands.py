"""The dispatch command subject on the asyncio side of the bridge (nats-py).

Each function is one unit of work for :func:`providers.bridge.run`
(DESIGN.md section 7: cross the bridge once per batch, never per message):
:class:`~actors.dispatch_commands.DispatchCommands` subscribes once, then each
turn takes a batch with :func:`next_commands` and answers it with one
:func:`publish_replies`. Messages are copied out of nats-py's types into
:class:`Command` / :class:`Reply`, so nothing above this module touches nats-py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import nats.errors
from nats.aio.subscription import Subscription

from providers import jetstream

__all__ = [
    "Command",
    "Reply",
    "Subscription",
    "next_commands",
    "publish_replies",
    "subscribe",
    "unsubscribe",
]


@dataclass(frozen=True, slots=True)
class Command:
    """One request off the subject (copied out of nats-py's message)."""

    subject: str
    reply: str
    data: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Reply:
    subject: str
    data: bytes
    headers: dict[str, str]


async def subscribe(
    client: jetstream.JetStreamClient, subject: str, queue: str, pending_msgs_limit: int
) -> Subscription:
    """asyncio side: a queue-group subscription without a callback (read by :func:`next_commands`)."""
    subscription: Subscription = await client.nc.subscribe(
        subject, queue=queue, pending_msgs_limit=pending_msgs_limit
    )
    return subscription


async def unsubscribe(subscription: Subscription) -> None:
    """asyncio side: leave the queue group (buffered requests are dropped; requesters time out)."""
    await subscription.unsubscribe()


async def next_commands(subscription: Subscription, batch: int, timeout_s: float) -> list[Command]:
    """asyncio side: wait up to ``timeout_s`` for one request, then take what is buffered
    (at most ``batch`` in all); [] when none came."""
    try:
        first = await subscription.next_msg(timeout=timeout_s)
    except nats.errors.TimeoutError:
        return []
    messages = [first]
    while len(messages) < batch and subscription.pending_msgs > 0:
        messages.append(await subscription.next_msg(timeout=None))
    return [
        Command(
            subject=msg.subject,
            reply=msg.reply,
            data=bytes(msg.data),
            headers=dict(msg.headers or {}),
        )
        for msg in messages
    ]


async def publish_replies(client: jetstream.JetStreamClient, replies: Sequence[Reply]) -> None:
    """asyncio side: publish every reply, then flush once."""
    for reply in replies:
        await client.nc.publish(reply.subject, reply.data, headers=reply.headers)
    await client.nc.flush()
