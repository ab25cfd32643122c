"""What can be wrong with an inbound receipt (DLR, push feedback, bounce webhook).

::

    ReceiptError (a ValueError)      the receipt is refused; nothing may change
    ├─ BadSignature                  missing or wrong signature: a 401/403 at the ingress
    │  └─ StaleReceipt               signed, but its timestamp is outside the tolerance
    │                                window (a replay or a badly skewed clock)
    └─ MalformedReceipt              signed correctly, but the body cannot be read
                                     (garbage, a missing field, an unknown state): a 400

Every parser (``parse_ghasi_receipt``, ``parse_twilio_receipt``, push and bounce
parsers) verifies the signature *before* reading the body, so a forged body is
always a :class:`BadSignature`, never a parse error that leaks what was expected.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from engine.errors import TriageError

__all__ = [
    "BadSignature",
    "MalformedReceipt",
    "ReceiptError",
    "StaleReceipt",
    "header",
    "signatures_match",
]


class ReceiptError(TriageError, ValueError):
    """An inbound receipt was refused; the message names the provider and the problem
    (never the secret). Raised with one message string."""


class BadSignature(ReceiptError):
    """The signature is missing or does not match the body."""


class StaleReceipt(BadSignature):
    """The signed timestamp is outside the accepted window."""


class MalformedReceipt(ReceiptError):
    """The body (or a header it depends on) cannot be read as this provider's receipt."""


def header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by case-insensitive name (works on plain dicts and httpx/ASGI headers)."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def signatures_match(expected: str, given: str) -> bool:
    """Constant-time comparison of two signature strings."""
    return hmac.compare_digest(expected.encode(), given.encode())
