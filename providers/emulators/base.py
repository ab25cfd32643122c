"""The loopback emulator base: a vendor's HTTP API on 127.0.0.1 that fails on demand.

Every HTTP emulator (SMS gateways, FCM, APNs) is an :class:`Emulator` subclass: the
subclass speaks the vendor's routes and wire format; the base owns everything shared:

* **Fault injection** on SEND requests, from a mutable :class:`FaultPlan`
  (:meth:`Emulator.set_faults` / :meth:`Emulator.clear_faults`, or
  ``PUT``/``DELETE /_emulator/faults`` with curl). The order a send goes through::

      count request → vendor validation (auth, body) → latency → hang_before_accept
      → status → rate limit → ACCEPT (recorded) → hang_after_accept | reset_after_accept
      → vendor answer

  Everything before ACCEPT leaves no trace but the request count; everything after it
  leaves a message the client may never hear about (the ambiguous outcomes).
* **Counting**: ``requests`` (every send, by idempotency key), ``accepted`` (every
  message taken, by idempotency key: a key taken twice is a duplicate, see
  :meth:`Emulator.duplicates`) and ``messages`` by the client's reference
  (``providers.channel.Message.reference``).
* **Receipts**: after accepting, the emulator POSTs the vendor's receipt (DLR, push
  feedback) to the message's callback URL or the emulator's ``receipt_url``, after
  ``receipt_delay_s``; :meth:`Emulator.emit_receipt` and :meth:`Emulator.flood` send
  them on demand. While ``receipts_paused`` they are held, not dropped; while
  ``receipts_dropped`` they are lost (the message's state still moves on).
  :meth:`Emulator.forget` drops a message from the vendor's records.
* **Serving**: :func:`serve_emulator` runs the ASGI app over our own accept loop:
  HTTP/1.1 on the daemon's server (:mod:`providers.http_server`, a fraction of
  hypercorn's CPU: the gateway's process is part of the benchmarks), HTTP/2
  cleartext with prior knowledge (the first bytes are its preface) on hypercorn's
  Trio protocol stack, so the emulator can reset one client's connection (``reset_after_accept``) and the
  whole port can go down and come back on the same port
  (:meth:`EmulatorServer.go_down` / :meth:`EmulatorServer.come_up`).

Control routes (JSON)::

    GET    /_emulator/stats      counts, faults, receipt counts
    PUT    /_emulator/faults     replace the fault plan (FaultPlan fields)
    DELETE /_emulator/faults     clear it
    POST   /_emulator/receipts   {"reference": ..., "state": ...}: emit one receipt
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
import msgspec
import trio
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from config.schema import HttpConfig
from providers.http_server import Http1Server
from providers.http_transport import Http1Transport

__all__ = [
    "CONTROL_PREFIX",
    "Emulator",
    "EmulatorServer",
    "FaultPlan",
    "FloodResult",
    "ReceiptPost",
    "Request",
    "Response",
    "StoredMessage",
    "serve_emulator",
]

CONTROL_PREFIX = "/_emulator"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class FaultPlan(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the emulator does to SEND requests (mutable; replaced whole by ``set_faults``).

    ``remaining`` limits the plan to the next N send requests; after the Nth the plan
    clears itself (``receipts_paused`` included). ``latency_s`` delays the send before
    it is accepted; a client that gives up during it still leaves an accepted message
    (the server does not stop work for a hung-up client). ``reset_after_accept`` needs
    :func:`serve_emulator` (it closes the client's socket with an RST); under plain
    hypercorn it degrades to no answer.
    """

    status: Annotated[int, msgspec.Meta(ge=100, le=599)] | None = None
    latency_s: NonNegative = 0.0
    hang_before_accept: bool = False
    hang_after_accept: bool = False
    reset_after_accept: bool = False
    rate_limit_per_s: Annotated[float, msgspec.Meta(gt=0)] | None = None
    retry_after_s: NonNegative = 1.0
    remaining: Annotated[int, msgspec.Meta(ge=1)] | None = None
    receipts_paused: bool = False
    #: receipts are lost: the message's state moves on (a status query sees it), its
    #: receipt is never posted (a gateway whose DLR retries ran out)
    receipts_dropped: bool = False


@dataclass
class StoredMessage:
    """One message the emulator accepted, as the vendor would keep it."""

    provider_ref: str
    reference: str | None
    idempotency_key: str | None
    recipient: str
    body: str
    status: str
    accepted_at: float  # wall clock (Unix time)
    sender: str | None = None
    callback_url: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """One HTTP request as the vendor routes see it (header names lower-cased)."""

    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes
    url: str  # as the client addressed it (scheme://host:port/path?query)
    client: tuple[str, int] | None

    def query_one(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None

    def form(self) -> dict[str, str]:
        """The body as ``application/x-www-form-urlencoded`` (last value wins)."""
        pairs = urllib.parse.parse_qsl(self.body.decode("utf-8", "replace"), keep_blank_values=True)
        return dict(pairs)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(
        cls, status: int, payload: object, *, headers: tuple[tuple[str, str], ...] = ()
    ) -> Response:
        return cls(
            status, msgspec.json.encode(payload), (("content-type", "application/json"), *headers)
        )


@dataclass(frozen=True)
class ReceiptPost:
    """A receipt the emulator will POST: where, with which headers, which bytes."""

    url: str
    headers: Mapping[str, str]
    content: bytes


@dataclass(frozen=True)
class FloodResult:
    sent: int
    statuses: Counter[int]  # HTTP status answered by the receiver; 0 = no answer


class Emulator:
    """Base of every HTTP vendor emulator; subclasses implement :meth:`handle` and
    :meth:`receipt_for` and call :meth:`take_send` from their send route.

    ``clock`` is the wall clock (Unix time) stamped on messages and receipts; trio's
    clock drives delays.
    """

    #: the vendor state a default receipt reports (subclasses override)
    delivered_state = "delivered"

    def __init__(
        self,
        name: str,
        *,
        receipt_url: str | None = None,
        receipt_secret: str | None = None,
        receipt_delay_s: float = 0.0,
        auto_receipts: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.receipt_url = receipt_url
        self.receipt_secret = receipt_secret
        self.receipt_delay_s = receipt_delay_s
        self.auto_receipts = auto_receipts
        self.clock = clock
        self.faults = FaultPlan()
        self.accepted: Counter[str] = Counter()
        self.requests: Counter[str] = Counter()
        self.messages: dict[str, StoredMessage] = {}
        self.by_provider_ref: dict[str, StoredMessage] = {}
        self.receipts_sent = 0
        self.receipts_dropped = 0
        #: automatic receipts are re-sent on no answer / 429 / 5xx (see _receipt_later)
        self.receipt_attempts = 5
        self.receipt_retry_s = 0.5
        self.receipt_retries = 0
        self.receipt_statuses: Counter[int] = Counter()
        self._faults_changed = trio.Event()
        self._activity = trio.Event()
        self._tokens = 0.0
        self._tokens_at: float | None = None
        self._seq = 0
        # Set while served (serve_emulator): the receipt client, the background nursery,
        # and the live connections by peer address (for reset_after_accept).
        self._http: httpx.AsyncClient | None = None
        self._nursery: trio.Nursery | None = None
        self._streams: dict[tuple[str, int], trio.SocketStream] = {}
        self.server: EmulatorServer | None = None

    # -- faults ---------------------------------------------------------------------

    def set_faults(self, **fields: Any) -> FaultPlan:
        """Replace the fault plan with one built from ``fields`` (validated)."""
        plan = msgspec.convert(fields, FaultPlan)
        self._install(plan)
        return plan

    def clear_faults(self) -> None:
        self._install(FaultPlan())

    def _install(self, plan: FaultPlan) -> None:
        self.faults = plan
        self._tokens_at = None
        self._faults_changed.set()
        self._faults_changed = trio.Event()

    # -- counts ---------------------------------------------------------------------

    def duplicates(self) -> int:
        """Messages taken beyond the first for their idempotency key."""
        return sum(n - 1 for n in self.accepted.values() if n > 1)

    def stats(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests": sum(self.requests.values()),
            "accepted": sum(self.accepted.values()),
            "keys": len(self.accepted),
            "duplicates": self.duplicates(),
            "messages": len(self.messages),
            "receipts_sent": self.receipts_sent,
            "receipts_dropped": self.receipts_dropped,
            "receipt_retries": self.receipt_retries,
            "receipt_statuses": {str(k): v for k, v in self.receipt_statuses.items()},
            "faults": msgspec.to_builtins(self.faults),
        }

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; re-checked after every vendor request handled,
        message accepted and receipt sent."""
        while not predicate():
            await self._activity.wait()

    def _bump(self) -> None:
        self._activity.set()
        self._activity = trio.Event()

    def forget(self, reference: str) -> None:
        """Drop the message with this client reference from the vendor's records (a
        gateway that lost them): its status query answers "no such message" from now."""
        message = self.messages.pop(reference)
        self.by_provider_ref.pop(message.provider_ref, None)

    def next_id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}{self._seq:08d}"

    # -- the vendor's side (subclasses) ------------------------------------------------

    async def handle(self, request: Request) -> Response | None:
        """Answer one vendor request; ``None`` means "send no answer" (a fault did it)."""
        raise NotImplementedError

    def error_response(self, status: int, reason: str) -> Response:
        """The vendor's error body for an injected status (subclasses override)."""
        headers: tuple[tuple[str, str], ...] = ()
        return Response.json(status, {"error": reason, "status": status}, headers=headers)

    def receipt_for(self, message: StoredMessage, state: str) -> ReceiptPost | None:
        """The vendor's receipt for ``message`` now in ``state``; ``None``: nowhere to send."""
        raise NotImplementedError

    async def take_send(
        self,
        request: Request,
        *,
        key: str | None,
        accept: Callable[[], tuple[StoredMessage, Response]],
    ) -> Response | None:
        """Run a validated send through the fault plan; ``accept`` records and answers.

        Returns the answer, or ``None`` when the fault plan says not to answer.
        """
        self.requests[key or ""] += 1
        self._bump()
        plan = self.faults
        if plan.remaining is not None:
            plan.remaining -= 1
            if plan.remaining <= 0:
                self.clear_faults()
        if plan.latency_s > 0:
            await trio.sleep(plan.latency_s)
        if plan.hang_before_accept:
            return None
        if plan.status is not None:
            return self.error_response(plan.status, "injected fault")
        if plan.rate_limit_per_s is not None and not self._take_token(plan.rate_limit_per_s):
            limited = self.error_response(429, "rate limit exceeded")
            retry = ("retry-after", f"{plan.retry_after_s:g}")
            return Response(limited.status, limited.body, (*limited.headers, retry))
        message, answer = accept()
        self.accepted[key or ""] += 1
        if message.reference is not None:
            self.messages[message.reference] = message
        self.by_provider_ref[message.provider_ref] = message
        self._bump()
        if self.auto_receipts:
            self._schedule_receipt(message, self.delivered_state, self.receipt_delay_s)
        if plan.hang_after_accept:
            return None
        if plan.reset_after_accept:
            self._reset(request.client)
            return None
        return answer

    def _take_token(self, rate: float) -> bool:
        now = trio.current_time()
        capacity = max(1.0, rate)
        if self._tokens_at is None:
            self._tokens = capacity
        else:
            self._tokens = min(capacity, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    def _reset(self, client: tuple[str, int] | None) -> None:
        """Drop the client's connection with an RST and no answer."""
        stream = self._streams.get(client) if client is not None else None
        if stream is None:
            return
        sock = stream.socket
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    # -- receipts -------------------------------------------------------------------

    def _schedule_receipt(self, message: StoredMessage, state: str, delay_s: float) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._receipt_later, message, state, delay_s)

    async def _receipt_later(self, message: StoredMessage, state: str, delay_s: float) -> None:
        """An automatic receipt, re-sent like a real gateway re-sends its DLRs: on no
        answer, a 429 or a 5xx, up to ``receipt_attempts`` times, waiting
        ``receipt_retry_s`` and doubling."""
        await trio.sleep(delay_s)
        wait = self.receipt_retry_s
        for attempt in range(1, self.receipt_attempts + 1):
            status = await self._deliver_receipt(message, state)
            if status is None or not (status == 0 or status == 429 or status >= 500):
                return
            if attempt < self.receipt_attempts:
                self.receipt_retries += 1
                await trio.sleep(wait)
                wait *= 2

    async def emit_receipt(self, reference: str, state: str | None = None) -> int:
        """Send the receipt for the message with this client reference now (held while
        receipts are paused); returns the receiver's HTTP status (0: no answer)."""
        message = self.messages.get(reference)
        if message is None:
            raise KeyError(f"{self.name}: no message with reference {reference!r}")
        return await self._post_receipt(message, state or self.delivered_state)

    async def flood(self, count: int, rate_per_s: float, *, max_in_flight: int = 64) -> FloodResult:
        """Re-send ``count`` receipts for the accepted messages, round robin, paced at
        ``rate_per_s`` whatever the receiver answers (at most ``max_in_flight`` open)."""
        if count < 0 or rate_per_s <= 0 or max_in_flight < 1:
            raise ValueError("flood needs count >= 0, rate_per_s > 0, max_in_flight >= 1")
        targets = list(self.by_provider_ref.values())
        if not targets:
            raise ValueError(f"{self.name}: no accepted messages to flood receipts for")
        statuses: Counter[int] = Counter()
        slots = trio.Semaphore(max_in_flight)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i in range(count):
                await trio.sleep_until(start + i / rate_per_s)
                await slots.acquire()
                nursery.start_soon(self._flood_one, targets[i % len(targets)], statuses, slots)
        return FloodResult(sent=count, statuses=statuses)

    async def _flood_one(
        self, message: StoredMessage, statuses: Counter[int], slots: trio.Semaphore
    ) -> None:
        try:
            statuses[await self._post_receipt(message, self.delivered_state)] += 1
        finally:
            slots.release()

    async def _post_receipt(self, message: StoredMessage, state: str) -> int:
        status = await self._deliver_receipt(message, state)
        return 0 if status is None else status

    async def _deliver_receipt(self, message: StoredMessage, state: str) -> int | None:
        """Post the receipt; its HTTP status (0: no answer), None when it went no HTTP
        way (a subclass delivered it in process, e.g. a feedback subscription)."""
        while self.faults.receipts_paused:
            await self._faults_changed.wait()
        message.status = state
        if self.faults.receipts_dropped:
            self.receipts_dropped += 1
            self._bump()
            return None
        post = self.receipt_for(message, state)
        if post is None or self._http is None:
            return None
        try:
            answer = await self._http.post(
                post.url, content=post.content, headers=dict(post.headers)
            )
            status = answer.status_code
        except httpx.HTTPError:
            status = 0
        self.receipts_sent += 1
        self.receipt_statuses[status] += 1
        self._bump()
        return status

    # -- ASGI -----------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        request = await _read_request(scope, receive)
        if request.path.startswith(CONTROL_PREFIX):
            answer: Response | None = await self._control(request)
        else:
            answer = await self.handle(request)
            self._bump()
        if answer is None:
            # No answer: wait until the client gives up (or the server goes down).
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": [(k.encode(), v.encode()) for k, v in answer.headers],
            }
        )
        await send({"type": "http.response.body", "body": answer.body})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def control(self, method: str, path: str, request: Request) -> Response | None:
        """A subclass's own control routes under ``/_emulator`` (``path`` without the
        prefix); None: no such route."""
        return None

    async def _control(self, request: Request) -> Response:
        route = (request.method, request.path[len(CONTROL_PREFIX) :])
        try:
            match route:
                case ("GET", "/stats"):
                    return Response.json(200, self.stats())
                case ("PUT", "/faults"):
                    fields = msgspec.json.decode(request.body or b"{}", type=dict[str, Any])
                    plan = self.set_faults(**fields)
                    return Response.json(200, msgspec.to_builtins(plan))
                case ("DELETE", "/faults"):
                    self.clear_faults()
                    return Response.json(200, msgspec.to_builtins(self.faults))
                case ("POST", "/receipts"):
                    spec = msgspec.json.decode(request.body, type=dict[str, str])
                    status = await self.emit_receipt(spec["reference"], spec.get("state"))
                    return Response.json(200, {"receiver_status": status})
                case (method, path):
                    extra = await self.control(method, path, request)
                    if extra is not None:
                        return extra
        except (msgspec.ValidationError, msgspec.DecodeError, TypeError) as exc:
            return Response.json(400, {"error": f"bad control request: {exc}"})
        except KeyError as exc:
            return Response.json(404, {"error": str(exc)})
        return Response.json(404, {"error": f"no control route {request.method} {request.path}"})


async def _read_request(scope: Scope, receive: Receive) -> Request:
    chunks = []
    while True:
        event = await receive()
        if event["type"] == "http.disconnect":
            break
        chunks.append(event.get("body", b""))
        if not event.get("more_body", False):
            break
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        headers[name.decode("latin-1").lower()] = value.decode("latin-1")
    raw_query = scope.get("query_string", b"").decode("latin-1")
    server = scope.get("server") or ("127.0.0.1", 0)
    host = headers.get("host") or headers.get(":authority") or f"{server[0]}:{server[1]}"
    path = scope["path"]
    url = f"{scope.get('scheme', 'http')}://{host}{path}" + (f"?{raw_query}" if raw_query else "")
    client = scope.get("client")
    return Request(
        method=scope["method"],
        path=path,
        query=urllib.parse.parse_qs(raw_query, keep_blank_values=True),
        headers=headers,
        body=b"".join(chunks),
        url=url,
        client=(client[0], int(client[1])) if client else None,
    )


class EmulatorServer:
    """One emulator served on a loopback port, which can go down and come back."""

    def __init__(
        self,
        emulator: Emulator,
        nursery: trio.Nursery,
        *,
        host: str,
        port: int,
        keep_alive_timeout_s: float,
        backlog: int,
    ) -> None:
        self.emulator = emulator
        self.host = host
        self.port = port
        self._nursery = nursery
        self._config = Config()
        self._config.keep_alive_timeout = keep_alive_timeout_s
        self._config.errorlog = None
        self._app = wrap_app(emulator, self._config.wsgi_max_body_size, "asgi")  # type: ignore[arg-type]  # ASGI typed loosely here; hypercorn uses TypedDicts
        self._context = WorkerContext(None)
        self._http1 = Http1Server(
            emulator,  # type: ignore[arg-type]  # ASGI typed loosely here; the server uses hypercorn's TypedDicts
            msgspec.structs.replace(HttpConfig(), keepalive_timeout_s=keep_alive_timeout_s),
            log=logging.getLogger("triage.emulators.http"),
        )
        self._keep_alive_timeout_s = keep_alive_timeout_s
        self._backlog = backlog
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._scope is not None

    async def come_up(self) -> None:
        """Listen again (on the same port); no-op when already up."""
        if self._scope is None:
            self._stopped = trio.Event()
            self._scope = await self._nursery.start(self._serve)

    async def go_down(self) -> None:
        """Close the port and drop every open connection: connects are refused."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
            await self._stopped.wait()

    async def _serve(self, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await sock.bind((self.host, self.port))
            sock.listen(self._backlog)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        listener = trio.SocketListener(sock)
        try:
            with trio.CancelScope() as scope:
                async with listener, trio.open_nursery() as connections:
                    task_status.started(scope)
                    await trio.serve_listeners(
                        self._connection, [listener], handler_nursery=connections
                    )
        finally:
            self._stopped.set()

    async def _connection(self, stream: trio.SocketStream) -> None:
        peer = stream.socket.getpeername()
        key = (peer[0], int(peer[1]))
        self.emulator._streams[key] = stream
        try:
            first = b""
            with trio.move_on_after(self._keep_alive_timeout_s):
                while len(first) < len(_H2_PREFACE_START):
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    first += data
            if first.startswith(_H2_PREFACE_START):
                again, state = _Replayed(stream, first), ConnectionState({})
                await TCPServer(self._app, self._config, self._context, state, again)  # type: ignore[arg-type]  # hypercorn types the stream as SSL; plain streams are handled
            elif first:
                await self._http1.serve_connection(stream, initial=first)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # reset before its first bytes (or by reset_after_accept)
        finally:
            self.emulator._streams.pop(key, None)
            stream.socket.close()


_H2_PREFACE_START = b"PRI "  # "PRI * HTTP/2.0": no HTTP/1.1 method starts so


class _Replayed(trio.abc.HalfCloseableStream):
    """``stream`` with ``first`` (bytes already read from it) read again first."""

    def __init__(self, stream: trio.SocketStream, first: bytes) -> None:
        self.stream = stream
        self.socket = stream.socket
        self._first = first

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._first:
            cut = len(self._first) if max_bytes is None else max_bytes
            data, self._first = self._first[:cut], self._first[cut:]
            await trio.lowlevel.checkpoint()
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


@contextlib.asynccontextmanager
async def serve_emulator(
    emulator: Emulator,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    receipt_timeout_s: float = 15.0,
    keep_alive_timeout_s: float = 5.0,
    receipt_client: httpx.AsyncClient | None = None,
    backlog: int = 128,
) -> AsyncIterator[EmulatorServer]:
    """Serve ``emulator`` on ``host:port`` (0: any free port) until the block exits.

    Yields the :class:`EmulatorServer` (``.url``, ``go_down()``, ``come_up()``); also
    sets ``emulator.server``. Receipts are POSTed with an httpx client whose timeout is
    ``receipt_timeout_s`` (or with ``receipt_client``, which the caller owns).
    """
    async with contextlib.AsyncExitStack() as stack:
        # A gateway queues its outgoing receipts: waiting for a free connection is not
        # a failed post (no pool timeout); the answer gets ``receipt_timeout_s``.
        http = receipt_client or await stack.enter_async_context(
            httpx.AsyncClient(
                timeout=httpx.Timeout(receipt_timeout_s, pool=None), transport=Http1Transport()
            )
        )
        nursery = await stack.enter_async_context(trio.open_nursery())
        server = EmulatorServer(
            emulator,
            nursery,
            host=host,
            port=port,
            keep_alive_timeout_s=keep_alive_timeout_s,
            backlog=backlog,
        )
        emulator._http = http
        emulator._nursery = nursery
        emulator.server = server
        try:
            await server.come_up()
            yield server
        finally:
            nursery.cancel_scope.cancel()
            emulator._http = None
            emulator._nursery = None
            emulator.server = None
