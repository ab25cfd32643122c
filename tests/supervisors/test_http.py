"""The probes-and-metrics ASGI app, and hypercorn serving it on Trio."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio
from hypercorn.typing import ASGIReceiveEvent, ASGISendEvent, Scope
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter

from supervisors.http import HealthApp, HttpServer


class Probe:
    def __init__(self) -> None:
        self.ready = True
        self.body: dict[str, Any] = {"status": "ready"}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return self.ready, self.body


def make_app(probe: Probe | None = None) -> tuple[HealthApp, Probe, CollectorRegistry]:
    probe = probe if probe is not None else Probe()
    registry = CollectorRegistry()
    Counter("triage_test_things", "Things counted by the test", registry=registry).inc(3)
    return HealthApp(readiness=probe, registry=registry), probe, registry


def client_for(app: HealthApp) -> httpx.AsyncClient:
    # httpx types ASGI messages as plain mappings; the app's TypedDicts are narrower.
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]  # same protocol, looser types
    return httpx.AsyncClient(transport=transport, base_url="http://triage")


async def test_livez() -> None:
    app, _, _ = make_app()
    async with client_for(app) as client:
        response = await client.get("/livez")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"status": "ok"}


async def test_readyz_follows_the_probe() -> None:
    app, probe, _ = make_app()
    async with client_for(app) as client:
        ready = await client.get("/readyz")
        probe.ready, probe.body = False, {"status": "not_ready", "reason": "draining"}
        unready = await client.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    assert (unready.status_code, unready.json()) == (
        503,
        {"status": "not_ready", "reason": "draining"},
    )
    assert unready.headers["cache-control"] == "no-store"


async def test_metrics_is_the_prometheus_exposition_of_the_registry() -> None:
    app, _, _ = make_app()
    async with client_for(app) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    assert "triage_test_things_total 3.0" in response.text


async def test_unknown_path_is_404_json() -> None:
    app, _, _ = make_app()
    async with client_for(app) as client:
        response = await client.get("/nope")
    assert response.status_code == 404
    assert response.json() == {"error": "not found", "path": "/nope"}


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD"])
async def test_other_methods_are_405(method: str) -> None:
    app, _, _ = make_app()
    async with client_for(app) as client:
        response = await client.request(method, "/readyz")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    if method != "HEAD":
        assert response.json()["error"] == "method not allowed"


async def test_lifespan_startup_and_shutdown_are_acknowledged() -> None:
    app, _, _ = make_app()
    incoming: list[ASGIReceiveEvent] = [
        {"type": "lifespan.startup"},
        {"type": "lifespan.shutdown"},
    ]
    sent: list[ASGISendEvent] = []

    async def receive() -> ASGIReceiveEvent:
        await trio.lowlevel.checkpoint()
        return incoming.pop(0)

    async def send(event: ASGISendEvent) -> None:
        await trio.lowlevel.checkpoint()
        sent.append(event)

    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    with trio.fail_after(1):
        await app(scope, receive, send)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


async def serve(nursery: trio.Nursery, app: Any, *, graceful_timeout_s: float = 2.0) -> HttpServer:
    server = HttpServer(app, host="127.0.0.1", port=0, graceful_timeout_s=graceful_timeout_s)
    await nursery.start(server.run)
    return server


async def test_server_reports_started_once_listening_then_shuts_down() -> None:
    app, _, _ = make_app()
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, app)
        assert server.port is not None and server.port > 0
        assert server.binds == [f"http://127.0.0.1:{server.port}"]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            response = await client.get("/livez")
            assert response.json() == {"status": "ok"}
            server.shutdown()
            with trio.fail_after(5):
                await server.wait_stopped()
            with pytest.raises(httpx.ConnectError):
                await client.get("/livez")
    assert server.shutting_down


async def test_a_request_in_flight_finishes_during_a_graceful_shutdown() -> None:
    entered = trio.Event()
    release = trio.Event()

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            app, _, _ = make_app()
            await app(scope, receive, send)
            return
        entered.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"late", "more_body": False})

    results: list[httpx.Response] = []
    async with trio.open_nursery() as nursery:
        server = await serve(nursery, slow_app)
        assert server.port is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:

            async def fetch() -> None:
                results.append(await client.get("/slow"))

            nursery.start_soon(fetch)
            await entered.wait()
            server.shutdown()
            await trio.sleep(0.1)
            # The listener is closed: new connections are refused...
            with pytest.raises(OSError):
                stream = await trio.open_tcp_stream("127.0.0.1", server.port)
                await stream.aclose()
            # ...but the request in flight still gets its answer.
            release.set()
            with trio.fail_after(5):
                await server.wait_stopped()
    assert [(r.status_code, r.text) for r in results] == [(200, "late")]


class Tagged:
    """A mounted ASGI app that answers with its tag and the path it saw."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        body = f"{self.tag} {scope['path']}".encode()  # type: ignore[typeddict-item]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


async def test_mounted_apps_get_their_paths_longest_prefix_first() -> None:
    registry = CollectorRegistry()
    mounts: dict[str, Any] = {
        "/v1/dispatches": Tagged("api"),
        "/webhooks/": Tagged("hooks"),
        "/webhooks/dlr/": Tagged("dlr"),
    }
    app = HealthApp(readiness=Probe(), registry=registry, mounts=mounts)
    async with client_for(app) as client:
        seen = [
            (await client.post(path)).text
            for path in (
                "/v1/dispatches",
                "/v1/dispatches/abc",
                "/webhooks/bounces/smtp",
                "/webhooks/dlr/twilio",
            )
        ]
        other = await client.get("/v1/dispatchesX")
        livez = await client.get("/livez")
    assert seen == [
        "api /v1/dispatches",
        "api /v1/dispatches/abc",
        "hooks /webhooks/bounces/smtp",
        "dlr /webhooks/dlr/twilio",
    ]
    assert other.status_code == 404
    assert livez.json() == {"status": "ok"}
