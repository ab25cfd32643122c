"""``triage category list`` / ``enable`` through their parser and handlers, on real PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Sequence

import asyncpg
import pytest

from providers.db.categories import BlockState, block_async, lookup_block_async
from supervisors.cli_category import add_parser
from tests.providers.test_categories_db import _as_daemon, _tenants


def _main() -> Callable[[Sequence[str]], int]:
    parser = argparse.ArgumentParser(prog="triage")
    add_parser(parser.add_subparsers(dest="command", required=True))

    def main(argv: Sequence[str]) -> int:
        args = parser.parse_args(list(argv))
        status: int = args.handler(args)
        return status

    return main


def test_list_and_enable(postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    main = _main()
    a, b = asyncio.run(_tenants(postgres_url))
    assert main(["category", "list", "--dsn", postgres_url]) == 0
    assert capsys.readouterr().out.strip() == "no blocked categories"

    async def seed(pool: asyncpg.Pool[asyncpg.Record]) -> None:
        await block_async(pool, a, "email", "reminder", BlockState.DISABLED, "bounce ratio 0.2")
        await block_async(pool, b, "email", "news", BlockState.THROTTLED, "bounce ratio 0.06")

    _as_daemon(postgres_url, seed)

    assert main(["category", "list", "--dsn", postgres_url]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["TENANT", "CHANNEL", "CATEGORY", "STATE", "SINCE", "REASON"]
    assert sorted(line.split()[:4] for line in out[1:]) == sorted(
        [[a, "email", "reminder", "disabled"], [b, "email", "news", "throttled"]]
    )
    assert main(["category", "list", "--tenant", a, "--json", "--dsn", postgres_url]) == 0
    [block] = json.loads(capsys.readouterr().out)
    assert (block["tenant_id"], block["category"], block["state"]) == (a, "reminder", "disabled")
    assert block["reason"] == "bounce ratio 0.2" and "since" in block

    # A throttle is not the operator's to lift: exit 1, the row stays.
    assert main(["category", "enable", b, "email", "news", "--dsn", postgres_url]) == 1
    err = capsys.readouterr().err
    assert "is not disabled, only throttled" in err
    assert main(["category", "enable", a, "email", "reminder", "--dsn", postgres_url]) == 0
    done = capsys.readouterr().out
    assert f"re-enabled email category 'reminder' of tenant {a}" in done
    assert "bounce ratio 0.2" in done

    async def lookups(pool: asyncpg.Pool[asyncpg.Record]) -> list[object]:
        return [
            await lookup_block_async(pool, a, "email", "reminder"),
            (await lookup_block_async(pool, b, "email", "news")) is not None,
        ]

    assert _as_daemon(postgres_url, lookups) == [None, True]
    # Nothing disabled any more: exit 1 with a clear message.
    assert main(["category", "enable", a, "email", "reminder", "--dsn", postgres_url]) == 1
    assert "is not disabled: nothing to do" in capsys.readouterr().err


def test_bad_arguments_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    main = _main()
    monkeypatch.delenv("TRIAGE_POSTGRES_URL", raising=False)
    tenant = "8d9b5a52-3f0e-4d8e-9a51-0b5c7e7c2a11"
    assert main(["category", "enable", "not-a-tenant", "email", "reminder"]) == 2
    assert "tenant id must be a UUID, got 'not-a-tenant'" in capsys.readouterr().err
    assert main(["category", "enable", tenant, "fax", "reminder"]) == 2
    assert "channel must be one of ['sms', 'push', 'email'], got 'fax'" in capsys.readouterr().err
    assert main(["category", "enable", tenant, "email", ""]) == 2
    assert "category must be a non-empty name" in capsys.readouterr().err
    assert main(["category", "list", "--tenant", "x"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["category", "enable", tenant])
    assert exit_info.value.code == 2
    # Valid arguments but no database configured: exit 1 and say where to set it.
    assert main(["category", "enable", tenant, "email", "reminder"]) == 1
    assert "no PostgreSQL configured" in capsys.readouterr().err
    bad = "postgresql://nobody:secret@127.0.0.1:1/none"
    assert main(["category", "list", "--dsn", bad]) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1:1" in err and "secret" not in err
