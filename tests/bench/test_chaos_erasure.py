"""Scenario 15 (GDPR erase partial) runs once in its quick configuration."""

from __future__ import annotations

import json
from pathlib import Path

from bench.chaos.__main__ import main
from bench.chaos.scenario_erasure import ROW, SCENARIO


def test_scenario_15_passes_in_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    assert main([str(ROW), "--quick", "--json", str(out)], scenarios={ROW: SCENARIO}) == 0
    [row] = json.loads(out.read_text())["scenarios"]
    assert row["id"] == ROW and row["passed"], row
    assert row["detected"] and row["mitigated"]
    assert row["lost"] == 0 and row["duplicates"] == 0
    assert row["accepted"] == row["settled"] == 3  # 6 patients, every other one erased
    notes = " ".join(row["notes"]) if isinstance(row["notes"], list) else row["notes"]
    assert "left: nothing" in notes and "deny_purge refused: True" in notes
    assert "receipts verified 3/3" in notes and "2 replays" in notes
