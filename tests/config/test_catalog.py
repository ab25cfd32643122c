"""The failure catalog: the shipped rows, vocabulary checks, and the alert rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from config import (
    Catalog,
    ConfigError,
    alert_rules,
    default_path,
    describe_detector,
    load_catalog,
    load_catalog_text,
    prometheus_expr,
    rules_yaml,
)
from config.catalog import alert_name, derive_built, project_root, to_yaml
from supervisors.tree import WIRED_MODULES, built_catalog
from supervisors.vocabulary import METRICS, MITIGATIONS

CATALOG_TEXT = default_path("failures.toml").read_text(encoding="utf-8")
FIRST_ROW_LINE = CATALOG_TEXT.splitlines().index("[[rows]]") + 1


def load(text: str = CATALOG_TEXT) -> Catalog:
    return load_catalog_text(text, "failures.toml", metrics=METRICS, mitigations=MITIGATIONS)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text)
    return [str(p) for p in info.value.problems]


def line_of(text: str, needle: str) -> int:
    lines = [i for i, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(lines) == 1, needle
    return lines[0]


def test_shipped_catalog_has_the_twenty_rows() -> None:
    catalog = load_catalog(default_path("failures.toml"), metrics=METRICS, mitigations=MITIGATIONS)
    assert [row.id for row in catalog.rows] == list(range(1, 21))
    assert catalog.row(1).name == "SMS provider outage"
    assert catalog.row(20).name == "Recording ingest failure"
    with pytest.raises(KeyError):
        catalog.row(21)


def test_shipped_catalog_seed_detectors() -> None:
    catalog = load()
    assert describe_detector(catalog.row(1).detector) == (
        "ratio triage_sms_provider_error_ratio > 0.2 / 300s (min 20)"
    )
    row2 = catalog.row(2).detector
    assert (row2.kind, row2.threshold) == ("age_of_newest", 600)
    row3 = catalog.row(3).detector
    assert (row3.kind, row3.threshold, row3.min_volume) == ("ratio", 0.05, 50)
    row4 = catalog.row(4).detector
    assert (row4.kind, row4.threshold, row4.window_s) == ("count_in_window", 5, 300)
    assert catalog.row(6).detector.threshold == 30
    row7 = catalog.row(7).detector
    assert (row7.kind, row7.op, row7.threshold) == ("ratio", "lt", 0.9)
    row8 = catalog.row(8).detector
    assert (row8.kind, row8.threshold, row8.for_s) == ("gauge_sustained", 1000, 900)
    assert catalog.row(13).detector.kind == "spike_over_baseline"
    assert catalog.row(13).detector.threshold == 10
    assert catalog.row(16).detector.threshold == 0.5
    assert all(row.detector.metric.startswith("triage_") for row in catalog.rows)


#: Rows whose owning actor exists and whose chaos scenario passes.
BUILT = list(range(1, 21))


def test_built_rows_and_issues_are_assigned() -> None:
    catalog = built_catalog(load())
    assert sorted(catalog.built) == BUILT
    by_issue = {
        issue: sorted(row.id for row in catalog.rows if row.issue == issue) for issue in (3, 4, 10)
    }
    assert by_issue == {3: [5, 6, 7, 9, 18], 4: [1, 2, 3, 13, 19], 10: [4, 8, 10, 14, 17, 20]}
    for row in catalog.rows:
        if catalog.is_built(row.id):
            assert catalog.state(row) == "built"
        elif row.issue is None:
            assert catalog.state(row) == "not built (later)"
        else:
            assert catalog.state(row) == f"not built (issue {row.issue})"
    # Loaded alone, nothing is built: `built` is derived, never read from the file.
    assert load().built == frozenset()


def test_every_row_names_its_files_and_built_is_derived_from_them() -> None:
    catalog = built_catalog(load())
    root = project_root()
    for row in catalog.rows:
        assert Path(row.module).stem == row.owner, row.id
        module, scenario = (root / row.module).is_file(), (root / row.scenario).is_file()
        if catalog.is_built(row.id):
            # Built: the module exists and is wired into the tree, the scenario exists.
            assert module and scenario, row.id
            assert row.module in WIRED_MODULES, row.id
        else:
            assert not (row.module in WIRED_MODULES and scenario), row.id
    # Every module the tree wires owns a row.
    assert {row.module for row in catalog.rows} >= WIRED_MODULES
    # Derivation, on a root where row 1's scenario is missing and with row 5 unwired.
    wired = WIRED_MODULES - {"actors/db_writer.py"}
    fake = Path(__file__).parent  # no bench/chaos/ here: no scenario exists
    assert derive_built(catalog, wired=wired, root=fake).built == frozenset()
    assert 5 not in derive_built(catalog, wired=wired).built
    assert 1 in derive_built(catalog, wired=wired).built


def test_owner_must_be_named_after_its_module() -> None:
    text = CATALOG_TEXT.replace('owner = "templates"', 'owner = "template_registry"')
    line = line_of(text, 'owner = "template_registry"')
    assert problems(text) == [
        f"failures.toml:{line}: $.rows[18].owner: row 19 (Template not found): "
        "must be named after its module (actors/templates.py)"
    ]


def test_built_is_not_written_in_the_catalog() -> None:
    text = CATALOG_TEXT.replace('owner = "templates"', 'owner = "templates"\nbuilt = true')
    line = line_of(text, "built = true")
    assert problems(text) == [
        f"failures.toml:{line}: $.rows[18].built: row 19 (Template not found): unknown key"
    ]


def test_module_and_scenario_are_paths_in_their_packages() -> None:
    text = CATALOG_TEXT.replace('module = "actors/templates.py"', 'module = "templates.py"')
    (problem,) = problems(text)
    assert "$.rows[18].module: row 19 (Template not found): expected str matching" in problem


def test_every_row_has_a_runbook_for_the_on_call() -> None:
    for row in load().rows:
        text = row.runbook
        assert "Meaning:" in text and "Automation:" in text and "On-call:" in text, row.id


def test_unknown_metric_names_the_row() -> None:
    text = CATALOG_TEXT.replace('"triage_inbox_duplicates_total"', '"triage_inbox_dupes_total"')
    line = line_of(text, "triage_inbox_dupes_total")
    assert problems(text) == [
        f"failures.toml:{line}: $.rows[17].detector.metric: "
        'row 18 (Scheduling event re-delivery): unknown metric "triage_inbox_dupes_total" '
        '(did you mean "triage_inbox_duplicates_total"?)'
    ]


def test_unknown_mitigation_names_the_row() -> None:
    text = CATALOG_TEXT.replace('mitigations = ["dedupe_inbox"]', 'mitigations = ["shrug"]')
    line = line_of(text, '"shrug"')
    assert problems(text) == [
        f"failures.toml:{line}: $.rows[17].mitigations[0]: "
        'row 18 (Scheduling event re-delivery): unknown mitigation "shrug"'
    ]


def test_unknown_detector_kind_names_the_row() -> None:
    text = CATALOG_TEXT.replace(
        'kind = "count_in_window", metric = "triage_inbox_duplicates_total"',
        'kind = "histogram", metric = "triage_inbox_duplicates_total"',
    )
    line = line_of(text, '"histogram"')
    (problem,) = problems(text)
    assert problem.startswith(
        f"failures.toml:{line}: $.rows[17].detector.kind: "
        "row 18 (Scheduling event re-delivery): expected one of "
        '"age_of_newest", "count_in_window", "gauge_sustained", "rate", "ratio", '
        '"spike_over_baseline", got "histogram"'
    )


def test_metric_must_suit_the_detector_kind() -> None:
    text = CATALOG_TEXT.replace(
        'kind = "count_in_window", metric = "triage_inbox_duplicates_total"',
        'kind = "gauge_sustained", metric = "triage_inbox_duplicates_total"',
    )
    (problem,) = problems(text)
    assert "$.rows[17].detector.metric: row 18 (Scheduling event re-delivery): " in problem
    assert "must not end in _total" in problem


def test_unknown_row_key_and_several_rows_at_once() -> None:
    text = CATALOG_TEXT.replace('owner = "inbox"', 'owner = "inbox"\nteam = "x"')
    text = text.replace('owner = "templates"', 'owner = ""')
    team, owner = line_of(text, "team = "), line_of(text, 'owner = ""')
    assert problems(text) == [
        f"failures.toml:{team}: $.rows[17].team: "
        "row 18 (Scheduling event re-delivery): unknown key",
        f"failures.toml:{owner}: $.rows[18].owner: "
        'row 19 (Template not found): expected str of length >= 1, got ""',
    ]


def test_ids_must_be_unique_and_complete() -> None:
    text = CATALOG_TEXT.replace("id = 20\n", "id = 19\n")
    line = line_of(text, 'name = "Recording ingest failure"') - 1
    first = FIRST_ROW_LINE
    assert problems(text) == [
        f"failures.toml:{first}: $.rows: missing ids: 20",
        f"failures.toml:{line}: "
        "$.rows[19].id: row 19 (Recording ingest failure): duplicate id (also rows[18])",
    ]


def test_id_out_of_range() -> None:
    text = CATALOG_TEXT.replace("id = 20\n", "id = 21\n")
    line = line_of(text, "id = 21")
    assert problems(text) == [
        f"failures.toml:{FIRST_ROW_LINE}: $.rows: missing ids: 20",
        f"failures.toml:{line}: $.rows[19].id: "
        "row 21 (Recording ingest failure): expected int <= 20, got 21",
    ]


# -- rules ---------------------------------------------------------------------------------


def parse_yaml_subset(text: str) -> Any:
    """Parse the block YAML that ``to_yaml`` writes: maps, lists of maps, JSON-quoted
    scalars, numbers, booleans and ``|-`` literal blocks. Anything else fails."""
    lines = [line for line in text.split("\n") if not line.startswith("#")]
    pos = 0

    def indent_of(line: str) -> int:
        return len(line) - len(line.lstrip(" "))

    def scalar(raw: str) -> Any:
        if raw.startswith('"'):
            return json.loads(raw)
        if raw in ("true", "false", "null", "{}", "[]"):
            return {"true": True, "false": False, "null": None, "{}": {}, "[]": []}[raw]
        assert re.fullmatch(r"-?\d+(\.\d+)?", raw), f"unquoted scalar {raw!r}"
        return json.loads(raw)

    def block(indent: int) -> Any:
        nonlocal pos
        if lines[pos][indent:].startswith("- "):
            items = []
            while pos < len(lines) and lines[pos].startswith(" " * indent + "- "):
                lines[pos] = " " * (indent + 2) + lines[pos][indent + 2 :]
                items.append(block(indent + 2))
            return items
        mapping: dict[str, Any] = {}
        while pos < len(lines) and lines[pos] and indent_of(lines[pos]) == indent:
            m = re.fullmatch(r" *([A-Za-z_][A-Za-z0-9_]*):(?: (.*))?", lines[pos])
            assert m is not None, f"line {pos + 1}: {lines[pos]!r}"
            key, value = m.group(1), m.group(2)
            assert key not in mapping, f"duplicate key {key}"
            pos += 1
            if value is None:
                assert indent_of(lines[pos]) > indent, f"line {pos + 1}: expected a nested block"
                mapping[key] = block(indent_of(lines[pos]))
            elif value == "|-":
                body = []
                while pos < len(lines) and (not lines[pos] or indent_of(lines[pos]) > indent):
                    body.append(lines[pos][indent + 2 :])
                    pos += 1
                while body and not body[-1]:
                    body.pop()
                mapping[key] = "\n".join(body)
            else:
                mapping[key] = scalar(value)
        return mapping

    document = block(0)
    assert all(not line for line in lines[pos:]), f"unparsed from line {pos + 1}"
    return document


def test_yaml_writer_round_trips() -> None:
    document = {
        "a": "plain",
        "b": 'quotes " and \\ and : # -',
        "c": "line one\nline two\n  indented",
        "d": [{"x": 1, "y": [{"z": True}]}, {"x": 2.5, "y": []}],
        "e": {},
        "f": " leading space\nsecond line",
    }
    assert parse_yaml_subset(to_yaml(document)) == document


def test_rules_are_structurally_valid() -> None:
    catalog = load()
    text = rules_yaml(catalog)
    document = parse_yaml_subset(text)
    assert document == alert_rules(catalog)
    (group,) = document["groups"]
    assert group["name"] == "triage-failure-catalog"
    rules = group["rules"]
    assert len(rules) == 20
    names = [rule["alert"] for rule in rules]
    assert len(set(names)) == 20
    for row, rule in zip(catalog.rows, rules, strict=True):
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
        assert row.detector.metric in rule["expr"]
        assert rule["expr"].count("(") == rule["expr"].count(")")
        assert rule["expr"].count("[") == rule["expr"].count("]")
        assert rule["labels"] == {
            "severity": row.severity,
            "catalog_id": str(row.id),
            "owner": row.owner,
        }
        assert all(isinstance(v, str) for v in rule["annotations"].values())
        assert rule["annotations"]["runbook"] == row.runbook.strip()
        if "for" in rule:
            assert re.fullmatch(r"\d+(ms|s)", rule["for"])
    assert rules[0]["alert"] == "TriageSmsProviderOutage"
    assert alert_name(catalog.row(17)) == "TriageLargeAttachmentOom"


def test_expressions_per_detector_kind() -> None:
    catalog = load()
    assert prometheus_expr(catalog.row(1).detector) == (
        "(rate(triage_sms_provider_error_ratio_numerator_total[300s])"
        " / rate(triage_sms_provider_error_ratio_denominator_total[300s]) > 0.2)"
        " and (increase(triage_sms_provider_error_ratio_denominator_total[300s]) >= 20)"
    )
    assert prometheus_expr(catalog.row(2).detector) == (
        "time() - triage_push_feedback_last_timestamp_seconds > 600"
    )
    assert prometheus_expr(catalog.row(4).detector) == (
        "increase(triage_virtual_session_failed_total[300s]) > 5"
    )
    assert prometheus_expr(catalog.row(5).detector) == (
        "rate(triage_db_connection_errors_total[60s]) > 0.1"
    )
    assert "< 0.9" in prometheus_expr(catalog.row(7).detector)
    assert prometheus_expr(catalog.row(8).detector) == "triage_scan_queue_depth > 1000"
    # Window 60 s in 6 buckets, alpha 0.01: the baseline spans 1000 s before the window.
    baseline = "rate(triage_dlr_callbacks_total[1000s] offset 60s)"
    assert prometheus_expr(catalog.row(13).detector) == (
        f"(rate(triage_dlr_callbacks_total[60s]) > 10 * {baseline}) and ({baseline} > 0)"
    )
    assert describe_detector(catalog.row(13).detector) == (
        "spike_over_baseline triage_dlr_callbacks_total > 10x baseline / 60s (warm-up 30 buckets)"
    )
    rules = alert_rules(catalog)["groups"][0]["rules"]
    assert rules[7]["for"] == "900s"
    assert "for" not in rules[0]


PROMTOOL = shutil.which("promtool")


def _alert(catalog: Catalog, row_id: int) -> dict[str, Any]:
    rules = alert_rules(catalog)["groups"][0]["rules"]
    rule: dict[str, Any] = rules[row_id - 1]
    return {"exp_labels": rule["labels"], "exp_annotations": rule["annotations"]}


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_rules_and_they_fire(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    catalog = load()
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(rules_yaml(catalog))
    check = subprocess.run(
        [PROMTOOL, "check", "rules", str(rules_file)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 20 rules found" in check.stdout

    def test(series: dict[str, str], alertname: str, at: str, alerts: list[Any]) -> Any:
        return {
            "interval": "30s",
            "input_series": [{"series": k, "values": v} for k, v in series.items()],
            "alert_rule_test": [{"eval_time": at, "alertname": alertname, "exp_alerts": alerts}],
        }

    ratio = "triage_sms_provider_error_ratio"
    hits = "triage_idempotency_cache_hit_ratio"
    tests = [
        # Row 1: 30 of 100 calls fail per 30 s: 30% > 20%, with volume.
        test(
            {f"{ratio}_numerator_total": "0+30x40", f"{ratio}_denominator_total": "0+100x40"},
            "TriageSmsProviderOutage",
            "15m",
            [_alert(catalog, 1)],
        ),
        # Row 1: 10% errors does not fire.
        test(
            {f"{ratio}_numerator_total": "0+10x40", f"{ratio}_denominator_total": "0+100x40"},
            "TriageSmsProviderOutage",
            "15m",
            [],
        ),
        # Row 7 (op lt): a hit ratio of 50% fires, 95% does not.
        test(
            {f"{hits}_numerator_total": "0+50x40", f"{hits}_denominator_total": "0+100x40"},
            "TriageRedisCacheMissFlood",
            "15m",
            [_alert(catalog, 7)],
        ),
        test(
            {f"{hits}_numerator_total": "0+95x40", f"{hits}_denominator_total": "0+100x40"},
            "TriageRedisCacheMissFlood",
            "15m",
            [],
        ),
        # Row 2: the newest feedback is from the epoch: older than 600 s at 15 m.
        test(
            {"triage_push_feedback_last_timestamp_seconds": "0x40"},
            "TriagePushFeedbackStall",
            "15m",
            [_alert(catalog, 2)],
        ),
        # Row 11: one PHI guard hit fires.
        test(
            {"triage_phi_guard_hits_total": "0x10 1x10"},
            "TriageThreadPhiLeakInPush",
            "7m",
            [_alert(catalog, 11)],
        ),
        # Row 13: 10/min for 40 minutes, then 1000 per 30 s: a spike over the baseline.
        test(
            {"triage_dlr_callbacks_total": "0+5x80 1400+1000x6"},
            "TriageDlrCallbackFlood",
            "41m",
            [_alert(catalog, 13)],
        ),
        # Steady traffic, and traffic with no baseline yet, do not fire.
        test({"triage_dlr_callbacks_total": "0+5x90"}, "TriageDlrCallbackFlood", "41m", []),
        test(
            {"triage_dlr_callbacks_total": "0x80 1000+1000x6"},
            "TriageDlrCallbackFlood",
            "41m",
            [],
        ),
    ]
    unit = tmp_path / "tests.yml"
    # JSON is YAML: promtool reads it as is.
    unit.write_text(json.dumps({"rule_files": [str(rules_file)], "tests": tests}))
    run = subprocess.run(
        [PROMTOOL, "test", "rules", str(unit)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
