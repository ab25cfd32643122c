"""providers.asgi: the ASGI pieces the daemon's HTTP apps share, driven by hand."""

from __future__ import annotations

from typing import Any, cast

import pytest
from hypercorn.typing import ASGIReceiveEvent, ASGISendEvent, HTTPScope, Scope

from providers.asgi import (
    BodyTooLarge,
    ClientDisconnected,
    declared_length,
    header_value,
    read_body,
    request_headers,
    send_json,
    serve_scope,
)


def _scope(headers: list[tuple[bytes, bytes]]) -> HTTPScope:
    return cast("HTTPScope", {"type": "http", "headers": headers, "path": "/", "method": "POST"})


class Wire:
    def __init__(self, *incoming: dict[str, Any]) -> None:
        self.incoming = list(incoming)
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> ASGIReceiveEvent:
        return cast("ASGIReceiveEvent", self.incoming.pop(0))

    async def send(self, message: ASGISendEvent) -> None:
        self.sent.append(dict(message))


def test_headers_are_read_case_blind_and_repeats_joined() -> None:
    scope = _scope([(b"X-A", b"1"), (b"x-a", b"2"), (b"content-length", b" 12 ")])
    assert header_value(scope, b"x-a") == "1, 2"
    assert header_value(scope, b"missing") is None
    assert request_headers(scope) == {"x-a": "1, 2", "content-length": " 12 "}
    assert declared_length(scope) == 12
    with pytest.raises(ValueError, match="Content-Length '-1' is not a number"):
        declared_length(_scope([(b"content-length", b"-1")]))


async def test_read_body_joins_chunks_and_stops_at_the_cap() -> None:
    chunks = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    ]
    assert await read_body(Wire(*chunks).receive, max_bytes=4) == b"abcd"
    with pytest.raises(BodyTooLarge, match="at most 3 bytes"):
        await read_body(Wire(*chunks).receive, max_bytes=3)
    with pytest.raises(ClientDisconnected):
        await read_body(Wire({"type": "http.disconnect"}).receive, max_bytes=3)


async def test_serve_scope_acknowledges_lifespan_serves_http_and_closes_the_rest() -> None:
    served: list[str] = []

    async def http(scope: HTTPScope, receive: Any, send: Any) -> None:
        served.append(scope["path"])
        await send_json(send, 201, b"{}", extra_headers=[(b"x-b", b"1")])

    life = Wire({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"})
    await serve_scope(cast("Scope", {"type": "lifespan"}), life.receive, life.send, http)
    assert [m["type"] for m in life.sent] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    wire = Wire()
    await serve_scope(_scope([]), wire.receive, wire.send, http)
    start, body = wire.sent
    assert served == ["/"] and start["status"] == 201 and body["body"] == b"{}"
    assert start["headers"] == [
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
        (b"cache-control", b"no-store"),
        (b"x-b", b"1"),
    ]
    socket = Wire()
    await serve_scope(cast("Scope", {"type": "websocket"}), socket.receive, socket.send, http)
    assert socket.sent == [{"type": "websocket.close", "code": 1003, "reason": "not supported"}]
