"""Scenario 3 (email bounce spike) runs once in its quick configuration."""

from __future__ import annotations

import json
from pathlib import Path

from bench.chaos.__main__ import main
from bench.chaos.scenario_bounces import ROW, SCENARIO


def test_scenario_3_passes_in_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    assert main([str(ROW), "--quick", "--json", str(out)], scenarios={ROW: SCENARIO}) == 0
    [row] = json.loads(out.read_text())["scenarios"]
    assert row["id"] == ROW and row["passed"], row
    assert row["detected"] and row["mitigated"]
    assert row["lost"] == 0 and row["duplicates"] == 0
    assert row["accepted"] == row["settled"] > 0
    assert row["detect_s"] is not None and 0 <= row["detect_s"] < 10
    # The story: throttled, then disabled; the probes refused; re-enabled by the operator.
    assert "['throttled', 'disabled']" in row["notes"]
    assert "'category_disabled'" in row["notes"] and "enable exit=0" in row["notes"]
