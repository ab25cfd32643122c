"""A lean HTTP/1.1 transport for httpx: Trio streams, llhttp parsing, an O(1) pool.

:class:`Http1Transport` is an ``httpx.AsyncBaseTransport``: the adapters keep the
httpx API (``client.post(...)``, ``response.status_code / .json() / .headers``,
per-request timeouts, httpx's exceptions) and only the layer under it changes.
httpcore's pool scans every connection per request and h11 parses in pure Python;
here a request costs a dict lookup, a stack pop and one C parse (``httptools``,
i.e. llhttp). HTTP/2 stays with httpcore (APNs: :func:`providers.apns.apns_client`).

One pool per origin ``(scheme, host, port)``::

    idle      LIFO stack of kept-alive connections; the most recently used is
              taken first, the oldest leave from the bottom once expired
    opened    connections that exist or are being opened, <= connections_per_origin
    waiters   FIFO of requests waiting at the bound; a released connection (or
              the slot of a dropped one) goes to the first waiter directly

Invariant: ``waiters`` is non-empty only while ``idle`` is empty (a released
connection goes to a waiter before it goes idle). Idle expiry is checked whenever
the pool is used (taking, releasing): no background task, so a pool that sees no
traffic keeps its idle sockets until :meth:`Http1Transport.aclose`, as httpcore does.

A connection is dropped, never reused, on ``Connection: close`` (from either side)
or an HTTP/1.0 answer without keep-alive, on any error or cancellation during its
exchange, when its response was not read to the end, when it was idle longer than
``keepalive_expiry_s``, and when it turned readable while idle (the server closed
it, or sent bytes nobody asked for).

Failures raise the httpx classes httpcore raises, honouring the request's
``extensions["timeout"]`` (``connect`` / ``read`` / ``write`` / ``pool``, seconds or
``None``; ``read`` and ``write`` bound each socket operation)::

    httpx.TransportError
    ├─ PoolTimeout           no connection free within ``pool``
    ├─ ConnectTimeout        TCP connect + TLS handshake longer than ``connect``
    ├─ ConnectError          refused, unreachable, DNS, TLS failure
    ├─ WriteTimeout          one send longer than ``write``
    ├─ WriteError            reset or closed while sending
    ├─ ReadTimeout           one receive longer than ``read``
    ├─ ReadError             reset while receiving
    ├─ RemoteProtocolError   hung up before the answer's end, or not HTTP/1.x
    ├─ LocalProtocolError    a request line or header with CR/LF in it
    └─ UnsupportedProtocol   a scheme other than http/https

Request bodies: bytes (sent with the head in one write) or streamed (framed
chunked when the request says ``Transfer-Encoding: chunked``, as httpx does for
iterators). Response bodies: ``Content-Length``, chunked or close-delimited; an
answer complete on arrival (the usual small JSON) releases its connection at once
and is served from memory, a longer one is read as httpx iterates it.
"""

from __future__ import annotations

import collections
import math
import select
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

import httptools
import httpx
import trio

__all__ = ["Http1Transport", "PoolStatistics"]

_RECEIVE_BYTES: Final = 65_536
#: a body up to this size goes out in the head's write (one syscall, one copy)
_COALESCE_BYTES: Final = 65_536
_DEFAULT_PORTS: Final = {b"http": 80, b"https": 443}
_NO_TIMEOUTS: Final[dict[str, float | None]] = {}
_FRAMING_HEADERS: Final = frozenset({b"content-length", b"transfer-encoding"})


@dataclass(frozen=True, slots=True)
class PoolStatistics:
    """One origin's pool: connections open (busy or idle), idle, requests waiting."""

    opened: int
    idle: int
    waiting: int


class _TrailingBytes(Exception):
    """Raised inside the parser when bytes follow a complete response."""


class _Waiter:
    __slots__ = ("conn", "event", "granted")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.granted = False
        self.conn: _Connection | None = None  # granted without one: a slot to open one in


class _Pool:
    __slots__ = ("idle", "opened", "waiters")

    def __init__(self) -> None:
        self.idle: collections.deque[_Connection] = collections.deque()
        self.opened = 0
        self.waiters: collections.deque[_Waiter] = collections.deque()


class _Connection:
    """One socket and the parse state of the response being read on it.

    It is the ``httptools`` parser's protocol: the ``on_*`` methods are its callbacks.
    """

    __slots__ = (
        "body",
        "done",
        "head_done",
        "head_only",
        "headers",
        "idle_since",
        "informational",
        "keep_alive",
        "parser",
        "poll",
        "reason",
        "sock",
        "tls",
    )

    def __init__(
        self, sock: socket.socket, tls: trio.SSLStream[trio.SocketStream] | None = None
    ) -> None:
        # Plain: ``sock`` is a non-blocking stdlib socket driven with trio's
        # wait_readable/wait_writable (a send that fits the kernel buffer costs one
        # syscall, no trip through the scheduler). TLS: ``tls`` does the I/O and
        # ``sock`` is only polled and closed.
        self.sock = sock
        self.tls = tls
        self.poll = select.poll()
        self.poll.register(sock.fileno(), select.POLLIN)
        self.idle_since = 0.0
        self.begin(head_only=False)

    def dropped(self) -> bool:
        """Whether the server closed (or wrote to) this idle connection."""
        return bool(self.poll.poll(0))

    def close(self) -> None:
        # Synchronous on purpose: safe in cancelled and cleanup paths. For TLS no
        # close_notify is sent; HTTP/1.1 framing never relies on it.
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()

    # -- one exchange -------------------------------------------------------------------

    def begin(self, head_only: bool) -> None:
        """A fresh parse for the next response (``head_only``: the answer to HEAD)."""
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.reason = b""
        self.head_done = self.done = self.informational = self.keep_alive = False
        self.head_only = head_only

    def feed(self, data: bytes | bytearray, request: httpx.Request) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            raise httpx.RemoteProtocolError(
                "the server switched protocols, unsupported", request=request
            ) from exc
        except httptools.HttpParserError as exc:
            if self.done:  # bytes after a complete response: answer kept, socket not
                self.keep_alive = False
                return
            raise httpx.RemoteProtocolError(f"malformed response: {exc}", request=request) from exc

    def end_of_stream(self, request: httpx.Request) -> None:
        """The server closed its side: the end of a close-delimited body, else an error."""
        self.keep_alive = False
        if self.done:
            return
        if not self.head_done:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request
            )
        if any(name.lower() in _FRAMING_HEADERS for name, _ in self.headers):
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body",
                request=request,
            )
        self.done = True

    def take_body(self) -> bytes:
        body = self.body
        self.body = []
        return body[0] if len(body) == 1 else b"".join(body)

    # -- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            raise _TrailingBytes

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            self.informational = True  # 1xx: its headers are dropped, the answer follows
            return
        self.head_done = True
        if self.head_only:  # the answer to HEAD has no body whatever it announces
            self.done = True
            self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if not self.head_only:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
            self.headers = []
            self.reason = b""
            return
        if not self.head_only:
            self.done = True
            self.keep_alive = self.parser.should_keep_alive()


class _Streamed(httpx.AsyncByteStream):
    """A response body still arriving: read from its connection as httpx iterates.

    The connection goes back to the pool once the body's end was parsed, or is
    dropped by :meth:`aclose` (not read to the end) or by any failure.
    """

    def __init__(
        self,
        transport: Http1Transport,
        pool: _Pool,
        conn: _Connection,
        request: httpx.Request,
        read_s: float | None,
        close: bool,
    ) -> None:
        self._transport = transport
        self._pool = pool
        self._conn: _Connection | None = conn
        self._request = request
        self._read_s = read_s
        self._close = close

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        try:
            while not conn.body and not conn.done:
                data = await _receive(conn, self._read_s, self._request)
                if data:
                    conn.feed(data, self._request)
                else:
                    conn.end_of_stream(self._request)
        except BaseException:
            self._conn = None
            self._transport._drop(self._pool, conn)
            raise
        body = conn.take_body() if conn.body else b""
        if conn.done:
            self._conn = None
            self._transport._finish(self._pool, conn, self._close)
        if not body:
            raise StopAsyncIteration
        return body

    async def aclose(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            self._transport._drop(self._pool, conn)  # not read to the end: unusable


def _deadline(timeout_s: float | None) -> float:
    return math.inf if timeout_s is None else trio.current_time() + timeout_s


async def _receive(
    conn: _Connection, timeout_s: float | None, request: httpx.Request
) -> bytes | bytearray:
    """The next bytes from the server (``b""``: it closed); one checkpoint at least."""
    try:
        with trio.CancelScope(deadline=_deadline(timeout_s)):
            if conn.tls is not None:
                return await conn.tls.receive_some(_RECEIVE_BYTES)
            sock = conn.sock
            while True:
                await trio.lowlevel.wait_readable(sock)
                try:
                    return sock.recv(_RECEIVE_BYTES)
                except BlockingIOError:
                    continue
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise httpx.ReadError(_reason(exc), request=request) from exc
    raise httpx.ReadTimeout(f"no data within {timeout_s}s", request=request)


async def _send(
    conn: _Connection, data: bytes, timeout_s: float | None, request: httpx.Request
) -> None:
    """Send all of ``data``; on a plain socket, at once when the kernel takes it whole."""
    try:
        sock, tls = conn.sock, conn.tls
        if tls is None:
            try:
                sent = sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            with trio.CancelScope(deadline=_deadline(timeout_s)):
                rest = memoryview(data)[sent:]
                while rest:
                    await trio.lowlevel.wait_writable(sock)
                    try:
                        rest = rest[sock.send(rest) :]
                    except BlockingIOError:
                        continue
                return
        else:
            with trio.CancelScope(deadline=_deadline(timeout_s)):
                await tls.send_all(data)
                return
    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise httpx.WriteError(_reason(exc), request=request) from exc
    raise httpx.WriteTimeout(f"could not send within {timeout_s}s", request=request)


def _reason(exc: BaseException) -> str:
    """The OS's words for a socket error (trio's ``BrokenResourceError`` wraps them)."""
    cause = exc.__cause__
    return repr(cause) if cause is not None and not isinstance(exc, OSError) else repr(exc)


def _head(request: httpx.Request) -> tuple[bytes, bool, bool]:
    """The request line and headers; whether the body goes chunked; whether we close."""
    raw = request.headers.raw
    chunked = close = False
    lines = [request.method.encode("ascii"), b" ", request.url.raw_path, b" HTTP/1.1\r\n"]
    for name, value in raw:
        lines += (name, b": ", value, b"\r\n")
        lowered = name.lower()
        if lowered == b"transfer-encoding":
            chunked = value.lower().strip() == b"chunked"
        elif lowered == b"connection":
            close = value.lower().strip() == b"close"
    lines.append(b"\r\n")
    head = b"".join(lines)
    if head.count(b"\n") != len(raw) + 2 or head.count(b"\r") != len(raw) + 2:
        raise httpx.LocalProtocolError(
            "a request line or header value holds CR or LF", request=request
        )
    return head, chunked, close


class Http1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 for an ``httpx.AsyncClient(transport=...)``; see the module doc.

    ``connections_per_origin`` bounds the connections to one scheme+host+port (a
    request beyond it waits, FIFO, at most its ``pool`` timeout). An idle connection
    older than ``keepalive_expiry_s`` is closed instead of reused: keep it below the
    server's own idle timeout. ``ssl_context`` verifies https origins (default:
    ``httpx.create_ssl_context()``, httpx's own default, made on first use); the
    transport sets its ALPN to ``http/1.1``. No proxies: httpx's environment proxies
    apply to its default transport only. The defaults are httpx's; the daemon passes
    ``[providers.http]`` (:func:`supervisors.channels`).
    """

    def __init__(
        self,
        *,
        connections_per_origin: int = 100,
        keepalive_expiry_s: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if connections_per_origin < 1:
            raise ValueError(f"connections_per_origin must be >= 1, not {connections_per_origin}")
        if not keepalive_expiry_s >= 0:
            raise ValueError(f"keepalive_expiry_s must be >= 0, not {keepalive_expiry_s}")
        self._limit = connections_per_origin
        self._expiry_s = keepalive_expiry_s
        self._ssl_context = ssl_context
        if ssl_context is not None:
            ssl_context.set_alpn_protocols(["http/1.1"])
        self._pools: dict[tuple[bytes, bytes, int | None], _Pool] = {}
        self._closed = False

    def statistics(self) -> dict[str, PoolStatistics]:
        """Each origin's pool, keyed ``scheme://host:port``."""
        out = {}
        for (scheme, host, port), pool in self._pools.items():
            origin = f"{scheme.decode()}://{host.decode()}:{port or _DEFAULT_PORTS[scheme]}"
            out[origin] = PoolStatistics(pool.opened, len(pool.idle), len(pool.waiters))
        return out

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        scheme = url.raw_scheme
        if scheme not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(
                f"{url.scheme!r} URLs are not served by the HTTP/1.1 transport", request=request
            )
        if self._closed:
            raise RuntimeError("the HTTP/1.1 transport is closed")
        key = (scheme, url.raw_host, url.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool()
        timeouts = request.extensions.get("timeout") or _NO_TIMEOUTS
        conn = await self._acquire(pool, timeouts.get("pool"), request)
        try:
            if conn is None:
                conn = await self._connect(url, timeouts.get("connect"), request)
            close = await self._write(conn, request, timeouts.get("write"))
            read_s = timeouts.get("read")
            conn.begin(request.method == "HEAD")
            while not conn.head_done:
                data = await _receive(conn, read_s, request)
                if data:
                    conn.feed(data, request)
                else:
                    conn.end_of_stream(request)
        except BaseException:
            self._drop(pool, conn)
            raise
        stream: httpx.AsyncByteStream
        if conn.done:
            stream = httpx.ByteStream(conn.take_body())
            self._finish(pool, conn, close)
        else:
            stream = _Streamed(self, pool, conn, request, read_s, close)
        version = conn.parser.get_http_version()
        return httpx.Response(
            conn.parser.get_status_code(),
            headers=conn.headers,
            stream=stream,
            extensions={
                "http_version": b"HTTP/1.1" if version == "1.1" else f"HTTP/{version}".encode(),
                "reason_phrase": conn.reason,
            },
        )

    async def aclose(self) -> None:
        """Close the idle connections; busy ones close when their response ends."""
        self._closed = True
        for pool in self._pools.values():
            while pool.idle:
                pool.idle.pop().close()
                pool.opened -= 1
        await trio.lowlevel.checkpoint()

    # -- the pool ---------------------------------------------------------------------

    async def _acquire(
        self, pool: _Pool, timeout_s: float | None, request: httpx.Request
    ) -> _Connection | None:
        """A kept-alive connection, or ``None``: a slot (counted in ``opened``) to open one."""
        idle = pool.idle
        if idle:
            now = trio.current_time()
            while idle:
                conn = idle.pop()
                if now - conn.idle_since < self._expiry_s and not conn.dropped():
                    return conn
                conn.close()
                pool.opened -= 1
        if pool.opened < self._limit:
            pool.opened += 1
            return None
        waiter = _Waiter()
        pool.waiters.append(waiter)
        try:
            if timeout_s is None:
                await waiter.event.wait()
            else:
                with trio.move_on_after(timeout_s):
                    await waiter.event.wait()
        except BaseException:
            # Cancelled from outside: undo, and pass on what we may have been granted.
            if not waiter.granted:
                pool.waiters.remove(waiter)
            elif waiter.conn is not None:
                self._release(pool, waiter.conn)
            else:
                self._free_slot(pool)
            raise
        if not waiter.granted:
            pool.waiters.remove(waiter)
            raise httpx.PoolTimeout(
                f"no connection free within {timeout_s}s ({self._limit} per origin, all busy)",
                request=request,
            )
        return waiter.conn

    def _finish(self, pool: _Pool, conn: _Connection, close: bool) -> None:
        """A response read to its end: keep the connection if both sides allow it."""
        if conn.keep_alive and not close and not self._closed:
            self._release(pool, conn)
        else:
            self._drop(pool, conn)

    def _release(self, pool: _Pool, conn: _Connection) -> None:
        if pool.waiters:
            waiter = pool.waiters.popleft()
            waiter.conn = conn
            waiter.granted = True
            waiter.event.set()
            return
        idle = pool.idle
        now = trio.current_time()
        while idle and now - idle[0].idle_since >= self._expiry_s:
            idle.popleft().close()
            pool.opened -= 1
        conn.idle_since = now
        idle.append(conn)

    def _drop(self, pool: _Pool, conn: _Connection | None) -> None:
        """Close ``conn`` (``None``: a slot whose connection never opened) and free its slot."""
        if conn is not None:
            conn.close()
        self._free_slot(pool)

    def _free_slot(self, pool: _Pool) -> None:
        if pool.waiters:
            waiter = pool.waiters.popleft()
            waiter.granted = True  # conn stays None: the waiter opens a new connection
            waiter.event.set()
        else:
            pool.opened -= 1

    # -- the wire -----------------------------------------------------------------------

    async def _connect(
        self, url: httpx.URL, timeout_s: float | None, request: httpx.Request
    ) -> _Connection:
        host = url.raw_host.decode("ascii")
        port = url.port or _DEFAULT_PORTS[url.raw_scheme]
        plain: socket.socket | None = None
        try:
            with trio.CancelScope(deadline=_deadline(timeout_s)):
                tcp = await trio.open_tcp_stream(host, port)
                # The stdlib socket under it, which the connection drives and closes.
                plain = socket.socket(fileno=tcp.socket.detach())
                plain.setblocking(False)
                if url.raw_scheme == b"http":
                    return _Connection(plain)
                tls = trio.SSLStream(
                    trio.SocketStream(trio.socket.from_stdlib_socket(plain)),
                    self._tls_context(),
                    server_hostname=url.host,
                    https_compatible=True,
                )
                await tls.do_handshake()
                return _Connection(plain, tls)
            raise httpx.ConnectTimeout(f"no connection within {timeout_s}s", request=request)
        except (OSError, trio.BrokenResourceError) as exc:
            if plain is not None:
                plain.close()
            raise httpx.ConnectError(_reason(exc), request=request) from exc
        except BaseException:
            if plain is not None:
                plain.close()
            raise

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()  # what httpx would verify with
            self._ssl_context.set_alpn_protocols(["http/1.1"])
        return self._ssl_context

    async def _write(
        self, conn: _Connection, request: httpx.Request, timeout_s: float | None
    ) -> bool:
        """Send the request; whether it asked to close the connection afterwards."""
        head, chunked, close = _head(request)
        try:
            body: bytes | None = request.content
        except httpx.RequestNotRead:
            body = None
        if body is not None and not chunked:
            if len(body) <= _COALESCE_BYTES:
                await _send(conn, head + body, timeout_s, request)
            else:
                await _send(conn, head, timeout_s, request)
                await _send(conn, body, timeout_s, request)
            return close
        await _send(conn, head, timeout_s, request)
        if body is None:
            await self._write_stream(conn, request, chunked, timeout_s)
        elif body:
            await _send(conn, _frame(body, chunked), timeout_s, request)
        if chunked:
            await _send(conn, b"0\r\n\r\n", timeout_s, request)
        return close

    async def _write_stream(
        self, conn: _Connection, request: httpx.Request, chunked: bool, timeout_s: float | None
    ) -> None:
        stream = request.stream
        if not isinstance(stream, httpx.AsyncByteStream):
            raise RuntimeError("the HTTP/1.1 transport needs an async request stream")
        parts = stream.__aiter__()
        try:
            async for chunk in parts:
                if chunk:
                    await _send(conn, _frame(chunk, chunked), timeout_s, request)
        finally:
            # An abandoned async generator would warn when collected: close it here.
            aclose = getattr(parts, "aclose", None)
            if aclose is not None:
                await aclose()


def _frame(chunk: bytes, chunked: bool) -> bytes:
    return b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
