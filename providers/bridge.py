"""The one place where asyncio-only clients (asyncpg, nats-py, redis.asyncio) cross into Trio.

Everything else in Triage is Trio. These three clients run on an asyncio loop
that trio-asyncio drives from inside the Trio run::

    async with open_bridge():                     # one asyncio loop for the daemon (or test)
        pool = await run(asyncpg.create_pool, url, service="postgres")
        rows = await run(fetch_due, pool, now)    # fetch_due is an asyncio coroutine function

The rule: cross once per unit of work
    Write each unit of work -- acquire a connection, open the transaction, run
    the statements, release -- as ONE asyncio coroutine function, and cross the
    bridge once with :func:`run`::

        async def claim_batch(pool, limit):       # asyncio side
            async with pool.acquire() as conn, conn.transaction():
                return await conn.fetch(CLAIM, limit)

        rows = await run(claim_batch, pool, limit, service="postgres")   # Trio side

    A Trio cancel scope around :func:`run` cancels the asyncio task, so the
    ``async with`` blocks unwind *on the asyncio side*: the transaction rolls
    back, the connection goes back to the pool, asyncpg cancels the server-side
    query. Never bridge an async context manager itself
    (``async with aio_as_trio(conn.transaction())``): a Trio cancel inside it
    never sends ROLLBACK, and ``aio_as_trio(pool.acquire())`` never releases the
    connection, so the pool hangs (DESIGN.md section 7).

    Each crossing costs tens of microseconds: batch on the asyncio side (publish
    a batch of messages per crossing, not one message per crossing).

Error translation (one table, like httpx's transport mapping)
    ``run`` raises the engine's error tree for connection-level failures, always
    ``raise Mapped(...) from exc``, with the service named in the message:

    ======================================================  ======================
    connection refused/reset/aborted, broken pipe, DNS,     ProviderUnavailable
    other OSError (e.g. a missing unix socket)
    asyncpg: ConnectionDoesNotExistError, the 08xxx
    connection class, 57P01-57P03 (shutdown, starting up),
    53300 too many connections, InterfaceError "connection
    is closed" (the server dropped an idle connection),
    InternalClientError "cannot switch to state" (seen
    after a restart under trio-asyncio: transient too)
    nats: NoServersError, ConnectionClosedError,            ProviderUnavailable
    StaleConnectionError, NoRespondersError, JetStream 503
    redis: ConnectionError (incl. BusyLoadingError)         ProviderUnavailable
    TimeoutError (asyncio, nats, OS), redis TimeoutError,   ProviderTimeout
    asyncpg QueryCanceledError (statement_timeout)
    ======================================================  ======================

    A ProviderTimeout means "may or may not have happened": a JetStream publish
    that timed out during an outage may still be stored, so always publish with
    ``Nats-Msg-Id``. A pull ``fetch`` that finds no message also raises nats'
    TimeoutError: handle "no message yet" inside the asyncio unit of work
    (return an empty batch) rather than letting it map to ProviderTimeout.

    Anything else -- a unique violation, a missing stream, a bug -- passes through
    unchanged: it is the caller's domain. ``trio.Cancelled`` passes through
    untouched; it is never translated or counted.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar, TypeVarTuple, Unpack

import asyncpg.exceptions
import nats.errors
import nats.js.errors
import redis.exceptions
import trio_asyncio

from engine.errors import ProviderError, ProviderTimeout, ProviderUnavailable

__all__ = ["open_bridge", "run", "translate_error"]

T = TypeVar("T")
Ts = TypeVarTuple("Ts")


@asynccontextmanager
async def open_bridge() -> AsyncIterator[asyncio.AbstractEventLoop]:
    """Open the asyncio loop that :func:`run` crosses into, for the duration of the block.

    A thin wrapper over ``trio_asyncio.open_loop()``: an error out of the block
    (or out of the loop's teardown) arrives from trio-asyncio wrapped in nested
    exception groups; when the groups hold exactly one exception, that exception
    is re-raised as itself (with its own traceback and cause), so callers can
    write ``except ProviderUnavailable`` instead of ``except*``. Several errors
    at once stay a group.
    """
    sole: BaseException | None = None
    try:
        async with trio_asyncio.open_loop() as loop:
            yield loop
    except BaseExceptionGroup as group:
        sole = _sole_exception(group)
        if sole is None:
            raise
    # Raised outside the except block so Python does not chain the group as context.
    if sole is not None:
        raise sole


def _sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside nested single-member groups, or None if there are several."""
    current: BaseException = group
    while isinstance(current, BaseExceptionGroup):
        if len(current.exceptions) != 1:
            return None
        current = current.exceptions[0]
    return current


async def run(
    fn: Callable[[Unpack[Ts]], Awaitable[T]],
    *args: *Ts,
    service: str | None = None,
) -> T:
    """Await the asyncio coroutine ``fn(*args)`` from Trio: one crossing, errors translated.

    Must run inside :func:`open_bridge`. ``service`` names the dependency in
    translated errors ("postgres", "nats", "redis"); without it, it is guessed
    from the library that raised. Keyword arguments: use ``functools.partial``.
    Cancelling the calling Trio scope cancels the asyncio task and waits for it
    to unwind, then raises ``trio.Cancelled`` unchanged.
    """
    try:
        result: T = await trio_asyncio.aio_as_trio(fn)(*args)  # untyped library: Any
        return result
    except Exception as exc:
        mapped = translate_error(exc, service=service or _guess_service(fn, exc))
        if mapped is None:
            raise
        raise mapped from exc


def translate_error(exc: BaseException, *, service: str) -> ProviderError | None:
    """The engine error for a client library's ``exc``, or None if it is not a connection failure."""
    if isinstance(exc, ProviderError):
        return None  # already translated (a nested run)
    name = type(exc).__name__
    if _is_timeout(exc):
        return ProviderTimeout(f"{service}: timed out ({name}: {exc})")
    if _is_unavailable(exc):
        return ProviderUnavailable(f"{service}: unavailable ({name}: {exc})")
    return None


# asyncpg's SQLSTATE classes that mean "this connection or server is not usable now".
_PG_UNAVAILABLE = (
    asyncpg.exceptions.PostgresConnectionError,  # class 08, incl. ConnectionDoesNotExistError
    asyncpg.exceptions.AdminShutdownError,  # 57P01: terminating connection (fast shutdown)
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: the database system is starting up
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
)
_NATS_UNAVAILABLE = (
    nats.errors.NoServersError,
    nats.errors.ConnectionClosedError,
    nats.errors.StaleConnectionError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.js.errors.ServiceUnavailableError,
)


def _is_timeout(exc: BaseException) -> bool:
    # asyncio.TimeoutError and nats.errors.TimeoutError are both builtin TimeoutError.
    return isinstance(
        exc, (TimeoutError, redis.exceptions.TimeoutError, asyncpg.exceptions.QueryCanceledError)
    )


def _is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, (OSError, redis.exceptions.ConnectionError, *_PG_UNAVAILABLE)):
        return True
    if isinstance(exc, _NATS_UNAVAILABLE):
        return True
    message = str(exc)
    # A connection whose server went away while it was idle: asyncpg saw the EOF and
    # refuses to use it ("pool is closed" is our own shutdown, not this).
    if isinstance(exc, asyncpg.exceptions.InterfaceError) and "connection is closed" in message:
        return True
    # Under trio-asyncio, a query on a connection the server dropped sometimes fails
    # inside asyncpg's protocol state machine instead of as ConnectionDoesNotExistError.
    return (
        isinstance(exc, asyncpg.exceptions.InternalClientError)
        and "cannot switch to state" in message
    )


def _guess_service(fn: Callable[..., object], exc: BaseException) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    for module in (type(exc).__module__, getattr(fn, "__module__", None) or ""):
        root = module.partition(".")[0]
        if root == "asyncpg":
            return "postgres"
        if root in ("nats", "redis"):
            return root
    return "service"
