"""The chaos harness: scenarios that inject a catalog row's real trigger and judge from outside.

A :class:`Scenario` owns its servers: it starts them, drives load, injects the
trigger (stop the NATS process, stop PostgreSQL, flush Redis, insert a poison
event, withhold acks…) and reports what it saw as an :class:`Outcome`. The
harness adds the verdict. A scenario passes only when

* the row's detector **fired** (``detect_s`` after the trigger),
* its mitigation **happened**,
* nothing was **lost** — every accepted item is settled or still durably queued —
* and nothing was **duplicated** (counted by whoever received the items).

Detection windows are shortened through the scenario's config
(``config/chaos.toml``), never by changing code.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial

import msgspec
import trio

from bench.chaos import timeline
from config import Catalog, TriageConfig

__all__ = ["ChaosContext", "Ledger", "Outcome", "Scenario", "ScenarioResult", "run_scenarios"]


class ScenarioResult(msgspec.Struct, kw_only=True):
    """One scenario's verdict, in the JSON contract of DESIGN.md section 6."""

    id: int
    name: str
    passed: bool
    detected: bool
    detect_s: float | None
    mitigated: bool
    accepted: int
    settled: int
    lost: int
    duplicates: int
    notes: str


class Ledger:
    """Accounting from the outside: what was accepted, settled, still queued, received how often."""

    def __init__(self) -> None:
        self.accepted: set[str] = set()
        self.settled: set[str] = set()
        self.queued: set[str] = set()
        self.received: Counter[str] = Counter()

    def accept(self, key: str) -> None:
        self.accepted.add(key)
        timeline.note("accept", key)

    def settle(self, key: str) -> None:
        self.settled.add(key)
        self.queued.discard(key)
        timeline.note("settle", key)

    def still_queued(self, keys: Iterable[str]) -> None:
        """Items found durably queued (in the outbox, the spool …) at the end of the run."""
        self.queued.update(k for k in keys if k not in self.settled)

    def receive(self, key: str) -> None:
        """The far side (a NATS subscriber, a provider emulator) got ``key`` once more."""
        self.received[key] += 1
        timeline.note("receive", key)

    @property
    def lost(self) -> int:
        return len(self.accepted - self.settled - self.queued)

    @property
    def duplicates(self) -> int:
        return sum(n - 1 for n in self.received.values() if n > 1)


@dataclass
class Outcome:
    """What a scenario observed; the harness turns it into a verdict."""

    detected: bool
    detect_s: float | None
    mitigated: bool
    ledger: Ledger
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ChaosContext:
    config: TriageConfig
    catalog: Catalog
    quick: bool


@dataclass(frozen=True)
class Scenario:
    id: int
    run: Callable[[ChaosContext], Awaitable[Outcome]]


def _verdict(row_id: int, name: str, outcome: Outcome) -> ScenarioResult:
    ledger = outcome.ledger
    passed = outcome.detected and outcome.mitigated and ledger.lost == 0 and ledger.duplicates == 0
    return ScenarioResult(
        id=row_id,
        name=name,
        passed=passed,
        detected=outcome.detected,
        detect_s=outcome.detect_s,
        mitigated=outcome.mitigated,
        accepted=len(ledger.accepted),
        settled=len(ledger.settled),
        lost=ledger.lost,
        duplicates=ledger.duplicates,
        notes="; ".join(outcome.notes),
    )


def _not_run(row_id: int, name: str, why: str) -> ScenarioResult:
    return ScenarioResult(
        id=row_id, name=name, passed=False, detected=False, detect_s=None, mitigated=False,
        accepted=0, settled=0, lost=0, duplicates=0, notes=why,
    )  # fmt: skip


async def run_scenarios(
    ids: Iterable[int],
    scenarios: Mapping[int, Scenario],
    context: ChaosContext,
    *,
    timelines: list[timeline.Timeline] | None = None,
    progress: Progress | None = None,
) -> list[ScenarioResult]:
    """Run each requested scenario in turn; a scenario that raises fails with the error as its note.

    With ``timelines``, each scenario run is recorded (:mod:`bench.chaos.timeline`) and its
    timeline appended; ``progress(index, total, row_id, name, result)`` is called before
    each scenario that runs (``result`` None) and after every one."""
    ids = list(ids)
    results: list[ScenarioResult] = []
    for index, row_id in enumerate(ids, 1):
        result = await _run_one(row_id, scenarios, context, timelines, (index, len(ids), progress))
        results.append(result)
        if progress is not None:
            progress(index, len(ids), row_id, result.name, result)
    return results


#: ``progress(index, total, row_id, name, result or None)``.
Progress = Callable[[int, int, int, str, "ScenarioResult | None"], None]


async def _run_one(
    row_id: int,
    scenarios: Mapping[int, Scenario],
    context: ChaosContext,
    timelines: list[timeline.Timeline] | None,
    where: tuple[int, int, Progress | None],
) -> ScenarioResult:
    try:
        row = context.catalog.row(row_id)
    except KeyError:
        return _not_run(row_id, "?", f"no catalog row {row_id}")
    scenario = scenarios.get(row_id)
    if scenario is None:
        state = context.catalog.state(row)
        return _not_run(row_id, row.name, f"scenario not implemented yet ({state})")
    index, total, progress = where
    if progress is not None:
        progress(index, total, row_id, row.name, None)
    with contextlib.ExitStack() as stack:
        if timelines is not None:
            timelines.append(stack.enter_context(timeline.recording(row_id)))
        try:
            outcome = await scenario.run(context)
        except Exception as exc:  # a broken scenario is a failed scenario, never a crash
            return _not_run(row_id, row.name, f"scenario raised {exc!r}")
    return _verdict(row_id, row.name, outcome)


def run(
    ids: Iterable[int],
    scenarios: Mapping[int, Scenario],
    context: ChaosContext,
    *,
    timelines: list[timeline.Timeline] | None = None,
    progress: Progress | None = None,
) -> list[ScenarioResult]:
    """Synchronous entry: one ``trio.run`` for the whole batch."""
    return trio.run(
        partial(run_scenarios, timelines=timelines, progress=progress),
        list(ids),
        scenarios,
        context,
    )
