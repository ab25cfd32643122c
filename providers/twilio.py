"""Twilio Messages API: the secondary SMS provider.

::

    POST {base_url}/2010-04-01/Accounts/{AccountSid}/Messages.json   (form-encoded)
         To, From, Body, StatusCallback        HTTP Basic AccountSid:AuthToken
         I-Twilio-Idempotency-Token: KEY
      → 201 {"sid", "status", ...}   errors → {"code", "message", "more_info", "status"}
    GET  .../Messages.json?To=...&DateSent=YYYY-MM-DD          (status: settles a timeout)
      → {"messages": [{"sid", "status", "to", "body", ...}], "next_page_uri": ...}
    GET  .../Messages/{sid}.json                             (query_status: a known sid)
      → 200 {"sid", "status", "error_code", ...} | 404 {"code": 20404, ...}

    DLR: form POST to StatusCallback = {callback_base}/webhooks/dlr/twilio?ref={reference}
         MessageSid, MessageStatus, ErrorCode, To, From, AccountSid
         X-Twilio-Signature: base64(HMAC-SHA1(auth_token, url + concat(sorted k + v)))

Twilio keeps no client reference, so the reference travels in the callback URL (a
receipt names its tenant) and a status query lists the recipient's messages of the
day and matches on the body: none → ``NOT_FOUND``; exactly one → its state; several,
or more pages than one → ``None`` (cannot tell; the caller records a possible
duplicate). Twilio codes 20429 and HTTP 429 → ``RateLimited``; 20003/401/403 →
``AuthFailed``; other 4xx (21211 invalid To, 21602 no Body ...) → ``Rejected``;
5xx → ``ProviderUnavailable``: the table of :mod:`providers.http_errors`, as are
transport failures.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import urllib.parse
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec

from engine.errors import ProviderError, ProviderTimeout
from providers.channel import (
    Accepted,
    ChannelName,
    DeliveryState,
    Message,
    Receipt,
    StatusAnswer,
    split_reference,
)
from providers.http_errors import http_error, transport_error
from providers.http_transport import Http1Transport
from providers.receipts import BadSignature, MalformedReceipt, header, signatures_match

__all__ = [
    "API_VERSION",
    "CALLBACK_PATH",
    "TWILIO_STATES",
    "TwilioAdapter",
    "parse_twilio_receipt",
    "twilio_signature",
]

API_VERSION = "2010-04-01"
CALLBACK_PATH = "/webhooks/dlr/twilio"
IDEMPOTENCY_HEADER = "I-Twilio-Idempotency-Token"
SIGNATURE_HEADER = "X-Twilio-Signature"
RATE_LIMIT_CODES = frozenset({20429})
AUTH_CODES = frozenset({20003})

#: Twilio's MessageStatus → ours
TWILIO_STATES: Mapping[str, DeliveryState] = {
    "accepted": DeliveryState.ACCEPTED,
    "scheduled": DeliveryState.ACCEPTED,
    "queued": DeliveryState.ACCEPTED,
    "sending": DeliveryState.ACCEPTED,
    "sent": DeliveryState.ACCEPTED,
    "delivered": DeliveryState.DELIVERED,
    "read": DeliveryState.DELIVERED,
    "undelivered": DeliveryState.UNDELIVERABLE,
    "failed": DeliveryState.FAILED,
    "canceled": DeliveryState.FAILED,
}


def messages_path(account_sid: str) -> str:
    return f"/{API_VERSION}/Accounts/{account_sid}/Messages.json"


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str]) -> str:
    """``base64(HMAC-SHA1(auth_token, url + k1 + v1 + k2 + v2 ...))``, keys sorted."""
    signed = url + "".join(key + params[key] for key in sorted(params))
    digest = hmac.new(auth_token.encode(), signed.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def _http_error(answer: httpx.Response, who: str) -> ProviderError:
    try:
        body = msgspec.json.decode(answer.content, type=dict[str, Any])
    except msgspec.DecodeError:
        body = {}
    code = body.get("code")
    return http_error(
        answer,
        who,
        f"code {code}: {str(body.get('message', answer.text))[:200]}",
        rate_limited=code in RATE_LIMIT_CODES,
        auth_failed=code in AUTH_CODES,
    )


class TwilioAdapter:
    """Twilio's Messages API as a :class:`providers.channel.Adapter` (SMS).

    ``callback_base`` is the public base URL of our DLR ingress (``None``: no
    receipts requested). ``clock`` is the wall clock, for the status query's date.
    """

    channel = ChannelName.SMS

    def __init__(
        self,
        name: str = "twilio",
        *,
        base_url: str,
        account_sid: str,
        auth_token: str,
        from_number: str,
        timeout_s: float,
        callback_base: str | None = None,
        client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self._url = base_url.rstrip("/") + messages_path(account_sid)
        self._auth = httpx.BasicAuth(account_sid, auth_token)
        self._from = from_number
        self.callback_base = callback_base.rstrip("/") if callback_base else None
        self._timeout = httpx.Timeout(timeout_s)
        self._clock = clock
        # Without a client: its own, on ``transport`` (default: an HTTP/1.1 pool).
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(transport=transport or Http1Transport())

    def callback_url(self, message: Message) -> str | None:
        if self.callback_base is None:
            return None
        query = urllib.parse.urlencode({"ref": message.reference})
        return f"{self.callback_base}{CALLBACK_PATH}?{query}"

    async def _request(self, method: str, url: str | None = None, **kwargs: Any) -> httpx.Response:
        try:
            return await self._client.request(
                method, url or self._url, auth=self._auth, timeout=self._timeout, **kwargs
            )
        except httpx.TransportError as exc:
            raise transport_error(exc, self.name) from exc

    async def send(self, message: Message) -> Accepted:
        form = {"To": message.recipient, "From": self._from, "Body": message.body}
        callback = self.callback_url(message)
        if callback is not None:
            form["StatusCallback"] = callback
        answer = await self._request(
            "POST", data=form, headers={IDEMPOTENCY_HEADER: message.idempotency_key}
        )
        if not answer.is_success:
            raise _http_error(answer, self.name)
        try:
            sid = msgspec.json.decode(answer.content, type=dict[str, Any])["sid"]
            if not isinstance(sid, str):
                raise TypeError("sid must be a string")
        except (msgspec.DecodeError, KeyError, TypeError) as exc:
            raise ProviderTimeout(f"{self.name}: unreadable send answer: {exc}") from exc
        return Accepted(provider=self.name, provider_ref=sid)

    async def status(self, message: Message) -> StatusAnswer | None:
        day = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y-%m-%d")
        answer = await self._request("GET", params={"To": message.recipient, "DateSent": day})
        if not answer.is_success:
            raise _http_error(answer, self.name)
        try:
            page = msgspec.json.decode(answer.content, type=dict[str, Any])
            listed = page["messages"]
            matches = [m for m in listed if m.get("body") == message.body]
        except (msgspec.DecodeError, KeyError, TypeError, AttributeError) as exc:
            raise ProviderTimeout(f"{self.name}: unreadable message list: {exc}") from exc
        if page.get("next_page_uri") or len(matches) > 1:
            return None  # more than one candidate, or candidates we did not see
        if not matches:
            return StatusAnswer(state=DeliveryState.NOT_FOUND)
        vendor_state = matches[0].get("status")
        state = TWILIO_STATES.get(vendor_state) if isinstance(vendor_state, str) else None
        if state is None:
            return None
        return StatusAnswer(state=state, provider_ref=matches[0].get("sid"), reason=vendor_state)

    async def query_status(
        self, reference: str, provider_ref: str | None = None
    ) -> StatusAnswer | None:
        """What became of the message Twilio knows as ``provider_ref`` (its ``sid``): one
        fetch of the Message resource. Without a sid: ``None`` (Twilio keeps no client
        reference, and the sweep that asks has no recipient nor body to match on).
        404 → ``NOT_FOUND``; a status we do not know → ``None``; errors as for send."""
        if not provider_ref:
            return None
        sid = urllib.parse.quote(provider_ref, safe="")
        answer = await self._request("GET", f"{self._url[: -len('.json')]}/{sid}.json")
        if answer.status_code == 404:
            return StatusAnswer(state=DeliveryState.NOT_FOUND)
        if not answer.is_success:
            raise _http_error(answer, self.name)
        try:
            resource = msgspec.json.decode(answer.content, type=dict[str, Any])
            vendor_state = resource["status"]
        except (msgspec.DecodeError, KeyError) as exc:
            raise ProviderTimeout(f"{self.name}: unreadable message resource: {exc}") from exc
        state = TWILIO_STATES.get(vendor_state) if isinstance(vendor_state, str) else None
        if state is None:
            return None
        reason = vendor_state
        if state is not DeliveryState.DELIVERED and resource.get("error_code"):
            reason = f"{vendor_state}:{resource['error_code']}"
        return StatusAnswer(state=state, provider_ref=provider_ref, reason=reason)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def parse_twilio_receipt(
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    *,
    auth_token: str,
    provider: str = "twilio",
) -> Receipt:
    """Verify and read one Twilio status callback.

    ``url`` is the full URL Twilio posted to, as Twilio saw it (scheme, host, path and
    the ``?ref=`` query). Raises :class:`~providers.receipts.BadSignature` or
    :class:`~providers.receipts.MalformedReceipt`.
    """
    signature = header(headers, SIGNATURE_HEADER)
    if not signature:
        raise BadSignature(f"{provider}: missing {SIGNATURE_HEADER}")
    try:
        pairs = urllib.parse.parse_qsl(
            body.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(body)
        )
    except (UnicodeDecodeError, ValueError) as exc:
        # Twilio signs the parsed parameters; a body that does not parse cannot be verified.
        raise BadSignature(f"{provider}: body is not form-encoded: {exc}") from exc
    params = dict(pairs)
    if not signatures_match(twilio_signature(auth_token, url, params), signature.strip()):
        raise BadSignature(f"{provider}: signature does not match the URL and parameters")
    vendor_state = params.get("MessageStatus", "")
    sid = params.get("MessageSid")
    if vendor_state not in TWILIO_STATES or not sid:
        raise MalformedReceipt(
            f"{provider}: missing MessageSid or unknown MessageStatus {vendor_state!r}"
        )
    refs = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query).get("ref")
    tenant_id: str | None = None
    client_ref: str | None = None
    if refs:
        try:
            tenant_id, client_ref = split_reference(refs[-1])
        except ValueError as exc:
            raise MalformedReceipt(f"{provider}: callback URL: {exc}") from exc
    state = TWILIO_STATES[vendor_state]
    error_code = params.get("ErrorCode") or None
    return Receipt(
        provider=provider,
        state=state,
        provider_ref=sid,
        client_ref=client_ref,
        tenant_id=tenant_id,
        reason=f"{vendor_state}:{error_code}" if error_code else None,
        permanent=state is DeliveryState.UNDELIVERABLE,
    )
