"""What every perf suite shares: fresh-subprocess runs, alternation, results, the table.

The method (msgspec's benchmarks are the model):

* every measurement runs in a **fresh interpreter** (``python -c``), so contenders
  never share a heap, a GC history or a warmed allocator;
* the parent repeats each measurement ``repeat`` times and **rotates the order** of
  the contenders every round (ours first, then the baseline first, ...), so slow
  drift of a busy machine falls on both sides alike;
* each side keeps its **best** sample (fastest time, highest rate, smallest
  footprint): noise only ever makes a sample worse, so the best one is the closest
  to what the code costs.

A worker is a function ``(int) -> dict[str, float]`` in a ``CASES`` mapping of the
suite's module; :func:`worker_entry` runs one in the child and prints its dict as
one JSON line, which :func:`run_worker` reads back. Timing inside the worker uses
``time.perf_counter`` and excludes interpreter start-up and imports.
"""

from __future__ import annotations

import enum
import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import msgspec

__all__ = [
    "Better",
    "Result",
    "Target",
    "WorkerError",
    "best",
    "measure_alternating",
    "render_table",
    "run_worker",
    "worker_entry",
]

#: The directory holding the ``bench`` package: workers run from there.
ROOT = Path(__file__).resolve().parents[2]

Worker = Callable[[int], dict[str, float]]


class WorkerError(RuntimeError):
    """A worker subprocess failed or printed no result."""


class Better(enum.Enum):
    """Which way a measured quantity improves."""

    HIGHER = "higher"
    LOWER = "lower"


class Target(msgspec.Struct, frozen=True):
    """A pass condition on one field of a result: ``field op bound``."""

    field: str  # "value" or "ratio"
    op: str  # ">=" or "<="
    bound: float

    def met(self, value: float, ratio: float) -> bool:
        measured = value if self.field == "value" else ratio
        return measured >= self.bound if self.op == ">=" else measured <= self.bound

    def __str__(self) -> str:
        return f"{self.field} {self.op} {self.bound:g}"


class Result(msgspec.Struct, kw_only=True):
    """One line of a suite's JSON: the contract fields first, then extras."""

    name: str
    value: float
    unit: str
    baseline: str
    baseline_value: float
    ratio: float
    target: str
    passed: bool
    note: str = ""
    details: dict[str, float] = msgspec.field(default_factory=dict)
    samples: list[float] = msgspec.field(default_factory=list)
    baseline_samples: list[float] = msgspec.field(default_factory=list)

    @classmethod
    def build(
        cls,
        *,
        name: str,
        unit: str,
        baseline: str,
        samples: Sequence[float],
        baseline_samples: Sequence[float],
        better: Better,
        targets: Sequence[Target],
        note: str = "",
        details: Mapping[str, float] | None = None,
    ) -> Result:
        """Keep the best sample of each side; ratio is always ours / baseline."""
        value = best(samples, better)
        baseline_value = best(baseline_samples, better)
        ratio = value / baseline_value if baseline_value else float("inf")
        return cls(
            name=name,
            value=value,
            unit=unit,
            baseline=baseline,
            baseline_value=baseline_value,
            ratio=ratio,
            target=" and ".join(str(t) for t in targets),
            passed=all(t.met(value, ratio) for t in targets),
            note=note,
            details=dict(details or {}),
            samples=list(samples),
            baseline_samples=list(baseline_samples),
        )


def best(samples: Sequence[float], better: Better) -> float:
    if not samples:
        raise ValueError("no samples")
    return max(samples) if better is Better.HIGHER else min(samples)


def run_worker(module: str, case: str, n: int, *, timeout_s: float = 600.0) -> dict[str, float]:
    """Run ``module.CASES[case](n)`` in a fresh interpreter and return its dict."""
    argv = [
        sys.executable,
        "-c",
        "from bench.perf.common import worker_entry; worker_entry()",
        module,
        case,
        str(n),
    ]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise WorkerError(
            f"worker {module}:{case}({n}) exited {proc.returncode}\n{proc.stderr.strip()}"
        )
    result = json.loads(lines[-1])
    if not isinstance(result, dict):
        raise WorkerError(f"worker {module}:{case}({n}) printed {lines[-1]!r}")
    return {str(k): float(v) for k, v in result.items()}


def worker_entry() -> None:
    """The child's side of :func:`run_worker`: ``argv = [module, case, n]``."""
    module, case, n = sys.argv[1:4]
    cases: Mapping[str, Worker] = importlib.import_module(module).CASES
    print(json.dumps(cases[case](int(n))), flush=True)


def measure_alternating(
    module: str,
    contenders: Sequence[tuple[str, int]],
    *,
    repeat: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, list[dict[str, float]]]:
    """Run every ``(case, n)`` ``repeat`` times, rotating their order each round."""
    samples: dict[str, list[dict[str, float]]] = {case: [] for case, _ in contenders}
    for round_ in range(repeat):
        shift = round_ % len(contenders)
        for case, n in [*contenders[shift:], *contenders[:shift]]:
            if progress is not None:
                progress(f"  round {round_ + 1}/{repeat}: {case} n={n}")
            samples[case].append(run_worker(module, case, n))
    return samples


def _fmt(value: float) -> str:
    if value == 0 or 1e-3 <= abs(value) < 1e7:
        return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{value:.3e}"


def render_table(suite: str, results: Sequence[Result]) -> str:
    """A fixed-width table for people; the JSON is for machines."""
    header = ("result", "ours", "baseline", "unit", "ratio", "target", "")
    rows = [
        (
            r.name,
            _fmt(r.value),
            _fmt(r.baseline_value),
            r.unit,
            f"{r.ratio:.3f}",
            r.target,
            "ok" if r.passed else "MISSED",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {1, 2, 4}

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    out = [f"suite: {suite}", line(header), line(["-" * w for w in widths])]
    out.extend(line(row) for row in rows)
    for r in results:
        extra = [f"baseline = {r.baseline}"]
        if r.note:
            extra.append(r.note)
        if r.details:
            extra.append(", ".join(f"{k} = {_fmt(v)}" for k, v in r.details.items()))
        out.append(f"  {r.name}: " + "; ".join(extra))
    return "\n".join(out)
