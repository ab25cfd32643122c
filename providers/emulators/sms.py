"""The two SMS providers on loopback: the Ghasi gateway and Twilio's Messages API.

Both validate credentials (401 in the vendor's error shape), validate the request
(the vendor's 4xx), run sends through the base's fault plan, count by idempotency
key, answer status queries (Ghasi by client reference; Twilio's message list and its
``Messages/{sid}.json`` resource), and POST signed receipts: Ghasi's JSON DLR to
``receipt_url`` (signed with ``receipt_secret``), Twilio's form callback to each
message's ``StatusCallback`` (signed with the auth token).
"""

from __future__ import annotations

import base64
import re
import secrets
import time
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import msgspec

from providers.emulators.base import Emulator, ReceiptPost, Request, Response, StoredMessage
from providers.ghasi import GhasiWire, ghasi_signature
from providers.twilio import SIGNATURE_HEADER, messages_path, twilio_signature

__all__ = ["E164", "GhasiEmulator", "TwilioEmulator"]

E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")


class GhasiEmulator(Emulator):
    """The Ghasi-SMS-Gateway, shaped by the same :class:`GhasiWire` as the adapter.

    Failed receipts (``emit_receipt(ref, "failed")``) carry ``error_code``.
    """

    delivered_state = "delivered"

    def __init__(
        self,
        name: str = "ghasi",
        *,
        api_key: str,
        wire: GhasiWire | None = None,
        receipt_url: str | None = None,
        receipt_secret: str | None = None,
        receipt_delay_s: float = 0.0,
        auto_receipts: bool = True,
        failed_error_code: str = "E_CARRIER",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            name,
            receipt_url=receipt_url,
            receipt_secret=receipt_secret,
            receipt_delay_s=receipt_delay_s,
            auto_receipts=auto_receipts,
            clock=clock,
        )
        self.api_key = api_key
        self.wire = wire or GhasiWire()
        self.failed_error_code = failed_error_code

    def error_response(self, status: int, reason: str) -> Response:
        return Response.json(status, {"error": reason, "status": status})

    async def handle(self, request: Request) -> Response | None:
        wire = self.wire
        if request.headers.get(wire.auth_header.lower()) != wire.auth_value(self.api_key):
            return self.error_response(401, "unauthorized")
        if request.method == "POST" and request.path == wire.send_path:
            return await self._send(request)
        if request.method == "GET" and request.path == wire.status_path:
            message = self.messages.get(request.query_one(wire.ref_field) or "")
            if message is None:
                return self.error_response(404, "no message with this reference")
            return Response.json(
                200, {wire.id_field: message.provider_ref, wire.status_field: message.status}
            )
        return self.error_response(404, f"no route {request.method} {request.path}")

    async def _send(self, request: Request) -> Response | None:
        wire = self.wire
        try:
            body = msgspec.json.decode(request.body, type=dict[str, Any])
        except msgspec.DecodeError:
            return self.error_response(400, "body is not JSON")
        to, text = body.get(wire.to_field), body.get(wire.text_field)
        ref, sender = body.get(wire.ref_field), body.get(wire.sender_field)
        if not isinstance(to, str) or not E164.match(to):
            return self.error_response(422, f"{wire.to_field} is not an E.164 number")
        if not isinstance(text, str) or not text:
            return self.error_response(422, f"{wire.text_field} is empty")
        if not isinstance(ref, str) or not ref:
            return self.error_response(422, f"{wire.ref_field} is missing")
        key = request.headers.get(wire.idempotency_header.lower())

        def accept() -> tuple[StoredMessage, Response]:
            message = StoredMessage(
                provider_ref=self.next_id("GH"),
                reference=ref,
                idempotency_key=key,
                recipient=to,
                body=text,
                status="accepted",
                accepted_at=self.clock(),
                sender=sender if isinstance(sender, str) else None,
            )
            answer = {wire.id_field: message.provider_ref, wire.status_field: message.status}
            return message, Response.json(202, answer)

        return await self.take_send(request, key=key, accept=accept)

    def receipt_for(self, message: StoredMessage, state: str) -> ReceiptPost | None:
        if self.receipt_url is None or self.receipt_secret is None:
            return None
        wire = self.wire
        now = int(self.clock())
        failed = state not in ("accepted", "queued", "sent", "delivered")
        body = msgspec.json.encode(
            {
                wire.id_field: message.provider_ref,
                wire.ref_field: message.reference,
                wire.status_field: state,
                wire.error_field: self.failed_error_code if failed else None,
                wire.timestamp_field: now,
            }
        )
        stamp = str(now)
        headers = {
            "content-type": "application/json",
            wire.timestamp_header: stamp,
            wire.signature_header: ghasi_signature(self.receipt_secret, stamp, body),
        }
        return ReceiptPost(self.receipt_url, headers, body)


class TwilioEmulator(Emulator):
    """Twilio's Messages API for one account (``account_sid`` / ``auth_token``)."""

    delivered_state = "delivered"

    def __init__(
        self,
        name: str = "twilio",
        *,
        account_sid: str,
        auth_token: str,
        receipt_delay_s: float = 0.0,
        auto_receipts: bool = True,
        failed_error_code: str = "30003",
        page_size: int = 50,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            name, receipt_delay_s=receipt_delay_s, auto_receipts=auto_receipts, clock=clock
        )
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.failed_error_code = failed_error_code
        self.page_size = page_size
        self._path = messages_path(account_sid)

    def error_response(self, status: int, reason: str) -> Response:
        code = {401: 20003, 404: 20404, 429: 20429}.get(status, status)
        return self._error(status, code, reason)

    def _error(self, status: int, code: int, message: str) -> Response:
        payload = {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        }
        return Response.json(status, payload)

    def _authorized(self, request: Request) -> bool:
        expected = basic_auth(self.account_sid, self.auth_token)
        return secrets.compare_digest(request.headers.get("authorization", ""), expected)

    async def handle(self, request: Request) -> Response | None:
        if not self._authorized(request):
            return self._error(401, 20003, "Authenticate")
        sid = self._fetched_sid(request.path)
        if sid is not None and request.method == "GET":
            return self._fetch(sid, request.path)
        if request.path != self._path:
            return self._error(404, 20404, "The requested resource was not found")
        if request.method == "POST":
            return await self._send(request)
        if request.method == "GET":
            return self._list(request)
        return self._error(405, 20004, "Method not allowed")

    async def _send(self, request: Request) -> Response | None:
        form = request.form()
        to, body, sender = form.get("To", ""), form.get("Body", ""), form.get("From", "")
        if not E164.match(to):
            return self._error(400, 21211, f"The 'To' number {to} is not a valid phone number.")
        if not sender:
            return self._error(400, 21603, "A 'From' phone number is required.")
        if not body:
            return self._error(400, 21602, "Message body is required.")
        callback = form.get("StatusCallback") or None
        reference = None
        if callback is not None:
            refs = urllib.parse.parse_qs(urllib.parse.urlsplit(callback).query).get("ref")
            reference = refs[-1] if refs else None
        key = request.headers.get("i-twilio-idempotency-token")

        def accept() -> tuple[StoredMessage, Response]:
            message = StoredMessage(
                provider_ref="SM" + secrets.token_hex(16),
                reference=reference,
                idempotency_key=key,
                recipient=to,
                body=body,
                status="queued",
                accepted_at=self.clock(),
                sender=sender,
                callback_url=callback,
            )
            return message, Response.json(201, self._resource(message))

        return await self.take_send(request, key=key, accept=accept)

    def _resource(self, message: StoredMessage) -> dict[str, Any]:
        stamp = format_datetime(datetime.fromtimestamp(message.accepted_at, UTC), usegmt=False)
        return {
            "sid": message.provider_ref,
            "account_sid": self.account_sid,
            "to": message.recipient,
            "from": message.sender,
            "body": message.body,
            "status": message.status,
            "date_created": stamp,
            "date_sent": stamp,
            "error_code": (
                int(self.failed_error_code)
                if message.status in ("failed", "undelivered") and self.failed_error_code.isdigit()
                else None
            ),
            "api_version": "2010-04-01",
            "uri": f"{self._path[:-5]}/{message.provider_ref}.json",
        }

    def _fetched_sid(self, path: str) -> str | None:
        """The sid of a Message resource path (``.../Messages/{sid}.json``), else None."""
        prefix = self._path[: -len(".json")] + "/"
        if path.startswith(prefix) and path.endswith(".json"):
            sid = urllib.parse.unquote(path[len(prefix) : -len(".json")])
            return sid or None
        return None

    def _fetch(self, sid: str, path: str) -> Response:
        """One Message resource, as Twilio answers ``GET .../Messages/{sid}.json``."""
        message = self.by_provider_ref.get(sid)
        if message is None:
            return self._error(404, 20404, f"The requested resource {path} was not found")
        return Response.json(200, self._resource(message))

    def _list(self, request: Request) -> Response:
        to = request.query_one("To")
        day = request.query_one("DateSent")
        found = []
        for message in self.by_provider_ref.values():
            sent_day = datetime.fromtimestamp(message.accepted_at, UTC).strftime("%Y-%m-%d")
            if (to is None or message.recipient == to) and (day is None or sent_day == day):
                found.append(self._resource(message))
        found.reverse()  # newest first, as Twilio lists
        page = found[: self.page_size]
        more = len(found) > self.page_size
        return Response.json(
            200,
            {
                "messages": page,
                "page": 0,
                "page_size": self.page_size,
                "next_page_uri": f"{self._path}?Page=1" if more else None,
            },
        )

    def receipt_for(self, message: StoredMessage, state: str) -> ReceiptPost | None:
        if message.callback_url is None:
            return None
        params = {
            "MessageSid": message.provider_ref,
            "SmsSid": message.provider_ref,
            "MessageStatus": state,
            "SmsStatus": state,
            "To": message.recipient,
            "From": message.sender or "",
            "AccountSid": self.account_sid,
            "ApiVersion": "2010-04-01",
        }
        if state in ("failed", "undelivered"):
            params["ErrorCode"] = self.failed_error_code
        headers = {
            "content-type": "application/x-www-form-urlencoded",
            SIGNATURE_HEADER: twilio_signature(self.auth_token, message.callback_url, params),
        }
        return ReceiptPost(message.callback_url, headers, urllib.parse.urlencode(params).encode())


def basic_auth(user: str, password: str) -> str:
    """The ``Authorization`` value of HTTP Basic auth."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
