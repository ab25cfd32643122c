"""``triage budget`` through its parser and handler, on real PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Sequence

import asyncpg
import pytest

from providers.db.migrate import migrate_async
from supervisors.cli_budget import add_parser


def _main() -> Callable[[Sequence[str]], int]:
    parser = argparse.ArgumentParser(prog="triage")
    add_parser(parser.add_subparsers(dest="command", required=True))

    def main(argv: Sequence[str]) -> int:
        args = parser.parse_args(list(argv))
        status: int = args.handler(args)
        return status

    return main


async def _seed(url: str, *rows: tuple[str, int, int, str]) -> None:
    await migrate_async(url)
    conn = await asyncpg.connect(url)
    try:
        for slo, good, bad, ago in rows:
            await conn.execute(
                "INSERT INTO slo_buckets (minute, slo, good, bad)"
                " VALUES (date_trunc('minute', now() - $4::text::interval), $1, $2, $3)",
                slo, good, bad, ago,
            )  # fmt: skip
    finally:
        await conn.close()


def test_budget_shows_the_burn_and_the_freeze(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    main = _main()
    asyncio.run(_seed(postgres_url))
    assert main(["budget", "--dsn", postgres_url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:8] == [
        "SLO", "TARGET", "EVENTS", "BAD", "BUDGET", "BURNED", "WORST", "7D",
    ]  # fmt: skip
    assert out[1].split()[:6] == ["dispatch_success", "99.500%", "0", "0", "0.0", "0.0%"]
    assert out[-1].startswith("adapter changes allowed")

    # 2,000 events at 99.5%: 10 bad allowed; 8 bad in the last hour burn 80% of it.
    asyncio.run(
        _seed(
            postgres_url,
            ("dispatch_success", 1992, 8, "10 minutes"),
            ("send_latency", 500, 1, "2 days"),
        )
    )
    assert main(["budget", "--dsn", postgres_url]) == 0
    out = capsys.readouterr().out.splitlines()
    success = out[1].split()
    assert success[:7] == ["dispatch_success", "99.500%", "2000", "8", "10.0", "80.0%", "80.0%"]
    # Burn over 5 m: nothing counted; over 30 m, 1 h, ... 3 d: 8 of 2000 = 0.4% bad,
    # 0.8x the budget's pace.
    assert success[8:] == ["0.00"] + ["0.80"] * 6
    assert out[-1] == (
        "adapter changes FROZEN: dispatch_success burned 80% of its 30-day error budget"
        f" in the 7 days to {success[7]} (the policy freezes adapter changes above 50%)"
    )
    assert main(["budget", "--json", "--dsn", postgres_url]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["frozen"] is True
    latency = next(s for s in document["slos"] if s["slo"] == "send_latency")
    assert (latency["good"], latency["bad"], latency["frozen"]) == (500, 1, False)


def test_budget_without_a_database_fails_with_the_reason(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRIAGE_POSTGRES_URL", raising=False)
    assert _main()(["budget"]) == 1
    assert "triage budget: no PostgreSQL configured" in capsys.readouterr().err
