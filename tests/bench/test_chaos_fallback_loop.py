"""Chaos scenario 14 (fallback loop), once, in its quick configuration."""

from __future__ import annotations

import config
from bench.chaos.harness import ChaosContext, run_scenarios
from bench.chaos.scenario_fallback_loop import ROW, SCENARIO
from supervisors.vocabulary import METRICS, MITIGATIONS


async def test_scenario_14_passes_quick() -> None:
    path = config.default_path("chaos.toml")
    cfg = config.load_config(path)
    catalog = config.load_catalog(
        config.catalog_path(cfg, path), metrics=METRICS, mitigations=MITIGATIONS
    )
    [result] = await run_scenarios([ROW], {ROW: SCENARIO}, ChaosContext(cfg, catalog, quick=True))
    assert result.passed, result.notes
    assert result.detected and result.detect_s is not None and result.mitigated
    assert (result.lost, result.duplicates) == (0, 0)
    # 5 baseline visits, 4 patients x 12 loop visits, 8 visits of the bypassed replica.
    assert result.accepted == result.settled == 61
    assert "'patient-bypass': 2" in result.notes  # the database's cap (2) held the replica
