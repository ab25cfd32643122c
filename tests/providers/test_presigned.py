"""Pre-signed URLs: what the signature covers, and where the secret comes from."""

from __future__ import annotations

from pathlib import Path

import pytest

from providers.presigned import (
    SignatureForged,
    SignatureMissing,
    SignedUrl,
    UrlExpired,
    UrlSigner,
    load_secret,
    random_secret,
)

SIGNER = UrlSigner(b"k" * 32)
URL = SignedUrl(method="PUT", path="/v1/attachments/t/a", expires=1000, max_bytes=50)


def query(url: str) -> bytes:
    return url.partition("?")[2].encode()


def test_a_signed_url_verifies_and_grants_its_cap() -> None:
    signed = SIGNER.sign(URL)
    assert SIGNER.verify("put", URL.path, query(signed), now=999.0) == URL


@pytest.mark.parametrize(
    ("method", "path", "now", "error"),
    [
        ("GET", URL.path, 999.0, SignatureForged),  # another method
        ("PUT", "/v1/attachments/t/b", 999.0, SignatureForged),  # another attachment
        ("PUT", URL.path, 1000.0, UrlExpired),  # expires is exclusive
    ],
)
def test_what_the_signature_covers(method: str, path: str, now: float, error: type) -> None:
    with pytest.raises(error):
        SIGNER.verify(method, path, query(SIGNER.sign(URL)), now=now)


def test_another_key_or_a_raised_cap_is_forged_and_expiry_is_judged_after() -> None:
    other = UrlSigner(b"o" * 32)
    with pytest.raises(SignatureForged):
        other.verify("PUT", URL.path, query(SIGNER.sign(URL)), now=999.0)
    raised = query(SIGNER.sign(URL)).replace(b"max_bytes=50", b"max_bytes=5000")
    with pytest.raises(SignatureForged):  # forged, even though also expired
        SIGNER.verify("PUT", URL.path, raised, now=5000.0)


@pytest.mark.parametrize(
    "qs", [b"", b"expires=1&max_bytes=1", b"expires=1&expires=2&max_bytes=1&signature=x",
           b"expires=-1&max_bytes=1&signature=x", "expires=é".encode()],
)  # fmt: skip
def test_missing_or_malformed_parameters(qs: bytes) -> None:
    with pytest.raises(SignatureMissing):
        SIGNER.verify("PUT", URL.path, qs, now=0.0)


def test_the_secret_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"f" * 40 + b"\n")
    assert load_secret(file=str(secret), env_name="X", env={"X": "e" * 40}) == b"f" * 40
    assert load_secret(file=None, env_name="X", env={"X": "e" * 40}) == b"e" * 40
    assert load_secret(file=None, env_name="X", env={}) is None
    with pytest.raises(ValueError, match="shorter than 32 bytes"):
        load_secret(file=None, env_name="X", env={"X": "short"})
    with pytest.raises(ValueError, match="cannot read"):
        load_secret(file=str(tmp_path / "missing"), env_name="X", env={})
    with pytest.raises(ValueError):
        UrlSigner(b"short")
    assert len(random_secret()) >= 32
