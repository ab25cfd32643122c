"""A lean HTTP/1.1 server for ASGI apps on Trio: llhttp (``httptools``) parsing trio streams.

The daemon's HTTP apps (probes, dispatch API, webhooks) need a small, fixed
part of ASGI; a general server (hypercorn) paid ~1.3 ms of CPU per trivial
request here, more than the whole dispatch path. :class:`Http1Server` does only
what the apps use, in one task per connection:

* **Requests in order.** One task reads, parses and runs the app for each
  request of its connection in turn; pipelined requests are parsed as they
  arrive and answered in the order they came. The app runs in the connection's
  own task (no task per request).
* **Backpressure.** The socket is read only when something waits for bytes:
  the next request's head, or the app's ``receive()``. At most one read
  (``read_chunk_bytes``) is held ahead of what the app asked for.
* **The scope** (ASGI 3, spec 2.3): ``type, asgi, http_version, method, scheme,
  path`` (percent-decoded, UTF-8), ``raw_path, query_string, root_path, headers``
  (lowercased names, in the order sent), ``client, server, state, extensions``.
* **receive()** yields ``http.request`` events streaming the body
  (``more_body``), then ``http.disconnect`` once the client has gone (or a body
  read timed out). ``Expect: 100-continue`` is answered on the first
  ``receive()`` that needs the body.
* **send()** takes ``http.response.start`` and ``http.response.body``. The
  app's ``Content-Length`` is used (and held to); without one, a body given in
  one message gets its length, a streamed one is chunked (HTTP/1.1) or
  close-delimited (HTTP/1.0). ``HEAD``, 1xx, 204 and 304 answers carry no body.
  After the client has gone, ``send()`` does nothing.
* **Keep-alive**: HTTP/1.1 unless either side says ``Connection: close``;
  HTTP/1.0 only when asked (``Connection: keep-alive``). A body the app left
  unread is read away (``discard_body_max_bytes``) to keep the connection;
  past that the connection closes.

Refusals (JSON ``{"error": code, "message": ...}``, then the connection closes),
each counted against the limits of :class:`config.schema.HttpConfig`::

    400 malformed_request        bytes llhttp refuses (never a traceback)
    408 request_timeout          the head did not arrive within header_timeout_s
    414 request_line_too_long    the target is over max_request_line_bytes
    431 headers_too_large        over max_header_bytes, or more than max_headers lines
    500 internal_error           the app raised (or returned) before answering; logged once

An app that raises after its answer started has its connection closed (logged
once). Idle keep-alive connections close after ``keepalive_timeout_s``; a body
read the app waits on past ``body_timeout_s`` is ``http.disconnect`` (then the
connection closes); a write the client does not take within ``write_timeout_s``
cancels the connection's task, the app's work on it included.

Cost: one cancel scope per connection bounds whichever step it is at (its
deadline moved, never a fresh scope per read and write: a scope cost ~15 µs
here, a deadline move ~5 µs); an answer is one write, straight to the socket
when it fits its buffer (see :meth:`_Connection.write`).

:meth:`Http1Server.serve` accepts at most ``max_connections`` at once (the
rest wait in the listen backlog) and, once its ``shutdown`` event is set, stops
accepting, closes idle keep-alive connections at once, lets requests in flight
finish (answered with ``Connection: close``) within the grace, then cancels what
is left. :meth:`Http1Server.lifespan` runs the app's ASGI lifespan startup and
shutdown around serving. :meth:`Http1Server.serve_connection` serves one stream
accepted elsewhere (a server with its own accept loop).
"""

from __future__ import annotations

import errno
import logging
import os
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from http import HTTPStatus
from typing import Any, Final, cast
from urllib.parse import unquote_to_bytes

import httptools
import msgspec
import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveEvent,
    ASGISendEvent,
    ConnectionState,
    HTTPScope,
    LifespanScope,
)

from config.schema import HttpConfig

__all__ = ["Http1Server"]

_STATUS_LINES: Final[dict[int, bytes]] = {
    int(status): b"HTTP/1.1 %d %s\r\n" % (int(status), status.phrase.encode("ascii"))
    for status in HTTPStatus
}
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"
_NO_BODY_STATUSES: Final = frozenset({204, 304})
#: accept() failures that mean "out of descriptors or memory": wait, then accept again.
_ACCEPT_CAPACITY_ERRORS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
_INFINITY: Final = float("inf")


class _Refusal(Exception):
    """A request answered by the server itself (never by the app), then the connection closed."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _AppProtocolError(Exception):
    """The app broke the ASGI message order (raised into the app from ``send``)."""


class _LifespanFailed(Exception):
    """The app answered ``lifespan.startup.failed``, or took too long to start."""


def _refusal_bytes(refusal: _Refusal) -> bytes:
    body = msgspec.json.encode({"error": refusal.code, "message": refusal.message})
    return b"".join(
        (
            _STATUS_LINES.get(refusal.status, b"HTTP/1.1 %d \r\n" % refusal.status),
            b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
            b"cache-control: no-store\r\nconnection: close\r\n\r\n",
            body,
        )
    )


def _split_target(url: bytes) -> tuple[bytes, bytes]:
    """``/a%20b?x=1`` -> ``(b"/a%20b", b"x=1")``; absolute-form and ``*`` understood."""
    if url[:1] != b"/":
        if url == b"*":
            return url, b""
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError as exc:
            raise _Refusal(400, "malformed_request", "the request target is not a URL") from exc
        return parsed.path or b"/", parsed.query or b""
    raw_path, _, query = url.partition(b"?")
    if b"#" in query:
        query = query.partition(b"#")[0]
    elif b"#" in raw_path:
        raw_path = raw_path.partition(b"#")[0]
    return raw_path, query


class _Exchange:
    """One request on a connection and the app's answer to it: ``receive`` and ``send``.

    The parser fills the request side (head, body chunks, ``complete``); the app
    drains the body through :meth:`receive` and answers through :meth:`send`.
    """

    __slots__ = (
        "body",
        "body_done",
        "chunked",
        "complete",
        "conn",
        "continued",
        "declared",
        "discard",
        "expect_continue",
        "finished",
        "head_parsed",
        "head_sent",
        "header_bytes",
        "headers",
        "http_version",
        "keep",
        "method",
        "no_body",
        "query",
        "raw_path",
        "received",
        "remaining",
        "response_headers",
        "started_at",
        "status",
        "url",
    )

    def __init__(self, conn: _Connection, started_at: float) -> None:
        self.conn = conn
        self.started_at = started_at
        # The request, as the parser fills it.
        self.url = b""
        self.raw_path = b"/"
        self.query = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.header_bytes = 0
        self.method = "GET"
        self.http_version = "1.1"
        self.keep = True
        self.expect_continue = False
        self.continued = False
        self.head_parsed = False
        self.body: list[bytes] = []
        self.declared = -1  # the request's Content-Length; -1: none (chunked, or no body)
        self.received = 0  # body bytes parsed so far
        self.complete = False
        self.body_done = False
        self.discard = False
        # The answer, as the app gives it.
        self.status = 0
        self.response_headers: Iterable[tuple[bytes, bytes]] = ()
        self.head_sent = False
        self.finished = False
        self.chunked = False
        self.no_body = False
        self.remaining = -1  # bytes still owed under the app's Content-Length; -1: none given

    def scope(self) -> HTTPScope:
        raw_path = self.raw_path
        decoded = unquote_to_bytes(raw_path) if b"%" in raw_path else raw_path
        conn = self.conn
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.http_version,
            "method": self.method,
            "scheme": "http",
            "path": decoded.decode("utf-8", "replace"),
            "raw_path": raw_path,
            "query_string": self.query,
            "root_path": "",
            "headers": self.headers,
            "client": conn.client,
            "server": conn.server_address,
            "state": ConnectionState(dict(conn.owner.state)),
            "extensions": {},
        }

    async def receive(self) -> ASGIReceiveEvent:
        conn = self.conn
        while True:
            if self.body:
                chunks, self.body = self.body, []
                data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self.body_done = self.complete
                return {"type": "http.request", "body": data, "more_body": not self.complete}
            if self.complete:
                if not self.body_done:
                    self.body_done = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                await conn.wait_disconnect()
                return {"type": "http.disconnect"}
            if conn.lost or conn.error is not None:
                return {"type": "http.disconnect"}
            if self.expect_continue and not self.continued:
                self.continued = True
                if not await conn.write(_CONTINUE):
                    return {"type": "http.disconnect"}
            received = await conn.read(trio.current_time() + conn.limits.body_timeout_s)
            if not received:  # the client left, or stalled past body_timeout_s: gone for us
                conn.lost = True
                return {"type": "http.disconnect"}
            conn.feed(received)

    async def send(self, message: ASGISendEvent) -> None:
        event = cast(dict[str, Any], message)
        kind = event["type"]
        if kind == "http.response.body":
            if self.status == 0 or self.finished:
                raise _AppProtocolError(
                    "http.response.body before http.response.start"
                    if self.status == 0
                    else "http.response.body after the last one (more_body was false)"
                )
            body: bytes = event.get("body", b"")
            more: bool = event.get("more_body", False)
            self.finished = not more
            if self.remaining >= 0 and not self.no_body:
                self.remaining -= len(body)
                if self.remaining < 0:
                    raise _AppProtocolError("the body is longer than its Content-Length")
            if self.conn.lost:
                return
            out = self._frame(body, more)
            if out:
                await self.conn.write(out)
        elif kind == "http.response.start":
            if self.status != 0:
                raise _AppProtocolError("http.response.start sent twice")
            status = event["status"]
            if not isinstance(status, int) or not 100 <= status <= 999:
                raise _AppProtocolError(f"status {status!r} is not an HTTP status code")
            self.status = status
            self.response_headers = event.get("headers", ())
        else:
            raise _AppProtocolError(f"an http app cannot send {kind!r}")

    def _frame(self, body: bytes, more: bool) -> bytes:
        """The bytes on the wire for one body message: the head first, the framing around."""
        if self.no_body and self.head_sent:
            return b""
        if not self.head_sent:
            head = self._head(len(body), more)
            if self.no_body:
                return head
            if self.chunked:
                return (
                    head
                    + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"")
                    + (b"" if more else _LAST_CHUNK)
                )
            return head + body
        if self.chunked:
            framed = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
            return framed if more else framed + _LAST_CHUNK
        return body

    def _can_discard(self) -> bool:
        """Whether the body left unread can be read away to keep the connection: its
        length known and the rest within ``discard_body_max_bytes``. A client waiting
        for ``100 Continue`` may or may not send its body now: never."""
        if self.declared < 0 or (self.expect_continue and not self.continued):
            return False
        left = self.declared - self.received
        return left <= self.conn.limits.discard_body_max_bytes

    def _head(self, first_length: int, more: bool) -> bytes:
        """The status line and headers; decides the framing and whether to keep the connection."""
        self.head_sent = True
        status = self.status
        conn = self.conn
        keep = (
            self.keep
            and not conn.owner.draining
            and not conn.no_more
            and (self.complete or self._can_discard())
        )
        length_given = False
        chunk_asked = False
        lines: list[bytes] = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        for name, value in self.response_headers:
            if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
                raise _AppProtocolError(f"header {name[:40]!r} holds a line break")
            lowered = name.lower()
            if lowered == b"content-length":
                if not value.strip().isdigit():
                    raise _AppProtocolError(f"Content-Length {value[:40]!r} is not a number")
                self.remaining = int(value) - first_length
                if self.remaining < 0 and self.method != "HEAD":
                    raise _AppProtocolError("the body is longer than its Content-Length")
                length_given = True
            elif lowered == b"transfer-encoding":
                chunk_asked = True
                continue  # the framing is the server's to write
            elif lowered == b"connection":
                if b"close" in value.lower():
                    keep = False
                continue
            lines += (name, b": ", value, b"\r\n")
        self.no_body = status < 200 or status in _NO_BODY_STATUSES or self.method == "HEAD"
        if self.no_body:
            self.remaining = -1
        elif length_given:
            pass
        elif not more and not chunk_asked:
            lines.append(b"content-length: %d\r\n" % first_length)
            self.remaining = 0
        elif self.http_version == "1.1":
            lines.append(b"transfer-encoding: chunked\r\n")
            self.chunked = True
        else:
            keep = False  # HTTP/1.0 without a length: the body ends when the connection does
        if not keep:
            lines.append(b"connection: close\r\n\r\n")
        elif self.http_version == "1.0":
            lines.append(b"connection: keep-alive\r\n\r\n")
        else:
            lines.append(b"\r\n")
        self.keep = keep
        return b"".join(lines)


class _Connection:
    """One client connection: the parser's callbacks, the reads, the requests in order."""

    def __init__(self, owner: Http1Server, stream: trio.abc.Stream) -> None:
        self.owner = owner
        self.limits = owner.limits
        self.stream = stream
        self.client: tuple[str, int] | None = None
        self.server_address: tuple[str, int | None] | None = None
        self.socket: trio.socket.SocketType | None = None
        if isinstance(stream, trio.SocketStream):
            self.socket = stream.socket
            try:
                peer = stream.socket.getpeername()
                local = stream.socket.getsockname()
            except OSError:  # already reset by the peer
                pass
            else:
                if isinstance(peer, tuple):
                    self.client = (str(peer[0]), int(peer[1]))
                if isinstance(local, tuple):
                    self.server_address = (str(local[0]), int(local[1]))
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: _Exchange | None = None  # the request whose bytes the parser is in
        self.ready: deque[_Exchange] = deque()  # heads parsed, not yet handed to the app
        self.error: _Refusal | None = None  # the parser stopped here: answered, then closed
        self.refusal: _Refusal | None = None  # raised by a callback, read back in feed()
        self.lost = False  # the client is gone (EOF, reset, a write or body read timed out)
        self.no_more = False  # nothing after the requests already parsed (an upgrade)
        self.deadline = trio.CancelScope()  # bounds the step the connection is at: see run()
        self.idle = False  # waiting between requests (the drain cancels the deadline scope)
        self.reading_head = False  # waiting for the rest of a head (its deadline: 408)
        self.refusal_due: _Refusal | None = None  # answered after the deadline scope, then closed
        self.head_fed = 0  # bytes fed while one head stays incomplete (after its first read)
        self.begun_in_chunk = False

    # -- the parser's callbacks (httptools calls them from feed_data) --------------------

    def on_message_begin(self) -> None:
        self.parsing = _Exchange(self, trio.current_time())
        self.begun_in_chunk = True

    def on_url(self, url: bytes) -> None:
        exchange = cast(_Exchange, self.parsing)
        exchange.url += url
        if len(exchange.url) > self.limits.max_request_line_bytes:
            raise self._refuse(
                414,
                "request_line_too_long",
                f"the request target is over {self.limits.max_request_line_bytes} bytes",
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = cast(_Exchange, self.parsing)
        exchange.header_bytes += len(name) + len(value) + 4
        lowered = name.lower()
        exchange.headers.append((lowered, value))
        if exchange.header_bytes > self.limits.max_header_bytes:
            raise self._refuse(
                431,
                "headers_too_large",
                f"the headers are over {self.limits.max_header_bytes} bytes",
            )
        if len(exchange.headers) > self.limits.max_headers:
            raise self._refuse(
                431, "headers_too_large", f"more than {self.limits.max_headers} header lines"
            )
        if lowered == b"expect" and value.lower() == b"100-continue":
            exchange.expect_continue = True
        elif lowered == b"content-length" and value.isdigit():
            exchange.declared = int(value)  # llhttp refuses it unless it is a number

    def on_headers_complete(self) -> None:
        exchange = cast(_Exchange, self.parsing)
        parser = self.parser
        try:
            exchange.raw_path, exchange.query = _split_target(exchange.url)
        except _Refusal as refusal:
            self.refusal = refusal
            raise
        exchange.method = parser.get_method().decode("ascii")
        exchange.http_version = parser.get_http_version()
        exchange.keep = parser.should_keep_alive()
        if exchange.http_version != "1.1":
            exchange.expect_continue = False
        exchange.head_parsed = True
        self.head_fed = 0
        self.ready.append(exchange)

    def on_body(self, body: bytes) -> None:
        exchange = cast(_Exchange, self.parsing)
        exchange.received += len(body)
        exchange.continued = True  # sending its body: the client waits for no "100 Continue"
        if not exchange.discard:
            exchange.body.append(body)

    def on_message_complete(self) -> None:
        cast(_Exchange, self.parsing).complete = True
        self.parsing = None

    def _refuse(self, status: int, code: str, message: str) -> _Refusal:
        self.refusal = _Refusal(status, code, message)
        return self.refusal

    # -- bytes in and out --------------------------------------------------------------

    def feed(self, data: bytes | bytearray) -> None:
        """Parse ``data``; a refusal is kept in :attr:`error` and parsing stops for good."""
        self.begun_in_chunk = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.no_more = True  # what follows is not HTTP/1.1: answer what was read, then close
        except httptools.HttpParserError as exc:
            self.error = self.refusal or _Refusal(
                400, "malformed_request", f"malformed request: {exc}"
            )
            return
        parsing = self.parsing
        if parsing is not None and not parsing.head_parsed and not self.begun_in_chunk:
            # A head still incomplete after a whole read: httptools holds its last line,
            # which on_header cannot count yet; this bounds it.
            self.head_fed += len(data)
            cap = self.limits.max_request_line_bytes + self.limits.max_header_bytes
            if self.head_fed > cap:
                self.error = _Refusal(
                    431, "headers_too_large", f"the request head is over {cap} bytes"
                )

    async def read(self, deadline: float) -> bytes | bytearray:
        """At most ``read_chunk_bytes`` from the client; ``b""`` at EOF, reset or ``deadline``."""
        with trio.CancelScope(deadline=deadline):
            try:
                return await self.stream.receive_some(self.limits.read_chunk_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
        return b""

    async def write(self, data: bytes) -> bool:
        """Send ``data``; ``False`` (and :attr:`lost`) if the client is gone.

        What fits the socket's send buffer (a small answer, nearly always) is
        written at once with ``os.write`` on the non-blocking socket: no checkpoint,
        no deadline to move (``send_all`` yields after every send and the two moves
        cost ~5 µs each: 20-35 µs a request measured). Only the rest goes through
        ``send_all``, bounded by ``write_timeout_s`` through the connection's
        deadline scope: a client that does not read has its connection cancelled,
        the app's work on it included. (Python ignores SIGPIPE: a closed peer is an
        ``OSError`` here.)
        """
        if self.lost:
            return False
        if self.socket is not None:
            fd = self.socket.fileno()  # asked each time: -1 once closed (a reset, the drain)
            if fd >= 0:
                try:
                    sent = os.write(fd, data)
                except BlockingIOError:
                    sent = 0
                except OSError:  # EPIPE, ECONNRESET: the client is gone
                    self.lost = True
                    return False
                if sent == len(data):
                    return True
                data = data[sent:]
        scope = self.deadline
        scope.deadline = trio.current_time() + self.limits.write_timeout_s
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.lost = True
            return False
        scope.deadline = _INFINITY
        return True

    async def write_last(self, data: bytes) -> None:
        """Send a refusal before closing, within ``write_timeout_s`` (outside the deadline scope)."""
        if self.lost:
            return
        with (
            trio.move_on_after(self.limits.write_timeout_s),
            suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await self.stream.send_all(data)

    async def wait_disconnect(self) -> None:
        """Return once the client is gone (the app waits for ``http.disconnect``)."""
        while not self.lost:
            if self.ready or self.parsing is not None or self.error is not None or self.no_more:
                await trio.sleep_forever()  # the client sent more: it is still there
            data = await self.read(_INFINITY)
            if not data:
                self.lost = True
                return
            self.feed(data)

    # -- the requests, in order ----------------------------------------------------------

    async def run(self) -> None:
        """Serve requests until the connection should close.

        One cancel scope bounds the connection at each step (cheaper here than a
        scope per read and per write): ``keepalive_timeout_s`` while idle (and the
        drain cancels it then), ``header_timeout_s`` from a head's first byte,
        ``write_timeout_s`` per write, nothing while the app works.
        """
        with self.deadline:
            while True:
                exchange = await self._next()
                if exchange is None or not await self._serve(exchange):
                    break
        if self.deadline.cancelled_caught and self.reading_head:
            timeout = f"the request head took over {self.limits.header_timeout_s:g} s"
            await self.write_last(_refusal_bytes(_Refusal(408, "request_timeout", timeout)))
        if self.refusal_due is not None:
            await self.write_last(_refusal_bytes(self.refusal_due))

    async def _next(self) -> _Exchange | None:
        """The next request whose head is parsed; ``None`` once the connection should close."""
        limits = self.limits
        while True:
            if self.ready:
                if self.deadline.deadline != _INFINITY:
                    self.deadline.deadline = _INFINITY  # the app's time is its own
                return self.ready.popleft()
            if self.error is not None:
                self.refusal_due = self.error
                return None
            if self.lost or self.no_more or self.owner.draining:
                return None
            parsing = self.parsing
            if parsing is None:  # idle between requests: the drain may close it at once
                self.deadline.deadline = trio.current_time() + limits.keepalive_timeout_s
                self.idle = True
            else:
                self.deadline.deadline = parsing.started_at + limits.header_timeout_s
                self.reading_head = True
            try:
                data = await self.stream.receive_some(limits.read_chunk_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self.idle = self.reading_head = False  # kept as they were when the deadline struck
            if not data:
                self.lost = True
                return None
            self.feed(data)

    async def _serve(self, exchange: _Exchange) -> bool:
        """Run the app on ``exchange``; whether the connection stays open for the next."""
        log = self.owner.log
        try:
            await self.owner.app(exchange.scope(), exchange.receive, exchange.send)
        except Exception:
            log.exception(
                "http: the app failed",
                extra={"method": exchange.method, "path": exchange.raw_path.decode("latin-1")},
            )
            if exchange.status == 0:
                await self.write(_refusal_bytes(_Refusal(500, "internal_error", "internal error")))
            return False
        if exchange.status == 0:
            if self.lost:
                return False
            if self.error is not None and not exchange.complete:
                await self.write(_refusal_bytes(self.error))  # the body was malformed
                return False
            log.error(
                "http: the app returned without answering",
                extra={"method": exchange.method, "path": exchange.raw_path.decode("latin-1")},
            )
            await self.write(_refusal_bytes(_Refusal(500, "internal_error", "no answer")))
            return False
        if not exchange.finished or exchange.remaining > 0:
            return False  # the answer stopped short: only closing tells the client
        if not exchange.keep or self.lost:
            return False
        if not exchange.complete:
            return await self._discard(exchange)
        return True

    async def _discard(self, exchange: _Exchange) -> bool:
        """Read away the body the app left unread so the connection can be kept (the
        answer's head said so: :meth:`_Exchange._can_discard`)."""
        exchange.discard = True
        exchange.body = []
        while not exchange.complete:
            if self.error is not None:
                return False
            data = await self.read(trio.current_time() + self.limits.body_timeout_s)
            if not data:
                self.lost = True
                return False
            self.feed(data)
        return True


class _Lifespan:
    """The app's side of the ASGI lifespan protocol, driven by :meth:`Http1Server.lifespan`."""

    def __init__(self, app: ASGIFramework, state: dict[str, Any], log: logging.Logger) -> None:
        self.app = app
        self.state = state
        self.log = log
        self.started = trio.Event()
        self.stopping = trio.Event()
        self.stopped = trio.Event()
        self.failure: str | None = None
        self._asked_startup = False

    async def run(self) -> None:
        scope: LifespanScope = {
            "type": "lifespan",
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "state": self.state,
        }
        try:
            await self.app(scope, self.receive, self.send)
        except Exception:
            if not self.started.is_set():
                self.log.warning("http: the app does not do lifespan; serving without it")
            else:
                self.log.exception("http: the app's lifespan failed")
        finally:
            self.started.set()
            self.stopped.set()

    async def receive(self) -> ASGIReceiveEvent:
        if not self._asked_startup:
            self._asked_startup = True
            return {"type": "lifespan.startup"}
        await self.stopping.wait()
        return {"type": "lifespan.shutdown"}

    async def send(self, message: ASGISendEvent) -> None:
        event = cast(dict[str, Any], message)
        kind = event["type"]
        if kind == "lifespan.startup.complete":
            self.started.set()
        elif kind == "lifespan.startup.failed":
            self.failure = str(event.get("message", "")) or "no reason given"
            self.started.set()
        elif kind == "lifespan.shutdown.complete":
            self.stopped.set()
        elif kind == "lifespan.shutdown.failed":
            self.log.error(
                "http: the app's lifespan shutdown failed",
                extra={"reason": str(event.get("message", ""))},
            )
            self.stopped.set()
        else:
            raise _AppProtocolError(f"a lifespan app cannot send {kind!r}")


class Http1Server:
    """Serves one ASGI app over HTTP/1.1, within the bounds of ``limits``.

    One instance per incarnation: :meth:`lifespan` around :meth:`serve` (or
    around calls of :meth:`serve_connection` from an accept loop of the caller's).
    """

    def __init__(self, app: ASGIFramework, limits: HttpConfig, *, log: logging.Logger) -> None:
        self.app = app
        self.limits = limits
        self.log = log
        self.state: dict[str, Any] = {}  # the lifespan state; each request gets a copy
        self.draining = False
        self._connections: set[_Connection] = set()
        self._slots = trio.Semaphore(limits.max_connections)
        self._all_closed = trio.Event()

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self._connections)

    @asynccontextmanager
    async def lifespan(self) -> AsyncIterator[None]:
        """Run the app's lifespan startup, the body, then its shutdown (each bounded)."""
        lifespan = _Lifespan(self.app, self.state, self.log)
        timeout_s = self.limits.lifespan_timeout_s
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lifespan.run)
            with trio.move_on_after(timeout_s) as waited:
                await lifespan.started.wait()
            if waited.cancelled_caught:
                nursery.cancel_scope.cancel()
                raise _LifespanFailed(f"the app's lifespan startup took over {timeout_s:g} s")
            if lifespan.failure is not None:
                nursery.cancel_scope.cancel()
                raise _LifespanFailed(f"the app's lifespan startup failed: {lifespan.failure}")
            try:
                yield
            finally:
                lifespan.stopping.set()
                with trio.move_on_after(timeout_s) as cleanup:
                    cleanup.shield = True
                    await lifespan.stopped.wait()
                nursery.cancel_scope.cancel()

    async def serve(
        self,
        listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
        *,
        shutdown: trio.Event,
        grace_s: float,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve until ``shutdown`` is set, then drain (see the module docstring).

        The listeners are closed on the way out; ``started()`` once they accept.
        """
        try:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    for listener in listeners:
                        accepting.start_soon(self._accept, listener, connections)
                    task_status.started()
                    await shutdown.wait()
                    accepting.cancel_scope.cancel()
                for listener in listeners:
                    await listener.aclose()  # new connections are refused from here on
                self._drain()
                with trio.move_on_after(grace_s):
                    await self._all_closed.wait()
                connections.cancel_scope.cancel()  # past the grace: whatever is left
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    def _drain(self) -> None:
        self.draining = True
        for conn in self._connections:
            if conn.idle:
                conn.deadline.cancel()
        if not self._connections:
            self._all_closed.set()

    async def _accept(
        self, listener: trio.abc.Listener[trio.abc.Stream], nursery: trio.Nursery
    ) -> None:
        while True:
            await self._slots.acquire()  # past max_connections, new ones wait in the backlog
            try:
                stream = await listener.accept()
            except OSError as exc:
                self._slots.release()
                if exc.errno not in _ACCEPT_CAPACITY_ERRORS:
                    raise
                self.log.warning(
                    "http: accept failed, retrying",
                    extra={"error": str(exc), "retry_s": self.limits.accept_retry_s},
                )
                await trio.sleep(self.limits.accept_retry_s)
                continue
            except BaseException:
                self._slots.release()
                raise
            nursery.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.abc.Stream) -> None:
        try:
            await self.serve_connection(stream)
        finally:
            self._slots.release()

    async def serve_connection(self, stream: trio.abc.Stream, *, initial: bytes = b"") -> None:
        """Serve the requests of one connection until it closes; the stream is closed after.

        ``initial``: bytes the caller already read from ``stream`` (to tell protocols
        apart), parsed before anything else.
        """
        conn = _Connection(self, stream)
        self._connections.add(conn)
        try:
            if initial:
                conn.feed(initial)
            await conn.run()
        except Exception:  # a fault of this server's: that connection closes, the rest serve on
            self.log.exception("http: a connection failed")
        finally:
            self._connections.discard(conn)
            if self.draining and not self._connections:
                self._all_closed.set()
            await trio.aclose_forcefully(stream)
