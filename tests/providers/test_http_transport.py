"""The HTTP/1.1 transport against a scripted loopback server: pool, framing, failures.

The server is raw Trio (requests parsed with httptools' request parser), so each test
writes exactly the bytes it wants the client to see and counts the TCP connections
it accepted. Time logic runs on the autojump clock; loopback I/O is ready before the
clock may jump, so the asserted times are exact.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import ipaddress
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import httpx
import pytest
import trio
import trio.testing
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from engine.errors import ProviderTimeout, ProviderUnavailable
from providers.channel import ChannelName, Message
from providers.emulators.base import serve_emulator
from providers.emulators.sms import GhasiEmulator
from providers.ghasi import GhasiAdapter
from providers.http_transport import Http1Transport, PoolStatistics

# -- the scripted server ----------------------------------------------------------------


@dataclass
class Seen:
    """One request as the server parsed it."""

    connection: int
    method: bytes
    path: bytes
    headers: dict[bytes, bytes]
    body: bytes


class _RequestParse:
    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.complete: list[tuple[bytes, dict[bytes, bytes], bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete.append((self.url, self.headers, self.body))
        self.url, self.headers, self.body = b"", {}, b""


#: writes its answer to ``seen`` on the stream; False: the server closes the connection
Answer = Callable[[Seen, trio.SocketStream], Awaitable[bool]]


def response(body: bytes = b"{}", status: bytes = b"200 OK", *headers: bytes) -> bytes:
    lines = [b"HTTP/1.1 " + status, b"content-length: %d" % len(body), *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def ok(seen: Seen, stream: trio.SocketStream) -> bool:
    await stream.send_all(response(b'{"path": "%s"}' % seen.path))
    return True


@dataclass
class Server:
    answer: Answer = ok
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    closed: list[int] = field(default_factory=list)  # connections the client closed
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def handle(self, stream: trio.SocketStream) -> None:
        number = self.connections
        self.connections += 1
        parse = _RequestParse()
        parser = httptools.HttpRequestParser(parse)
        try:
            while data := await stream.receive_some(65_536):
                parser.feed_data(data)
                while parse.complete:
                    url, headers, body = parse.complete.pop(0)
                    seen = Seen(number, parser.get_method(), url, headers, body)
                    self.seen.append(seen)
                    if not await self.answer(seen, stream):
                        return
            self.closed.append(number)
        except trio.BrokenResourceError:
            self.closed.append(number)
        finally:
            await stream.aclose()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv = Server()
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, srv.handle, 0, host="127.0.0.1")
        )
        srv.port = listeners[0].socket.getsockname()[1]
        yield srv
        nursery.cancel_scope.cancel()


def client(
    *, connections_per_origin: int = 100, keepalive_expiry_s: float = 5.0
) -> httpx.AsyncClient:
    transport = Http1Transport(
        connections_per_origin=connections_per_origin, keepalive_expiry_s=keepalive_expiry_s
    )
    return httpx.AsyncClient(transport=transport, timeout=10.0)


def stats(http: httpx.AsyncClient, server: Server) -> PoolStatistics:
    transport = http._transport  # the client's own transport
    assert isinstance(transport, Http1Transport)
    return transport.statistics()[server.url]


def reset(stream: trio.SocketStream) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed or hostile server does."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


# -- keep-alive and the pool ------------------------------------------------------------


async def test_sequential_requests_share_one_connection(server: Server) -> None:
    async with client() as http:
        for i in range(3):
            answer = await http.post(f"{server.url}/m{i}", json={"i": i})
            assert answer.status_code == 200
            assert answer.json() == {"path": f"/m{i}"}
            assert answer.reason_phrase == "OK"
            assert answer.http_version == "HTTP/1.1"
        assert stats(http, server) == PoolStatistics(opened=1, idle=1, waiting=0)
    assert server.connections == 1
    assert [s.connection for s in server.seen] == [0, 0, 0]
    assert [s.body for s in server.seen] == [b'{"i":0}', b'{"i":1}', b'{"i":2}']


async def test_pool_bound_fifo_waiters_and_pool_timeout(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    gates = {path: trio.Event() for path in (b"/a", b"/b", b"/c", b"/d")}

    async def gated(seen: Seen, stream: trio.SocketStream) -> bool:
        await gates[seen.path].wait()
        await stream.send_all(response(seen.path))
        return True

    server.answer = gated
    bodies: dict[str, bytes] = {}
    async with client(connections_per_origin=2) as http:

        async def post(path: str) -> None:
            bodies[path] = (await http.post(f"{server.url}{path}")).content

        async with trio.open_nursery() as nursery:
            for path in ("/a", "/b", "/c", "/d"):
                nursery.start_soon(post, path)
                await trio.testing.wait_all_tasks_blocked()  # queued in this order
            assert stats(http, server) == PoolStatistics(opened=2, idle=0, waiting=2)
            began = trio.current_time()
            with pytest.raises(httpx.PoolTimeout):
                await http.get(f"{server.url}/e", timeout=httpx.Timeout(10.0, pool=1.5))
            assert trio.current_time() - began == 1.5
            assert stats(http, server).waiting == 2  # the timed-out waiter left the queue
            gates[b"/b"].set()  # /b's connection goes to the first waiter: /c
            await trio.testing.wait_all_tasks_blocked()
            gates[b"/a"].set()  # and /a's to /d
            await trio.testing.wait_all_tasks_blocked()
            gates[b"/c"].set()
            gates[b"/d"].set()
        assert stats(http, server) == PoolStatistics(opened=2, idle=2, waiting=0)
    assert bodies == {"/a": b"/a", "/b": b"/b", "/c": b"/c", "/d": b"/d"}
    assert server.connections == 2
    on = {s.path: s.connection for s in server.seen}
    assert [s.path for s in server.seen] == [b"/a", b"/b", b"/c", b"/d"]
    assert on[b"/c"] == on[b"/b"]
    assert on[b"/d"] == on[b"/a"]


async def test_the_most_recently_used_connection_is_taken_first(server: Server) -> None:
    gates = {b"/a": trio.Event(), b"/b": trio.Event()}

    async def gated(seen: Seen, stream: trio.SocketStream) -> bool:
        if seen.path in gates:
            await gates[seen.path].wait()
        await stream.send_all(response())
        return True

    server.answer = gated
    async with client() as http:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(http.get, f"{server.url}/a")
            nursery.start_soon(http.get, f"{server.url}/b")
            await trio.testing.wait_all_tasks_blocked()
            gates[b"/b"].set()
            await trio.testing.wait_all_tasks_blocked()
            gates[b"/a"].set()  # released last: on top of the idle stack
        await http.get(f"{server.url}/next")
    on = {s.path: s.connection for s in server.seen}
    assert on[b"/next"] == on[b"/a"] != on[b"/b"]


async def test_a_cancelled_waiter_leaves_the_queue_and_passes_on_nothing(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    gate = trio.Event()

    async def gated(seen: Seen, stream: trio.SocketStream) -> bool:
        if seen.path == b"/slow":
            await gate.wait()
        await stream.send_all(response())
        return True

    server.answer = gated
    async with client(connections_per_origin=1) as http, trio.open_nursery() as nursery:
        nursery.start_soon(http.get, f"{server.url}/slow")
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(1.0):
            await http.get(f"{server.url}/never")
        assert stats(http, server) == PoolStatistics(opened=1, idle=0, waiting=0)
        gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert stats(http, server) == PoolStatistics(opened=1, idle=1, waiting=0)
        assert (await http.get(f"{server.url}/next")).status_code == 200
    assert [s.path for s in server.seen] == [b"/slow", b"/next"]
    assert server.connections == 1


async def test_idle_connections_expire(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    async with client(keepalive_expiry_s=5.0) as http:
        await http.get(f"{server.url}/1")
        await trio.sleep(4.99)
        await http.get(f"{server.url}/2")  # idle 4.99 s: reused
        assert server.connections == 1
        await trio.sleep(5.0)
        await http.get(f"{server.url}/3")  # idle 5 s: expired, closed, a new one
        await trio.testing.wait_all_tasks_blocked()
        assert stats(http, server) == PoolStatistics(opened=1, idle=1, waiting=0)
    assert [s.connection for s in server.seen] == [0, 0, 1]
    assert 0 in server.closed


async def test_an_idle_connection_the_server_closed_is_not_reused(server: Server) -> None:
    async def once(seen: Seen, stream: trio.SocketStream) -> bool:
        await stream.send_all(response())  # keep-alive promised, then closed anyway
        return False

    server.answer = once
    async with client() as http:
        await http.get(f"{server.url}/1")
        await trio.testing.wait_all_tasks_blocked()
        assert (await http.get(f"{server.url}/2")).status_code == 200
    assert [s.connection for s in server.seen] == [0, 1]


@pytest.mark.parametrize("side", ["server", "client"])
async def test_connection_close_is_honoured(server: Server, side: str) -> None:
    async def closing(seen: Seen, stream: trio.SocketStream) -> bool:
        extra = (b"connection: close",) if side == "server" else ()
        await stream.send_all(response(b"bye", b"200 OK", *extra))
        return True  # the server would keep it: the client must not

    server.answer = closing
    headers = {"connection": "close"} if side == "client" else {}
    async with client() as http:
        for _ in range(2):
            assert (await http.get(f"{server.url}/", headers=headers)).content == b"bye"
        assert stats(http, server).idle == 0
    assert [s.connection for s in server.seen] == [0, 1]


# -- response framing -------------------------------------------------------------------


async def test_chunked_response_in_pieces_keeps_the_connection(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    async def chunked(seen: Seen, stream: trio.SocketStream) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel")
        await trio.sleep(0.1)
        await stream.send_all(b"lo\r\n6\r\n world\r\n")
        await trio.sleep(0.1)
        await stream.send_all(b"0\r\n\r\n")
        return True

    server.answer = chunked
    async with client() as http:
        assert (await http.get(f"{server.url}/1")).content == b"hello world"
        async with http.stream("GET", f"{server.url}/2") as answer:
            assert [part async for part in answer.aiter_raw()] == [b"hel", b"lo world"]
        assert stats(http, server).idle == 1
    assert server.connections == 1


async def test_close_delimited_response(server: Server) -> None:
    async def until_close(seen: Seen, stream: trio.SocketStream) -> bool:
        await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nfirst ")
        await stream.send_all(b"and last")
        return False

    server.answer = until_close
    async with client() as http:
        assert (await http.get(f"{server.url}/1")).text == "first and last"
        assert stats(http, server) == PoolStatistics(opened=0, idle=0, waiting=0)
        assert (await http.get(f"{server.url}/2")).text == "first and last"
    assert server.connections == 2


async def test_head_informational_and_no_content_answers(server: Server) -> None:
    async def varied(seen: Seen, stream: trio.SocketStream) -> bool:
        if seen.method == b"HEAD":  # announces a body it does not send
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        elif seen.path == b"/continue":
            await stream.send_all(
                b"HTTP/1.1 100 Continue\r\nx-early: 1\r\n\r\n" + response(b"done")
            )
        else:
            await stream.send_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        return True

    server.answer = varied
    async with client() as http:
        head = await http.head(f"{server.url}/h")
        assert (head.status_code, head.content, head.headers["content-length"]) == (
            200,
            b"",
            "1000",
        )
        later = await http.get(f"{server.url}/continue")
        assert (later.status_code, later.content) == (200, b"done")
        assert "x-early" not in later.headers
        empty = await http.delete(f"{server.url}/x")
        assert (empty.status_code, empty.content) == (204, b"")
    assert server.connections == 1


async def test_a_response_not_read_to_the_end_does_not_poison_the_next(server: Server) -> None:
    async def big(seen: Seen, stream: trio.SocketStream) -> bool:
        if seen.path == b"/big":
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
            await stream.send_all(b"x" * 1000)  # and the rest never: the client leaves
            return True
        await stream.send_all(response(b"small"))
        return True

    server.answer = big
    async with client() as http:
        for _ in range(2):
            async with http.stream("GET", f"{server.url}/big") as answer:
                assert answer.headers["content-length"] == "1000000"  # the body: not read
            assert stats(http, server) == PoolStatistics(opened=0, idle=0, waiting=0)
        assert (await http.get(f"{server.url}/small")).content == b"small"
    assert [s.connection for s in server.seen] == [0, 1, 2]


# -- failures ---------------------------------------------------------------------------


async def test_reset_mid_response_is_a_read_error_and_drops_the_connection(
    server: Server,
) -> None:
    async def rst(seen: Seen, stream: trio.SocketStream) -> bool:
        if seen.path == b"/rst":
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
            await trio.sleep(0.05)
            reset(stream)
            return False
        await stream.send_all(response())
        return True

    server.answer = rst
    async with client() as http:
        await http.get(f"{server.url}/warm")
        with pytest.raises((httpx.ReadError, httpx.RemoteProtocolError)):
            await http.get(f"{server.url}/rst")
        assert stats(http, server) == PoolStatistics(opened=0, idle=0, waiting=0)
        assert (await http.get(f"{server.url}/after")).status_code == 200
    assert [s.connection for s in server.seen] == [0, 0, 1]


async def test_hang_up_before_or_during_the_answer_is_a_protocol_error(server: Server) -> None:
    async def hang_up(seen: Seen, stream: trio.SocketStream) -> bool:
        if seen.path == b"/short":
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        return False

    server.answer = hang_up
    async with client() as http:
        with pytest.raises(httpx.RemoteProtocolError, match="without sending a response"):
            await http.get(f"{server.url}/nothing")
        with pytest.raises(httpx.RemoteProtocolError, match="complete message body"):
            await http.get(f"{server.url}/short")
        assert stats(http, server).opened == 0


async def test_garbage_is_a_protocol_error(server: Server) -> None:
    async def garbage(seen: Seen, stream: trio.SocketStream) -> bool:
        await stream.send_all(b"SMTP READY\r\n\r\n")
        return True

    server.answer = garbage
    async with client() as http:
        with pytest.raises(httpx.RemoteProtocolError, match="malformed"):
            await http.get(f"{server.url}/")
        assert stats(http, server).opened == 0


async def test_refused_is_a_connect_error_and_frees_the_slot() -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    async with client(connections_per_origin=1) as http:
        for _ in range(2):  # the failed connect gave its slot back
            with pytest.raises(httpx.ConnectError):
                await http.get(f"http://127.0.0.1:{port}/")
        transport = http._transport
        assert isinstance(transport, Http1Transport)
        assert transport.statistics()[f"http://127.0.0.1:{port}"].opened == 0


async def test_connect_timeout(autojump_clock: trio.testing.MockClock) -> None:
    # A listener whose backlog is full and never accepts: the SYN goes unanswered.
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        url = f"http://127.0.0.1:{full.getsockname()[1]}/"
        fillers = []
        async with client() as http:
            try:
                for _ in range(8):
                    filler = socket.socket()
                    filler.setblocking(False)
                    fillers.append(filler)
                    with contextlib.suppress(BlockingIOError):
                        filler.connect(full.getsockname())
                began = trio.current_time()
                with pytest.raises(httpx.ConnectTimeout):
                    await http.get(url, timeout=httpx.Timeout(10.0, connect=2.0))
                assert trio.current_time() - began == 2.0
            finally:
                for filler in fillers:
                    filler.close()


async def test_silence_is_a_read_timeout_at_the_read_deadline(
    server: Server, autojump_clock: trio.testing.MockClock
) -> None:
    async def silent(seen: Seen, stream: trio.SocketStream) -> bool:
        await trio.sleep_forever()
        return False

    server.answer = silent
    async with client() as http:
        began = trio.current_time()
        with pytest.raises(httpx.ReadTimeout):
            await http.post(f"{server.url}/", content=b"x", timeout=httpx.Timeout(10.0, read=2.5))
        assert trio.current_time() - began == 2.5
        assert stats(http, server).opened == 0


async def test_a_server_that_does_not_read_is_a_write_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def never_reads(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, never_reads, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        async with client() as http:
            began = trio.current_time()
            with pytest.raises(httpx.WriteTimeout):
                await http.post(
                    f"http://127.0.0.1:{port}/",
                    content=b"x" * 64_000_000,
                    timeout=httpx.Timeout(10.0, write=3.0),
                )
            assert trio.current_time() - began == 3.0
        nursery.cancel_scope.cancel()


async def test_cr_lf_in_a_header_is_refused_before_sending(server: Server) -> None:
    async with client() as http:
        request = http.build_request("GET", f"{server.url}/")
        request.headers["x-evil"] = "a\r\nx-injected: 1"
        with pytest.raises(httpx.LocalProtocolError):
            await http.send(request)
    assert server.seen == []


async def test_other_schemes_are_unsupported() -> None:
    transport = Http1Transport()
    with pytest.raises(httpx.UnsupportedProtocol):
        await transport.handle_async_request(httpx.Request("GET", "ftp://example.org/"))


def test_limits_are_checked() -> None:
    with pytest.raises(ValueError, match="connections_per_origin"):
        Http1Transport(connections_per_origin=0)
    with pytest.raises(ValueError, match="keepalive_expiry_s"):
        Http1Transport(keepalive_expiry_s=-1.0)


# -- request bodies ---------------------------------------------------------------------


async def test_streamed_request_goes_chunked(server: Server) -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        yield b"def"

    async with client() as http:
        await http.post(f"{server.url}/s", content=parts())
        big = bytes(range(256)) * 1000  # past the one-write size
        await http.put(f"{server.url}/b", content=big)
    streamed, sized = server.seen
    assert streamed.headers[b"transfer-encoding"] == b"chunked"
    assert streamed.body == b"abcdef"
    assert sized.headers[b"content-length"] == b"256000"
    assert sized.body == big
    assert server.connections == 1


# -- TLS --------------------------------------------------------------------------------


def _certificate() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem_key = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


async def test_https_with_the_given_context_and_alpn(tmp_path: Path) -> None:
    cert, key = _certificate()
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert)
    key_file.write_bytes(key)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert_file, key_file)
    server_context.set_alpn_protocols(["h2", "http/1.1"])
    protocols: list[str | None] = []
    inner = Server()

    async def tls_handle(stream: trio.SocketStream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        await tls.do_handshake()
        protocols.append(tls.selected_alpn_protocol())
        data = b""
        while b"\r\n\r\n" not in data:
            data += await tls.receive_some(65_536)
        await tls.send_all(response(b"secure"))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, tls_handle, 0, host="127.0.0.1")
        )
        inner.port = listeners[0].socket.getsockname()[1]
        trusted = ssl.create_default_context(cadata=cert.decode())
        transport = Http1Transport(ssl_context=trusted)
        async with httpx.AsyncClient(transport=transport, timeout=5.0) as http:
            answer = await http.get(f"https://127.0.0.1:{inner.port}/")
            assert answer.content == b"secure"
        async with httpx.AsyncClient(transport=Http1Transport(), timeout=5.0) as http:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await http.get(f"https://127.0.0.1:{inner.port}/")
        nursery.cancel_scope.cancel()
    assert protocols[0] == "http/1.1"


# -- through an adapter and its emulator's faults ---------------------------------------


async def test_ghasi_faults_map_onto_the_error_tree_through_this_transport() -> None:
    emulator = GhasiEmulator(api_key="k", auto_receipts=False)
    async with serve_emulator(emulator) as server:
        adapter = GhasiAdapter(base_url=server.url, api_key="k", sender="C", timeout_s=0.5)

        def message(n: int) -> Message:
            return Message(
                client_ref=f"d{n}",
                tenant_id="t1",
                idempotency_key=f"key-{n}",
                channel=ChannelName.SMS,
                recipient="+15551230001",
                body=f"appointment {n}",
            )

        assert (await adapter.send(message(1))).provider_ref == "GH00000001"
        for n, fault in enumerate(["hang_after_accept", "reset_after_accept"], start=2):
            emulator.set_faults(**{fault: True, "remaining": 1})
            with pytest.raises(ProviderTimeout):
                await adapter.send(message(n))
        assert (await adapter.send(message(9))).provider_ref == "GH00000004"
        await server.go_down()
        with pytest.raises(ProviderUnavailable):
            await adapter.send(message(10))
        await adapter.aclose()
    assert emulator.accepted == {"key-1": 1, "key-2": 1, "key-3": 1, "key-9": 1}
