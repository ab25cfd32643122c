"""A probe of the primary database: ``SELECT 1`` every tick, through its breaker.

:class:`DbHealth` runs as a supervised child (``run`` is its start function). Each
tick it crosses the bridge once with a ``SELECT 1`` on the pool, through a
:class:`~engine.breaker.Breaker` built from ``[breakers.postgres_primary]``:
``fail_max`` consecutive failures (refused, reset, timed out) open the breaker;
after ``reset_timeout_s`` the next probes run half-open and close it again once
the database answers. While the breaker is open (or forced open) or half-open,
:meth:`DbHealth.unavailable` returns ``"database unavailable"``, which the
daemon's readiness turns into a 503.

A probe never waits longer than ``timeout_s``, a backstop: the pool's
``connect_timeout_s`` and ``command_timeout_s`` bound it on the asyncio side
first, and those timeouts are what the breaker counts.
"""

from __future__ import annotations

import logging

import trio

from engine.breaker import Breaker, CircuitState
from engine.errors import CircuitOpen, ProviderError
from providers.db.pool import DbPool, Pool

__all__ = ["UNAVAILABLE", "DbHealth"]

UNAVAILABLE = "database unavailable"

log = logging.getLogger("triage.db_health")

# Breaker states in which the database counts as unavailable (disabled and
# metrics-only let every call through: the database is then taken as available).
_REFUSING = frozenset({CircuitState.OPEN, CircuitState.HALF_OPEN, CircuitState.FORCED_OPEN})


async def _select_one(pool: Pool) -> object:
    return await pool.fetchval("SELECT 1")


class DbHealth:
    """Probe ``pool`` every ``tick_s`` through ``breaker``; see the module docstring."""

    def __init__(self, pool: DbPool, breaker: Breaker, *, tick_s: float, timeout_s: float) -> None:
        self.pool = pool
        self.breaker = breaker
        self.tick_s = tick_s
        self.timeout_s = timeout_s
        self.probes = 0
        self.failures = 0

    def unavailable(self) -> str | None:
        """``"database unavailable"`` while the breaker is open (forced too) or half-open."""
        return UNAVAILABLE if self.breaker.state in _REFUSING else None

    async def probe(self) -> bool:
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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self.probe()
            await trio.sleep(self.tick_s)
