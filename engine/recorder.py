"""The input recorder: what the breakers and detectors were fed, for ``triage tune what-if``.

A breaker or a detector decides from its inputs alone (calls admitted and their
outcomes; events counted, gauges set, ticks) and Trio time. The recorder keeps
those inputs, so a later replay (:mod:`engine.replay`) can run them again through
objects built with other thresholds, on a ``MockClock`` jumped to each input's
time, and say which states would have changed, and when.

What is recorded, per object (a tap: the object calls ``tap(code, t, a, b)``)::

    ATTACH      the object's description: kind, name, profile/row, settings, state
    breaker     ADMIT t · REJECT t · SUCCESS t start · FAILURE t start exc ·
                IGNORED t start · MODE t method reason · TUNE t settings ·
                TRANSITION t state reason
    detector    OBSERVE t count · OBSERVE_HIT t hit · OBSERVE_RATIO t num den ·
                TOUCH t · SET_OLDEST t ts · SET_AGE t age · SET t value ·
                EVALUATE t · TUNE t settings · TRANSITION t firing value
    set         TICK t (the detector set evaluated all its detectors)
    recorder    GAP t dropped (inputs lost to a full buffer since the last flush)

**Bounded.** A tap appends a tuple to an in-memory buffer of ``buffer`` records
and does nothing else (no lock, no I/O); when the buffer is full the input is
dropped and counted, and a ``GAP`` record says so at the next flush, so a replay
knows its picture is incomplete. The writer task flushes every ``flush_s``.

**Compact, rotating.** The file is ``MAGIC`` then frames, each a 4-byte
big-endian length and a msgpack payload: a :class:`Header` (the format version,
the wall and Trio time of the segment's start, every object's description as of
then) or a :class:`Batch` of records (arrays of numbers; strings only for
reasons and exception names). When the file passes ``segment_bytes`` it is
renamed ``<path>.1`` (older segments move up, ``<path>.<segments-1>`` is the
oldest kept) and a new one starts with a fresh header: a batch that would take a
segment past ``segment_bytes`` begins the next one, so each segment reads on its
own and the whole stays under ``segments * segment_bytes`` (a single batch larger
than a segment is written alone in one).

**One writer.** ``<path>.lock`` is locked (``flock``) while the recorder writes;
a second daemon pointed at the same path records nothing and says why, rather
than interleaving its frames with the first one's. A new run first moves the
last run's live segment to ``<path>.1``: the recording of a crash is kept.

A frame torn by ``kill -9`` at the end of the live segment is ignored on reading
(:func:`engine.replay.read_recording` says how many bytes); anything else that is
not a frame is a :class:`~engine.errors.RecordingError` naming the file and offset.
"""

from __future__ import annotations

import enum
import fcntl
import itertools
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Final

import msgspec
import trio

from engine.clock import Clock

if TYPE_CHECKING:
    from engine.breaker import Breaker
    from engine.detectors import Detector, DetectorSet

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "Batch",
    "Code",
    "Header",
    "InputRecorder",
    "RecorderStatistics",
    "Tap",
    "segment_paths",
]

log = logging.getLogger("triage.recorder")

MAGIC: Final = b"TRIAGEIN"
FORMAT_VERSION: Final = 1
_LENGTH = struct.Struct(">I")

#: What an object calls for each input: ``tap(code, t, a, b)`` (``a``, ``b`` by code).
Tap = Callable[..., None]


class Code(enum.IntEnum):
    """The record codes (the first element of each recorded array)."""

    ATTACH = 0
    ADMIT = 1
    REJECT = 2
    SUCCESS = 3
    FAILURE = 4
    IGNORED = 5
    MODE = 6
    TUNE = 7
    TRANSITION = 8
    OBSERVE = 9
    OBSERVE_HIT = 10
    OBSERVE_RATIO = 11
    TOUCH = 12
    SET_OLDEST = 13
    SET_AGE = 14
    SET = 15
    EVALUATE = 16
    TICK = 17
    GAP = 18


class Header(msgspec.Struct, tag="header", frozen=True, kw_only=True, array_like=True):
    """The first frame of every segment."""

    version: int
    run: str  # one id per recorder: a daemon restart starts a new run (a new Trio clock)
    wall: float  # seconds since the epoch at Trio time ``origin``
    origin: float  # Trio time at which the segment was opened
    objects: dict[int, dict[str, Any]]  # oid -> description (ATTACH's), as of ``origin``


class Batch(msgspec.Struct, tag="batch", frozen=True, array_like=True):
    """Records flushed together: ``[code, oid, t, a?, b?]`` each."""

    records: list[list[Any]]


@dataclass(frozen=True, slots=True)
class RecorderStatistics:
    recorded: int  # inputs taken into the buffer since start
    dropped: int  # inputs lost to a full buffer
    written_bytes: int  # bytes written to the current segment
    rotations: int  # segments closed
    writing: bool  # False: the file could not be opened or is locked by another writer


def segment_paths(path: str | os.PathLike[str], segments: int) -> list[Path]:
    """The segment files of a recording at ``path``, oldest first (existing or not)."""
    base = Path(path)
    return [base.with_name(f"{base.name}.{k}") for k in range(segments - 1, 0, -1)] + [base]


class InputRecorder:
    """Records the inputs of the breakers and detectors attached to it; see the module.

    ``attach_*`` may be called before :meth:`run` starts (the tree is built first):
    the records wait in the buffer. Run :meth:`run` in a nursery for the file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        segment_bytes: int,
        segments: int,
        buffer: int,
        flush_s: float,
        clock: Clock | None = None,
    ) -> None:
        if segment_bytes < 1 or segments < 1 or buffer < 1 or not flush_s > 0:
            raise ValueError("recorder: segment_bytes, segments, buffer, flush_s must be > 0")
        self.path = Path(path)
        self.segment_bytes = segment_bytes
        self.segments = segments
        self.capacity = buffer
        self.flush_s = flush_s
        self._clock = clock if clock is not None else Clock()
        self._buffer: list[tuple[Any, ...]] = []
        self._objects: dict[int, Callable[[], dict[str, Any]]] = {}
        self._recorded = 0
        self._dropped = 0
        self._unreported_drops = 0
        self._written = 0
        self._header_end = 0
        self._rotations = 0
        self._file: IO[bytes] | None = None
        self._lock: IO[bytes] | None = None
        self._encoder = msgspec.msgpack.Encoder()
        #: This recorder's run: segments of one run share one Trio clock.
        self.run_id = os.urandom(8).hex()

    # -- attaching ---------------------------------------------------------------

    def _tap(self, oid: int) -> Tap:
        buffer = self._buffer
        capacity = self.capacity

        def tap(code: int, t: float, a: Any = None, b: Any = None) -> None:
            if len(buffer) < capacity:
                buffer.append((code, oid, t, a, b))
                self._recorded += 1
            else:
                self._dropped += 1
                self._unreported_drops += 1

        return tap

    def _attach(self, describe: Callable[[], dict[str, Any]]) -> Tap:
        oid = len(self._objects)
        self._objects[oid] = describe
        tap = self._tap(oid)
        tap(Code.ATTACH, _now(), describe())
        return tap

    def attach_breaker(self, breaker: Breaker, profile: str) -> None:
        """Record ``breaker``'s inputs from now on (``profile``: its ``[breakers.*]``)."""

        def describe() -> dict[str, Any]:
            return {
                "type": "breaker",
                "name": breaker.name,
                "profile": profile,
                "settings": breaker.settings(),
                "state": breaker.state.value,
            }

        breaker.tap = self._attach(describe)

    def attach_set(self, detectors: DetectorSet) -> None:
        """Record the set's ticks and the inputs of its detectors, present and future."""
        set_oid = len(self._objects)
        detectors.tap = self._attach(lambda: {"type": "set"})
        for detector in detectors:
            self.attach_detector(detector, set_oid)
        detectors.on_add = lambda detector: self.attach_detector(detector, set_oid)

    def attach_detector(self, detector: Detector, set_oid: int | None = None) -> None:
        """Record ``detector``'s inputs from now on (``set_oid``: the set that ticks it)."""

        def describe() -> dict[str, Any]:
            return {
                "type": "detector",
                "name": detector.name,
                "row": detector.row,
                "kind": detector.kind.value,
                "metric": detector.metric,
                "settings": detector.settings(),
                "set": set_oid,
                "firing": detector.firing,
            }

        detector.tap = self._attach(describe)

    # -- writing -----------------------------------------------------------------

    def statistics(self) -> RecorderStatistics:
        return RecorderStatistics(
            recorded=self._recorded,
            dropped=self._dropped,
            written_bytes=self._written,
            rotations=self._rotations,
            writing=self._file is not None,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write the recording until cancelled; the last flush happens on the way out.

        A path that cannot be written, or that another recorder holds, is logged
        once; the recorder then keeps nothing (its taps stay, the buffer is
        emptied each turn) rather than failing the tree it observes."""
        try:
            await trio.to_thread.run_sync(self._open, self._header())
        except OSError as exc:
            log.error("input recorder: not recording to %s: %s", self.path, exc)
            task_status.started()
            while True:
                await trio.sleep(self.flush_s)
                self._buffer.clear()
        task_status.started()
        try:
            while True:
                await trio.sleep(self.flush_s)
                await self._flush()
        finally:
            with trio.CancelScope(shield=True):
                await self._flush()
                file, self._file = self._file, None
                if file is not None:
                    await trio.to_thread.run_sync(file.close)
                if self._lock is not None:
                    self._lock.close()
                    self._lock = None

    def _open(self, header: bytes) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(self.path.with_name(f"{self.path.name}.lock"), "ab")  # noqa: SIM115
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise OSError(f"{self.path} is being written by another recorder") from None
        self._lock = lock
        if self.path.exists() and self.path.stat().st_size > 0:
            self._shift()  # the last run's recording (a crash's, say) becomes <path>.1
        self._file = open(self.path, "wb")  # noqa: SIM115 - held for the recorder's life
        self._begin_segment(header)

    def _shift(self) -> None:
        """Live segment to ``.1``, ``.k`` to ``.k+1``; the oldest beyond ``segments`` goes."""
        paths = segment_paths(self.path, self.segments)
        paths[0].unlink(missing_ok=True)
        for older, newer in itertools.pairwise(paths):
            if newer.exists():
                newer.rename(older)

    def _header(self) -> bytes:
        """A segment's header frame, as of now (in Trio: it reads the objects and the time)."""
        header = Header(
            version=FORMAT_VERSION,
            run=self.run_id,
            wall=self._clock.wall(),
            origin=_now(),
            objects={oid: describe() for oid, describe in self._objects.items()},
        )
        return self._encoder.encode(header)

    def _begin_segment(self, header: bytes) -> None:
        assert self._file is not None
        self._file.write(MAGIC)
        self._written = len(MAGIC)
        self._write_frame(header)
        self._header_end = self._written

    def _write_frame(self, payload: bytes) -> None:
        assert self._file is not None
        self._file.write(_LENGTH.pack(len(payload)))
        self._file.write(payload)
        self._written += _LENGTH.size + len(payload)

    async def _flush(self) -> None:
        if self._unreported_drops:
            self._buffer.append((Code.GAP, -1, _now(), self._unreported_drops, None))
            self._unreported_drops = 0
        if not self._buffer or self._file is None:
            return
        records = [_trimmed(r) for r in self._buffer]
        self._buffer.clear()
        payload = self._encoder.encode(Batch(records))
        # A batch that would take the segment past its size starts the next one, unless
        # the segment holds nothing but its header (a batch larger than a segment).
        full = (
            self._written + _LENGTH.size + len(payload) > self.segment_bytes
            and self._written > self._header_end
        )
        await trio.to_thread.run_sync(
            self._rotate_and_write, self._header() if full else None, payload
        )

    def _rotate_and_write(self, next_header: bytes | None, payload: bytes) -> None:
        assert self._file is not None
        if next_header is not None:
            self._rotations += 1
            self._file.close()
            self._shift()
            self._file = open(self.path, "wb")  # noqa: SIM115
            self._begin_segment(next_header)
        self._write_frame(payload)
        self._file.flush()


def _trimmed(record: tuple[Any, ...]) -> list[Any]:
    """The record without its trailing Nones: as long as its code needs."""
    end = len(record)
    while end > 3 and record[end - 1] is None:
        end -= 1
    return list(record[:end])


def _now() -> float:
    return trio.current_time()
