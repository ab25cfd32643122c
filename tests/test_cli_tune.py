"""``triage tune what-if NEW --recording FILE``: a recording made by objects built from
dev.toml's profiles, replayed against NEW's thresholds; exit 0 (no change), 1 (a
change, printed beside what happened), 2 (NEW invalid, or the recording unreadable)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio
import trio.testing

from config.schema import engine_kwargs
from engine.breaker import Breaker
from engine.detectors import DetectorSet, GaugeSustainedDetector, make_detector
from engine.errors import ProviderUnavailable
from engine.recorder import InputRecorder
from engine.tuning import Tunables
from supervisors.cli import main
from supervisors.reload import detector_rule, load_checked
from tests.supervisors.test_daemon import DEV_TEXT

DEPTH = (
    '[detectors.mailbox_depth]\nkind = "gauge_sustained"\nmetric = "triage_mailbox_depth"\n'
    "threshold = {threshold}\nwindow_s = 60.0\nfor_s = 5.0\n"
)


def _config(tmp_path: Path, name: str, text: str) -> str:
    base = tmp_path / "base.toml"
    if not base.exists():
        base.write_text(DEV_TEXT)
    path = tmp_path / name
    path.write_text(f"extends = {json.dumps(str(base))}\n{text}")
    return str(path)


def _record(tmp_path: Path, running: str) -> Path:
    """A daemon's minute, as the recorder sees it: the sms_primary breaker (built from
    the running config's profile, registered as the tree registers it) takes 20 good
    calls then failures; a mailbox-depth gauge climbs to 8 and stays."""
    cfg, catalog = load_checked(running, endpoints=False)
    path = tmp_path / "inputs"

    async def minute() -> None:
        recorder = InputRecorder(path, segment_bytes=1 << 20, segments=2, buffer=4096, flush_s=1.0)
        tunables = Tunables()
        tunables.recorder = recorder
        breaker = tunables.breaker(
            "sms_primary", Breaker("sms:ghasi", **engine_kwargs(cfg.breakers["sms_primary"]))
        )
        rule = detector_rule("mailbox_depth", None, cfg, catalog)
        assert rule is not None
        depth = make_detector("mailbox_depth", **rule).expect(GaugeSustainedDetector)
        detectors = DetectorSet([depth])
        recorder.attach_set(detectors)
        async with trio.open_nursery() as nursery:
            await nursery.start(recorder.run)
            await nursery.start(detectors.run, 1.0)
            for k in range(60):
                await trio.sleep(1.0)
                depth.set(min(k / 2, 8.0))
                try:
                    start = breaker.before_call()
                except Exception:
                    continue
                await trio.sleep(0.2)
                if k < 20:
                    breaker.on_success(start)
                else:
                    breaker.on_failure(ProviderUnavailable("503"), start)
            await trio.sleep(2.0)
            nursery.cancel_scope.cancel()

    trio.run(minute, clock=trio.testing.MockClock(autojump_threshold=0))
    return path


def test_lower_thresholds_are_shown_beside_what_happened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running = _config(tmp_path, "running.toml", DEPTH.format(threshold=6.0))
    recording = _record(tmp_path, running)
    new = _config(
        tmp_path, "new.toml", "[breakers.sms_primary]\nfail_max = 3\n" + DEPTH.format(threshold=3.0)
    )
    assert main(["tune", "what-if", new, "--recording", str(recording)]) == 1
    out = capsys.readouterr().out
    assert "breaker sms:ghasi [breakers.sms_primary]: fail_max 5 -> 3" in out
    assert "detector mailbox_depth [detectors.mailbox_depth]: threshold 6.0 -> 3.0" in out
    assert "warning" not in out  # the as-recorded replay is what happened
    assert out.splitlines()[-1] == (
        f"2 of 2 breakers and detectors would have changed state otherwise under {new}"
    )

    assert main(["tune", "what-if", new, "--recording", str(recording), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    [run] = report["runs"]
    objects = {o["name"]: o for o in run["objects"]}
    breaker, depth = objects["sms:ghasi"], objects["mailbox_depth"]
    assert breaker["faithful"] and depth["faithful"]
    # Happened: open at the fifth failure (call 24); would: at the third (call 22), two
    # calls of 1.2 s earlier.
    happened_open = breaker["happened"][0]
    would_open = breaker["would"][0]
    assert happened_open["state"] == would_open["state"] == "open"
    assert happened_open["t"] - would_open["t"] == pytest.approx(2.4, abs=1e-9)
    assert "5 consecutive failures" in happened_open["detail"]
    assert "3 consecutive failures" in would_open["detail"]
    assert "last ProviderUnavailable" in would_open["detail"]  # the recorded exception's name
    # Refused: the fourth and fifth failing calls, then the real probes that come while
    # the new breaker is open again; assumed: its own earlier probes (a failure each).
    assert (breaker["refused"], breaker["assumed"]) == (5, 3)
    assert [h["state"] for h in breaker["would"]] == ["open"] + ["half-open", "open"] * 3
    # The gauge (k / 2 at call k) passes 6 at call 13 and passes 3 at call 7: it fires
    # (5 s after) six calls earlier, give or take the tick that sees it.
    assert depth["happened"][0]["state"] == depth["would"][0]["state"] == "firing"
    assert 6 * 1.2 - 1.0 <= depth["happened"][0]["t"] - depth["would"][0]["t"] <= 6 * 1.2 + 1.0


def test_the_running_thresholds_change_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running = _config(tmp_path, "running.toml", DEPTH.format(threshold=6.0))
    recording = _record(tmp_path, running)
    assert main(["tune", "what-if", running, "--recording", str(recording)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("0 of 2 breakers and detectors would have changed")


def test_a_kind_change_is_not_replayed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    running = _config(tmp_path, "running.toml", DEPTH.format(threshold=6.0))
    recording = _record(tmp_path, running)
    other = DEPTH.format(threshold=6.0).replace("gauge_sustained", "rate")
    new = _config(tmp_path, "new.toml", other)
    assert main(["tune", "what-if", new, "--recording", str(recording)]) == 0
    assert "needs a restart, not replayed" in capsys.readouterr().out


def test_an_invalid_config_or_recording_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running = _config(tmp_path, "running.toml", DEPTH.format(threshold=6.0))
    bad = _config(tmp_path, "bad.toml", "[breakers.sms_primary]\nfail_max = 0\n")
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"not a recording at all")
    assert main(["tune", "what-if", bad, "--recording", str(garbage)]) == 2
    assert f"{bad}:3: $.breakers.sms_primary.fail_max: expected int >= 1, got 0" in (
        capsys.readouterr().err
    )
    assert main(["tune", "what-if", running, "--recording", str(garbage)]) == 2
    assert f"recording unreadable: {garbage}: offset 0: not an input recording" in (
        capsys.readouterr().err
    )
