"""Scenario 11 (PHI leak in push) runs once in its quick configuration, through the real daemon."""

from __future__ import annotations

import json
from pathlib import Path

from bench.chaos.__main__ import main
from bench.chaos.scenario_phi_leak import ROW, SCENARIO


def test_scenario_11_passes_in_quick_mode(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    assert main([str(ROW), "--quick", "--json", str(out)], scenarios={ROW: SCENARIO}) == 0
    [row] = json.loads(out.read_text())["scenarios"]
    assert row["id"] == ROW and row["passed"], row
    assert row["detected"] and row["mitigated"]
    assert row["lost"] == 0 and row["duplicates"] == 0
    # The refused rows count as accepted and settled, beside the good pushes.
    assert row["accepted"] == row["settled"] > 0
    assert "'leak': (422, 'phi_guard')" in row["notes"]
    assert row["detect_s"] is not None and row["detect_s"] >= 0
