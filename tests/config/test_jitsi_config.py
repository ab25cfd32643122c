"""``[jitsi]`` and ``[fallback]`` as ``triage check-config`` refuses them: one line each,
naming the TOML path (the daemon's wiring refuses the same, see supervisors/virtual.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.config.test_daemon_refusals import check_config, write

CASES = [
    pytest.param(
        '[[jitsi.nodes]]\nname = "jvb1"\n[[jitsi.nodes]]\nname = "jvb1"\n',
        [("$.jitsi.nodes[1]", "node name 'jvb1' is given twice")],
        id="duplicate node",
    ),
    pytest.param(
        '[[jitsi.nodes]]\nname = "Bad Name"\n',
        [("$.jitsi.nodes[0].name", "expected str matching regex")],
        id="node name",
    ),
    pytest.param(
        '[[jitsi.nodes]]\nname = "jvb1"\nurl = "ftp://x"\n',
        [("$.jitsi.nodes[0].url", "must be a http:// or https:// URL")],
        id="node url",
    ),
    pytest.param(
        "[jitsi]\npoll_interval_s = 1.0\nhealth_timeout_s = 2.0\n",
        [("$.jitsi.health_timeout_s", "must be <= poll_interval_s (1)")],
        id="timeout longer than the poll",
    ),
    pytest.param(
        "[jitsi]\noverload_threshold = 1.5\n",
        [("$.jitsi.overload_threshold", "expected float <= 1.0, got 1.5")],
        id="overload threshold",
    ),
    pytest.param(
        '[jitsi]\nbreaker = "nope"\n[fallback]\nmailbox = "nope"\n',
        [
            ("$.jitsi.breaker", "names profile [breakers.nope], which does not exist"),
            ("$.fallback.mailbox", "names profile [mailboxes.nope], which does not exist"),
        ],
        id="missing profiles",
    ),
    pytest.param(
        '[mailboxes.fallback]\noverflow = "drop_newest"\n',
        [("$.mailboxes.fallback.overflow", "must be 'wait', got 'drop_newest'")],
        id="fallback requests are never dropped",
    ),
    pytest.param(
        "[fallback]\nmax_threads_per_patient_day = 0\n",
        [("$.fallback.max_threads_per_patient_day", "expected int >= 1, got 0")],
        id="cap",
    ),
]


@pytest.mark.parametrize(("overlay", "expected"), CASES)
def test_check_config_names_each_problem(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    overlay: str,
    expected: list[tuple[str, str]],
) -> None:
    found = check_config(write(tmp_path, overlay), capsys)
    assert len(found) == len(expected), found
    for (path, reason), (want_path, want) in zip(found, expected, strict=True):
        assert path == want_path and want in reason, (path, reason)
