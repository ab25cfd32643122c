"""HTTP failures onto the engine's error tree, in one place for every HTTP adapter.

Two kinds of failure, two functions:

- :func:`transport_error`: httpx raised before an answer came. Whether the request
  may have gone out decides between ``ProviderUnavailable`` (safe to fail over) and
  ``ProviderTimeout`` (ambiguous: the vendor may have taken it).
- :func:`http_error`: an answer came with a status that is not success. The generic
  mapping is::

      429 (or rate_limited)           RateLimited(retry_after_s from Retry-After)
      401, 403 (or auth_failed)       AuthFailed
      408                             ProviderTimeout
      other 4xx                       Rejected
      5xx, anything else              ProviderUnavailable

  Adapters whose vendor names its errors in the body (FCM, APNs) read those first
  and keep only :func:`parse_retry_after` and :func:`transport_error` from here.
"""

from __future__ import annotations

import email.utils

import httpx

from engine.errors import (
    AuthFailed,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    Rejected,
)

__all__ = ["http_error", "parse_retry_after", "transport_error"]


def transport_error(exc: httpx.TransportError, who: str) -> ProviderError:
    """The engine's error for an httpx transport failure (``raise ... from exc``).

    Nothing left the machine (refused, connect timeout, no pooled connection):
    ``ProviderUnavailable``. The request may have gone out and no answer came (read
    or write timeout, a reset, the server hung up): ``ProviderTimeout`` — ambiguous.
    A failed *write* is ambiguous too: on HTTP/2 the client writes (window updates,
    settings acks) while it waits for the answer, after the request went out.
    Note that httpcore does not notice that the server closed an idle pooled HTTP/2
    connection: the next request on it fails this way (so keep
    ``keepalive_expiry`` below the server's idle timeout, see
    :func:`providers.apns.apns_client`).
    """
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return ProviderUnavailable(f"{who}: request not delivered: {exc!r}")
    if isinstance(exc, httpx.TimeoutException):
        return ProviderTimeout(f"{who}: no answer in time: {exc!r}")
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        return ProviderTimeout(f"{who}: connection lost after the request went out: {exc!r}")
    return ProviderUnavailable(f"{who}: transport failure: {exc!r}")


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header; ``None`` when absent or unreadable.

    Delta-seconds (``"7"``, ``"1.5"``) always; the HTTP-date form only when ``now``
    (the wall clock, Unix seconds) is given, and a date in the past is ``0.0``.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 else None
    if now is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def http_error(
    answer: httpx.Response,
    who: str,
    detail: str,
    *,
    now: float | None = None,
    rate_limited: bool = False,
    auth_failed: bool = False,
) -> ProviderError:
    """The engine's error for a non-success ``answer``, by HTTP status (table above).

    ``detail`` is what the vendor said (already cut to size); the message reads
    ``"{who}: HTTP {status}: {detail}"``. ``rate_limited`` / ``auth_failed`` let an
    adapter that reads a vendor code from the body force those two outcomes; ``now``
    enables the HTTP-date form of ``Retry-After``.
    """
    status = answer.status_code
    text = f"{who}: HTTP {status}: {detail}"
    if status == 429 or rate_limited:
        retry_after_s = parse_retry_after(answer.headers.get("retry-after"), now=now)
        return RateLimited(text, retry_after_s=retry_after_s)
    if status in (401, 403) or auth_failed:
        return AuthFailed(text)
    if status == 408:
        return ProviderTimeout(text)
    if 400 <= status < 500:
        return Rejected(text)
    return ProviderUnavailable(text)
