"""The registry of implemented chaos scenarios, by catalog row id.

Every scenario registers the one way: its module ``bench/chaos/scenario_*.py``
defines ``SCENARIO = Scenario(ROW, run_scenario)`` and is listed in
:data:`MODULES`. The catalog row's ``scenario`` names that file
(``config/failures.toml``; the tests check that the two agree); the harness
reports every other row as "not implemented yet", naming its state.
"""

from __future__ import annotations

from types import ModuleType
from typing import Final

from bench.chaos import (
    scenario_bounces,
    scenario_clock_skew,
    scenario_cross_tenant,
    scenario_db,
    scenario_dlr,
    scenario_erasure,
    scenario_fallback_loop,
    scenario_jitsi,
    scenario_join_token,
    scenario_nats,
    scenario_phi_leak,
    scenario_poison,
    scenario_push,
    scenario_recording,
    scenario_redelivery,
    scenario_redis,
    scenario_scanner,
    scenario_sms,
    scenario_templates,
    scenario_upload,
)
from bench.chaos.harness import Scenario

#: The scenario modules, each with its ``SCENARIO``.
MODULES: Final[tuple[ModuleType, ...]] = (
    scenario_sms,
    scenario_push,
    scenario_bounces,
    scenario_db,
    scenario_nats,
    scenario_redis,
    scenario_poison,
    scenario_join_token,
    scenario_dlr,
    scenario_redelivery,
    scenario_templates,
    scenario_scanner,
    scenario_upload,
    scenario_jitsi,
    scenario_fallback_loop,
    scenario_recording,
    scenario_cross_tenant,
    scenario_clock_skew,
    scenario_phi_leak,
    scenario_erasure,
)


def _registered(module: ModuleType) -> Scenario:
    scenario = module.SCENARIO
    if not isinstance(scenario, Scenario):
        raise TypeError(f"{module.__name__}.SCENARIO is not a Scenario")
    return scenario


SCENARIOS: dict[int, Scenario] = {
    scenario.id: scenario for scenario in sorted(map(_registered, MODULES), key=lambda s: s.id)
}
