"""Where PostgreSQL, NATS and Redis are: configured URLs, environment overrides, or embedded.

:func:`resolve_services` decides, once, at daemon start (and in the chaos harness)::

    with resolve_services(config.services) as services:
        services.postgres_url        # always set
        services.nats_url            # always set
        services.redis_url           # None: idempotency runs on the database alone
        services.embedded            # e.g. frozenset({"postgres", "nats"})

Precedence for each service: the environment (``TRIAGE_POSTGRES_URL``,
``TRIAGE_NATS_URL``, ``TRIAGE_REDIS_URL``; an empty value counts as unset), then
``[services]`` in the config, then the embedded server (PostgreSQL and NATS
only). Redis is never started implicitly: without a URL it is absent, which is
catalog row 7's mitigation (the database's unique key is the truth).

Embedded servers are started here and stopped when the ``with`` block exits, in
reverse order. Starting and stopping are blocking subprocess calls: from Trio,
call them through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self
from urllib.parse import quote, urlsplit, urlunsplit

from config.schema import ServicesConfig

from .embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedServer

__all__ = [
    "ENV_NATS_URL",
    "ENV_POSTGRES_REPLICA_URL",
    "ENV_POSTGRES_URL",
    "ENV_REDIS_URL",
    "Services",
    "postgres_url_with",
    "resolve_services",
]

ENV_POSTGRES_URL = "TRIAGE_POSTGRES_URL"
ENV_NATS_URL = "TRIAGE_NATS_URL"
ENV_REDIS_URL = "TRIAGE_REDIS_URL"
ENV_POSTGRES_REPLICA_URL = "TRIAGE_POSTGRES_REPLICA_URL"


@dataclass(kw_only=True)
class Services:
    """The resolved URLs, and the embedded servers this object owns (stopped by :meth:`close`)."""

    postgres_url: str
    nats_url: str
    redis_url: str | None
    servers: dict[str, EmbeddedServer] = field(default_factory=dict)
    #: A read replica of ``postgres_url`` (never embedded): reads fall to it (row 5).
    postgres_replica_url: str | None = None

    @property
    def embedded(self) -> frozenset[str]:
        """The services that run embedded: a subset of {"postgres", "nats"}."""
        return frozenset(self.servers)

    def close(self) -> None:
        """Stop the embedded servers, the last started first. Idempotent."""
        with contextlib.ExitStack() as stack:
            for server in self.servers.values():
                stack.callback(server.close)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def resolve_services(
    config: ServicesConfig,
    env: Mapping[str, str] = os.environ,
    *,
    postgres_settings: Mapping[str, str] | None = None,
) -> Services:
    """Resolve every service's URL, starting embedded PostgreSQL and NATS where none is given.

    Blocks while embedded servers start (about a second for PostgreSQL's initdb).
    If one fails to start, those already started are stopped before the error
    (:class:`~providers.embedded.EmbeddedServerError`) propagates.
    """
    postgres_url = _pick(env.get(ENV_POSTGRES_URL), config.postgres_url)
    nats_url = _pick(env.get(ENV_NATS_URL), config.nats_url)
    redis_url = _pick(env.get(ENV_REDIS_URL), config.redis_url)
    servers: dict[str, EmbeddedServer] = {}
    with contextlib.ExitStack() as stack:
        if postgres_url is None:
            postgres = stack.enter_context(EmbeddedPostgres(settings=postgres_settings))
            servers["postgres"] = postgres
            postgres_url = postgres.url
        if nats_url is None:
            nats = stack.enter_context(EmbeddedNats())
            servers["nats"] = nats
            nats_url = nats.url
        stack.pop_all()  # started: from now on, Services.close() owns them
    return Services(
        postgres_url=postgres_url,
        nats_url=nats_url,
        redis_url=redis_url,
        servers=servers,
        postgres_replica_url=_pick(env.get(ENV_POSTGRES_REPLICA_URL), config.postgres_replica_url),
    )


def _pick(*candidates: str | None) -> str | None:
    for candidate in candidates:
        if candidate:
            return candidate
    return None


def postgres_url_with(
    url: str,
    *,
    database: str | None = None,
    user: str | None = None,
    password: str | None = None,
) -> str:
    """``url`` with another database, user or password; the rest (host, query) kept.

    >>> postgres_url_with("postgresql://postgres@127.0.0.1:5432/postgres", database="t1", user="app")
    'postgresql://app@127.0.0.1:5432/t1'
    """
    parts = urlsplit(url)
    netloc = parts.netloc
    credentials, at, hostport = netloc.rpartition("@")
    if not at:
        credentials, hostport = "", netloc
    old_user, colon, old_password = credentials.partition(":")
    new_user = quote(user, safe="") if user is not None else old_user
    if password is not None:
        new_password, colon = quote(password, safe=""), ":"
    elif user is not None:
        new_password, colon = "", ""  # another role: the old password does not apply
    else:
        new_password = old_password
    userinfo = f"{new_user}{colon}{new_password}" if new_user or new_password else ""
    netloc = f"{userinfo}@{hostport}" if userinfo else hostport
    path = f"/{quote(database, safe='')}" if database is not None else parts.path
    return urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))
