"""The runtime bundle: clock, chance, event bus, metrics and the deadline service.

The daemon builds exactly one :class:`Runtime` and hands it to every supervisor
and actor it wires; tests build their own, seeded, on the MockClock. Nothing in
the engine reaches for a module-level default.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio

from .clock import Chance, Clock
from .deadlines import Deadlines
from .events import EventBus
from .metrics import Metrics
from .tuning import Tunables

__all__ = ["Runtime", "open_runtime"]


class Runtime:
    """What every engine component may need, passed explicitly."""

    __slots__ = ("chance", "clock", "deadlines", "events", "metrics", "tunables")

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        chance: Chance | None = None,
        events: EventBus | None = None,
        metrics: Metrics | None = None,
        deadlines: Deadlines | None = None,
    ) -> None:
        self.clock = clock if clock is not None else Clock()
        self.chance = chance if chance is not None else Chance()
        self.events = events if events is not None else EventBus()
        self.metrics = metrics
        self.deadlines = deadlines if deadlines is not None else Deadlines()
        #: What a config reload retunes in place (:mod:`engine.tuning`).
        self.tunables = Tunables()


@asynccontextmanager
async def open_runtime(
    *,
    seed: int | None = None,
    metrics: Metrics | None = None,
    wall: Callable[[], float] = time.time,
    events: EventBus | None = None,
) -> AsyncIterator[Runtime]:
    """Open a runtime whose deadline service runs until the block exits."""
    runtime = Runtime(clock=Clock(wall), chance=Chance(seed), events=events, metrics=metrics)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(runtime.deadlines.run)
            try:
                yield runtime
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The deadline task never raises, so a group here holds the body's own
        # exception alone: hand it back unwrapped, as if no nursery were involved.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
