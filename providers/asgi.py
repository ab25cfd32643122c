"""The few ASGI pieces every HTTP app of the daemon needs, written once.

The webhooks (:mod:`actors.dlr_ingress`), the dispatch API
(:mod:`supervisors.dispatch_api`) and the probes (:mod:`supervisors.http`) are
plain ASGI apps served by hypercorn; they share:

- :func:`serve_scope`: the top of ``__call__`` — acknowledge ``lifespan``, hand
  ``http`` to the app, close anything else (websockets);
- :func:`read_body`: the body, never buffered beyond a cap (:class:`BodyTooLarge`,
  :class:`ClientDisconnected`); :func:`declared_length`, :func:`header_value`,
  :func:`request_headers` to read the request;
- :func:`respond` / :func:`send_json`: a complete response, never cached.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Final

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope

from engine.errors import TriageError

__all__ = [
    "JSON",
    "BodyTooLarge",
    "ClientDisconnected",
    "HttpHandler",
    "declared_length",
    "header_value",
    "lifespan",
    "read_body",
    "request_headers",
    "respond",
    "send_json",
    "serve_scope",
]

JSON: Final = b"application/json"

HttpHandler = Callable[[HTTPScope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
"""What :func:`serve_scope` hands an ``http`` scope to."""


class BodyTooLarge(TriageError):
    """The request body is longer than the cap; reading stopped at the cap."""

    def __init__(self, limit: int, *, declared: int | None = None) -> None:
        what = f"declared {declared} bytes" if declared is not None else "the body grew"
        super().__init__(f"{what}; at most {limit} bytes are accepted")
        self.limit = limit
        self.declared = declared


class ClientDisconnected(TriageError):
    """The client went away before the body was read."""


def header_value(scope: HTTPScope, name: bytes) -> str | None:
    """A request header (``name`` lowercase) as text; repeated headers joined with ``, ``."""
    values = [value for key, value in scope["headers"] if key.lower() == name]
    if not values:
        return None
    return b", ".join(values).decode("latin-1")


def request_headers(scope: HTTPScope) -> dict[str, str]:
    """Request headers by lowercase name; repeated headers joined with ``, ``."""
    merged: dict[str, str] = {}
    for key, value in scope["headers"]:
        name = key.decode("latin-1").lower()
        text = value.decode("latin-1")
        merged[name] = f"{merged[name]}, {text}" if name in merged else text
    return merged


def declared_length(scope: HTTPScope) -> int | None:
    """``Content-Length`` as a number; ``ValueError`` when it is not one."""
    value = header_value(scope, b"content-length")
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit():
        raise ValueError(f"Content-Length {value[:40]!r} is not a number")
    return int(text)


async def read_body(receive: ASGIReceiveCallable, *, max_bytes: int) -> bytes:
    """The whole body, never holding more than ``max_bytes`` of it.

    Raises :class:`BodyTooLarge` as soon as the bytes received pass ``max_bytes``
    (the rest is never read) and :class:`ClientDisconnected` if the client left.
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected while sending the body")
        if message["type"] != "http.request":
            continue
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise BodyTooLarge(max_bytes)
        if chunk:
            chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def respond(
    send: ASGISendCallable,
    status: int,
    body: bytes,
    content_type: bytes,
    *,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send a complete response with ``Content-Length`` and ``Cache-Control: no-store``."""
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *extra_headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(
    send: ASGISendCallable,
    status: int,
    body: bytes,
    *,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send a complete JSON response (``body`` already encoded)."""
    await respond(send, status, body, JSON, extra_headers=extra_headers)


async def lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Acknowledge the ASGI lifespan protocol (hypercorn needs it when served alone).

    Nothing to set up or tear down: the daemon owns every resource and starts it
    before the server.
    """
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def serve_scope(
    scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable, http: HttpHandler
) -> None:
    """The top of an app's ``__call__``: lifespan acknowledged, ``http`` handed to
    ``http``, anything else (a websocket) closed with 1003."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
    elif scope["type"] == "http":
        await http(scope, receive, send)
    else:
        await send({"type": "websocket.close", "code": 1003, "reason": "not supported"})
