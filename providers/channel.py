"""What every channel adapter speaks: the message out, the answers back, the errors.

An adapter (``providers/ghasi.py``, ``twilio.py``, ``fcm.py``, ``apns.py``,
``smtp.py``) is one vendor's wire format and nothing else: no retry, no breaker,
no failover — the dispatcher's Guard and failover wrap it. Each one maps the
vendor's answers onto the engine's error tree, so the layers above decide by
kind, never by vendor code:

=====================================  =====================================
the vendor said                        the adapter raises
=====================================  =====================================
connection refused, 5xx before the     ``ProviderUnavailable`` — definitely
request was taken, UNAVAILABLE         not acted upon: fail over at once
no answer in time, a reset after the   ``ProviderTimeout`` — ambiguous: the
request went out                       message may have been taken; settle
                                       it with :meth:`Adapter.status`
429 / QUOTA_EXCEEDED (Retry-After)     ``RateLimited`` (``retry_after_s``)
bad recipient or payload (4xx)         ``Rejected``
the device token / address is gone     :class:`RecipientGone` (a ``Rejected``)
(UNREGISTERED, 410, 5.1.1)
credentials refused (401/403)          ``AuthFailed``
=====================================  =====================================

The idempotency key travels with every message to every provider (a header or a
field the vendor echoes), and ``client_ref`` — the dispatch id — is the
reference a status query or a delivery receipt names the message by.
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

import msgspec

from engine.errors import RateLimited, Rejected

__all__ = [
    "Accepted",
    "Adapter",
    "ChannelName",
    "DeliveryState",
    "Message",
    "Receipt",
    "RecipientGone",
    "StatusAnswer",
    "retry_after",
    "split_reference",
]


class ChannelName(enum.StrEnum):
    SMS = "sms"
    PUSH = "push"
    EMAIL = "email"


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """One message to one recipient, rendered from its template.

    ``client_ref`` is the dispatch id: the reference status queries and receipts
    use. ``idempotency_key`` is sent to the provider with the message (header or
    field), so a provider that dedupes never sends twice.
    """

    client_ref: str
    tenant_id: str
    idempotency_key: str
    channel: ChannelName
    recipient: str  # E.164 number, device token, or email address
    body: str
    subject: str | None = None
    category: str = "default"
    data: dict[str, str] = msgspec.field(default_factory=dict)

    @property
    def reference(self) -> str:
        """The wire reference: ``"<tenant_id>:<client_ref>"``. It travels with the message
        (a field, the callback URL, a header) and comes back in receipts, so a receipt
        names its tenant without a cross-tenant lookup; see :func:`split_reference`."""
        return f"{self.tenant_id}:{self.client_ref}"


def split_reference(reference: str) -> tuple[str, str]:
    """``(tenant_id, client_ref)`` from a wire reference; ``ValueError`` when malformed."""
    tenant_id, sep, client_ref = reference.partition(":")
    if not sep or not tenant_id or not client_ref:
        raise ValueError(f"not a Triage message reference: {reference[:80]!r}")
    return tenant_id, client_ref


class Accepted(msgspec.Struct, frozen=True, kw_only=True):
    """The provider took the message; ``provider_ref`` is its own id for it."""

    provider: str
    provider_ref: str


class DeliveryState(enum.StrEnum):
    """Where a provider says a message is (status answers and receipts)."""

    ACCEPTED = "accepted"  # taken, not yet delivered (queued, sent, ...)
    DELIVERED = "delivered"
    FAILED = "failed"
    UNDELIVERABLE = "undeliverable"  # the recipient cannot be reached (hard bounce, dead token)
    NOT_FOUND = "not_found"  # the provider never took a message with this reference


class StatusAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """A provider's answer to "what happened to ``client_ref``?"."""

    state: DeliveryState
    provider_ref: str | None = None
    reason: str | None = None


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    """A delivery receipt, push feedback or bounce, parsed and verified.

    It names the message by ``provider_ref`` or ``client_ref`` (at least one).
    ``permanent`` is for bounces (hard vs soft); ``occurred_at`` is Unix time.
    """

    provider: str
    state: DeliveryState
    provider_ref: str | None = None
    client_ref: str | None = None
    reason: str | None = None
    permanent: bool = True
    occurred_at: float | None = None
    tenant_id: str | None = None
    category: str | None = None


class RecipientGone(Rejected):
    """The recipient no longer exists (unregistered device token, 410, hard bounce 5.1.1).

    The dispatch ends ``undeliverable`` and the token or address is marked dead.
    """

    def __init__(self, recipient: str, reason: str) -> None:
        super().__init__(f"recipient gone ({reason})")
        self.recipient = recipient
        self.reason = reason


def retry_after(error: RateLimited) -> float | None:
    """The ``Retry-After`` a ``RateLimited`` carries (set by adapters), if any."""
    value = getattr(error, "retry_after_s", None)
    return float(value) if value is not None else None


@runtime_checkable
class Adapter(Protocol):
    """One provider of one channel. ``name`` is its config name (``ghasi``, ``twilio``...)."""

    name: str
    channel: ChannelName

    async def send(self, message: Message) -> Accepted:
        """Hand ``message`` to the provider; raise per the module's table."""
        ...

    async def status(self, message: Message) -> StatusAnswer | None:
        """Ask the provider what became of ``message`` (by its ``client_ref``).

        ``None`` when this provider cannot answer status queries; errors as for send.
        """
        ...

    async def aclose(self) -> None:
        """Close connections."""
        ...
