"""Replaying a recording of breaker and detector inputs (``triage tune what-if``).

:func:`read_recording` reads what :class:`~engine.recorder.InputRecorder` wrote,
segment by segment, oldest first, and splits it into *runs* (one per daemon
start: each has its own Trio clock and its own objects). :func:`replay` feeds one
run's inputs, in their order and at their times, to fresh breakers and detectors
built either as recorded (their settings at attach time, reloads applied when
they happened) or with other settings, under a clock that is set exactly to each
input's time, and answers every state change each object went through.

What a replay cannot know, and how it decides:

- **A call the real breaker admitted, the new one refuses.** The call never
  happens: its outcome, when it comes, is not fed (counted in ``refused``).
- **A call the real breaker refused, the new one admits.** The dependency was
  never asked, so the outcome is assumed: the next outcome the real breaker saw
  (else the last one before; else a success), with no duration (``assumed``).
- **Mitigations.** A breaker forced open, disabled or reset by a mitigation is
  replayed as recorded, at the time it happened, even when the detector that
  triggered it would have fired at another time under the new thresholds.
- **Inputs dropped** by a full recorder buffer are lost (``dropped`` says how many).

Replaying a run *as recorded* should reproduce exactly what happened; an object
for which it does not (see :meth:`RunReplay.diverged`) is one whose picture is
incomplete (a dropped input, a rotated-away start, a breaker fed by code that
bypasses the taps), and its what-if says so.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import trio

from engine.breaker import Breaker, CircuitState
from engine.detectors import Detector, make_detector
from engine.errors import CircuitOpen, TriageError
from engine.recorder import FORMAT_VERSION, MAGIC, Batch, Code, Header

__all__ = [
    "InputRecordingError",
    "RecordedRun",
    "Recording",
    "RunReplay",
    "Transition",
    "read_recording",
    "replay",
]

_LENGTH = struct.Struct(">I")
_OUTCOMES = frozenset({Code.SUCCESS, Code.FAILURE, Code.IGNORED})


class InputRecordingError(TriageError):
    """A recording that cannot be read: not a recording, or bytes that are not frames."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"{path}: offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Transition:
    """One state change: ``state`` is a breaker state, or ``firing`` / ``cleared``."""

    t: float  # Trio time of the run
    state: str
    detail: str  # the breaker's reason, or the detector's value

    def key(self) -> tuple[float, str]:
        return (self.t, self.state)


@dataclass
class RecordedRun:
    """The inputs of one daemon run, in order."""

    run: str
    wall: float  # wall time at Trio time ``origin``
    origin: float
    objects: dict[int, dict[str, Any]] = field(default_factory=dict)  # oid -> description
    attached_at: dict[int, float] = field(default_factory=dict)  # oid -> ATTACH time, if kept
    records: list[list[Any]] = field(default_factory=list)
    dropped: int = 0  # inputs the recorder's buffer lost
    segments: list[Path] = field(default_factory=list)

    def wall_at(self, t: float) -> float:
        return self.wall + (t - self.origin)

    @property
    def end(self) -> float:
        return self.records[-1][2] if self.records else self.origin

    def happened(self) -> dict[int, list[Transition]]:
        """The transitions recorded per object: what really happened."""
        by_oid: dict[int, list[Transition]] = {}
        for record in self.records:
            if record[0] == Code.TRANSITION:
                by_oid.setdefault(record[1], []).append(_transition(self, record))
        return by_oid


@dataclass
class Recording:
    """A whole recording: its runs, oldest first, and what could not be read."""

    path: Path
    runs: list[RecordedRun]
    torn: list[tuple[Path, int]]  # (segment, bytes of a torn last frame, ignored)


def _segments(path: Path) -> list[Path]:
    """``path``'s segments oldest first; a segment named itself (``inputs.2``) alone."""
    if re.fullmatch(r"\d+", path.suffix.removeprefix(".")) and path.exists():
        return [path]
    numbered = []
    for candidate in path.parent.glob(f"{path.name}.*"):
        suffix = candidate.name[len(path.name) + 1 :]
        if suffix.isdigit():
            numbered.append((int(suffix), candidate))
    found = [p for _, p in sorted(numbered, reverse=True)]
    if path.exists():
        found.append(path)
    return found


def _frames(path: Path, data: bytes) -> tuple[list[tuple[int, bytes]], int]:
    """The frames of one segment (offset, payload) and the length of a torn tail."""
    if not data.startswith(MAGIC):
        raise InputRecordingError(path, 0, "not an input recording (no TRIAGEIN magic)")
    frames: list[tuple[int, bytes]] = []
    offset = len(MAGIC)
    while offset < len(data):
        if offset + _LENGTH.size > len(data):
            return frames, len(data) - offset
        (length,) = _LENGTH.unpack_from(data, offset)
        end = offset + _LENGTH.size + length
        if end > len(data):
            return frames, len(data) - offset
        frames.append((offset, data[offset + _LENGTH.size : end]))
        offset = end
    return frames, 0


_DECODER = msgspec.msgpack.Decoder(Header | Batch)


def read_recording(path: str | Path) -> Recording:
    """Read the recording at ``path`` (its rotated segments too, oldest first).

    A frame cut short at the end of a segment (``kill -9`` mid-write) is left out
    and reported in ``torn``; anything else unreadable raises
    :class:`InputRecordingError` with the file and offset."""
    base = Path(path)
    paths = _segments(base)
    if not paths:
        raise InputRecordingError(base, 0, "no such recording (nor rotated segments)")
    runs: dict[str, RecordedRun] = {}
    order: list[str] = []
    torn: list[tuple[Path, int]] = []
    for segment in paths:
        try:
            data = segment.read_bytes()
        except OSError as exc:
            raise InputRecordingError(segment, 0, f"cannot be read: {exc.strerror}") from None
        frames, cut = _frames(segment, data)
        if cut:
            torn.append((segment, cut))
        current: RecordedRun | None = None
        for offset, payload in frames:
            try:
                frame = _DECODER.decode(payload)
            except msgspec.DecodeError as exc:
                raise InputRecordingError(segment, offset, f"not a frame: {exc}") from None
            if isinstance(frame, Header):
                if frame.version != FORMAT_VERSION:
                    raise InputRecordingError(
                        segment, offset, f"format version {frame.version}, not {FORMAT_VERSION}"
                    )
                current = runs.get(frame.run)
                if current is None:
                    current = runs[frame.run] = RecordedRun(frame.run, frame.wall, frame.origin)
                    order.append(frame.run)
                current.segments.append(segment)
                for oid, description in frame.objects.items():
                    current.objects.setdefault(oid, description)
                continue
            if current is None:
                raise InputRecordingError(segment, offset, "records before the segment's header")
            for record in frame.records:
                if not isinstance(record, list) or len(record) < 3:
                    raise InputRecordingError(segment, offset, f"not a record: {record!r}")
                code = record[0]
                if code == Code.ATTACH:
                    current.objects[record[1]] = record[3]
                    current.attached_at[record[1]] = record[2]
                elif code == Code.GAP:
                    current.dropped += record[3]
                else:
                    current.records.append(record)
    return Recording(base, [runs[r] for r in order], torn)


# -- replaying ------------------------------------------------------------------------


class _RecordedFailure(Exception):
    """A failure the real breaker counted (its exception's type name is the message)."""


class _RecordedIgnored(Exception):
    """An outcome the real breaker did not count (a load shed, a cancellation)."""


def _replay_is_failure(exc: BaseException) -> bool:
    return not isinstance(exc, _RecordedIgnored)


class _ReplayClock(trio.abc.Clock):
    """Trio time set by the replay to each input's time, exactly (nothing sleeps)."""

    def __init__(self, start: float) -> None:
        self.t = start

    def start_clock(self) -> None:
        return None

    def current_time(self) -> float:
        return self.t

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return 0.0 if deadline <= self.t else math.inf


@dataclass
class ObjectReplay:
    """What one object went through in a replay (and what the replay had to decide)."""

    oid: int
    type: str  # "breaker" or "detector"
    name: str
    settings: dict[str, Any]
    transitions: list[Transition] = field(default_factory=list)
    refused: int = 0  # calls admitted in reality, refused here (their outcomes not fed)
    assumed: int = 0  # calls refused in reality, admitted here (their outcomes assumed)


@dataclass
class RunReplay:
    """A replay of one run: per object, its transitions."""

    run: RecordedRun
    objects: dict[int, ObjectReplay]
    _happened: dict[int, list[Transition]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._happened = self.run.happened()

    def happened(self, oid: int) -> list[Transition]:
        """The transitions recorded for ``oid`` (what really happened)."""
        return self._happened.get(oid, [])

    def diverged(self) -> list[int]:
        """The objects whose transitions differ from what was recorded."""
        return [
            oid
            for oid, replayed in self.objects.items()
            if not same_transitions(replayed.transitions, self.happened(oid))
        ]


def same_transitions(a: list[Transition], b: list[Transition]) -> bool:
    """Equal state changes at equal times. A trailing HALF_OPEN is left out of both: an
    open breaker turns half-open when it is next called or read, and the run may end
    before anyone looked."""

    def trimmed(items: list[Transition]) -> list[tuple[float, str]]:
        keys = [item.key() for item in items]
        if keys and keys[-1][1] == CircuitState.HALF_OPEN.value:
            keys.pop()
        return keys

    return trimmed(a) == trimmed(b)


def _transition(run: RecordedRun, record: list[Any]) -> Transition:
    kind = run.objects.get(record[1], {}).get("type")
    t, a = record[2], record[3]
    b = record[4] if len(record) > 4 else None
    if kind == "detector":
        return Transition(t, "firing" if a else "cleared", f"value {b!r}")
    return Transition(t, str(a), str(b or ""))


def replay(
    run: RecordedRun,
    *,
    settings: Mapping[int, Mapping[str, Any]] | None = None,
) -> RunReplay:
    """Replay ``run``; ``settings`` None: as recorded (reloads applied when they
    happened); else each object with ``settings[oid]`` from its start (objects not
    named keep their recorded settings), and the recorded reloads ignored."""
    clock = _ReplayClock(min([run.origin, *run.attached_at.values()]))
    # The replayed objects' own logs (a detector fired...) describe no real event.
    quiet = [logging.getLogger(name) for name in ("triage.breaker", "triage.detectors")]
    before = [logger.disabled for logger in quiet]
    for logger in quiet:
        logger.disabled = True
    try:
        return trio.run(_replay, run, settings, clock, clock=clock)
    finally:
        for logger, disabled in zip(quiet, before, strict=True):
            logger.disabled = disabled


async def _replay(
    run: RecordedRun,
    settings: Mapping[int, Mapping[str, Any]] | None,
    clock: _ReplayClock,
) -> RunReplay:
    as_recorded = settings is None
    objects: dict[int, ObjectReplay] = {}
    breakers: dict[int, Breaker] = {}
    detectors: dict[int, Detector] = {}
    members: dict[int, list[int]] = {}  # set oid -> its detectors, in the order added
    outcomes: dict[int, list[int]] = {}  # breaker oid -> indices of its outcome records
    for index, record in enumerate(run.records):
        if record[0] in _OUTCOMES:
            outcomes.setdefault(record[1], []).append(index)
    refused: Counter[tuple[int, float]] = Counter()

    def build(oid: int, at: float) -> None:
        description = run.objects[oid]
        kind = description.get("type")
        if kind == "set":
            members.setdefault(oid, [])
            return
        chosen = dict(description["settings"])
        if settings is not None and oid in settings:
            chosen = dict(settings[oid])
        replayed = ObjectReplay(oid, str(kind), description["name"], chosen)
        objects[oid] = replayed

        def tap(code: int, t: float, a: Any = None, b: Any = None) -> None:
            if code == Code.TRANSITION:
                replayed.transitions.append(_transition(run, [code, oid, t, a, b]))

        clock.t = max(clock.t, at)
        if kind == "breaker":
            breaker = Breaker(description["name"], is_failure=_replay_is_failure, **chosen)
            if oid not in run.attached_at:  # known from a header only: its state then
                _restore_breaker(breaker, description.get("state", "closed"))
            breaker.tap = tap
            breakers[oid] = breaker
        else:
            detector = make_detector(
                description["name"],
                kind=description["kind"],
                metric=description["metric"],
                row=description.get("row"),
                **chosen,
            )
            if oid not in run.attached_at and description.get("firing"):
                detector._firing = True
            detector.tap = tap
            detectors[oid] = detector
            if description.get("set") is not None:
                members.setdefault(description["set"], []).append(oid)

    pending = sorted(run.objects, key=lambda oid: run.attached_at.get(oid, run.origin))
    built: set[int] = set()

    def build_due(t: float) -> None:
        while pending and run.attached_at.get(pending[0], run.origin) <= t:
            oid = pending.pop(0)
            build(oid, run.attached_at.get(oid, run.origin))
            built.add(oid)

    for index, record in enumerate(run.records):
        code, oid, t = record[0], record[1], record[2]
        build_due(t)
        clock.t = max(clock.t, t)
        a = record[3] if len(record) > 3 else None
        b = record[4] if len(record) > 4 else None
        if code == Code.TRANSITION:
            continue
        if oid in breakers:
            _feed_breaker(
                breakers[oid], objects[oid], code, t, a, b, as_recorded, refused,
                partial(_assumed_outcome, run, outcomes.get(oid, []), index),
            )  # fmt: skip
        elif oid in detectors:
            _feed_detector(detectors[oid], code, a, b, as_recorded)
        elif code == Code.TICK:
            for member in members.get(oid, []):
                detectors[member]._decide(t)
    build_due(math.inf)
    return RunReplay(run, objects)


def _restore_breaker(breaker: Breaker, state: str) -> None:
    if state in (CircuitState.OPEN.value, CircuitState.HALF_OPEN.value):
        breaker._trip(trio.current_time(), "open when the recording's segment began")
    elif state == CircuitState.FORCED_OPEN.value:
        breaker.force_open("forced open when the recording's segment began")
    elif state == CircuitState.DISABLED.value:
        breaker.disable("disabled when the recording's segment began")
    elif state == CircuitState.METRICS_ONLY.value:
        breaker.metrics_only("metrics-only when the recording's segment began")


def _assumed_outcome(run: RecordedRun, indices: list[int], index: int) -> list[Any] | None:
    """The breaker's next real outcome after record ``index`` (else its last before)."""
    at = bisect.bisect_right(indices, index)
    if at < len(indices):
        return run.records[indices[at]]
    if at > 0:
        return run.records[indices[at - 1]]
    return None


def _feed_breaker(
    breaker: Breaker,
    replayed: ObjectReplay,
    code: int,
    t: float,
    a: Any,
    b: Any,
    as_recorded: bool,
    refused: Counter[tuple[int, float]],
    assume: Callable[[], list[Any] | None],
) -> None:
    oid = replayed.oid
    if code == Code.ADMIT:
        try:
            breaker.before_call()
        except CircuitOpen:
            refused[(oid, t)] += 1
            replayed.refused += 1
    elif code == Code.REJECT:
        try:
            start = breaker.before_call()
        except CircuitOpen:
            return
        replayed.assumed += 1
        outcome = assume()
        if outcome is None or outcome[0] == Code.SUCCESS:
            breaker.on_success(start)
        else:
            breaker.on_failure(_outcome_exception(outcome), start)
    elif code in _OUTCOMES:
        if refused[(oid, a)]:
            refused[(oid, a)] -= 1
            return
        if code == Code.SUCCESS:
            breaker.on_success(a)
        else:
            breaker.on_failure(_outcome_exception([code, oid, t, a, b]), a)
    elif code == Code.MODE:
        getattr(breaker, a)(b)
    elif code == Code.TUNE and as_recorded:
        breaker.retune(**a)


_FAILURE_TYPES: dict[str, type[_RecordedFailure]] = {}


def _outcome_exception(record: list[Any]) -> Exception:
    """An exception standing for a recorded outcome, named as the real one was (the
    breaker's reasons quote the type's name)."""
    if record[0] == Code.IGNORED:
        return _RecordedIgnored()
    name = str(record[4]) if len(record) > 4 and record[4] else "Exception"
    cls = _FAILURE_TYPES.get(name)
    if cls is None:
        cls = _FAILURE_TYPES[name] = type(name, (_RecordedFailure,), {})
    return cls("as recorded")


def _feed_detector(detector: Any, code: int, a: Any, b: Any, as_recorded: bool) -> None:
    if code in (Code.OBSERVE, Code.OBSERVE_HIT):
        detector.observe(a)
    elif code == Code.OBSERVE_RATIO:
        detector.observe_ratio(a, b)
    elif code == Code.TOUCH:
        detector.touch()
    elif code == Code.SET_OLDEST:
        detector.set_oldest(a)
    elif code == Code.SET_AGE:
        detector.set_age(a)
    elif code == Code.SET:
        detector.set(a)
    elif code == Code.EVALUATE:
        detector.evaluate()
    elif code == Code.TUNE and as_recorded:
        detector.retune(**a)
