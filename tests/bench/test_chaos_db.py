"""Chaos scenario 5 (database unavailable), once, in its quick configuration: it must not rot."""

from __future__ import annotations

import config
from bench.chaos.harness import ChaosContext, run_scenarios
from bench.chaos.scenarios import SCENARIOS
from supervisors.vocabulary import METRICS, MITIGATIONS


async def test_scenario_5_passes_quick() -> None:
    path = config.default_path("chaos.toml")
    cfg = config.load_config(path)
    catalog = config.load_catalog(
        config.catalog_path(cfg, path), metrics=METRICS, mitigations=MITIGATIONS
    )
    [result] = await run_scenarios([5], SCENARIOS, ChaosContext(cfg, catalog, quick=True))
    assert result.passed, result.notes
    assert result.detected and result.detect_s is not None
    assert result.detect_s < cfg.detectors["db_connection_errors"].window_s + 5
    assert result.mitigated
    assert (result.lost, result.duplicates) == (0, 0)
    assert result.accepted == result.settled > 0
