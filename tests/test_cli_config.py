"""``triage config diff OLD NEW``: the changed keys path by path, live or restart; exit
0 (same), 1 (different), 2 (a file invalid, with its path and reason)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from supervisors.cli import main
from tests.supervisors.test_daemon import DEV_TEXT

VIRTUAL = "triage_virtual_session_failed_total"


def _files(tmp_path: Path, old: str, new: str) -> tuple[str, str]:
    base = tmp_path / "base.toml"
    base.write_text(DEV_TEXT)
    head = f"extends = {json.dumps(str(base))}\n"
    paths = []
    for name, text in (("old.toml", old), ("new.toml", new)):
        path = tmp_path / name
        path.write_text(head + text)
        paths.append(str(path))
    return paths[0], paths[1]


def test_the_changed_keys_path_by_path_live_or_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = _files(
        tmp_path,
        "[breakers.redis]\nfail_max = 3\n",
        "[breakers.redis]\nfail_max = 4\n[daemon]\nport = 9191\n"
        f'[detectors.virtual]\nkind = "count_in_window"\nmetric = "{VIRTUAL}"\n'
        "threshold = 2.0\nwindow_s = 300.0\n",
    )
    assert main(["config", "diff", old, new]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [
        "$.breakers.redis.fail_max: 3 -> 4 (live)",
        "$.daemon.port: 8080 -> 9191 (restart)",
    ]
    detectors = out[2:-1]
    assert detectors and all(line.startswith("$.detectors.virtual.") for line in detectors)
    assert "$.detectors.virtual.threshold: None -> 2.0 (live)" in detectors
    assert "$.detectors.virtual.kind: None -> 'count_in_window' (live)" in detectors
    assert all(line.endswith("(live)") for line in detectors)  # a row's override
    assert out[-1] == (
        f"{len(out) - 1} keys changed: {len(out) - 2} would apply live (reload), 1 need a restart"
    )


def test_a_new_detector_of_its_own_needs_a_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    own = (
        '[detectors.mine]\nkind = "gauge_sustained"\nmetric = "triage_mailbox_depth"\n'
        "threshold = 5.0\nwindow_s = 60.0\n"
    )
    old, new = _files(tmp_path, "", own)
    assert main(["config", "diff", old, new]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:-1] and all(line.endswith("(restart)") for line in out[:-1])


def test_no_difference_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = _files(tmp_path, "[daemon]\nseed = 1\n", "")  # dev's seed is 1 already
    assert main(["config", "diff", old, new]) == 0
    assert capsys.readouterr().out == f"no difference: {old} {new}\n"


def test_an_invalid_file_exits_2_with_its_path_and_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = _files(tmp_path, "", "[breakers.redis]\nfail_max = 0\n")
    assert main(["config", "diff", old, new]) == 2
    err = capsys.readouterr().err
    assert f"{new}:3: $.breakers.redis.fail_max: expected int >= 1, got 0" in err
    Path(new).write_text("[breakers.redis\n")
    assert main(["config", "diff", old, new]) == 2
    assert f"{new}:1" in capsys.readouterr().err


def test_a_bulkhead_capacity_and_wait_apply_live(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = _files(
        tmp_path, "", "[bulkheads.sms]\ncapacity = 20\nmax_wait_s = 1.5\nmax_partitions = 50\n"
    )
    assert main(["config", "diff", old, new]) == 1
    assert capsys.readouterr().out.splitlines() == [
        "$.bulkheads.sms.capacity: 50 -> 20 (live)",
        "$.bulkheads.sms.max_partitions: 1000 -> 50 (live)",
        "$.bulkheads.sms.max_wait_s: 0.5 -> 1.5 (live)",
        "3 keys changed: 3 would apply live (reload), 0 need a restart",
    ]
