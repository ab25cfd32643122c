"""The chaos harness: verdicts, accounting and the JSON contract, with stand-in scenarios.

(The real scenarios run against real servers in their own tests; here the harness
itself is under test, so its scenarios are trivial coroutines.)
"""

from __future__ import annotations

import json
from pathlib import Path

import trio

from bench.chaos.__main__ import main
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario

KEYS = ["id", "name", "passed", "detected", "detect_s", "mitigated", "accepted",
        "settled", "lost", "duplicates", "notes"]  # fmt: skip


def test_ledger_counts_lost_and_duplicates() -> None:
    ledger = Ledger()
    for key in "abcd":
        ledger.accept(key)
    ledger.settle("a")
    ledger.settle("b")
    ledger.still_queued(["c", "a"])  # c is durably queued; a already settled
    for key in ["a", "a", "a", "b"]:
        ledger.receive(key)
    assert ledger.lost == 1  # d: accepted, never settled, not queued
    assert ledger.duplicates == 2
    assert ledger.queued == {"c"}


async def _good(ctx: ChaosContext) -> Outcome:
    await trio.lowlevel.checkpoint()
    ledger = Ledger()
    ledger.accept("x")
    ledger.settle("x")
    ledger.receive("x")
    return Outcome(detected=True, detect_s=1.5, mitigated=True, ledger=ledger, notes=["ok"])


async def _lossy(ctx: ChaosContext) -> Outcome:
    ledger = Ledger()
    ledger.accept("x")
    return Outcome(detected=True, detect_s=0.1, mitigated=True, ledger=ledger)


async def _broken(ctx: ChaosContext) -> Outcome:
    raise RuntimeError("server did not start")


def test_passing_scenarios_exit_zero_with_the_contract_json(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    assert main(["6", "--json", str(out)], scenarios={6: Scenario(6, _good)}) == 0
    report = json.loads(out.read_text())
    [row] = report["scenarios"]
    assert list(row) == KEYS
    assert row["id"] == 6
    assert row["name"] == "NATS unavailable"
    assert (row["passed"], row["detect_s"], row["lost"], row["duplicates"]) == (True, 1.5, 0, 0)


def test_a_lost_item_a_broken_scenario_or_a_missing_one_fails(tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    scenarios = {5: Scenario(5, _lossy), 7: Scenario(7, _broken)}
    assert main(["5", "7", "4", "--json", str(out)], scenarios=scenarios) == 1
    rows = {r["id"]: r for r in json.loads(out.read_text())["scenarios"]}
    assert rows[5]["lost"] == 1 and not rows[5]["passed"]
    assert "server did not start" in rows[7]["notes"] and not rows[7]["passed"]
    assert "not implemented yet" in rows[4]["notes"] and not rows[4]["passed"]


def test_bad_config_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon\n")
    assert main(["6", "--config", str(bad)], scenarios={}) == 2


def test_every_scenario_registers_one_way_and_the_catalog_names_its_file() -> None:
    """``SCENARIO = Scenario(ROW, run_scenario)`` in each module; the row names that file."""
    from bench.chaos.scenarios import MODULES, SCENARIOS
    from config import default_path, load_catalog
    from config.catalog import module_path, project_root
    from supervisors.tree import built_catalog
    from supervisors.vocabulary import METRICS, MITIGATIONS

    catalog = built_catalog(
        load_catalog(default_path("failures.toml"), metrics=METRICS, mitigations=MITIGATIONS)
    )
    assert len(SCENARIOS) == len(MODULES)
    for module in MODULES:
        scenario = module.SCENARIO
        assert isinstance(scenario, Scenario)
        assert SCENARIOS[scenario.id] is scenario
        assert catalog.row(scenario.id).scenario == module_path(module.__name__)
    # Every catalog row whose scenario file exists is registered, and every built row runs.
    on_disk = {r.id for r in catalog.rows if (project_root() / r.scenario).is_file()}
    assert on_disk == set(SCENARIOS)
    assert catalog.built <= set(SCENARIOS)


def test_the_row_constants_of_the_actors_match_the_catalog() -> None:
    """The tree and the channels take row ids from the owning actor module's constant."""
    from actors import (
        bounce_tracker,
        db_writer,
        dlr_ingress,
        failover,
        idempotency,
        inbox,
        outbox_relay,
        push_feedback,
        templates,
    )  # fmt: skip
    from config import default_path, load_catalog
    from config.catalog import module_path
    from supervisors.channels import CHANNEL_MODULES, CHANNEL_ROWS
    from supervisors.vocabulary import METRICS, MITIGATIONS

    catalog = load_catalog(default_path("failures.toml"), metrics=METRICS, mitigations=MITIGATIONS)
    owned = {
        failover: [failover.ROW], push_feedback: [push_feedback.ROW],
        bounce_tracker: [bounce_tracker.ROW], db_writer: [db_writer.ROW],
        outbox_relay: [outbox_relay.LAG_ROW, outbox_relay.CRASH_LOOP_ROW],
        idempotency: [idempotency.ROW], dlr_ingress: [dlr_ingress.ROW], inbox: [inbox.ROW],
        templates: [templates.ROW],
    }  # fmt: skip
    for module, rows in owned.items():
        for row_id in rows:
            assert catalog.row(row_id).module == module_path(module.__name__), row_id
    assert {catalog.row(r).module for r in CHANNEL_ROWS} == CHANNEL_MODULES
