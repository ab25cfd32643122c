"""The registry of implemented chaos scenarios, by catalog row id.

A later issue adds a row's scenario here when it builds the row's actor; the
harness reports every other row as "not implemented yet", naming the issue.
"""

from __future__ import annotations

from bench.chaos import (
    scenario_bounces,
    scenario_db,
    scenario_dlr,
    scenario_nats,
    scenario_poison,
    scenario_push,
    scenario_redelivery,
    scenario_redis,
    scenario_sms,
    scenario_templates,
)
from bench.chaos.harness import Scenario

SCENARIOS: dict[int, Scenario] = {
    scenario_db.ROW: Scenario(scenario_db.ROW, scenario_db.run_scenario),
    scenario_nats.ROW: Scenario(scenario_nats.ROW, scenario_nats.run_scenario),
    scenario_redis.SCENARIO.id: scenario_redis.SCENARIO,
    scenario_poison.ROW: Scenario(scenario_poison.ROW, scenario_poison.run_scenario),
    scenario_redelivery.SCENARIO.id: scenario_redelivery.SCENARIO,
    scenario_sms.SCENARIO.id: scenario_sms.SCENARIO,
    scenario_dlr.SCENARIO.id: scenario_dlr.SCENARIO,
    scenario_push.SCENARIO.id: scenario_push.SCENARIO,
    scenario_bounces.SCENARIO.id: scenario_bounces.SCENARIO,
    scenario_templates.SCENARIO.id: scenario_templates.SCENARIO,
}
