"""Shared fixtures: real PostgreSQL, NATS (JetStream) and Redis, started once per session.

Servers (session-scoped, synchronous; each has ``.url``)
    ``postgres_server``  EmbeddedPostgres (fsync off), or the server at
                         ``TRIAGE_POSTGRES_URL``. ``.url`` is a superuser URL.
    ``nats_server``      EmbeddedNats (JetStream on), or ``TRIAGE_NATS_URL``.
    ``redis_server``     EmbeddedRedis, or ``TRIAGE_REDIS_URL``. Fails (never
                         skips) when neither is available.
    ``clamd_server``     EmbeddedClamd (Debian's clamav-daemon) with the signatures
                         in tests/data/clamd (see tests/clamd_fixture.py). Fails
                         (never skips) when clamd is not installed.

Per-test URLs (isolated, cleaned at teardown)
    ``postgres_url``         a fresh database ``test_<hex>`` on ``postgres_server``,
                             superuser URL; dropped (WITH FORCE) after the test.
    ``postgres_module_url``  the same, shared by all tests of one module.
    ``nats_url``             ``nats_server.url``; every JetStream stream is deleted
                             after the test (use unique subjects anyway).
    ``redis_url``            ``redis_server.url``; FLUSHALL after the test.

Bridge (per test, async)
    ``bridge``  an open trio-asyncio loop (:func:`providers.bridge.open_bridge`),
                so the test can ``await run(...)``. pytest-trio's ``trio_run``
                accepts only trio, so the loop is opened here, per test.

Tests that stop or restart a server start their own (see
tests/providers/test_embedded.py): the session servers stay up for everyone.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import nats
import pytest
import redis

from providers.bridge import open_bridge
from providers.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedRedis,
    find_redis_server,
)
from providers.embedded_clamd import EmbeddedClamd
from providers.services import (
    ENV_NATS_URL,
    ENV_POSTGRES_URL,
    ENV_REDIS_URL,
    postgres_url_with,
)
from tests.clamd_fixture import clamd_or_fail

# Tests trade durability for speed; restarts are clean shutdowns or SIGKILLs of the
# server only, which lose nothing even with fsync off (only an OS crash would).
TEST_POSTGRES_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


@dataclass(frozen=True)
class ExternalServer:
    """A server given by URL (environment): used as is, never started or stopped."""

    url: str


# -- servers (session) ----------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[EmbeddedPostgres | ExternalServer]:
    url = os.environ.get(ENV_POSTGRES_URL)
    if url:
        yield ExternalServer(url)
        return
    with EmbeddedPostgres(settings=TEST_POSTGRES_SETTINGS) as server:
        yield server


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedNats | ExternalServer]:
    url = os.environ.get(ENV_NATS_URL)
    if url:
        yield ExternalServer(url)
        return
    with EmbeddedNats() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis | ExternalServer]:
    url = os.environ.get(ENV_REDIS_URL)
    if url:
        yield ExternalServer(url)
        return
    if find_redis_server() is None:
        pytest.fail(
            f"redis-server is not on PATH and {ENV_REDIS_URL} is not set: install Debian's "
            "redis-server package (the Redis tests need a real server; they do not skip)",
            pytrace=False,
        )
    with EmbeddedRedis() as server:
        yield server


# -- per-test URLs --------------------------------------------------------------------


def _postgres_admin(url: str, *statements: str) -> None:
    """Run statements on ``url`` from synchronous code (fixtures run outside Trio)."""

    async def execute() -> None:
        conn = await asyncpg.connect(url)
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(execute())


@dataclass(frozen=True)
class _FreshDatabase:
    server_url: str
    name: str

    @property
    def url(self) -> str:
        return postgres_url_with(self.server_url, database=self.name)


def _fresh_database(server_url: str) -> Iterator[str]:
    database = _FreshDatabase(server_url, f"test_{uuid.uuid4().hex[:16]}")
    # FILE_COPY: about twice as fast as WAL_LOG for the small template database.
    _postgres_admin(server_url, f'CREATE DATABASE "{database.name}" STRATEGY FILE_COPY')
    try:
        yield database.url
    finally:
        _postgres_admin(server_url, f'DROP DATABASE IF EXISTS "{database.name}" WITH (FORCE)')


@pytest.fixture
def postgres_url(postgres_server: EmbeddedPostgres | ExternalServer) -> Iterator[str]:
    yield from _fresh_database(postgres_server.url)


@pytest.fixture(scope="module")
def postgres_module_url(postgres_server: EmbeddedPostgres | ExternalServer) -> Iterator[str]:
    yield from _fresh_database(postgres_server.url)


def _delete_all_streams(url: str) -> None:
    async def delete() -> None:
        client = await nats.connect(url, allow_reconnect=False)
        try:
            jetstream = client.jetstream()
            for stream in await jetstream.streams_info():
                await jetstream.delete_stream(stream.config.name or "")
        finally:
            await client.close()

    asyncio.run(delete())


@pytest.fixture
def nats_url(nats_server: EmbeddedNats | ExternalServer) -> Iterator[str]:
    yield nats_server.url
    _delete_all_streams(nats_server.url)


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis | ExternalServer) -> Iterator[str]:
    yield redis_server.url
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()


# -- the asyncio bridge ---------------------------------------------------------------


@pytest.fixture
async def bridge() -> AsyncIterator[asyncio.AbstractEventLoop]:
    async with open_bridge() as loop:
        yield loop


@pytest.fixture(scope="session")
def clamd_server() -> Iterator[EmbeddedClamd]:
    with clamd_or_fail() as server:
        yield server
