"""The live dashboard (issue 12): what the daemon runs, on a page that stays current.

Three parts:

* :meth:`Dashboard.snapshot`: a JSON-able picture of the live runtime, one mapping per
  section, each keyed by a stable name:

  ``tree``       every child of the root supervisor and of the supervisors under it
                 (``root/channels/sms``...): state, restart policy, restart count, the
                 wall times of its last ``restart_history`` restarts (from the event
                 bus's ``ActorRestarted``), and for an actor its mailbox depth and size;
  ``breakers``   every breaker built on the runtime's metrics: state, why, trips,
                 window counts, seconds to half-open, and its *effective* thresholds
                 (:meth:`engine.breaker.Breaker.settings`: a reload that took shows here);
  ``bulkheads``  in use / capacity, waiting, partitions;
  ``detectors``  the detector set: firing, value, threshold, last evaluation, settings;
  ``alerts``     the active-alert board.

* :func:`diff` / :func:`apply`: ``{"set": {section: {key: item}}, "del": {section:
  [key]}}``, items replaced whole; ``apply(old, diff(old, new)) == new``.

* :meth:`Dashboard.run`: the websocket server (trio-websocket) on ``daemon.host`` and
  ``[dashboard] port``. The daemon's HTTP/1.1 server (:mod:`providers.http_server`)
  answers no upgrade, so the websocket has a port of its own; the page itself is served
  by the daemon's HTTP port at ``[dashboard] path`` (:attr:`Dashboard.app`) and is told
  the websocket's port. A client gets ``{"type": "snapshot"}`` then ``{"type": "diff"}``
  messages, one per ``interval_s`` in which something changed. At most ``max_clients``
  at once: one more is refused (HTTP 503). A slow client is dropped, never waited on: a
  send over ``send_timeout_s``, or ``client_queue`` updates waiting unsent (the
  broadcaster never blocks on a client), ends its connection; the page reconnects and
  starts again from a snapshot. A browser handshake whose ``Origin`` is not the daemon's
  own page (same host, the daemon's HTTP port) is refused (403): another site's page
  cannot read the dashboard.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Mapping
from importlib import resources
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec
import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)
from trio_websocket import ConnectionClosed, WebSocketRequest, WebSocketServer, serve_websocket

from actors.alerts import ActiveAlerts
from config.schema import DashboardConfig
from engine.actor import actor_ref_of
from engine.breaker import Breaker
from engine.bulkhead import Bulkhead
from engine.detectors import DetectorSet
from engine.events import ActorRestarted, Event
from engine.runtime import Runtime
from engine.supervisor import Supervisor
from providers.asgi import respond, send_json, serve_scope
from supervisors.http import HttpServer

__all__ = ["SECTIONS", "Dashboard", "apply", "diff", "page_html"]

log = logging.getLogger("triage.dashboard")

#: The snapshot's sections, each a mapping of stable keys to items.
SECTIONS: Final = ("tree", "breakers", "bulkheads", "detectors", "alerts")

Snapshot = dict[str, Any]


def _number(value: float | None) -> float | None:
    """JSON has no NaN or infinity: those are ``None``."""
    if value is None or not math.isfinite(value):
        return None
    return value


def diff(old: Snapshot, new: Snapshot) -> Snapshot:
    """What changed from ``old`` to ``new``: ``{"at", "set", "del"}``, empty ``set`` and
    ``del`` when nothing did (items are compared and replaced whole)."""
    changed: dict[str, dict[str, Any]] = {}
    gone: dict[str, list[str]] = {}
    for section in SECTIONS:
        before: Mapping[str, Any] = old.get(section, {})
        after: Mapping[str, Any] = new.get(section, {})
        sets = {key: item for key, item in after.items() if before.get(key) != item}
        dels = [key for key in before if key not in after]
        if sets:
            changed[section] = sets
        if dels:
            gone[section] = dels
    return {"at": new.get("at"), "set": changed, "del": gone}


def is_empty(change: Snapshot) -> bool:
    return not change["set"] and not change["del"]


def apply(snapshot: Snapshot, change: Snapshot) -> Snapshot:
    """``snapshot`` with ``change`` (a :func:`diff`) applied; ``snapshot`` is not modified."""
    result: Snapshot = {"at": change.get("at", snapshot.get("at"))}
    for section in SECTIONS:
        items = dict(snapshot.get(section, {}))
        for key in change["del"].get(section, ()):
            items.pop(key, None)
        items.update(change["set"].get(section, {}))
        result[section] = items
    return result


def page_html(ws_port: int | None) -> bytes:
    """The page, told which port its websocket is on."""
    text = resources.files("supervisors").joinpath("dashboard.html").read_text("utf-8")
    return text.replace("{{WS_PORT}}", str(ws_port or 0)).encode()


class _Client:
    __slots__ = ("dropped", "receive", "send")

    def __init__(self, capacity: int) -> None:
        self.send, self.receive = trio.open_memory_channel[Snapshot](capacity)
        self.dropped = False


class Dashboard:
    """The snapshot builder, the websocket server and the page, for one runtime.

    ``root`` is the root supervisor (set once the tree is wired); ``detectors`` and
    ``board`` are the tree's. Restart times are recorded from the event bus from
    construction on (:meth:`close` stops that).
    """

    def __init__(
        self,
        config: DashboardConfig,
        runtime: Runtime,
        *,
        host: str,
        detectors: DetectorSet | None = None,
        board: ActiveAlerts | None = None,
        root: Supervisor | None = None,
    ) -> None:
        self.config = config
        self.runtime = runtime
        self.host = host
        self.detectors = detectors
        self.board = board
        self.root = root
        self.port: int | None = None
        #: The daemon's HTTP server, where the page is served (set by the tree).
        self.http: HttpServer | None = None
        self.name = "dashboard"
        self.dropped = 0  # clients dropped for being slow
        self.refused = 0  # clients refused over max_clients
        self._clients: set[_Client] = set()
        self._restarts: dict[tuple[str, str], deque[float]] = {}
        self.close = runtime.events.on(ActorRestarted, self._on_restart)
        self.app = _PageApp(self)

    # -- the snapshot ---------------------------------------------------------------

    def _on_restart(self, event: Event) -> None:
        assert isinstance(event, ActorRestarted)
        key = (event.supervisor, event.child)
        times = self._restarts.get(key)
        if times is None:
            times = self._restarts[key] = deque(maxlen=self.config.restart_history)
        times.append(event.wall)

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http is not None else None

    @property
    def clients(self) -> int:
        return len(self._clients)

    def snapshot(self) -> Snapshot:
        """The live runtime as JSON-able sections (see the module docstring)."""
        return {
            "at": self.runtime.clock.wall(),
            "tree": self._tree(),
            "breakers": self._breakers(),
            "bulkheads": self._bulkheads(),
            "detectors": self._detectors(),
            "alerts": self._alerts(),
        }

    def _tree(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.root is None:
            return out
        pending: list[tuple[Supervisor, str, int]] = [(self.root, self.root.name, 0)]
        seen: set[int] = set()
        while pending:
            sup, path, depth = pending.pop(0)
            if id(sup) in seen:
                continue
            seen.add(id(sup))
            for info, spec in sup.children_with_specs():
                key = f"{path}/{info.id}"
                ref = actor_ref_of(spec.start)
                nested = getattr(spec.start, "__self__", None)
                item: dict[str, Any] = {
                    "supervisor": sup.name,
                    "id": info.id,
                    "depth": depth,
                    "state": info.state,
                    "restart": info.restart,
                    "restarts": info.restarts,
                    "restart_times": list(self._restarts.get((sup.name, info.id), ())),
                    "dynamic": info.dynamic,
                    "kind": "actor" if ref is not None else "task",
                    "mailbox": None,
                    "mailbox_capacity": None,
                }
                if ref is not None:
                    item["mailbox"] = ref.queued()
                    item["mailbox_capacity"] = ref.capacity()
                if isinstance(nested, Supervisor):
                    item["kind"] = "supervisor"
                    pending.append((nested, key, depth + 1))
                out[key] = item
        return out

    def _breakers(self) -> dict[str, Any]:
        metrics = self.runtime.metrics
        out: dict[str, Any] = {}
        if metrics is None:
            return out
        try:
            now = trio.current_time()
        except RuntimeError:
            now = None
        for breaker in metrics.tracked(Breaker):
            stats = breaker.statistics()
            half_open_at = stats.half_open_at
            key = breaker.name
            n = 2
            while key in out:
                key, n = f"{breaker.name}#{n}", n + 1
            out[key] = {
                "name": breaker.name,
                "state": stats.state.value,
                "reason": breaker.reason,
                "trips": stats.trips,
                "consecutive_failures": stats.consecutive_failures,
                "window_calls": stats.window_calls,
                "window_failures": stats.window_failures,
                "window_slow": stats.window_slow,
                "half_open_in_s": None
                if half_open_at is None or now is None
                else _number(round(max(0.0, half_open_at - now), 3)),
                "settings": {k: _number(v) for k, v in breaker.settings().items()},
            }
        return out

    def _bulkheads(self) -> dict[str, Any]:
        metrics = self.runtime.metrics
        out: dict[str, Any] = {}
        if metrics is None:
            return out
        for bulkhead in metrics.tracked(Bulkhead):
            stats = bulkhead.statistics()
            key = bulkhead.name
            n = 2
            while key in out:
                key, n = f"{bulkhead.name}#{n}", n + 1
            out[key] = {
                "name": bulkhead.name,
                "in_use": stats.in_use,
                "capacity": stats.capacity,
                "waiting": stats.waiting,
                "partitions": stats.partitions,
                "max_wait_s": bulkhead.max_wait_s,
            }
        return out

    def _detectors(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.detectors is None:
            return out
        for detector in self.detectors:
            state = detector.last_state
            out[detector.name] = {
                "metric": detector.metric,
                "row": detector.row,
                "firing": bool(state is not None and state.firing),
                "evaluable": bool(state is not None and state.evaluable),
                "value": None if state is None else _number(state.value),
                "threshold": None if state is None else _number(state.threshold),
                "settings": {
                    k: _number(v) if isinstance(v, float) else v
                    for k, v in msgspec.to_builtins(detector.settings()).items()
                },
            }
        return out

    def _alerts(self) -> dict[str, Any]:
        if self.board is None:
            return {}
        out: dict[str, Any] = {}
        for alert in self.board.snapshot():
            item = msgspec.to_builtins(alert)
            out[alert.key] = {k: _number(v) if isinstance(v, float) else v for k, v in item.items()}
        return out

    # -- the websocket --------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the websocket and broadcast snapshots until cancelled; ``started`` once
        it listens (then :attr:`port` is the bound port)."""
        timeout = self.config.send_timeout_s
        async with trio.open_nursery() as nursery:
            server: WebSocketServer = await nursery.start(
                lambda task_status: serve_websocket(
                    self._handle,
                    self.host,
                    self.config.port,
                    None,
                    handler_nursery=nursery,
                    connect_timeout=timeout,
                    disconnect_timeout=timeout,
                    task_status=task_status,
                )
            )
            self.port = server.port
            log.info(
                "dashboard listening",
                extra={"port": self.port, "path": self.config.path},
            )
            task_status.started()
            while True:
                await trio.sleep(self.config.interval_s)
                self.broadcast()

    def broadcast(self) -> None:
        """Hand a new snapshot to every client, never blocking: a client with
        ``client_queue`` updates still unsent is dropped."""
        if not self._clients:
            return
        snap = self.snapshot()
        for client in list(self._clients):
            try:
                client.send.send_nowait(snap)
            except trio.WouldBlock:
                self._drop(client, "updates piling up")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._clients.discard(client)

    def _drop(self, client: _Client, why: str) -> None:
        if not client.dropped:
            client.dropped = True
            self.dropped += 1
            log.info("dashboard client dropped", extra={"why": why})
        self._clients.discard(client)
        client.send.close()

    def origin_refused(self, headers: list[tuple[bytes, bytes]], host: str | None) -> str | None:
        """Why a handshake's ``Origin`` is refused, or None. A browser says where the
        page came from: only the daemon's own page may connect (same host as the
        websocket's ``Host``, the daemon's HTTP port), so another site's page cannot read
        the dashboard. A client without ``Origin`` (not a browser) is let in. ``host`` is
        the handshake's ``Host`` (its host part is compared; None: not compared)."""
        fields = {name.lower(): value.decode("latin-1") for name, value in headers}
        origin = fields.get(b"origin")
        if origin is None:
            return None
        parts = urlsplit(origin)
        hostname = urlsplit(f"//{host}").hostname if host is not None else None
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme != "http" or (hostname is not None and parts.hostname != hostname):
            return f"origin {origin!r} is not this host's"
        if self.http_port is not None and port != self.http_port:
            return f"origin {origin!r} is not the daemon's page (port {self.http_port})"
        return None

    async def _handle(self, request: WebSocketRequest) -> None:
        # wsproto takes Host out of the headers it hands on: it is on the event.
        host = getattr(getattr(request, "_event", None), "host", None)
        refused = self.origin_refused(
            list(request.headers), host if isinstance(host, str) else None
        )
        if refused is not None:
            self.refused += 1
            log.info("dashboard client refused", extra={"why": refused})
            await request.reject(403, body=refused.encode())
            return
        if len(self._clients) >= self.config.max_clients:
            self.refused += 1
            await request.reject(
                503, body=f"at most {self.config.max_clients} dashboard clients".encode()
            )
            return
        client = _Client(self.config.client_queue)
        self._clients.add(client)
        timeout = self.config.send_timeout_s
        try:
            ws = await request.accept()
            last = self.snapshot()
            message: dict[str, Any] = {"type": "snapshot", "data": last}
            while True:
                with trio.move_on_after(timeout) as scope:
                    await ws.send_message(msgspec.json.encode(message).decode())
                if scope.cancelled_caught:
                    self._drop(client, f"a send took over {timeout}s")
                    break
                message = {}
                while not message:
                    try:
                        snap = await client.receive.receive()
                    except (trio.EndOfChannel, trio.ClosedResourceError):
                        return
                    change = diff(last, snap)
                    last = snap
                    if not is_empty(change):
                        message = {"type": "diff", "data": change}
        except ConnectionClosed:
            pass
        finally:
            self._clients.discard(client)
            client.send.close()
            client.receive.close()


class _PageApp:
    """The page, on the daemon's HTTP port (a mount of :class:`~supervisors.http.HealthApp`)."""

    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await serve_scope(scope, receive, send, self._http)

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["method"] != "GET":
            await send_json(
                send, 405, b'{"error": "method not allowed", "allow": ["GET"]}',
                extra_headers=[(b"allow", b"GET")],
            )  # fmt: skip
            return
        if scope["path"] != self.dashboard.config.path:
            await send_json(send, 404, msgspec.json.encode({"error": "not found"}))
            return
        await respond(
            send,
            200,
            page_html(self.dashboard.port),
            b"text/html; charset=utf-8",
            extra_headers=[(b"cache-control", b"no-store")],
        )
