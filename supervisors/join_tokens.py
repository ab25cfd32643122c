"""Join tokens wired from config: the key ring actor (row 10) and its HTTP API.

:func:`build_join_tokens` makes the key ring's child (``[tokens]``, mailbox
``[mailboxes.key_ring]``, row 10's detector) and :class:`JoinTokenApi`, mounted by
the daemon at ``/v1/join-tokens``::

    POST /v1/join-tokens
    {"tenant_id": uuid, "session_id": str, "room": str,
     "user": {"id": str, "name": str, "email"?: str, "moderator"?: bool}}
      201 {"token", "kid", "jti", "room", "session_id", "nbf", "exp"}

    POST /v1/join-tokens/verify
    {"token": str, "room": str}
      200 {"valid": true, "claims": {...}}
      401 {"error": <reason>, "message": ...}   reason: malformed, algorithm_refused,
          unknown_kid, bad_signature, expired, not_yet_valid, wrong_issuer,
          wrong_audience, wrong_subject, wrong_room, revoked

Other answers: 400 ``invalid_request`` (a body that is not the shape above), 404,
405 (``Allow: POST``), 413 ``payload_too_large`` (``[tokens] max_body_bytes``), 503
``signing_unavailable`` (no key may sign) / ``clock_skewed`` (this host's clock is
proven off by more than ``[clock] max_offset_s``: row 16) / ``unavailable`` (the database or the
key ring did not answer).

:class:`VirtualSessionsApi`, mounted at ``/v1/virtual-sessions`` beside the Jitsi pool,
is how a visit is booked without the scheduling stream and how a participant joins
it: the room is the one the pool placed the session in (read from its row as the
tenant; the caller never names a room)::

    POST /v1/virtual-sessions
    {"tenant_id": uuid, "appointment_id": str, "patient_id"?: str, "starts_at"?: time}
      201 {"session_id", "state": "pending", "created": true}
      200 the appointment's existing session ("created": false): one per appointment,
          whichever door (this one or the inbox's scheduling event) came first
      404 tenant_not_found

    POST /v1/virtual-sessions/{session_id}/join
    {"tenant_id": uuid, "user": {"id": str, "name": str, ...}}
      201 {"token", "kid", "jti", "room", "node", "session_id", "appointment_id",
           "nbf", "exp", "join_url"?}   join_url with [jitsi] meet_url set
      404 session_not_found (no such session for this tenant)
      409 session_not_placed (pending: Retry-After) | session_failed (with the
          fallback_thread_id once the fallback thread exists)

The generic route above is for the apps and for Prosody-side checks. Who may call it is
the gateway's business (Kong in front of the daemon), as for the dispatch API.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import socket
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import asyncpg
import msgspec
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from actors.key_ring import (
    ROW,
    DbTokenStore,
    JoinTokens,
    KeyRingActor,
    KeyRingMessage,
    SkewSource,
    key_ring_child,
)
from config import ConfigProblem, TriageConfig
from config.catalog import module_path
from config.preflight import problem
from engine.actor import ActorRef
from engine.detectors import SpikeOverBaselineDetector
from engine.errors import ActorError, LoadShed, ProviderError
from providers.asgi import BodyTooLarge, ClientDisconnected, read_body, send_json, serve_scope
from providers.db.virtual_sessions import JoinTarget
from providers.join_tokens import ClockSkewed, JoinUser, SigningUnavailable, TokenRefused
from providers.key_ring import KeyFileError, load_ring

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

    from engine.runtime import Runtime
    from engine.supervisor import ChildSpec
    from supervisors.backbone import Backbone

__all__ = [
    "MAILBOX",
    "SESSIONS_PATH",
    "TOKEN_MODULES",
    "TOKEN_ROW",
    "JoinTokenApi",
    "JoinTokenWiring",
    "VirtualSessionsApi",
    "build_join_tokens",
    "token_problems",
]

MAILBOX: Final = "key_ring"
PATH: Final = "/v1/join-tokens"
SESSIONS_PATH: Final = "/v1/virtual-sessions"
TOKEN_ROW: Final = ROW
TOKEN_MODULES: Final = frozenset({module_path(KeyRingActor.__module__)})

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class _IssueBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tenant_id: uuid.UUID
    session_id: Text
    room: Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[^*@/\s]+$")]
    user: JoinUser


class _JoinBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tenant_id: uuid.UUID
    user: JoinUser


class _NewSession(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    tenant_id: uuid.UUID
    appointment_id: Text
    patient_id: Text | None = None
    starts_at: dt.datetime | None = None


class _VerifyBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    token: Annotated[str, msgspec.Meta(min_length=1)]
    room: Text


_issue_decoder = msgspec.json.Decoder(_IssueBody)
_verify_decoder = msgspec.json.Decoder(_VerifyBody)
_join_decoder = msgspec.json.Decoder(_JoinBody)
_session_decoder = msgspec.json.Decoder(_NewSession)
_JOIN: Final = re.compile(r"/(?P<session>[0-9a-fA-F-]{36})/join")


def _origin(scope: HTTPScope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else ""


class JoinTokenApi:
    """The ASGI app of ``POST {path}`` and ``POST {path}/verify``; holds no state."""

    def __init__(self, tokens: JoinTokens, *, max_body_bytes: int, path: str = PATH) -> None:
        self.tokens = tokens
        self.max_body_bytes = max_body_bytes
        self.path = path.rstrip("/")

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await serve_scope(scope, receive, send, self._http)

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        path = scope["path"].rstrip("/")
        if path not in (self.path, f"{self.path}/verify"):
            await _answer(
                send, 404, {"error": "not_found", "message": f"nothing at {path[:200]!r}"}
            )
            return
        body = await _post_body(scope, receive, send, self.max_body_bytes)
        if body is None:
            return
        if path == self.path:
            status, answer = await self._issue(body)
        else:
            status, answer = await self._verify(body, _origin(scope))
        await _answer(send, status, answer)

    async def _issue(self, body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            request = _issue_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return 400, {"error": "invalid_request", "message": str(exc)}
        status, answer, _ = await _issue_answer(
            self.tokens, request.tenant_id, request.session_id, request.room, request.user
        )
        return status, answer

    async def _verify(self, body: bytes, origin: str) -> tuple[int, dict[str, Any]]:
        try:
            request = _verify_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return 400, {"error": "invalid_request", "message": str(exc)}
        try:
            claims = await self.tokens.verify(request.token, room=request.room, origin=origin)
        except TokenRefused as exc:
            return 401, {"error": exc.reason, "message": str(exc)}
        except (ProviderError, ActorError, LoadShed) as exc:
            return 503, {"error": "unavailable", "message": str(exc)}
        return 200, {"valid": True, "claims": msgspec.to_builtins(claims)}


class VirtualSessionsApi:
    """The ASGI app of ``POST {path}`` (a visit's session, as the inbox makes it) and
    ``POST {path}/{session_id}/join`` (a join token for the room the Jitsi pool placed
    the session in: the database row is the truth); holds no state."""

    def __init__(
        self,
        tokens: JoinTokens,
        lookup: Callable[[uuid.UUID, uuid.UUID], Awaitable[JoinTarget | None]],
        opener: Callable[[_NewSession], Awaitable[tuple[uuid.UUID, str, bool]]] | None = None,
        *,
        max_body_bytes: int,
        retry_after_s: float,
        meet_url: str | None = None,
        path: str = SESSIONS_PATH,
    ) -> None:
        self.tokens = tokens
        self.lookup = lookup
        self.opener = opener
        self.max_body_bytes = max_body_bytes
        self.retry_after = str(max(1, math.ceil(retry_after_s))).encode()
        self.meet_url = None if meet_url is None else meet_url.rstrip("/")
        self.path = path.rstrip("/")

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await serve_scope(scope, receive, send, self._http)

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        path = scope["path"].rstrip("/")
        match = _JOIN.fullmatch(path.removeprefix(self.path))
        opening = path == self.path and self.opener is not None
        if not path.startswith(self.path) or (match is None and not opening):
            await _answer(
                send, 404, {"error": "not_found", "message": f"nothing at {path[:200]!r}"}
            )
            return
        body = await _post_body(scope, receive, send, self.max_body_bytes)
        if body is None:
            return
        if match is None:
            status, answer = await self._open(body)
            await _answer(send, status, answer)
            return
        try:
            session_id = uuid.UUID(match["session"])
            request = _join_decoder.decode(body)
        except (ValueError, msgspec.ValidationError, msgspec.DecodeError) as exc:
            await _answer(send, 400, {"error": "invalid_request", "message": str(exc)})
            return
        extra: list[tuple[bytes, bytes]] = []
        status, answer = await self._join(request, session_id)
        if status in (409, 503):
            extra.append((b"retry-after", self.retry_after))
        await _answer(send, status, answer, extra=extra)

    async def _open(self, body: bytes) -> tuple[int, dict[str, Any]]:
        assert self.opener is not None
        try:
            request = _session_decoder.decode(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return 400, {"error": "invalid_request", "message": str(exc)}
        try:
            session_id, state, created = await self.opener(request)
        except (ProviderError, ActorError, LoadShed) as exc:
            return 503, {"error": "unavailable", "message": str(exc)}
        except asyncpg.ForeignKeyViolationError:
            return 404, {"error": "tenant_not_found", "message": f"no tenant {request.tenant_id}"}
        answer = {"session_id": str(session_id), "state": state, "created": created}
        return (201 if created else 200), answer

    async def _join(self, request: _JoinBody, session_id: uuid.UUID) -> tuple[int, dict[str, Any]]:
        try:
            target = await self.lookup(request.tenant_id, session_id)
        except (ProviderError, ActorError, LoadShed) as exc:
            return 503, {"error": "unavailable", "message": str(exc)}
        if target is None:
            return 404, {
                "error": "session_not_found",
                "message": f"tenant {request.tenant_id} has no virtual session {session_id}",
            }
        if target.state != "placed" or target.room is None:
            answer: dict[str, Any] = {
                "error": "session_failed" if target.state == "failed" else "session_not_placed",
                "message": f"session {session_id} is {target.state}: no room to join yet",
                "state": target.state,
            }
            if target.fallback_thread_id is not None:  # the visit failed: its chat thread
                answer["fallback_thread_id"] = str(target.fallback_thread_id)
            return 409, answer
        status, answer, token = await _issue_answer(
            self.tokens, request.tenant_id, str(session_id), target.room, request.user
        )
        if token is None:
            return status, answer
        answer |= {"node": target.node, "appointment_id": target.appointment_id}
        if self.meet_url is not None:
            answer["join_url"] = f"{self.meet_url}/{answer['room']}?jwt={token}"
        return status, answer


async def _issue_answer(
    tokens: JoinTokens, tenant_id: uuid.UUID, session_id: str, room: str, user: JoinUser
) -> tuple[int, dict[str, Any], str | None]:
    """Issue one token: (201, its answer, the token) or (503, the refusal, None)."""
    try:
        issued = await tokens.issue(
            tenant_id=tenant_id, session_id=session_id, room=room, user=user
        )
    except ClockSkewed as exc:
        return 503, {"error": "clock_skewed", "message": str(exc)}, None
    except SigningUnavailable as exc:
        return 503, {"error": "signing_unavailable", "message": str(exc)}, None
    except (ProviderError, ActorError, LoadShed) as exc:
        return 503, {"error": "unavailable", "message": str(exc)}, None
    claims = issued.claims
    return 201, {
        "token": issued.token, "kid": issued.kid, "jti": claims.jti, "room": claims.room,
        "session_id": claims.session, "nbf": int(claims.nbf), "exp": int(claims.exp),
    }, issued.token  # fmt: skip


async def _post_body(
    scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable, max_bytes: int
) -> bytes | None:
    """The request's body, or None once the refusal is sent (405 not a POST, 413 over
    ``max_bytes``) or the client went away."""
    if scope["method"] != "POST":
        await _answer(
            send, 405, {"error": "method_not_allowed", "message": "use POST"},
            extra=[(b"allow", b"POST")],
        )  # fmt: skip
        return None
    try:
        return await read_body(receive, max_bytes=max_bytes)
    except BodyTooLarge as exc:
        # The rest is read away (up to the cap again) so that the 413 reaches a client
        # still sending, instead of a reset connection.
        await _discard(receive, max_bytes)
        await _answer(send, 413, {"error": "payload_too_large", "message": str(exc)})
        return None
    except ClientDisconnected:
        return None


async def _discard(receive: ASGIReceiveCallable, max_bytes: int) -> None:
    size = 0
    while size <= max_bytes:
        message = await receive()
        if message["type"] != "http.request":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _answer(
    send: ASGISendCallable,
    status: int,
    body: Mapping[str, Any],
    *,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send_json(send, status, msgspec.json.encode(body), extra_headers=extra or [])


@dataclass(frozen=True, slots=True)
class JoinTokenWiring:
    spec: ChildSpec
    ref: ActorRef[KeyRingMessage]
    tokens: JoinTokens
    mounts: Mapping[str, ASGIFramework]


def token_problems(config: TriageConfig, source: str) -> list[ConfigProblem]:
    """What the key ring would refuse: its mailbox profile missing, and a key directory
    that exists but holds a bad file (named). A missing directory is no problem: the ring
    starts empty (or ``create_missing`` makes it) and the poll finds a later mount."""
    problems: list[ConfigProblem] = []
    if MAILBOX not in config.mailboxes:
        problems.append(
            problem(
                source,
                f"$.mailboxes.{MAILBOX}",
                f"missing required profile [mailboxes.{MAILBOX}] (the key ring uses it)",
            )
        )
    if Path(config.tokens.key_dir).exists():
        try:
            load_ring(config.tokens.key_dir)
        except KeyFileError as exc:
            problems.append(problem(source, "$.tokens.key_dir", f"the key ring refuses it: {exc}"))
    return problems


def build_join_tokens(
    config: TriageConfig,
    runtime: Runtime,
    backbone: Backbone,
    *,
    detector: SpikeOverBaselineDetector | None,
    shutdown_s: float,
    skew: SkewSource | None = None,
) -> JoinTokenWiring:
    """The key ring's child and its API (nothing runs yet)."""
    registry = runtime.metrics.registry if runtime.metrics is not None else None
    spec, ref = key_ring_child(
        store=DbTokenStore(backbone.pool.asyncpg_pool), config=config.tokens, mailbox=config.mailboxes[MAILBOX],
        shutdown_s=shutdown_s, detector=detector, registry=registry, events=runtime.events,
        clock=runtime.clock, recorded_by=f"{socket.gethostname()}/key_ring",
        deadlines=runtime.deadlines, metrics=runtime.metrics, skew=skew,
        unknown_skew_s=config.clock.max_offset_s,
    )  # fmt: skip
    tokens = JoinTokens(ref, timeout_s=config.tokens.ask_timeout_s)
    api = JoinTokenApi(tokens, max_body_bytes=config.tokens.max_body_bytes)
    return JoinTokenWiring(spec=spec, ref=ref, tokens=tokens, mounts={PATH: api})
