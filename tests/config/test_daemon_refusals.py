"""``triage check-config`` refuses what ``triage run`` would refuse, one line per problem
(``FILE[:LINE]: $.toml.path: reason``, exit 2), and ``triage run`` refuses it the same way
before any service starts: one case per kind of config the daemon used to die on."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from config import default_path
from supervisors.cli import main
from tests.supervisors.test_daemon import DEV_TEXT

DEFAULT_TEXT = default_path("default.toml").read_text()
PROBLEM_LINE = re.compile(r"^(?P<file>[^:]+)(?::\d+(?::\d+)?)?: (?P<path>\$\S*): (?P<reason>.+)$")


def write(tmp_path: Path, overlay: str, *, default_edit: tuple[str, str] | None = None) -> Path:
    """dev.toml (on a copy of default.toml, edited) with ``overlay`` on top."""
    default = DEFAULT_TEXT
    if default_edit is not None:
        old, new = default_edit
        assert default.count(old) == 1, old
        default = default.replace(old, new)
    (tmp_path / "default.toml").write_text(default)
    base = json.dumps(str(default_path("default.toml")))
    assert DEV_TEXT.count(f"extends = {base}") == 1
    (tmp_path / "dev.toml").write_text(
        DEV_TEXT.replace(f"extends = {base}", 'extends = "default.toml"')
    )
    path = tmp_path / "triage.toml"
    path.write_text('extends = "dev.toml"\n' + overlay)
    return path


def problems(err: str) -> list[tuple[str, str]]:
    """``(path, reason)`` of every problem line; each names a file and a TOML path."""
    *lines, count = err.splitlines()
    assert re.fullmatch(r"\d+ problems? found", count), err
    assert int(count.split()[0]) == len(lines)
    found = []
    for line in lines:
        match = PROBLEM_LINE.match(line)
        assert match is not None, line
        found.append((match["path"], match["reason"]))
    return found


def check_config(path: Path, capsys: pytest.CaptureFixture[str]) -> list[tuple[str, str]]:
    assert main(["check-config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    return problems(err)


CASES = [
    # -- regexes ---------------------------------------------------------------------------
    pytest.param(
        '[phi.patterns]\nmrn = "\\\\bMRN\\\\d+"\nbroken = "("\n', None,
        [("$.phi.patterns.broken", 'not a regular expression: missing ), unterminated '
          'subpattern at position 0, got "("')],
        id="regex-that-does-not-compile",
    ),
    pytest.param(
        '[daemon]\nlog_file = "/nonexistent-triage-dir/daemon.jsonl"\n', None,
        [("$.daemon.log_file", "cannot write '/nonexistent-triage-dir/daemon.jsonl':"
          " '/nonexistent-triage-dir' is not a writable directory")],
        id="log-file-in-no-directory",
    ),
    pytest.param(
        '[[phi.templates]]\ntemplate = "lab"\nversions = [2]\nfields = ["result"]\n'
        '[phi.patterns]\nred = "redact"\n', None,
        [("$.phi.redaction", "'[redacted]' matches pattern 'red' (a redacted line would be"
          ' found again), got "[redacted]"')],
        id="redaction-marker-that-a-pattern-finds",
    ),
    # -- NATS names and subjects -----------------------------------------------------------
    pytest.param(
        '[relay]\nstream = "TRIAGE EVENTS"\n', None,
        [("$.relay.stream", 'must not contain whitespace, got "TRIAGE EVENTS"')],
        id="stream-name-with-a-space",
    ),
    pytest.param(
        '[inbox]\nstream = "TRIAGE.SCHEDULING"\n', None,
        [("$.inbox.stream", "must not contain '.', got \"TRIAGE.SCHEDULING\"")],
        id="stream-name-with-a-dot",
    ),
    pytest.param(
        '[inbox]\ndurable = "inbox.*"\n', None,
        [("$.inbox.durable", "must not contain '*' or '.', got \"inbox.*\"")],
        id="durable-with-a-dot-and-a-star",
    ),
    pytest.param(
        '[inbox]\ndurable = "inbox>"\n', None,
        [("$.inbox.durable", "must not contain '>', got \"inbox>\"")],
        id="durable-with-gt",
    ),
    pytest.param(
        '[inbox]\ndurable = ""\n', None,
        [("$.inbox.durable", 'expected str of length >= 1, got ""')],
        id="blank-durable",
    ),
    pytest.param(
        '[relay]\nsubjects = "triage.>.x"\n', None,
        [("$.relay.subjects", "'>' may only be the last token, got \"triage.>.x\"")],
        id="gt-before-the-last-token",
    ),
    pytest.param(
        '[inbox]\nsubjects = "triage.scheduling.>, "\n', None,
        [("$.inbox.subjects", "subject 2 ('') must not be blank, got \"triage.scheduling.>, \"")],
        id="blank-subject-in-a-list",
    ),
    pytest.param(
        '[relay]\ndlq_subject = "triage..dlq"\n', None,
        [("$.relay.dlq_subject", "has an empty token (a leading, trailing or doubled '.'), "
          'got "triage..dlq"')],
        id="empty-token",
    ),
    pytest.param(
        '[dispatch]\nnats_subject = "triage.commands dispatch"\n', None,
        [("$.dispatch.nats_subject", 'must not contain whitespace, got "triage.commands dispatch"')],
        id="subject-with-whitespace",
    ),
    pytest.param(
        '[relay]\nduplicate_window_s = 0.05\n', None,
        [("$.relay.duplicate_window_s", "expected float >= 0.1, got 0.05")],
        id="duplicate-window-under-100ms",
    ),
    pytest.param(
        '[inbox]\nsubjects = "triage.*.scheduled"\n', None,
        [("$.inbox.subjects", "'triage.*.scheduled' overlaps 'triage.events.>' of [relay] "
          "subjects: JetStream refuses a second stream on subjects another stream captures")],
        id="inbox-overlapping-the-relay",
    ),
    pytest.param(
        '[inbox]\nstream = "TRIAGE_EVENTS_DLQ"\n', None,
        [("$.inbox.stream", "'TRIAGE_EVENTS_DLQ' is the relay's stream (or its DLQ's): the "
          "inbox needs a stream of its own, or it consumes the relay's events")],
        id="inbox-on-the-relays-dlq-stream",
    ),
    # -- row 15: where an erasure finds a patient's messages ---------------------------------
    pytest.param(
        '[inbox]\nstream = "SCHEDULING_V2"\n', None,
        [("$.erasure.scan_streams", "does not name 'SCHEDULING_V2' ([inbox] stream): its "
          "messages name patients on subjects that do not, and an erasure would leave them")],
        id="inbox-stream-not-scanned-by-the-erasure",
    ),
    pytest.param(
        '[erasure]\nstream = "OTHER"\nsubject_prefix = "patients"\n', None,
        [("$.erasure.stream", "'OTHER' is not the relay's stream 'TRIAGE_EVENTS': a patient's "
          "events are published there, and purged from there"),
         ("$.erasure.subject_prefix", "'patients' is outside [relay] subjects: the relay would "
          "dead-letter a patient's events")],
        id="erasure-purging-another-stream",
    ),
    pytest.param(
        '[erasure]\nscan_streams = ["BAD NAME"]\n', None,
        [("$.erasure.scan_streams[0]", 'must not contain whitespace, got "BAD NAME"')],
        id="scanned-stream-name-with-a-space",
    ),
    # -- channels --------------------------------------------------------------------------
    pytest.param(
        "[channels]\nsms = []\n", None,
        [("$.channels.sms", "needs at least one provider (its dispatcher has no route), got []")],
        id="channel-without-a-provider",
    ),
    # -- references to profiles, before any service starts ---------------------------------
    pytest.param(
        '[providers.ghasi]\nguard = "sms_gateway"\n', None,
        [("$.providers.ghasi.guard", "unknown guards profile 'sms_gateway' (defined: apns, "
          "clamd, fcm, jitsi, nats_publish, postgres_primary, postgres_replica, provider, "
          "recording_ingest, redis, sms_primary, sms_secondary, smtp)")],
        id="unknown-guard",
    ),
    pytest.param(
        '[dlr]\nrate_limit = "callbacks"\n', None,
        [("$.dlr.rate_limit", "unknown rate_limits profile 'callbacks' (defined: "
          "dlr_callbacks, fallback_threads, tenant_sends)")],
        id="unknown-rate-limit",
    ),
    pytest.param(
        '[guards.smtp]\nbreaker = "mail"\nbulkhead = "mail"\n', None,
        [("$.guards.smtp.breaker", 'unknown breakers profile "mail" (defined: apns, clamd, '
          "default, fallback_patient_day, fcm, jitsi, nats_publish, postgres_primary, "
          "postgres_replica, redis, sms_primary, sms_secondary, smtp)"),
         ("$.guards.smtp.bulkhead", 'unknown bulkheads profile "mail" (defined: blob, clamd, '
          "default, dlr, email, jitsi, nats, postgres, push, redis, sms)")],
        id="unknown-breaker-and-bulkhead",
    ),
    pytest.param(
        "", ("[supervisors.relay]", "[supervisors.relays]"),
        [("$.supervisors.relay", "missing required profile [supervisors.relay] "
          "(the daemon's tree uses it)")],
        id="missing-supervisor",
    ),
    pytest.param(
        "", ("[mailboxes.monitor]", "[mailboxes.monitors]"),
        [("$.mailboxes.monitor", "missing required profile [mailboxes.monitor] "
          "(the db_health actor uses it)")],
        id="missing-backbone-mailbox",
    ),
    # -- the clock monitor (row 16) -------------------------------------------------------
    pytest.param(
        "[clock]\ntimeout_s = 20.0\n", None,
        [("$.clock.timeout_s", "must not exceed interval_s (10): a turn ends before the next"
          " is due, got 20.0")],
        id="clock-turn-longer-than-interval",
    ),
    pytest.param(
        "[clock]\nmax_offset_s = 0.3\n", None,
        [("$.clock.max_offset_s", "must equal row 16's detector threshold (0.5): one limit"
          " for the monitor's warnings and the alert; got 0.3")],
        id="clock-limit-not-the-rows",
    ),
    # -- singletons (issue 12) --------------------------------------------------------------
    pytest.param(
        '[singletons]\nactors = ["clock_monitor"]\n', None,
        [("$.singletons.actors", "no singleton child 'clock_monitor' (known: push_feedback,"
          " push_stale_sweep), got an array")],
        id="singleton-not-a-singleton-child",
    ),
    pytest.param(
        "[singletons]\nretry_s = 1.0\nconnect_timeout_s = 3.0\n", None,
        [("$.singletons.connect_timeout_s", "must not exceed retry_s (1): an attempt ends"
          " before the next is due, got 3.0")],
        id="singleton-attempt-longer-than-retry",
    ),
    pytest.param(
        "", ("[mailboxes.commands]", "[mailboxes.command]"),
        [("$.mailboxes.commands", "missing profile [mailboxes.commands] (the channels use it)")],
        id="missing-channel-mailbox",
    ),
    # -- paths -----------------------------------------------------------------------------
    pytest.param(
        'catalog = "fail\\u0000ures.toml"\n', None,
        [("$.catalog", 'must not contain a NUL byte, got "fail\\u0000ures.toml"')],
        id="catalog-path-with-a-nul-byte",
    ),
    pytest.param(
        '[spool]\npath = "{tmp}/dev.toml/spool"\n', None,
        [("$.spool.path", "the spool '{tmp}/dev.toml/spool' cannot be created: "
          "'{tmp}/dev.toml' is not a directory")],
        id="spool-under-a-file",
    ),
    pytest.param(
        '[spool]\npath = "{tmp}"\n', None,
        [("$.spool.path", "the spool '{tmp}' is a directory; the spool is a file")],
        id="spool-is-a-directory",
    ),
    pytest.param(
        '[providers.apns]\nkey_file = "{tmp}/apns.p8"\n', None,
        [("$.providers.apns.key_file", "cannot read '{tmp}/apns.p8': No such file or directory")],
        id="key-file-missing",
    ),
    # -- what only the wiring knows (the tree is built, on stand-ins, and thrown away) ------
    pytest.param(
        "[bounces]\nceiling_ratio = 0.01\n", None,
        [("$", "bounce tracker: ceiling_ratio (0.01) must exceed threshold (0.05)")],
        id="wiring-bounce-rules",
    ),
    pytest.param(
        '[providers.smtp]\nsender = "noreply"\n', None,
        [("$.providers", "smtp adapter 'smtp': sender 'noreply' is not a mail address")],
        id="wiring-smtp-sender",
    ),
    # -- numbers, addresses ----------------------------------------------------------------
    pytest.param(
        "[guards.sms_primary]\ntimeout_s = inf\n", None,
        [("$.guards.sms_primary.timeout_s", "must be a finite number, got inf")],
        id="infinite-timeout",
    ),
    pytest.param(
        '[daemon]\nhost = "no such host"\n', None,
        [("$.daemon.host", "cannot bind 'no such host': Name or service not known")],
        id="unresolvable-host",
    ),
    pytest.param(
        '[providers.twilio]\nbase_url = "api.twilio.com"\n', None,
        [("$.providers.twilio.base_url", 'must be a http:// or https:// URL, got "api.twilio.com"')],
        id="url-without-a-scheme",
    ),
]  # fmt: skip


@pytest.mark.parametrize(("overlay", "default_edit", "expected"), CASES)
def test_check_config_refuses_what_the_daemon_refuses(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    overlay: str,
    default_edit: tuple[str, str] | None,
    expected: list[tuple[str, str]],
) -> None:
    path = write(tmp_path, overlay.replace("{tmp}", str(tmp_path)), default_edit=default_edit)
    wanted = [(where, reason.replace("{tmp}", str(tmp_path))) for where, reason in expected]
    assert check_config(path, capsys) == wanted


def test_several_problems_are_several_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Two of the loader's (each section decoded on its own)...
    path = write(tmp_path, '[relay]\nstream = "A B"\n[channels]\nemail = []\n')
    assert [where for where, _ in check_config(path, capsys)] == [
        "$.relay.stream",
        "$.channels.email",
    ]
    # ... and three of the daemon's checks of the loaded config, all at once.
    path = write(
        tmp_path,
        '[providers.fcm]\nguard = "push"\n[inbox]\nsubjects = "triage.events.x"\n',
        default_edit=("[mailboxes.relay]", "[mailboxes.relays]"),
    )
    assert [where for where, _ in check_config(path, capsys)] == [
        "$.mailboxes.relay",
        "$.providers.fcm.guard",
        "$.inbox.subjects",
    ]


def test_the_daemon_refuses_the_same_lines_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # No service URL is configured: had the daemon got as far as its services, it
    # would have started embedded PostgreSQL and NATS and logged JSON lines.
    path = write(
        tmp_path,
        '[phi.patterns]\nbroken = "("\n',
    )
    refused = check_config(path, capsys)
    assert main(["run", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert (out, problems(err)) == ("", refused)
    path = write(tmp_path, "", default_edit=("[mailboxes.monitor]", "[mailboxes.monitors]"))
    refused = check_config(path, capsys)
    assert main(["run", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert (out, problems(err)) == ("", refused)
    assert "{" not in err  # no JSON log line: nothing was started
