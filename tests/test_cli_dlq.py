"""``triage dlq list`` and ``triage dlq redrive`` against real PostgreSQL (superuser URL)."""

from __future__ import annotations

import asyncio
import json

import pytest

from supervisors.cli import main
from tests.providers.test_dead_letters import _move, _outbox, _setup


def test_dlq_list_and_redrive(postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, ids = asyncio.run(_setup(postgres_url))
    assert main(["dlq", "list", "--dsn", postgres_url]) == 0
    assert "no dead letters pending redrive" in capsys.readouterr().out

    asyncio.run(_move(postgres_url, [(ids[0], "PoisonEvent: stream refused")]))
    assert main(["dlq", "list", "--dsn", postgres_url]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["ID", "SOURCE", "REF", "ATTEMPTS", "CREATED_AT", "ERROR"]
    assert f" outbox  {ids[0]} " in out and "PoisonEvent: stream refused" in out

    assert main(["dlq", "list", "--dsn", postgres_url, "--json"]) == 0
    [letter] = json.loads(capsys.readouterr().out)
    assert (letter["source"], letter["ref"], letter["attempts"]) == ("outbox", str(ids[0]), 1)
    assert set(letter) >= {"id", "error", "created_at"}

    assert main(["dlq", "redrive", str(letter["id"]), "--dsn", postgres_url]) == 0
    out = capsys.readouterr().out
    new_id = asyncio.run(_outbox(postgres_url))[-1][0]
    assert f"dead letter {letter['id']} redriven: outbox event {new_id} (seq 4" in out

    assert main(["dlq", "redrive", str(letter["id"]), "--dsn", postgres_url]) == 1
    assert "already redriven" in capsys.readouterr().err
    assert main(["dlq", "redrive", "424242", "--dsn", postgres_url]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_dlq_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("TRIAGE_POSTGRES_URL", raising=False)
    assert main(["dlq", "list"]) == 1
    assert "no PostgreSQL configured" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["dlq", "redrive", "not-a-number"])
    assert exit_info.value.code == 2
    bad = "postgresql://nobody@127.0.0.1:1/none"
    assert main(["dlq", "list", "--dsn", bad]) == 1
    assert "127.0.0.1:1" in capsys.readouterr().err
