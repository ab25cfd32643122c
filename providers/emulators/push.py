"""Loopback emulators of FCM HTTP v1 and APNs, with Pub/Sub-style delivery feedback.

:class:`FcmEmulator` serves Google's OAuth2 token endpoint (``POST {token_path}``:
verifies the service account's RS256 assertion with its public key and hands out
access tokens) and ``POST /v1/projects/{project_id}/messages:send`` (verifies the
bearer token; errors in FCM's exact body, ``FcmError.errorCode`` included).

:class:`ApnsEmulator` serves ``POST /3/device/{token}`` over HTTP/2 only (an HTTP/1.1
request there gets 505, as APNs would refuse the connection; the feedback and control
routes, another service in reality, take either); it verifies the ES256
provider token with the team's public key and answers APNs's ``{"reason": ...}``.

Both run sends through the base's fault plan (:mod:`providers.emulators.base`),
count them by idempotency key (FCM: ``data.triage_key``; APNs: ``triage.key``),
record them by reference, and :meth:`unregister` makes a device token dead
(FCM 404 UNREGISTERED, APNs 410 Unregistered).

Delivery feedback: each accepted message gets a ``delivered`` :class:`PushFeedback`
published to the emulator's :class:`Subscription` after ``receipt_delay_s`` (held
while ``receipts_paused``), pulled with Pub/Sub's REST wire format::

    POST /v1/{subscription}:pull         {"maxMessages": N}
    POST /v1/{subscription}:acknowledge  {"ackIds": [...]}

Unacked messages are redelivered (with a new ack id) after ``ack_deadline_s``. The
stall fault, :meth:`PushEmulator.stall_session`, makes every session seen so far
(or one) hang on pull while a new session pulls normally. A session is named by the
``x-triage-session`` header (:data:`providers.push_feedback.SESSION_HEADER`), else
by the client's connection.
"""

from __future__ import annotations

import base64
import datetime
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict, Unpack

import jwt
import msgspec
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from providers.channel import DeliveryState
from providers.emulators.base import (
    Emulator,
    ReceiptPost,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    StoredMessage,
)
from providers.fcm import FCM_ERROR_TYPE, FCM_SCOPE, JWT_BEARER_GRANT, ServiceAccount
from providers.push_feedback import SESSION_HEADER, PushFeedback

__all__ = [
    "ApnsEmulator",
    "FcmEmulator",
    "PushEmulator",
    "Subscription",
    "generate_apns_key",
    "generate_service_account",
]

# status -> (FcmError.errorCode, google.rpc status) for injected faults
_FCM_FAULTS = {
    400: ("INVALID_ARGUMENT", "INVALID_ARGUMENT"),
    401: ("THIRD_PARTY_AUTH_ERROR", "UNAUTHENTICATED"),
    403: ("SENDER_ID_MISMATCH", "PERMISSION_DENIED"),
    404: ("UNREGISTERED", "NOT_FOUND"),
    429: ("QUOTA_EXCEEDED", "RESOURCE_EXHAUSTED"),
    500: ("INTERNAL", "INTERNAL"),
    503: ("UNAVAILABLE", "UNAVAILABLE"),
}
# status -> APNs reason for injected faults
_APNS_FAULTS = {
    400: "BadTopic",
    403: "InvalidProviderToken",
    404: "BadPath",
    405: "MethodNotAllowed",
    410: "Unregistered",
    413: "PayloadTooLarge",
    429: "TooManyRequests",
    500: "InternalServerError",
    503: "ServiceUnavailable",
}
_APNS_PUSH_TYPES = frozenset(
    {
        "alert",
        "background",
        "location",
        "voip",
        "complication",
        "fileprovider",
        "mdm",
        "liveactivity",
    }
)
_HEX = re.compile(r"[0-9a-fA-F]+")


# -- keys for tests, chaos scenarios and `make run` -------------------------------------


def generate_service_account(
    *, project_id: str, client_email: str, token_uri: str, key_bits: int = 2048
) -> tuple[ServiceAccount, str]:
    """A fresh service account (RSA key) and its public key PEM, for the emulator."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_bits)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    account = ServiceAccount(
        project_id=project_id,
        client_email=client_email,
        private_key=private_pem,
        token_uri=token_uri,
        private_key_id=secrets.token_hex(20),
    )
    return account, _public_pem(key.public_key())


def generate_apns_key() -> tuple[str, str]:
    """A fresh P-256 signing key: ``(private PEM, public PEM)``, as an APNs ``.p8`` key."""
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return private_pem, _public_pem(key.public_key())


def _public_pem(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


# -- the feedback subscription ------------------------------------------------------


@dataclass
class _Pending:
    message_id: str
    data: bytes
    attributes: dict[str, str]
    publish_time: str
    ack_id: str | None = None
    lease_until: float | None = None  # trio time
    deliveries: int = 0


class _PullBody(msgspec.Struct):  # Pub/Sub's REST wire names (camelCase) as they are
    maxMessages: int = 1


class _AckBody(msgspec.Struct):
    ackIds: list[str]


class Subscription:
    """A Pub/Sub pull subscription held in memory: publish, pull (with leases), ack.

    At most ``max_backlog`` unacknowledged messages are kept; publishing beyond drops
    the oldest (counted in ``dropped``), as Pub/Sub's retention period would.
    """

    def __init__(self, *, ack_deadline_s: float, pull_wait_s: float, max_backlog: int) -> None:
        if max_backlog < 1:
            raise ValueError("subscription: max_backlog must be >= 1")
        self.ack_deadline_s = ack_deadline_s
        self.pull_wait_s = pull_wait_s
        self.max_backlog = max_backlog
        self.dropped = 0  # oldest messages dropped because the backlog was full
        self._pending: dict[str, _Pending] = {}
        self._by_ack: dict[str, str] = {}
        self._published = trio.Event()
        self._seq = 0
        self.published = 0
        self.acked = 0

    def publish(self, data: bytes, attributes: dict[str, str], publish_time: str) -> str:
        self._seq += 1
        message_id = str(self._seq)
        if len(self._pending) >= self.max_backlog:  # like Pub/Sub's retention: oldest go
            oldest = self._pending.pop(next(iter(self._pending)))
            if oldest.ack_id is not None:
                self._by_ack.pop(oldest.ack_id, None)
            self.dropped += 1
        self._pending[message_id] = _Pending(message_id, data, attributes, publish_time)
        self.published += 1
        self._published.set()
        self._published = trio.Event()
        return message_id

    @property
    def backlog(self) -> int:
        """Published and not yet acknowledged."""
        return len(self._pending)

    async def pull(self, max_messages: int) -> list[dict[str, Any]]:
        """Lease up to ``max_messages`` available messages, waiting up to ``pull_wait_s``."""
        leased = self._lease(max_messages)
        if not leased and self.pull_wait_s > 0:
            with trio.move_on_after(self.pull_wait_s):
                while not leased:
                    await self._published.wait()
                    leased = self._lease(max_messages)
        return leased

    def _lease(self, max_messages: int) -> list[dict[str, Any]]:
        now = trio.current_time()
        out: list[dict[str, Any]] = []
        for item in self._pending.values():
            if len(out) >= max_messages:
                break
            if item.lease_until is not None and item.lease_until > now:
                continue
            if item.ack_id is not None:
                self._by_ack.pop(item.ack_id, None)
            item.ack_id = secrets.token_urlsafe(16)
            item.lease_until = now + self.ack_deadline_s
            item.deliveries += 1
            self._by_ack[item.ack_id] = item.message_id
            out.append(
                {
                    "ackId": item.ack_id,
                    "message": {
                        "data": base64.b64encode(item.data).decode(),
                        "attributes": item.attributes,
                        "messageId": item.message_id,
                        "publishTime": item.publish_time,
                    },
                }
            )
        return out

    def ack(self, ack_ids: list[str]) -> int:
        """Remove the messages these (current) ack ids name; returns how many."""
        done = 0
        for ack_id in ack_ids:
            message_id = self._by_ack.pop(ack_id, None)
            if message_id is not None and self._pending.pop(message_id, None) is not None:
                done += 1
        self.acked += done
        return done


# -- the shared push emulator --------------------------------------------------------


class FeedbackOptions(TypedDict, total=False):
    """What FCM and APNs emulators pass through to :class:`PushEmulator`."""

    subscription: str
    ack_deadline_s: float
    pull_wait_s: float
    max_backlog: int
    receipt_delay_s: float
    auto_receipts: bool
    clock: Callable[[], float]


class PushEmulator(Emulator):
    """What FCM and APNs emulators share: dead tokens, the feedback subscription, stalls."""

    def __init__(
        self,
        name: str,
        *,
        subscription: str,
        ack_deadline_s: float = 10.0,
        pull_wait_s: float = 0.0,
        max_backlog: int = 100_000,
        receipt_delay_s: float = 0.0,
        auto_receipts: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            name, receipt_delay_s=receipt_delay_s, auto_receipts=auto_receipts, clock=clock
        )
        self.subscription_path = subscription.strip("/")
        self.feedback = Subscription(
            ack_deadline_s=ack_deadline_s, pull_wait_s=pull_wait_s, max_backlog=max_backlog
        )
        self.unregistered: set[str] = set()
        self.sessions: set[str] = set()
        self.stalled: set[str] = set()
        self.stalled_pulls = 0

    def unregister(self, token: str) -> None:
        """From now on this device token is dead (FCM UNREGISTERED, APNs 410)."""
        self.unregistered.add(token)

    async def control(self, method: str, path: str, request: Request) -> Response | None:
        """``POST /_emulator/stall`` (every session seen so far hangs), ``DELETE
        /_emulator/stall``, ``POST /_emulator/unregister {"token": ...}``: for curl."""
        match (method, path):
            case ("POST", "/stall"):
                self.stall_session()
                return Response.json(200, {"stalled_sessions": len(self.stalled)})
            case ("DELETE", "/stall"):
                self.clear_stall()
                return Response.json(200, {"stalled_sessions": 0})
            case ("POST", "/unregister"):
                token = msgspec.json.decode(request.body, type=dict[str, str])["token"]
                self.unregister(token)
                return Response.json(200, {"unregistered": len(self.unregistered)})
        return None

    def stall_session(self, session: str | None = None) -> None:
        """Pulls from ``session`` (default: every session seen so far) hang from now on;
        a new session is unaffected."""
        self.stalled |= {session} if session is not None else set(self.sessions)

    def clear_stall(self) -> None:
        self.stalled.clear()

    def receipt_for(self, message: StoredMessage, state: str) -> ReceiptPost | None:
        """Publish the feedback to the subscription; nothing is POSTed (returns None)."""
        if message.reference is None:
            return None
        feedback = PushFeedback(
            state=msgspec.convert(state, DeliveryState),
            reference=message.reference,
            occurred_at=self.clock(),
            provider_ref=message.provider_ref,
            token=message.recipient,
        )
        self.feedback.publish(
            msgspec.json.encode(feedback),
            {"provider": self.name, "state": feedback.state.value},
            _rfc3339(self.clock()),
        )
        self._bump()  # wake wait_until
        return None

    async def handle_feedback(self, request: Request) -> Response | None:
        """The subscription's routes; 404 for anything else."""
        root = f"/v1/{self.subscription_path}"
        if request.method != "POST" or request.path not in (f"{root}:pull", f"{root}:acknowledge"):
            return _google_error(404, "NOT_FOUND", f"no route {request.method} {request.path}")
        session = request.headers.get(SESSION_HEADER) or f"conn:{request.client}"
        self.sessions.add(session)
        try:
            if request.path.endswith(":pull"):
                if session in self.stalled:
                    self.stalled_pulls += 1
                    return None  # the session's data stops flowing: no answer
                pull = msgspec.json.decode(request.body or b"{}", type=_PullBody)
                if pull.maxMessages < 1:
                    return _google_error(400, "INVALID_ARGUMENT", "maxMessages must be >= 1")
                received = await self.feedback.pull(pull.maxMessages)
                return Response.json(200, {"receivedMessages": received} if received else {})
            ack = msgspec.json.decode(request.body, type=_AckBody)
            self.feedback.ack(ack.ackIds)
            return Response.json(200, {})
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _google_error(400, "INVALID_ARGUMENT", f"Invalid JSON payload received. {exc}")

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        stats.update(
            feedback_published=self.feedback.published,
            feedback_acked=self.feedback.acked,
            feedback_backlog=self.feedback.backlog,
            stalled_sessions=len(self.stalled),
            unregistered=len(self.unregistered),
        )
        return stats


def _rfc3339(unix: float) -> str:
    when = datetime.datetime.fromtimestamp(unix, datetime.UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _google_error(
    status: int, rpc_status: str, message: str, *, fcm_code: str | None = None
) -> Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": rpc_status}
    if fcm_code is not None:
        error["details"] = [{"@type": FCM_ERROR_TYPE, "errorCode": fcm_code}]
    return Response.json(status, {"error": error})


# -- FCM --------------------------------------------------------------------------


class _FcmSend(msgspec.Struct):
    token: str
    notification: dict[str, str] = msgspec.field(default_factory=dict)
    data: dict[str, str] = msgspec.field(default_factory=dict)


class _FcmBody(msgspec.Struct):
    message: _FcmSend


class FcmEmulator(PushEmulator):
    """FCM HTTP v1 and Google's token endpoint for one project and service account.

    ``public_key`` is the service account's public key PEM (see
    :func:`generate_service_account`); ``token_lifetime_s`` is the access tokens'
    ``expires_in``; ``max_assertion_s`` the longest ``exp - iat`` accepted.
    ``token_status``, when set, is answered by the token endpoint (a fault).
    """

    def __init__(
        self,
        name: str = "fcm",
        *,
        project_id: str,
        client_email: str,
        public_key: str,
        token_path: str = "/token",
        token_lifetime_s: float = 3600.0,
        max_assertion_s: float = 3600.0,
        **feedback: Unpack[FeedbackOptions],
    ) -> None:
        feedback.setdefault("subscription", "projects/triage/subscriptions/fcm-feedback")
        super().__init__(name, **feedback)
        self.project_id = project_id
        self.client_email = client_email
        self._public_key = serialization.load_pem_public_key(public_key.encode())
        self.token_path = token_path
        self.token_lifetime_s = token_lifetime_s
        self.max_assertion_s = max_assertion_s
        self.token_status: int | None = None
        self.access_tokens: dict[str, float] = {}  # token -> expires at (wall clock)
        self.tokens_issued = 0

    def revoke_tokens(self) -> None:
        """Every access token handed out so far is refused from now on (401)."""
        self.access_tokens.clear()

    def error_response(self, status: int, reason: str) -> Response:
        code, rpc_status = _FCM_FAULTS.get(status, (None, "UNKNOWN"))
        return _google_error(status, rpc_status, reason, fcm_code=code)

    async def handle(self, request: Request) -> Response | None:
        if request.method == "POST" and request.path == self.token_path:
            return self._token(request)
        if request.method == "POST" and request.path == (
            f"/v1/projects/{self.project_id}/messages:send"
        ):
            return await self._send(request)
        if request.path.endswith(":send") and request.path.startswith("/v1/projects/"):
            return _google_error(403, "PERMISSION_DENIED", "Permission denied on the project")
        return await self.handle_feedback(request)

    def _token(self, request: Request) -> Response:
        if self.token_status is not None:
            return Response.json(self.token_status, {"error": "internal_failure"})
        form = request.form()
        if form.get("grant_type") != JWT_BEARER_GRANT:
            return _oauth_error("unsupported_grant_type", "Invalid grant_type")
        try:
            claims = jwt.decode(
                form.get("assertion", ""),
                self._public_key,  # type: ignore[arg-type]  # an RSA public key
                algorithms=["RS256"],
                options={"verify_exp": False, "verify_iat": False, "verify_aud": False},
            )
        except jwt.PyJWTError:
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")
        now = self.clock()
        iat, exp = claims.get("iat"), claims.get("exp")
        if claims.get("iss") != self.client_email:
            return _oauth_error("invalid_grant", "Invalid issuer.")
        if claims.get("aud") != request.url.split("?", 1)[0]:
            return _oauth_error("invalid_grant", "Invalid JWT: audience is not the token URL.")
        if FCM_SCOPE not in str(claims.get("scope", "")).split():
            return _oauth_error("invalid_scope", "The scope does not include FCM.")
        if not isinstance(iat, int | float) or not isinstance(exp, int | float):
            return _oauth_error("invalid_grant", "Invalid JWT: iat and exp are required.")
        if exp <= now or exp - iat > self.max_assertion_s or iat > now + self.max_assertion_s:
            return _oauth_error("invalid_grant", "Invalid JWT: Token must be a short-lived token.")
        token = f"ya29.{secrets.token_urlsafe(24)}"
        self.access_tokens = {t: at for t, at in self.access_tokens.items() if at > now}
        self.access_tokens[token] = now + self.token_lifetime_s
        self.tokens_issued += 1
        return Response.json(
            200,
            {
                "access_token": token,
                "expires_in": int(self.token_lifetime_s),
                "token_type": "Bearer",
            },
        )

    async def _send(self, request: Request) -> Response | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        expires_at = self.access_tokens.get(token) if scheme.lower() == "bearer" else None
        if expires_at is None or expires_at <= self.clock():
            return _google_error(
                401, "UNAUTHENTICATED", "Request had invalid authentication credentials."
            )
        try:
            sent = msgspec.json.decode(request.body, type=_FcmBody).message
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return _google_error(
                400,
                "INVALID_ARGUMENT",
                f"Invalid JSON payload received. {exc}",
                fcm_code="INVALID_ARGUMENT",
            )
        if not sent.token:
            return _google_error(
                400,
                "INVALID_ARGUMENT",
                "The registration token is not a valid FCM registration token",
                fcm_code="INVALID_ARGUMENT",
            )
        if sent.token in self.unregistered:
            return _google_error(
                404, "NOT_FOUND", "Requested entity was not found.", fcm_code="UNREGISTERED"
            )
        key = sent.data.get("triage_key")

        def accept() -> tuple[StoredMessage, Response]:
            name = f"projects/{self.project_id}/messages/{self.next_id('0:')}"
            message = StoredMessage(
                provider_ref=name,
                reference=sent.data.get("triage_ref"),
                idempotency_key=key,
                recipient=sent.token,
                body=sent.notification.get("body", ""),
                status="accepted",
                accepted_at=self.clock(),
                fields=dict(sent.data),
            )
            return message, Response.json(200, {"name": name})

        return await self.take_send(request, key=key, accept=accept)


def _oauth_error(error: str, description: str) -> Response:
    return Response.json(400, {"error": error, "error_description": description})


# -- APNs -------------------------------------------------------------------------


class _ApnsBody(msgspec.Struct):
    aps: dict[str, Any]
    triage: dict[str, Any] = msgspec.field(default_factory=dict)


class ApnsEmulator(PushEmulator):
    """APNs's provider API (token auth) over HTTP/2 for one team and signing key.

    ``keys`` maps each ``kid`` to ``(team_id, public key PEM)``; ``topics`` are the
    bundle ids the team may push to (empty: any); ``token_max_age_s`` is how old a
    provider token may be (APNs: an hour); ``max_payload_bytes`` the payload limit.
    """

    def __init__(
        self,
        name: str = "apns",
        *,
        keys: dict[str, tuple[str, str]],
        topics: frozenset[str] = frozenset(),
        token_max_age_s: float = 3600.0,
        max_payload_bytes: int = 4096,
        **feedback: Unpack[FeedbackOptions],
    ) -> None:
        feedback.setdefault("subscription", "projects/triage/subscriptions/apns-feedback")
        super().__init__(name, **feedback)
        self._keys = {
            kid: (team, serialization.load_pem_public_key(pem.encode()))
            for kid, (team, pem) in keys.items()
        }
        self.topics = topics
        self.token_max_age_s = token_max_age_s
        self.max_payload_bytes = max_payload_bytes
        self.http_versions: Counter[str] = Counter()  # ASGI http_version of each request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.http_versions[str(scope.get("http_version"))] += 1
            if scope.get("http_version") != "2" and scope["path"].startswith("/3/"):
                await send({"type": "http.response.start", "status": 505, "headers": []})
                await send({"type": "http.response.body", "body": b"APNs speaks HTTP/2 only"})
                return
        await super().__call__(scope, receive, send)

    def error_response(self, status: int, reason: str) -> Response:
        return _apns_error(status, _APNS_FAULTS.get(status, "InternalServerError"))

    async def handle(self, request: Request) -> Response | None:
        if request.path.startswith("/3/device/"):
            if request.method != "POST":
                return _apns_error(405, "MethodNotAllowed")
            return await self._send(request, request.path.removeprefix("/3/device/"))
        return await self.handle_feedback(request)

    def _auth_error(self, authorization: str) -> str | None:
        """APNs's reason for refusing the provider token, or ``None`` if it is good."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "MissingProviderToken"
        try:
            header = jwt.get_unverified_header(token)
            team, public_key = self._keys[str(header.get("kid"))]
            claims = jwt.decode(
                token,
                public_key,  # type: ignore[arg-type]  # an EC public key
                algorithms=["ES256"],
                options={"verify_iat": False, "verify_exp": False},
            )
        except (jwt.PyJWTError, KeyError):
            return "InvalidProviderToken"
        iat = claims.get("iat")
        if claims.get("iss") != team or not isinstance(iat, int | float):
            return "InvalidProviderToken"
        if self.clock() - iat > self.token_max_age_s:
            return "ExpiredProviderToken"
        return None

    async def _send(self, request: Request, device_token: str) -> Response | None:
        headers = request.headers
        if (reason := self._auth_error(headers.get("authorization", ""))) is not None:
            return _apns_error(403, reason)
        topic = headers.get("apns-topic")
        if not topic:
            return _apns_error(400, "MissingTopic")
        if self.topics and topic not in self.topics:
            return _apns_error(400, "TopicDisallowed")
        if headers.get("apns-push-type", "alert") not in _APNS_PUSH_TYPES:
            return _apns_error(400, "InvalidPushType")
        if headers.get("apns-priority", "10") not in ("1", "5", "10"):
            return _apns_error(400, "BadPriority")
        if not headers.get("apns-expiration", "0").isdigit():
            return _apns_error(400, "BadExpirationDate")
        apns_id = headers.get("apns-id")
        if apns_id is not None:
            try:
                apns_id = str(uuid.UUID(apns_id))
            except ValueError:
                return _apns_error(400, "BadMessageId")
        if not _HEX.fullmatch(device_token):
            return _apns_error(400, "BadDeviceToken")
        if len(request.body) > self.max_payload_bytes:
            return _apns_error(413, "PayloadTooLarge")
        try:
            body = msgspec.json.decode(request.body, type=_ApnsBody)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return _apns_error(400, "PayloadEmpty" if not request.body else "BadRequest")
        if device_token in self.unregistered:
            return _apns_error(410, "Unregistered", timestamp_ms=int(self.clock() * 1000))
        key = body.triage.get("key")
        ref = body.triage.get("ref")
        alert = body.aps.get("alert")
        text = alert.get("body", "") if isinstance(alert, dict) else str(alert or "")
        answer_id = apns_id or str(uuid.uuid4())

        def accept() -> tuple[StoredMessage, Response]:
            message = StoredMessage(
                provider_ref=answer_id,
                reference=ref if isinstance(ref, str) else None,
                idempotency_key=key if isinstance(key, str) else None,
                recipient=device_token,
                body=str(text),
                status="accepted",
                accepted_at=self.clock(),
                fields={
                    "topic": topic,
                    "push_type": headers.get("apns-push-type", "alert"),
                    "priority": headers.get("apns-priority", "10"),
                    "expiration": headers.get("apns-expiration", "0"),
                },
            )
            return message, Response(200, b"", (("apns-id", answer_id),))

        return await self.take_send(
            request, key=key if isinstance(key, str) else None, accept=accept
        )


def _apns_error(status: int, reason: str, *, timestamp_ms: int | None = None) -> Response:
    body: dict[str, Any] = {"reason": reason}
    if timestamp_ms is not None:
        body["timestamp"] = timestamp_ms
    return Response.json(status, body)
