"""The ``triage`` command line.

::

    triage check-config FILE              validate a config and the catalog it names, with
                                          every check the daemon makes before it starts
    triage catalog [--config F | --catalog F] [--json]
                                          the failure catalog as a table (or JSON): each
                                          row's owner, module and chaos scenario
    triage rules [--config F | --catalog F] [-o FILE]
                                          Prometheus alert rules from the catalog, and
                                          the error budget's burn-rate alerts ([slo])
    triage dashboard [--config F | --catalog F] [-o FILE]
                                          a Grafana dashboard of the catalog (JSON)
    triage run [--config FILE] [--break-glass REASON]
                                          run the daemon (REASON: let changed adapters
                                          through an error-budget freeze, recorded)
    triage budget [--config F] [--dsn DSN] [--json]
                                          each SLO's error budget, and the freeze
    triage migrate [--config FILE] [--dsn DSN]
                                          apply the pending database migrations
    triage dlq list [--config F] [--dsn DSN] [--all] [--json]
                                          the outbox's dead letters (pending redrive)
    triage dlq redrive ID [--config F] [--dsn DSN]
                                          put dead letter ID's event back in the outbox
    triage category list [--tenant T] [--json] | enable TENANT CHANNEL CATEGORY
                                          categories a bounce spike throttled or disabled
    triage send --channel C --to R --template T [--data K=V ...] [--url U | --config F]
                                          hand one dispatch to a running daemon

Exit status: 0 on success, 1 when a command fails (the reason on stderr), 2
when a file is invalid (each problem printed to stderr as
``FILE:LINE: $.path: message``) or the arguments are wrong.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import msgspec

from config import (
    Catalog,
    ConfigError,
    TriageConfig,
    catalog_path,
    default_path,
    describe_detector,
    load_catalog,
    load_config,
    rules_yaml,
)
from config.catalog import project_root
from providers.services import ENV_POSTGRES_URL
from supervisors import cli_budget, cli_category, cli_config, cli_erase, cli_send, cli_tune
from supervisors.cli_common import (
    EXIT_FAILED,
    EXIT_OK,
    add_database_arguments,
    postgres_dsn,
    report,
    require_dsn,
    run_on_database,
    table,
)
from supervisors.vocabulary import METRICS, MITIGATIONS

__all__ = ["main"]


def _load_catalog(path: Path) -> Catalog:
    """The catalog at ``path``, its built rows derived from the daemon's tree."""
    # Imported here: the tree imports the actors, which `send`, `dlq`... do not need.
    from supervisors.tree import built_catalog

    return built_catalog(load_catalog(path, metrics=METRICS, mitigations=MITIGATIONS))


def _file_cell(path: str) -> str:
    """A catalog row's module or scenario: the path, marked when the file is not there."""
    return path if (project_root() / path).is_file() else f"{path} (not built)"


def _catalog_from_args(args: argparse.Namespace) -> tuple[Path, Catalog]:
    """The catalog named by ``--catalog``, else by ``--config``'s file, else the shipped one."""
    if args.catalog is not None:
        path = Path(args.catalog)
    elif args.config is not None:
        path = catalog_path(load_config(args.config), args.config)
    else:
        path = default_path("failures.toml")
    return path, _load_catalog(path)


def _summary(config: TriageConfig) -> str:
    d = config.daemon
    counts = [
        (len(config.mailboxes), "mailbox", "mailboxes"),
        (len(config.supervisors), "supervisor", "supervisors"),
        (len(config.breakers), "breaker", "breakers"),
        (len(config.bulkheads), "bulkhead", "bulkheads"),
        (len(config.retries), "retry policy", "retry policies"),
        (len(config.rate_limits), "rate limit", "rate limits"),
        (len(config.guards), "guard", "guards"),
        (len(config.detectors), "extra detector", "extra detectors"),
    ]
    profiles = ", ".join(f"{n} {one if n == 1 else many}" for n, one, many in counts)
    services = [
        f"{name}={'set' if url else 'embedded'}"
        for name, url in (
            ("postgres", config.services.postgres_url),
            ("nats", config.services.nats_url),
            ("redis", config.services.redis_url),
        )
    ]
    return (
        f"  daemon: {d.host}:{d.port}, drain {d.drain_s:g}s, log level {d.log_level}\n"
        f"  services: {', '.join(services)}\n"
        f"  profiles: {profiles}"
    )


def _check_config(args: argparse.Namespace) -> int:
    # Imported here: the tree's checks import the actors, which the other
    # subcommands do not need.
    from supervisors.tree import check_config

    try:
        config = load_config(args.file)
        path = Path(args.catalog) if args.catalog is not None else catalog_path(config, args.file)
        catalog = _load_catalog(path)
        check_config(config, catalog, args.file)  # what `triage run` refuses, nothing started
    except ConfigError as exc:
        return report(exc)
    built = len(catalog.built)
    print(f"ok: {args.file}")
    print(_summary(config))
    print(f"  catalog: {path}: {len(catalog.rows)} rows, {built} built")
    return EXIT_OK


def _catalog(args: argparse.Namespace) -> int:
    try:
        _, catalog = _catalog_from_args(args)
    except ConfigError as exc:
        return report(exc)
    if args.json:
        rows: list[dict[str, Any]] = []
        for row in catalog.rows:
            item = cast("dict[str, Any]", msgspec.to_builtins(row))
            item["detector_text"] = describe_detector(row.detector)
            item["state"] = catalog.state(row)
            item["built"] = catalog.is_built(row.id)
            item["module_exists"] = (project_root() / row.module).is_file()
            item["scenario_exists"] = (project_root() / row.scenario).is_file()
            rows.append(item)
        print(msgspec.json.format(msgspec.json.encode({"rows": rows}), indent=2).decode())
        return EXIT_OK
    lines = [["ID", "NAME", "DETECTOR", "MITIGATIONS", "OWNER", "MODULE", "SCENARIO", "STATE"]]
    lines += [
        [
            str(row.id),
            row.name,
            describe_detector(row.detector),
            ", ".join(row.mitigations),
            row.owner,
            _file_cell(row.module),
            _file_cell(row.scenario),
            catalog.state(row),
        ]
        for row in catalog.rows
    ]
    print(table(lines))
    return EXIT_OK


def _rules(args: argparse.Namespace) -> int:
    try:
        _, catalog = _catalog_from_args(args)
        # The burn-rate alerts of [slo]: the --config file's, else the shipped default's.
        slo_source = args.config if args.config is not None else default_path("default.toml")
        slo = load_config(slo_source).slo
    except ConfigError as exc:
        return report(exc)
    text = rules_yaml(catalog, slo if slo.enabled else None)
    if args.output is None:
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
    return EXIT_OK


def _dashboard(args: argparse.Namespace) -> int:
    from config.grafana import dashboard

    try:
        _, catalog = _catalog_from_args(args)
    except ConfigError as exc:
        return report(exc)
    text = json.dumps(dashboard(catalog), indent=2) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    config = args.config if args.config is not None else str(default_path("default.toml"))
    # Imported here: the daemon pulls in the whole runtime, which the other
    # subcommands do not need.
    daemon = importlib.import_module("supervisors.daemon")
    main_run = cast("Callable[[str], int]", daemon.main_run)
    if args.break_glass:
        from actors.error_budget import BREAK_GLASS_ENV

        os.environ[BREAK_GLASS_ENV] = args.break_glass
    try:
        return main_run(config)
    except ConfigError as exc:
        return report(exc)


def _migrate(args: argparse.Namespace) -> int:
    try:
        dsn = postgres_dsn(args)
    except ConfigError as exc:
        return report(exc)
    if dsn is None:
        print(
            "triage migrate: no PostgreSQL configured: pass --dsn, set "
            f"{ENV_POSTGRES_URL}, or set services.postgres_url in the --config file. "
            "This command never starts the embedded PostgreSQL: `triage run` starts "
            "and migrates its own.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    # Imported here: the migrations are not needed by the other subcommands.
    from providers.db.migrate import MigrationError, load_migrations, migrate_async

    try:
        applied = run_on_database("triage migrate", dsn, migrate_async(dsn))
    except MigrationError as exc:
        print(f"triage migrate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if applied is None:
        return EXIT_FAILED
    names = {m.version: m.path.name for m in load_migrations()}
    for version in applied:
        print(f"applied {names[version]}")
    print(
        f"{len(applied)} migration{'s' if len(applied) != 1 else ''} applied"
        if applied
        else "up to date: no pending migrations"
    )
    return EXIT_OK


def _one_line(text: str, width: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _dlq_list(args: argparse.Namespace) -> int:
    try:
        dsn = require_dsn(args, "triage dlq list")
    except ConfigError as exc:
        return report(exc)
    if dsn is None:
        return EXIT_FAILED
    from providers.db.dead_letters import list_dead_letters

    letters = run_on_database(
        "triage dlq list", dsn, list_dead_letters(dsn, include_redriven=args.all)
    )
    if letters is None:
        return EXIT_FAILED
    if args.json:
        print(json.dumps([letter.to_json() for letter in letters], indent=2))
        return EXIT_OK
    if not letters:
        print("no dead letters" if args.all else "no dead letters pending redrive")
        return EXIT_OK
    header = ["ID", "SOURCE", "REF", "ATTEMPTS", "CREATED_AT", "ERROR"]
    if args.all:
        header.append("REDRIVEN_AT")
    rows: list[list[str]] = [header]
    for letter in letters:
        row = [
            str(letter.id), letter.source, letter.ref, str(letter.attempts),
            letter.created_at.isoformat(timespec="seconds"), _one_line(letter.error),
        ]  # fmt: skip
        if args.all:
            redriven = letter.redriven_at
            row.append("" if redriven is None else redriven.isoformat(timespec="seconds"))
        rows.append(row)
    print(table(rows))
    return EXIT_OK


def _dlq_redrive(args: argparse.Namespace) -> int:
    try:
        dsn = require_dsn(args, "triage dlq redrive")
    except ConfigError as exc:
        return report(exc)
    if dsn is None:
        return EXIT_FAILED
    from providers.db.dead_letters import RedriveError, redrive

    try:
        redriven = run_on_database("triage dlq redrive", dsn, redrive(dsn, args.id))
    except RedriveError as exc:
        print(f"triage dlq redrive: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if redriven is None:
        return EXIT_FAILED
    print(f"dead letter {args.id} redriven: {redriven.what}")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="triage", description="Triage resilience engine: configuration, catalog and daemon."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = sub.add_parser(
        "check-config", help="validate a config file and the failure catalog it names"
    )
    check.add_argument("file", metavar="FILE", help="the TOML config file")
    check.add_argument("--catalog", metavar="FILE", help="check this catalog instead")
    check.set_defaults(handler=_check_config)

    catalog = sub.add_parser("catalog", help="print the failure catalog")
    source = catalog.add_mutually_exclusive_group()
    source.add_argument("--catalog", metavar="FILE", help="the catalog file")
    source.add_argument("--config", metavar="FILE", help="use the catalog this config names")
    catalog.add_argument("--json", action="store_true", help="print JSON instead of a table")
    catalog.set_defaults(handler=_catalog)

    board = sub.add_parser("dashboard", help="print a Grafana dashboard (JSON) of the catalog")
    source = board.add_mutually_exclusive_group()
    source.add_argument("--catalog", metavar="FILE", help="the catalog file")
    source.add_argument("--config", metavar="FILE", help="use the catalog this config names")
    board.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    board.set_defaults(handler=_dashboard)

    rules = sub.add_parser("rules", help="print Prometheus alert rules derived from the catalog")
    source = rules.add_mutually_exclusive_group()
    source.add_argument("--catalog", metavar="FILE", help="the catalog file")
    source.add_argument("--config", metavar="FILE", help="use the catalog this config names")
    rules.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    rules.set_defaults(handler=_rules)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", metavar="FILE", help="config file (default: shipped default.toml)")
    run.add_argument(
        "--break-glass",
        metavar="REASON",
        help="start with changed adapter sections during an error-budget freeze"
        " (recorded with REASON; the same as TRIAGE_BREAK_GLASS=REASON)",
    )
    run.set_defaults(handler=_run)

    migrate = sub.add_parser(
        "migrate",
        help="apply the pending database migrations",
        description="Apply the pending migrations to PostgreSQL, in order, under an "
        f"advisory lock. The server is --dsn, else {ENV_POSTGRES_URL}, else "
        "services.postgres_url of --config. Connect as the tables' owner or a "
        "superuser, not as the daemon's role.",
    )
    add_database_arguments(migrate)
    migrate.set_defaults(handler=_migrate)

    dlq = sub.add_parser(
        "dlq",
        help="list or redrive the outbox's dead letters",
        description="The outbox's dead letters (catalog row 9). Connect with the owner/admin "
        f"URL, found as for `migrate`: --dsn, else {ENV_POSTGRES_URL}, else "
        "services.postgres_url of --config. A non-superuser runs as triage_relay.",
    )
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="VERB")
    dlq_list = dlq_sub.add_parser("list", help="print the dead letters pending redrive")
    dlq_redrive = dlq_sub.add_parser(
        "redrive", help="re-insert a dead letter's event into the outbox (new id, same aggregate)"
    )
    dlq_redrive.add_argument("id", metavar="ID", type=int, help="the dead letter's id")
    for verb in (dlq_list, dlq_redrive):
        add_database_arguments(verb)
    dlq_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    dlq_list.add_argument("--all", action="store_true", help="include redriven dead letters")
    dlq_list.set_defaults(handler=_dlq_list)
    dlq_redrive.set_defaults(handler=_dlq_redrive)
    cli_send.add_parser(sub)
    cli_erase.add_parser(sub)
    cli_category.add_parser(sub)
    cli_budget.add_parser(sub)
    cli_config.add_parser(sub)
    cli_tune.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``triage`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    handler = cast("Callable[[argparse.Namespace], int]", args.handler)
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
