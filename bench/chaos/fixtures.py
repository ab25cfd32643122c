"""What several scenarios set up the same way, on the asyncio side of the bridge."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import asyncpg
import trio

from engine.detectors import Detector

__all__ = ["create_tenants", "evaluate_every", "wait_until"]


async def create_tenants(url: str, count: int) -> list[uuid.UUID]:
    """``count`` new tenants, created as the owner (the daemon role may not create tenants)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "INSERT INTO tenants (name) SELECT 'tenant-' || g FROM generate_series(1, $1) g"
            " RETURNING id",
            count,
        )
        return [row["id"] for row in rows]
    finally:
        await conn.close()


async def wait_until(predicate: Callable[[], bool], timeout_s: float, tick_s: float = 0.02) -> bool:
    """Poll ``predicate`` (it reads state that no event signals) until true or the time is up."""
    deadline = trio.current_time() + timeout_s
    while not predicate():
        if trio.current_time() >= deadline:
            return False
        await trio.sleep(tick_s)
    return True


async def evaluate_every(detector: Detector, tick_s: float) -> None:
    """Evaluate ``detector`` every ``tick_s``, as the daemon's detector task does."""
    while True:
        detector.evaluate()
        await trio.sleep(tick_s)
