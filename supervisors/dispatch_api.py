"""The HTTP dispatch API: ``POST /v1/dispatches``, an ASGI app served by hypercorn on Trio.

Mounted by the daemon's :class:`~supervisors.http.HealthApp`
(``mounts={"/v1/dispatches": api}``)::

    POST /v1/dispatches
    Idempotency-Key: <1..[dispatch] max_key_chars visible ASCII characters>
    Content-Type: application/json
    {"tenant_id": uuid, "channel": "sms"|"push"|"email", "template": str,
     "template_version": int|null, "recipient": str, "data": {str: str}}

The body and the answers are :mod:`actors.dispatch_commands`' (the NATS command
subject answers the same JSON). Checks run cheapest first, and every refusal is
``{"error": code, "message": ..., "field"?: ...}`` reaching no submitter:

=================================================  ====  ===========================
another path under the mount                       404   not_found
another method                                     405   method_not_allowed (Allow)
not ``application/json``                           415   unsupported_media_type
no / a bad ``Idempotency-Key``                     400   missing_idempotency_key /
                                                         invalid_idempotency_key
no ``Content-Length`` (``require_content_length``)  411   length_required
``Content-Length`` not a number                    400   invalid_content_length
``Content-Length`` or the body over the cap        413   payload_too_large (reading
                                                         stops at the cap)
bytes that are not JSON                            400   invalid_json
a field missing, unknown, of the wrong type, past  400   invalid_field (``field``)
its ``[dispatch]`` bound or of the wrong shape
=================================================  ====  ===========================

The key and the body are checked by the one
:class:`~actors.dispatch_request.RequestDecoder` (the NATS door's too): every field
is validated once, while it is decoded.

Then the submitter decides: 202 ``{"dispatch_id", "status"}``, 200 with the
original answer for a replay, or its typed error (409 idempotency_conflict, 422
template_not_found / category_disabled, 429/503 overloaded with
``Retry-After``...), from the one answer table, :mod:`actors.answers`.

``GET /v1/dispatches/{id}`` is not served (404): the dispatcher offers no
lookup yet.
"""

from __future__ import annotations

import logging

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from actors.answers import Answer, RequestRejected, answer_for
from actors.dispatch_commands import Submitter, submit_and_answer
from actors.dispatch_request import InvalidRequest, RequestDecoder
from providers.asgi import (
    BodyTooLarge,
    ClientDisconnected,
    declared_length,
    header_value,
    read_body,
    send_json,
    serve_scope,
)

__all__ = ["DispatchApi"]

log = logging.getLogger("triage.dispatch_api")

_JSON_TYPES = frozenset({"application/json"})


class DispatchApi:
    """The ASGI app of ``POST {path}``; holds no state of its own.

    ``max_body_bytes`` caps the body (never buffered beyond it);
    ``retry_after_s`` is the ``Retry-After`` for load shedding that names none;
    ``requests`` checks the key and decodes the body (the NATS door's decoder, its
    bounds from ``[dispatch]``);
    ``drain_max_bytes`` bounds how much of a refused oversize body is read (and
    discarded, in constant memory) so that its 413 reaches the client -- None: a
    body that declared its ``Content-Length`` is drained to that length (the client
    sends it anyway); a chunked body is never read past the cap;
    ``require_content_length`` refuses bodies without ``Content-Length`` (411)
    instead of reading them up to the cap.
    """

    def __init__(
        self,
        submitter: Submitter,
        *,
        max_body_bytes: int,
        retry_after_s: float,
        requests: RequestDecoder,
        drain_max_bytes: int | None = None,
        require_content_length: bool = False,
        path: str = "/v1/dispatches",
    ) -> None:
        if max_body_bytes < 1 or not retry_after_s > 0:
            raise ValueError("max_body_bytes and retry_after_s must be > 0")
        self.submitter = submitter
        self.max_body_bytes = max_body_bytes
        self.drain_max_bytes = drain_max_bytes
        self.retry_after_s = retry_after_s
        self.require_content_length = require_content_length
        self.requests = requests
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
            return  # nobody to answer; nothing was submitted
        await _send(send, answer)

    async def _answer(self, scope: HTTPScope, receive: ASGIReceiveCallable) -> Answer:
        path = scope["path"].rstrip("/")
        if path != self.path:
            return Answer.error(404, "not_found", f"nothing at {scope['path'][:200]!r}")
        if scope["method"] != "POST":
            return Answer.error(
                405, "method_not_allowed", f"{scope['method']} is not allowed; use POST"
            )
        try:
            return await self._post(scope, receive)
        except (RequestRejected, InvalidRequest) as exc:
            return answer_for(exc, retry_after_s=self.retry_after_s)

    async def _post(self, scope: HTTPScope, receive: ASGIReceiveCallable) -> Answer:
        media = (header_value(scope, b"content-type") or "").partition(";")[0].strip().lower()
        if media not in _JSON_TYPES:
            raise RequestRejected(
                "unsupported_media_type",
                f"Content-Type must be application/json, not {media[:100]!r}",
                http_status=415,
                field="Content-Type",
            )
        key = self.requests.check_key(header_value(scope, b"idempotency-key"))
        try:
            declared = declared_length(scope)
        except ValueError as exc:
            raise RequestRejected(
                "invalid_content_length", str(exc), field="Content-Length"
            ) from exc
        if declared is None and self.require_content_length:
            raise RequestRejected(
                "length_required", "a Content-Length header is required", http_status=411
            )
        if declared is not None and declared > self.max_body_bytes:
            if self.drain_max_bytes is None or declared <= self.drain_max_bytes:
                await _drain(receive, declared)
            raise RequestRejected(
                "payload_too_large",
                str(BodyTooLarge(self.max_body_bytes, declared=declared)),
                http_status=413,
            )
        try:
            data = await read_body(receive, max_bytes=self.max_body_bytes)
        except BodyTooLarge as exc:
            raise RequestRejected("payload_too_large", str(exc), http_status=413) from exc
        request = self.requests.decode_http(data, key)
        return await submit_and_answer(self.submitter, request, retry_after_s=self.retry_after_s)


async def _drain(receive: ASGIReceiveCallable, max_bytes: int) -> None:
    """Read and discard the rest of a refused body, at most ``max_bytes`` of it.

    Answering before the client has sent its body, then closing, makes the kernel
    reset the connection with the client's bytes unread -- and the client loses the
    answer with it ("server disconnected without sending a response"). Draining
    (constant memory) lets the 413 arrive; past ``max_bytes`` it is best effort.
    """
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


async def _send(send: ASGISendCallable, answer: Answer) -> None:
    extra: list[tuple[bytes, bytes]] = []
    if answer.status == 405:
        extra.append((b"allow", b"POST"))
    retry_after = answer.retry_after
    if retry_after is not None:
        extra.append((b"retry-after", retry_after.encode()))
    await send_json(send, answer.status, answer.body, extra_headers=extra)
