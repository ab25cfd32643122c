"""Firebase Cloud Messaging, HTTP v1 API: one push adapter.

Authentication is OAuth2 with a service account: an RS256 JWT signed with the
account's key (``iss`` = ``client_email``, ``scope`` = FCM's, ``aud`` = ``token_uri``)
is traded at ``token_uri`` (``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer``)
for an access token. The token is cached and refreshed ``refresh_margin_s`` before
it expires; concurrent sends share one refresh (single flight). If a refresh fails
while the old token has not yet expired, the old token is used.

A send is ``POST {base_url}/v1/projects/{project_id}/messages:send``; the
idempotency key and the wire reference travel in ``message.data``
(``triage_key``, ``triage_ref``). FCM's errors, as its ``FcmError.errorCode`` or
else the HTTP status, map onto the engine's tree:

==================================  ============================================
UNREGISTERED (404)                  :class:`~providers.channel.RecipientGone`
QUOTA_EXCEEDED, 429                 ``RateLimited`` (``retry_after_s`` from
                                    ``Retry-After``)
UNAVAILABLE 503, INTERNAL 500, 5xx  ``ProviderUnavailable``
THIRD_PARTY_AUTH_ERROR, 401, 403    ``AuthFailed`` (the cached token is dropped)
(not SENDER_ID_MISMATCH)
INVALID_ARGUMENT 400,               ``Rejected``
SENDER_ID_MISMATCH 403, other 4xx
==================================  ============================================

Transport failures map as in :func:`providers.http_errors.transport_error`. A
failure while fetching the access token is never ambiguous (the message was not
sent yet): it is ``ProviderUnavailable``, ``RateLimited`` or ``AuthFailed``.
FCM has no status query: :meth:`FcmAdapter.status` answers ``None``.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable

import httpx
import jwt
import msgspec
import trio
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
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

__all__ = [
    "FCM_BASE_URL",
    "FCM_ERROR_TYPE",
    "FCM_SCOPE",
    "JWT_BEARER_GRANT",
    "FcmAdapter",
    "ServiceAccount",
]

FCM_BASE_URL = "https://fcm.googleapis.com"
FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"


class ServiceAccount(msgspec.Struct, frozen=True, kw_only=True):
    """The fields of a Google service-account key file that FCM needs (others ignored)."""

    project_id: str
    client_email: str
    private_key: str  # PEM
    token_uri: str
    private_key_id: str | None = None

    @classmethod
    def from_json(cls, raw: bytes | str) -> ServiceAccount:
        """Parse a key file; ``ConfigError`` names the missing or bad field."""
        try:
            return msgspec.json.decode(raw, type=cls)
        except msgspec.DecodeError as exc:
            raise ConfigError(f"service account key file: {exc}") from exc


class _Token(msgspec.Struct, frozen=True):
    value: str
    expires_at: float
    refresh_at: float


class _SendAnswer(msgspec.Struct):
    name: str  # "projects/{project_id}/messages/{message_id}"


class _TokenAnswer(msgspec.Struct):
    access_token: str
    expires_in: float
    token_type: str = "Bearer"


class FcmAdapter:
    """FCM HTTP v1. The adapter owns ``client`` and closes it in :meth:`aclose`.

    ``now`` is the wall clock (JWT ``iat``/``exp`` and token expiry), injectable so
    tests move time. ``token_lifetime_s`` is the JWT assertion's ``exp - iat``
    (Google allows at most an hour).
    """

    channel = ChannelName.PUSH

    def __init__(
        self,
        name: str,
        *,
        client: httpx.AsyncClient,
        account: ServiceAccount,
        refresh_margin_s: float,
        token_lifetime_s: float,
        base_url: str = FCM_BASE_URL,
        scope: str = FCM_SCOPE,
        now: Callable[[], float] = time.time,
    ) -> None:
        if not refresh_margin_s >= 0:
            raise ConfigError(f"fcm {name!r}: refresh_margin_s must be >= 0")
        if not token_lifetime_s > 0:
            raise ConfigError(f"fcm {name!r}: token_lifetime_s must be > 0")
        try:
            key = load_pem_private_key(account.private_key.encode(), password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"fcm {name!r}: private_key is not a PEM private key") from exc
        if not isinstance(key, RSAPrivateKey):
            raise ConfigError(f"fcm {name!r}: private_key must be an RSA key (RS256)")
        self.name = name
        self._client = client
        self._account = account
        self._key = key
        self._refresh_margin_s = refresh_margin_s
        self._token_lifetime_s = token_lifetime_s
        self._send_url = f"{base_url.rstrip('/')}/v1/projects/{account.project_id}/messages:send"
        self._scope = scope
        self._now = now
        self._token: _Token | None = None
        self._refresh_lock = trio.Lock()
        self.token_refreshes = 0  # access tokens fetched (for tests and metrics)

    # -- access token ---------------------------------------------------------------

    def assertion(self) -> str:
        """The signed JWT traded at ``token_uri`` for an access token."""
        iat = int(self._now())
        claims = {
            "iss": self._account.client_email,
            "scope": self._scope,
            "aud": self._account.token_uri,
            "iat": iat,
            "exp": iat + int(self._token_lifetime_s),
        }
        headers = {"kid": self._account.private_key_id} if self._account.private_key_id else None
        return jwt.encode(claims, self._key, algorithm="RS256", headers=headers)

    def drop_token(self) -> None:
        """Forget the cached access token; the next send fetches a new one."""
        self._token = None

    async def access_token(self) -> str:
        """The cached token, refreshed when within ``refresh_margin_s`` of expiry."""
        token = self._token
        if token is not None and self._now() < token.refresh_at:
            return token.value
        async with self._refresh_lock:  # single flight: waiters find the fresh token
            token = self._token
            if token is not None and self._now() < token.refresh_at:
                return token.value
            try:
                token = await self._fetch_token()
            except ProviderError:
                old = self._token
                if old is not None and self._now() < old.expires_at:
                    return old.value  # still valid: refresh again on the next send
                raise
            self._token = token
            return token.value

    async def _fetch_token(self) -> _Token:
        started = self._now()
        form = {"grant_type": JWT_BEARER_GRANT, "assertion": self.assertion()}
        try:
            response = await post_bytes(
                self._client,
                self._account.token_uri,
                content=urllib.parse.urlencode(form).encode(),
                headers={"content-type": "application/x-www-form-urlencoded"},
            )
        except httpx.TransportError as exc:
            # Nothing was sent to FCM yet: never ambiguous.
            raise ProviderUnavailable(f"fcm {self.name!r} token endpoint: {exc!r}") from exc
        if response.status_code == 200:
            try:
                answer = msgspec.json.decode(response.content, type=_TokenAnswer)
            except msgspec.DecodeError as exc:
                raise ProviderUnavailable(
                    f"fcm {self.name!r}: malformed token answer: {exc}"
                ) from exc
            self.token_refreshes += 1
            expires_at = started + answer.expires_in
            return _Token(answer.access_token, expires_at, expires_at - self._refresh_margin_s)
        detail = (
            f"fcm {self.name!r} token endpoint: HTTP {response.status_code} {response.text[:200]}"
        )
        if response.status_code == 429:
            raise RateLimited(detail, retry_after_s=self._retry_after(response))
        if response.status_code >= 500:
            raise ProviderUnavailable(detail)
        raise AuthFailed(detail)

    # -- send -----------------------------------------------------------------------

    async def send(self, message: Message) -> Accepted:
        platform, device_token = push_platform(message.recipient)
        if platform != "fcm":
            raise Rejected(f"fcm {self.name!r}: recipient is for {platform!r}, not fcm")
        bearer = await self.access_token()
        notification = {"body": message.body}
        if message.subject is not None:
            notification["title"] = message.subject
        data = {
            **message.data,
            "triage_ref": message.reference,
            "triage_key": message.idempotency_key,
        }
        body = {"message": {"token": device_token, "notification": notification, "data": data}}
        try:
            response = await post_bytes(
                self._client,
                self._send_url,
                content=msgspec.json.encode(body),
                headers={"authorization": f"Bearer {bearer}", "content-type": "application/json"},
            )
        except httpx.TransportError as exc:
            raise transport_error(exc, f"fcm {self.name!r}") from exc
        if response.status_code == 200:
            try:
                provider_ref = str(msgspec.json.decode(response.content, type=_SendAnswer).name)
            except msgspec.DecodeError:
                # A 200 means FCM took the message, even if its answer is unreadable:
                # accepted, named by our reference (failing over would send it twice).
                provider_ref = message.reference
            return Accepted(provider=self.name, provider_ref=provider_ref)
        raise self._error(response, message.recipient)

    def _error(self, response: httpx.Response, recipient: str) -> ProviderError:
        status = response.status_code
        code, error_status = _fcm_error_code(response.content)
        detail = f"fcm {self.name!r}: HTTP {status} {code or error_status or ''}".rstrip()
        if code == "UNREGISTERED":
            return RecipientGone(recipient, "UNREGISTERED")
        if code == "QUOTA_EXCEEDED" or status == 429:
            return RateLimited(detail, retry_after_s=self._retry_after(response))
        if code in ("UNAVAILABLE", "INTERNAL") or status >= 500:
            return ProviderUnavailable(detail)
        if (
            code == "THIRD_PARTY_AUTH_ERROR"
            or status == 401
            or (status == 403 and code != "SENDER_ID_MISMATCH")
        ):
            self.drop_token()
            return AuthFailed(detail)
        return Rejected(detail)

    def _retry_after(self, response: httpx.Response) -> float | None:
        return parse_retry_after(response.headers.get("retry-after"), now=self._now())

    async def status(self, message: Message) -> StatusAnswer | None:
        """FCM cannot be asked about a message: always ``None``."""
        return None

    async def aclose(self) -> None:
        await self._client.aclose()


def _fcm_error_code(content: bytes) -> tuple[str | None, str | None]:
    """``(FcmError.errorCode, error.status)`` from an error body; ``None`` where absent."""
    try:
        body = msgspec.json.decode(content)
    except msgspec.DecodeError:
        return None, None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None, None
    status = error.get("status") if isinstance(error.get("status"), str) else None
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if isinstance(detail, dict) and detail.get("@type") == FCM_ERROR_TYPE:
            code = detail.get("errorCode")
            if isinstance(code, str):
                return code, status
    return None, status
