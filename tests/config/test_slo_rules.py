"""The burn-rate alerts of [slo] (``triage rules``), checked and run by promtool."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

import config
from config.catalog import rules_yaml
from config.schema import BurnAlert, SloConfig
from config.slo_rules import burn_rate_rules, window_label
from supervisors.vocabulary import METRICS, MITIGATIONS

PROMTOOL = shutil.which("promtool")


def test_one_rule_per_slo_and_pair_with_the_workbook_thresholds() -> None:
    rules = burn_rate_rules(SloConfig())["rules"]
    assert len(rules) == 8
    fast = rules[0]
    assert fast["labels"] == {
        "severity": "page",
        "slo": "dispatch_success",
        "long_window": "1h",
        "short_window": "5m",
        "burn_rate": "14.4",
    }
    # 14.4 x (1 - 0.995), over both windows.
    assert fast["expr"].count("> 0.072") == 2
    assert "[1h]" in fast["expr"] and "[5m]" in fast["expr"]
    severities = [
        (r["labels"]["slo"], r["labels"]["burn_rate"], r["labels"]["severity"]) for r in rules
    ]
    assert severities[4:] == [
        ("send_latency", "14.4", "page"),
        ("send_latency", "6", "page"),
        ("send_latency", "3", "ticket"),
        ("send_latency", "1", "ticket"),
    ]


def test_window_labels_and_refused_pairs() -> None:
    assert [window_label(s) for s in (300, 3600, 21600, 86400, 259200, 90)] == [
        "5m", "1h", "6h", "1d", "3d", "90s",
    ]  # fmt: skip
    with pytest.raises(msgspec.ValidationError, match="short_s"):
        msgspec.convert({"factor": 2, "long_s": 60, "short_s": 60, "severity": "page"}, BurnAlert)


def _catalog() -> config.Catalog:
    path = config.default_path("failures.toml")
    return config.load_catalog(path, metrics=METRICS, mitigations=MITIGATIONS)


def _expected(rules: list[dict[str, Any]], burn_rates: list[str]) -> list[dict[str, Any]]:
    return [
        {"exp_labels": r["labels"], "exp_annotations": r["annotations"]}
        for r in rules
        if r["labels"]["slo"] == "dispatch_success" and r["labels"]["burn_rate"] in burn_rates
    ]


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_runs_the_burn_rate_alerts(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    slo = SloConfig()
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(rules_yaml(_catalog(), slo))
    check = subprocess.run(
        [PROMTOOL, "check", "rules", str(rules_file)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 28 rules found" in check.stdout
    rules = burn_rate_rules(slo)["rules"]
    good = 'triage_slo_events_total{slo="dispatch_success",outcome="good"}'
    bad = 'triage_slo_events_total{slo="dispatch_success",outcome="bad"}'

    def test(series: dict[str, str], at: str, burn_rates: list[str]) -> dict[str, Any]:
        return {
            "interval": "1m",
            "input_series": [{"series": k, "values": v} for k, v in series.items()],
            "alert_rule_test": [
                {
                    "eval_time": at,
                    "alertname": "TriageErrorBudgetBurn",
                    "exp_alerts": _expected(rules, burn_rates),
                }
            ],
        }

    tests = [
        # 10% bad for an hour: 20x the budget's pace; every pair fires, the fast page too.
        test({good: "0+90x60", bad: "0+10x60"}, "60m", ["14.4", "6", "3", "1"]),
        # The burn stopped 10 minutes ago: the 5 m window is clean, the fast page is off,
        # the slower pairs (30 m / 2 h / 6 h short windows) still see it.
        test({good: "0+90x60 5490+100x10", bad: "0+10x60 600+0x10"}, "70m", ["6", "3", "1"]),
        # 5% bad for 6 hours: 10x the pace: under the 14.4x page, over the 6x one.
        test({good: "0+95x360", bad: "0+5x360"}, "6h", ["6", "3", "1"]),
        # 0.4% bad: within the budget's pace; nothing fires.
        test({good: "0+996x360", bad: "0+4x360"}, "6h", []),
    ]
    unit = tmp_path / "tests.yml"
    unit.write_text(json.dumps({"rule_files": [str(rules_file)], "tests": tests}))
    run = subprocess.run(
        [PROMTOOL, "test", "rules", str(unit)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
