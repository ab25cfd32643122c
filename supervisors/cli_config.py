"""``triage config diff OLD NEW``: what a reload from OLD to NEW would change.

Both files are loaded and checked as ``triage check-config`` checks them (what
``triage run`` checks at start, the providers' secrets aside). One line per changed key, path by path::

    $.breakers.default.fail_max: 5 -> 3 (live)
    $.daemon.port: 8080 -> 9090 (restart)

then a summary. ``live``: a reload (SIGHUP) applies it in place; ``restart``:
it takes a restart. Exit 0 when nothing differs, 1 when something does, 2 when
a file is invalid (each problem with its file, TOML path and reason).
"""

from __future__ import annotations

import argparse
from typing import Any

from config import ConfigError
from supervisors.cli_common import report

__all__ = ["EXIT_DIFF", "EXIT_SAME", "add_parser", "config_diff"]

EXIT_SAME = 0
EXIT_DIFF = 1


def config_diff(args: argparse.Namespace) -> int:
    from supervisors.reload import LIVE, diff, load_checked  # the tree's checks: heavy

    try:
        old, _ = load_checked(args.old, endpoints=False)
        new, catalog = load_checked(args.new, endpoints=False)
    except ConfigError as exc:
        return report(exc)
    changes = diff(old, new, catalog)
    if not changes:
        print(f"no difference: {args.old} {args.new}")
        return EXIT_SAME
    for change in changes:
        print(change)
    live = sum(1 for change in changes if change.how == LIVE)
    print(
        f"{len(changes)} key{'s' if len(changes) != 1 else ''} changed: {live} would apply"
        f" live (reload), {len(changes) - live} need a restart"
    )
    return EXIT_DIFF


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``config`` (verb ``diff``) to the ``triage`` subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "config", help="compare config files (what a reload would apply)"
    )
    verbs = parser.add_subparsers(dest="config_command", required=True, metavar="VERB")
    compare = verbs.add_parser(
        "diff",
        help="print the keys that differ, and which apply live or need a restart",
        description=__doc__.split("::")[0].strip() if __doc__ else None,
    )
    compare.add_argument("old", metavar="OLD", help="the running (or old) config file")
    compare.add_argument("new", metavar="NEW", help="the new config file")
    compare.set_defaults(handler=config_diff)
    return parser
