"""Chaos scenario 12 (cross-tenant participant), once, in its quick configuration."""

from __future__ import annotations

import config
from bench.chaos.harness import ChaosContext, run_scenarios
from bench.chaos.scenarios import SCENARIOS
from supervisors.vocabulary import METRICS, MITIGATIONS


async def test_scenario_12_passes_quick() -> None:
    path = config.default_path("chaos.toml")
    cfg = config.load_config(path)
    catalog = config.load_catalog(
        config.catalog_path(cfg, path), metrics=METRICS, mitigations=MITIGATIONS
    )
    [result] = await run_scenarios([12], SCENARIOS, ChaosContext(cfg, catalog, quick=True))
    assert result.passed, result.notes
    assert result.detected and result.detect_s is not None
    assert result.mitigated
    assert (result.lost, result.duplicates) == (0, 0)
    assert result.accepted == result.settled == 20
    assert "refused by RLS with 42501: 6, accepted 0" in result.notes
