"""NATS JetStream for the outbox relay (asyncio side: cross the bridge once per unit of work).

Three units of work, each one asyncio coroutine for :func:`providers.bridge.run`::

    client = await run(connect, url, service="nats")            # fail-fast options
    info = await run(ensure_stream, client, "TRIAGE_EVENTS", ["triage.events.>"], 120.0)
    results = await run(publish_batch, client, items, 1.0)      # one crossing per batch

:func:`publish_batch` sends every item of a batch, in order, on the one
connection (so JetStream stores them in that order), then awaits all the acks
concurrently under one timeout. Every message carries ``Nats-Msg-Id``: a
publish that timed out during an outage may still be stored after the client
reconnects (it sat in the client's buffer), and the stream's duplicate window
turns the retry into a no-op ack with ``duplicate=True`` (DESIGN.md section 7).

Fail-fast: while the client is not connected (the server is gone and it is
reconnecting in the background), :func:`publish_batch` raises
:class:`~engine.errors.ProviderUnavailable` at once instead of buffering the
batch and waiting for every ack to time out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import nats
import nats.errors
import nats.js.api
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.js.client import JetStreamContext

from engine.errors import ProviderUnavailable

__all__ = [
    "MSG_ID_HEADER",
    "JetStreamClient",
    "PublishItem",
    "StoredMessage",
    "StreamSettings",
    "close",
    "connect",
    "ensure_stream",
    "publish_batch",
    "publish_one",
    "read_stream",
    "stream_settings",
    "subject_matches",
]

MSG_ID_HEADER = "Nats-Msg-Id"

# Reconnect forever in the background, quickly: the relay's breaker, not the
# client, decides when to try publishing again.
_RECONNECT_WAIT_S = 0.25
# Bytes a disconnected client may buffer before refusing publishes outright.
_PENDING_SIZE = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PublishItem:
    """One message: ``msg_id`` becomes the ``Nats-Msg-Id`` header (the outbox id)."""

    msg_id: str
    subject: str
    payload: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """What the relay checks at start: the stream's dedupe window and durability."""

    name: str
    subjects: tuple[str, ...]
    duplicate_window_s: float
    replicas: int
    storage: str
    max_msg_size: int = -1  # bytes; -1: no limit but the server's max payload


@dataclass(slots=True)
class JetStreamClient:
    """A connected client and its JetStream context (asyncio objects: use them via the bridge)."""

    nc: NATS
    js: JetStreamContext

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)


async def _quiet(*_args: object) -> None:
    """Connection callbacks: the relay's breaker and lag detector report outages, not nats-py."""


async def connect(
    url: str, *, name: str = "triage", connect_timeout_s: float = 2.0
) -> JetStreamClient:
    """asyncio side: connect with fail-fast options (bounded connect, background reconnect forever)."""
    nc = await nats.connect(
        url,
        name=name,
        connect_timeout=connect_timeout_s,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=_RECONNECT_WAIT_S,
        pending_size=_PENDING_SIZE,
        error_cb=_quiet,
        disconnected_cb=_quiet,
        reconnected_cb=_quiet,
        closed_cb=_quiet,
    )
    return JetStreamClient(nc=nc, js=nc.jetstream())


async def close(client: JetStreamClient) -> None:
    """asyncio side: close the connection (pending publishes are flushed if possible)."""
    if not client.nc.is_closed:
        await client.nc.close()


def _settings(info: nats.js.api.StreamInfo) -> StreamSettings:
    config = info.config
    storage = getattr(config.storage, "value", config.storage) or "file"  # enum or plain str
    return StreamSettings(
        name=config.name or "",
        subjects=tuple(config.subjects or ()),
        duplicate_window_s=float(config.duplicate_window or 0.0),
        replicas=int(config.num_replicas or 1),
        storage=str(storage),
        max_msg_size=int(config.max_msg_size or -1),
    )


async def stream_settings(client: JetStreamClient, stream: str) -> StreamSettings:
    """asyncio side: the settings of an existing ``stream``."""
    return _settings(await client.js.stream_info(stream))


async def ensure_stream(
    client: JetStreamClient,
    stream: str,
    subjects: Sequence[str],
    duplicate_window_s: float,
) -> StreamSettings:
    """asyncio side: create ``stream`` (or widen its subjects and window) and return its settings.

    An existing stream keeps its replicas and storage (operators own those); its
    duplicate window is raised to ``duplicate_window_s`` if shorter, never lowered.
    """
    try:
        info = await client.js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        config = nats.js.api.StreamConfig(
            name=stream, subjects=list(subjects), duplicate_window=duplicate_window_s
        )
        return _settings(await client.js.add_stream(config))
    config = info.config
    wanted = sorted({*(config.subjects or ()), *subjects})
    if (
        wanted != sorted(config.subjects or ())
        or (config.duplicate_window or 0) < duplicate_window_s
    ):
        config.subjects = wanted
        config.duplicate_window = max(float(config.duplicate_window or 0), duplicate_window_s)
        info = await client.js.update_stream(config)
    return _settings(info)


async def publish_batch(
    client: JetStreamClient, items: Sequence[PublishItem], ack_timeout_s: float
) -> list[nats.js.api.PubAck | Exception]:
    """asyncio side: publish ``items`` in order and await every ack concurrently.

    Returns one entry per item, in order: its ``PubAck`` (``duplicate`` set when
    the stream had it already) or the exception its publish raised (a
    :class:`TimeoutError` when no ack came within ``ack_timeout_s`` of the last
    send: "maybe stored"). Raises :class:`ProviderUnavailable` before sending
    anything when the client is not connected.

    The messages go out one after another with ``publish_async`` (one reply
    subscription, one future per message, no timer per message); then a single
    wait bounds all the acks of the batch. On any exit, acks still awaited are
    given up (their futures cancelled), so nothing of the batch outlives the call.
    """
    if not client.connected:
        raise ProviderUnavailable("nats: not connected (reconnecting in the background)")
    js = client.js
    futures: list[asyncio.Future[nats.js.api.PubAck]] = []
    unsent: Exception | None = None
    try:
        for item in items:
            headers = {**item.headers, MSG_ID_HEADER: item.msg_id}
            try:
                futures.append(await js.publish_async(item.subject, item.payload, headers=headers))
            except Exception as exc:  # the connection went away mid-batch: the rest is unsent
                unsent = exc
                break
        if futures:
            await asyncio.wait(futures, timeout=ack_timeout_s)
        results: list[nats.js.api.PubAck | Exception] = []
        for future in futures:
            if not future.done():
                results.append(TimeoutError(f"no ack within {ack_timeout_s:g}s"))
            elif future.cancelled():
                results.append(TimeoutError("ack wait cancelled"))
            else:
                error = future.exception()
                if error is None:
                    results.append(future.result())
                elif isinstance(error, Exception):
                    results.append(error)
                else:  # pragma: no cover - a BaseException set on a future
                    raise error
        missing = len(items) - len(results)
        if missing:
            assert unsent is not None
            results.extend([unsent] * missing)
        return results
    finally:
        for future in futures:
            if not future.done():
                future.cancel()


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether ``subject`` matches the NATS subject ``pattern`` (``*`` one token, ``>`` the rest)."""
    want = pattern.split(".")
    have = subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(have) == len(want)


async def publish_one(
    client: JetStreamClient, item: PublishItem, ack_timeout_s: float
) -> nats.js.api.PubAck | Exception:
    """asyncio side: publish one item as a request and return its ack or its error.

    Used to learn why a message of a batch got no ack: nats-py's ``publish_async``
    (2.16) loses a stream's error answer (e.g. 10054 "message size exceeds maximum
    allowed") and the message just times out; the request-reply ``publish`` raises
    the :class:`nats.js.errors.APIError`. ``Nats-Msg-Id`` makes the retry safe.
    """
    headers = {**item.headers, MSG_ID_HEADER: item.msg_id}
    try:
        return await client.js.publish(
            item.subject, item.payload, timeout=ack_timeout_s, headers=headers
        )
    except Exception as exc:
        return exc


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message read back from a stream (verification: chaos scenarios, benches, tests)."""

    stream_seq: int
    subject: str
    msg_id: str
    headers: dict[str, str]
    payload: bytes


async def read_stream(
    client: JetStreamClient, stream: str, *, batch: int = 1000, idle_timeout_s: float = 0.5
) -> list[StoredMessage]:
    """asyncio side: every message stored in ``stream``, in stream order (an ephemeral consumer).

    Reads until the stream's message count at the call is reached, or no message
    arrives for ``idle_timeout_s``. Duplicates stored by the stream show up twice.
    """
    info = await client.js.stream_info(stream)
    expected = int(info.state.messages)
    config = nats.js.api.ConsumerConfig(
        ack_policy=nats.js.api.AckPolicy.NONE,
        deliver_policy=nats.js.api.DeliverPolicy.ALL,
        inactive_threshold=30.0,
    )
    sub = await client.js.pull_subscribe("", stream=stream, config=config)
    out: list[StoredMessage] = []
    try:
        while len(out) < expected:
            try:
                msgs = await sub.fetch(
                    batch=min(batch, expected - len(out)), timeout=idle_timeout_s
                )
            except nats.errors.TimeoutError:
                break  # nothing more (a no-message fetch raises nats' TimeoutError)
            for msg in msgs:
                headers = dict(msg.headers or {})
                out.append(
                    StoredMessage(
                        stream_seq=int(msg.metadata.sequence.stream),
                        subject=msg.subject,
                        msg_id=headers.get(MSG_ID_HEADER, ""),
                        headers=headers,
                        payload=msg.data,
                    )
                )
    finally:
        await sub.unsubscribe()
    return out
