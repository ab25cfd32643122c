"""Chaos scenario 4 (virtual room unreachable), once, in its quick configuration."""

from __future__ import annotations

import config
from bench.chaos.harness import ChaosContext, run_scenarios
from bench.chaos.scenario_jitsi import ROW, SCENARIO
from supervisors.vocabulary import METRICS, MITIGATIONS


async def test_scenario_4_passes_quick() -> None:
    path = config.default_path("chaos.toml")
    cfg = config.load_config(path)
    catalog = config.load_catalog(
        config.catalog_path(cfg, path), metrics=METRICS, mitigations=MITIGATIONS
    )
    [result] = await run_scenarios([ROW], {ROW: SCENARIO}, ChaosContext(cfg, catalog, quick=True))
    assert result.passed, result.notes
    assert result.detected and result.detect_s is not None and result.mitigated
    assert (result.lost, result.duplicates) == (0, 0)
    assert result.accepted == result.settled == 42
    assert "page notices 1" in result.notes and "failed 0;" in result.notes
