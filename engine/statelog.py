"""The visible state of an actor: one Enum member at a time, one log line per change.

Every actor's state machine is an ``Enum``; :class:`StateLog` holds the current
member and logs each transition once, with the reason, at ``WARNING`` when the
new state is one the operator should look at (``warn``) and ``INFO`` otherwise.
Entering the state the actor is already in logs nothing, so a loop that keeps
confirming "connected" stays quiet.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Collection
from typing import Generic, TypeVar

__all__ = ["StateLog"]

S = TypeVar("S", bound=enum.Enum)


class StateLog(Generic[S]):
    """The current state of the actor ``name``, logged on ``log`` when it changes."""

    __slots__ = ("_log", "_warn", "name", "since", "state")

    def __init__(
        self, name: str, initial: S, log: logging.Logger, *, warn: Collection[S] = ()
    ) -> None:
        self.name = name
        self.state = initial
        self.since: float | None = None
        self._log = log
        self._warn = frozenset(warn)

    def enter(self, state: S, reason: str, *, at: float | None = None) -> bool:
        """Move to ``state``; True (and one log line) if that is a change."""
        if state is self.state:
            return False
        old, self.state = self.state, state
        self.since = at
        level = logging.WARNING if state in self._warn else logging.INFO
        self._log.log(level, "%s: %s -> %s (%s)", self.name, old.value, state.value, reason)
        return True

    def __repr__(self) -> str:
        return f"<StateLog {self.name} {self.state.value}>"
