"""providers.http_errors: httpx failures and HTTP answers onto the engine's error tree."""

from __future__ import annotations

import email.utils

import httpx
import pytest

from engine.errors import (
    AuthFailed,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    Rejected,
)
from providers.http_errors import http_error, parse_retry_after, transport_error

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("exc", "error"),
    [
        (httpx.ConnectError("refused"), ProviderUnavailable),
        (httpx.ConnectTimeout("slow"), ProviderUnavailable),
        (httpx.PoolTimeout("busy"), ProviderUnavailable),
        (httpx.ReadTimeout("silent"), ProviderTimeout),
        (httpx.WriteTimeout("stuck"), ProviderTimeout),
        (httpx.ReadError("reset"), ProviderTimeout),
        (httpx.WriteError("reset"), ProviderTimeout),
        (httpx.RemoteProtocolError("hung up"), ProviderTimeout),
        (httpx.UnsupportedProtocol("ftp"), ProviderUnavailable),
    ],
)
def test_transport_errors_map_by_whether_the_request_went_out(
    exc: httpx.TransportError, error: type[ProviderError]
) -> None:
    mapped = transport_error(exc, "apns 'x'")
    assert type(mapped) is error
    assert "apns 'x'" in str(mapped)


def test_retry_after_reads_seconds_always_and_dates_with_a_clock() -> None:
    assert parse_retry_after("7", now=NOW) == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(email.utils.formatdate(NOW + 30, usegmt=True), now=NOW) == 30.0
    assert parse_retry_after(email.utils.formatdate(NOW - 30, usegmt=True), now=NOW) == 0.0
    # without a clock the date form cannot be read
    assert parse_retry_after(email.utils.formatdate(NOW + 30, usegmt=True)) is None
    for unreadable in ("soon", "-3", ""):
        assert parse_retry_after(unreadable, now=NOW) is None
    assert parse_retry_after(None, now=NOW) is None


def _answer(status: int, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers)


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, RateLimited),
        (401, AuthFailed),
        (403, AuthFailed),
        (408, ProviderTimeout),
        (400, Rejected),
        (404, Rejected),
        (500, ProviderUnavailable),
        (503, ProviderUnavailable),
        (302, ProviderUnavailable),
    ],
)
def test_http_error_maps_by_status(status: int, error: type[ProviderError]) -> None:
    mapped = http_error(_answer(status), "ghasi", "what it said")
    assert type(mapped) is error
    assert str(mapped) == f"ghasi: HTTP {status}: what it said"


def _retry_after_s(headers: dict[str, str], now: float | None = None) -> float | None:
    mapped = http_error(_answer(429, headers), "w", "", now=now)
    assert isinstance(mapped, RateLimited)
    return mapped.retry_after_s


def test_rate_limited_carries_retry_after() -> None:
    assert _retry_after_s({"retry-after": "12"}) == 12.0
    assert _retry_after_s({"retry-after": email.utils.formatdate(NOW + 4, usegmt=True)}, NOW) == 4.0
    assert _retry_after_s({}) is None


def test_vendor_codes_force_rate_limit_and_auth() -> None:
    assert type(http_error(_answer(400), "twilio", "code 20429", rate_limited=True)) is RateLimited
    assert type(http_error(_answer(400), "twilio", "code 20003", auth_failed=True)) is AuthFailed
