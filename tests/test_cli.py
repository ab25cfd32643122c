"""The ``triage`` command line, run in process through ``main(argv)``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from config import default_path
from supervisors.cli import main

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_TEXT = default_path("default.toml").read_text()


def good(catalog: str) -> str:
    """default.toml naming another catalog: a config the daemon accepts."""
    line = 'catalog = "failures.toml"'
    assert DEFAULT_TEXT.count(line) == 1
    return DEFAULT_TEXT.replace(line, f"catalog = {json.dumps(catalog)}")


BAD = """\
[daemon]
drain_s = 25
max_label_values = 100
detector_tick_s = 1
drain_grace_s = 0.0

[mailboxes.relay]
capacity = 0
overflow = "wait"
"""


def write_config(tmp_path: Path, text: str, name: str = "triage.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_check_config_ok(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(default_path("default.toml"))
    assert main(["check-config", path]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"ok: {path}\n")
    assert "13 breakers" in out
    assert "20 rows, 20 built" in out
    assert err == ""


@pytest.mark.parametrize("name", ["dev.toml", "chaos.toml"])
def test_check_config_ok_for_every_shipped_file(name: str) -> None:
    assert main(["check-config", str(default_path(name))]) == 0


def test_check_config_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, BAD)
    assert main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{path}:8: $.mailboxes.relay.capacity: expected int >= 1, got 0",
        "1 problem found",
    ]


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> list[str]:
    """check-config on ``text`` (next to a copy of the shipped catalog): its stderr lines."""
    (tmp_path / "failures.toml").write_text(default_path("failures.toml").read_text())
    path = write_config(tmp_path, text)
    assert main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    return [line.removeprefix(f"{path}: ") for line in err.splitlines()]


def test_check_config_refuses_what_the_tree_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Valid TOML for the loader; the daemon would refuse it at start: the tree needs it.
    text = good("failures.toml").replace("[mailboxes.alerts]", "[mailboxes.alerts_gone]")
    assert _refused(tmp_path, capsys, text) == [
        "$.mailboxes.alerts: missing required profile [mailboxes.alerts] (the daemon's tree uses it)",
        "1 problem found",
    ]


def test_check_config_refuses_what_the_channels_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = good("failures.toml").replace("[mailboxes.dispatcher]", "[mailboxes.dispatch]")
    text = text.replace("[supervisors.providers]", "[supervisors.vendors]")
    assert _refused(tmp_path, capsys, text) == [
        "$.mailboxes.dispatcher: missing profile [mailboxes.dispatcher] (the channels use it)",
        "$.supervisors.providers: missing profile [supervisors.providers] (the channels use it)",
        "2 problems found",
    ]


def test_check_config_refuses_a_dispatcher_mailbox_that_drops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = '[mailboxes.dispatcher]\nbase = "default"\ncapacity = 10000\noverflow = "wait"'
    assert good("failures.toml").count(old) == 1
    text = good("failures.toml").replace(old, old.replace('"wait"', '"drop_newest"'))
    assert _refused(tmp_path, capsys, text) == [
        "$.mailboxes.dispatcher.overflow: must be 'wait', got 'drop_newest' (the dispatchers'"
        " sends report back through their mailboxes)",
        "1 problem found",
    ]


def test_check_config_refuses_a_row_override_of_another_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Row 6's relay feeds an age_of_newest detector: a rate override on its metric
    # would make the tree refuse to start.
    text = good("failures.toml") + (
        '\n[detectors.outbox_lag]\nkind = "rate"\nmetric = "triage_outbox_oldest_pending_timestamp_seconds"\n'
        "threshold = 1.0\nwindow_s = 10.0\n"
    )
    (line,) = [x for x in _refused(tmp_path, capsys, text) if "outbox_lag" in x]
    assert line == (
        "$.detectors.outbox_lag.kind: overrides row 6 (NATS unavailable), whose actor "
        "feeds a detector of kind 'age_of_newest'; got 'rate'"
    )


def test_check_config_malformed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "[daemon\n")
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}:1:8: $: malformed TOML: ")


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.toml"
    assert main(["check-config", str(path)]) == 2
    assert f"{path}: $: cannot read file" in capsys.readouterr().err


def test_check_config_validates_the_catalog_next_to_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = default_path("failures.toml").read_text()
    broken = catalog.replace('mitigations = ["dedupe_inbox"]', 'mitigations = ["panic"]')
    (tmp_path / "failures.toml").write_text(broken)
    path = write_config(tmp_path, good("failures.toml"))
    assert main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'failures.toml'}:" in err
    assert (
        '$.rows[17].mitigations[0]: row 18 (Scheduling event re-delivery): unknown mitigation "panic"'
        in err
    )

    (tmp_path / "failures.toml").write_text(catalog)
    assert main(["check-config", str(path)]) == 0


def test_check_config_missing_catalog(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, good("nowhere.toml"))
    assert main(["check-config", str(path)]) == 2
    assert "nowhere.toml: $: cannot read file" in capsys.readouterr().err


def test_catalog_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["catalog"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "ID", "NAME", "DETECTOR", "MITIGATIONS", "OWNER", "MODULE", "SCENARIO", "STATE"
    ]  # fmt: skip
    rows = lines[1:]
    assert len(rows) == 20
    assert [int(line.split()[0]) for line in rows] == list(range(1, 21))
    assert "ratio triage_sms_provider_error_ratio > 0.2 / 300s" in rows[0]
    assert "failover_provider, retry_with_backoff, alert" in rows[0]
    assert rows[0].split()[-4:] == [
        "failover", "actors/failover.py", "bench/chaos/scenario_sms.py", "built"
    ]  # fmt: skip
    assert "not built" not in rows[14]  # row 15, the erasure saga (issue 11)
    # Each row's module and scenario: an existing file, or marked not built.
    for line in rows:
        for path in (w for w in line.split() if w.endswith(".py")):
            assert (ROOT / path).is_file() or f"{path} (not built)" in line, path
    assert rows[0].endswith("built") and "not built" not in rows[0]  # built by issue 4
    assert rows[4].endswith("built") and "not built" not in rows[4]
    assert rows[3].endswith("built") and "not built" not in rows[3]  # built by issue 10
    assert rows[14].endswith("built")


def test_catalog_json_from_a_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["catalog", "--config", str(default_path("chaos.toml")), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [row["id"] for row in rows] == list(range(1, 21))
    assert rows[0]["detector"]["kind"] == "ratio"
    assert rows[0]["state"] == "built"
    assert rows[7]["state"] == "built"  # row 8 (issue 10)
    assert rows[10]["state"] == "built"  # row 11 (issue 11)
    assert rows[14]["state"] == "built"  # row 15, the erasure saga (issue 11)
    assert (rows[0]["owner"], rows[0]["module"], rows[0]["scenario"]) == (
        "failover", "actors/failover.py", "bench/chaos/scenario_sms.py"
    )  # fmt: skip
    for row in rows:
        assert row["module_exists"] == (ROOT / row["module"]).is_file()
        assert row["scenario_exists"] == (ROOT / row["scenario"]).is_file()
        if row["built"]:
            assert row["module_exists"] and row["scenario_exists"], row["id"]
        else:
            assert row["state"].startswith("not built")
    assert sum(row["built"] for row in rows) == 20
    assert rows[0]["detector_text"].startswith("ratio triage_sms_provider_error_ratio > 0.2")


def test_catalog_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, "[[rows]]\nid = 1\n", "failures.toml")
    assert main(["catalog", "--catalog", str(path)]) == 2
    err = capsys.readouterr().err
    assert "row 1: missing required key" in err
    assert "missing ids: 2, 3" in err


def test_rules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    # The catalog's twenty rows, and the error budget's 2 SLOs x 4 burn-rate pairs.
    assert out.count("\n      - alert: ") == 20 + 8
    assert out.count('\n      - alert: "TriageErrorBudgetBurn"') == 8
    assert "expr: " in out
    target = tmp_path / "rules.yml"
    assert main(["rules", "--catalog", str(default_path("failures.toml")), "-o", str(target)]) == 0
    assert target.read_text() == out


def test_catalog_and_config_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["rules", "--catalog", "a.toml", "--config", "b.toml"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: triage" in capsys.readouterr().err


def test_run_hands_the_config_to_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def main_run(config_path: str) -> int:
        seen.append(config_path)
        return 7

    daemon = types.ModuleType("supervisors.daemon")
    daemon.main_run = main_run  # type: ignore[attr-defined]  # a stand-in for the real daemon
    monkeypatch.setitem(sys.modules, "supervisors.daemon", daemon)
    assert main(["run", "--config", "x.toml"]) == 7
    assert main(["run"]) == 7
    assert seen == ["x.toml", str(default_path("default.toml"))]
    # --break-glass hands its reason to the daemon as TRIAGE_BREAK_GLASS.
    monkeypatch.delenv("TRIAGE_BREAK_GLASS", raising=False)
    assert main(["run", "--config", "x.toml", "--break-glass", "INC-9 vendor cutover"]) == 7
    assert os.environ["TRIAGE_BREAK_GLASS"] == "INC-9 vendor cutover"
    monkeypatch.delenv("TRIAGE_BREAK_GLASS")


def test_module_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "supervisors.cli", "check-config", "config/default.toml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: config/default.toml\n")
