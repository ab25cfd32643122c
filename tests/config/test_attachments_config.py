"""``triage check-config`` refuses bad ``[uploads]`` / ``[scanner]`` settings, naming each.

The same refusals stop ``triage run`` before anything starts (check-config runs
every check the daemon runs, tests/config/test_daemon_refusals.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.config.test_daemon_refusals import check_config, write

SCANNER_MAILBOX = '[mailboxes.scanner]   # the scanner pool: submits by tell_nowait (full: the row waits for a reload)\nbase = "default"\ncapacity = 10000\noverflow = "wait"\n'

CASES = [
    pytest.param(
        '[scanner]\nclamd_address = "http://127.0.0.1:3310"\n', None,
        [("$.scanner.clamd_address", "must be tcp://host:port or unix:///absolute/path, got "
          '"http://127.0.0.1:3310"')],
        id="clamd-address-not-tcp-or-unix",
    ),
    pytest.param(
        '[scanner]\nclamd_address = "unix://relative/clamd.ctl"\n', None,
        [("$.scanner.clamd_address", "must be tcp://host:port or unix:///absolute/path, got "
          '"unix://relative/clamd.ctl"')],
        id="clamd-socket-not-absolute",
    ),
    pytest.param(
        '[scanner]\nmin_workers = 5\nmax_workers = 2\n', None,
        [("$.scanner.max_workers", "must be at least min_workers (5), got 2")],
        id="workers-bounds-upside-down",
    ),
    pytest.param(
        '[scanner]\nscan_timeout_s = 0\n', None,
        [("$.scanner.scan_timeout_s", "expected float > 0.0, got 0")],
        id="no-scan-timeout",
    ),
    pytest.param(
        '[uploads]\nbacked_up_max_bytes = 30000000\n', None,
        [("$.uploads.backed_up_max_bytes", "must be at most max_upload_bytes (26214400), got 30000000")],
        id="backed-up-limit-over-the-cap",
    ),
    pytest.param(
        '[uploads]\nmax_upload_bytes = 0\n', None,
        [("$.uploads.max_upload_bytes", "expected int >= 1, got 0")],
        id="zero-cap",
    ),
    pytest.param(
        '[uploads]\npath = "v1/attachments"\n', None,
        [("$.uploads.path", "expected str matching regex '^/', got \"v1/attachments\"")],
        id="relative-path",
    ),
    pytest.param(
        "", (SCANNER_MAILBOX, ""),
        [("$.mailboxes.scanner", "missing required profile [mailboxes.scanner] (attachments use it)")],
        id="missing-scanner-mailbox",
    ),
    pytest.param(
        '[detectors.scan_queue_depth]\nkind = "rate"\nmetric = "triage_scan_queue_depth"\n'
        "threshold = 1.0\nwindow_s = 5.0\nbuckets = 5\n", None,
        [("$.detectors.scan_queue_depth.kind", "overrides row 8 (Attachment scan stuck), whose "
          "actor feeds a detector of kind 'gauge_sustained'; got 'rate'")],
        id="row-8-override-of-another-kind",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("overlay", "default_edit", "expected"), CASES)
def test_check_config_refuses_bad_attachment_settings(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    overlay: str,
    default_edit: tuple[str, str] | None,
    expected: list[tuple[str, str]],
) -> None:
    path = write(tmp_path, overlay, default_edit=default_edit)
    assert check_config(path, capsys) == expected
