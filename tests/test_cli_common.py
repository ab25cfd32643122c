"""supervisors.cli_common: finding the database, never printing its password, tables."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from config import default_path
from providers.services import ENV_POSTGRES_URL
from supervisors.cli_common import (
    EXIT_FAILED,
    add_database_arguments,
    postgres_dsn,
    redacted,
    require_dsn,
    run_on_database,
    table,
)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_database_arguments(parser)
    return parser.parse_args(argv)


def test_dsn_comes_from_the_flag_then_the_environment_then_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_POSTGRES_URL, "postgresql://env/db")
    assert postgres_dsn(_args("--dsn", "postgresql://flag/db")) == "postgresql://flag/db"
    assert postgres_dsn(_args()) == "postgresql://env/db"
    monkeypatch.delenv(ENV_POSTGRES_URL)
    config = tmp_path / "c.toml"
    shipped = default_path("default.toml").read_text()
    config.write_text(
        shipped.replace(
            '# postgres_url = "postgresql://triage@db:5432/triage"',
            'postgres_url = "postgresql://config/db"',
        )
    )
    assert postgres_dsn(_args("--config", str(config))) == "postgresql://config/db"
    assert postgres_dsn(_args()) is None


def test_require_dsn_says_why_there_is_none(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(ENV_POSTGRES_URL, raising=False)
    assert require_dsn(_args(), "triage dlq list") is None
    err = capsys.readouterr().err
    assert err.startswith("triage dlq list: no PostgreSQL configured: pass --dsn, set ")


def test_redacted_hides_only_the_password() -> None:
    assert redacted("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redacted("postgresql://u@h/db") == "postgresql://u@h/db"


def test_table_pads_columns_and_strips_line_ends() -> None:
    assert table([["A", "BB"], ["ccc", ""]]) == "A    BB\nccc"


def test_an_unreachable_database_is_a_message_and_none(capsys: pytest.CaptureFixture[str]) -> None:
    async def refused() -> int:
        raise ConnectionRefusedError("refused")

    assert run_on_database("triage x", "postgresql://u:secret@127.0.0.1:1/db", refused()) is None
    err = capsys.readouterr().err
    assert err.strip() == (
        "triage x: postgresql://u:***@127.0.0.1:1/db: ConnectionRefusedError: refused"
    )
    assert EXIT_FAILED == 1
