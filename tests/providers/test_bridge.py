"""The asyncio bridge against the real servers: cancellation, error translation, Redis SET NX.

Wall-clock time here is real I/O against real servers; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import AsyncIterator

import asyncpg
import asyncpg.exceptions
import nats
import nats.js
import nats.js.api
import pytest
import redis.asyncio
import trio

from engine.errors import ProviderTimeout, ProviderUnavailable
from providers.bridge import open_bridge, run, translate_error

# A cancelled call must come back in about its deadline: the margin covers the
# asyncio task's unwinding (asyncpg sends a cancel request to the server).
CANCEL_DEADLINE_S = 0.2
CANCEL_MARGIN_S = 1.0
POLL_BOUND_S = 5.0
POLL_STEP_S = 0.02


def closed_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- PostgreSQL -------------------------------------------------------------------------


@pytest.fixture
async def pool(bridge: object, postgres_url: str) -> AsyncIterator[asyncpg.Pool]:
    create = functools.partial(asyncpg.create_pool, postgres_url, min_size=1, max_size=2)
    pool: asyncpg.Pool = await run(create, service="postgres")
    try:
        yield pool
    finally:
        await run(pool.close, service="postgres")


async def sleep_in_database(pool: asyncpg.Pool, seconds: float) -> None:
    """One unit of work on the asyncio side: acquire, run, release."""
    async with pool.acquire() as conn:
        await conn.execute("SELECT pg_sleep($1)", seconds)


async def insert_then_sleep(pool: asyncpg.Pool, seconds: float) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO marks (note) VALUES ('uncommitted')")
        await conn.execute("SELECT pg_sleep($1)", seconds)


async def sleeping_backends(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE state = 'active' AND query LIKE 'SELECT pg_sleep%'"
        " AND pid <> pg_backend_pid()"
    )
    return count


async def wait_until_no_sleeping_backend(pool: asyncpg.Pool) -> None:
    # The server's state is polled (no event to wait on), within a bound.
    with trio.fail_after(POLL_BOUND_S):
        while True:
            if not await run(sleeping_backends, pool, service="postgres"):
                return
            await trio.sleep(POLL_STEP_S)


async def test_cancel_scope_cancels_an_in_flight_query_cleanly(pool: asyncpg.Pool) -> None:
    started = trio.current_time()
    with trio.move_on_after(CANCEL_DEADLINE_S) as scope:
        await run(sleep_in_database, pool, 10.0, service="postgres")
    elapsed = trio.current_time() - started

    assert scope.cancelled_caught
    assert elapsed < CANCEL_DEADLINE_S + CANCEL_MARGIN_S
    # The connection went back to the pool: nothing is checked out.
    assert pool.get_idle_size() == pool.get_size()
    # The server-side query is gone (the cancel request reached the server).
    await wait_until_no_sleeping_backend(pool)
    # And the pool still works.
    assert await run(pool.fetchval, "SELECT 41 + 1", service="postgres") == 42


async def test_cancelled_transaction_rolls_back(pool: asyncpg.Pool) -> None:
    await run(pool.execute, "CREATE TABLE marks (note text)", service="postgres")
    with trio.move_on_after(CANCEL_DEADLINE_S):
        await run(insert_then_sleep, pool, 10.0, service="postgres")

    assert await run(pool.fetchval, "SELECT count(*) FROM marks", service="postgres") == 0
    assert pool.get_idle_size() == pool.get_size()


async def test_repeated_cancellations_leak_no_connection(pool: asyncpg.Pool) -> None:
    for _ in range(5):
        with trio.move_on_after(0.05):
            await run(sleep_in_database, pool, 10.0, service="postgres")
    assert pool.get_idle_size() == pool.get_size()
    await wait_until_no_sleeping_backend(pool)
    async with trio.open_nursery() as nursery:  # both connections of the pool work
        for _ in range(2):
            nursery.start_soon(
                functools.partial(run, service="postgres"), sleep_in_database, pool, 0.01
            )


async def test_statement_timeout_is_a_provider_timeout(bridge: object, postgres_url: str) -> None:
    async def slow_query() -> None:
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute("SET statement_timeout = '50ms'")
            await conn.execute("SELECT pg_sleep(5)")
        finally:
            await conn.close()

    with pytest.raises(ProviderTimeout, match="postgres") as raised:
        await run(slow_query, service="postgres")
    assert isinstance(raised.value.__cause__, asyncpg.exceptions.QueryCanceledError)


async def test_domain_errors_pass_through_unchanged(pool: asyncpg.Pool) -> None:
    await run(pool.execute, "CREATE TABLE keys (k text PRIMARY KEY)", service="postgres")
    await run(pool.execute, "INSERT INTO keys VALUES ('a')", service="postgres")
    with pytest.raises(asyncpg.exceptions.UniqueViolationError):
        await run(pool.execute, "INSERT INTO keys VALUES ('a')", service="postgres")


# -- error translation ------------------------------------------------------------------


async def test_refused_postgres_connection_is_unavailable_and_named(bridge: object) -> None:
    url = f"postgresql://postgres@127.0.0.1:{closed_port()}/postgres"
    with pytest.raises(ProviderUnavailable, match=r"^postgres: unavailable") as raised:
        await run(asyncpg.connect, url)  # the service is guessed from asyncpg
    assert isinstance(raised.value.__cause__, OSError)


async def test_refused_nats_connection_is_unavailable_and_named(bridge: object) -> None:
    async def quiet(exc: Exception) -> None:
        """nats-py prints every connect error unless given an error callback."""

    # nats-py retries even the first connect max_reconnect_attempts times,
    # reconnect_time_wait apart (60 x 2 s by default), allow_reconnect or not.
    connect = functools.partial(
        nats.connect,
        f"nats://127.0.0.1:{closed_port()}",
        allow_reconnect=False,
        max_reconnect_attempts=1,
        reconnect_time_wait=0.05,
        connect_timeout=1,
        error_cb=quiet,
    )
    with pytest.raises(ProviderUnavailable, match=r"^nats: unavailable"):
        await run(connect, service="nats")


async def test_refused_redis_connection_is_unavailable_and_named(bridge: object) -> None:
    client = redis.asyncio.Redis(port=closed_port(), retry=None)
    try:
        with pytest.raises(ProviderUnavailable, match=r"^redis: unavailable"):
            await run(client.ping)  # guessed from the redis exception
    finally:
        await run(client.aclose)


async def test_asyncio_timeout_is_a_provider_timeout(bridge: object) -> None:
    async def too_slow() -> None:
        await asyncio.wait_for(asyncio.sleep(10), timeout=0.01)

    with pytest.raises(ProviderTimeout, match=r"^svc: timed out"):
        await run(too_slow, service="svc")


def test_state_machine_error_after_restart_is_transient() -> None:
    # Seen under trio-asyncio after a PostgreSQL restart (DESIGN.md section 7).
    exc = asyncpg.exceptions.InternalClientError("cannot switch to state 12; another operation")
    assert isinstance(translate_error(exc, service="postgres"), ProviderUnavailable)
    other = asyncpg.exceptions.InternalClientError("something else")
    assert translate_error(other, service="postgres") is None


async def test_open_bridge_unwraps_the_exception_groups() -> None:
    with pytest.raises(ValueError, match="the real error") as raised:
        async with open_bridge():
            raise ValueError("the real error")
    assert raised.value.__context__ is None


async def test_open_bridge_keeps_several_errors_as_a_group() -> None:
    async def fail(message: str) -> None:
        raise ValueError(message)

    with pytest.raises(ExceptionGroup) as raised:
        async with open_bridge(), trio.open_nursery() as nursery:
            nursery.start_soon(fail, "one")
            nursery.start_soon(fail, "two")
    assert leaf_messages(raised.value) == {"one", "two"}


def leaf_messages(group: BaseExceptionGroup[BaseException]) -> set[str]:
    messages: set[str] = set()
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            messages |= leaf_messages(exc)
        else:
            messages.add(str(exc))
    return messages


async def test_cancellation_passes_through_untouched(bridge: object) -> None:
    with trio.move_on_after(CANCEL_DEADLINE_S) as scope:
        await run(asyncio.sleep, 10)
        pytest.fail("not reached")  # pragma: no cover
    assert scope.cancelled_caught


# -- NATS JetStream ---------------------------------------------------------------------


async def add_stream_and_consumer(js: nats.js.JetStreamContext, name: str) -> None:
    await js.add_stream(name=name, subjects=[f"{name}.>"])
    await js.add_consumer(
        name, nats.js.api.ConsumerConfig(durable_name="worker", ack_policy="explicit")
    )


async def fetch_and_ack(js: nats.js.JetStreamContext, name: str, wait_s: float) -> list[bytes]:
    """One unit of work: pull up to 10 messages, ack them, return their payloads."""
    sub = await js.pull_subscribe_bind("worker", stream=name)
    try:
        messages = await sub.fetch(10, timeout=wait_s)
        for message in messages:
            await message.ack()
        return [message.data for message in messages]
    finally:
        await sub.unsubscribe()


async def test_cancel_scope_cancels_an_in_flight_jetstream_fetch(
    bridge: object, nats_url: str
) -> None:
    client = await run(nats.connect, nats_url)
    try:
        js = client.jetstream()
        await run(add_stream_and_consumer, js, "FETCH")

        started = trio.current_time()
        with trio.move_on_after(CANCEL_DEADLINE_S) as scope:
            await run(fetch_and_ack, js, "FETCH", 10.0)
        assert scope.cancelled_caught
        assert trio.current_time() - started < CANCEL_DEADLINE_S + CANCEL_MARGIN_S

        # The connection and the consumer still work: a published message is fetched.
        await run(js.publish, "FETCH.a", b"hello", service="nats")
        assert await run(fetch_and_ack, js, "FETCH", 5.0) == [b"hello"]
        assert client.is_connected
    finally:
        await run(client.close)


# -- Redis ------------------------------------------------------------------------------


async def test_redis_set_nx_through_the_bridge(bridge: object, redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        set_nx = functools.partial(
            client.set, "idem:tenant-a:key-1", "dispatch-1", nx=True, px=60_000
        )
        assert await run(set_nx, service="redis") is True
        assert await run(set_nx, service="redis") is None  # the key exists: refused
        assert await run(client.get, "idem:tenant-a:key-1") == b"dispatch-1"
        assert 0 < await run(client.pttl, "idem:tenant-a:key-1") <= 60_000
    finally:
        await run(client.aclose)
