"""``triage budget``: the error budget of each SLO, read from the database.

::

    triage budget [--config F] [--dsn DSN] [--json]

The objectives, windows and freeze limit are the ``[slo]`` section of ``--config``
(the shipped default.toml without one); the counts are the database's
(``slo_buckets``, written by the daemons' error-budget actors). The database is
found as for ``triage dlq``: ``--dsn``, else ``TRIAGE_POSTGRES_URL``, else
``services.postgres_url`` of ``--config``.

Per SLO: the target, the events and bad events over ``window_days``, the budget
(bad events allowed), how much of it burned, the worst ``freeze_window_days``
within it, and the burn rate over each alert window (1.0 spends the budget
exactly over the window). The last line says whether adapter changes are frozen
and why. Exit status: 0 (frozen or not), 1 the database failed, 2 a bad config.
"""

from __future__ import annotations

import argparse
import json
import math
from datetime import UTC, datetime
from typing import Any

import msgspec

from config import ConfigError, default_path, load_config
from supervisors.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    add_database_arguments,
    report,
    require_dsn,
    run_on_database,
    table,
)

__all__ = ["add_parser", "budget"]


async def _counts(dsn: str, days: int, windows: list[float]) -> Any:
    import asyncpg

    from providers.db.slo import window_counts_async

    conn = await asyncpg.connect(dsn)
    try:
        return await window_counts_async(conn, days, windows)
    finally:
        await conn.close()


def _percent(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.1%}"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def budget(args: argparse.Namespace) -> int:
    """``triage budget``: the report as a table, or JSON with ``--json``."""
    from actors.error_budget import budget_report, burn_windows

    path = args.config if args.config is not None else str(default_path("default.toml"))
    try:
        config = load_config(path)
        dsn = require_dsn(args, "triage budget")
    except ConfigError as exc:
        return report(exc)
    if dsn is None:
        return EXIT_FAILED
    slo = config.slo
    counted = run_on_database(
        "triage budget", dsn, _counts(dsn, slo.window_days, burn_windows(slo))
    )
    if counted is None:
        return EXIT_FAILED
    days, windows = counted
    result = budget_report(slo, days, windows, today=datetime.now(UTC).date())
    if args.json:
        document = msgspec.to_builtins(result)
        document["frozen"] = result.frozen
        document["reasons"] = result.reasons()
        print(json.dumps(document, indent=2, default=str))
        return EXIT_OK
    spans = [round(w) for w in burn_windows(slo)]
    header = ["SLO", "TARGET", "EVENTS", "BAD", "BUDGET", "BURNED", "WORST 7D", "TO"]
    header[6] = f"WORST {result.freeze_window_days}D"
    header += [f"BURN {_duration(s)}" for s in spans]
    rows: list[list[str]] = [header]
    for s in result.slos:
        rows.append(
            [
                s.slo,
                f"{s.target:.3%}",
                str(s.events),
                str(s.bad),
                f"{s.budget:.1f}",
                _percent(s.burned),
                _percent(s.worst_window_burned),
                "" if s.worst_window_end is None else s.worst_window_end.isoformat(),
                *(
                    "inf" if math.isinf(s.burn_rates[w]) else f"{s.burn_rates[w]:.2f}"
                    for w in spans
                ),
            ]
        )
    print(table(rows))
    if result.frozen:
        print("adapter changes FROZEN: " + "; ".join(result.reasons()))
    else:
        print(
            f"adapter changes allowed: no SLO burned more than {result.limit:.0%} of its"
            f" {result.window_days}-day budget within {result.freeze_window_days} days"
        )
    return EXIT_OK


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``budget`` to the ``triage`` subcommands (its ``handler`` is :func:`budget`)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "budget",
        help="the error budget of each SLO and whether adapter changes are frozen",
        description=__doc__.split("::")[0].strip() if __doc__ else None,
    )
    add_database_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(handler=budget)
    return parser
