"""A durable local write journal: writes the database cannot take now, kept on disk in order.

::

    spool = Spool(path, max_bytes=config.max_bytes, fsync=config.fsync)
    await spool.open()                                  # scans; a torn tail is cut off
    record = await spool.append("inbox", key, payload)  # on disk (fsync'd) when it returns
    batch = await spool.peek(100)                       # the oldest records, in order
    ...                                                 # apply them (idempotently)
    await spool.drop(len(batch))                        # compact: they are gone from the file
    await spool.aclose()

File format: a sequence of frames, each ``length (u32, big endian) | crc32 (u32) |
payload``, where the payload is a msgpack-encoded :class:`SpoolRecord` (msgspec).
:meth:`Spool.append` writes one frame with a single ``write`` and, unless
``fsync=False``, ``fsync``\\ s the file before it returns: a caller that was told
"accepted" has its record on disk.

Crash safety: a process killed mid-append leaves at most one incomplete or
corrupt frame, always the last one. :meth:`Spool.open` reads frames until the
first one that is short or whose checksum does not match, and truncates the
file there (``torn_bytes`` says how much was cut off). That record was never
acknowledged, so nothing accepted is lost.

:meth:`Spool.drop` removes the oldest records by writing the rest to a
temporary file, fsyncing it and renaming it over the journal (then fsyncing the
directory): at every instant the file on disk is either the old journal or the
new one. A crash between applying a batch and dropping it replays that batch
again, so the consumer must apply records idempotently (each carries ``key``).

Size: ``max_bytes`` bounds the file; an append that would exceed it raises
:class:`SpoolFull` (a :class:`~engine.errors.LoadShed`) and writes nothing.

All file I/O runs in a worker thread (``trio.to_thread.run_sync``), one
operation at a time under a lock; a cancelled caller waits for its thread, so
an append is either wholly on disk and counted, or absent.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import msgspec
import trio

from engine.errors import LoadShed

__all__ = ["HEADER", "Spool", "SpoolFull", "SpoolRecord", "decode_frames", "encode_frame"]

log = logging.getLogger("triage.spool")

HEADER = struct.Struct(">II")
"""A frame's header: payload length, crc32 of the payload."""

_ENCODER = msgspec.msgpack.Encoder()


class SpoolRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One spooled write: its order (``seq``), kind, idempotency key and payload."""

    seq: int
    kind: str
    key: str
    payload: Any
    spooled_at: float = 0.0  # wall clock, for the age of the oldest spooled write


_DECODER = msgspec.msgpack.Decoder(SpoolRecord)


class SpoolFull(LoadShed):
    """The spool holds ``max_bytes`` already: the write is refused, nothing was written."""

    def __init__(self, path: str, *, max_bytes: int, size: int, needed: int) -> None:
        super().__init__(
            f"spool {path!r} is full ({size} of {max_bytes} bytes used, {needed} more needed)"
        )
        self.path = path
        self.max_bytes = max_bytes


def encode_frame(record: SpoolRecord) -> bytes:
    """``length | crc32 | msgpack(record)``."""
    payload = _ENCODER.encode(record)
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def decode_frames(data: bytes) -> tuple[list[tuple[SpoolRecord, int]], int]:
    """Whole, valid frames from the start of ``data`` (each with its size), and the good length.

    Decoding stops at the first short frame, checksum mismatch or undecodable
    payload: everything from there on is a torn tail.
    """
    records: list[tuple[SpoolRecord, int]] = []
    offset = 0
    end = len(data)
    while offset + HEADER.size <= end:
        length, crc = HEADER.unpack_from(data, offset)
        start = offset + HEADER.size
        if start + length > end:
            break
        payload = data[start : start + length]
        if zlib.crc32(payload) != crc:
            break
        try:
            record = _DECODER.decode(payload)
        except msgspec.DecodeError:
            break
        records.append((record, HEADER.size + length))
        offset = start + length
    return records, offset


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """The journal at ``path``; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int, fsync: bool = True) -> None:
        if max_bytes < 1:
            raise ValueError(f"spool max_bytes must be >= 1, not {max_bytes}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.size = 0  # bytes in the file
        self.torn_bytes = 0  # cut off by open()
        self.appended = 0  # records appended since open()
        self.dropped = 0  # records dropped since open()
        self._frames: list[tuple[SpoolRecord, int]] = []  # the file's records, in order
        self._next_seq = 1
        self._fd: int | None = None
        self._lock = trio.Lock()

    # -- observation --------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Records in the spool, not yet dropped."""
        return len(self._frames)

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def oldest(self) -> SpoolRecord | None:
        return self._frames[0][0] if self._frames else None

    # -- life cycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Create or scan the journal; cut off a torn last record. Idempotent."""
        async with self._lock:
            if self._fd is None:
                await trio.to_thread.run_sync(self._open_sync)

    def _open_sync(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            with open(fd, "rb", closefd=False) as file:
                data = file.read()
            frames, good = decode_frames(data)
            if good < len(data):
                self.torn_bytes = len(data) - good
                log.warning(
                    "spool: torn tail cut off",
                    extra={"path": str(self.path), "bytes": self.torn_bytes},
                )
                os.ftruncate(fd, good)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._frames = frames
        self.size = good
        self._next_seq = frames[-1][0].seq + 1 if frames else 1

    async def aclose(self) -> None:
        """Close the file (the records stay on disk). Idempotent."""
        with trio.CancelScope(shield=True):
            async with self._lock:
                fd, self._fd = self._fd, None
                if fd is not None:
                    await trio.to_thread.run_sync(os.close, fd)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise RuntimeError(f"spool {str(self.path)!r} is not open")
        return self._fd

    # -- append, read, drop ---------------------------------------------------------------

    async def append(self, kind: str, key: str, payload: Any, *, at: float = 0.0) -> SpoolRecord:
        """Write one record at the end (fsync'd unless ``fsync=False``); raises :class:`SpoolFull`."""
        async with self._lock:
            fd = self._require_fd()
            record = SpoolRecord(
                seq=self._next_seq, kind=kind, key=key, payload=payload, spooled_at=at
            )
            frame = encode_frame(record)
            if self.size + len(frame) > self.max_bytes:
                raise SpoolFull(
                    str(self.path), max_bytes=self.max_bytes, size=self.size, needed=len(frame)
                )
            await trio.to_thread.run_sync(self._append_sync, fd, frame)
            self._next_seq += 1
            self._frames.append((record, len(frame)))
            self.size += len(frame)
            self.appended += 1
            return record

    def _append_sync(self, fd: int, frame: bytes) -> None:
        view = memoryview(frame)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        if self.fsync:
            os.fsync(fd)

    async def peek(self, limit: int) -> list[SpoolRecord]:
        """The oldest ``limit`` records, in order (from memory: the file's content)."""
        await trio.lowlevel.checkpoint()
        return [record for record, _ in self._frames[:limit]]

    async def read_all(self) -> list[SpoolRecord]:
        """Every record as the file holds it now, read back from disk (for checks)."""
        async with self._lock:
            data = await trio.to_thread.run_sync(self.path.read_bytes)
        return [record for record, _ in decode_frames(data)[0]]

    async def drop(self, count: int) -> None:
        """Remove the oldest ``count`` records (compaction by rewrite + rename)."""
        if count <= 0:
            return
        async with self._lock:
            fd = self._require_fd()
            count = min(count, len(self._frames))
            dropped_bytes = sum(size for _, size in self._frames[:count])
            new_fd = await trio.to_thread.run_sync(self._rewrite_sync, fd, dropped_bytes)
            self._fd = new_fd
            del self._frames[:count]
            self.size -= dropped_bytes
            self.dropped += count

    def _rewrite_sync(self, fd: int, skip: int) -> int:
        """Copy the file from ``skip`` to a temporary file, fsync, rename over; the new fd."""
        tmp = self.path.with_name(self.path.name + ".compact")
        with open(fd, "rb", closefd=False) as src:
            src.seek(skip)
            rest = src.read()
        with open(tmp, "wb") as dst:
            dst.write(rest)
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        os.close(fd)
        return os.open(self.path, os.O_RDWR | os.O_APPEND)
