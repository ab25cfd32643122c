"""What the ``triage`` subcommands share: exit codes, finding the database, reporting.

The database commands (``migrate``, ``dlq``, ``category``) find PostgreSQL the
same way: ``--dsn``, else ``TRIAGE_POSTGRES_URL``, else ``services.postgres_url``
of ``--config`` (:func:`postgres_dsn`), and never print a password
(:func:`redacted`). They are one-shot commands outside the daemon: plain
asyncio, no Trio and no bridge (:func:`run_on_database`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from config import ConfigError, load_config
from providers.services import ENV_POSTGRES_URL

__all__ = [
    "EXIT_FAILED",
    "EXIT_INVALID",
    "EXIT_OK",
    "add_database_arguments",
    "postgres_dsn",
    "redacted",
    "report",
    "require_dsn",
    "run_on_database",
    "table",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2

T = TypeVar("T")


def report(error: ConfigError) -> int:
    """Print a config error's problems and their count on stderr; ``EXIT_INVALID``."""
    for problem in error.problems:
        print(problem, file=sys.stderr)
    count = len(error.problems)
    print(f"{count} problem{'s' if count != 1 else ''} found", file=sys.stderr)
    return EXIT_INVALID


def table(rows: Sequence[Sequence[str]]) -> str:
    """``rows`` (the first is the header) as left-aligned columns two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def add_database_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--dsn``, read by :func:`postgres_dsn`."""
    parser.add_argument("--config", metavar="FILE", help="config file naming services.postgres_url")
    parser.add_argument("--dsn", metavar="DSN", help="PostgreSQL URL (overrides the config)")


def postgres_dsn(args: argparse.Namespace) -> str | None:
    """``--dsn``, else ``TRIAGE_POSTGRES_URL``, else ``services.postgres_url`` of ``--config``.

    ``ConfigError`` when the ``--config`` file is invalid.
    """
    if args.dsn:
        return str(args.dsn)
    env = os.environ.get(ENV_POSTGRES_URL)
    if env:
        return env
    if args.config is not None:
        return load_config(args.config).services.postgres_url or None
    return None


def require_dsn(args: argparse.Namespace, command: str) -> str | None:
    """:func:`postgres_dsn`, or None after printing on stderr why there is none.

    ``command`` names the command in the message (``"triage dlq list"``).
    """
    dsn = postgres_dsn(args)
    if dsn is None:
        print(
            f"{command}: no PostgreSQL configured: pass --dsn, set "
            f"{ENV_POSTGRES_URL}, or set services.postgres_url in the --config file "
            "(the owner/admin URL, as for `triage migrate`).",
            file=sys.stderr,
        )
    return dsn


def redacted(dsn: str) -> str:
    """``dsn`` without its password, for messages."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    credentials, _, hosts = parts.netloc.rpartition("@")
    user = credentials.partition(":")[0]
    return parts._replace(netloc=f"{user}:***@{hosts}").geturl()


def run_on_database(command: str, dsn: str, work: Coroutine[Any, Any, T]) -> T | None:
    """Run ``work`` (a coroutine on ``dsn``) with ``asyncio.run``.

    A database that cannot be reached or fails (``OSError``, ``TimeoutError``,
    asyncpg's errors) prints ``"{command}: {dsn without password}: {error}"`` on
    stderr and gives None; any other exception propagates.
    """
    import asyncpg  # here: the commands that need no database do not load it

    try:
        return asyncio.run(work)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(f"{command}: {redacted(dsn)}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
