"""What can be wrong with an inbound receipt (DLR, push feedback, bounce webhook).

::

    ReceiptError (a ValueError)      the receipt is refused; nothing may change
    ├─ BadSignature                  missing or wrong signature: a 401/403 at the ingress
    │  └─ StaleReceipt               signed, but its timestamp is not a finite Unix time
    │                                within the tolerance window (a replay, a badly
    │                                skewed clock, or ``nan``/``inf``/garbage)
    └─ MalformedReceipt              signed correctly, but the body cannot be read
                                     (garbage, a missing field, an unknown state): a 400

Every parser (``parse_ghasi_receipt``, ``parse_twilio_receipt``, push and bounce
parsers) verifies the signature *before* reading the body, so a forged body is
always a :class:`BadSignature`, never a parse error that leaks what was expected.
A parser whose provider signs a timestamp checks it with :func:`signed_at`: a
timestamp that is not a number, or not a finite one, is as stale as an old one
(``abs(now - nan) > tolerance`` is false, so the comparison alone would let it in).
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Mapping

from engine.errors import TriageError

__all__ = [
    "BadSignature",
    "MalformedReceipt",
    "ReceiptError",
    "StaleReceipt",
    "header",
    "signatures_match",
    "signed_at",
]


class ReceiptError(TriageError, ValueError):
    """An inbound receipt was refused; the message names the provider and the problem
    (never the secret). Raised with one message string."""


class BadSignature(ReceiptError):
    """The signature is missing or does not match the body."""


class StaleReceipt(BadSignature):
    """The signed timestamp is not a finite Unix time inside the accepted window."""


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


def signed_at(provider: str, stamp: str, *, now: float, tolerance_s: float) -> float:
    """The signed timestamp ``stamp`` (Unix seconds) once it is within ``tolerance_s`` of
    ``now``; else :class:`StaleReceipt`, also for a stamp that is no number or not a finite
    one (``nan``, ``inf``), and when ``now`` or ``tolerance_s`` is not finite.

    The window is checked as ``abs(now - t) <= tolerance_s`` *holding*, never as its
    negation failing: every comparison with ``nan`` is false, so a refusal written
    ``if abs(now - t) > tolerance_s`` would let ``nan`` through.
    """
    try:
        value = float(stamp)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise StaleReceipt(f"{provider}: timestamp {stamp[:40]!r} is not a finite Unix time")
    if not abs(now - value) <= tolerance_s or not math.isfinite(tolerance_s):
        raise StaleReceipt(f"{provider}: timestamp {value:.0f} is outside ±{tolerance_s}s of now")
    return value
