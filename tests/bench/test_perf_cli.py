"""``python -m bench.perf``: the JSON contract and the exit status, never the timings.

The suite runs once, in its ``--quick`` configuration (tiny sizes, one round), as a
real subprocess the way CI calls it; the tests below read what it left behind.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bench.perf.__main__ import main
from bench.perf.common import Better, Result, Target, render_table

ROOT = Path(__file__).resolve().parents[2]

CONTRACT = {"name", "value", "unit", "baseline", "baseline_value", "ratio"}
ACTORS_RESULTS = [
    "tell",
    "tell_batch",
    "ask",
    "idle_actor_memory",
    "teardown_100k",
    "wrapper_overhead",
]


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    report: Any


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("perf") / "actors.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.perf", "actors", "--json", str(out), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = json.loads(out.read_text()) if out.exists() else None
    return Run(proc.returncode, proc.stdout, proc.stderr, report)


def test_quick_run_exits_by_targets(quick_run: Run) -> None:
    assert quick_run.returncode in (0, 1), quick_run.stderr
    assert quick_run.report is not None, quick_run.stderr
    all_passed = all(r["passed"] for r in quick_run.report["results"])
    assert quick_run.returncode == (0 if all_passed else 1)


def test_quick_run_json_shape(quick_run: Run) -> None:
    report = quick_run.report
    assert report is not None, quick_run.stderr
    assert set(report) == {"suite", "results"}
    assert report["suite"] == "actors"
    assert [r["name"] for r in report["results"]] == ACTORS_RESULTS
    for result in report["results"]:
        assert CONTRACT.issubset(result), result["name"]
        assert {"target", "passed"}.issubset(result), result["name"]
        for key in ("value", "baseline_value", "ratio"):
            assert isinstance(result[key], float), (result["name"], key)
            assert math.isfinite(result[key]), (result["name"], key)
        assert result["baseline_value"] > 0, result["name"]
        assert result["ratio"] == pytest.approx(result["value"] / result["baseline_value"])
        assert isinstance(result["unit"], str) and result["unit"]
        assert isinstance(result["baseline"], str) and result["baseline"]
        assert isinstance(result["passed"], bool)
        assert len(result["samples"]) == len(result["baseline_samples"]) == 1


def test_quick_run_prints_a_table(quick_run: Run) -> None:
    lines = quick_run.stdout.splitlines()
    assert lines[0] == "suite: actors"
    assert lines[1].split()[:6] == ["result", "ours", "baseline", "unit", "ratio", "target"]
    for name in ACTORS_RESULTS:
        assert any(line.startswith(f"{name} ") for line in lines), name
    assert lines[-1] == "all targets met" or lines[-1].startswith("targets missed: ")


def test_unknown_suite_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["nope", "--json", "x.json"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_result_keeps_the_best_sample_of_each_side() -> None:
    faster = Result.build(
        name="tell",
        unit="msgs/s",
        baseline="raw",
        samples=[80.0, 100.0, 90.0],
        baseline_samples=[110.0, 120.0],
        better=Better.HIGHER,
        targets=[Target("ratio", ">=", 0.85)],
    )
    assert (faster.value, faster.baseline_value) == (100.0, 120.0)
    assert faster.ratio == pytest.approx(100 / 120)
    assert not faster.passed

    smaller = Result.build(
        name="idle_actor_memory",
        unit="bytes/actor",
        baseline="raw",
        samples=[7000.0, 6000.0],
        baseline_samples=[4000.0, 5000.0],
        better=Better.LOWER,
        targets=[Target("value", "<=", 8192)],
    )
    assert (smaller.value, smaller.baseline_value, smaller.ratio) == (6000.0, 4000.0, 1.5)
    assert smaller.passed
    assert smaller.target == "value <= 8192"
    assert "MISSED" in render_table("actors", [faster])
    assert "ok" in render_table("actors", [smaller]).split()


def test_dispatch_suite_is_registered() -> None:
    from bench.perf.__main__ import SUITES

    assert {"actors", "dispatch", "relay"} <= set(SUITES)


def test_dispatch_suite_tiny_run_delivers_and_fails_over() -> None:
    """Both contenders and the failover trials once, tiny: the shape and the counts."""
    from bench.perf import dispatch

    results = dispatch.run_suite(dispatch.Sizes(n=20, trials=2, pgbench_s=1), repeat=1)
    names = ["dispatch", "accept_vs_asyncpg", "accept_vs_pgbench", "failover_p50", "failover_p99"]
    assert [r.name for r in results] == names
    throughput, raw, pgbench, p50, p99 = results
    for accept in (raw, pgbench):  # the baselines ran and the ratio is ours / theirs
        assert accept.unit == "accepts/s" and accept.value > 0 and accept.baseline_value > 0
        assert accept.ratio == pytest.approx(accept.value / accept.baseline_value)
        assert 0 < accept.details["accept_p50_s"] <= accept.details["accept_p99_s"]
    assert throughput.unit == "dispatches/s" and p50.unit == p99.unit == "s"
    assert throughput.value > 0 and throughput.baseline_value > 0
    assert throughput.ratio == pytest.approx(throughput.value / throughput.baseline_value)
    assert throughput.details["naive_lost"] == 0  # the naive loop delivered all 20
    assert throughput.details["duplicates"] == 0
    assert throughput.details["ours_secondary"] == 0  # no fault: nothing failed over
    assert p99.details["trials"] == 2
    assert p99.details["missed"] == 0  # every trial reached the secondary
    assert p99.details["lost"] == 0 and p99.details["duplicates"] == 0
    assert 0 < p50.value <= p99.value < math.inf
    assert p99.target == "value <= 1"


def test_scale_suite_is_registered_and_a_tiny_run_delivers_on_one_and_two_replicas() -> None:
    """Two ``triage run`` replicas against one, tiny: the shape, the counts, the figure."""
    from bench.perf import scale
    from bench.perf.__main__ import SUITES

    assert "scale" in SUITES
    (result,) = scale.run_suite(40, repeat=1)
    assert result.name == "scale_2_vs_1" and result.unit == "dispatches/s"
    assert result.value > 0 and result.baseline_value > 0
    assert result.ratio == pytest.approx(result.value / result.baseline_value)
    assert result.details["two_replicas_per_s"] == result.value
    assert result.details["one_replica_per_s"] == result.baseline_value
    assert result.details["lost"] == 0 and result.details["duplicates"] == 0
    assert result.passed  # no target: it passes iff nothing was lost or sent twice
    assert len(result.samples) == len(result.baseline_samples) == 1
