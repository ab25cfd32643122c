"""The daemon's asyncpg pool, seen from Trio: opened, used and closed one crossing at a time.

::

    async with open_bridge():
        async with open_pool(url, config.database) as pool:   # one crossing; role verified
            n = await pool.run_unit(count_rows, tenant)       # count_rows(asyncpg_pool, tenant)
        # closed here: one shielded crossing, bounded by close_s, then terminate()

- :func:`open_pool` creates the pool with ``[database]``'s ``pool_min``,
  ``pool_max``, ``connect_timeout_s`` and ``command_timeout_s``, and (unless
  ``verify=False``) checks on one of its connections that the role is held by
  row-level security (:func:`~providers.db.roles.verify_runtime_role_async`),
  all in one crossing of the bridge. A refused role raises
  :class:`~providers.db.roles.UnsafeRoleError`; the pool is closed first.
- :meth:`DbPool.run_unit` awaits ``fn(asyncpg_pool, *args)``, an asyncio unit of
  work (acquire, transaction, statements), crossing the bridge once
  (DESIGN.md section 7: never bridge ``pool.acquire()`` itself). It works from
  any task of the Trio run while the bridge the pool was opened in is open,
  including tasks started outside that bridge's block (it uses the pool's loop).
- :meth:`DbPool.aclose` closes the pool gracefully, shielded from the caller's
  cancellation and bounded by a deadline; past it the connections are
  terminated. Idempotent.

The URL is the daemon role's: derive it from the owner URL with
``postgres_url_with(url, user=config.database.daemon_role)``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeAlias, TypeVar, TypeVarTuple

import asyncpg
import trio
import trio_asyncio

from config.schema import DatabaseConfig
from providers import bridge
from providers.db.roles import verify_runtime_role_async

__all__ = ["DbPool", "Pool", "open_pool"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

Pool: TypeAlias = "asyncpg.Pool[asyncpg.Record]"  # asyncpg.Pool is generic only in its stubs

SERVICE = "postgres"


async def _keep_session(_conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """The pool's reset on release without the reset query (``[database]
    reset_on_release = false``): asyncpg still rolls back an open transaction and drops
    listeners first; the session has nothing else to restore (see DatabaseConfig)."""


async def _create_async(dsn: str, config: DatabaseConfig, verify: bool) -> Pool:
    """asyncio side: create the pool and (optionally) verify its role, closing it on failure."""
    pool: Pool = await asyncpg.create_pool(
        dsn,
        min_size=config.pool_min,
        max_size=config.pool_max,
        timeout=config.connect_timeout_s,
        command_timeout=config.command_timeout_s,
        reset=None if config.reset_on_release else _keep_session,
    )
    try:
        if verify:
            async with pool.acquire(timeout=config.connect_timeout_s) as conn:
                await verify_runtime_role_async(conn)
    except BaseException:
        pool.terminate()
        raise
    return pool


async def _close_async(pool: Pool) -> None:
    await pool.close()


async def _terminate_async(pool: Pool) -> None:
    pool.terminate()


class DbPool:
    """An open asyncpg pool and the one way Trio code uses it (:meth:`run_unit`)."""

    def __init__(
        self, pool: Pool, *, close_s: float, loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self._pool = pool
        self._loop = loop if loop is not None else trio_asyncio.current_loop.get()
        self.close_s = close_s
        self.closed = False

    @property
    def asyncpg_pool(self) -> Pool:
        """The pool itself, for actors whose units of work cross the bridge on their own."""
        return self._pool

    @property
    def size(self) -> int:
        """Connections currently open in the pool."""
        return self._pool.get_size()

    async def run_unit(self, fn: Callable[[Pool, *Ts], Awaitable[T]], *args: *Ts) -> T:
        """``await fn(pool, *args)`` on the asyncio side: one crossing, errors translated."""
        if self.closed:
            raise RuntimeError("the database pool is closed")
        return await self._cross(fn, self._pool, *args)

    async def _cross(self, fn: Callable[[Pool, *Ts], Awaitable[T]], pool: Pool, *args: *Ts) -> T:
        """``bridge.run`` on the pool's own loop, whichever task calls."""
        if self._loop is None or trio_asyncio.current_loop.get() is self._loop:
            return await bridge.run(fn, pool, *args, service=SERVICE)
        token = trio_asyncio.current_loop.set(self._loop)  # this task only
        try:
            return await bridge.run(fn, pool, *args, service=SERVICE)
        finally:
            trio_asyncio.current_loop.reset(token)

    async def aclose(self, *, deadline: float = math.inf) -> None:
        """Close the pool, shielded; by ``deadline`` (Trio time) or ``close_s``, terminate it."""
        if self.closed:
            return
        self.closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_at(min(deadline, trio.current_time() + self.close_s)) as scope:
                await self._cross(_close_async, self._pool)
            if scope.cancelled_caught:
                await self._cross(_terminate_async, self._pool)


@asynccontextmanager
async def open_pool(
    dsn: str,
    config: DatabaseConfig,
    *,
    verify: bool = True,
    close_s: float | None = None,
) -> AsyncIterator[DbPool]:
    """A :class:`DbPool` for the block (inside :func:`providers.bridge.open_bridge`).

    ``close_s`` bounds the close at the end (default ``config.command_timeout_s``).
    """
    raw = await bridge.run(_create_async, dsn, config, verify, service=SERVICE)
    pool = DbPool(raw, close_s=config.command_timeout_s if close_s is None else close_s)
    try:
        yield pool
    finally:
        await pool.aclose()
