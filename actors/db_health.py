"""A probe of the primary database: ``SELECT 1`` every tick, through its breaker.

:class:`DbHealth` is an actor. Its timer tells it :class:`Probe` every ``tick_s``
(the first probe runs at once, at start); each probe crosses the bridge once
with a ``SELECT 1`` on the pool, through a :class:`~engine.breaker.Breaker` built
from ``[breakers.postgres_primary]``: ``fail_max`` consecutive failures
(refused, reset, timed out) open the breaker; after ``reset_timeout_s`` the next
probes run half-open and close it again once the database answers.

Readiness does not ask the actor: the breaker is the shared truth (the writer
and the inbox count on it too, and a mitigation may force it), so the daemon
registers :func:`unavailable` on that breaker, which answers ``"database
unavailable"`` while it is open (forced too) or half-open, synchronously.

State machine (one log line per change, :class:`~engine.statelog.StateLog`)::

    UNKNOWN --probe answered--> AVAILABLE
    UNKNOWN/AVAILABLE --probe failed or refused--> UNAVAILABLE
    UNAVAILABLE --probe answered--> AVAILABLE

A probe never waits longer than ``timeout_s``, a backstop: the pool's
``connect_timeout_s`` and ``command_timeout_s`` bound it on the asyncio side
first, and those timeouts are what the breaker counts.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Sequence

import msgspec
import trio

from engine.actor import Actor, Timer
from engine.breaker import Breaker, CircuitState
from engine.errors import CircuitOpen, MailboxFull, ProviderError
from engine.statelog import StateLog
from providers.db.pool import DbPool, Pool

__all__ = [
    "PROBE",
    "UNAVAILABLE",
    "DbHealth",
    "DbHealthMessage",
    "DbHealthStatistics",
    "HealthState",
    "Probe",
    "unavailable",
]

UNAVAILABLE = "database unavailable"

log = logging.getLogger("triage.db_health")

# Breaker states in which the database counts as unavailable (disabled and
# metrics-only let every call through: the database is then taken as available).
_REFUSING = frozenset({CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.FORCED_OPEN})


def unavailable(breaker: Breaker) -> str | None:
    """``"database unavailable"`` while ``breaker`` is open (forced too) or half-open."""
    return UNAVAILABLE if breaker.state in _REFUSING else None


class HealthState(enum.Enum):
    UNKNOWN = "unknown"
    AVAILABLE = "available"
    UNAVAILABLE = "unavailable"


class Probe(msgspec.Struct, frozen=True, tag=True):
    """Probe the database now (the timer's tick)."""


PROBE = Probe()

DbHealthMessage = Probe


class DbHealthStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`DbHealth.statistics` reports (this incarnation's probes)."""

    state: HealthState
    probes: int
    failures: int


async def _select_one(pool: Pool) -> object:
    return await pool.fetchval("SELECT 1")


class DbHealth(Actor[DbHealthMessage]):
    """Probe ``pool`` every ``tick_s`` through ``breaker``; see the module docstring."""

    name = "db_health"

    def __init__(self, pool: DbPool, breaker: Breaker, *, tick_s: float, timeout_s: float) -> None:
        self.pool = pool
        self.breaker = breaker
        self.tick_s = tick_s
        self.timeout_s = timeout_s
        self.states = StateLog(
            "db health", HealthState.UNKNOWN, log, warn={HealthState.UNAVAILABLE}
        )
        self.probes = 0
        self.failures = 0

    async def init(self) -> None:
        # The first probe at once, not a tick later (a full mailbox: the tick comes).
        with contextlib.suppress(MailboxFull):
            self.ref.tell_nowait(PROBE)

    def timers(self) -> Sequence[Timer]:
        return [Timer(self.tick_s, PROBE)]

    def statistics(self) -> DbHealthStatistics:
        return DbHealthStatistics(
            state=self.states.state, probes=self.probes, failures=self.failures
        )

    async def handle(self, message: DbHealthMessage) -> None:
        match message:
            case Probe():
                answered = await self._probe()
                if answered:
                    self.states.enter(HealthState.AVAILABLE, "probe answered")
                else:
                    self.states.enter(
                        HealthState.UNAVAILABLE, f"breaker {self.breaker.state.value}"
                    )

    async def _probe(self) -> bool:
        """One probe: True if the database answered."""
        self.probes += 1
        with trio.move_on_after(self.timeout_s) as scope:
            try:
                await self.breaker.call(self.pool.run_unit, _select_one)
            except CircuitOpen:
                return False
            except ProviderError as exc:
                self.failures += 1
                log.warning("database probe failed", extra={"error": str(exc)})
                return False
            return True
        if scope.cancelled_caught:  # a backstop: the asyncio-side timeouts come first
            self.failures += 1
            log.warning("database probe timed out", extra={"timeout_s": self.timeout_s})
        return False
