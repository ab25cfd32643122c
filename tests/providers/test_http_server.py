"""The daemon's HTTP/1.1 server (providers.http_server): framing, limits, timeouts, shutdown.

Most tests drive :meth:`Http1Server.serve_connection` over in-memory streams on
the autojump clock (exact virtual times); a few go through real sockets. The
responses are parsed by httptools' *response* parser, the requests written by
hand as bytes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httptools
import httpx
import msgspec
import pytest
import trio
import trio.testing

from config.schema import HttpConfig
from providers.asgi import BodyTooLarge, ClientDisconnected, lifespan, read_body, respond
from providers.http_server import Http1Server
from supervisors.http import HttpServer

App = Callable[[Any, Any, Any], Awaitable[None]]
LOG = logging.getLogger("tests.http_server")


def limits(**overrides: Any) -> HttpConfig:
    return msgspec.structs.replace(HttpConfig(), **overrides)


@dataclass
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


@dataclass
class Client:
    """The client end of one connection: raw bytes out, parsed responses in."""

    stream: trio.abc.Stream
    responses: list[Response] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)
    closed: bool = False
    _headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    _body: list[bytes] = field(default_factory=list)
    _taken: int = 0

    def __post_init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        self.responses.append(Response(status, dict(self._headers), b"".join(self._body)))
        self._headers, self._body = [], []

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _read_once(self, *, parse: bool = True) -> None:
        try:
            data = await self.stream.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.closed = True
            return
        self.raw += data
        if parse:
            self.parser.feed_data(data)

    async def response(self) -> Response:
        """The next response (interim 1xx ones included)."""
        while len(self.responses) <= self._taken:
            if self.closed:
                raise AssertionError(f"closed after {self._taken} responses: {bytes(self.raw)!r}")
            await self._read_once()
        self._taken += 1
        return self.responses[self._taken - 1]

    async def until_closed(self, *, parse: bool = True) -> None:
        while not self.closed:
            await self._read_once(parse=parse)


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener whose connections are in-memory stream pairs (``connect`` hands one in)."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](0)

    async def accept(self) -> trio.abc.Stream:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError) as exc:
            raise trio.ClosedResourceError("closed") from exc

    async def aclose(self) -> None:
        self._receive.close()
        await trio.lowlevel.checkpoint()

    async def connect(self) -> Client:
        client, server = trio.testing.memory_stream_pair()
        await self._send.send(server)
        return Client(client)


async def start_serving(
    nursery: trio.Nursery, server: Http1Server, *, grace_s: float
) -> tuple[MemoryListener, trio.Event]:
    """``server.serve`` on a fresh in-memory listener; set the event to shut it down."""
    listener, shutdown = MemoryListener(), trio.Event()
    await nursery.start(
        functools.partial(server.serve, [listener], shutdown=shutdown, grace_s=grace_s)
    )
    return listener, shutdown


@asynccontextmanager
async def connected(
    app: App, config: HttpConfig | None = None, *, lockstep: bool = False
) -> AsyncIterator[tuple[Client, Http1Server]]:
    """One connection served by ``serve_connection``; the server task cancelled after."""
    server = Http1Server(app, config or limits(), log=LOG)
    pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
    client, end = pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_connection, end)
        yield Client(client), server
        nursery.cancel_scope.cancel()


def get(path: str = "/", *headers: str, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: test", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def post(path: str, body: bytes, *headers: str) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
    return (head + "".join(f"{h}\r\n" for h in headers) + "\r\n").encode() + body


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the path, then the body it read (at most 1 MB)."""
    body = await read_body(receive, max_bytes=1 << 20)
    await respond(send, 200, scope["path"].encode() + b"|" + body, b"text/plain")


class Recorder:
    """An app that records each scope and every receive() event, then answers 200 ``ok``."""

    def __init__(self) -> None:
        self.scopes: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        self.scopes.append(scope)
        while True:
            event = await receive()
            self.events.append(event)
            if event["type"] != "http.request" or not event.get("more_body"):
                break
        await respond(send, 200, b"ok", b"text/plain")


# -- the scope, keep-alive, pipelining --------------------------------------------------


async def test_the_scope_holds_what_the_apps_read() -> None:
    app = Recorder()
    async with connected(app) as (client, _):
        await client.send(get("/a%20b/%C3%A9?x=1&y=%2F", "X-Mixed-Case: One", "x-second: Two"))
        assert (await client.response()).status == 200
    scope = app.scopes[0]
    assert scope["type"] == "http"
    assert scope["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert (scope["http_version"], scope["method"], scope["scheme"]) == ("1.1", "GET", "http")
    assert scope["path"] == "/a b/é"
    assert scope["raw_path"] == b"/a%20b/%C3%A9"
    assert scope["query_string"] == b"x=1&y=%2F"
    assert scope["root_path"] == ""
    assert scope["headers"] == [
        (b"host", b"test"),
        (b"x-mixed-case", b"One"),
        (b"x-second", b"Two"),
    ]
    assert app.events == [{"type": "http.request", "body": b"", "more_body": False}]


async def test_keep_alive_reuses_one_connection_over_real_sockets() -> None:
    app = Recorder()
    server = HttpServer(app, host="127.0.0.1", port=0, graceful_timeout_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            answers = [await client.get(f"/{i}") for i in range(3)]
        server.shutdown()
    assert [a.status_code for a in answers] == [200, 200, 200]
    clients = {scope["client"] for scope in app.scopes}
    assert len(clients) == 1  # one connection: one client port
    assert app.scopes[0]["server"] == ("127.0.0.1", server.port)


async def test_pipelined_requests_are_answered_in_order(autojump_clock: trio.abc.Clock) -> None:
    order: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        order.append(scope["path"])
        if scope["path"] == "/slow":
            await trio.sleep(5)  # the later requests are parsed already, and wait
        await echo(scope, receive, send)

    async with connected(app) as (client, _):
        await client.send(get("/slow") + post("/b", b"bee") + get("/c"))
        answers = [await client.response() for _ in range(3)]
    assert order == ["/slow", "/b", "/c"]
    assert [a.body for a in answers] == [b"/slow|", b"/b|bee", b"/c|"]
    assert trio.current_time() == 5


async def test_a_chunked_request_body_is_streamed_to_the_app() -> None:
    app = Recorder()
    async with connected(app) as (client, _):
        await client.send(
            b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
        )
        await trio.testing.wait_all_tasks_blocked()
        await client.send(b"4\r\ndefg\r\n0\r\n\r\n")
        assert (await client.response()).status == 200
    assert app.events == [
        {"type": "http.request", "body": b"abc", "more_body": True},
        {"type": "http.request", "body": b"defg", "more_body": False},
    ]


async def test_the_body_is_read_only_as_the_app_asks(autojump_clock: trio.abc.Clock) -> None:
    """Backpressure: with a lockstep stream the client's write completes only as far as
    the server reads, and the server reads one read_chunk_bytes ahead of the app."""
    proceed = trio.Event()
    sizes: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            event = await receive()
            sizes.append(len(event["body"]))
            if len(sizes) == 1:
                await proceed.wait()
            if not event["more_body"]:
                break
        await respond(send, 200, str(sum(sizes)).encode(), b"text/plain")

    body = b"x" * 100_000
    sent = trio.Event()
    async with connected(app, limits(read_chunk_bytes=1000), lockstep=True) as (client, _):

        async def upload() -> None:
            await client.send(post("/up", body))
            sent.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            await trio.sleep(60)
            assert not sent.is_set()  # the app holds: the rest of the body stays with the client
            assert sizes == [sizes[0]] and 0 < sizes[0] <= 1000
            proceed.set()
            answer = await client.response()
        assert sent.is_set()
    assert answer.body == b"100000"
    assert max(sizes) <= 1000


async def test_an_oversize_body_is_refused_by_read_body_before_it_is_buffered(
    autojump_clock: trio.abc.Clock,
) -> None:
    read: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        async def counting() -> Any:
            event = await receive()
            read.append(len(event.get("body", b"")))
            return event

        try:
            await read_body(counting, max_bytes=4096)
        except BodyTooLarge:
            await respond(send, 413, b"too large", b"text/plain")

    async with connected(app, limits(read_chunk_bytes=1024), lockstep=True) as (client, _):
        head = b"POST /up HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"

        async def upload() -> None:
            try:
                await client.send(head + b"400\r\n" + b"y" * 1024 + b"\r\n")
                for _ in range(1000):  # a megabyte more, if the server would take it
                    await client.send(b"400\r\n" + b"y" * 1024 + b"\r\n")
            except trio.BrokenResourceError:
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upload)
            answer = await client.response()
            await client.until_closed()
            nursery.cancel_scope.cancel()
    assert answer.status == 413
    assert answer.headers[b"connection"] == b"close"  # the rest is over discard_body_max_bytes
    assert sum(read) <= 4096 + 1024  # the cap plus one read, never the megabyte


async def test_an_unread_small_body_is_read_away_and_the_connection_kept() -> None:
    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        await respond(send, 413 if scope["path"] == "/big" else 200, b"", b"text/plain")

    async with connected(refuse, limits(discard_body_max_bytes=10_000)) as (client, _):
        await client.send(post("/big", b"z" * 5000) + get("/next"))
        first, second = await client.response(), await client.response()
    assert (first.status, second.status) == (413, 200)
    assert b"connection" not in first.headers


# -- limits and malformed input ---------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (get("/", *(f"X-H{i}: v" for i in range(11))), 431, "headers_too_large"),
        (get("/", "X-Big: " + "v" * 600), 431, "headers_too_large"),
        (get("/" + "p" * 300), 414, "request_line_too_long"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage", 400, "malformed_request"),
        (
            b"GET / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "malformed_request",
        ),
        (b"GET /\x00 HTTP/1.1\r\n\r\n", 400, "malformed_request"),
    ],
)
async def test_a_refused_request_gets_a_clear_answer_and_the_connection_closes(
    request_bytes: bytes, status: int, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = Recorder()
    config = limits(max_headers=10, max_header_bytes=512, max_request_line_bytes=256)
    async with connected(app, config) as (client, _):
        await client.send(request_bytes)
        answer = await client.response()
        await client.until_closed()
    assert answer.status == status
    assert msgspec.json.decode(answer.body)["error"] == code
    assert answer.headers[b"connection"] == b"close"
    assert app.scopes == []
    assert not [r for r in caplog.records if r.exc_info]  # no traceback anywhere


async def test_a_head_line_growing_over_many_reads_is_refused() -> None:
    """httptools holds a header line until it ends: the bytes fed meanwhile are bounded."""
    config = limits(max_header_bytes=512, max_request_line_bytes=256)
    async with connected(Recorder(), config) as (client, _):
        await client.send(b"GET / HTTP/1.1\r\nX-Endless: ")

        async def drip() -> None:
            for _ in range(100):  # 10 kB in 100-byte reads, one line that never ends
                await trio.testing.wait_all_tasks_blocked()
                try:
                    await client.send(b"v" * 100)
                except trio.BrokenResourceError:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip)
            answer = await client.response()
            nursery.cancel_scope.cancel()
    assert (answer.status, msgspec.json.decode(answer.body)["error"]) == (431, "headers_too_large")
    assert len(client.raw) < 1000


async def test_a_good_request_before_garbage_is_answered_first() -> None:
    async with connected(echo) as (client, _):
        await client.send(get("/fine") + b"NOT HTTP AT ALL\r\n\r\n")
        fine, bad = await client.response(), await client.response()
        await client.until_closed()
    assert (fine.status, fine.body) == (200, b"/fine|")
    assert bad.status == 400


# -- timeouts (virtual time) -------------------------------------------------------------


async def test_a_slow_head_is_cut_off_at_header_timeout(autojump_clock: trio.abc.Clock) -> None:
    config = limits(header_timeout_s=10.0, keepalive_timeout_s=60.0)
    async with connected(Recorder(), config) as (client, _):
        await client.send(b"GET / HTTP/1.1\r\n")
        started = trio.current_time()

        async def drip() -> None:
            for _ in range(100):  # one header byte a second: never a whole head
                await trio.sleep(1)
                try:
                    await client.send(b"X")
                except trio.BrokenResourceError:
                    return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drip)
            answer = await client.response()
            assert trio.current_time() - started == 10.0
            await client.until_closed()
            nursery.cancel_scope.cancel()
    assert (answer.status, msgspec.json.decode(answer.body)["error"]) == (408, "request_timeout")


async def test_an_idle_keep_alive_connection_closes_after_its_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with connected(Recorder(), limits(keepalive_timeout_s=5.0)) as (client, _):
        await client.send(get("/"))
        await client.response()
        answered = trio.current_time()
        await client.until_closed()
        assert trio.current_time() - answered == 5.0


async def test_a_stalled_body_ends_in_http_disconnect_at_body_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    app = Recorder()
    async with connected(app, limits(body_timeout_s=3.0)) as (client, _):
        await client.send(post("/up", b"0123456789")[:-6])  # 4 of the 10 body bytes
        await client.until_closed()
        assert trio.current_time() == 3.0
    assert app.events == [
        {"type": "http.request", "body": b"0123", "more_body": True},
        {"type": "http.disconnect"},
    ]


async def test_a_client_leaving_mid_body_is_an_http_disconnect() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await read_body(receive, max_bytes=1000)
        except ClientDisconnected:
            seen.append("disconnected")
            return
        await respond(send, 200, b"", b"text/plain")

    async with connected(app) as (client, server):
        await client.send(post("/up", b"0123456789")[:-5])
        await client.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections == 0
    assert seen == ["disconnected"]


# -- HTTP/1.0, Expect, responses -----------------------------------------------------------


async def test_http_1_0_closes_unless_keep_alive_is_asked() -> None:
    async with connected(echo) as (client, _):
        await client.send(get("/once", version="1.0"))
        answer = await client.response()
        await client.until_closed()
    assert answer.headers[b"connection"] == b"close"
    async with connected(echo) as (client, _):
        await client.send(get("/1", "Connection: keep-alive", version="1.0"))
        first = await client.response()
        await client.send(get("/2", "Connection: keep-alive", version="1.0"))
        second = await client.response()
    assert first.headers[b"connection"] == b"keep-alive"
    assert (first.body, second.body) == (b"/1|", b"/2|")


async def streaming(scope: Any, receive: Any, send: Any) -> None:
    """A body in three messages and no Content-Length."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for part in (b"one ", b"two ", b""):
        await send({"type": "http.response.body", "body": part, "more_body": True})
    await send({"type": "http.response.body", "body": b"three", "more_body": False})


async def test_a_streamed_answer_is_chunked_on_http_1_1_and_close_delimited_on_1_0() -> None:
    async with connected(streaming) as (client, _):
        await client.send(get("/"))
        chunked = await client.response()
        await client.send(get("/"))
        assert (await client.response()).body == b"one two three"  # still open
    assert chunked.headers[b"transfer-encoding"] == b"chunked"
    assert chunked.body == b"one two three"
    async with connected(streaming) as (client, _):
        await client.send(get("/", "Connection: keep-alive", version="1.0"))
        await client.until_closed(parse=False)
    head, _, body = bytes(client.raw).partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head and b"content-length" not in head
    assert b"connection: close" in head
    assert body == b"one two three"


async def test_head_answers_carry_no_body() -> None:
    async with connected(echo) as (client, _):
        await client.send(b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\n" + get("/y"))
        await trio.testing.wait_all_tasks_blocked()
        await client._read_once(parse=False)
    head, _, rest = bytes(client.raw).partition(b"\r\n\r\n")
    assert b"content-length: 3" in head  # the length a GET would have had
    assert rest.startswith(b"HTTP/1.1 200 OK\r\n")  # the next answer, no body in between
    assert rest.endswith(b"/y|")


async def test_expect_100_continue_is_answered_when_the_app_first_reads(
    autojump_clock: trio.abc.Clock,
) -> None:
    reading = trio.Event()
    app = Recorder()

    async def gated(scope: Any, receive: Any, send: Any) -> None:
        await reading.wait()
        await app(scope, receive, send)

    async with connected(gated) as (client, _):
        await client.send(
            b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        with trio.move_on_after(10):
            await client.response()
        assert client.raw == b""  # nothing yet: the app has not asked for the body
        reading.set()
        interim = await client.response()
        await client.send(b"hello")
        final = await client.response()
    assert (interim.status, final.status) == (100, 200)
    assert app.events == [{"type": "http.request", "body": b"hello", "more_body": False}]


async def test_an_answer_without_reading_an_expected_body_closes_the_connection() -> None:
    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        await respond(send, 413, b"no", b"text/plain")

    async with connected(refuse) as (client, _):
        await client.send(
            b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = await client.response()
        await client.until_closed()
    assert answer.status == 413
    assert answer.headers[b"connection"] == b"close"
    assert not client.raw.startswith(b"HTTP/1.1 100")


async def test_an_app_exception_is_a_500_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    async with connected(broken) as (client, _):
        await client.send(get("/x"))
        answer = await client.response()
        await client.until_closed()
    assert answer.status == 500
    assert msgspec.json.decode(answer.body) == {
        "error": "internal_error",
        "message": "internal error",
    }
    assert b"boom" not in answer.body
    failed = [r for r in caplog.records if r.getMessage() == "http: the app failed"]
    assert len(failed) == 1 and failed[0].exc_info is not None


async def test_an_app_failing_mid_answer_has_its_connection_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def half(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("boom")

    async with connected(half) as (client, _):
        await client.send(get("/x") + get("/never"))
        await client.until_closed(parse=False)
    assert bytes(client.raw).count(b"HTTP/1.1") == 1  # no 500 after the start, no next answer
    assert not bytes(client.raw).endswith(b"0\r\n\r\n")  # the chunked body never ended
    assert len([r for r in caplog.records if r.getMessage() == "http: the app failed"]) == 1


async def test_an_app_answering_nothing_is_a_500(caplog: pytest.LogCaptureFixture) -> None:
    async def silent(scope: Any, receive: Any, send: Any) -> None:
        await receive()

    async with connected(silent) as (client, _):
        await client.send(get("/x"))
        assert (await client.response()).status == 500
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "http: the app returned without answering"
    ]


async def test_the_apps_content_length_is_held_to() -> None:
    async def short(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"10")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"12345", "more_body": False})

    async with connected(short) as (client, _):
        await client.send(get("/") + get("/"))
        await client.until_closed(parse=False)
    assert bytes(client.raw).endswith(b"\r\n\r\n12345")  # closed: the client sees it short


# -- lifespan, connections, shutdown -------------------------------------------------------


async def test_lifespan_startup_and_shutdown_wrap_the_serving() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                seen.append(message["type"])
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        else:
            seen.append("request")
            await respond(send, 200, b"", b"text/plain")

    server = Http1Server(app, limits(), log=LOG)
    async with server.lifespan():
        assert seen == ["lifespan.startup"]
        async with trio.open_nursery() as nursery:
            listener, shutdown = await start_serving(nursery, server, grace_s=1.0)
            client = await listener.connect()
            await client.send(get("/"))
            await client.response()
            shutdown.set()
    assert seen == ["lifespan.startup", "request", "lifespan.shutdown"]


async def test_a_failed_lifespan_startup_stops_the_start() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "no database"})

    server = Http1Server(app, limits(), log=LOG)
    with pytest.RaisesGroup(pytest.RaisesExc(Exception, match="startup failed: no database")):
        async with server.lifespan():
            raise AssertionError("not reached")


async def test_past_max_connections_the_next_waits_to_be_accepted(
    autojump_clock: trio.abc.Clock,
) -> None:
    server = Http1Server(echo, limits(max_connections=1, keepalive_timeout_s=30.0), log=LOG)
    async with trio.open_nursery() as nursery:
        listener, shutdown = await start_serving(nursery, server, grace_s=1.0)
        first = await listener.connect()
        accepted_at: list[float] = []

        async def second() -> None:
            client = await listener.connect()
            accepted_at.append(trio.current_time())
            await client.send(get("/2"))
            assert (await client.response()).body == b"/2|"

        nursery.start_soon(second)
        await first.send(get("/1"))
        await first.response()
        await trio.sleep(10)
        assert accepted_at == []  # the one slot is the first connection's, idle or not
        await first.stream.aclose()
        await trio.sleep(1)
        assert accepted_at == [10.0]
        shutdown.set()


async def test_shutdown_closes_idle_connections_at_once_and_lets_a_request_finish(
    autojump_clock: trio.abc.Clock,
) -> None:
    release = trio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/slow":
            await release.wait()
        await respond(send, 200, scope["path"].encode(), b"text/plain")

    server = Http1Server(app, limits(keepalive_timeout_s=60.0), log=LOG)
    async with trio.open_nursery() as nursery:
        listener, shutdown = await start_serving(nursery, server, grace_s=20.0)
        idle, busy = await listener.connect(), await listener.connect()
        await idle.send(get("/idle"))
        await idle.response()
        await busy.send(get("/slow"))
        await trio.testing.wait_all_tasks_blocked()
        shutdown.set()
        await idle.until_closed()
        assert trio.current_time() == 0.0  # the idle keep-alive connection: closed at once
        await trio.sleep(3)
        release.set()
        answer = await busy.response()
        await busy.until_closed()
    assert (answer.status, answer.body) == (200, b"/slow")
    assert answer.headers[b"connection"] == b"close"
    assert trio.current_time() == 3.0  # serve returned once the last request was answered


async def test_a_request_past_the_grace_is_cancelled(autojump_clock: trio.abc.Clock) -> None:
    cancelled: list[float] = []

    async def stuck(scope: Any, receive: Any, send: Any) -> None:
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            cancelled.append(trio.current_time())
            raise

    server = Http1Server(stuck, limits(), log=LOG)
    async with trio.open_nursery() as nursery:
        listener, shutdown = await start_serving(nursery, server, grace_s=7.0)
        client = await listener.connect()
        await client.send(get("/"))
        await trio.sleep(1)
        shutdown.set()
    assert cancelled == [8.0]
    assert server.connections == 0


async def test_an_app_waiting_after_the_body_hears_the_client_leave() -> None:
    events: list[dict[str, Any]] = []

    async def waiter(scope: Any, receive: Any, send: Any) -> None:
        events.append(await receive())
        events.append(await receive())  # nothing more to read: this waits for the client

    async with connected(waiter) as (client, server):
        await client.send(post("/up", b"abc"))
        await trio.testing.wait_all_tasks_blocked()
        assert len(events) == 1
        await client.stream.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections == 0
    assert events == [
        {"type": "http.request", "body": b"abc", "more_body": False},
        {"type": "http.disconnect"},
    ]


async def test_an_upgrade_request_is_answered_as_plain_http_then_closed() -> None:
    app = Recorder()
    async with connected(app) as (client, _):
        await client.send(
            get("/ws", "Connection: Upgrade", "Upgrade: websocket") + b"\x81\x05hello"
        )
        answer = await client.response()
        await client.until_closed()
    assert answer.status == 200 and answer.headers[b"connection"] == b"close"
    assert [scope["type"] for scope in app.scopes] == ["http"]


async def test_an_absolute_form_target_is_split_into_path_and_query() -> None:
    app = Recorder()
    async with connected(app) as (client, _):
        await client.send(get("http://example.org/a/b?c=d"))
        await client.response()
    assert (app.scopes[0]["path"], app.scopes[0]["query_string"]) == ("/a/b", b"c=d")


async def test_connection_close_is_honoured_from_either_side() -> None:
    async with connected(echo) as (client, _):
        await client.send(get("/a", "Connection: close") + get("/never"))
        answer = await client.response()
        await client.until_closed()
    assert answer.headers[b"connection"] == b"close"
    assert len(client.responses) == 1

    async def closing(scope: Any, receive: Any, send: Any) -> None:
        await respond(send, 200, b"bye", b"text/plain", extra_headers=[(b"Connection", b"close")])

    async with connected(closing) as (client, _):
        await client.send(get("/a") + get("/never"))
        answer = await client.response()
        await client.until_closed()
    assert answer.headers[b"connection"] == b"close"
    assert len(client.responses) == 1


async def test_an_answer_larger_than_the_socket_buffer_arrives_whole() -> None:
    """Over a real socket: what the first write cannot place goes through send_all."""
    big = bytes(range(256)) * 32768  # 8 MiB

    async def large(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await respond(send, 200, big, b"application/octet-stream")

    server = HttpServer(large, host="127.0.0.1", port=0, graceful_timeout_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            first = await client.get("/")
            second = await client.get("/")
        server.shutdown()
    assert first.content == big and second.content == big


async def test_a_client_that_does_not_read_is_cut_off_at_write_timeout(
    autojump_clock: trio.abc.Clock,
) -> None:
    cancelled: list[float] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await respond(send, 200, b"x" * 100_000, b"text/plain")
        except trio.Cancelled:
            cancelled.append(trio.current_time())
            raise

    async with connected(app, limits(write_timeout_s=4.0), lockstep=True) as (client, server):
        await client.send(get("/"))  # then never reads: the answer cannot be written
        await trio.sleep(10)
        assert server.connections == 0
    assert cancelled == [4.0]
