"""Time and chance, injectable.

Everything that *waits* uses Trio time (``trio.current_time()``, ``trio.sleep``), so
tests run on ``MockClock(autojump_threshold=0)`` with exact assertions. Wall-clock
time (timestamps in events, logs) comes from one injectable :class:`Clock`; every
random choice (jitter) comes from one seedable :class:`Chance`, so a whole
supervision tree can be replayed from a seed.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable

import trio

__all__ = ["Chance", "Clock"]


class Clock:
    """Monotonic time from Trio, wall time from an injectable function."""

    __slots__ = ("_wall",)

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall

    @staticmethod
    def now() -> float:
        """Trio's clock: monotonic seconds, virtual under MockClock."""
        return trio.current_time()

    def wall(self) -> float:
        """Seconds since the epoch, for timestamps only; never for waiting."""
        return self._wall()


class Chance:
    """A seedable source of randomness that hands out independent named streams.

    ``fork(name)`` derives a child generator from the seed and the name only, so
    adding a component never shifts the random draws of another one.
    """

    __slots__ = ("_rng", "seed")

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed if seed is not None else random.SystemRandom().getrandbits(63)
        self._rng = random.Random(self.seed)

    def fork(self, name: str) -> Chance:
        digest = hashlib.blake2b(f"{self.seed}:{name}".encode(), digest_size=8).digest()
        return Chance(int.from_bytes(digest, "big") >> 1)

    def random(self) -> float:
        return self._rng.random()

    def uniform(self, low: float, high: float) -> float:
        return self._rng.uniform(low, high)

    def jitter(self, value: float, factor: float) -> float:
        """``value`` scaled by a random factor in ``[1, 1 + factor]`` (OTP's random_factor)."""
        if factor <= 0:
            return value
        return value * (1.0 + self._rng.random() * factor)
