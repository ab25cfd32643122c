"""``python -m bench.chaos [ID ...|--all] [--json FILE] [--report DIR] [--config FILE] [--quick]``.

Runs the scenarios of the given catalog rows (all implemented ones when none are
given), prints one line per scenario and writes the JSON of DESIGN.md section 6::

    {"scenarios": [{"id", "name", "passed", "detected", "detect_s", "mitigated",
                    "accepted", "settled", "lost", "duplicates", "notes"}]}

With ``--report DIR``, each scenario is recorded and ``DIR/index.html`` written
(:mod:`bench.chaos.report`: the table of rows, and plots of throughput, latency and
breaker state over time with the fault windows shaded). While it runs, a progress
line per scenario goes to stderr (``[3/12] row 5 ... PASS in 12.3 s``).

Exit status 0 iff every scenario run passed; 2 on a usage or config error.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import msgspec

import config
from bench.chaos.harness import ChaosContext, Scenario, ScenarioResult, run
from bench.chaos.report import write_report
from bench.chaos.scenarios import SCENARIOS
from bench.chaos.timeline import Timeline
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


class _Progress:
    """One line per scenario on stderr: when it starts, and its verdict with its time."""

    def __init__(self) -> None:
        self.started = 0.0

    def __call__(
        self, index: int, total: int, row_id: int, name: str, result: ScenarioResult | None
    ) -> None:
        if result is None:
            self.started = time.monotonic()
            print(f"[{index}/{total}] row {row_id} {name} ...", file=sys.stderr, flush=True)
            return
        verdict = "PASS" if result.passed else "FAIL"
        took = time.monotonic() - self.started if self.started else 0.0
        print(f"[{index}/{total}] row {row_id} {verdict} in {took:.1f} s", file=sys.stderr,
              flush=True)  # fmt: skip
        self.started = 0.0


def main(
    argv: Sequence[str] | None = None, *, scenarios: Mapping[int, Scenario] = SCENARIOS
) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "ids", nargs="*", type=int, metavar="ID", help="catalog row ids (default: all implemented)"
    )
    parser.add_argument("--all", action="store_true", help="every implemented scenario")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the report here")
    parser.add_argument(
        "--report", type=Path, metavar="DIR", help="write an HTML report with plots into DIR"
    )
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
    if args.all and args.ids:
        parser.error("give row ids or --all, not both")
    ids = args.ids or sorted(scenarios)
    timelines: list[Timeline] | None = [] if args.report is not None else None
    results = run(
        ids,
        scenarios,
        ChaosContext(config=cfg, catalog=catalog, quick=args.quick),
        timelines=timelines,
        progress=_Progress(),
    )
    for result in results:
        print(_line(result))
    if args.json is not None:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(Report(results))) + b"\n")
    if args.report is not None and timelines is not None:
        index = write_report(args.report, results, timelines, catalog)
        print(f"report: {index}", file=sys.stderr)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
