"""Push delivery feedback, and what both push adapters share.

Feedback arrives as a Google Pub/Sub pull subscription (REST wire format)::

    POST {base_url}/v1/{subscription_path}:pull         {"maxMessages": N}
      -> {"receivedMessages": [{"ackId": "...",
                                "message": {"data": "<base64 JSON>",
                                            "attributes": {...},
                                            "messageId": "...", "publishTime": "..."}}]}
    POST {base_url}/v1/{subscription_path}:acknowledge  {"ackIds": ["...", ...]}

Each message's ``data`` is one :class:`PushFeedback` as JSON. :class:`FeedbackSource`
pulls ``(receipts, ack_ids)``; the caller records the receipts and then calls
:meth:`FeedbackSource.ack`, so nothing is acknowledged before it is stored
(at-least-once). An item that cannot be read becomes a typed
:class:`~providers.receipts.MalformedReceipt` (counted, handed to ``on_malformed``)
and its ack id is returned too: redelivering it would never help.

A session is one HTTP client. A stalled session (pulls hang, data stops flowing)
is recovered by :meth:`FeedbackSource.reset`: close the client and open a fresh
one, with a new session id — the ``x-triage-session`` header, in the spirit of
Pub/Sub's streaming-pull ``client_id``, that lets the server tell sessions apart
across reconnects.

Shared by the push adapters: :func:`push_platform` (the dispatcher routes by it),
:func:`post_bytes`; :func:`transport_error` and :func:`parse_retry_after` are
re-exported from :mod:`providers.http_errors`, where every HTTP adapter gets them.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import msgspec
import trio

from engine.errors import ProviderUnavailable, Rejected
from providers.channel import DeliveryState, Receipt, split_reference
from providers.http_errors import http_error, parse_retry_after, transport_error
from providers.receipts import MalformedReceipt

__all__ = [
    "PUSH_PLATFORMS",
    "SESSION_HEADER",
    "FeedbackSource",
    "MalformedPull",
    "PushFeedback",
    "parse_retry_after",
    "post_bytes",
    "push_platform",
    "transport_error",
]

PUSH_PLATFORMS = ("fcm", "apns")
SESSION_HEADER = "x-triage-session"
# FCM registration tokens and APNs device tokens (hex) both fit this alphabet; the
# token goes into a URL path (APNs) so nothing else may pass.
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_\-:.]+")


def push_platform(recipient: str) -> tuple[str, str]:
    """``("fcm" | "apns", device_token)`` from a push recipient ``"<platform>:<token>"``.

    ``Rejected`` names the problem when the recipient is not one.
    """
    platform, sep, token = recipient.partition(":")
    if not sep or platform not in PUSH_PLATFORMS:
        raise Rejected(
            f"push recipient must be 'fcm:<token>' or 'apns:<token>', got {recipient[:40]!r}"
        )
    if not _TOKEN_CHARS.fullmatch(token):
        raise Rejected(f"push recipient {platform!r}: device token is empty or has bad characters")
    return platform, token


async def post_bytes(
    client: httpx.AsyncClient, url: str, *, content: bytes, headers: dict[str, str]
) -> httpx.Response:
    """``POST`` ``content`` and read the answer; httpx errors propagate.

    The body is sent from a plain iterator, not httpx's async-generator stream:
    when a write fails mid-request httpcore abandons the body iterator, and an
    abandoned async generator raises a ``ResourceWarning`` when collected.
    """
    request = client.build_request("POST", url, content=content, headers=headers)
    request.stream = _Body(content)
    return await client.send(request)


class _Body(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self._data = data

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _Once(self._data)


class _Once:
    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = data

    def __aiter__(self) -> _Once:
        return self

    async def __anext__(self) -> bytes:
        if self._data is None:
            raise StopAsyncIteration
        data, self._data = self._data, None
        return data


class PushFeedback(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One feedback item: the JSON inside a Pub/Sub message's ``data``."""

    state: DeliveryState
    reference: str  # the wire reference "<tenant_id>:<client_ref>"
    occurred_at: float  # Unix time
    provider_ref: str | None = None
    token: str | None = None
    reason: str | None = None


# Pub/Sub's REST wire names (camelCase) as they are.


class _PubsubMessage(msgspec.Struct):
    data: str = ""
    attributes: dict[str, str] = msgspec.field(default_factory=dict)
    messageId: str | None = None
    publishTime: str | None = None


class _ReceivedMessage(msgspec.Struct):
    ackId: str
    message: _PubsubMessage


class _PullAnswer(msgspec.Struct):
    receivedMessages: list[_ReceivedMessage] = msgspec.field(default_factory=list)


class MalformedPull(MalformedReceipt, ProviderUnavailable):
    """The subscription answered something that is not a pull answer.

    A :class:`~providers.receipts.MalformedReceipt` to whoever reads receipts, and a
    transient ``ProviderUnavailable`` to whoever pulls (the next pull may be fine).
    """


class FeedbackSource:
    """Pulls push feedback from one Pub/Sub-style subscription.

    ``name`` is the provider the receipts are attributed to (``Receipt.provider``).
    :meth:`pull` answers ``(receipts, ack_ids)``; an item that cannot be read becomes
    a :class:`~providers.receipts.MalformedReceipt` — counted in ``malformed``, kept
    in ``last_malformed`` (the latest pull's), passed to ``on_malformed`` — and its
    ack id is still returned, since redelivering it would never help.
    ``timeout_s`` bounds each HTTP call of the session's client (a stalled pull ends
    in ``ProviderTimeout``). ``client`` is an optional first session that the caller
    owns (never closed here); every session :meth:`reset` opens is made by
    ``client_factory`` (default: an ``httpx.AsyncClient`` with ``timeout_s`` and one
    TLS context shared by all sessions) and closed here.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        subscription_path: str,
        timeout_s: float,
        max_messages: int,
        client: httpx.AsyncClient | None = None,
        *,
        client_factory: Callable[[], httpx.AsyncClient] | None = None,
        on_malformed: Callable[[MalformedReceipt], None] | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"feedback source {name!r}: timeout_s must be > 0")
        if max_messages < 1:
            raise ValueError(f"feedback source {name!r}: max_messages must be >= 1")
        self.name = name
        self.timeout_s = timeout_s
        self.max_messages = max_messages
        root = f"{base_url.rstrip('/')}/v1/{subscription_path.strip('/')}"
        self._pull_url = f"{root}:pull"
        self._ack_url = f"{root}:acknowledge"
        if client_factory is None:
            # Loading the CA bundle costs ~70 ms of blocked event loop per client here:
            # load it once, so reset() opens a session in ~2 ms.
            tls = httpx.create_ssl_context()

            def client_factory() -> httpx.AsyncClient:
                return httpx.AsyncClient(timeout=timeout_s, verify=tls)

        self._factory = client_factory
        self._client = client if client is not None else self._factory()
        self._owned = client is None
        self.session = uuid.uuid4().hex
        self.resets = 0
        self._on_malformed = on_malformed
        self.malformed = 0
        self.last_malformed: list[MalformedReceipt] = []

    async def pull(self) -> tuple[list[Receipt], list[str]]:
        """One pull of up to ``max_messages`` items: ``(receipts, ack_ids)``, the ack ids
        of every item pulled (readable or not). Nothing is acknowledged here."""
        answer = await self._post(self._pull_url, {"maxMessages": self.max_messages})
        try:
            pulled = msgspec.json.decode(answer, type=_PullAnswer)
        except msgspec.DecodeError as exc:
            raise MalformedPull(f"feedback {self.name!r}: not a pull answer: {exc}") from exc
        receipts: list[Receipt] = []
        malformed: list[MalformedReceipt] = []
        for item in pulled.receivedMessages:
            try:
                receipts.append(self._receipt(item.message))
            except MalformedReceipt as exc:
                malformed.append(exc)
                if self._on_malformed is not None:
                    self._on_malformed(exc)
        self.malformed += len(malformed)
        self.last_malformed = malformed
        return receipts, [item.ackId for item in pulled.receivedMessages]

    async def ack(self, ack_ids: list[str]) -> None:
        """Acknowledge items the caller has recorded; they are not redelivered."""
        if ack_ids:
            await self._post(self._ack_url, {"ackIds": ack_ids})

    async def reset(self) -> None:
        """Close the session and open a fresh one (new connections, new session id)."""
        old, owned = self._client, self._owned
        self._client, self._owned = self._factory(), True
        self.session = uuid.uuid4().hex
        self.resets += 1
        if owned:
            await self._close(old)

    async def aclose(self) -> None:
        if self._owned:
            await self._close(self._client)

    async def _close(self, client: httpx.AsyncClient) -> None:
        # Shielded, so a cancelled restart still closes the old session's sockets;
        # bounded by timeout_s, so a wedged close cannot hang the restart.
        with trio.move_on_after(self.timeout_s, shield=True):
            await client.aclose()

    def _receipt(self, message: _PubsubMessage) -> Receipt:
        try:
            raw = base64.b64decode(message.data, validate=True)
            item = msgspec.json.decode(raw, type=PushFeedback)
            tenant_id, client_ref = split_reference(item.reference)
        except (binascii.Error, msgspec.DecodeError, ValueError) as exc:
            raise MalformedReceipt(
                f"feedback {self.name!r} message {message.messageId!r}: {exc}"
            ) from exc
        return Receipt(
            provider=self.name,
            state=item.state,
            provider_ref=item.provider_ref,
            client_ref=client_ref,
            tenant_id=tenant_id,
            reason=item.reason,
            occurred_at=item.occurred_at,
        )

    async def _post(self, url: str, body: dict[str, object]) -> bytes:
        who = f"feedback {self.name!r}"
        try:
            response = await post_bytes(
                self._client,
                url,
                content=msgspec.json.encode(body),
                headers={"content-type": "application/json", SESSION_HEADER: self.session},
            )
        except httpx.TransportError as exc:
            raise transport_error(exc, who) from exc
        if response.status_code == 200:
            return response.content
        raise http_error(response, who, response.text[:200])
