"""The Grafana dashboard generated from the catalog: its shape, one panel per row with the
row's threshold, every query valid PromQL (promtool parses them) over exported metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import config
from config.grafana import UID, dashboard, detector_value_expr
from config.schema import DetectorConfig
from engine.metrics import Metrics
from supervisors.cli import main
from supervisors.vocabulary import METRICS, MITIGATIONS

PROMTOOL = shutil.which("promtool")


def _catalog() -> config.Catalog:
    path = config.default_path("failures.toml")
    return config.load_catalog(path, metrics=METRICS, mitigations=MITIGATIONS)


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in board["panels"] if p["type"] != "row"]


def test_one_panel_per_row_with_its_threshold_and_runbook() -> None:
    catalog = _catalog()
    board = dashboard(catalog)
    assert board["uid"] == UID and board["schemaVersion"] == 39
    by_title = {p["title"]: p for p in _panels(board)}
    for row in catalog.rows:
        panel = by_title[f"#{row.id} {row.name}"]
        [target] = panel["targets"]
        assert target["expr"] == detector_value_expr(row.detector)
        steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
        assert steps[-1] == {"color": "red", "value": row.detector.threshold}
        assert row.runbook.strip() in panel["description"]
    assert [p["title"] for p in board["panels"] if p["type"] == "row"] == [
        "Error budget", "Failure catalog", "Engine",
    ]  # fmt: skip


def test_the_grid_is_24_wide_ids_unique_and_nothing_overlaps() -> None:
    panels = dashboard(_catalog())["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps at {(x, y)}"
                cells.add((x, y))


def test_value_expressions_per_kind() -> None:
    def d(**fields: Any) -> DetectorConfig:
        return DetectorConfig(**{"metric": "m_total", "threshold": 1.0, "window_s": 300, **fields})

    assert detector_value_expr(d(kind="rate")) == "sum(rate(m_total[300s]))"
    assert detector_value_expr(d(kind="ratio", metric="m_ratio")) == (
        "sum(rate(m_ratio_numerator_total[300s])) / sum(rate(m_ratio_denominator_total[300s]))"
    )
    assert detector_value_expr(d(kind="age_of_newest", metric="m_timestamp_seconds")) == (
        "time() - min(m_timestamp_seconds)"
    )


def test_every_query_reads_a_metric_the_daemon_exports() -> None:
    engine = {
        m.name
        for m in Metrics().registry.collect()  # the engine's families
    }
    known = set(METRICS) | engine | {"triage_slo_events", "triage_slo_budget_burned_ratio",
                                     "triage_slo_budget_worst_window_ratio"}  # fmt: skip
    for panel in _panels(dashboard(_catalog())):
        for target in panel["targets"]:
            for name in re.findall(r"\b(triage_[a-z_]+)", target["expr"]):
                base = re.sub(r"_(numerator|denominator)_total$", "", name).removesuffix("_total")
                assert name in known or base in known or f"{base}_total" in known, name


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_parses_every_query(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    exprs = [t["expr"] for p in _panels(dashboard(_catalog())) for t in p["targets"]]
    rules = {
        "groups": [
            {"name": "dashboard", "rules": [
                {"record": f"triage:dashboard_query_{i}", "expr": e} for i, e in enumerate(exprs)
            ]}
        ]
    }  # fmt: skip
    path = tmp_path / "queries.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True,
                           text=True, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in check.stdout


def test_the_command_writes_the_dashboard(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["dashboard"]) == 0
    printed = json.loads(capsys.readouterr().out)
    target = tmp_path / "dashboard.json"
    assert main(["dashboard", "-o", str(target)]) == 0
    assert json.loads(target.read_text()) == printed == dashboard(_catalog())
