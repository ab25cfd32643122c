"""The join-token key ring: one key per file in a directory (a Kubernetes secret mount).

A directory holds one file per key; the file's name is the key id (``kid``) plus an
extension that fixes the key's algorithm, so a token can never pick its own::

    2026-12-a.pem      RS256: a PEM private key (RSA, >= 2048 bits); we sign and verify
    2026-12-b.hs256    HS256: a shared secret, the file's bytes (>= 32, whitespace at
                       the ends stripped); for a Prosody that has only app_secret

Names starting with ``.`` are skipped: a secret volume keeps its versions in
``..data`` / ``..2026_12_03_...`` directories and exposes each key as a symlink, so
an update swaps the symlinks' target (the stat of each name changes). A kid is
``[A-Za-z0-9._-]``, at most 64 characters; any other file is refused.

:func:`scan` reads the directory's *fingerprint* -- per name: inode, size and mtime
(of the file a symlink points to) -- cheaply; :func:`load_ring` reads every key. A
caller that polls compares fingerprints and reloads only on a change. A reload is
all or nothing: one bad file raises :class:`KeyFileError` naming its path, and the
caller keeps the ring it had.

**Which key signs.** The ring is a queue in name order: the first key whose kid is
not *retired* signs (:meth:`KeyRing.signing_key`); the keys after it are spares,
provisioned ahead by the operator. Rotation retires the signing kid (the retirement
is kept in PostgreSQL, so every replica and every restart agrees) and the next
spare signs. When no spare is left, :func:`generate_key` writes a fresh RS256 key
into the directory if it is writable (a secret mount is not: then nothing signs,
issuing fails closed, and the on-call must provision a key).
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey

from engine.errors import TriageError

__all__ = [
    "ALGORITHMS",
    "MIN_HMAC_BYTES",
    "MIN_RSA_BITS",
    "Algorithm",
    "Fingerprint",
    "KeyFileError",
    "KeyRing",
    "RingKey",
    "generate_key",
    "load_ring",
    "scan",
]

Algorithm = Literal["RS256", "HS256"]
#: The algorithm of each file extension.
ALGORITHMS: Final[Mapping[str, Algorithm]] = {".pem": "RS256", ".hs256": "HS256"}
MIN_RSA_BITS: Final = 2048
MIN_HMAC_BYTES: Final = 32  # RFC 7518 3.2: a key at least as long as the hash
_KID: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")

#: name -> (inode, size, mtime_ns) of the file the name resolves to.
Fingerprint = Mapping[str, tuple[int, int, int]]


class KeyFileError(TriageError):
    """A key file (or the key directory) that cannot be used; ``path`` names it."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass(frozen=True, slots=True)
class RingKey:
    """One key of the ring: ``signing`` signs, ``verifying`` checks a signature."""

    kid: str
    algorithm: Algorithm
    signing: RSAPrivateKey | bytes
    verifying: RSAPublicKey | bytes
    path: str


@dataclass(frozen=True, slots=True)
class KeyRing:
    """The keys of one load, in kid order, and the fingerprint they were read at."""

    keys: Mapping[str, RingKey]
    fingerprint: Fingerprint

    def get(self, kid: str) -> RingKey | None:
        return self.keys.get(kid)

    def signing_key(self, retired: Collection[str]) -> RingKey | None:
        """The first key (in kid order) that is not retired, or None: nothing may sign."""
        for kid in sorted(self.keys):
            if kid not in retired:
                return self.keys[kid]
        return None

    def spares(self, retired: Collection[str]) -> list[str]:
        """The kids after the signing one that are not retired."""
        return [k for k in sorted(self.keys) if k not in retired][1:]


EMPTY_RING: Final = KeyRing(keys={}, fingerprint={})


def _entries(directory: Path) -> list[Path]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError as exc:
        raise KeyFileError(directory, "the key directory does not exist") from exc
    except NotADirectoryError as exc:
        raise KeyFileError(directory, "not a directory") from exc
    except PermissionError as exc:
        raise KeyFileError(directory, "the key directory is not readable") from exc
    return [directory / name for name in names if not name.startswith(".")]


def scan(directory: Path | str) -> dict[str, tuple[int, int, int]]:
    """The directory's fingerprint (no key is read). Raises :class:`KeyFileError` if the
    directory is unusable; a name whose target vanished meanwhile is left out."""
    out: dict[str, tuple[int, int, int]] = {}
    for path in _entries(Path(directory)):
        try:
            st = path.stat()
        except FileNotFoundError:  # a dangling symlink during a secret update
            continue
        out[path.name] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def _kid_and_algorithm(path: Path) -> tuple[str, Algorithm]:
    algorithm = ALGORITHMS.get(path.suffix)
    if algorithm is None:
        known = ", ".join(ALGORITHMS)
        raise KeyFileError(path, f"unknown key file extension {path.suffix!r} (known: {known})")
    kid = path.stem
    if not _KID.fullmatch(kid):
        raise KeyFileError(path, "a kid is 1..64 characters of A-Z a-z 0-9 . _ -")
    return kid, algorithm


def _load_key(path: Path) -> RingKey:
    kid, algorithm = _kid_and_algorithm(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError as exc:
        raise KeyFileError(path, "a directory, not a key file") from exc
    except PermissionError as exc:
        raise KeyFileError(path, "not readable") from exc
    if algorithm == "HS256":
        secret = data.strip()
        if len(secret) < MIN_HMAC_BYTES:
            raise KeyFileError(
                path, f"an HS256 secret needs >= {MIN_HMAC_BYTES} bytes, got {len(secret)}"
            )
        return RingKey(kid, algorithm, secret, secret, str(path))
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(path, f"not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(private, RSAPrivateKey):
        raise KeyFileError(path, f"a .pem key must be RSA, got {type(private).__name__}")
    if private.key_size < MIN_RSA_BITS:
        raise KeyFileError(path, f"an RSA key needs >= {MIN_RSA_BITS} bits, got {private.key_size}")
    return RingKey(kid, algorithm, private, private.public_key(), str(path))


def load_ring(directory: Path | str) -> KeyRing:
    """Every key of ``directory``; :class:`KeyFileError` names the first bad file."""
    root = Path(directory)
    fingerprint = scan(root)
    keys: dict[str, RingKey] = {}
    for name in sorted(fingerprint):
        key = _load_key(root / name)
        if key.kid in keys:
            raise KeyFileError(root / name, f"kid {key.kid!r} is also {keys[key.kid].path}")
        keys[key.kid] = key
    return KeyRing(keys=keys, fingerprint=fingerprint)


def generate_key(directory: Path | str, *, now: float, bits: int = MIN_RSA_BITS) -> str:
    """Write a new RS256 key into ``directory`` (atomically: a hidden temp file renamed);
    its kid, ``gen-<UTC time of now>-<random>`` (``now``: the injected wall clock). Raises :class:`KeyFileError` if it cannot."""
    root = Path(directory)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    kid = f"gen-{stamp}-{secrets.token_hex(4)}"
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    temp = root / f".{kid}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, root / f"{kid}.pem")
    except OSError as exc:
        raise KeyFileError(root, f"cannot write a new key ({exc.strerror or exc})") from exc
    return kid
