"""``python -m bench.perf SUITE --json FILE [--quick] [--repeat N]``.

Runs one perf suite, prints a table, writes the JSON the checks read::

    {"suite": "actors", "results": [{"name", "value", "unit", "baseline",
      "baseline_value", "ratio", "target", "passed", "note", "details",
      "samples", "baseline_samples"}]}

``ratio`` is always ours / baseline, both measured in this run. Exit status 0 when
every result met its target, 1 when one missed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from bench.perf import actors, dispatch, http1, relay, scale
from bench.perf.common import Result, render_table

SuiteRunner = Callable[[bool, int, Callable[[str], None] | None], list[Result]]


def _actors(quick: bool, repeat: int, progress: Callable[[str], None] | None) -> list[Result]:
    sizes = actors.Sizes.quick() if quick else actors.Sizes.full()
    return actors.run_suite(sizes, repeat=repeat, progress=progress)


def _relay(quick: bool, repeat: int, progress: Callable[[str], None] | None) -> list[Result]:
    return relay.run_suite(1_000 if quick else 20_000, repeat=repeat, progress=progress)


def _dispatch(quick: bool, repeat: int, progress: Callable[[str], None] | None) -> list[Result]:
    sizes = dispatch.Sizes.quick() if quick else dispatch.Sizes.full()
    return dispatch.run_suite(sizes, repeat=repeat, progress=progress)


def _http1(quick: bool, repeat: int, progress: Callable[[str], None] | None) -> list[Result]:
    return http1.run_suite(300 if quick else http1.REQUESTS, repeat=repeat, progress=progress)


def _scale(quick: bool, repeat: int, progress: Callable[[str], None] | None) -> list[Result]:
    return scale.run_suite(200 if quick else 2_000, repeat=repeat, progress=progress)


SUITES: dict[str, SuiteRunner] = {
    "actors": _actors,
    "dispatch": _dispatch,
    "http1": _http1,
    "relay": _relay,
    "scale": _scale,
}


class Report(msgspec.Struct):
    suite: str
    results: list[Result]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.perf",
        description="Run a perf suite; each contender runs in a fresh subprocess.",
    )
    parser.add_argument("suite", choices=sorted(SUITES))
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results here")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one round: checks it runs, not speed"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        metavar="N",
        help="rounds per result, best kept (default 5; 1 with --quick)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log each subprocess run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 5)
    if repeat < 1:
        print("--repeat must be >= 1", file=sys.stderr)
        return 2

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = SUITES[args.suite](args.quick, repeat, progress if args.verbose else None)
    if args.json is not None:
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(Report(args.suite, results))))
    print(render_table(args.suite, results))
    missed = [r.name for r in results if not r.passed]
    if missed:
        print(f"targets missed: {', '.join(missed)}")
        return 1
    print("all targets met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
