"""The blob store behind attachments: one interface, a local-directory implementation.

:class:`BlobStore` is the seam (a Protocol); :class:`LocalBlobStore` keeps blobs as
files under one root directory::

    root/blobs/<key>          stored blobs, served only once their scan is clean
    root/quarantine/<key>     blobs a scan found infected: never served, kept for review
    root/tmp/                 uploads in progress (a crash leaves only these behind)

Keys are relative paths of ``[A-Za-z0-9._-]`` segments joined by ``/`` (the
upload admission uses ``<tenant>/<attachment>``). A key that is empty, absolute,
has a ``..``/``.`` segment, a backslash, a NUL or any other character is refused
with :class:`BlobKeyInvalid` before the file system is touched, and every path
is checked to resolve under the root (a symlink planted inside cannot lead out):
no key ever names a file outside it.

Writes are atomic: :meth:`LocalBlobStore.put` streams into a fresh file in
``tmp/``, fsyncs it, then *links* it to its final name (``os.link`` fails if
the name exists: a key is written once, :class:`BlobExists`) and removes the
temporary name. A reader sees the whole blob or none; a put that fails or is
cancelled midway (an upload refused at its size cap) leaves nothing but is
cleaned up at once. ``put`` takes the bytes as an async iterator and a byte
cap: the store never holds more than one chunk, and stops (:class:`BlobTooLarge`)
the moment the cap is passed.

File system calls run in Trio's worker threads (``trio.to_thread``); none
blocks the event loop.

Errors (all :class:`BlobStoreError`, a :class:`~engine.errors.TriageError`):
:class:`BlobKeyInvalid` (also ``ValueError``), :class:`BlobNotFound`,
:class:`BlobExists`, :class:`BlobTooLarge`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import uuid
from collections.abc import AsyncGenerator, AsyncIterable
from pathlib import Path
from typing import Final, Protocol

import msgspec
import trio

from engine.errors import TriageError

__all__ = [
    "BlobExists",
    "BlobInfo",
    "BlobKeyInvalid",
    "BlobNotFound",
    "BlobStore",
    "BlobStoreError",
    "BlobTooLarge",
    "LocalBlobStore",
    "check_key",
]

_SEGMENT: Final = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
_MAX_SEGMENTS: Final = 8


class BlobStoreError(TriageError):
    """The blob store refused or failed an operation."""


class BlobKeyInvalid(BlobStoreError, ValueError):
    """A key that is not a relative path of safe segments (traversal, absolute, odd bytes)."""


class BlobNotFound(BlobStoreError):
    """No blob under that key."""


class BlobExists(BlobStoreError):
    """A blob is already stored under that key (keys are written once)."""


class BlobTooLarge(BlobStoreError):
    """The stream passed the put's byte cap; nothing was kept."""

    def __init__(self, key: str, *, limit: int, received: int) -> None:
        super().__init__(f"blob {key!r}: more than {limit} bytes (stopped at {received})")
        self.key = key
        self.limit = limit
        self.received = received


class BlobInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a put stored: the key, its size and SHA-256 (hex)."""

    key: str
    size: int
    sha256: str


def check_key(key: str) -> str:
    """``key`` if it is a safe relative key, else :class:`BlobKeyInvalid` naming why."""
    if not isinstance(key, str) or not key:
        raise BlobKeyInvalid("blob key must be a non-empty string")
    if key.startswith("/"):
        raise BlobKeyInvalid(f"blob key {key[:80]!r} is absolute")
    segments = key.split("/")
    if len(segments) > _MAX_SEGMENTS:
        raise BlobKeyInvalid(f"blob key {key[:80]!r} has more than {_MAX_SEGMENTS} segments")
    for segment in segments:
        if segment in ("", ".", ".."):
            raise BlobKeyInvalid(f"blob key {key[:80]!r} has an empty, '.' or '..' segment")
        if not _SEGMENT.match(segment):
            raise BlobKeyInvalid(
                f"blob key {key[:80]!r}: segment {segment[:40]!r} is not [A-Za-z0-9._-]"
            )
    return key


class BlobStore(Protocol):
    """Where attachment bytes live. Every method refuses unsafe keys (:class:`BlobKeyInvalid`)."""

    async def put(self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int) -> BlobInfo:
        """Store the stream under ``key`` atomically; :class:`BlobTooLarge` past ``max_bytes``."""
        ...

    def get(self, key: str, *, chunk_bytes: int) -> AsyncGenerator[bytes, None]:
        """The stored blob in chunks of at most ``chunk_bytes``; :class:`BlobNotFound`."""
        ...

    async def delete(self, key: str) -> bool:
        """Remove the blob (stored or quarantined); whether there was one."""
        ...

    async def quarantine(self, key: str) -> None:
        """Move the stored blob where it is never served (idempotent once moved)."""
        ...

    async def exists(self, key: str) -> bool:
        """Whether a stored (not quarantined) blob has this key."""
        ...

    async def quarantined(self, key: str) -> bool:
        """Whether the blob under ``key`` is in quarantine."""
        ...


class LocalBlobStore:
    """:class:`BlobStore` on a local directory (see the module docstring for the layout)."""

    def __init__(self, root: str | Path, *, fsync: bool = True) -> None:
        self.root = Path(root).resolve()
        self.fsync = fsync
        self._blobs = self.root / "blobs"
        self._quarantine = self.root / "quarantine"
        self._tmp = self.root / "tmp"
        self._ready = False  # the directories are made at the first write, not here

    def _make_dirs(self) -> None:
        for directory in (self._blobs, self._quarantine, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)
        self._ready = True

    def __repr__(self) -> str:
        return f"<LocalBlobStore {self.root}>"

    def _path(self, area: Path, key: str) -> Path:
        check_key(key)
        path = area / key
        # A symlink planted under the root must not lead outside it.
        resolved = path.resolve()
        if not resolved.is_relative_to(area):
            raise BlobKeyInvalid(f"blob key {key[:80]!r} resolves outside the store")
        return path

    def temporary_files(self) -> list[str]:
        """Names of uploads in progress (or left by a crash): for checks and cleanup."""
        if not self._tmp.is_dir():
            return []
        return sorted(p.name for p in self._tmp.iterdir())

    async def put(self, key: str, chunks: AsyncIterable[bytes], *, max_bytes: int) -> BlobInfo:
        final = self._path(self._blobs, key)
        if final.exists():
            raise BlobExists(f"blob {key!r} already exists")
        if not self._ready:
            await trio.to_thread.run_sync(self._make_dirs)
        temp = self._tmp / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        size = 0
        file = await trio.open_file(temp, "xb")
        try:
            try:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > max_bytes:
                        raise BlobTooLarge(key, limit=max_bytes, received=size)
                    digest.update(chunk)
                    await file.write(chunk)
                await file.flush()
                if self.fsync:
                    await trio.to_thread.run_sync(os.fsync, file.fileno())
            finally:
                with trio.CancelScope(shield=True):
                    await file.aclose()
            await trio.to_thread.run_sync(self._publish, temp, final, key)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()  # after the link (or a failure) the temporary name goes
        return BlobInfo(key=key, size=size, sha256=digest.hexdigest())

    def _publish(self, temp: Path, final: Path, key: str) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(temp, final)
        except FileExistsError as exc:
            raise BlobExists(f"blob {key!r} already exists") from exc
        if self.fsync:
            fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    async def get(self, key: str, *, chunk_bytes: int) -> AsyncGenerator[bytes, None]:
        path = self._path(self._blobs, key)
        try:
            file = await trio.open_file(path, "rb")
        except FileNotFoundError as exc:
            raise BlobNotFound(f"no blob {key!r}") from exc
        try:
            while True:
                chunk = await file.read(chunk_bytes)
                if not chunk:
                    return
                yield chunk
        finally:
            with trio.CancelScope(shield=True):
                await file.aclose()

    async def delete(self, key: str) -> bool:
        found = False
        for area in (self._blobs, self._quarantine):
            path = self._path(area, key)
            try:
                await trio.to_thread.run_sync(path.unlink)
                found = True
            except FileNotFoundError:
                pass
        return found

    async def quarantine(self, key: str) -> None:
        source = self._path(self._blobs, key)
        target = self._path(self._quarantine, key)
        await trio.to_thread.run_sync(self._move, source, target, key)

    @staticmethod
    def _move(source: Path, target: Path, key: str) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(source, target)
        except FileNotFoundError as exc:
            if target.exists():
                return  # moved already (a retried quarantine)
            raise BlobNotFound(f"no blob {key!r} to quarantine") from exc
        except OSError as exc:  # pragma: no cover - same file system by construction
            if exc.errno == errno.EXDEV:
                raise BlobStoreError(f"quarantine of {key!r} crosses file systems") from exc
            raise

    async def exists(self, key: str) -> bool:
        return await trio.to_thread.run_sync(self._path(self._blobs, key).is_file)

    async def quarantined(self, key: str) -> bool:
        return await trio.to_thread.run_sync(self._path(self._quarantine, key).is_file)
