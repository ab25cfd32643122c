"""The daemon's HTTP face: ``/livez``, ``/readyz`` and ``/metrics``, served over HTTP/1.1 on Trio.

:class:`HealthApp` is a plain ASGI application::

    GET /livez    200 {"status": "ok"}: the event loop is running (it answered)
    GET /readyz   200 or 503, JSON from the readiness probe (see supervisors.tree.Readiness)
    GET /metrics  200, Prometheus text exposition of the daemon's registry
    mounted       ``mounts={"/v1/dispatches": app, "/webhooks/": app}``: a path equal to a
                  mount, or under it (a mount ending in ``/`` is a prefix), goes to
                  that ASGI app unchanged (the dispatch API, the DLR ingress)
    other paths   404 {"error": "not found", "path": ...}
    other methods 405 {"error": "method not allowed", ...}, with ``Allow: GET``

It implements the ASGI lifespan protocol (the server runs its startup and
shutdown around serving). Websocket connections are refused.

:class:`HttpServer` runs the app as a supervised child on our own HTTP/1.1
server (:mod:`providers.http_server`, bounded by ``[daemon.http]``): ``run``
calls ``task_status.started()`` only once the socket is bound and listening
(port 0 picks a free port, then :attr:`HttpServer.port` holds the real one), and
:meth:`HttpServer.shutdown` starts the graceful shutdown: the listener closes,
idle keep-alive connections close at once, requests in flight finish within
``graceful_timeout_s`` (the rest are cancelled), then ``run`` returns normally.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Final, Protocol

import msgspec
import trio
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from config.schema import HttpConfig
from providers.asgi import respond, send_json, serve_scope
from providers.http_server import Http1Server

__all__ = ["HealthApp", "HttpServer", "ReadinessProbe"]

_ALLOWED: Final = "GET"


class ReadinessProbe(Protocol):
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Whether the daemon is ready, and a JSON-able body saying why (not)."""


class HealthApp:
    """The ASGI app behind the daemon's probes and metrics; holds no state of its own."""

    def __init__(
        self,
        *,
        readiness: ReadinessProbe,
        registry: CollectorRegistry,
        mounts: Mapping[str, ASGIFramework] | None = None,
    ) -> None:
        self._readiness = readiness
        self._registry = registry
        # Longest prefix first, so "/webhooks/dlr/" wins over "/webhooks/".
        self._mounts = sorted((mounts or {}).items(), key=lambda item: -len(item[0]))

    def mounted(self, path: str) -> ASGIFramework | None:
        for prefix, app in self._mounts:
            if path == prefix.rstrip("/") or (prefix.endswith("/") and path.startswith(prefix)):
                return app
            if not prefix.endswith("/") and path.startswith(prefix + "/"):
                return app
        return None

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await serve_scope(scope, receive, send, self._http)

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        path = scope["path"]
        app = self.mounted(path)
        if app is not None:
            await app(scope, receive, send)
            return
        if path not in ("/livez", "/readyz", "/metrics"):
            await _json(send, 404, {"error": "not found", "path": path})
            return
        if scope["method"] != "GET":
            await _json(
                send,
                405,
                {"error": "method not allowed", "method": scope["method"], "allow": [_ALLOWED]},
                extra_headers=[(b"allow", _ALLOWED.encode())],
            )
            return
        if path == "/livez":
            await _json(send, 200, {"status": "ok"})
        elif path == "/readyz":
            ready, body = self._readiness.readiness()
            await _json(send, 200 if ready else 503, body)
        else:
            await respond(send, 200, generate_latest(self._registry), CONTENT_TYPE_LATEST.encode())


async def _json(
    send: ASGISendCallable,
    status: int,
    body: object,
    *,
    extra_headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    await send_json(send, status, msgspec.json.encode(body), extra_headers=extra_headers)


def _bind_of(listener: trio.SocketListener) -> str:
    """``http://127.0.0.1:8080`` or ``http://[::1]:8080``: where ``listener`` listens."""
    host, port = listener.socket.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _port_of(bind: str) -> int:
    """``http://127.0.0.1:8080`` or ``http://[::1]:8080`` -> 8080."""
    return int(bind.rsplit(":", 1)[1])


class HttpServer:
    """Serves an ASGI app over HTTP/1.1 on Trio (:class:`providers.http_server.Http1Server`);
    one :meth:`run` per incarnation.

    Every value comes from the caller (the daemon reads it from config):
    ``graceful_timeout_s`` is how long requests in flight may take once
    :meth:`shutdown` was called; ``limits`` is ``[daemon.http]`` (the schema's
    defaults when not given).
    """

    def __init__(
        self,
        app: ASGIFramework,
        *,
        host: str,
        port: int,
        graceful_timeout_s: float,
        limits: HttpConfig | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.graceful_timeout_s = graceful_timeout_s
        self.limits = limits if limits is not None else HttpConfig()
        self.log = log if log is not None else logging.getLogger("triage.http")
        self.binds: list[str] = []
        self.port: int | None = None
        self._shutdown = trio.Event()
        self._stopped: trio.Event | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, run the app's lifespan startup, report started once listening, serve
        until :meth:`shutdown` (then drain, run the lifespan shutdown and return)."""
        stopped = self._stopped = trio.Event()
        try:
            listeners = await trio.open_tcp_listeners(
                self.requested_port, host=self.host, backlog=self.limits.backlog
            )
            server = Http1Server(self.app, self.limits, log=self.log)
            try:
                self.binds = [_bind_of(listener) for listener in listeners]
                self.port = _port_of(self.binds[0]) if self.binds else None
                async with server.lifespan():
                    self.log.info(
                        "http listening",
                        extra={"host": self.host, "port": self.port, "binds": self.binds},
                    )
                    await server.serve(
                        listeners,
                        shutdown=self._shutdown,
                        grace_s=self.graceful_timeout_s,
                        task_status=task_status,
                    )
            finally:
                for listener in listeners:
                    await trio.aclose_forcefully(listener)
        finally:
            stopped.set()
        self.log.info("http stopped", extra={"port": self.port})

    def shutdown(self) -> None:
        """Start a graceful shutdown; ``run`` returns once it is over. Idempotent."""
        self._shutdown.set()

    @property
    def shutting_down(self) -> bool:
        return self._shutdown.is_set()

    async def wait_stopped(self) -> None:
        """Return once the current incarnation of :meth:`run` has ended (at once if none runs)."""
        stopped = self._stopped
        if stopped is not None:
            await stopped.wait()
