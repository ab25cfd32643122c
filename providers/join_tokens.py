"""Join tokens for the virtual rooms: JWTs in the format Prosody's token module checks.

A Jitsi Meet deployment with token authentication (Prosody's ``mod_auth_token``)
admits a participant whose ``?jwt=`` verifies. The token we issue::

    header   {"alg": "RS256" | "HS256", "typ": "JWT", "kid": "<key id of the ring>"}
    payload  {"iss": <[tokens] issuer>,     (Prosody: asap_accepted_issuers / app_id)
              "aud": <[tokens] audience>,   (Prosody: asap_accepted_audiences)
              "sub": <[tokens] subject>,    (the XMPP domain, or a tenant)
              "room": "<room name>",
              "nbf": now - [tokens] nbf_skew_s,  "iat": now,  "exp": now + ttl_s,
              "jti": "<uuid>",  "tenant": "<tenant uuid>",  "session": "<session id>",
              "context": {"user": {"id", "name", "email"?, "moderator"}}}

Prosody allows **no clock leeway**: it refuses a token at ``now < nbf`` and at
``now >= exp``. A bridge whose clock is a little behind ours would refuse a token
issued with ``nbf = now``; so ``nbf`` is set ``nbf_skew_s`` in the past (config),
and :func:`verify_token` applies Prosody's rules exactly, with no leeway either.

:func:`verify_token` refuses, each with a typed :class:`TokenRefused` whose
``reason`` is the code an HTTP answer carries (checked in this order)::

    reason              class               what
    malformed           TokenMalformed      not three base64url parts of JSON, too long,
                                            or a claim missing / of the wrong type
    algorithm_refused   AlgorithmRefused    ``alg: none`` (any case), or not the
                                            algorithm of the key the kid names
    unknown_kid         UnknownKeyId        no kid, or a kid the ring does not hold
    bad_signature       TokenForged         the signature does not verify
    expired             TokenExpired        now >= exp
    not_yet_valid       TokenNotYetValid    now < nbf
    wrong_issuer        WrongIssuer         iss is not [tokens] issuer
    wrong_audience      WrongAudience       aud is not [tokens] audience
    wrong_subject       WrongSubject        sub is not [tokens] subject
    wrong_room          WrongRoom           room is not the room asked for (compared
                                            lower-cased, as Prosody's room JIDs are);
                                            a wildcard ``*`` room is never issued, so
                                            never accepted either
    revoked             TokenRevoked        its kid is retired (:mod:`actors.key_ring`
                                            also refuses a revoked jti)

The algorithm comes from the key (the file's extension, :mod:`providers.key_ring`),
never from the token: an RS256 public key can never be used as an HS256 secret.
Time claims are checked here against the injected wall clock (``now``), not by
pyjwt (which reads ``time.time()``).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from typing import Any, ClassVar

import jwt
import jwt.types
import msgspec

from engine.errors import TriageError
from providers.key_ring import KeyRing, RingKey

__all__ = [
    "AlgorithmRefused",
    "ClockSkewed",
    "Expectation",
    "JoinClaims",
    "JoinContext",
    "JoinUser",
    "SigningUnavailable",
    "TokenExpired",
    "TokenForged",
    "TokenMalformed",
    "TokenNotYetValid",
    "TokenRefused",
    "TokenRevoked",
    "UnknownKeyId",
    "WrongAudience",
    "WrongIssuer",
    "WrongRoom",
    "WrongSubject",
    "issue_token",
    "unverified_kid",
    "verify_token",
]


class TokenRefused(TriageError):
    """A join token that does not verify; ``reason`` is its code (a 401's ``error``)."""

    reason: ClassVar[str] = "refused"

    def __init__(self, detail: str, *, kid: str | None = None) -> None:
        super().__init__(f"join token refused ({self.reason}): {detail}")
        self.detail = detail
        self.kid = kid


class TokenMalformed(TokenRefused):
    reason = "malformed"


class AlgorithmRefused(TokenRefused):
    reason = "algorithm_refused"


class UnknownKeyId(TokenRefused):
    reason = "unknown_kid"


class TokenForged(TokenRefused):
    reason = "bad_signature"


class TokenExpired(TokenRefused):
    reason = "expired"


class TokenNotYetValid(TokenRefused):
    reason = "not_yet_valid"


class WrongIssuer(TokenRefused):
    reason = "wrong_issuer"


class WrongAudience(TokenRefused):
    reason = "wrong_audience"


class WrongSubject(TokenRefused):
    reason = "wrong_subject"


class WrongRoom(TokenRefused):
    reason = "wrong_room"


class TokenRevoked(TokenRefused):
    reason = "revoked"


class SigningUnavailable(TriageError):
    """No key may sign (every kid of the ring is retired, or the ring is empty): issuing
    fails closed (a 503) until a key is provisioned."""


class ClockSkewed(SigningUnavailable):
    """This host's clock is proven off the database's by more than ``[clock]
    max_offset_s`` (row 16): a token it dated would not check at Prosody, so none is
    issued here until the clock is back (a 503 ``clock_skewed``)."""


class JoinUser(msgspec.Struct, frozen=True, kw_only=True):
    """``context.user`` as Jitsi Meet reads it."""

    id: str
    name: str
    email: str | None = None
    moderator: bool | str = False  # Jitsi accepts "true"/"false" too


class JoinContext(msgspec.Struct, frozen=True, kw_only=True):
    user: JoinUser


class JoinClaims(msgspec.Struct, frozen=True, kw_only=True):
    """The payload of a join token (unknown claims are ignored when verifying)."""

    iss: str
    aud: str
    sub: str
    room: str
    nbf: float
    exp: float
    iat: float
    jti: str
    tenant: str
    session: str
    context: JoinContext


class Expectation(msgspec.Struct, frozen=True, kw_only=True):
    """What a token must say besides its room: ``[tokens] issuer / audience / subject``."""

    issuer: str
    audience: str
    subject: str


def issue_token(
    key: RingKey,
    expect: Expectation,
    *,
    room: str,
    session: str,
    tenant: str,
    user: JoinUser,
    now: float,
    ttl_s: float,
    nbf_skew_s: float,
    jti: str | None = None,
) -> tuple[str, JoinClaims]:
    """A signed join token for ``room`` and its claims (times are whole seconds: ``nbf``
    rounded down, ``exp`` up is never later than ``now + ttl_s`` rounded down)."""
    claims = JoinClaims(
        iss=expect.issuer,
        aud=expect.audience,
        sub=expect.subject,
        room=room,
        nbf=float(int(now - nbf_skew_s)),
        iat=float(int(now)),
        exp=float(int(now + ttl_s)),
        jti=jti if jti is not None else str(uuid.uuid4()),
        tenant=tenant,
        session=session,
        context=JoinContext(user=user),
    )
    payload: dict[str, Any] = msgspec.to_builtins(claims)
    for name in ("nbf", "iat", "exp"):  # NumericDate: integers on the wire
        payload[name] = int(payload[name])
    token = jwt.encode(
        payload, key.signing, algorithm=key.algorithm, headers={"kid": key.kid, "typ": "JWT"}
    )
    return token, claims


def unverified_kid(token: str) -> str | None:
    """The kid a token's header names (nothing verified), or None."""
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError:
        return None
    return kid if isinstance(kid, str) else None


_DECODE_OPTIONS: jwt.types.Options = {
    "verify_signature": True,
    "verify_exp": False,  # checked below against the injected clock, without leeway
    "verify_nbf": False,
    "verify_iat": False,
    "verify_aud": False,  # checked below, as a plain string
    "verify_iss": False,
    "verify_sub": False,
    "verify_jti": False,
    "require": [],
}


def verify_token(
    token: str,
    ring: KeyRing,
    expect: Expectation,
    *,
    room: str,
    now: float,
    retired: Collection[str] = (),
    max_bytes: int = 8192,
) -> JoinClaims:
    """The claims of ``token`` if it admits to ``room`` at wall time ``now``; else the
    :class:`TokenRefused` of the first failed check (see the module docstring)."""
    if len(token) > max_bytes:
        raise TokenMalformed(f"longer than {max_bytes} bytes")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError as exc:
        raise TokenMalformed(f"no JWT header ({exc})") from exc
    alg = header.get("alg")
    kid = header.get("kid")
    kid = kid if isinstance(kid, str) else None
    if not isinstance(alg, str) or alg.lower() == "none":
        raise AlgorithmRefused(f"alg {alg!r} is never accepted", kid=kid)
    if kid is None:
        raise UnknownKeyId("the header names no kid")
    key = ring.get(kid)
    if key is None:
        raise UnknownKeyId(f"no key {kid[:64]!r} in the ring", kid=kid[:64])
    if alg != key.algorithm:
        raise AlgorithmRefused(f"alg {alg!r}, but key {kid!r} is {key.algorithm}", kid=kid)
    try:
        payload = jwt.decode(
            token, key.verifying, algorithms=[key.algorithm], options=_DECODE_OPTIONS
        )
    except jwt.InvalidSignatureError as exc:
        raise TokenForged(f"the signature does not verify with key {kid!r}", kid=kid) from exc
    except jwt.InvalidTokenError as exc:
        raise TokenMalformed(f"undecodable payload ({exc})", kid=kid) from exc
    try:
        claims = msgspec.convert(payload, JoinClaims)
    except msgspec.ValidationError as exc:
        raise TokenMalformed(str(exc), kid=kid) from exc
    if now >= claims.exp:
        raise TokenExpired(f"exp {claims.exp:.0f} <= now {now:.3f}", kid=kid)
    if now < claims.nbf:
        raise TokenNotYetValid(f"nbf {claims.nbf:.0f} > now {now:.3f}", kid=kid)
    if claims.iss != expect.issuer:
        raise WrongIssuer(f"iss {claims.iss[:100]!r}, expected {expect.issuer!r}", kid=kid)
    if claims.aud != expect.audience:
        raise WrongAudience(f"aud {claims.aud[:100]!r}, expected {expect.audience!r}", kid=kid)
    if claims.sub != expect.subject:
        raise WrongSubject(f"sub {claims.sub[:100]!r}, expected {expect.subject!r}", kid=kid)
    if claims.room.lower() != room.lower():
        raise WrongRoom(f"room {claims.room[:100]!r}, asked for {room[:100]!r}", kid=kid)
    if kid in retired:
        raise TokenRevoked(f"key {kid!r} is retired", kid=kid)
    return claims
