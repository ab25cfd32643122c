"""Scenario 2 (push feedback stall) runs once in its quick configuration."""

from __future__ import annotations

import json
from pathlib import Path

from bench.chaos.__main__ import main
from bench.chaos.scenario_push import ROW, SCENARIO


def test_scenario_2_passes_in_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    assert main([str(ROW), "--quick", "--json", str(out)], scenarios={ROW: SCENARIO}) == 0
    [row] = json.loads(out.read_text())["scenarios"]
    assert row["id"] == ROW and row["passed"], row
    assert row["detected"] and row["mitigated"]
    assert row["lost"] == 0 and row["duplicates"] == 0
    assert row["accepted"] == row["settled"] > 0
    assert row["detect_s"] is not None and 0 <= row["detect_s"] < 10
    # The story: a watchdog restart, and feedback that never came swept to unknown.
    assert "feedback_stale" in row["notes"] and "watchdog restart" in row["notes"]
