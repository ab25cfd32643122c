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
import json
import sys
from typing import Any

from config import ConfigError
from providers.services import ENV_POSTGRES_URL
from supervisors.cli_common import (
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    add_database_arguments,
    report,
    require_dsn,
    run_on_database,
    table,
)

__all__ = ["EXIT_FAILED", "EXIT_INVALID", "EXIT_OK", "add_parser", "enable", "list_blocks"]


def list_blocks(args: argparse.Namespace) -> int:
    """``triage category list``: the blocks as a table, or JSON with ``--json``."""
    from providers.db.categories import CategoryError, list_blocks_async, validate_key

    if args.tenant is not None:
        try:
            validate_key(args.tenant, "email", "any")
        except CategoryError as exc:
            print(f"triage category list: {exc}", file=sys.stderr)
            return EXIT_INVALID
    try:
        dsn = require_dsn(args, "triage category list")
    except ConfigError as exc:
        return report(exc)
    if dsn is None:
        return EXIT_FAILED
    try:
        blocks = run_on_database(
            "triage category list", dsn, list_blocks_async(dsn, tenant_id=args.tenant)
        )
    except CategoryError as exc:
        print(f"triage category list: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if blocks is None:
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
    print(table(rows))
    return EXIT_OK


def enable(args: argparse.Namespace) -> int:
    """``triage category enable TENANT CHANNEL CATEGORY``: lift a ``disabled`` block."""
    from providers.db.categories import CategoryError, enable_async, validate_key

    try:
        tenant, channel, category = validate_key(args.tenant, args.channel, args.category)
    except CategoryError as exc:
        print(f"triage category enable: {exc}", file=sys.stderr)
        return EXIT_INVALID
    try:
        dsn = require_dsn(args, "triage category enable")
    except ConfigError as exc:
        return report(exc)
    if dsn is None:
        return EXIT_FAILED
    try:
        outcome = run_on_database(
            "triage category enable", dsn, enable_async(dsn, tenant, channel, category)
        )
    except CategoryError as exc:
        print(f"triage category enable: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if outcome is None:
        return EXIT_FAILED
    removed, current = outcome
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
        add_database_arguments(verb)
    return category
