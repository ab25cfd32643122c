"""Log lines are redacted before they are written (row 11): stderr and the file sink."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

from actors.phi_rules import phi_rules
from config.schema import PhiConfig
from supervisors.logging import json_logging

RULES = phi_rules(PhiConfig(fields=["diagnosis"], patterns={"mrn": r"\bMRN\d{6}\b"}))


def test_a_phi_value_never_reaches_the_stream_or_the_file(tmp_path: Path) -> None:
    path = tmp_path / "daemon.jsonl"
    stream = io.StringIO()
    log = logging.getLogger("triage.test_redaction")
    with json_logging(
        "info", wall=lambda: 1.0, stream=stream, log_file=str(path), redact=RULES.redact_value
    ):
        log.warning("patient %s", "MRN123456", extra={"diagnosis": "asthma", "port": 1})
        try:
            raise ValueError("bad MRN654321")
        except ValueError:
            log.exception("failed")
    written = path.read_text()
    for text in (stream.getvalue(), written):
        assert "MRN123456" not in text and "asthma" not in text and "MRN654321" not in text
    first, second = (json.loads(line) for line in written.splitlines())
    assert first["msg"] == "patient [redacted]"
    assert (first["diagnosis"], first["port"]) == ("[redacted]", 1)
    assert "[redacted]" in second["exc"]
    assert RULES.find_text(written) is None


def test_the_file_sink_follows_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "daemon.jsonl"
    log = logging.getLogger("triage.test_rotation")
    with json_logging("info", wall=lambda: 1.0, stream=io.StringIO(), log_file=str(path)):
        log.info("one")
        os.rename(path, tmp_path / "daemon.jsonl.1")  # logrotate's move
        log.info("two")
    assert [json.loads(line)["msg"] for line in path.read_text().splitlines()] == ["two"]
    assert "one" in (tmp_path / "daemon.jsonl.1").read_text()
