"""The HTTP threads API (catalog row 12): threads and their participants, an ASGI app.

Mounted by the daemon's :class:`~supervisors.http.HealthApp` at ``/v1/threads``
when it has a backbone; the acting tenant is named in the body (or the query),
as ``POST /v1/dispatches`` names it::

    POST /v1/threads                          {"tenant_id": uuid, "topic": str|null}
        201 {"thread_id": uuid}
    POST /v1/threads/{id}/participants        {"tenant_id": uuid, "participant":
                                               {"tenant_id": uuid, "participant_id": str,
                                                "role": str}}
        201 {"added": true} | 200 {"added": false} (already a participant)
    GET  /v1/threads/{id}/participants?tenant_id=uuid
        200 {"participants": [{"participant_id", "role", "joined_at"}, ...]}

Refusals are ``{"error": code, "message": ...}``: 403 ``cross_tenant`` (the
participant is of another tenant; counted and alerted by the thread service),
404 ``thread_not_found``, 400 ``invalid_request`` (not JSON, or not the shape),
415 ``unsupported_media_type``, 413 ``payload_too_large`` (``[threads]
max_body_bytes``), 404 ``not_found`` and 405 ``method_not_allowed``. Messages
name tenants and threads by id, never a participant.
"""

from __future__ import annotations

import re
import urllib.parse
import uuid
from typing import Final, TypeVar

import msgspec
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from actors.answers import Answer
from actors.thread_service import CrossTenantParticipant, Participant, ThreadNotFound, ThreadService
from providers.asgi import (
    BodyTooLarge,
    ClientDisconnected,
    declared_length,
    header_value,
    read_body,
    send_json,
    serve_scope,
)

__all__ = ["ThreadsApi"]

_PARTICIPANTS: Final = re.compile(r"/(?P<thread>[0-9a-fA-F-]{36})/participants")


class _NewThread(msgspec.Struct, forbid_unknown_fields=True):
    tenant_id: uuid.UUID
    topic: str | None = None


class _NewParticipant(msgspec.Struct, forbid_unknown_fields=True):
    tenant_id: uuid.UUID
    participant: Participant


_S = TypeVar("_S", _NewThread, _NewParticipant)


class _Listed(msgspec.Struct):
    participant_id: str
    role: str
    joined_at: str


def _ok(status: int, body: object) -> Answer:
    return Answer(status, msgspec.json.encode(body))


class ThreadsApi:
    """The ASGI app of the threads API; holds no state of its own."""

    def __init__(
        self, threads: ThreadService, *, max_body_bytes: int, path: str = "/v1/threads"
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        self.threads = threads
        self.max_body_bytes = max_body_bytes
        self.path = path.rstrip("/")

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await serve_scope(scope, receive, send, self._http)

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        try:
            answer = await self._answer(scope, receive)
        except ClientDisconnected:
            return
        extra = [(b"allow", b"GET, POST")] if answer.status == 405 else []
        await send_json(send, answer.status, answer.body, extra_headers=extra)

    async def _answer(self, scope: HTTPScope, receive: ASGIReceiveCallable) -> Answer:
        path = scope["path"].rstrip("/")
        method = scope["method"]
        rest = path.removeprefix(self.path)
        match = _PARTICIPANTS.fullmatch(rest)
        if rest and match is None:
            return Answer.error(404, "not_found", f"nothing at {scope['path'][:200]!r}")
        allowed = ("GET", "POST") if match is not None else ("POST",)
        if method not in allowed:
            return Answer.error(
                405, "method_not_allowed", f"{method} is not allowed; use {' or '.join(allowed)}"
            )
        try:
            if match is None:
                created = await self._decode(scope, receive, _NewThread)
                thread = await self.threads.create_thread(created.tenant_id, created.topic)
                return _ok(201, {"thread_id": str(thread)})
            thread_id = uuid.UUID(match["thread"])
            if method == "GET":
                return await self._list(scope, thread_id)
            joining = await self._decode(scope, receive, _NewParticipant)
            added = await self.threads.add_participant(
                joining.tenant_id, thread_id, joining.participant
            )
            return _ok(201 if added else 200, {"added": added})
        except _Refused as refused:
            return refused.answer
        except CrossTenantParticipant as exc:
            return Answer.error(403, "cross_tenant", str(exc))
        except ThreadNotFound as exc:
            return Answer.error(404, "thread_not_found", str(exc))

    async def _list(self, scope: HTTPScope, thread_id: uuid.UUID) -> Answer:
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            tenant = uuid.UUID(query["tenant_id"][0])
        except (KeyError, ValueError):
            return Answer.error(
                400, "invalid_request", "tenant_id (a UUID) is required", field="tenant_id"
            )
        rows = await self.threads.participants(tenant, thread_id)
        listed = [_Listed(r.participant_id, r.role, r.joined_at.isoformat()) for r in rows]
        return _ok(200, {"participants": listed})

    async def _decode(self, scope: HTTPScope, receive: ASGIReceiveCallable, shape: type[_S]) -> _S:
        media = (header_value(scope, b"content-type") or "").partition(";")[0].strip().lower()
        if media != "application/json":
            raise _Refused(
                Answer.error(415, "unsupported_media_type", "Content-Type must be application/json")
            )
        try:
            declared = declared_length(scope)
        except ValueError as exc:
            raise _Refused(Answer.error(400, "invalid_request", str(exc))) from exc
        if declared is not None and declared > self.max_body_bytes:
            # Read (and drop) a declared body, bounded, so the client gets its 413.
            if declared <= _DRAIN_FACTOR * self.max_body_bytes:
                await _drain(receive, declared)
            too_large = BodyTooLarge(self.max_body_bytes, declared=declared)
            raise _Refused(Answer.error(413, "payload_too_large", str(too_large)))
        try:
            data = await read_body(receive, max_bytes=self.max_body_bytes)
        except BodyTooLarge as exc:  # a chunked body: never read past the cap
            raise _Refused(Answer.error(413, "payload_too_large", str(exc))) from exc
        try:
            return msgspec.json.decode(data, type=shape)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise _Refused(Answer.error(400, "invalid_request", str(exc))) from exc


#: A refused body that declared its length is read (and dropped) up to this many times
#: the cap, so that the client, still sending, gets its 413 instead of a reset connection.
_DRAIN_FACTOR: Final = 64


async def _drain(receive: ASGIReceiveCallable, max_bytes: int) -> None:
    size = 0
    while size <= max_bytes:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected while sending the body")
        if message["type"] != "http.request":
            continue
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class _Refused(Exception):
    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer
