"""What happened when, during one chaos scenario: the report's raw material.

While :func:`recording` is active (the harness opens one per scenario when a report
is asked for), a :class:`Timeline` collects, on the monotonic clock from the
scenario's start:

- the ledger's accounting (:class:`~bench.chaos.harness.Ledger` notes every accept,
  settle and receipt here): throughput over time, and latency as each key's settle
  time minus its accept time;
- every engine event of every bus in the process (:func:`engine.events.tap`):
  breaker state changes, detectors firing and clearing;
- the fault windows a scenario marks with ``with fault("NATS stopped"):`` (or
  :func:`fault_started` / :func:`fault_ended` when the window spans code).

Without an active recording every function here is a no-op, so scenarios mark their
faults unconditionally.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from engine.events import BreakerStateChanged, DetectorCleared, DetectorFired, Event, tap

__all__ = [
    "Timeline",
    "current",
    "fault",
    "fault_ended",
    "fault_started",
    "note",
    "recording",
]

#: Breaker states as the plots draw them (engine.breaker.CircuitState values).
BREAKER_LEVELS = {"closed": 0, "half-open": 1, "open": 2, "forced-open": 2}


@dataclass
class Timeline:
    """One scenario's record; times are seconds since ``started``."""

    scenario: int
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    ledger: list[tuple[float, str, str]] = field(default_factory=list)  # (t, kind, key)
    breakers: list[tuple[float, str, str]] = field(default_factory=list)  # (t, name, state)
    detectors: list[tuple[float, str, bool]] = field(default_factory=list)  # (t, name, firing)
    faults: list[tuple[str, float, float | None]] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.started

    def on_event(self, event: Event) -> None:
        match event:
            case BreakerStateChanged(breaker=name, new=new):
                self.breakers.append((self.now(), name, new))
            case DetectorFired(detector=name):
                self.detectors.append((self.now(), name, True))
            case DetectorCleared(detector=name):
                self.detectors.append((self.now(), name, False))

    @property
    def duration(self) -> float:
        return self.ended if self.ended is not None else self.now()

    def latencies(self) -> list[tuple[float, float]]:
        """(settle time, settle - accept) for each key accepted and then settled."""
        accepted: dict[str, float] = {}
        out: list[tuple[float, float]] = []
        for t, kind, key in self.ledger:
            if kind == "accept":
                accepted.setdefault(key, t)
            elif kind == "settle" and key in accepted:
                out.append((t, t - accepted.pop(key)))
        return out

    def fault_windows(self) -> list[tuple[str, float, float]]:
        end = self.duration
        return [(label, a, b if b is not None else end) for label, a, b in self.faults]


_current: Timeline | None = None


def current() -> Timeline | None:
    return _current


@contextmanager
def recording(scenario: int) -> Iterator[Timeline]:
    """Record the scenario that runs inside the block (one at a time)."""
    global _current
    timeline = Timeline(scenario)
    previous, _current = _current, timeline
    untap = tap(timeline.on_event)
    try:
        yield timeline
    finally:
        untap()
        timeline.ended = timeline.now()
        _current = previous


def note(kind: str, key: str) -> None:
    """The ledger's hook: ``kind`` is accept, settle or receive."""
    if _current is not None:
        _current.ledger.append((_current.now(), kind, key))


def fault_started(label: str) -> None:
    if _current is not None:
        _current.faults.append((label, _current.now(), None))


def fault_ended(label: str) -> None:
    if _current is None:
        return
    for i in range(len(_current.faults) - 1, -1, -1):
        name, start, end = _current.faults[i]
        if name == label and end is None:
            _current.faults[i] = (name, start, _current.now())
            return


@contextmanager
def fault(label: str) -> Iterator[None]:
    """Mark the block as a fault window (shaded in the report's plots)."""
    fault_started(label)
    try:
        yield
    finally:
        fault_ended(label)
