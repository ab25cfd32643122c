"""Join tokens as Prosody checks them: every refusal typed, the key ring from files."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from providers.join_tokens import (
    AlgorithmRefused,
    Expectation,
    JoinUser,
    TokenExpired,
    TokenForged,
    TokenMalformed,
    TokenNotYetValid,
    TokenRefused,
    TokenRevoked,
    UnknownKeyId,
    WrongAudience,
    WrongIssuer,
    WrongRoom,
    WrongSubject,
    issue_token,
    unverified_kid,
    verify_token,
)
from providers.key_ring import KeyFileError, KeyRing, generate_key, load_ring, scan

EXPECT = Expectation(issuer="triage", audience="jitsi", subject="meet.jitsi")
USER = JoinUser(id="patient-1", name="Pat", moderator=False)
NOW = 1_800_000_000.25
SECRET = b"s" * 40


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def pems() -> list[bytes]:
    return [_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)) for _ in range(2)]


@pytest.fixture
def key_dir(tmp_path: Path, pems: list[bytes]) -> Iterator[Path]:
    directory = tmp_path / "keys"
    directory.mkdir()
    (directory / "2026-a.pem").write_bytes(pems[0])
    (directory / "2026-b.hs256").write_bytes(SECRET + b"\n")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def ring(key_dir: Path) -> KeyRing:
    return load_ring(key_dir)


def _issue(ring: KeyRing, kid: str = "2026-a", **kw: object) -> str:
    key = ring.get(kid)
    assert key is not None
    args: dict[str, object] = {
        "room": "visit-42", "session": "s-1", "tenant": "5b1f3c52-6f55-4a35-9f3e-0c2c1d1e7a10",
        "user": USER, "now": NOW, "ttl_s": 600.0, "nbf_skew_s": 30.0,
    }  # fmt: skip
    args.update(kw)
    token, _ = issue_token(key, EXPECT, **args)  # type: ignore[arg-type]  # keywords checked by the call
    return token


def _refusal(token: str, ring: KeyRing, **kw: object) -> TokenRefused:
    args: dict[str, object] = {"room": "visit-42", "now": NOW}
    args.update(kw)
    with pytest.raises(TokenRefused) as info:
        verify_token(token, ring, EXPECT, **args)  # type: ignore[arg-type]  # as above
    return info.value


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _forge(header: dict[str, object], payload: dict[str, object], signature: bytes = b"") -> str:
    return ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(payload).encode()), _b64(signature)]
    )


def _payload(token: str) -> dict[str, object]:
    data: dict[str, object] = jwt.decode(token, options={"verify_signature": False})
    return data


# -- issuing -----------------------------------------------------------------------------


def test_an_issued_token_carries_what_prosody_checks(ring: KeyRing) -> None:
    token = _issue(ring)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "typ": "JWT", "kid": "2026-a"}
    claims = _payload(token)
    assert claims["iss"] == "triage" and claims["aud"] == "jitsi" and claims["sub"] == "meet.jitsi"
    assert claims["room"] == "visit-42" and claims["session"] == "s-1"
    # nbf is nbf_skew_s in the past, whole seconds: Prosody allows no leeway.
    assert (claims["nbf"], claims["iat"], claims["exp"]) == (
        1_799_999_970,
        1_800_000_000,
        1_800_000_600,
    )
    assert claims["context"] == {
        "user": {"id": "patient-1", "name": "Pat", "email": None, "moderator": False}
    }
    verified = verify_token(token, ring, EXPECT, room="visit-42", now=NOW)
    assert verified.jti == claims["jti"] and verified.context.user == USER
    assert unverified_kid(token) == "2026-a"


def test_an_hs256_key_signs_and_verifies_as_hs256(ring: KeyRing) -> None:
    token = _issue(ring, kid="2026-b")
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    assert verify_token(token, ring, EXPECT, room="visit-42", now=NOW).room == "visit-42"


def test_time_bounds_are_prosodys_exactly(ring: KeyRing) -> None:
    token = _issue(ring)  # nbf 1_799_999_970, exp 1_800_000_600
    assert verify_token(token, ring, EXPECT, room="visit-42", now=1_799_999_970.0)
    assert verify_token(token, ring, EXPECT, room="visit-42", now=1_800_000_599.999)
    assert isinstance(_refusal(token, ring, now=1_800_000_600.0), TokenExpired)
    assert isinstance(_refusal(token, ring, now=1_799_999_969.999), TokenNotYetValid)


# -- every refusal, typed ------------------------------------------------------------------


def test_a_wrong_signature_is_forged(ring: KeyRing, pems: list[bytes]) -> None:
    claims = _payload(_issue(ring))
    other = serialization.load_pem_private_key(pems[1], password=None)
    forged = jwt.encode(claims, other, algorithm="RS256", headers={"kid": "2026-a"})  # type: ignore[arg-type]  # an RSA key
    refused = _refusal(forged, ring)
    assert isinstance(refused, TokenForged) and refused.reason == "bad_signature"
    assert refused.kid == "2026-a"
    tampered = _issue(ring).rsplit(".", 1)[0] + "." + _b64(b"x" * 256)
    assert isinstance(_refusal(tampered, ring), TokenForged)


@pytest.mark.parametrize("alg", ["none", "NONE", "None"])
def test_alg_none_is_refused(ring: KeyRing, alg: str) -> None:
    unsigned = _forge({"alg": alg, "typ": "JWT", "kid": "2026-a"}, _payload(_issue(ring)))
    refused = _refusal(unsigned, ring)
    assert isinstance(refused, AlgorithmRefused) and refused.reason == "algorithm_refused"


def test_an_algorithm_other_than_the_keys_is_refused(ring: KeyRing) -> None:
    # HS256 with the HMAC secret, under the RS256 kid: alg confusion.
    confused = jwt.encode(
        _payload(_issue(ring)), SECRET, algorithm="HS256", headers={"kid": "2026-a"}
    )
    refused = _refusal(confused, ring)
    assert isinstance(refused, AlgorithmRefused)
    assert "key '2026-a' is RS256" in str(refused)


def test_unknown_and_missing_kids_are_refused(ring: KeyRing) -> None:
    claims = _payload(_issue(ring))
    unknown = jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "leaked"})
    refused = _refusal(unknown, ring)
    assert isinstance(refused, UnknownKeyId) and refused.reason == "unknown_kid"
    assert refused.kid == "leaked"
    assert isinstance(_refusal(jwt.encode(claims, SECRET, algorithm="HS256"), ring), UnknownKeyId)


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b.c", "a.b", "é.é.é", "eyJhbGciOiJIUzI1NiJ9.e30"],
)
def test_malformed_tokens_are_refused(ring: KeyRing, token: str) -> None:
    refused = _refusal(token, ring)
    assert isinstance(refused, TokenMalformed | AlgorithmRefused | UnknownKeyId), refused


def test_garbage_is_malformed(ring: KeyRing) -> None:
    for token in ("abc", "a.b.c", "x" * 10_000):
        refused = _refusal(token, ring)
        assert isinstance(refused, TokenMalformed) and refused.reason == "malformed"


def test_a_missing_or_mistyped_claim_is_malformed(ring: KeyRing) -> None:
    key = ring.get("2026-b")
    assert key is not None
    claims = _payload(_issue(ring, kid="2026-b"))
    for broken in ({k: v for k, v in claims.items() if k != "room"}, {**claims, "exp": "soon"}):
        token = jwt.encode(broken, SECRET, algorithm="HS256", headers={"kid": "2026-b"})
        refused = _refusal(token, ring)
        assert isinstance(refused, TokenMalformed), refused
    no_user = {**claims, "context": {}}
    token = jwt.encode(no_user, SECRET, algorithm="HS256", headers={"kid": "2026-b"})
    assert "context" in str(_refusal(token, ring))


def test_wrong_issuer_audience_subject_and_room(ring: KeyRing) -> None:
    claims = _payload(_issue(ring, kid="2026-b"))
    cases = [("iss", "evil", WrongIssuer), ("aud", "other", WrongAudience),
             ("sub", "other.domain", WrongSubject), ("room", "*", WrongRoom)]  # fmt: skip
    for claim, value, refusal in cases:
        token = jwt.encode(
            {**claims, claim: value}, SECRET, algorithm="HS256", headers={"kid": "2026-b"}
        )
        refused = _refusal(token, ring)
        assert type(refused) is refusal, (claim, refused)
    assert isinstance(_refusal(_issue(ring), ring, room="visit-43"), WrongRoom)
    # Room names compare lower-cased, as Prosody's room JIDs do.
    assert verify_token(_issue(ring, room="Visit-42"), ring, EXPECT, room="visit-42", now=NOW)


def test_a_retired_kid_is_revoked(ring: KeyRing) -> None:
    refused = _refusal(_issue(ring), ring, retired={"2026-a"})
    assert isinstance(refused, TokenRevoked) and refused.reason == "revoked"


def test_reasons_are_distinct() -> None:
    classes = [TokenMalformed, AlgorithmRefused, UnknownKeyId, TokenForged, TokenExpired,
               TokenNotYetValid, WrongIssuer, WrongAudience, WrongSubject, WrongRoom, TokenRevoked]  # fmt: skip
    assert len({c.reason for c in classes}) == len(classes)


# -- the key ring from files ------------------------------------------------------------------


def test_the_ring_reads_one_key_per_file_and_skips_dot_names(key_dir: Path) -> None:
    (key_dir / "..data").mkdir()
    (key_dir / ".hidden.pem").write_bytes(b"not a key")
    ring = load_ring(key_dir)
    assert sorted(ring.keys) == ["2026-a", "2026-b"]
    assert ring.get("2026-a") is not None and ring.keys["2026-a"].algorithm == "RS256"
    assert ring.keys["2026-b"].signing == SECRET  # trailing newline stripped
    # The first kid in name order that is not retired signs; the rest are spares.
    assert ring.signing_key(set()) is ring.keys["2026-a"]
    assert ring.signing_key({"2026-a"}) is ring.keys["2026-b"]
    assert ring.spares(set()) == ["2026-b"]
    assert ring.signing_key({"2026-a", "2026-b"}) is None


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("short.hs256", b"tooshort", "needs >= 32 bytes"),
        ("bad.pem", b"-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n", "PEM"),
        ("key.txt", b"whatever", "unknown key file extension"),
        ("sp ace.hs256", SECRET, "a kid is"),
    ],
)
def test_a_bad_file_is_refused_naming_its_path(
    key_dir: Path, name: str, content: bytes, problem: str
) -> None:
    (key_dir / name).write_bytes(content)
    with pytest.raises(KeyFileError) as info:
        load_ring(key_dir)
    assert info.value.path == str(key_dir / name)
    assert problem in str(info.value)


def test_non_rsa_and_small_rsa_keys_are_refused(key_dir: Path) -> None:
    (key_dir / "ec.pem").write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(KeyFileError, match="must be RSA"):
        load_ring(key_dir)
    (key_dir / "ec.pem").unlink()
    (key_dir / "small.pem").write_bytes(_pem(rsa.generate_private_key(65537, 1024)))
    with pytest.raises(KeyFileError, match=">= 2048 bits"):
        load_ring(key_dir)


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="does not exist"):
        load_ring(tmp_path / "absent")


def test_the_fingerprint_changes_with_a_symlink_swap(key_dir: Path, pems: list[bytes]) -> None:
    # A secret volume: each key a symlink into ..data, swapped on update.
    versions = key_dir / "..v1"
    versions.mkdir()
    (versions / "2026-c.pem").write_bytes(pems[0])
    os.symlink("..v1/2026-c.pem", key_dir / "2026-c.pem")
    before = scan(key_dir)
    assert load_ring(key_dir).keys["2026-c"].kid == "2026-c"
    newer = key_dir / "..v2"
    newer.mkdir()
    (newer / "2026-c.pem").write_bytes(pems[1])
    (key_dir / "2026-c.pem").unlink()
    os.symlink("..v2/2026-c.pem", key_dir / "2026-c.pem")
    assert scan(key_dir)["2026-c.pem"] != before["2026-c.pem"]
    assert scan(key_dir)["2026-a.pem"] == before["2026-a.pem"]


def test_generate_key_writes_a_loadable_key(tmp_path: Path) -> None:
    kid = generate_key(tmp_path, now=1_800_000_000.0)
    assert kid.startswith("gen-20270115T080000Z-")
    ring = load_ring(tmp_path)
    assert list(ring.keys) == [kid]
    assert [p.name for p in tmp_path.iterdir()] == [f"{kid}.pem"]
    assert (tmp_path / f"{kid}.pem").stat().st_mode & 0o777 == 0o600
