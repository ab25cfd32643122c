"""``triage erase``: ask a running daemon to erase one patient (catalog row 15), as the
privacy office's tooling would, and print the signed receipt.

::

    triage erase --tenant T --patient P [--identifier +15550100 ...]
    triage erase --tenant T --patient P --receipt      # the receipt of an earlier erasure

It POSTs ``/v1/erasures`` (or ``/v1/erasures/receipt``) on the daemon's address
(``--url``, else ``daemon.host:port`` of ``--config``, else 127.0.0.1:8080); the
patient id travels in the body, never in a URL. Exit 0 with the receipt on stdout,
1 when the daemon refused or cannot be reached (its answer on stderr), 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import httpx

from supervisors.cli_send import EXIT_FAILED, EXIT_INVALID, EXIT_OK, base_url

__all__ = ["add_parser", "erase"]


def erase(args: argparse.Namespace) -> int:
    base = base_url(args, "triage erase")
    if base is None:
        return EXIT_INVALID
    body: dict[str, Any] = {"tenant_id": args.tenant, "patient_id": args.patient}
    path = "/v1/erasures/receipt" if args.receipt else "/v1/erasures"
    if args.identifier and not args.receipt:
        body["identifiers"] = args.identifier
    try:
        response = httpx.post(f"{base}{path}", json=body, timeout=args.timeout)
    except httpx.HTTPError as exc:
        print(f"triage erase: {base}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        answer: Any = response.json()
    except ValueError:
        answer = response.text
    if response.is_success:
        print(json.dumps(answer, indent=None if args.json else 2))
        return EXIT_OK
    print(f"triage erase: {response.status_code}: {json.dumps(answer)}", file=sys.stderr)
    return EXIT_FAILED


def add_parser(sub: Any) -> None:
    """Add ``erase`` to the ``triage`` subcommands."""
    parser: argparse.ArgumentParser = sub.add_parser(
        "erase",
        help="erase one patient's data through a running daemon (row 15) and print the receipt",
        description=__doc__.split("\n\n")[2] if __doc__ else None,
    )
    parser.add_argument("--tenant", required=True, help="the patient's tenant id")
    parser.add_argument("--patient", required=True, help="the patient id")
    parser.add_argument(
        "--identifier", action="append", default=[], metavar="VALUE",
        help="another value naming the patient in payloads (a phone number, an address); repeatable",
    )  # fmt: skip
    parser.add_argument("--receipt", action="store_true", help="fetch the receipt, erase nothing")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--url", help="the daemon's base URL")
    source.add_argument("--config", metavar="FILE", help="use daemon.host:port of this config")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    parser.add_argument("--json", action="store_true", help="print the receipt on one line")
    parser.set_defaults(handler=erase)
