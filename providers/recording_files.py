"""Recording files: copy one recording from the blob path into the store (plain file I/O).

The recorder (Jibri) drops each finished recording under the blob path
(``[recordings] path``); a recording names its file by a path relative to it.
:meth:`RecordingFiles.ingest` copies that file into the store
(``[recordings] store_path``, ``<tenant>/<recording id>``) in chunks, hashing as it
goes, through a hidden temporary file that is fsynced and renamed: the stored copy
is whole or absent. It is blocking code: the actor runs it in a worker thread.

Failures, typed (:class:`RecordingError`; ``retryable`` tells the retry policy)::

    RecordingMissing       no file at the path (yet: the upload may still be running)  retried
    RecordingDenied        the file or a directory is not readable (permissions)        retried
    RecordingStoreFailed   the store refused the copy (a full disk, permissions)       retried
    RecordingPathRefused   absolute, "..", a symlink out of the blob path, not a       never
                           regular file

:meth:`RecordingFiles.open_source` is the one place a source file is opened: the
chaos scenario overrides it to deny paths (the tests run as root, which permission
bits do not stop).
"""

from __future__ import annotations

import hashlib
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from engine.errors import TriageError

__all__ = [
    "RecordingDenied",
    "RecordingError",
    "RecordingFiles",
    "RecordingMissing",
    "RecordingPathRefused",
    "RecordingStoreFailed",
    "StoredRecording",
]


class RecordingError(TriageError):
    """A recording's file could not be ingested; ``path`` is the relative path asked for."""

    retryable = True

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"recording {path!r}: {problem}")
        self.path = path
        self.problem = problem


class RecordingMissing(RecordingError):
    """No file at the path."""


class RecordingDenied(RecordingError):
    """The file, or a directory on its way, is not readable."""


class RecordingStoreFailed(RecordingError):
    """The store could not take the copy."""


class RecordingPathRefused(RecordingError):
    """The path can never name a recording of the blob path."""

    retryable = False


@dataclass(frozen=True, slots=True)
class StoredRecording:
    size_bytes: int
    sha256: str
    stored_path: str


class RecordingFiles:
    """The blob path (``source``) and the store (``store``), both local directories."""

    def __init__(self, source: Path | str, store: Path | str, *, chunk_bytes: int) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be >= 1")
        self.source = Path(source)
        self.store = Path(store)
        self.chunk_bytes = chunk_bytes

    def resolve(self, relative: str) -> Path:
        """The file ``relative`` names under the blob path, or :class:`RecordingPathRefused`."""
        pure = PurePosixPath(relative)
        if not relative or pure.is_absolute() or ".." in pure.parts or "\x00" in relative:
            raise RecordingPathRefused(relative, "must be a relative path without '..'")
        path = self.source / pure
        try:
            real = path.resolve(strict=True)
            root = self.source.resolve(strict=True)
        except FileNotFoundError as exc:
            raise RecordingMissing(relative, "no such file under the blob path") from exc
        except PermissionError as exc:
            raise RecordingDenied(relative, "permission denied") from exc
        except OSError as exc:  # a symlink loop, a name too long
            raise RecordingPathRefused(relative, exc.strerror or str(exc)) from exc
        if not real.is_relative_to(root):
            raise RecordingPathRefused(relative, "leads out of the blob path")
        return real

    def open_source(self, path: Path) -> BinaryIO:
        """Open a source file for reading (the seam for fault injection)."""
        return path.open("rb")

    def ingest(self, relative: str, tenant_id: str, recording_id: str) -> StoredRecording:
        """Copy the recording at ``relative`` into the store; see the module docstring."""
        path = self.resolve(relative)
        try:
            source = self.open_source(path)
        except FileNotFoundError as exc:
            raise RecordingMissing(relative, "no such file under the blob path") from exc
        except PermissionError as exc:
            raise RecordingDenied(relative, "permission denied") from exc
        except IsADirectoryError as exc:
            raise RecordingPathRefused(relative, "a directory, not a file") from exc
        with source:
            mode = os.fstat(source.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise RecordingPathRefused(relative, "not a regular file")
            return self._copy(relative, source, tenant_id, recording_id)

    def _copy(
        self, relative: str, source: BinaryIO, tenant_id: str, recording_id: str
    ) -> StoredRecording:
        directory = self.store / tenant_id
        target = directory / _safe_name(recording_id)
        temp = directory / f".{target.name}.{uuid.uuid4().hex}.tmp"
        digest = hashlib.sha256()
        size = 0
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with temp.open("xb") as out:
                while chunk := source.read(self.chunk_bytes):
                    digest.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, target)
        except PermissionError as exc:
            temp.unlink(missing_ok=True)
            if exc.filename is not None and str(exc.filename).startswith(str(self.store)):
                raise RecordingStoreFailed(relative, f"the store refused: {exc}") from exc
            raise RecordingDenied(relative, "permission denied while reading") from exc
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise RecordingStoreFailed(relative, f"the copy failed: {exc}") from exc
        return StoredRecording(size_bytes=size, sha256=digest.hexdigest(), stored_path=str(target))


def _safe_name(recording_id: str) -> str:
    """A file name for ``recording_id`` (ids are ours to pick, but never trust a slash)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in recording_id).lstrip(".") or "_"
