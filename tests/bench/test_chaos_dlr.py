"""Chaos scenario 13 (DLR callback flood) runs once in its quick configuration."""

from __future__ import annotations

import json
from pathlib import Path

from bench.chaos.__main__ import main
from bench.chaos.scenario_dlr import SCENARIO


def test_scenario_13_passes_in_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    assert main(["13", "--quick", "--json", str(out)], scenarios={13: SCENARIO}) == 0
    [row] = json.loads(out.read_text())["scenarios"]
    assert row["id"] == 13 and row["passed"], row
    assert row["detected"] and row["mitigated"]
    assert row["lost"] == 0 and row["duplicates"] == 0
    assert row["accepted"] == row["settled"] > 0
    assert row["detect_s"] is not None and 0 <= row["detect_s"] < 5
    assert "429" in row["notes"] and "rate_limited" in row["notes"]
