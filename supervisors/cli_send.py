"""``triage send``: hand one dispatch to a running daemon, as a client would.

::

    triage send --channel sms --to +15550100 --template reminder --data time=10:30
    triage send --config config/dev.toml --channel email --to pat@example.org \\
        --template email_reminder --data time=10:30 --idempotency-key visit-42

It POSTs ``/v1/dispatches`` on the daemon's address (``--url``, else
``daemon.host:port`` of ``--config``, else 127.0.0.1:8080) with an
``Idempotency-Key`` header (``--idempotency-key``, else a fresh one, printed so the
same send can be repeated safely) and prints the answer. The tenant defaults to
the demo tenant ``make run`` seeds. Exit 0 when the daemon accepted the dispatch
(2xx), 1 when it refused it or cannot be reached (the answer on stderr), 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

import httpx

from config import ConfigError, load_config
from supervisors.demo import DEMO_TENANT_ID

__all__ = ["add_parser", "base_url", "send"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INVALID = 2


def _data(pairs: list[str]) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            return None
        out[key] = value
    return out


def base_url(args: argparse.Namespace, command: str = "triage send") -> str | None:
    """The daemon's base URL from ``--url`` or ``--config`` (None: the error is printed)."""
    if args.url:
        return str(args.url).rstrip("/")
    if args.config:
        try:
            daemon = load_config(args.config).daemon
        except ConfigError as exc:
            print(f"{command}: {exc}", file=sys.stderr)
            return None
        host = f"[{daemon.host}]" if ":" in daemon.host else daemon.host
        return f"http://{host}:{daemon.port}"
    return "http://127.0.0.1:8080"


def send(args: argparse.Namespace) -> int:
    data = _data(args.data)
    if data is None:
        print("triage send: --data takes KEY=VALUE", file=sys.stderr)
        return EXIT_INVALID
    base = base_url(args)
    if base is None:
        return EXIT_INVALID
    key = args.idempotency_key or str(uuid.uuid4())
    body: dict[str, Any] = {
        "tenant_id": args.tenant,
        "channel": args.channel,
        "template": args.template,
        "recipient": args.to,
        "data": data,
    }
    if args.template_version is not None:
        body["template_version"] = args.template_version
    try:
        response = httpx.post(
            f"{base}/v1/dispatches",
            json=body,
            headers={"Idempotency-Key": key},
            timeout=args.timeout,
        )
    except httpx.HTTPError as exc:
        print(f"triage send: {base}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        answer: Any = response.json()
    except ValueError:
        answer = response.text
    out = {"status_code": response.status_code, "idempotency_key": key, "answer": answer}
    text = json.dumps(out, indent=None if args.json else 2)
    if response.is_success:
        print(text)
        return EXIT_OK
    print(text, file=sys.stderr)
    return EXIT_FAILED


def add_parser(sub: Any) -> None:
    """Add ``send`` to the ``triage`` subcommands (``sub`` is argparse's subparsers action)."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "send",
        help="send one dispatch through a running daemon (POST /v1/dispatches)",
        description=__doc__.split("\n\n")[2] if __doc__ else None,
    )
    parser.add_argument("--channel", required=True, choices=["sms", "push", "email"])
    parser.add_argument(
        "--to", required=True, help="E.164 number, fcm:TOKEN / apns:TOKEN, or an address"
    )
    parser.add_argument("--template", required=True, help="template name")
    parser.add_argument("--template-version", type=int, help="a version (default: the active one)")
    parser.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a template field (repeatable)",
    )
    parser.add_argument(
        "--tenant",
        default=str(DEMO_TENANT_ID),
        help="tenant id (default: the demo tenant make run seeds)",
    )
    parser.add_argument("--idempotency-key", help="default: a fresh one (printed)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", help="the daemon's base URL")
    source.add_argument("--config", metavar="FILE", help="use daemon.host:port of this config")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--json", action="store_true", help="print the answer on one line")
    parser.set_defaults(handler=send)
