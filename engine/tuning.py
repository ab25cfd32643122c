"""The live tunables: which breakers and bulkheads run on which ``[breakers.*]`` and
``[bulkheads.*]`` profile.

A config reload (:mod:`supervisors.reload`) retunes objects in place instead of
rebuilding them, so it must find them: every breaker and every bulkhead built from a
profile is registered here, under that profile's name, where it is created. The detectors
need no registry of their own: they all live in the tree's
:class:`~engine.detectors.DetectorSet`, by name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .breaker import Breaker
from .bulkhead import Bulkhead

if TYPE_CHECKING:
    from .recorder import InputRecorder

__all__ = ["Tunables"]


class Tunables:
    """The breakers of each ``[breakers.<profile>]`` and the bulkheads of each
    ``[bulkheads.<profile>]`` (several may share one profile)."""

    __slots__ = ("_breakers", "_bulkheads", "recorder")

    def __init__(self) -> None:
        self._breakers: dict[str, list[Breaker]] = {}
        self._bulkheads: dict[str, list[Bulkhead]] = {}
        #: When set, every breaker registered from now on has its inputs recorded.
        self.recorder: InputRecorder | None = None

    def breaker(self, profile: str, breaker: Breaker) -> Breaker:
        """Register ``breaker`` as built from ``[breakers.<profile>]``; returns it."""
        self._breakers.setdefault(profile, []).append(breaker)
        if self.recorder is not None:
            self.recorder.attach_breaker(breaker, profile)
        return breaker

    def breakers(self) -> dict[str, tuple[Breaker, ...]]:
        """Profile name -> the breakers built from it, in registration order."""
        return {profile: tuple(found) for profile, found in self._breakers.items()}

    def bulkhead(self, profile: str, bulkhead: Bulkhead) -> Bulkhead:
        """Register ``bulkhead`` as built from ``[bulkheads.<profile>]``; returns it."""
        self._bulkheads.setdefault(profile, []).append(bulkhead)
        return bulkhead

    def bulkheads(self) -> dict[str, tuple[Bulkhead, ...]]:
        """Profile name -> the bulkheads built from it, in registration order."""
        return {profile: tuple(found) for profile, found in self._bulkheads.items()}

    def find(self, name: str) -> Breaker | None:
        """The registered breaker named ``name``, if any."""
        for found in self._breakers.values():
            for breaker in found:
                if breaker.name == name:
                    return breaker
        return None
