"""The live dashboard: the snapshot of a live runtime, its diffs, and the websocket
(a snapshot then diffs; the client bound; a client that falls behind is dropped)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from trio_websocket import open_websocket_url

from actors.alerts import ActiveAlerts, Alert
from config.schema import DashboardConfig
from engine.actor import Actor, actor_child
from engine.breaker import Breaker
from engine.bulkhead import Bulkhead
from engine.detectors import DetectorSet, make_detector
from engine.metrics import Metrics
from engine.runtime import Runtime
from engine.supervisor import ChildSpec, Supervisor
from supervisors.dashboard import Dashboard, apply, diff, page_html

BREAKER: dict[str, Any] = {
    "fail_max": 3,
    "reset_timeout_s": 10.0,
    "reset_timeout_max_s": 60.0,
    "reset_backoff_multiplier": 2.0,
    "failure_rate_threshold": 2.0,
    "rate_window_s": 10.0,
    "minimum_calls": 10,
    "slow_call_s": 5.0,
    "slow_call_rate_threshold": 2.0,
    "half_open_max_calls": 1,
}


class Stuck(Actor[str]):
    """Takes one message and never finishes it: the rest wait in the mailbox."""

    async def handle(self, message: str) -> None:
        await trio.sleep_forever()


class World:
    """A small live runtime: root/{sink (an actor), inner/{flaky}}, a breaker, a
    bulkhead, a detector, the alert board."""

    def __init__(self, config: DashboardConfig) -> None:
        self.runtime = Runtime(metrics=Metrics(CollectorRegistry()))
        self.crashes = 0
        self.breaker = Breaker("ghasi", **BREAKER, metrics=self.runtime.metrics)
        self.bulkhead = Bulkhead(
            "ghasi", capacity=4, max_wait_s=1.0, max_partitions=8, partition_capacity=2,
            metrics=self.runtime.metrics,
        )  # fmt: skip
        self.detectors = DetectorSet()
        self.gauge = self.detectors.add(
            make_detector("TriageLag", kind="gauge_sustained", metric="lag", threshold=5.0)
        )
        self.board = ActiveAlerts()
        sink_spec, self.sink = actor_child("sink", Stuck, capacity=8, shutdown_s=1.0)
        inner = Supervisor(
            "inner", [ChildSpec(id="flaky", start=self._flaky, shutdown_s=1.0)],
            max_restarts=5, period_s=60.0, runtime=self.runtime,
        )  # fmt: skip
        self.root = Supervisor(
            "root", [sink_spec, inner.child_spec()], max_restarts=5, period_s=60.0,
            runtime=self.runtime,
        )  # fmt: skip
        self.dashboard = Dashboard(
            config, self.runtime, host="127.0.0.1", detectors=self.detectors,
            board=self.board, root=self.root,
        )  # fmt: skip

    async def _flaky(self, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        if self.crashes == 0:
            self.crashes += 1
            await trio.sleep(1.0)
            raise RuntimeError("first incarnation crashes")
        await trio.sleep_forever()


async def test_snapshot_shows_the_tree_breakers_bulkheads_detectors_and_alerts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = World(DashboardConfig(enabled=True))
    async with trio.open_nursery() as nursery:
        await nursery.start(world.root.run)
        for n in range(3):
            world.sink.tell_nowait(f"m{n}")
        await trio.sleep(2.0)  # flaky crashed at 1.0 and was restarted
        snap = world.dashboard.snapshot()
        tree = snap["tree"]
        assert list(tree) == ["root/sink", "root/inner", "root/inner/flaky"]
        assert tree["root/sink"]["kind"] == "actor"
        assert tree["root/sink"]["mailbox"] == 2  # one taken, two waiting
        assert tree["root/sink"]["mailbox_capacity"] == 8
        assert tree["root/inner"]["kind"] == "supervisor"
        flaky = tree["root/inner/flaky"]
        assert (flaky["state"], flaky["restarts"], flaky["depth"]) == ("running", 1, 1)
        assert len(flaky["restart_times"]) == 1  # the wall time of the one restart
        breaker = snap["breakers"]["ghasi"]
        assert breaker["state"] == "closed"
        assert breaker["settings"] == BREAKER
        assert snap["bulkheads"]["ghasi"] == {
            "name": "ghasi", "in_use": 0, "capacity": 4, "waiting": 0, "partitions": 0,
            "max_wait_s": 1.0,
        }  # fmt: skip
        assert snap["detectors"]["TriageLag"]["firing"] is False
        assert snap["detectors"]["TriageLag"]["value"] is None  # never evaluated
        assert snap["alerts"] == {}
        nursery.cancel_scope.cancel()


async def test_diff_carries_what_changed_and_applies_to_the_next_snapshot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    world = World(DashboardConfig(enabled=True))
    async with trio.open_nursery() as nursery:
        await nursery.start(world.root.run)
        await trio.sleep(0.5)
        first = world.dashboard.snapshot()
        assert diff(first, world.dashboard.snapshot())["set"] == {}

        world.breaker.force_open("test: by hand")
        world.breaker.retune(fail_max=7)  # a reload: the effective threshold shows
        world.bulkhead.retune(capacity=6, max_wait_s=2.0)  # and the effective capacity
        world.gauge.set(9.0)
        world.gauge.evaluate()
        world.board.fire(
            Alert(key="breaker:ghasi", kind="breaker", name="ghasi", since=1.0,
                  since_wall=2.0, state="forced-open")
        )  # fmt: skip
        second = world.dashboard.snapshot()
        change = diff(first, second)
        assert set(change["set"]) == {"breakers", "bulkheads", "detectors", "alerts"}
        assert change["del"] == {}
        ghasi = change["set"]["breakers"]["ghasi"]
        assert ghasi["state"] == "forced-open"
        assert ghasi["reason"] == "test: by hand"
        assert ghasi["settings"]["fail_max"] == 7
        bulkhead = change["set"]["bulkheads"]["ghasi"]
        assert (bulkhead["capacity"], bulkhead["max_wait_s"]) == (6, 2.0)
        assert change["set"]["detectors"]["TriageLag"]["firing"] is True
        assert change["set"]["detectors"]["TriageLag"]["value"] == 9.0
        assert apply(first, change) == second

        world.board.clear("breaker:ghasi")
        third = world.dashboard.snapshot()
        assert diff(second, third)["del"] == {"alerts": ["breaker:ghasi"]}
        assert apply(second, diff(second, third)) == third
        nursery.cancel_scope.cancel()


def test_page_is_told_the_websocket_port() -> None:
    html = page_html(4321).decode()
    assert '<meta name="triage-ws-port" content="4321">' in html
    assert "http://" not in html and "https://" not in html  # nothing from a CDN


async def upgrade(port: int | None, origin: str | None = None) -> tuple[str, bytes]:
    """A websocket handshake by hand: the status line (up to the reason) and the body.

    (trio-websocket's client leaves its socket open when the server rejects it, which
    this suite's ``filterwarnings = error`` turns into a failure at exit.)"""
    assert port is not None
    request = (
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        + (f"Origin: {origin}\r\n" if origin is not None else "")
        + "\r\n"
    )
    with trio.fail_after(5.0):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request.encode())
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
                head, end, body = data.partition(b"\r\n\r\n")
                if end and head.startswith(b"HTTP/1.1 101 "):
                    break  # accepted: websocket frames follow
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-length:")),
                    None,
                )  # fmt: skip
                if length is not None and len(body) >= length:
                    break
    return head.split(b"\r\n")[0].decode()[:13], body


async def receive(ws: Any) -> dict[str, Any]:
    with trio.fail_after(5.0):
        message: dict[str, Any] = json.loads(await ws.get_message())
    return message


async def test_websocket_sends_a_snapshot_then_diffs_and_bounds_its_clients() -> None:
    config = DashboardConfig(enabled=True, max_clients=1, interval_s=0.02)
    world = World(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(world.root.run)
        await nursery.start(world.dashboard.run)
        url = f"ws://127.0.0.1:{world.dashboard.port}/"
        async with open_websocket_url(url) as ws:
            first = await receive(ws)
            assert first["type"] == "snapshot"
            state = first["data"]
            assert state["breakers"]["ghasi"]["state"] == "closed"

            # The bound: a second client is refused while the first is connected.
            status, body = await upgrade(world.dashboard.port)
            assert status == "HTTP/1.1 503 "
            assert body == b"at most 1 dashboard clients"
            assert world.dashboard.refused == 1

            world.breaker.force_open("test: by hand")
            while state["breakers"]["ghasi"]["state"] != "forced-open":
                message = await receive(ws)
                assert message["type"] == "diff"
                assert set(message["data"]["set"]) <= {"breakers"}  # nothing else moved
                state = apply(state, message["data"])
            assert state["breakers"] == world.dashboard.snapshot()["breakers"]

        # The first client gone, its place is free again.
        with trio.fail_after(5.0):
            while world.dashboard.clients:  # noqa: ASYNC110  # the server notices the close
                await trio.sleep(0.01)
        async with open_websocket_url(url) as again:
            assert (await receive(again))["type"] == "snapshot"
        nursery.cancel_scope.cancel()


async def test_a_client_that_falls_behind_is_dropped_not_waited_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="triage.dashboard")
    config = DashboardConfig(enabled=True, max_clients=2, interval_s=60.0, client_queue=1)
    world = World(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(world.root.run)
        await nursery.start(world.dashboard.run)
        url = f"ws://127.0.0.1:{world.dashboard.port}/"
        async with open_websocket_url(url) as ws:
            assert (await receive(ws))["type"] == "snapshot"
            with trio.fail_after(5.0):
                while world.dashboard.clients != 1:  # noqa: ASYNC110  # the server accepts
                    await trio.sleep(0.01)
            # Three updates before the client's task runs: the first is handed to it,
            # the second waits in its queue of one, the third finds the queue full and
            # the broadcaster drops the client instead of waiting.
            world.dashboard.broadcast()
            world.dashboard.broadcast()
            assert world.dashboard.dropped == 0
            world.dashboard.broadcast()
            assert world.dashboard.dropped == 1
            assert world.dashboard.clients == 0
        whys = [
            getattr(r, "why", None) for r in caplog.records if r.msg == "dashboard client dropped"
        ]
        assert whys == ["updates piling up"]  # the queue: no send timed out
        nursery.cancel_scope.cancel()


def _dev_with(extra: str) -> Any:
    from config import load_config_text

    text = Path("config/dev.toml").read_text(encoding="utf-8")
    return load_config_text(text + extra, source="config/dashboard-test.toml")


def test_check_config_builds_the_tree_with_the_dashboard_and_refuses_a_taken_path() -> None:
    from config import ConfigError
    from supervisors.tree import check_config
    from tests.supervisors.test_daemon import shipped_catalog

    catalog = shipped_catalog()
    check_config(_dev_with("[dashboard]\nenabled = true\n"), catalog, "dev.toml")
    with pytest.raises(ConfigError) as taken:
        check_config(
            _dev_with('[dashboard]\nenabled = true\npath = "/v1/dispatches"\n'),
            catalog,
            "dev.toml",
        )
    assert [(p.path, p.message) for p in taken.value.problems] == [
        ("$.dashboard.path", "'/v1/dispatches' is already served by another route")
    ]
    with pytest.raises(ConfigError) as probe:
        _dev_with('[dashboard]\npath = "/metrics"\n')
    assert "one of the daemon's probes" in str(probe.value)


async def test_a_client_that_does_not_read_is_dropped_after_send_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="triage.dashboard")
    config = DashboardConfig(
        enabled=True, max_clients=2, interval_s=0.02, send_timeout_s=0.3, client_queue=1000
    )
    world = World(config)
    # Enough breakers that each update is large, all retuned on every round below.
    many = [
        Breaker(f"vendor-{n:03}-" + "x" * 40, **BREAKER, metrics=world.runtime.metrics)
        for n in range(300)
    ]
    async with trio.open_nursery() as nursery:
        await nursery.start(world.root.run)
        await nursery.start(world.dashboard.run)
        assert world.dashboard.port is not None
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 4096)
        await sock.connect(("127.0.0.1", world.dashboard.port))
        stream = trio.SocketStream(sock)
        async with stream:
            await stream.send_all(
                b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )  # and never reads a byte
            with trio.fail_after(10.0):
                fail_max = 3
                while world.dashboard.dropped == 0:
                    fail_max += 1
                    for breaker in many:
                        breaker.retune(fail_max=fail_max)
                    await trio.sleep(0.02)
            assert world.dashboard.dropped == 1
            assert world.dashboard.clients == 0
        whys = [
            getattr(r, "why", None) for r in caplog.records if r.msg == "dashboard client dropped"
        ]
        assert "a send took over 0.3s" in whys  # the send timed out: not the queue
        nursery.cancel_scope.cancel()


async def test_a_page_from_another_origin_is_refused() -> None:
    world = World(DashboardConfig(enabled=True))
    async with trio.open_nursery() as nursery:
        await nursery.start(world.root.run)
        await nursery.start(world.dashboard.run)
        status, body = await upgrade(world.dashboard.port, origin="http://evil.example")
        assert status == "HTTP/1.1 403 "
        assert body == b"origin 'http://evil.example' is not this host's"
        # The daemon's own page (same host; no HTTP server here to compare ports with).
        status, _ = await upgrade(world.dashboard.port, origin="http://127.0.0.1:8080")
        assert status == "HTTP/1.1 101 "
        nursery.cancel_scope.cancel()


def test_origin_must_be_the_daemons_page() -> None:
    world = World(DashboardConfig(enabled=True))

    class Http:
        port = 8080

    world.dashboard.http = Http()  # type: ignore[assignment]
    refused = world.dashboard.origin_refused
    host = "10.0.0.5:9000"
    assert refused([], host) is None  # no Origin: not a browser
    assert refused([(b"Origin", b"http://10.0.0.5:8080")], host) is None
    assert refused([(b"origin", b"http://10.0.0.5:8081")], host) == (
        "origin 'http://10.0.0.5:8081' is not the daemon's page (port 8080)"
    )
    assert refused([(b"Origin", b"http://10.0.0.6:8080")], host) == (
        "origin 'http://10.0.0.6:8080' is not this host's"
    )
    assert refused([(b"Origin", b"null")], host) == "origin 'null' is not this host's"
