"""NATS JetStream for the outbox relay (asyncio side: cross the bridge once per unit of work).

Three units of work, each one asyncio coroutine for :func:`providers.bridge.run`::

    client = await run(connect, url, service="nats")            # fail-fast options
    info = await run(ensure_stream, client, "TRIAGE_EVENTS", ["triage.events.>"], 120.0)
    results = await run(publish_batch, client, items, 1.0)      # one crossing per batch

:func:`publish_batch` sends every item of a batch, in order, on the one
connection (so JetStream stores them in that order), then awaits all the acks
concurrently under one timeout. The acks come back on ONE subscription per
client (:class:`AckInbox`: ``_INBOX.<nuid>.*``, each message replying to its own
token under it), decoded with msgspec into :class:`Ack`; a batch waits on one
future, resolved when its last ack is in. A stream's error answer (e.g. 10054
"message size exceeds maximum") is that message's
:class:`nats.js.errors.APIError`. Every message carries ``Nats-Msg-Id``: a
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
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import msgspec
import nats
import nats.errors
import nats.js.api
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext

from engine.errors import ProviderUnavailable

__all__ = [
    "MSG_ID_HEADER",
    "Ack",
    "AckInbox",
    "JetStreamClient",
    "PublishItem",
    "StoredMessage",
    "StreamSettings",
    "close",
    "connect",
    "delete_messages",
    "ensure_stream",
    "iter_stream",
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


class PublishItem(msgspec.Struct, frozen=True):
    """One message: ``msg_id`` becomes the ``Nats-Msg-Id`` header (the outbox id)."""

    msg_id: str
    subject: str
    payload: bytes
    headers: dict[str, str] = msgspec.field(default_factory=dict)


class Ack(msgspec.Struct, frozen=True):
    """A stream's acknowledgement of one publish (``duplicate``: it had the ``Nats-Msg-Id``)."""

    stream: str
    seq: int
    duplicate: bool = False
    domain: str | None = None


class _ErrorAnswer(msgspec.Struct, frozen=True):
    code: int = 0
    err_code: int | None = None
    description: str = ""


class _Answer(msgspec.Struct, frozen=True):
    """What a stream answers to a publish: an ack, or ``error``."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    domain: str | None = None
    error: _ErrorAnswer | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """What the relay checks at start: the stream's dedupe window and durability."""

    name: str
    subjects: tuple[str, ...]
    duplicate_window_s: float
    replicas: int
    storage: str
    max_msg_size: int = -1  # bytes; -1: no limit but the server's max payload


class _Waiter:
    """One batch on the inbox: a result per item, how many acks are still due, one future."""

    __slots__ = ("done", "left", "results", "tokens")

    def __init__(self, size: int, done: asyncio.Future[None]) -> None:
        self.results: list[Ack | Exception | None] = [None] * size
        self.left = size
        self.done = done
        self.tokens: list[str] = []


def _api_error(answer: _ErrorAnswer) -> Exception:
    """nats-py's error class for a stream's error answer (ServiceUnavailableError for 503...)."""
    fields = {"code": answer.code, "err_code": answer.err_code, "description": answer.description}
    try:
        nats.js.errors.APIError.from_error(fields)  # raises the error; it never returns
    except nats.js.errors.APIError as exc:
        return exc
    return nats.js.errors.APIError(  # pragma: no cover - from_error always raises
        code=answer.code, err_code=answer.err_code, description=answer.description
    )


def _result(msg: Msg) -> Ack | Exception:
    """One reply on the inbox as a publish result."""
    if not msg.data:  # a status message: 503 is "no stream listens on this subject"
        status = (msg.headers or {}).get(nats.js.api.Header.STATUS, "")
        if status == "503":
            return nats.errors.NoRespondersError()
        code = int(status) if status.isdigit() else None
        return nats.js.errors.APIError(code=code, description=f"status {status or 'missing'}")
    try:
        answer = _decode_answer(msg.data)
    except msgspec.DecodeError as exc:
        return nats.js.errors.APIError(description=f"undecodable publish ack: {exc}")
    if answer.error is not None:
        return _api_error(answer.error)
    return Ack(answer.stream, answer.seq, answer.duplicate, answer.domain)


class AckInbox:
    """The client's one subscription for publish acks (asyncio side).

    Subscribed to ``<prefix>*`` once; every published message replies to
    ``<prefix><token>``, a fresh token per message, which maps to its batch's
    :class:`_Waiter` and its place in the batch. An ack for a token nobody
    awaits any more (the batch gave up on it) is dropped.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._cut = len(prefix)
        self._counter = 0
        self._waiting: dict[str, tuple[_Waiter, int]] = {}

    @property
    def awaited(self) -> int:
        """Acks due now (0 between batches: nothing outlives :func:`publish_batch`)."""
        return len(self._waiting)

    def reply_to(self, waiter: _Waiter, index: int) -> str:
        self._counter += 1
        token = str(self._counter)
        self._waiting[token] = (waiter, index)
        waiter.tokens.append(token)
        return self.prefix + token

    def forget(self, waiter: _Waiter) -> None:
        for token in waiter.tokens:
            self._waiting.pop(token, None)

    async def on_reply(self, msg: Msg) -> None:
        entry = self._waiting.pop(msg.subject[self._cut :], None)
        if entry is None:
            return
        waiter, index = entry
        waiter.results[index] = _result(msg)
        waiter.left -= 1
        if waiter.left <= 0 and not waiter.done.done():
            waiter.done.set_result(None)


@dataclass(slots=True)
class JetStreamClient:
    """A connected client and its JetStream context (asyncio objects: use them via the bridge)."""

    nc: NATS
    js: JetStreamContext
    acks: AckInbox | None = field(default=None, repr=False)

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


async def _ack_inbox(client: JetStreamClient) -> AckInbox:
    """The client's ack inbox, subscribed on first use."""
    inbox = client.acks
    if inbox is None:
        inbox = AckInbox(client.nc.new_inbox() + ".")
        client.acks = inbox  # before the await: a concurrent first batch shares it
        try:
            await client.nc.subscribe(inbox.prefix + "*", cb=inbox.on_reply)
        except BaseException:
            client.acks = None
            raise
    return inbox


async def publish_batch(
    client: JetStreamClient, items: Sequence[PublishItem], ack_timeout_s: float
) -> list[Ack | Exception]:
    """asyncio side: publish ``items`` in order and await every ack concurrently.

    Returns one entry per item, in order: its :class:`Ack` (``duplicate`` set when
    the stream had it already) or the exception its publish raised (a
    :class:`TimeoutError` when no ack came within ``ack_timeout_s`` of the last
    send: "maybe stored"; the stream's :class:`~nats.js.errors.APIError` when it
    refused the message). Raises :class:`ProviderUnavailable` before sending
    anything when the client is not connected.

    The messages go out one after another, each replying to its own token on the
    client's :class:`AckInbox`; a single wait on the batch's future bounds all
    the acks. On any exit the batch's tokens are forgotten, so nothing of the
    batch outlives the call.
    """
    if not client.connected:
        raise ProviderUnavailable("nats: not connected (reconnecting in the background)")
    if not items:
        return []
    inbox = await _ack_inbox(client)
    waiter = _Waiter(len(items), asyncio.get_running_loop().create_future())
    publish = client.nc.publish
    unsent: Exception | None = None
    sent = 0
    try:
        for index, item in enumerate(items):
            headers = dict(item.headers)
            headers[MSG_ID_HEADER] = item.msg_id
            try:
                await publish(
                    item.subject, item.payload, reply=inbox.reply_to(waiter, index), headers=headers
                )
            except Exception as exc:  # the connection went away mid-batch: the rest is unsent
                unsent = exc
                break
            sent += 1
        waiter.left -= len(items) - sent  # those will never be answered
        if waiter.left > 0:
            await asyncio.wait([waiter.done], timeout=ack_timeout_s)
    finally:
        inbox.forget(waiter)
        if not waiter.done.done():
            waiter.done.cancel()
    timeout = TimeoutError(f"no ack within {ack_timeout_s:g}s")
    results: list[Ack | Exception] = []
    for index, result in enumerate(waiter.results):
        if result is not None:
            results.append(result)
        elif index < sent:
            results.append(timeout)
        else:
            assert unsent is not None
            results.append(unsent)
    return results


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
) -> Ack | Exception:
    """asyncio side: publish one item as a request of its own and return its ack or its error.

    Used to learn why a message of a batch got no ack at all: it is sent again
    alone, outside the inbox (``Nats-Msg-Id`` makes the retry safe).
    """
    headers = {**item.headers, MSG_ID_HEADER: item.msg_id}
    try:
        ack = await client.js.publish(
            item.subject, item.payload, timeout=ack_timeout_s, headers=headers
        )
    except Exception as exc:
        return exc
    return Ack(ack.stream, int(ack.seq), bool(ack.duplicate), ack.domain)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message read back from a stream (verification: chaos scenarios, benches, tests)."""

    stream_seq: int
    subject: str
    msg_id: str
    headers: dict[str, str]
    payload: bytes


async def iter_stream(
    client: JetStreamClient, stream: str, *, batch: int = 1000, idle_timeout_s: float = 0.5
) -> AsyncIterator[StoredMessage]:
    """asyncio side: every message stored in ``stream``, in stream order (an ephemeral consumer).

    Reads until the stream's message count at the call is reached, or no message
    arrives for ``idle_timeout_s``; holds one batch at a time. Duplicates stored by
    the stream show up twice.
    """
    info = await client.js.stream_info(stream)
    expected = int(info.state.messages)
    if expected == 0:
        return
    config = nats.js.api.ConsumerConfig(
        ack_policy=nats.js.api.AckPolicy.NONE,
        deliver_policy=nats.js.api.DeliverPolicy.ALL,
        inactive_threshold=30.0,
    )
    sub = await client.js.pull_subscribe("", stream=stream, config=config)
    read = 0
    try:
        while read < expected:
            try:
                msgs = await sub.fetch(batch=min(batch, expected - read), timeout=idle_timeout_s)
            except TimeoutError:
                # Nothing more: an empty fetch raises nats' TimeoutError, or asyncio's
                # plain one when nats-py's own wait runs out first (both are builtin).
                break
            for msg in msgs:
                read += 1
                headers = dict(msg.headers or {})
                yield StoredMessage(
                    stream_seq=int(msg.metadata.sequence.stream),
                    subject=msg.subject,
                    msg_id=headers.get(MSG_ID_HEADER, ""),
                    headers=headers,
                    payload=msg.data,
                )
    finally:
        await sub.unsubscribe()


async def read_stream(
    client: JetStreamClient, stream: str, *, batch: int = 1000, idle_timeout_s: float = 0.5
) -> list[StoredMessage]:
    """asyncio side: :func:`iter_stream` as a list (verification: chaos, benches, tests)."""
    return [
        m async for m in iter_stream(client, stream, batch=batch, idle_timeout_s=idle_timeout_s)
    ]


async def delete_messages(client: JetStreamClient, stream: str, seqs: Sequence[int]) -> int:
    """asyncio side: delete (and overwrite) the messages ``seqs`` of ``stream``; how many were there.

    A message already gone counts 0 (a delete repeated is a no-op); any other refusal
    (``deny_delete``, no such stream) raises the server's
    :class:`nats.js.errors.APIError`.
    """
    deleted = 0
    for seq in seqs:
        try:
            deleted += bool(await client.js.delete_msg(stream, seq))
        except nats.js.errors.APIError as exc:
            if "no message found" not in (exc.description or ""):
                raise
    return deleted
