"""Apple Push Notification service over HTTP/2 with a provider token: one push adapter.

The provider token is an ES256 JWT (header ``{alg: ES256, kid: key_id}``, claims
``{iss: team_id, iat}``) signed with the team's key. It is reused and regenerated
every ``token_refresh_s``: APNs refuses tokens older than an hour
(``ExpiredProviderToken``) and a provider that regenerates more than once per 20
minutes (``TooManyProviderTokenUpdates``), so ``token_refresh_s`` belongs between.

A send is ``POST {base_url}/3/device/{token}`` on an HTTP/2 connection (APNs speaks
nothing else; the loopback emulator is ``http://`` with prior knowledge, see
:func:`apns_client`), with ``apns-id`` = the dispatch id when it is a UUID. The
body carries the wire reference and the idempotency key (``triage.ref``,
``triage.key``). APNs's answers map onto the engine's tree:

===================================  ============================================
200                                  ``Accepted`` (``provider_ref`` = ``apns-id``)
410 Unregistered / ExpiredToken,     :class:`~providers.channel.RecipientGone`
400 BadDeviceToken
other 400, 404, 405, 413             ``Rejected``
403 (Expired/Invalid/Missing         ``AuthFailed``; the token is dropped, so the
ProviderToken, BadCertificate ...)   next send signs a new one (no retry here)
429 TooManyRequests                  ``RateLimited``
500, 503                             ``ProviderUnavailable``
===================================  ============================================

Transport failures map as in :func:`providers.http_errors.transport_error`.
APNs has no status query: :meth:`ApnsAdapter.status` answers ``None``.
"""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import Callable

import httpx
import jwt
import msgspec
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from engine.errors import (
    AuthFailed,
    ConfigError,
    ProviderError,
    ProviderUnavailable,
    RateLimited,
    Rejected,
)
from providers.channel import Accepted, ChannelName, Message, RecipientGone, StatusAnswer
from providers.http_errors import parse_retry_after, transport_error
from providers.push_feedback import post_bytes, push_platform

__all__ = ["APNS_BASE_URL", "APNS_TOKEN_MAX_AGE_S", "ApnsAdapter", "apns_client"]

APNS_BASE_URL = "https://api.push.apple.com"
APNS_TOKEN_MAX_AGE_S = 3600.0  # APNs refuses provider tokens older than this
_GONE_REASONS = frozenset({"Unregistered", "ExpiredToken", "BadDeviceToken"})
_TOKEN_REASONS = frozenset({"ExpiredProviderToken", "InvalidProviderToken", "MissingProviderToken"})


def apns_client(
    *,
    timeout_s: float,
    keepalive_expiry_s: float | None = None,
    tls: ssl.SSLContext | None = None,
) -> httpx.AsyncClient:
    """An HTTP/2-only client: ALPN ``h2`` over TLS, prior knowledge over ``http://``.

    ``keepalive_expiry_s``: close a connection idle this long (None: httpx's default,
    5 s). Keep it below the
    server's own idle timeout: httpcore does not notice that the server closed an
    idle HTTP/2 connection, and the next send on it ends ambiguous (``ProviderTimeout``).
    ``tls``: a TLS context to reuse (building one loads the CA bundle, ~70 ms of
    blocked event loop); not shared with HTTP/1.1 clients (httpcore sets its ALPN).
    """
    limits = (
        httpx.Limits()
        if keepalive_expiry_s is None
        else httpx.Limits(keepalive_expiry=keepalive_expiry_s)
    )
    verify: ssl.SSLContext | bool = tls if tls is not None else True
    return httpx.AsyncClient(
        http1=False, http2=True, timeout=timeout_s, limits=limits, verify=verify
    )


class _ApnsError(msgspec.Struct):
    reason: str = ""
    timestamp: int | None = None


class ApnsAdapter:
    """APNs with a token-based connection. The adapter owns ``client`` (HTTP/2; see
    :func:`apns_client`) and closes it in :meth:`aclose`.

    ``now`` is the wall clock (``iat``, token age, ``apns-expiration``), injectable so
    tests move time. ``expiration_s`` is how long APNs keeps trying an offline device
    (0: deliver once or drop); ``priority`` is ``apns-priority`` (10 now, 5 power-aware).
    """

    channel = ChannelName.PUSH

    def __init__(
        self,
        name: str,
        *,
        client: httpx.AsyncClient,
        team_id: str,
        key_id: str,
        private_key: str,
        topic: str,
        token_refresh_s: float,
        expiration_s: float,
        priority: int = 10,
        base_url: str = APNS_BASE_URL,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < token_refresh_s < APNS_TOKEN_MAX_AGE_S:
            raise ConfigError(
                f"apns {name!r}: token_refresh_s must be in (0, {APNS_TOKEN_MAX_AGE_S:g})"
            )
        if not expiration_s >= 0:
            raise ConfigError(f"apns {name!r}: expiration_s must be >= 0")
        try:
            key = load_pem_private_key(private_key.encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"apns {name!r}: private_key is not a PEM private key") from exc
        if not isinstance(key, EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ConfigError(f"apns {name!r}: private_key must be a P-256 EC key (ES256)")
        if priority not in (1, 5, 10):
            raise ConfigError(f"apns {name!r}: priority must be 1, 5 or 10")
        self.name = name
        self._client = client
        self._team_id = team_id
        self._key_id = key_id
        self._key = key
        self._topic = topic
        self._token_refresh_s = token_refresh_s
        self._expiration_s = expiration_s
        self._priority = priority
        self._base_url = base_url.rstrip("/")
        self._now = now
        self._token: tuple[str, float] | None = None  # (jwt, issued at)
        self.tokens_signed = 0
        self.last_http_version: str | None = None  # "HTTP/2" unless something is wrong

    def provider_token(self) -> str:
        """The current provider token, signing a new one every ``token_refresh_s``."""
        now = self._now()
        if self._token is not None and now - self._token[1] < self._token_refresh_s:
            return self._token[0]
        iat = int(now)
        token = jwt.encode(
            {"iss": self._team_id, "iat": iat},
            self._key,
            algorithm="ES256",
            headers={"kid": self._key_id},
        )
        self._token = (token, float(iat))
        self.tokens_signed += 1
        return token

    def drop_token(self) -> None:
        """Forget the provider token; the next send signs a new one."""
        self._token = None

    async def send(self, message: Message) -> Accepted:
        platform, device_token = push_platform(message.recipient)
        if platform != "apns":
            raise Rejected(f"apns {self.name!r}: recipient is for {platform!r}, not apns")
        alert = {"body": message.body}
        if message.subject is not None:
            alert["title"] = message.subject
        triage: dict[str, object] = {"ref": message.reference, "key": message.idempotency_key}
        if message.data:
            triage["data"] = message.data
        expiration = int(self._now() + self._expiration_s) if self._expiration_s else 0
        headers = {
            "authorization": f"bearer {self.provider_token()}",
            "apns-topic": self._topic,
            "apns-push-type": "alert",
            "apns-priority": str(self._priority),
            "apns-expiration": str(expiration),
            "content-type": "application/json",
        }
        apns_id = _as_uuid(message.client_ref)
        if apns_id is not None:
            headers["apns-id"] = apns_id
        body = {"aps": {"alert": alert}, "triage": triage}
        try:
            response = await post_bytes(
                self._client,
                f"{self._base_url}/3/device/{device_token}",
                content=msgspec.json.encode(body),
                headers=headers,
            )
        except httpx.TransportError as exc:
            raise transport_error(exc, f"apns {self.name!r}") from exc
        self.last_http_version = response.http_version
        if response.status_code == 200:
            provider_ref = response.headers.get("apns-id") or apns_id or message.reference
            return Accepted(provider=self.name, provider_ref=provider_ref)
        raise self._error(response, message.recipient)

    def _error(self, response: httpx.Response, recipient: str) -> ProviderError:
        status = response.status_code
        try:
            reason = msgspec.json.decode(response.content, type=_ApnsError).reason
        except msgspec.DecodeError:
            reason = ""
        detail = f"apns {self.name!r}: HTTP {status} {reason}".rstrip()
        if status == 410 or (status == 400 and reason in _GONE_REASONS):
            return RecipientGone(recipient, reason or "Unregistered")
        if status == 429:
            retry_after_s = parse_retry_after(response.headers.get("retry-after"), now=self._now())
            return RateLimited(detail, retry_after_s=retry_after_s)
        if status >= 500:
            return ProviderUnavailable(detail)
        if status in (401, 403):
            if status == 401 or reason in _TOKEN_REASONS:
                self.drop_token()
            return AuthFailed(detail)
        return Rejected(detail)

    async def status(self, message: Message) -> StatusAnswer | None:
        """APNs cannot be asked about a message: always ``None``."""
        return None

    async def aclose(self) -> None:
        await self._client.aclose()


def _as_uuid(value: str) -> str | None:
    """``value`` as a canonical lowercase UUID string, or ``None`` if it is not one."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None
