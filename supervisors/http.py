"""The daemon's HTTP face: ``/livez``, ``/readyz`` and ``/metrics``, served by hypercorn on Trio.

:class:`HealthApp` is a plain ASGI application::

    GET /livez    200 {"status": "ok"}: the event loop is running (it answered)
    GET /readyz   200 or 503, JSON from the readiness probe (see supervisors.tree.Readiness)
    GET /metrics  200, Prometheus text exposition of the daemon's registry
    mounted       ``mounts={"/v1/dispatches": app, "/webhooks/": app}``: a path equal to a
                  mount, or under it (a mount ending in ``/`` is a prefix), goes to
                  that ASGI app unchanged (the dispatch API, the DLR ingress)
    other paths   404 {"error": "not found", "path": ...}
    other methods 405 {"error": "method not allowed", ...}, with ``Allow: GET``

It implements the ASGI lifespan protocol, which hypercorn 0.18 requires (an app
that returns on the lifespan scope crashes the server at start). Websocket
connections are refused.

:class:`HttpServer` runs the app as a supervised child: ``run`` calls
``task_status.started()`` only once the socket is bound and listening (port 0
picks a free port, then :attr:`HttpServer.port` holds the real one), and
:meth:`HttpServer.shutdown` starts hypercorn's graceful shutdown: the listener
closes, requests in flight finish within ``graceful_timeout_s``, then ``run``
returns normally.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any, Final, Protocol

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.typing import (
    ASGIFramework,
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from providers.asgi import respond, send_json, serve_scope

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

    def _mounted(self, path: str) -> ASGIFramework | None:
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
        app = self._mounted(path)
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


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port_of(bind: str) -> int:
    """``http://127.0.0.1:8080`` or ``http://[::1]:8080`` -> 8080."""
    return int(bind.rsplit(":", 1)[1])


class HttpServer:
    """Serves an ASGI app with hypercorn on Trio; one :meth:`run` per incarnation.

    Every value comes from the caller (the daemon reads it from config):
    ``graceful_timeout_s`` is how long requests in flight may take once
    :meth:`shutdown` was called.
    """

    def __init__(
        self,
        app: ASGIFramework,
        *,
        host: str,
        port: int,
        graceful_timeout_s: float,
        log: logging.Logger | None = None,
    ) -> None:
        self.app = app
        self.host = host
        self.requested_port = port
        self.graceful_timeout_s = graceful_timeout_s
        self.log = log if log is not None else logging.getLogger("triage.http")
        self.binds: list[str] = []
        self.port: int | None = None
        self._shutdown = trio.Event()
        self._stopped: trio.Event | None = None

    def _config(self) -> HypercornConfig:
        config = HypercornConfig()
        config.bind = [_bind_address(self.host, self.requested_port)]
        config.graceful_timeout = self.graceful_timeout_s
        config.accesslog = None
        config.errorlog = self.log
        return config

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Bind, report started once listening, serve until :meth:`shutdown` (then return)."""
        stopped = self._stopped = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                binds: list[str] = await nursery.start(
                    partial(
                        serve,
                        self.app,
                        self._config(),
                        shutdown_trigger=self._shutdown.wait,
                        mode="asgi",
                    )
                )
                self.binds = binds
                self.port = _port_of(binds[0]) if binds else None
                self.log.info(
                    "http listening",
                    extra={"host": self.host, "port": self.port, "binds": binds},
                )
                task_status.started()
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
