"""Pre-signed URLs: an HMAC-SHA256 over the method, path, expiry and byte cap.

A URL the daemon issues for one upload (or one download) carries three query
parameters::

    /v1/attachments/<tenant>/<attachment>?expires=<unix s>&max_bytes=<n>&signature=<hex>

``signature`` is ``HMAC-SHA256(secret, "<METHOD>\\n<path>\\n<expires>\\n<max_bytes>")``,
hex: changing the path (another tenant or attachment), the expiry, the byte cap
or the method invalidates it. :meth:`UrlSigner.verify` checks, in order:

========================================  ==========================================
no / a repeated / a malformed parameter   :class:`SignatureMissing`   (401)
the signature does not match              :class:`SignatureForged`   (403)
``expires`` is in the past                :class:`UrlExpired`        (403)
========================================  ==========================================

The comparison is constant-time (``hmac.compare_digest``), and the expiry is
only believed once the signature matched. The secret comes from a file (a
mounted Kubernetes secret) or the environment (:func:`load_secret`), never from
the TOML file.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final
from urllib.parse import parse_qs, urlencode

import msgspec

from engine.errors import TriageError

__all__ = [
    "MIN_SECRET_BYTES",
    "PresignError",
    "SignatureForged",
    "SignatureMissing",
    "SignedUrl",
    "UrlExpired",
    "UrlSigner",
    "load_secret",
    "random_secret",
]

#: A secret shorter than this is refused: 32 bytes is HMAC-SHA256's block-size-safe minimum.
MIN_SECRET_BYTES: Final = 32


class PresignError(TriageError):
    """A pre-signed URL refused; ``http_status`` and ``code`` say how to answer."""

    http_status: int = 403
    code: str = "bad_signature"


class SignatureMissing(PresignError):
    http_status = 401
    code = "signature_required"


class SignatureForged(PresignError):
    http_status = 403
    code = "bad_signature"


class UrlExpired(PresignError):
    http_status = 403
    code = "url_expired"


class SignedUrl(msgspec.Struct, frozen=True, kw_only=True):
    """What a verified URL grants: ``method`` on ``path`` until ``expires``, ``max_bytes``."""

    method: str
    path: str
    expires: int
    max_bytes: int

    def query(self, signature: str) -> str:
        return urlencode(
            {"expires": self.expires, "max_bytes": self.max_bytes, "signature": signature}
        )


def load_secret(*, file: str | None, env_name: str, env: Mapping[str, str]) -> bytes | None:
    """The signing secret: ``file``'s bytes (stripped) if set, else ``env[env_name]``.

    None when neither gives one; ``ValueError`` for a file that cannot be read or a
    secret shorter than :data:`MIN_SECRET_BYTES`."""
    if file is not None:
        try:
            secret = Path(file).read_bytes().strip()
        except OSError as exc:
            raise ValueError(f"cannot read the signing secret file {file}: {exc.strerror}") from exc
        source = file
    else:
        text = env.get(env_name, "")
        if not text:
            return None
        secret, source = text.encode(), f"${env_name}"
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the signing secret in {source} is shorter than {MIN_SECRET_BYTES} bytes")
    return secret


def random_secret() -> bytes:
    """A fresh secret (the embedded default: URLs then last as long as the process)."""
    return os.urandom(MIN_SECRET_BYTES).hex().encode()


class UrlSigner:
    """Signs and verifies pre-signed URLs with one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the signing secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret

    def signature(self, url: SignedUrl) -> str:
        message = f"{url.method.upper()}\n{url.path}\n{url.expires}\n{url.max_bytes}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def sign(self, url: SignedUrl) -> str:
        """``path?expires=..&max_bytes=..&signature=..``."""
        return f"{url.path}?{url.query(self.signature(url))}"

    def verify(self, method: str, path: str, query_string: bytes, *, now: float) -> SignedUrl:
        """What the URL grants, or the :class:`PresignError` that refuses it (table above)."""
        try:
            params = parse_qs(query_string.decode("ascii"), strict_parsing=False)
        except UnicodeDecodeError as exc:
            raise SignatureMissing("the query string is not ASCII") from exc
        values: dict[str, str] = {}
        for name in ("expires", "max_bytes", "signature"):
            given = params.get(name, [])
            if len(given) != 1:
                raise SignatureMissing(
                    f"a pre-signed URL needs exactly one {name!r} parameter (got {len(given)})"
                )
            values[name] = given[0]
        if not (values["expires"].isdigit() and values["max_bytes"].isdigit()):
            raise SignatureMissing("expires and max_bytes must be whole numbers")
        if len(values["expires"]) > 12 or len(values["max_bytes"]) > 15:
            raise SignatureForged("expires or max_bytes out of range")
        url = SignedUrl(
            method=method.upper(), path=path, expires=int(values["expires"]),
            max_bytes=int(values["max_bytes"]),
        )  # fmt: skip
        if not hmac.compare_digest(self.signature(url), values["signature"].lower()):
            raise SignatureForged("the URL's signature does not match its path, expiry and cap")
        if url.expires <= now:
            raise UrlExpired(f"the URL expired {now - url.expires:.0f}s ago")
        return url
