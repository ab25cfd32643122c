"""A singleton lease: a PostgreSQL session-level advisory lock on a connection of its own.

Several replicas of the daemon share one database; some work must run on exactly
one of them at a time (:mod:`supervisors.singleton` decides which and runs it).
The lease is the mutual exclusion::

    connect (its own connection, not the pool's)
    SELECT pg_try_advisory_lock(LEASE_CLASS, lease_key(name))   true: held, false: someone else
    ... held for as long as this connection lives ...
    SELECT 1 every check_s                                      a failure: the lease is lost
    close                                                       released

A session-level lock belongs to the server-side backend of the connection, so it
needs no renewal and no clock: when the holder's process dies (SIGKILL, OOM, a
node gone) the server ends the backend once the socket drops, and the lock is
free for the next :meth:`AdvisoryLease.try_acquire`. When the *connection* dies
while the holder lives (``pg_terminate_backend``, a database failover, a network
cut), :meth:`AdvisoryLease.check` fails: the holder must treat the lease as lost
at once -- another replica may already hold it.

Keys: the two-int4 form of the advisory lock functions, the first int4 being
:data:`LEASE_CLASS` (b"trsl"), distinct from the outbox relay's aggregate locks
and the migrator's single bigint key; the second is :func:`lease_key` of the
singleton's name (CRC-32, stable across processes and versions, unlike Python's
``hash``). ``pg_locks`` shows the holder: ``classid = LEASE_CLASS``, ``objid =
lease_key(name)`` (as an oid: the unsigned value), ``objsubid = 2``.

Everything on the asyncio side is one coroutine per unit of work (one bridge
crossing each, DESIGN.md section 7); errors come back translated by
:func:`providers.bridge.run` (a lost connection is a
:class:`~engine.errors.ProviderUnavailable`).
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Final

import asyncpg

from providers.bridge import run

if TYPE_CHECKING:
    Connection = asyncpg.Connection[asyncpg.Record]

__all__ = ["LEASE_CLASS", "AdvisoryLease", "lease_key", "lease_oid"]

#: The first key of every singleton lease (int4 "class"): b"trsl".
LEASE_CLASS: Final = 0x7472736C


def lease_oid(name: str) -> int:
    """The second key of ``name``'s lease as ``pg_locks.objid`` shows it (unsigned)."""
    return zlib.crc32(name.encode())


def lease_key(name: str) -> int:
    """The second key of ``name``'s lease, as the int4 the lock functions take."""
    oid = lease_oid(name)
    return oid - (1 << 32) if oid >= 1 << 31 else oid


async def _connect_and_lock(url: str, key: int, timeout_s: float) -> Connection | None:
    """asyncio side: a new connection holding the lock, or None (closed) if it is taken."""
    conn: Connection = await asyncpg.connect(url, timeout=timeout_s, command_timeout=timeout_s)
    try:
        held = await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", LEASE_CLASS, key)
    except BaseException:
        conn.terminate()
        raise
    if held:
        return conn
    await conn.close(timeout=timeout_s)
    return None


async def _ping(conn: Connection, timeout_s: float) -> None:
    await conn.fetchval("SELECT 1", timeout=timeout_s)


async def _close(conn: Connection, timeout_s: float) -> None:
    """asyncio side: close the connection (the server frees the lock); terminate if slow."""
    try:
        await conn.close(timeout=timeout_s)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        conn.terminate()


class AdvisoryLease:
    """The lease of one singleton name on one database (see the module docstring).

    Not shared between tasks: one owner calls :meth:`try_acquire`, then
    :meth:`check` while it holds the lease, then :meth:`release`.
    """

    def __init__(self, url: str, name: str, *, timeout_s: float) -> None:
        if not name:
            raise ValueError("a lease needs a name")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s: must be > 0, got {timeout_s!r}")
        self.url = url
        self.name = name
        self.key = lease_key(name)
        self.timeout_s = timeout_s
        self._conn: Connection | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds a connection that took the lock (as of the last check)."""
        return self._conn is not None

    async def try_acquire(self) -> bool:
        """Connect and try the lock: True if this replica now holds the lease.

        Raises :class:`~engine.errors.ProviderError` when the database cannot be
        reached (nothing is held then)."""
        if self._conn is not None:
            return True
        self._conn = await run(
            _connect_and_lock, self.url, self.key, self.timeout_s, service="postgres"
        )
        return self._conn is not None

    async def check(self) -> None:
        """A round trip on the lease's connection; raises (and drops the lease) if it is gone.

        Raises :class:`~engine.errors.ProviderError` (the connection died: the
        lock is, or will soon be, free for another replica)."""
        conn = self._conn
        if conn is None:
            raise RuntimeError(f"lease {self.name!r}: not held")
        try:
            await run(_ping, conn, self.timeout_s, service="postgres")
        except BaseException:
            self._conn = None
            conn.terminate()
            raise

    async def release(self) -> None:
        """Close the connection (the server frees the lock). Safe to call when not held."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await run(_close, conn, self.timeout_s, service="postgres")

    def abandon(self) -> None:
        """Drop the connection at once, without a round trip (a cancelled owner's cleanup)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()
