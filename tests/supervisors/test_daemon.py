"""The daemon: wiring, probes, readiness, drain, JSON logs, and `triage run` as a process."""

from __future__ import annotations

import gc
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry

from actors.alerts import ActiveAlerts
from config import (
    Catalog,
    ConfigError,
    TriageConfig,
    default_path,
    load_catalog,
    load_catalog_text,
    load_config_text,
)
from engine.metrics import Metrics
from engine.runtime import open_runtime
from engine.supervisor import ChildSpec, Supervisor
from supervisors.cli import main
from supervisors.daemon import Daemon
from supervisors.logging import JsonFormatter, json_logging
from supervisors.tree import Readiness, build_detectors, build_tree, detector_name
from supervisors.vocabulary import METRICS, MITIGATIONS

REPO = Path(__file__).resolve().parents[2]


def _standalone_dev_text() -> str:
    """dev.toml (an overlay) as a text that loads from anywhere: its base named by an
    absolute path, and the keys the tests rewrite (``catalog``, ``port``,
    ``daemon_role``) written out."""
    text = default_path("dev.toml").read_text()
    extends = 'extends = "default.toml"'
    assert text.count(extends) == 1 and text.count("[daemon]\n") == 1
    base = json.dumps(str(default_path("default.toml")))
    catalog = json.dumps(str(default_path("failures.toml")))
    text = text.replace(extends, f"extends = {base}\ncatalog = {catalog}")
    assert "[database]" not in text
    text += '\n[database]\ndaemon_role = "triage_daemon"\n'
    return text.replace("[daemon]\n", "[daemon]\nport = 8080\n")


DEV_TEXT = _standalone_dev_text()
DEFAULT_TEXT = default_path("default.toml").read_text()


def dev_config(**daemon: object) -> TriageConfig:
    """dev.toml with port 0 and the given ``[daemon]`` keys replaced."""
    text = re.sub(r"(?m)^port = 8080$", "port = 0", DEV_TEXT)
    for key, value in daemon.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {json.dumps(value)}", text)
    return load_config_text(text, source="dev-test.toml")


def shipped_catalog() -> Catalog:
    return load_catalog(default_path("failures.toml"), metrics=METRICS, mitigations=MITIGATIONS)


class Running:
    """A daemon run in a nursery; ``code`` is its exit status once ``done`` is set."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.code: int | None = None
        self.done = trio.Event()
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            self.code = await self.daemon.run(task_status=task_status)
        finally:
            self.done.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start(nursery: trio.Nursery, daemon: Daemon) -> Running:
    running = Running(daemon)
    running.port = await nursery.start(running.run)
    return running


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("triage.")]


# ------------------------------------------------------------------ in process


async def test_daemon_serves_probes_and_metrics_then_drains(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    daemon = Daemon(dev_config(), shipped_catalog(), handle_signals=False)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, daemon)
        assert running.port == daemon.port and running.port > 0
        async with httpx.AsyncClient(base_url=running.url) as client:
            livez = await client.get("/livez")
            assert (livez.status_code, livez.json()) == (200, {"status": "ok"})
            readyz = await client.get("/readyz")
            assert (readyz.status_code, readyz.json()) == (200, {"status": "ready", "alerts": []})
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            # recorder (dev.toml records the what-if inputs), alerts, detectors, http
            assert 'triage_supervisor_children{supervisor="root"} 4.0' in metrics.text
            assert 'triage_mailbox_depth{actor="alerts"} 0.0' in metrics.text
            assert "# TYPE triage_breaker_state gauge" in metrics.text
            assert "process_cpu_seconds_total" in metrics.text or sys.platform != "linux"
        t0 = trio.current_time()
        daemon.request_drain("test")
        with trio.fail_after(dev_config().daemon.drain_s):
            await running.done.wait()
    assert running.code == 0
    assert trio.current_time() - t0 < dev_config().daemon.drain_s
    log = messages(caplog)
    assert log[0] == "starting"
    live = ",".join(str(n) for n in range(1, 21))  # every row built
    assert log[1] == f"catalog: 20/20 rows live; live: {live}"
    order = ["http listening", "ready", "draining", "http stopped", "drained", "stopped"]
    assert [m for m in log if m in order] == order


async def test_readyz_turns_503_before_the_server_stops() -> None:
    grace_s = 0.5
    config = dev_config(drain_s=3.0)
    daemon = Daemon(config, shipped_catalog(), handle_signals=False, drain_grace_s=grace_s)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, daemon)
        async with httpx.AsyncClient(base_url=running.url) as client:
            assert (await client.get("/readyz")).status_code == 200
            t0 = trio.current_time()
            daemon.request_drain("test")
            # Unready at once, while the listener still serves (for the grace period).
            readyz = await client.get("/readyz")
            assert readyz.status_code == 503
            assert readyz.json() == {"status": "not_ready", "reason": "draining", "alerts": []}
            assert (await client.get("/livez")).status_code == 200
            assert trio.current_time() - t0 < grace_s
            assert not running.done.is_set()
            with trio.fail_after(config.daemon.drain_s):
                await running.done.wait()
            elapsed = trio.current_time() - t0
            assert grace_s <= elapsed < config.daemon.drain_s
            with pytest.raises(httpx.ConnectError):
                await client.get("/readyz")
    assert running.code == 0
    assert daemon.readiness is not None
    assert daemon.readiness.readiness()[1]["reason"] == "stopped"


async def test_a_drain_requested_during_start_runs_once_started(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    daemon = Daemon(dev_config(), shipped_catalog(), handle_signals=False)
    daemon.request_drain("early")
    daemon.request_drain("again")
    with trio.fail_after(5):
        assert await daemon.run() == 0
    log = messages(caplog)
    assert "ready" not in log
    assert "drain already in progress" in log
    assert log[-1] == "stopped"
    assert caplog.records[-1].__dict__["reason"] == "early"


def _clear_frames(exc: BaseException) -> None:
    """Drop the locals of every frame in ``exc``'s tracebacks, groups and chains included."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)


async def test_a_port_in_use_fails_the_start(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = re.sub(r"(?m)^port = 8080$", f"port = {port}", DEV_TEXT)
        daemon = Daemon(load_config_text(text), shipped_catalog(), handle_signals=False)
        with trio.fail_after(5):
            assert await daemon.run() == 1
    failed = [r for r in caplog.records if r.getMessage() == "daemon failed"]
    assert failed and failed[0].levelno == logging.CRITICAL
    assert "Address already in use" in JsonFormatter(lambda: 0.0).format(failed[0])
    assert messages(caplog)[-1] == "stopped"
    # hypercorn 0.18 does not close the socket whose bind failed: the logged
    # traceback keeps it alive. Let it go here, where its ResourceWarning is
    # expected, rather than in some later test.
    del failed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        for record in caplog.records:
            if record.exc_info and record.exc_info[1] is not None:
                _clear_frames(record.exc_info[1])
        gc.collect()


async def test_a_config_error_while_wiring_exits_2_with_its_path(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine constructor's ConfigError (no file, no path) met while building the
    tree is reported as config, one line with the file and a TOML path, and exit 2:
    not "daemon failed" (exit 1) with a traceback."""
    caplog.set_level(logging.INFO)

    def refusing(*args: object, **kwargs: object) -> None:
        raise ConfigError("detector 'x': window_s must be > 0")

    monkeypatch.setattr("supervisors.daemon.build_tree", refusing)
    daemon = Daemon(dev_config(), shipped_catalog(), source="x.toml", handle_signals=False)
    with trio.fail_after(5):
        assert await daemon.run() == 2
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert [r.getMessage() for r in critical] == [
        "config invalid: x.toml: $: detector 'x': window_s must be > 0"
    ]
    assert all(r.exc_info is None for r in caplog.records)
    assert "daemon failed" not in messages(caplog)
    assert messages(caplog)[-1] == "stopped"


async def test_tree_wiring_from_config() -> None:
    config = dev_config()
    async with open_runtime(seed=1, metrics=Metrics(CollectorRegistry())) as runtime:
        tree = build_tree(config, shipped_catalog(), runtime)
        # The input recorder first (it takes the others' inputs from their start, and
        # stops last, with a final flush), as dev.toml enables it.
        assert [spec.id for spec in tree.root.specs] == ["recorder", "alerts", "detectors", "http"]
        assert [spec.restart.value for spec in tree.root.specs] == [
            "permanent",
            "permanent",
            "permanent",
            "transient",
        ]
        assert tree.recorder is not None and runtime.tunables.recorder is tree.recorder
        assert str(tree.recorder.path) == config.recorder.path
        root = config.supervisors["root"]
        assert (tree.root.max_restarts, tree.root.period_s, tree.root.shutdown_s) == (
            root.max_restarts,
            root.period_s,
            root.shutdown_s,
        )
        # No catalog row is built into this tree: only the config's own detectors run.
        assert sorted(d.name for d in tree.detectors) == sorted(config.detectors)
        assert tree.http.graceful_timeout_s == config.daemon.drain_s
        tree.unsubscribe()


async def test_built_rows_and_config_detectors_are_evaluated() -> None:
    text = default_path("failures.toml").read_text()
    text = text.replace("built = false", "built = true", 1)  # row 1
    catalog = load_catalog_text(text, metrics=METRICS, mitigations=MITIGATIONS)
    extra = DEV_TEXT + (
        '\n[detectors.extra]\nkind = "rate"\nmetric = "triage_dlr_callbacks_total"\n'
        "threshold = 100.0\nwindow_s = 10.0\nbuckets = 10\n"
    )
    config = load_config_text(extra)
    async with open_runtime(seed=1, metrics=Metrics(CollectorRegistry())) as runtime:
        detectors = build_detectors(config, [catalog.row(1)], runtime)
        row = catalog.row(1)
        assert [d.name for d in detectors] == [detector_name(row), *config.detectors]
        assert "extra" in config.detectors
        assert detectors[detector_name(row)].row == 1
        assert detectors[detector_name(row)].threshold == row.detector.threshold
        assert detectors["extra"].row is None


async def test_a_config_without_the_trees_profiles_is_refused() -> None:
    text = DEFAULT_TEXT.replace("[mailboxes.alerts]", "[mailboxes.alerts_gone]")
    assert text != DEFAULT_TEXT
    with pytest.raises(ConfigError) as info:
        Daemon(load_config_text(text, source="x.toml"), shipped_catalog(), source="x.toml")
    (problem,) = info.value.problems
    assert (problem.source, problem.path) == ("x.toml", "$.mailboxes.alerts")


async def test_readiness_names_a_restarting_child(autojump_clock: trio.abc.Clock) -> None:
    crash = trio.Event()

    async def flaky(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await crash.wait()
        raise RuntimeError("boom")

    async def steady(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    async with open_runtime(seed=1) as runtime:
        sup = Supervisor(
            "root",
            [ChildSpec("steady", steady), ChildSpec("flaky", flaky)],
            backoff_min_s=1.0,
            backoff_max_s=1.0,
            runtime=runtime,
        )
        readiness = Readiness(ActiveAlerts())
        readiness.watch(sup)
        assert readiness.readiness() == (
            False,
            {"status": "not_ready", "reason": "starting", "alerts": []},
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            readiness.mark_running()
            assert readiness.readiness() == (True, {"status": "ready", "alerts": []})
            crash.set()
            await trio.sleep(0.5)  # inside the 1 s backoff
            ready, body = readiness.readiness()
            assert not ready
            assert body == {
                "status": "not_ready",
                "reason": "children",
                "children": [{"supervisor": "root", "child": "flaky", "state": "restarting"}],
                "alerts": [],
            }
            crash = trio.Event()
            await trio.sleep(1.0)
            assert readiness.readiness()[0]
            readiness.begin_drain()
            assert readiness.readiness()[1]["reason"] == "draining"
            readiness.mark_running()  # too late: draining is for good
            assert readiness.readiness()[1]["reason"] == "draining"
            nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ logging


def test_json_lines_carry_ts_from_the_wall_clock_level_logger_msg_and_extras() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("triage.test")
    with json_logging("info", wall=lambda: 1234.5, stream=stream):
        logger.debug("hidden")
        logger.info("hello %s", "world", extra={"port": 8080, "value": math.nan, "obj": object})
        try:
            raise ValueError("bad")
        except ValueError:
            logger.exception("failed")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0] == {
        "ts": 1234.5,
        "level": "info",
        "logger": "triage.test",
        "msg": "hello world",
        "port": 8080,
        "value": None,
        "obj": str(object),
    }
    assert lines[1]["level"] == "error"
    assert "ValueError: bad" in lines[1]["exc"]
    assert len(lines) == 2


def test_json_logging_restores_the_root_logger() -> None:
    root = logging.getLogger()
    before = (root.handlers[:], root.level)
    with json_logging("debug", wall=lambda: 0.0, stream=io.StringIO()) as handler:
        assert root.handlers == [handler]
        assert root.level == logging.DEBUG
    assert (root.handlers, root.level) == before
    with (
        pytest.raises(ValueError, match="unknown log level"),
        json_logging("loud", wall=lambda: 0.0),
    ):
        pass


def test_the_formatter_keeps_one_record_on_one_line() -> None:
    record = logging.LogRecord("triage.x", logging.INFO, __file__, 1, "a\nb", None, None)
    line = JsonFormatter(lambda: 1.0).format(record)
    assert "\n" not in line
    assert json.loads(line)["msg"] == "a\nb"


# ------------------------------------------------------------------ the command


def test_run_with_a_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(DEV_TEXT.replace("drain_s = 5.0", "drain_s = -1.0"))
    assert main(["run", "--config", str(bad)]) == 2
    assert "$.daemon.drain_s" in capsys.readouterr().err


def _config_file(tmp_path: Path) -> Path:
    text = re.sub(r"(?m)^port = 8080$", "port = 0", DEV_TEXT)
    text = re.sub(
        r"(?m)^catalog = .*$", f"catalog = {json.dumps(str(default_path('failures.toml')))}", text
    )
    path = tmp_path / "triage.toml"
    path.write_text(text)
    return path


class Lines:
    """Complete lines read from a stream, and a way to wait for one."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._changed = trio.Event()

    async def read(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        while chunk := await stream.receive_some():
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            if complete:
                self.lines.extend(line.decode() for line in complete)
                self._changed.set()
                self._changed = trio.Event()
        if buffer:
            self.lines.append(buffer.decode())

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            for line in self.lines:
                entry: dict[str, Any] = json.loads(line)
                if predicate(entry):
                    return entry
            await self._changed.wait()


async def test_triage_run_as_a_process_drains_on_sigterm(tmp_path: Path) -> None:
    config = _config_file(tmp_path)
    stderr = Lines()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "supervisors.cli", "run", "--config", str(config)]
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                cwd=REPO,
                env=env,
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
        assert process.stderr is not None
        nursery.start_soon(stderr.read, process.stderr)
        with trio.fail_after(30):
            listening = await stderr.wait_for(lambda e: e["msg"] == "http listening")
            url = f"http://127.0.0.1:{listening['port']}"
            async with httpx.AsyncClient(base_url=url) as client:
                while True:
                    try:
                        response = await client.get("/readyz")
                    except httpx.TransportError:
                        response = None
                    if response is not None and response.status_code == 200:
                        break
                    await trio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            code = await process.wait()
    assert code == 0
    entries = [json.loads(line) for line in stderr.lines]  # every stderr line is one JSON object
    for entry in entries:
        assert {"ts", "level", "logger", "msg"} <= entry.keys()
    msgs = [e["msg"] for e in entries]
    assert msgs.index("ready") < msgs.index("draining") < msgs.index("stopped")
    draining = entries[msgs.index("draining")]
    assert draining["reason"] == "SIGTERM"
    stopped = entries[-1]
    assert (stopped["msg"], stopped["exit_code"]) == ("stopped", 0)
