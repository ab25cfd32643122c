"""Mutants of default.toml and dev.toml: ``triage check-config`` answers every one with exit 0,
or exit 2 and one line per problem naming a file and a TOML path -- never a traceback -- and
configs it accepts start the daemon (a fixed few, as processes, on the embedded services).

A mutation edits the text as an operator would: it drops a key or a whole table, renames a
table (what named it now dangles), or gives a key another value -- empty, blank, a regex that
does not compile, a NATS name or subject JetStream refuses, a number out of range, a value of
another type, a NUL byte, a profile name that does not exist.
"""

from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config import default_path
from providers.services import ENV_NATS_URL, ENV_POSTGRES_URL, ENV_REDIS_URL
from supervisors.cli import main
from supervisors.emulated import Emulated
from tests.config.test_daemon_refusals import problems
from tests.supervisors.test_dispatch_crash import daemon_process

DEFAULT_LINES = default_path("default.toml").read_text().splitlines()
DEV_LINES = default_path("dev.toml").read_text().splitlines()
KEY = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=")
HEADER = re.compile(r"^\[(?P<name>[^\[\]]+)\]")
#: What a value may become (TOML literals).
VALUES = [
    '""', '" "', "[]", '["("]', '"("', '"a b"', '"a.b"', '"triage.>.x"', '"triage..x"', '"*"',
    '">"', '"nope"', '["nope"]', '"\\u0000"', '"x\\u0000y"', "-1", "0", "0.05", "1", "1e300",
    "inf", "-inf", "nan", "true", "{}", '"triage.events.x"', '"TRIAGE_EVENTS"',
]  # fmt: skip


@dataclass(frozen=True)
class Mutation:
    """Line ``line`` of a file's lines: dropped, or its value set to ``value``; a table
    header: the table dropped (``value`` None) or renamed."""

    line: int
    value: str | None


def apply(lines: list[str], mutations: list[Mutation]) -> list[str]:
    out = list(lines)
    for mutation in sorted(mutations, key=lambda m: -m.line):  # bottom up: indexes hold
        text = out[mutation.line]
        header = HEADER.match(text)
        if header is not None:
            end = next(
                (i for i in range(mutation.line + 1, len(out)) if HEADER.match(out[i])), len(out)
            )
            if mutation.value is None:
                del out[mutation.line : end]
            else:
                out[mutation.line] = f"[{header['name']}_renamed]"
            continue
        key = KEY.match(text)
        assert key is not None
        if mutation.value is None:
            del out[mutation.line]
        else:
            out[mutation.line] = f"{key['key']} = {mutation.value}"
    return out


def mutations(lines: list[str]) -> st.SearchStrategy[list[Mutation]]:
    editable = [i for i, text in enumerate(lines) if KEY.match(text) or HEADER.match(text)]
    one = st.builds(Mutation, st.sampled_from(editable), st.none() | st.sampled_from(VALUES))
    return st.lists(one, min_size=1, max_size=3, unique_by=lambda m: m.line)


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the mutants live, next to a copy of the shipped catalog."""
    path = tmp_path_factory.mktemp("mutants")
    (path / "failures.toml").write_text(default_path("failures.toml").read_text())
    return path


def write(directory: Path, default: list[str], dev: list[str] | None) -> Path:
    """default.toml's lines (and dev.toml's, on it) in ``directory``: the file to check."""
    (directory / "default.toml").write_text("\n".join(default) + "\n")
    if dev is None:
        return directory / "default.toml"
    (directory / "dev.toml").write_text("\n".join(dev) + "\n")
    return directory / "dev.toml"


@st.composite
def mutants(draw: st.DrawFn) -> tuple[list[str], list[str] | None]:
    """(default.toml, dev.toml or None): one or both mutated."""
    target = draw(st.sampled_from(["default", "dev", "dev-on-default"]))
    default = DEFAULT_LINES
    if target != "dev":
        default = apply(DEFAULT_LINES, draw(mutations(DEFAULT_LINES)))
    if target == "default":
        return default, None
    dev = apply(DEV_LINES, draw(mutations(DEV_LINES))) if target == "dev" else DEV_LINES
    return default, dev


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutant=mutants())
def test_check_config_exits_0_or_2_with_paths(
    mutant: tuple[list[str], list[str] | None],
    directory: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = write(directory, *mutant)
    code = main(["check-config", str(path)])  # a traceback fails the test
    out, err = capsys.readouterr()
    assert code in (0, 2), err
    if code == 0:
        assert out.startswith(f"ok: {path}\n") and err == ""
    else:
        assert out == ""
        assert problems(err)  # every line: FILE[:LINE]: $.path: reason


# -- accepted mutants start the daemon -----------------------------------------------------

#: Mutants of dev.toml that check-config accepts, each on the edge of a refusal it makes:
#: the daemon must start with them (a check that refused them would be wrong too).
ACCEPTED = {
    "edges-of-the-nats-checks": """
[relay]
duplicate_window_s = 0.1
session_s = 0.05
subjects = "triage.events.>, triage.audit.*"
[inbox]
subjects = "triage.scheduling.>, triage.appointments.*.changed"
durable = "inbox-2"
[dispatch]
nats_queue = "triage.dispatch"
nats_subject = "triage.commands.dispatch.v2"
[phi.patterns]
mrn = "\\\\bMRN[0-9]{6}\\\\b"
diagnosis = "(?i)diagnos"
""",
    "one-provider-per-channel-and-other-profiles": """
[channels]
sms = ["twilio"]
push = ["apns"]
[providers.ghasi]
guard = "sms_secondary"
[dlr]
rate_limit = "tenant_sends"
""",
    "relay-off-a-spool-to-create-and-a-host-name": """
[relay]
enabled = false
[daemon]
host = "localhost"
[spool]
path = "{tmp}/not/yet/there/spool"
""",
}


class _OwnEmulators:
    """The daemon runs the emulators of dev.toml itself: nothing to point anywhere."""

    def point_receipts_at(self, url: str) -> None:
        pass


@pytest.mark.parametrize("name", sorted(ACCEPTED))
async def test_an_accepted_mutant_starts_the_daemon(
    name: str, tmp_path: Path, postgres_url: str, nats_url: str, redis_url: str
) -> None:
    dev = json.dumps(str(default_path("dev.toml")))
    catalog = json.dumps(str(default_path("failures.toml")))
    overlay = ACCEPTED[name].replace("{tmp}", str(tmp_path))
    if "[daemon]" not in overlay:
        overlay += "\n[daemon]\n"
    overlay = overlay.replace("[daemon]\n", "[daemon]\nport = 0\n")
    config = tmp_path / "triage.toml"
    config.write_text(f"extends = {dev}\ncatalog = {catalog}\n{overlay}")
    # In a thread: check-config runs a Trio loop of its own (the dry build of the tree).
    assert await trio.to_thread.run_sync(main, ["check-config", str(config)]) == 0
    env = {
        **os.environ, "PYTHONUNBUFFERED": "1", ENV_POSTGRES_URL: postgres_url,
        ENV_NATS_URL: nats_url, ENV_REDIS_URL: redis_url,
    }  # fmt: skip
    async with daemon_process(config, env, cast("Emulated", _OwnEmulators())) as running:
        running.process.send_signal(signal.SIGTERM)  # ready: /readyz answered 200
        with trio.fail_after(15):
            assert await running.process.wait() == 0
