"""``triage category``: the operator's view of row 3's category blocks.

::

    triage category list [--tenant T] [--json] [--config F] [--dsn DSN]
                            the throttled and disabled categories
    triage category enable TENANT CHANNEL CATEGORY [--config F] [--dsn DSN]
                            re-enable a category disabled after a bounce spike

Hooked into ``supervisors/cli.py`` with :func:`add_parser` (``handler`` is set
on each verb, as for the other commands). The database is found as for
``triage dlq``: ``--dsn``, else ``TRIAGE_POSTGRES_URL``, else
``services.postgres_url`` of ``--config`` -- the owner/admin URL. A superuser
sees every tenant; any other role works in the named tenant as ``triage_app``.

``enable`` removes only a ``disabled`` block: a throttle is automatic and lifts
by itself once the bounce ratio clears. Exit status: 0 done, 1 nothing was
disabled or the database failed (the reason on stderr), 2 bad arguments
(a tenant that is not a UUID, an unknown channel, an empty category).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from config import ConfigError, load_config
from providers.services import ENV_POSTGRES_URL

__all__ = ["EXIT_FAILED", "EXIT_INVALID", "EXIT_OK", "add_parser", "enable", "list_blocks"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2


def _dsn(args: argparse.Namespace, verb: str) -> str | None:
    """``--dsn``, else the environment, else the config; None after saying why there is none."""
    dsn: str | None = args.dsn or os.environ.get(ENV_POSTGRES_URL) or None
    if dsn is None and args.config is not None:
        dsn = load_config(args.config).services.postgres_url or None
    if dsn is None:
        print(
            f"triage category {verb}: no PostgreSQL configured: pass --dsn, set "
            f"{ENV_POSTGRES_URL}, or set services.postgres_url in the --config file "
            "(the owner/admin URL, as for `triage migrate`).",
            file=sys.stderr,
        )
    return dsn


def _redacted(dsn: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    credentials, _, hosts = parts.netloc.rpartition("@")
    return parts._replace(netloc=f"{credentials.partition(':')[0]}:***@{hosts}").geturl()


def _config_problem(verb: str, exc: ConfigError) -> int:
    for problem in exc.problems:
        print(problem, file=sys.stderr)
    print(f"triage category {verb}: the --config file is invalid", file=sys.stderr)
    return EXIT_INVALID


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def list_blocks(args: argparse.Namespace) -> int:
    """``triage category list``: the blocks as a table, or JSON with ``--json``."""
    import asyncpg

    from providers.db.categories import CategoryError, list_blocks_async, validate_key

    if args.tenant is not None:
        try:
            validate_key(args.tenant, "email", "any")
        except CategoryError as exc:
            print(f"triage category list: {exc}", file=sys.stderr)
            return EXIT_INVALID
    try:
        dsn = _dsn(args, "list")
    except ConfigError as exc:
        return _config_problem("list", exc)
    if dsn is None:
        return EXIT_FAILED
    try:
        blocks = asyncio.run(list_blocks_async(dsn, tenant_id=args.tenant))
    except CategoryError as exc:
        print(f"triage category list: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(
            f"triage category list: {_redacted(dsn)}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if args.json:
        document: list[dict[str, Any]] = [block.to_json() for block in blocks]
        print(json.dumps(document, indent=2))
        return EXIT_OK
    if not blocks:
        print("no blocked categories")
        return EXIT_OK
    rows = [["TENANT", "CHANNEL", "CATEGORY", "STATE", "SINCE", "REASON"]]
    rows += [
        [
            b.tenant_id,
            b.channel,
            b.category,
            b.state.value,
            b.since.isoformat(timespec="seconds"),
            b.reason,
        ]
        for b in blocks
    ]
    print(_table(rows))
    return EXIT_OK


def enable(args: argparse.Namespace) -> int:
    """``triage category enable TENANT CHANNEL CATEGORY``: lift a ``disabled`` block."""
    import asyncpg

    from providers.db.categories import CategoryError, enable_async, validate_key

    try:
        tenant, channel, category = validate_key(args.tenant, args.channel, args.category)
    except CategoryError as exc:
        print(f"triage category enable: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        dsn = _dsn(args, "enable")
    except ConfigError as exc:
        return _config_problem("enable", exc)
    if dsn is None:
        return EXIT_FAILED
    try:
        removed, current = asyncio.run(enable_async(dsn, tenant, channel, category))
    except CategoryError as exc:
        print(f"triage category enable: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        print(
            f"triage category enable: {_redacted(dsn)}: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    what = f"{channel} category {category!r} of tenant {tenant}"
    if removed is not None:
        print(
            f"re-enabled {what} (disabled since {removed.since.isoformat(timespec='seconds')}:"
            f" {removed.reason})"
        )
        return EXIT_OK
    if current is not None:
        print(
            f"triage category enable: {what} is not disabled, only {current.value}: a throttle"
            " lifts by itself once the bounce ratio clears",
            file=sys.stderr,
        )
    else:
        print(f"triage category enable: {what} is not disabled: nothing to do", file=sys.stderr)
    return EXIT_FAILED


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``category list`` / ``category enable`` to the ``triage`` subcommands.

    ``subparsers`` is what ``ArgumentParser.add_subparsers()`` returned; each verb
    sets ``handler`` (``handler(args) -> exit status``).
    """
    category: argparse.ArgumentParser = subparsers.add_parser(
        "category",
        help="list or re-enable message categories blocked after a bounce spike",
        description="Message categories throttled or disabled per tenant (catalog row 3). "
        f"Connect with the owner/admin URL: --dsn, else {ENV_POSTGRES_URL}, else "
        "services.postgres_url of --config.",
    )
    verbs = category.add_subparsers(dest="category_command", required=True, metavar="VERB")
    listing = verbs.add_parser("list", help="print the throttled and disabled categories")
    listing.add_argument("--tenant", metavar="TENANT", help="only this tenant's (a UUID)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=list_blocks)
    enabling = verbs.add_parser(
        "enable", help="re-enable a category that was disabled for a tenant"
    )
    enabling.add_argument("tenant", metavar="TENANT", help="the tenant's id (a UUID)")
    enabling.add_argument("channel", metavar="CHANNEL", help="sms, push or email")
    enabling.add_argument("category", metavar="CATEGORY", help="the message category")
    enabling.set_defaults(handler=enable)
    for verb in (listing, enabling):
        verb.add_argument(
            "--config", metavar="FILE", help="config file naming services.postgres_url"
        )
        verb.add_argument("--dsn", metavar="DSN", help="PostgreSQL URL (overrides the config)")
    return category
