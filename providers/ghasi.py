"""Ghasi-SMS-Gateway: the primary SMS provider, a generic HTTP JSON gateway.

Everything that varies between deployments of such a gateway — paths, the auth
header and scheme, the JSON field names, the receipt headers — is a field of
:class:`GhasiWire`, so config can point the adapter at any gateway of this shape.
With the defaults::

    POST {base_url}/api/v1/messages         Authorization: Bearer KEY
         Idempotency-Key: KEY               {"to", "text", "sender", "client_ref"}
      → 2xx {"message_id", "status"}
    GET  {base_url}/api/v1/messages?client_ref=REF       (status query: status / query_status)
      → 200 {"message_id", "status"} | 404

    DLR: POST (to us) {"message_id", "client_ref", "status", "error_code", "timestamp"}
         X-Ghasi-Timestamp: T
         X-Ghasi-Signature: hex(HMAC-SHA256(secret, T + "." + raw_body))

``client_ref`` on the wire is :attr:`Message.reference` (``tenant:dispatch``).
Answers map onto the engine's tree as drawn in :mod:`providers.channel`; a 2xx whose
body cannot be read is ``ProviderTimeout`` (the gateway may have taken the message).
The httpx timeout (``timeout_s``) is the deadline: the caller may rely on it.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

import httpx
import msgspec

from engine.errors import ProviderTimeout
from providers.channel import (
    Accepted,
    ChannelName,
    DeliveryState,
    Message,
    Receipt,
    StatusAnswer,
    split_reference,
)
from providers.http_errors import http_error, parse_retry_after, transport_error
from providers.http_transport import Http1Transport
from providers.receipts import (
    BadSignature,
    MalformedReceipt,
    header,
    signatures_match,
    signed_at,
)

__all__ = [
    "GHASI_STATES",
    "GhasiAdapter",
    "GhasiWire",
    "ghasi_signature",
    "http_error",
    "parse_ghasi_receipt",
    "parse_retry_after",
]


class GhasiWire(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The gateway's paths, auth and field names (shared by adapter and emulator)."""

    send_path: str = "/api/v1/messages"
    status_path: str = "/api/v1/messages"
    auth_header: str = "Authorization"
    auth_scheme: str = "Bearer"  # "" sends the bare key
    idempotency_header: str = "Idempotency-Key"
    to_field: str = "to"
    text_field: str = "text"
    sender_field: str = "sender"
    ref_field: str = "client_ref"
    id_field: str = "message_id"
    status_field: str = "status"
    error_field: str = "error_code"
    timestamp_field: str = "timestamp"
    signature_header: str = "X-Ghasi-Signature"
    timestamp_header: str = "X-Ghasi-Timestamp"

    def auth_value(self, api_key: str) -> str:
        return f"{self.auth_scheme} {api_key}" if self.auth_scheme else api_key


#: the gateway's message states → ours (status answers and DLRs)
GHASI_STATES: Mapping[str, DeliveryState] = {
    "accepted": DeliveryState.ACCEPTED,
    "queued": DeliveryState.ACCEPTED,
    "sent": DeliveryState.ACCEPTED,
    "delivered": DeliveryState.DELIVERED,
    "failed": DeliveryState.FAILED,
    "expired": DeliveryState.FAILED,
    "rejected": DeliveryState.UNDELIVERABLE,
    "undeliverable": DeliveryState.UNDELIVERABLE,
}


def ghasi_signature(secret: str, timestamp: str, body: bytes) -> str:
    """``hex(HMAC-SHA256(secret, timestamp + "." + body))``."""
    signed = timestamp.encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


class GhasiAdapter:
    """The Ghasi gateway as a :class:`providers.channel.Adapter` (SMS)."""

    channel = ChannelName.SMS

    def __init__(
        self,
        name: str = "ghasi",
        *,
        base_url: str,
        api_key: str,
        sender: str,
        timeout_s: float,
        wire: GhasiWire | None = None,
        client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.wire = wire or GhasiWire()
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._sender = sender
        self._timeout = httpx.Timeout(timeout_s)
        # Without a client: its own, on ``transport`` (default: an HTTP/1.1 pool).
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(transport=transport or Http1Transport())

    def _headers(self) -> dict[str, str]:
        return {self.wire.auth_header: self.wire.auth_value(self._api_key)}

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(
                method, f"{self._base_url}{path}", timeout=self._timeout, **kwargs
            )
        except httpx.TransportError as exc:
            raise transport_error(exc, self.name) from exc

    async def send(self, message: Message) -> Accepted:
        wire = self.wire
        payload = {
            wire.to_field: message.recipient,
            wire.text_field: message.body,
            wire.sender_field: self._sender,
            wire.ref_field: message.reference,
        }
        headers = self._headers() | {wire.idempotency_header: message.idempotency_key}
        answer = await self._request("POST", wire.send_path, json=payload, headers=headers)
        if not answer.is_success:
            raise http_error(answer, self.name, answer.text[:200])
        provider_ref, _ = self._read_answer(answer, "send")
        return Accepted(provider=self.name, provider_ref=provider_ref)

    async def status(self, message: Message) -> StatusAnswer | None:
        return await self.query_status(message.reference)

    async def query_status(
        self, reference: str, provider_ref: str | None = None
    ) -> StatusAnswer | None:
        """What became of the message sent with wire ``reference`` (``tenant:dispatch``):
        the gateway looks messages up by the client reference (``provider_ref`` unused).
        404 → ``NOT_FOUND``; errors as for send."""
        answer = await self._request(
            "GET",
            self.wire.status_path,
            params={self.wire.ref_field: reference},
            headers=self._headers(),
        )
        if answer.status_code == 404:
            return StatusAnswer(state=DeliveryState.NOT_FOUND)
        if not answer.is_success:
            raise http_error(answer, self.name, answer.text[:200])
        provider_ref, vendor_state = self._read_answer(answer, "status")
        state = GHASI_STATES.get(vendor_state)
        if state is None:
            raise ProviderTimeout(f"{self.name}: unknown message status {vendor_state!r}")
        return StatusAnswer(state=state, provider_ref=provider_ref, reason=vendor_state)

    def _read_answer(self, answer: httpx.Response, what: str) -> tuple[str, str]:
        try:
            body = msgspec.json.decode(answer.content, type=dict[str, Any])
            provider_ref = body[self.wire.id_field]
            state = body.get(self.wire.status_field, "accepted")
            if not isinstance(provider_ref, str) or not isinstance(state, str):
                raise TypeError("message id and status must be strings")
        except (msgspec.DecodeError, KeyError, TypeError) as exc:
            # A 2xx we cannot read: the gateway may have taken the message.
            raise ProviderTimeout(f"{self.name}: unreadable {what} answer: {exc}") from exc
        return provider_ref, state

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def parse_ghasi_receipt(
    headers: Mapping[str, str],
    body: bytes,
    *,
    secret: str,
    now: float,
    tolerance_s: float,
    wire: GhasiWire | None = None,
    provider: str = "ghasi",
) -> Receipt:
    """Verify and read one Ghasi DLR. ``now`` is the wall clock (Unix time).

    Raises :class:`~providers.receipts.BadSignature` (missing or wrong signature),
    :class:`~providers.receipts.StaleReceipt` (a timestamp more than ``tolerance_s``
    from ``now``, or not a finite number: :func:`~providers.receipts.signed_at`),
    :class:`~providers.receipts.MalformedReceipt` (unreadable body).
    """
    wire = wire or GhasiWire()
    timestamp = header(headers, wire.timestamp_header)
    signature = header(headers, wire.signature_header)
    if not timestamp or not signature:
        raise BadSignature(
            f"{provider}: missing {wire.signature_header} or {wire.timestamp_header}"
        )
    if not signatures_match(ghasi_signature(secret, timestamp, body), signature.strip().lower()):
        raise BadSignature(f"{provider}: signature does not match the body")
    stamped = signed_at(provider, timestamp, now=now, tolerance_s=tolerance_s)
    try:
        fields = msgspec.json.decode(body, type=dict[str, Any])
    except msgspec.DecodeError as exc:
        raise MalformedReceipt(f"{provider}: body is not a JSON object: {exc}") from exc
    provider_ref = fields.get(wire.id_field)
    reference = fields.get(wire.ref_field)
    vendor_state = fields.get(wire.status_field)
    error_code = fields.get(wire.error_field)
    occurred_at = fields.get(wire.timestamp_field)
    if not isinstance(vendor_state, str) or vendor_state not in GHASI_STATES:
        raise MalformedReceipt(
            f"{provider}: unknown or missing {wire.status_field!r}: {vendor_state!r}"
        )
    if provider_ref is not None and not isinstance(provider_ref, str):
        raise MalformedReceipt(f"{provider}: {wire.id_field!r} must be a string")
    tenant_id: str | None = None
    client_ref: str | None = None
    if reference is not None:
        if not isinstance(reference, str):
            raise MalformedReceipt(f"{provider}: {wire.ref_field!r} must be a string")
        try:
            tenant_id, client_ref = split_reference(reference)
        except ValueError as exc:
            raise MalformedReceipt(f"{provider}: {exc}") from exc
    if provider_ref is None and client_ref is None:
        raise MalformedReceipt(f"{provider}: neither {wire.id_field!r} nor {wire.ref_field!r}")
    if occurred_at is not None and (
        isinstance(occurred_at, bool) or not isinstance(occurred_at, int | float)
    ):
        raise MalformedReceipt(f"{provider}: {wire.timestamp_field!r} must be Unix time")
    state = GHASI_STATES[vendor_state]
    return Receipt(
        provider=provider,
        state=state,
        provider_ref=provider_ref,
        client_ref=client_ref,
        tenant_id=tenant_id,
        reason=None if error_code in (None, "") else f"{vendor_state}:{error_code}",
        permanent=state is DeliveryState.UNDELIVERABLE,
        occurred_at=float(occurred_at) if occurred_at is not None else stamped,
    )
