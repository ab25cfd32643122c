"""``python -m bench.chaos [ID ...] [--json FILE] [--config FILE] [--quick]``.

Runs the scenarios of the given catalog rows (all implemented ones when none are
given), prints one line per scenario and writes the JSON of DESIGN.md section 6::

    {"scenarios": [{"id", "name", "passed", "detected", "detect_s", "mitigated",
                    "accepted", "settled", "lost", "duplicates", "notes"}]}

Exit status 0 iff every scenario run passed; 2 on a usage or config error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

import config
from bench.chaos.harness import ChaosContext, Scenario, ScenarioResult, run
from bench.chaos.scenarios import SCENARIOS
from supervisors.tree import built_catalog
from supervisors.vocabulary import METRICS, MITIGATIONS


class Report(msgspec.Struct):
    scenarios: list[ScenarioResult]


def _line(result: ScenarioResult) -> str:
    verdict = "PASS" if result.passed else "FAIL"
    detect = "-" if result.detect_s is None else f"{result.detect_s:.2f}s"
    return (
        f"{verdict} {result.id:>2} {result.name:<32} detected={result.detected} ({detect})"
        f" mitigated={result.mitigated} accepted={result.accepted} settled={result.settled}"
        f" lost={result.lost} duplicates={result.duplicates}"
        + (f"  # {result.notes}" if result.notes else "")
    )


def main(
    argv: Sequence[str] | None = None, *, scenarios: Mapping[int, Scenario] = SCENARIOS
) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "ids", nargs="*", type=int, metavar="ID", help="catalog row ids (default: all implemented)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the report here")
    parser.add_argument("--config", type=Path, default=config.default_path("chaos.toml"))
    parser.add_argument("--quick", action="store_true", help="small loads: what `make test` runs")
    args = parser.parse_args(argv)
    try:
        cfg = config.load_config(args.config)
        catalog = built_catalog(
            config.load_catalog(
                config.catalog_path(cfg, args.config), metrics=METRICS, mitigations=MITIGATIONS
            )
        )
    except config.ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    ids = args.ids or sorted(scenarios)
    results = run(ids, scenarios, ChaosContext(config=cfg, catalog=catalog, quick=args.quick))
    for result in results:
        print(_line(result))
    if args.json is not None:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(Report(results))) + b"\n")
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
