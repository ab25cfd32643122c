"""The hot reload (issue 12): a Reloader on a real config file (on the autojump clock,
with exact values), its watch of every file the config is read from, then ``triage run``
as a process reloading on SIGHUP and on an edit of its base file."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
from prometheus_client import CollectorRegistry

from actors.error_budget import BudgetReport, budget_report
from config import default_path, load_config
from config.schema import SloConfig
from engine.breaker import CircuitState
from engine.bulkhead import BulkheadStatistics
from engine.detectors import CountInWindowDetector, DetectorSet
from engine.events import Event, ReloadFailed
from engine.metrics import Metrics
from engine.runtime import Runtime
from providers.db.slo import DayCount
from supervisors.backbone import _breaker
from supervisors.channels import _guard
from supervisors.reload import Reloader, classify
from supervisors.tree import build_detectors
from tests.engine.test_breaker import fail_n
from tests.supervisors.test_daemon import DEV_TEXT, REPO, Lines, shipped_catalog

VIRTUAL_METRIC = "triage_virtual_session_failed_total"  # a count_in_window row: 5 in 300 s


class World:
    """A base file (dev.toml, standalone), an overlay the test edits, and a Reloader on it
    with the postgres_primary breaker and the virtual-sessions row's detector."""

    def __init__(self, tmp_path: Path, budget: Any = None) -> None:
        self.base = tmp_path / "base.toml"
        self.base.write_text(DEV_TEXT)
        self.path = tmp_path / "triage.toml"
        self.write("")
        config = load_config(self.path)
        catalog = shipped_catalog()
        self.registry = CollectorRegistry()
        self.runtime = Runtime(metrics=Metrics(self.registry))
        self.events: list[Event] = []
        self.runtime.events.on(ReloadFailed, self.events.append)
        self.breaker = _breaker(config, "postgres_primary", self.runtime)
        [row] = [r for r in catalog.rows if r.detector.metric == VIRTUAL_METRIC]
        self.detectors = build_detectors(config, [row], self.runtime, catalog)
        [detector] = self.detectors
        self.detector = detector.expect(CountInWindowDetector)
        self.reloader = Reloader(
            config, catalog, self.runtime, self.detectors, source=str(self.path), budget=budget
        )

    def write(self, text: str) -> None:
        self.path.write_text(f"extends = {json.dumps(str(self.base))}\n{text}")

    def write_base(self, text: str) -> None:
        """The base file: dev.toml (standalone) with ``text`` after it."""
        self.base.write_text(f"{DEV_TEXT}\n{text}")

    def reloads(self, result: str) -> float | None:
        return self.registry.get_sample_value("triage_config_reloads_total", {"result": result})


async def test_a_half_open_breaker_stays_half_open_with_its_new_thresholds(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    world = World(tmp_path)
    breaker = world.breaker
    assert breaker.settings()["fail_max"] == 3
    await fail_n(breaker, 3)
    await trio.sleep(5.0)  # dev's reset_timeout_s
    assert breaker.state is CircuitState.HALF_OPEN
    trips = breaker.statistics().trips
    world.write("[breakers.postgres_primary]\nfail_max = 7\nreset_timeout_s = 9.0\n")
    report = await world.reloader.reload()
    assert report.ok and report.restart == [] and report.problems == []
    assert report.applied == [
        "breaker postgres_primary: fail_max 3 -> 7",
        "breaker postgres_primary: reset_timeout_s 5.0 -> 9.0",
    ]
    assert [str(c) for c in report.changes] == [
        "$.breakers.postgres_primary.fail_max: 3 -> 7 (live)",
        "$.breakers.postgres_primary.reset_timeout_s: 5.0 -> 9.0 (live)",
        "$.breakers.postgres_replica.fail_max: 3 -> 7 (live)",  # its base is postgres_primary
        "$.breakers.postgres_replica.reset_timeout_s: 5.0 -> 9.0 (live)",
    ]
    assert breaker.state is CircuitState.HALF_OPEN  # never dropped to CLOSED by a reload
    assert breaker.statistics().trips == trips
    assert (
        breaker.fail_max == 7 and world.reloader.config.breakers["postgres_primary"].fail_max == 7
    )
    assert world.reloads("ok") == 1.0 and world.reloads("failed") == 0.0
    # The same file again: nothing to change, nothing said.
    again = await world.reloader.reload()
    assert again.ok and again.changes == [] and again.applied == []


async def test_a_bad_file_is_refused_with_its_path_and_the_running_config_stays(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="triage.reload")
    world = World(tmp_path)
    running = world.reloader.config
    before = world.breaker.settings(), world.detector.settings()
    world.path.write_text("[breakers.postgres_primary\nfail_max = 7\n")  # malformed TOML
    report = await world.reloader.reload()
    assert not report.ok
    [problem] = report.problems
    assert problem.startswith(f"{world.path}:1") and "malformed TOML" in problem
    # A value the schema refuses, next to a good one: neither applies.
    world.write("[breakers.postgres_primary]\nfail_max = 0\nreset_timeout_s = 9.0\n")
    report = await world.reloader.reload()
    assert not report.ok
    [problem] = report.problems
    assert (
        problem.startswith(f"{world.path}:3") and "$.breakers.postgres_primary.fail_max" in problem
    )
    assert (world.breaker.settings(), world.detector.settings()) == before
    assert world.reloader.config is running
    assert [type(e) for e in world.events] == [ReloadFailed, ReloadFailed]
    assert world.events[-1].problems == report.problems  # type: ignore[attr-defined]
    assert world.reloads("failed") == 2.0 and world.reloads("ok") == 0.0
    failed = [r.getMessage() for r in caplog.records if r.msg.startswith("config reload failed")]
    assert len(failed) == 2 and "$.breakers.postgres_primary.fail_max" in failed[1]
    assert msgspec.json.encode(ReloadFailed(at=0, wall=0, source="f", problems=[])).startswith(
        b'{"type":"reload_failed"'
    )


async def test_a_reshaped_detector_window_is_migrated_and_said_so(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    world = World(tmp_path)
    detector = world.detector
    assert (detector.threshold, detector.window_s) == (5.0, 300.0)
    detector.observe(2)
    await trio.sleep(10.0)
    detector.observe(1)
    world.write(
        f'[detectors.virtual]\nkind = "count_in_window"\nmetric = "{VIRTUAL_METRIC}"\n'
        "threshold = 2.5\nwindow_s = 600.0\n"
    )
    with caplog.at_level(logging.WARNING, logger="triage.reload"):
        report = await world.reloader.reload()
    assert report.ok
    name = detector.name
    assert report.restart == []  # a row's override, added: the row's detector takes it
    assert report.applied == [
        f"detector {name}: threshold 5.0 -> 2.5",
        f"detector {name}: clear_threshold 5.0 -> 2.5",
        f"detector {name}: window_s 300.0 -> 600.0",
        f"detector {name}: window reshaped to 600.0s in 60 buckets; 3 of 3 counted events kept",
    ]
    assert report.migrated == report.applied[-1:]
    assert any(r.msg.startswith("window reshaped") for r in caplog.records)
    state = detector.evaluate()
    assert state.value == 3.0 and state.firing  # the 3 counts kept: above the new 2.5


async def test_paths_that_need_a_restart_are_reported_not_applied(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    world = World(tmp_path)
    world.write(
        "[daemon]\nport = 9191\nreload_poll_s = 0.5\n[breakers.postgres_primary]\nfail_max = 4\n"
    )
    report = await world.reloader.reload()
    assert report.ok and report.restart == ["$.daemon.port"]
    assert report.applied == ["breaker postgres_primary: fail_max 3 -> 4"]
    config = world.reloader.config
    assert (config.daemon.port, config.daemon.reload_poll_s) == (8080, 0.5)
    assert classify("$.breakers.x.fail_max") == "live" and classify("$.daemon.host") == "restart"


@contextmanager
def clock_held(clock: trio.testing.MockClock) -> Iterator[None]:
    """No autojump while a reload's checks run in their thread: a task sleeping beside
    it (a call in flight, the poll) would otherwise wake at its deadline meanwhile."""
    clock.autojump_threshold = math.inf
    try:
        yield
    finally:
        clock.autojump_threshold = 0


class Asked:
    """The poll's reload requests, each with the virtual time it came at."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, float]] = []

    def __call__(self, trigger: str) -> None:
        self.requests.append((trigger, trio.current_time()))


async def test_the_poll_sees_an_edit_of_the_file(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    world = World(tmp_path)
    assert world.reloader.watched == (
        world.path, world.base, default_path("default.toml"), default_path("failures.toml")
    )  # fmt: skip
    asked = Asked()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(world.reloader.poll, asked)
        await trio.sleep(5.0)
        assert asked.requests == []
        world.write("[breakers.postgres_primary]\nfail_max = 4\n")
        await trio.sleep(2.5)  # dev's reload_poll_s is the default 2.0: a look at 6.0
        assert asked.requests == [(f"file changed: {world.path}", 6.0)]
        # The same size, the same mtime (an edit within one tick of the file system's
        # clock): the content tells. A touch alone changes nothing.
        stat = world.path.stat()
        world.write("[breakers.postgres_primary]\nfail_max = 5\n")
        os.utime(world.path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert world.path.stat().st_size == stat.st_size
        await trio.sleep(2.0)
        os.utime(world.base)
        await trio.sleep(4.0)
        assert asked.requests == [
            (f"file changed: {world.path}", 6.0),
            (f"file changed: {world.path}", 8.0),
        ]
        nursery.cancel_scope.cancel()


async def test_an_edit_of_the_base_file_reloads_as_one_of_the_top_file(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    world = World(tmp_path)
    assert world.breaker.fail_max == 3
    await fail_n(world.breaker, 2)  # two failures counted: kept across the reload
    asked = Asked()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(world.reloader.poll, asked)
        await trio.sleep(3.0)
        world.write_base("[breakers.postgres_primary]\nfail_max = 4\n")
        await trio.sleep(1.5)
        assert asked.requests == [(f"file changed: {world.base}", 4.0)]
        with clock_held(autojump_clock):
            report = await world.reloader.reload(asked.requests[-1][0])
        assert report.ok and report.restart == []
        assert report.applied == ["breaker postgres_primary: fail_max 3 -> 4"]
        assert world.breaker.fail_max == 4 and world.breaker.statistics().consecutive_failures == 2
        # The top file still wins over its base: an overlay of 6 over a base of 7 is 6.
        world.write("[breakers.postgres_primary]\nfail_max = 6\n")
        world.write_base("[breakers.postgres_primary]\nfail_max = 7\n")
        await trio.sleep(2.0)
        assert asked.requests[1:] == [(f"file changed: {world.path}", 6.0)]
        with clock_held(autojump_clock):
            report = await world.reloader.reload(asked.requests[-1][0])
        assert report.applied == ["breaker postgres_primary: fail_max 4 -> 6"]
        await fail_n(world.breaker, 4)  # the 6th failure in a row trips it
        assert world.breaker.state is CircuitState.OPEN
        nursery.cancel_scope.cancel()


async def test_a_configmap_symlink_swap_is_seen(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The kubelet's layout: site/triage.toml -> ..data/triage.toml, ..data -> a
    timestamped directory, swapped for a new one by a rename of a new link; the overlay
    extends ../default.toml beside the mount (the image's)."""
    image = tmp_path / "etc"
    site = image / "site"
    site.mkdir(parents=True)
    (image / "default.toml").write_text(DEV_TEXT)

    def publish(stamp: str, text: str) -> None:
        data = site / stamp
        data.mkdir()
        (data / "triage.toml").write_text(f'extends = "../default.toml"\n{text}')
        os.symlink(stamp, site / "..data_tmp")
        os.replace(site / "..data_tmp", site / "..data")

    publish("..2024_05_01_10_00_00.1", "")
    os.symlink("..data/triage.toml", site / "triage.toml")
    source = site / "triage.toml"
    config, runtime = load_config(source), Runtime()
    breaker = _breaker(config, "postgres_primary", runtime)
    reloader = Reloader(config, shipped_catalog(), runtime, DetectorSet(), source=str(source))
    assert reloader.watched[:2] == (source, site / "../default.toml")
    link = os.lstat(source)
    asked = Asked()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reloader.poll, asked)
        await trio.sleep(3.0)
        publish("..2024_05_01_10_05_00.2", "[breakers.postgres_primary]\nfail_max = 5\n")
        shutil.rmtree(site / "..2024_05_01_10_00_00.1")  # the kubelet removes the old one
        assert os.lstat(source).st_mtime_ns == link.st_mtime_ns  # the link itself: untouched
        await trio.sleep(1.5)
        assert asked.requests == [(f"file changed: {source}", 4.0)]
        with clock_held(autojump_clock):
            report = await reloader.reload(asked.requests[-1][0])
        assert report.ok and report.applied == ["breaker postgres_primary: fail_max 3 -> 5"]
        assert breaker.fail_max == 5
        nursery.cancel_scope.cancel()


async def test_an_edit_of_the_catalog_it_names_reloads_its_detectors(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    world = World(tmp_path)
    catalog = tmp_path / "failures.toml"
    row = 'metric = "triage_virtual_session_failed_total", threshold = 5, window_s = 300 }'
    shipped = default_path("failures.toml").read_text()
    assert shipped.count(row) == 1
    catalog.write_text(shipped)
    world.write(f"catalog = {json.dumps(str(catalog))}\n")
    with clock_held(autojump_clock):
        report = await world.reloader.reload()
    assert report.ok and report.applied == []
    assert world.reloader.watched[-1] == catalog  # the watch follows the config's catalog
    asked = Asked()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(world.reloader.poll, asked)
        await trio.sleep(1.0)
        catalog.write_text(shipped.replace(row, row.replace("threshold = 5", "threshold = 3")))
        await trio.sleep(1.5)
        assert asked.requests == [(f"file changed: {catalog}", 2.0)]
        with clock_held(autojump_clock):
            report = await world.reloader.reload(asked.requests[-1][0])
        name = world.detector.name
        assert report.applied == [
            f"detector {name}: threshold 5.0 -> 3.0",
            f"detector {name}: clear_threshold 5.0 -> 3.0",
        ]
        assert world.detector.threshold == 3.0
        nursery.cancel_scope.cancel()


async def test_a_bulkhead_capacity_changes_live_with_its_calls_in_flight_kept(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    world = World(tmp_path)
    world.write("[bulkheads.sms]\ncapacity = 2\npartition_capacity = 2\nmax_wait_s = 60.0\n")
    config = load_config(world.path)
    guard, _ = _guard(config, "ghasi", world.runtime)  # sms_primary's guard: [bulkheads.sms]
    bulkhead = guard.bulkhead
    assert world.runtime.tunables.bulkheads() == {"sms": (bulkhead,)}
    world.reloader.config = config
    log: list[tuple[str, float]] = []

    async def call(name: str, seconds: float) -> None:
        async with bulkhead.acquire():
            log.append((name, trio.current_time()))
            await trio.sleep(seconds)

    def edit(capacity: int) -> None:
        world.write(
            f"[bulkheads.sms]\ncapacity = {capacity}\npartition_capacity = 1\nmax_wait_s = 60.0\n"
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(call, "a", 10.0)
        nursery.start_soon(call, "b", 20.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, "w1", 5.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(call, "w2", 5.0)
        await trio.sleep(1.0)
        assert bulkhead.statistics() == BulkheadStatistics(
            in_use=2, capacity=2, waiting=2, partitions=0
        )
        edit(3)
        with clock_held(autojump_clock):
            report = await world.reloader.reload()
        assert report.ok and report.restart == []
        assert [str(c) for c in report.changes] == [
            "$.bulkheads.sms.capacity: 2 -> 3 (live)",
            "$.bulkheads.sms.partition_capacity: 2 -> 1 (live)",
        ]
        assert report.applied == [
            "bulkhead ghasi: capacity 2 -> 3",
            "bulkhead ghasi: partition_capacity 2 -> 1",
        ]
        await trio.testing.wait_all_tasks_blocked()
        assert bulkhead.statistics() == BulkheadStatistics(
            in_use=3, capacity=3, waiting=1, partitions=0
        )  # w1 entered at once, a and b kept
        assert world.reloader.config.bulkheads["sms"].capacity == 3
        edit(1)
        with clock_held(autojump_clock):
            report = await world.reloader.reload()
        assert report.applied == ["bulkhead ghasi: capacity 3 -> 1"]
        assert bulkhead.statistics() == BulkheadStatistics(
            in_use=3, capacity=1, waiting=1, partitions=0
        )  # nothing cancelled
        metrics = world.registry
        labels = {"bulkhead": "ghasi", "setting": "capacity"}
        assert metrics.get_sample_value("triage_bulkhead_setting", labels) == 1.0
    # w1 left at 6, a at 10, b at 20: only then is fewer than 1 in flight, and w2 enters.
    assert sorted(log, key=lambda e: (e[1], e[0])) == [
        ("a", 0.0), ("b", 0.0), ("w1", 1.0), ("w2", 20.0),
    ]  # fmt: skip
    assert trio.current_time() == 25.0
    assert world.reloader.config.bulkheads["sms"].capacity == 1


def _frozen(config: SloConfig, *, today: date) -> BudgetReport:
    days = [DayCount("dispatch_success", today - timedelta(days=1), 90, 10)]
    report = budget_report(config, days, (), today=today)
    assert report.frozen
    return report


async def test_a_frozen_budget_refuses_an_adapter_change_and_applies_the_rest(
    tmp_path: Path, autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def frozen(config: SloConfig, *, today: date) -> BudgetReport:
        return _frozen(config, today=today)

    world = World(tmp_path, budget=frozen)
    world.write(
        "[providers.ghasi]\nreceipt_tolerance_s = 120.0\n[breakers.postgres_primary]\nfail_max = 4\n"
    )
    report = await world.reloader.reload()
    assert report.ok
    [refused] = report.refused
    assert refused.startswith(
        "$.providers.ghasi.receipt_tolerance_s: changed while the error budget is frozen"
    )
    assert "dispatch_success burned" in refused and "TRIAGE_BREAK_GLASS" in refused
    assert report.restart == []  # refused, not "needs a restart"
    assert report.applied == ["breaker postgres_primary: fail_max 3 -> 4"]


# ------------------------------------------------------------------ triage run, SIGHUP


def _sample(metrics: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.search(rf"(?m)^{name}\{{{re.escape(want)}\}} (\S+)$", metrics)
    return None if found is None else float(found.group(1))


async def _wait_sample(
    client: httpx.AsyncClient, want: float, name: str, **labels: str
) -> tuple[float, str]:
    """Poll /metrics until the sample is ``want``; (seconds it took, the last text)."""
    begun = trio.current_time()
    while True:
        text = (await client.get("/metrics")).text
        if _sample(text, name, **labels) == want:
            return trio.current_time() - begun, text
        await trio.sleep(0.01)


async def test_triage_run_reloads_on_sighup_and_refuses_a_bad_edit(tmp_path: Path) -> None:
    base = tmp_path / "base.toml"
    text = re.sub(r"(?m)^port = 8080$", "port = 0", DEV_TEXT)
    base.write_text(text)
    config = tmp_path / "triage.toml"
    head = f"extends = {json.dumps(str(base))}\n[daemon]\nreload_poll_s = 0.0\n"
    config.write_text(head)
    stderr = Lines()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "supervisors.cli", "run", "--config", str(config)]
    primary = {"breaker": "postgres_primary"}
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
        with trio.fail_after(60):
            ready = await stderr.wait_for(lambda e: e["msg"] == "ready")
        url = f"http://127.0.0.1:{ready['port']}"
        async with httpx.AsyncClient(base_url=url) as client:
            metrics = (await client.get("/metrics")).text
            assert _sample(metrics, "triage_breaker_setting", **primary, setting="fail_max") == 3.0
            calls = _sample(metrics, "triage_breaker_window_calls", **primary)
            assert calls is not None
            # A good edit: the new threshold is in effect within 1 s of SIGHUP.
            config.write_text(head + "[breakers.postgres_primary]\nfail_max = 6\n")
            process.send_signal(signal.SIGHUP)
            with trio.fail_after(1.0):
                took, metrics = await _wait_sample(
                    client, 6.0, "triage_breaker_setting", **primary, setting="fail_max"
                )
            print(f"reload latency (SIGHUP -> /metrics shows it): {took * 1000:.0f} ms")
            print(
                f"postgres_primary window calls: {calls} before, {_sample(metrics, 'triage_breaker_window_calls', **primary)} after"
            )
            kept = _sample(metrics, "triage_breaker_window_calls", **primary)
            assert kept is not None and kept >= calls  # the window's counts kept, not reset
            assert _sample(metrics, "triage_config_reloads_total", result="ok") == 1.0
            reloaded = await stderr.wait_for(lambda e: e["msg"] == "config reloaded")
            assert reloaded["applied"] == ["breaker postgres_primary: fail_max 3 -> 6"]
            assert reloaded["trigger"] == "SIGHUP"
            print(f"reload duration (its own report): {reloaded['duration_s'] * 1000:.0f} ms")
            # Malformed TOML, then a value the schema refuses: the running config stays.
            for n, (edit, where) in enumerate(
                [
                    ("[breakers.postgres_primary\n", "malformed TOML"),
                    ("[breakers.postgres_primary]\nfail_max = 0\n",
                     "$.breakers.postgres_primary.fail_max"),
                ],
                start=1,
            ):  # fmt: skip
                config.write_text(head + edit)
                process.send_signal(signal.SIGHUP)
                with trio.fail_after(5.0):
                    _, metrics = await _wait_sample(
                        client, float(n), "triage_config_reloads_total", result="failed"
                    )
                failed = [
                    json.loads(line) for line in stderr.lines if '"config reload failed' in line
                ]
                assert len(failed) == n and where in failed[-1]["msg"]
                assert failed[-1]["source"] == str(config) and str(config) in failed[-1]["msg"]
                setting = _sample(metrics, "triage_breaker_setting", **primary, setting="fail_max")
                assert setting == 6.0
            assert (await client.get("/readyz")).status_code == 200
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            code = await process.wait()
    assert code == 0


async def test_triage_run_reloads_when_its_base_file_changes(tmp_path: Path) -> None:
    """The daemon's own watch (``reload_poll_s``, no SIGHUP): an edit of the file its
    config extends applies a bulkhead's new capacity live."""
    base = tmp_path / "base.toml"
    text = re.sub(r"(?m)^port = 8080$", "port = 0", DEV_TEXT)
    base.write_text(text)
    config = tmp_path / "triage.toml"
    config.write_text(f"extends = {json.dumps(str(base))}\n[daemon]\nreload_poll_s = 0.1\n")
    stderr = Lines()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "supervisors.cli", "run", "--config", str(config)]
    capacity = {"bulkhead": "ghasi", "setting": "capacity"}
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
        with trio.fail_after(60):
            ready = await stderr.wait_for(lambda e: e["msg"] == "ready")
        url = f"http://127.0.0.1:{ready['port']}"
        async with httpx.AsyncClient(base_url=url) as client:
            metrics = (await client.get("/metrics")).text
            assert _sample(metrics, "triage_bulkhead_setting", **capacity) == 50.0
            base.write_text(text + "\n[bulkheads.sms]\ncapacity = 12\n")
            with trio.fail_after(5.0):
                took, metrics = await _wait_sample(
                    client, 12.0, "triage_bulkhead_setting", **capacity
                )
            print(f"reload latency (base file saved -> /metrics shows it): {took * 1000:.0f} ms")
            reloaded = await stderr.wait_for(lambda e: e["msg"] == "config reloaded")
            assert reloaded["trigger"] == f"file changed: {base}"
            assert reloaded["restart"] == []
            assert "bulkhead ghasi: capacity 50 -> 12" in reloaded["applied"]
            assert _sample(metrics, "triage_config_reloads_total", result="ok") == 1.0
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            code = await process.wait()
    assert code == 0
