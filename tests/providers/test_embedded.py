"""Embedded servers: lifecycle, restart in place, and client reconnection across the bridge.

These tests stop and restart servers, so they start their own (module-scoped)
instead of the session servers everyone else shares.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import asyncpg
import nats
import nats.aio.client
import pytest
import redis.asyncio
import trio

from config.schema import ServicesConfig
from engine.errors import ProviderUnavailable
from providers.bridge import run
from providers.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedRedis,
    EmbeddedServerError,
    find_nats_server,
)
from providers.services import (
    ENV_NATS_URL,
    ENV_POSTGRES_URL,
    ENV_REDIS_URL,
    postgres_url_with,
    resolve_services,
)
from tests.conftest import TEST_POSTGRES_SETTINGS

T = TypeVar("T")

RECONNECT_BOUND_S = 10.0  # nats-py needs ~reconnect_time_wait; asyncpg/redis reconnect at once
POLL_STEP_S = 0.05


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(settings=TEST_POSTGRES_SETTINGS) as server:
        yield server


@pytest.fixture(scope="module")
def own_nats() -> Iterator[EmbeddedNats]:
    with EmbeddedNats() as server:
        yield server


@pytest.fixture(scope="module")
def own_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


async def until_available(call: Callable[[], Awaitable[T]]) -> tuple[T, int]:
    """Retry ``call`` while it raises ProviderUnavailable, within the bound: (result, failures)."""
    failures = 0
    with trio.fail_after(RECONNECT_BOUND_S):
        while True:
            try:
                return await call(), failures
            except ProviderUnavailable:
                failures += 1
                await trio.sleep(POLL_STEP_S)


# -- lifecycle ------------------------------------------------------------------------


def test_nats_server_binary_comes_from_the_wheel() -> None:
    binary = find_nats_server()
    assert binary.name == "nats-server"
    assert binary.is_file()


def test_restart_keeps_port_url_and_data(own_nats: EmbeddedNats) -> None:
    url, directory = own_nats.url, own_nats.directory
    first_pid = own_nats.pid
    assert own_nats.start() is own_nats  # idempotent while running
    assert own_nats.pid == first_pid
    own_nats.stop()
    assert not own_nats.running
    assert own_nats.pid is None
    own_nats.start()
    assert own_nats.url == url
    assert own_nats.directory == directory
    assert own_nats.pid != first_pid


def test_close_removes_the_directory_and_refuses_a_restart() -> None:
    server = EmbeddedNats().start()
    directory = server.directory
    assert directory.is_dir()
    server.close()
    server.close()  # idempotent
    assert not directory.exists()
    with pytest.raises(EmbeddedServerError, match="closed"):
        server.start()


def test_a_server_that_cannot_start_says_why(
    own_nats: EmbeddedNats, own_redis: EmbeddedRedis, tmp_path: Path
) -> None:
    # Another server answers on the port: readiness must see it is not ours.
    for taken in (
        EmbeddedNats(directory=tmp_path / "nats", port=own_nats.port, start_timeout_s=5.0),
        EmbeddedRedis(directory=tmp_path / "redis", port=own_redis.port, start_timeout_s=5.0),
    ):
        with pytest.raises(EmbeddedServerError, match=rf"on port {taken.port} exited") as raised:
            taken.start()
        assert "address already in use" in str(raised.value).lower()
        assert not taken.running
        taken.close()
        assert taken.directory.is_dir()  # a directory we were given is kept


def test_a_port_we_chose_that_got_taken_is_replaced_at_first_start() -> None:
    server = EmbeddedNats()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", server.port))
        squatter.listen()
        taken = server.port
        with server:
            assert server.running
            assert server.port != taken
            assert server.url.endswith(f":{server.port}")


# -- PostgreSQL -----------------------------------------------------------------------


@pytest.fixture
async def pg_pool(bridge: object, own_postgres: EmbeddedPostgres) -> AsyncIterator[asyncpg.Pool]:
    create = functools.partial(asyncpg.create_pool, own_postgres.url, min_size=1, max_size=2)
    pool: asyncpg.Pool = await run(create, service="postgres")
    try:
        yield pool
    finally:
        with trio.move_on_after(5):
            await run(pool.close, service="postgres")


async def select_one(pool: asyncpg.Pool) -> int:
    value: int = await pool.fetchval("SELECT 1")
    return value


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_asyncpg_reconnects_after_postgres_restarts(
    how: str, own_postgres: EmbeddedPostgres, pg_pool: asyncpg.Pool
) -> None:
    await run(pg_pool.execute, "CREATE TABLE IF NOT EXISTS kept (n int)", service="postgres")
    await run(pg_pool.execute, "INSERT INTO kept VALUES (1)", service="postgres")
    assert await run(select_one, pg_pool, service="postgres") == 1

    await trio.to_thread.run_sync(getattr(own_postgres, how))
    # While it is down: a mapped, transient error, never a raw asyncpg one.
    with pytest.raises(ProviderUnavailable, match=r"^postgres: "):
        await run(select_one, pg_pool, service="postgres")

    await trio.to_thread.run_sync(own_postgres.start)
    value, failures = await until_available(
        functools.partial(run, select_one, pg_pool, service="postgres")
    )
    assert value == 1
    assert failures <= 2  # the pool drops dead connections and opens new ones
    count = await run(pg_pool.fetchval, "SELECT count(*) FROM kept", service="postgres")
    assert count >= 1  # the data directory survived the restart
    assert pg_pool.get_idle_size() == pg_pool.get_size()


async def test_a_dropped_connection_is_unavailable_and_a_new_one_works(
    bridge: object, own_postgres: EmbeddedPostgres
) -> None:
    conn = await run(asyncpg.connect, own_postgres.url)
    await trio.to_thread.run_sync(own_postgres.restart)
    # asyncpg saw the EOF while the connection was idle: "connection is closed".
    with pytest.raises(ProviderUnavailable, match=r"^postgres: unavailable"):
        await run(conn.fetchval, "SELECT 1")
    conn = await run(asyncpg.connect, own_postgres.url)
    try:
        assert await run(conn.fetchval, "SELECT 1") == 1
    finally:
        await run(conn.close)


# -- NATS -----------------------------------------------------------------------------


async def quiet(exc: Exception) -> None:
    """nats-py prints every connection error unless given an error callback."""


@pytest.fixture
async def nats_client(
    bridge: object, own_nats: EmbeddedNats
) -> AsyncIterator[nats.aio.client.Client]:
    connect = functools.partial(
        nats.connect,
        own_nats.url,
        reconnect_time_wait=0.2,
        max_reconnect_attempts=-1,
        error_cb=quiet,
    )
    client: nats.aio.client.Client = await run(connect, service="nats")
    try:
        yield client
    finally:
        with trio.move_on_after(5):
            await run(client.close, service="nats")


async def publish(client: nats.aio.client.Client, msg_id: str) -> int:
    """One unit of work: a JetStream publish with a dedupe id; the stream sequence."""
    ack = await client.jetstream().publish(
        "restart.events", msg_id.encode(), timeout=1.0, headers={"Nats-Msg-Id": msg_id}
    )
    return ack.seq


@pytest.mark.parametrize("how", ["stop", "kill"])
async def test_nats_reconnects_after_the_server_restarts(
    how: str, own_nats: EmbeddedNats, nats_client: nats.aio.client.Client
) -> None:
    js = nats_client.jetstream()
    await run(
        functools.partial(js.add_stream, name="RESTART", subjects=["restart.>"]), service="nats"
    )
    before = await run(publish, nats_client, f"{how}-before", service="nats")

    await trio.to_thread.run_sync(getattr(own_nats, how))
    await trio.to_thread.run_sync(own_nats.start)

    # A publish during the reconnect may time out (and still be stored): the same
    # Nats-Msg-Id makes the retry safe, so retry timeouts too.
    started = trio.current_time()
    with trio.fail_after(RECONNECT_BOUND_S):
        while True:
            try:
                after = await run(publish, nats_client, f"{how}-after", service="nats")
                break
            except (ProviderUnavailable, TimeoutError):
                await trio.sleep(POLL_STEP_S)
    reconnect_s = trio.current_time() - started
    assert after == before + 1  # the stream survived the restart, stored exactly once
    assert nats_client.is_connected
    assert reconnect_s < RECONNECT_BOUND_S


# -- Redis ----------------------------------------------------------------------------


async def test_redis_client_reconnects_after_the_server_restarts(
    bridge: object, own_redis: EmbeddedRedis
) -> None:
    client = redis.asyncio.Redis.from_url(own_redis.url)
    try:
        set_nx = functools.partial(client.set, "idem:k", "1", nx=True, px=60_000)
        assert await run(set_nx, service="redis") is True

        await trio.to_thread.run_sync(own_redis.stop)
        with pytest.raises(ProviderUnavailable, match=r"^redis: "):
            await run(client.ping, service="redis")
        await trio.to_thread.run_sync(own_redis.start)

        # No persistence: the cache came back empty, so SET NX succeeds again.
        result, _ = await until_available(functools.partial(run, set_nx, service="redis"))
        assert result is True
    finally:
        await run(client.aclose, service="redis")


# -- resolve_services -----------------------------------------------------------------


def test_environment_overrides_config_and_nothing_is_embedded() -> None:
    config = ServicesConfig(
        postgres_url="postgresql://config/db", nats_url="nats://config:4222", redis_url=None
    )
    env = {
        ENV_POSTGRES_URL: "postgresql://env/db",
        ENV_NATS_URL: "",  # empty counts as unset: the config's URL is used
        ENV_REDIS_URL: "redis://env:6379/0",
    }
    with resolve_services(config, env) as services:
        assert services.postgres_url == "postgresql://env/db"
        assert services.nats_url == "nats://config:4222"
        assert services.redis_url == "redis://env:6379/0"
        assert services.embedded == frozenset()


async def test_missing_urls_start_embedded_postgres_and_nats(bridge: object) -> None:
    services = await trio.to_thread.run_sync(resolve_services, ServicesConfig(), {})
    try:
        assert services.embedded == {"postgres", "nats"}
        assert services.redis_url is None  # Redis is never started implicitly
        conn = await run(asyncpg.connect, services.postgres_url)
        assert await run(conn.fetchval, "SELECT current_user") == "postgres"
        await run(conn.close)
        client = await run(nats.connect, services.nats_url)
        await run(client.close)
    finally:
        await trio.to_thread.run_sync(services.close)
    assert not any(server.running for server in services.servers.values())


def test_postgres_url_with_replaces_parts() -> None:
    tcp = "postgresql://postgres@127.0.0.1:5432/postgres?sslmode=disable"
    assert postgres_url_with(tcp, database="t1") == (
        "postgresql://postgres@127.0.0.1:5432/t1?sslmode=disable"
    )
    assert postgres_url_with(tcp, user="triage_app", password="p@ss") == (
        "postgresql://triage_app:p%40ss@127.0.0.1:5432/postgres?sslmode=disable"
    )
    socket = "postgresql://postgres:secret@/postgres?host=/tmp/pg"
    assert postgres_url_with(socket, user="app", database="d") == (
        "postgresql://app@/d?host=/tmp/pg"
    )
