"""Bounce intake: delivery status notifications and provider bounce events, as receipts.

::

    verify_signature(raw, request_headers.get("X-Triage-Signature"), secret)  # first
    receipts = parse_dsn(raw)              # Content-Type: message/rfc822 (an RFC 3464 DSN)
    receipts = parse_bounce_event(raw)     # Content-Type: application/json (see below)
    receipts = parse_bounce(raw, content_type=..., signature=..., secret=...)  # all three
    parser = bounce_parser(secret)         # (url, headers, body) -> receipts, for the DLR ingress

**Signature.** ``X-Triage-Signature: hex(HMAC-SHA256(secret, raw body))`` over the
exact bytes received; it is checked before the body is read (:mod:`providers.receipts`).

**Hard vs soft.** Per recipient of a DSN (``message/delivery-status``):

=====================================  ==============================================
``Action`` / ``Status``                receipt
=====================================  ==============================================
``failed`` and ``5.x.x``               hard bounce: ``state=UNDELIVERABLE``,
                                       ``permanent=True`` — the address is dead
``delayed`` (any status), or           soft bounce: ``state=FAILED``,
``failed`` and ``4.x.x``               ``permanent=False`` — this attempt did not
                                       get through; the address stays usable. A
                                       ``delayed`` DSN means the relay still
                                       retries; the bounce tracker counts it as a
                                       soft bounce and nothing more.
``delivered``                          ``state=DELIVERED`` (a success DSN)
``relayed`` / ``expanded``             ``state=ACCEPTED`` (handed on, no verdict)
=====================================  ==============================================

The message is named by the ``X-Triage-Ref`` header (``tenant:client_ref``) of the
original, which the DSN returns (``text/rfc822-headers`` or ``message/rfc822``);
``X-Triage-Category`` gives the category, the per-message ``X-Queue-ID`` /
``X-Postfix-Queue-ID`` the ``provider_ref``. ``reason`` is ``"<status> <diagnostic>"``.

**Provider event webhook** (``application/json``): one object or an array of them::

    {"type": "bounce",                 # required; the only type accepted
     "bounce_type": "hard" | "soft",   # required: hard → UNDELIVERABLE, soft → FAILED
     "recipient": "patient@example.org",
     "reference": "tenant-a:dispatch-1",   # the X-Triage-Ref the message carried
     "diagnostic": "550 5.1.1 user unknown",   # optional
     "timestamp": 1764331200.5,        # optional, Unix seconds
     "category": "reminders",          # optional
     "provider_ref": "0100018c..."}    # optional, the provider's message id

Unknown fields are ignored (providers add fields). Anything else — garbage, a DSN
without a reference, a missing field — raises
:class:`~providers.receipts.MalformedReceipt` naming the problem; a missing or wrong
signature raises :class:`~providers.receipts.BadSignature`.
"""

from __future__ import annotations

import email.policy
import email.utils
import hashlib
import hmac
import re
from collections.abc import Callable, Mapping
from email.message import Message as MimeMessage
from email.parser import BytesParser, HeaderParser
from typing import Literal

import msgspec

from engine.errors import ConfigError
from providers.channel import DeliveryState, Receipt, split_reference
from providers.receipts import BadSignature, MalformedReceipt, header, signatures_match

__all__ = [
    "SIGNATURE_HEADER",
    "BounceEvent",
    "bounce_parser",
    "parse_bounce",
    "parse_bounce_event",
    "parse_dsn",
    "sign",
    "verify_signature",
]

SIGNATURE_HEADER = "X-Triage-Signature"

_STATUS = re.compile(r"^([245])\.\d{1,3}\.\d{1,3}$")
_ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
_PARSER = BytesParser(policy=email.policy.compat32)


class BounceEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One bounce in a provider's JSON event webhook (module docstring for the format)."""

    type: Literal["bounce"]
    bounce_type: Literal["hard", "soft"]
    recipient: str
    reference: str
    diagnostic: str | None = None
    timestamp: float | None = None
    category: str | None = None
    provider_ref: str | None = None


_EVENTS = msgspec.json.Decoder(BounceEvent | list[BounceEvent])


def _key(secret: str | bytes) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    if not key:
        raise ConfigError("the bounce webhook secret is empty: every body would verify")
    return key


def sign(raw: bytes, secret: str | bytes) -> str:
    """``hex(HMAC-SHA256(secret, raw))``: the ``X-Triage-Signature`` of ``raw``."""
    return hmac.new(_key(secret), raw, hashlib.sha256).hexdigest()


def verify_signature(raw: bytes, header: str | None, secret: str | bytes) -> None:
    """Raise :class:`BadSignature` unless ``header`` is the signature of ``raw``."""
    expected = sign(raw, secret)
    if header is None or not header.strip():
        raise BadSignature(f"bounce: missing {SIGNATURE_HEADER} header")
    if not signatures_match(expected, header.strip().lower()):
        raise BadSignature(f"bounce: {SIGNATURE_HEADER} does not match the body")


def parse_bounce(
    raw: bytes,
    *,
    content_type: str | None,
    signature: str | None,
    secret: str | bytes,
    provider: str = "smtp",
) -> list[Receipt]:
    """Verify, then parse by ``content_type``: ``message/rfc822`` (or a bare
    ``multipart/report``) as a DSN, ``application/json`` as bounce events."""
    verify_signature(raw, signature, secret)
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind in ("message/rfc822", "multipart/report"):
        return parse_dsn(raw, provider=provider)
    if kind == "application/json":
        return parse_bounce_event(raw, provider=provider)
    raise MalformedReceipt(
        f"{provider} bounce: unsupported Content-Type {content_type!r}"
        " (message/rfc822 or application/json)"
    )


def bounce_parser(
    secret: str | bytes, *, provider: str = "smtp"
) -> Callable[[str, Mapping[str, str], bytes], list[Receipt]]:
    """A webhook parser ``(url, headers, body) -> receipts`` for the DLR ingress: it reads
    ``Content-Type`` and ``X-Triage-Signature`` (any case) and calls :func:`parse_bounce`."""
    _key(secret)  # an empty secret is a config error now, not at the first bounce

    def parse(url: str, headers: Mapping[str, str], body: bytes) -> list[Receipt]:
        return parse_bounce(
            body,
            content_type=header(headers, "Content-Type"),
            signature=header(headers, SIGNATURE_HEADER),
            secret=secret,
            provider=provider,
        )

    return parse


def _reference(reference: str, provider: str, where: str) -> tuple[str, str]:
    try:
        return split_reference(reference)
    except ValueError as exc:
        raise MalformedReceipt(f"{provider} bounce: {where}: {exc}") from exc


def parse_bounce_event(body: bytes, *, provider: str = "smtp") -> list[Receipt]:
    """Receipts from a JSON bounce webhook body (one event or an array of them)."""
    try:
        decoded = _EVENTS.decode(body)
    except msgspec.ValidationError as exc:
        raise MalformedReceipt(f"{provider} bounce event: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise MalformedReceipt(f"{provider} bounce event: not JSON ({exc})") from exc
    events = decoded if isinstance(decoded, list) else [decoded]
    if not events:
        raise MalformedReceipt(f"{provider} bounce event: an empty array")
    receipts = []
    for index, event in enumerate(events):
        tenant_id, client_ref = _reference(event.reference, provider, f"$[{index}].reference")
        hard = event.bounce_type == "hard"
        receipts.append(
            Receipt(
                provider=provider,
                state=DeliveryState.UNDELIVERABLE if hard else DeliveryState.FAILED,
                permanent=hard,
                provider_ref=event.provider_ref,
                client_ref=client_ref,
                tenant_id=tenant_id,
                category=event.category,
                reason=f"{event.bounce_type} bounce: {event.diagnostic or 'no diagnostic'}",
                occurred_at=event.timestamp,
            )
        )
    return receipts


def _blocks(part: MimeMessage) -> list[MimeMessage]:
    """The field blocks of a ``message/delivery-status`` part (per-message block first)."""
    payload = part.get_payload()
    if isinstance(payload, list):  # the parser splits the blocks itself
        return [block for block in payload if isinstance(block, MimeMessage)]
    text = part.get_payload(decode=True)
    if not isinstance(text, bytes):
        return []
    chunks = re.split(r"\r?\n\s*\r?\n", text.decode("ascii", "replace").strip())
    return [HeaderParser().parsestr(chunk + "\n") for chunk in chunks if chunk.strip()]


def _returned_headers(part: MimeMessage) -> MimeMessage | None:
    kind = part.get_content_type()
    payload = part.get_payload()
    if kind == "message/rfc822" and isinstance(payload, list) and payload:
        first = payload[0]
        return first if isinstance(first, MimeMessage) else None
    if kind in ("text/rfc822-headers", "message/rfc822-headers", "message/rfc822"):
        data = part.get_payload(decode=True)
        if isinstance(data, bytes):
            return HeaderParser().parsestr(data.decode("utf-8", "replace"))
    return None


def _field(block: MimeMessage, name: str) -> str | None:
    value = block.get(name)
    return " ".join(str(value).split()) if value is not None else None


def _when(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def parse_dsn(raw: bytes, *, provider: str = "smtp") -> list[Receipt]:
    """Receipts from an RFC 3464 delivery status notification, one per recipient
    (module docstring for hard vs soft)."""
    if not raw.strip():
        raise MalformedReceipt(f"{provider} DSN: empty body")
    dsn = _PARSER.parsebytes(raw)
    report_type = str(dsn.get_param("report-type", "") or "").lower()
    if dsn.get_content_type() != "multipart/report" or report_type != "delivery-status":
        raise MalformedReceipt(
            f"{provider} DSN: not a delivery status notification (Content-Type"
            f" {dsn.get_content_type()}, report-type {report_type or 'absent'}; expected"
            " multipart/report; report-type=delivery-status)"
        )
    parts = dsn.get_payload()
    if not isinstance(parts, list):
        raise MalformedReceipt(f"{provider} DSN: multipart/report without parts")
    status_part = next(
        (
            p
            for p in parts
            if isinstance(p, MimeMessage) and p.get_content_type() == "message/delivery-status"
        ),
        None,
    )
    if status_part is None:
        raise MalformedReceipt(f"{provider} DSN: no message/delivery-status part")
    returned = next(
        (
            h
            for p in parts
            if isinstance(p, MimeMessage) and (h := _returned_headers(p)) is not None
        ),
        None,
    )
    reference = _field(returned, "X-Triage-Ref") if returned is not None else None
    if not reference:
        raise MalformedReceipt(
            f"{provider} DSN: the returned headers carry no X-Triage-Ref; cannot tell which"
            " message bounced"
        )
    tenant_id, client_ref = _reference(reference, provider, "X-Triage-Ref")
    category = _field(returned, "X-Triage-Category") if returned is not None else None
    blocks = _blocks(status_part)
    if len(blocks) < 2:
        raise MalformedReceipt(
            f"{provider} DSN: no per-recipient fields in message/delivery-status"
        )
    per_message, recipients = blocks[0], blocks[1:]
    provider_ref = _field(per_message, "X-Queue-ID") or _field(per_message, "X-Postfix-Queue-ID")
    receipts = []
    for index, block in enumerate(recipients, start=1):
        where = f"{provider} DSN, recipient block {index}"
        action = (_field(block, "Action") or "").lower()
        if action not in _ACTIONS:
            raise MalformedReceipt(
                f"{where}: Action {action or 'absent'!r} is not an RFC 3464 action"
            )
        status = (_field(block, "Status") or "").split(" ", 1)[0]
        match = _STATUS.match(status)
        if match is None:
            raise MalformedReceipt(
                f"{where}: Status {status or 'absent'!r} is not an x.y.z status code"
            )
        permanent = False
        if action == "delivered":
            state = DeliveryState.DELIVERED
        elif action in ("relayed", "expanded"):
            state = DeliveryState.ACCEPTED
        elif action == "failed" and match.group(1) == "5":
            state, permanent = DeliveryState.UNDELIVERABLE, True
        else:  # delayed, or failed with a 4.x.x (or 2.x.x) status: soft
            state = DeliveryState.FAILED
        diagnostic = _field(block, "Diagnostic-Code")
        receipts.append(
            Receipt(
                provider=provider,
                state=state,
                permanent=permanent,
                provider_ref=provider_ref,
                client_ref=client_ref,
                tenant_id=tenant_id,
                category=category,
                reason=f"{status} {diagnostic}" if diagnostic else status,
                occurred_at=_when(_field(block, "Last-Attempt-Date") or _field(dsn, "Date")),
            )
        )
    return receipts
