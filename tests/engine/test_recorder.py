"""The input recorder and its replay (``triage tune what-if``), on the autojump clock.

A breaker and a detector are fed a known workload while the recorder writes; the
replay with the recorded settings must reproduce exactly the transitions that
happened, and the replay with other thresholds exact other ones."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest
import trio

from engine.breaker import Breaker
from engine.detectors import CountInWindowDetector, DetectorSet
from engine.errors import CircuitOpen
from engine.recorder import MAGIC, Code, InputRecorder, segment_paths
from engine.replay import InputRecordingError, _frames, read_recording, replay, same_transitions
from tests.engine.test_breaker import DEFAULTS

FAILING = range(10, 15)  # the calls of these seconds fail: five in a row


def recorder(path: Path, **overrides: Any) -> InputRecorder:
    settings: dict[str, Any] = {
        "segment_bytes": 1 << 20,
        "segments": 3,
        "buffer": 10_000,
        "flush_s": 1.0,
    }
    return InputRecorder(path, **(settings | overrides))


async def workload(
    path: Path, *, seconds: int = 30, **recorder_settings: Any
) -> tuple[InputRecorder, dict[int, float]]:
    """One call a second for ``seconds`` (0.1 s each), failing in FAILING; a count
    detector of the failures ticked every second. Answers the end time of each call."""
    rec = recorder(path, **recorder_settings)
    breaker = Breaker("sms", **(DEFAULTS | {"fail_max": 5}))
    failures = CountInWindowDetector(
        "sms_failures", metric="m", threshold=4.0, window_s=30.0, buckets=30
    )
    detectors = DetectorSet([failures])
    rec.attach_breaker(breaker, "sms")
    rec.attach_set(detectors)
    ended: dict[int, float] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.run)
        await nursery.start(detectors.run, 1.0)
        t0 = trio.current_time()
        for k in range(seconds):
            await trio.sleep_until(t0 + k + 0.5)
            try:
                start = breaker.before_call()
            except CircuitOpen:
                continue
            await trio.sleep(0.1)
            ended[k] = trio.current_time()
            if k in FAILING:
                breaker.on_failure(RuntimeError("down"), start)
                failures.observe()
            else:
                breaker.on_success(start)
        await trio.sleep(2.0)  # a last flush
        nursery.cancel_scope.cancel()
    return rec, ended


def oid_of(run: Any, name: str) -> int:
    return next(oid for oid, d in run.objects.items() if d.get("name") == name)


async def test_the_replay_as_recorded_is_what_happened(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    _, ended = await workload(tmp_path / "inputs")
    recording = read_recording(tmp_path / "inputs")
    assert recording.torn == [] and len(recording.runs) == 1
    run = recording.runs[0]
    assert run.dropped == 0
    result = await trio.to_thread.run_sync(replay, run)
    breaker, detector = oid_of(run, "sms"), oid_of(run, "sms_failures")
    happened = [t.key() for t in result.happened(breaker)]
    # The fifth failure opens it; it is due half-open 10 s later; the next call closes it.
    assert happened == [
        (ended[14], "open"),
        (ended[14] + 10.0, "half-open"),
        (ended[25], "closed"),
    ]
    assert [t.key() for t in result.objects[breaker].transitions] == happened
    fired = [t.state for t in result.happened(detector)]
    assert fired == ["firing"] and result.diverged() == []


async def test_a_lower_fail_max_would_have_opened_at_the_third_failure(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    _, ended = await workload(tmp_path / "inputs")
    run = read_recording(tmp_path / "inputs").runs[0]
    breaker, detector = oid_of(run, "sms"), oid_of(run, "sms_failures")
    settings = {
        breaker: run.objects[breaker]["settings"] | {"fail_max": 3},
        detector: run.objects[detector]["settings"] | {"threshold": 1.0, "clear_threshold": 1.0},
    }
    result = await trio.to_thread.run_sync(lambda: replay(run, settings=settings))
    would = result.objects[breaker]
    # Open at the third failure; the two calls after it are refused (their failures not
    # fed); due half-open 10 s on; the first refused call then admitted closes it
    # (its outcome assumed: the next real one, a success).
    refused_then = [r[2] for r in run.records if r[0] == Code.REJECT and r[1] == breaker]
    first_probe = next(t for t in refused_then if t >= ended[12] + 10.0)
    assert [t.key() for t in would.transitions] == [
        (ended[12], "open"),
        (ended[12] + 10.0, "half-open"),
        (first_probe, "closed"),
    ]
    assert would.refused == 2 and would.assumed == 2
    # The detector fires at the first tick after its second failure, two ticks earlier.
    happened_fire = result.happened(detector)[0].t
    assert result.objects[detector].transitions[0].t == happened_fire - 3.0
    assert set(result.diverged()) == {breaker, detector}


async def test_segments_rotate_within_their_bound_and_still_replay(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    rec, _ = await workload(tmp_path / "inputs", seconds=60, segment_bytes=600, segments=20)
    files = [p for p in segment_paths(tmp_path / "inputs", 20) if p.exists()]
    assert rec.statistics().rotations == len(files) - 1 >= 1
    recording = read_recording(tmp_path / "inputs")
    assert len(recording.runs) == 1 and recording.runs[0].segments == files
    result = await trio.to_thread.run_sync(replay, recording.runs[0])
    assert result.diverged() == []
    # With two segments kept, the oldest go: the files stay within their bound.
    bounded, _ = await workload(tmp_path / "small", seconds=60, segment_bytes=1500, segments=2)
    kept = [p for p in segment_paths(tmp_path / "small", 2) if p.exists()]
    assert len(kept) == 2 and bounded.statistics().rotations >= 1
    for p in kept:  # within the bound, or one batch larger than a segment, alone
        frames, torn = _frames(p, p.read_bytes())
        assert torn == 0 and (p.stat().st_size <= 1500 or len(frames) == 2)
    assert read_recording(tmp_path / "small").runs  # readable without its first segment


async def test_a_full_buffer_drops_inputs_and_says_so(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    rec, _ = await workload(tmp_path / "inputs", buffer=3)
    stats = rec.statistics()
    assert stats.dropped > 0
    run = read_recording(tmp_path / "inputs").runs[0]
    assert run.dropped == stats.dropped


async def test_a_second_writer_is_locked_out_and_a_restart_keeps_the_last_run(
    tmp_path: Path, autojump_clock: trio.abc.Clock
) -> None:
    path = tmp_path / "inputs"
    first, second = recorder(path), recorder(path)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await nursery.start(second.run)
        assert first.statistics().writing and not second.statistics().writing
        nursery.cancel_scope.cancel()
    await workload(path)  # a new run: the last one's live segment moves to .1
    recording = read_recording(path)
    assert [len(r.segments) for r in recording.runs] == [1, 1]
    assert recording.runs[0].segments == [path.with_name("inputs.1")]


def test_a_torn_tail_is_ignored_and_garbage_is_a_typed_error(tmp_path: Path) -> None:
    good = tmp_path / "inputs"

    async def record() -> None:
        await workload(good, seconds=20)

    trio.run(record, clock=trio.testing.MockClock(autojump_threshold=0))
    whole = good.read_bytes()
    with good.open("ab") as f:  # kill -9 mid-write: a length and part of its payload
        f.write(struct.pack(">I", 1000) + b"\x92\x01")
    recording = read_recording(good)
    assert recording.torn == [(good, 6)]
    assert sum(len(r.records) for r in recording.runs) > 0

    garbage = tmp_path / "garbage"
    garbage.write_bytes(whole + struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    with pytest.raises(InputRecordingError, match=rf"{garbage}: offset {len(whole)}: not a frame"):
        read_recording(garbage)
    stranger = tmp_path / "stranger"
    stranger.write_bytes(b"PK\x03\x04" + bytes(20))
    with pytest.raises(InputRecordingError, match="offset 0: not an input recording"):
        read_recording(stranger)
    with pytest.raises(InputRecordingError, match="no such recording"):
        read_recording(tmp_path / "absent")
    assert whole.startswith(MAGIC)


def test_the_hot_paths_codes_are_the_recorders() -> None:
    from engine import breaker, detectors

    assert (breaker._ADMIT, breaker._REJECT, breaker._TRANSITION) == (
        Code.ADMIT, Code.REJECT, Code.TRANSITION,
    )  # fmt: skip
    assert (detectors._OBSERVE, detectors._TICK, detectors._TUNE) == (
        Code.OBSERVE, Code.TICK, Code.TUNE,
    )  # fmt: skip
    assert same_transitions([], [])
