"""The key ring: issues and verifies join tokens, and answers a forgery spike (catalog row 10).

An actor (:func:`key_ring_child` builds its child spec and ref; callers use
:class:`JoinTokens`, which asks it). It owns the :class:`~providers.key_ring.KeyRing`
loaded from ``[tokens] key_dir`` and the set of retired kids read from PostgreSQL.

Messages, one ``match``:

=============  ==============================================================
``Reload``     every ``reload_interval_s``: the directory's fingerprint (inode,
               size, mtime per file); on a change the ring is read again, all or
               nothing -- a bad file is refused naming its path (logged, counted in
               ``triage_join_key_reload_failures_total``, a ticket notice) and the
               ring in use is kept. The retired kids are read again too (another
               replica may have rotated), and a rotation the database refused
               earlier is retried.
``Issue``      a token for (tenant, session, room, user) signed by the first kid
               that is not retired; its row is committed before it is handed out
               (:func:`providers.db.join_tokens.record_issued`). Nothing may sign:
               :class:`~providers.join_tokens.SigningUnavailable`.
``Verify``     :func:`providers.join_tokens.verify_token`, then the token's jti
               against the revocations in PostgreSQL. A refusal is counted
               (``triage_join_token_verify_failures_total``; by reason in
               ``triage_join_token_refusals_total``), fed to row 10's
               spike-over-baseline detector and remembered (reason, kid, origin) for
               the forensic record.
``Rotate``     row 10's mitigation, told by the detector's fire hook.
=============  ==============================================================

**Rotation** (the choice made here: *activate the next key*, generate one only
when none is left). The suspect kid is the ring's kid named most often by the
refused tokens in the detector's window (a leaked key shows up as tokens signed
with it that fail on room, audience or time), or else the signing kid; when every
refusal names a kid already retired (the revoked tokens of an earlier rotation
coming back), nothing is rotated again. In ONE
transaction (:func:`providers.db.join_tokens.retire_and_revoke`) the kid is
retired, every live token it signed is revoked, and the forensic record is
written: who (``recorded_by``), when, which kid, the refusals by reason and their
origins, the revoked sessions, the kid that signs next. The next spare key of the
directory signs from then on (every replica agrees: the retirement is in the
database). When no spare is left and ``generate_when_exhausted`` is set, a fresh
RS256 key is written into ``key_dir`` (a read-only secret mount refuses: then
nothing signs, issuing fails closed, and the notice says so). A page-severity
:class:`JoinKeyRotated` notice goes to the alert sink.

**Clock skew** (row 16): Prosody checks ``nbf`` and ``exp`` by its own clock with no
leeway, so a token issued by a host whose clock is ahead would not be valid yet.
With ``skew`` (the clock monitor's board) the ``nbf`` back-dating is widened by
the worst case of the latest reading (``|offset| + error``; ``unknown_skew_s``
before one), and nothing is issued while the host's clock is proven off by more
than the limit (:class:`~providers.join_tokens.ClockSkewed`, a 503: another
replica or a later try issues it).

State machine (one log line per change)::

    STARTING --ring loaded, a key may sign--> SIGNING
    STARTING/SIGNING --every kid retired, none generated--> NO_SIGNING_KEY
    NO_SIGNING_KEY --a new key file appears--> SIGNING
    any --the incarnation ends--> STOPPED
"""

from __future__ import annotations

import collections
import enum
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter

from config.schema import MailboxConfig, TokensConfig
from engine.actor import Actor, ActorRef, Overflow, Timer, actor_child, ended_by_error
from engine.clock import Clock
from engine.detectors import SpikeOverBaselineDetector
from engine.errors import ProviderError
from engine.events import EventBus, Notice
from engine.metrics import families
from engine.statelog import StateLog
from providers.bridge import run
from providers.db.join_tokens import (
    IncidentRecord,
    IncidentResult,
    IssuedToken,
    record_issued,
    retire_and_revoke,
    retired_kids,
    revoked_jti,
)
from providers.join_tokens import (
    ClockSkewed,
    Expectation,
    JoinClaims,
    JoinUser,
    SigningUnavailable,
    TokenMalformed,
    TokenRefused,
    TokenRevoked,
    issue_token,
    unverified_kid,
    verify_token,
)
from providers.key_ring import EMPTY_RING, KeyFileError, KeyRing, generate_key, load_ring, scan

if TYPE_CHECKING:
    import asyncpg

    from engine.deadlines import Deadlines
    from engine.metrics import Metrics
    from engine.supervisor import ChildSpec, Restart

__all__ = [
    "ROW",
    "SEVERITY",
    "DbTokenStore",
    "Issue",
    "IssuedJoinToken",
    "JoinKeyRotated",
    "JoinTokens",
    "KeyFileRefused",
    "KeyRingActor",
    "KeyRingMessage",
    "KeyRingState",
    "KeyRingStatistics",
    "Reload",
    "Rotate",
    "SkewSource",
    "TokenStore",
    "Verify",
    "expectation",
    "key_ring_child",
]

log = logging.getLogger("triage.key_ring")

ROW = 10
SEVERITY = "page"  # row 10's severity in the catalog (config/failures.toml)


T = TypeVar("T")


#: How blocking file work runs: ``trio.to_thread.run_sync`` (tests: inline, so the
#: autojump clock never moves while a thread works).
class Offload(Protocol):
    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


async def _in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


class SkewSource(Protocol):
    """This host's measured clock skew (:class:`actors.clock_monitor.ClockBoard`)."""

    def bound_s(self) -> float | None: ...

    def leeway_s(self, base_s: float, *, unknown_s: float) -> float: ...

    def skewed(self) -> bool: ...


class TokenStore(Protocol):
    """Where issued tokens, revocations and retirements live (:class:`DbTokenStore`)."""

    async def retired(self) -> list[str]: ...

    async def record_issued(self, token: IssuedToken) -> None: ...

    async def is_revoked(self, tenant_id: uuid.UUID, jti: uuid.UUID) -> bool: ...

    async def retire_and_revoke(self, record: IncidentRecord) -> IncidentResult: ...


class DbTokenStore:
    """:class:`TokenStore` in PostgreSQL (:mod:`providers.db.join_tokens`), one crossing each."""

    def __init__(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        self.pool = pool

    async def retired(self) -> list[str]:
        return await run(retired_kids, self.pool, service="postgres")

    async def record_issued(self, token: IssuedToken) -> None:
        await run(record_issued, self.pool, token, service="postgres")

    async def is_revoked(self, tenant_id: uuid.UUID, jti: uuid.UUID) -> bool:
        return await run(revoked_jti, self.pool, tenant_id, jti, service="postgres")

    async def retire_and_revoke(self, record: IncidentRecord) -> IncidentResult:
        return await run(retire_and_revoke, self.pool, record, service="postgres")


class KeyRingState(enum.Enum):
    STARTING = "starting"
    SIGNING = "signing"
    NO_SIGNING_KEY = "no_signing_key"  # every kid retired: issuing fails closed
    STOPPED = "stopped"


class Reload(msgspec.Struct, frozen=True, tag=True):
    """Poll the key directory (and the retired kids); reload on a change."""


class Issue(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    tenant_id: uuid.UUID
    session_id: str
    room: str
    user: JoinUser


class Verify(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    token: str
    room: str
    origin: str = ""  # where the token came from (the client address), for the record


class Rotate(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Row 10's mitigation; ``kid`` None: the suspect kid is worked out from the refusals."""

    reason: str
    kid: str | None = None


KeyRingMessage = Reload | Issue | Verify | Rotate
RELOAD = Reload()


class IssuedJoinToken(msgspec.Struct, frozen=True, kw_only=True):
    token: str
    kid: str
    claims: JoinClaims


class KeyRingStatistics(msgspec.Struct, frozen=True, kw_only=True):
    state: KeyRingState
    kids: tuple[str, ...]
    retired: tuple[str, ...]
    signing_kid: str | None
    issued: int
    refused_skewed: int  # issues refused while this host's clock was proven skewed (row 16)
    verified: int
    refused: dict[str, int]  # by reason, this incarnation
    reloads: int
    reload_failures: int
    rotations: int
    last_incident: int | None


class JoinKeyRotated(Notice, frozen=True, kw_only=True):
    """Row 10's mitigation ran: ``kid`` retired, its tokens revoked, ``new_kid`` signs."""

    kid: str
    new_kid: str | None
    revoked_tokens: int
    sessions: int
    incident_id: int
    failures: dict[str, int]
    severity: str = SEVERITY
    row: int | None = ROW

    def alert_key(self) -> str:
        return f"join_key_rotated:{self.kid}"


class KeyFileRefused(Notice, frozen=True, kw_only=True):
    """A reload refused a key file (the ring in use is kept)."""

    path: str
    problem: str
    severity: str = "ticket"
    row: int | None = ROW

    def alert_key(self) -> str:
        return f"key_file_refused:{self.path}"


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        # Row 10's metric has no label, so the exported rule compares all refusals with
        # their baseline (per reason, a new reason would have none); the reasons apart:
        self.failures = Counter(
            "triage_join_token_verify_failures_total",
            "Virtual-room join tokens that failed verification",
            registry=registry,
        )
        self.refusals = Counter(
            "triage_join_token_refusals_total",
            "Join tokens refused, by reason (malformed, bad_signature, expired, revoked, ...)",
            ["reason"],
            registry=registry,
        )
        self.issued = Counter(
            "triage_join_tokens_issued_total", "Join tokens issued", registry=registry
        )
        self.reload_failures = Counter(
            "triage_join_key_reload_failures_total",
            "Key directory reloads refused for a bad file (the old ring kept)",
            registry=registry,
        )
        self.rotations = Counter(
            "triage_join_key_rotations_total",
            "Join-token signing keys retired by row 10's mitigation",
            registry=registry,
        )


def expectation(config: TokensConfig) -> Expectation:
    return Expectation(issuer=config.issuer, audience=config.audience, subject=config.subject)


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def _make_missing(directory: Path) -> bool:
    """Create ``directory`` if it does not exist; True if it was created."""
    if directory.exists():
        return False
    directory.mkdir(parents=True)
    return True


class KeyRingActor(Actor[KeyRingMessage]):
    """See the module docstring. Build it with :func:`key_ring_child`."""

    name = "key_ring"

    def __init__(
        self,
        *,
        store: TokenStore,
        config: TokensConfig,
        detector: SpikeOverBaselineDetector | None = None,
        registry: CollectorRegistry | None = None,
        events: EventBus | None = None,
        clock: Clock | None = None,
        recorded_by: str = "triage",
        offload: Offload = _in_thread,
        skew: SkewSource | None = None,
        unknown_skew_s: float = 0.0,
    ) -> None:
        self.store = store
        self.skew = skew
        self.unknown_skew_s = unknown_skew_s
        self.offload = offload
        self.config = config
        self.expect = expectation(config)
        self.detector = detector
        self.events = events
        self.clock = clock if clock is not None else Clock()
        self.recorded_by = recorded_by
        self.states = StateLog(
            "key ring", KeyRingState.STARTING, log, warn={KeyRingState.NO_SIGNING_KEY}
        )
        self.ring: KeyRing = EMPTY_RING
        self.retired: set[str] = set()
        self.issued = 0
        self.refused_skewed = 0  # issues refused while the host's clock was proven skewed
        self.verified = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.reloads = 0
        self.reload_failures = 0
        self.rotations = 0
        self.last_incident: int | None = None
        #: (trio time, reason, kid, origin) of recent refusals, for the forensic record.
        self.recent: collections.deque[tuple[float, str, str | None, str]] = collections.deque(
            maxlen=config.forensic_failures
        )
        self._refused_with: str | None = None  # the reload problem already reported
        self._pending: Rotate | None = None  # a rotation the database refused, retried
        self._unsubscribe: Callable[[], None] | None = None
        self._metrics = families(registry, _Metrics) if registry is not None else None

    # -- the actor ---------------------------------------------------------------------

    async def init(self) -> None:
        """Read the retired kids (without them nothing may sign: the start needs the
        database) and the ring. A missing directory is created with a fresh key when
        ``create_missing`` is set; otherwise a missing or bad directory leaves the ring
        empty (nothing signs or verifies) until a reload finds it usable."""
        self.retired = set(await self.store.retired())
        if self.config.create_missing and await self.offload(
            functools.partial(_make_missing, Path(self.config.key_dir))
        ):
            await self._generate()
        await self._reload()
        if self.detector is not None:
            self._unsubscribe = self.detector.on_fire(self._on_fire)

    def _on_fire(self, _state: object) -> None:
        self.tell_self(Rotate(reason="join-token verify failures spiked (row 10)"))

    def timers(self) -> Sequence[Timer]:
        return [Timer(self.config.reload_interval_s, RELOAD)]

    async def terminate(self, reason: BaseException | None) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        self.states.enter(KeyRingState.STOPPED, "crashed" if ended_by_error(reason) else "stopped")

    def statistics(self) -> KeyRingStatistics:
        signing = self.ring.signing_key(self.retired)
        return KeyRingStatistics(
            state=self.states.state,
            kids=tuple(sorted(self.ring.keys)),
            retired=tuple(sorted(self.retired)),
            signing_kid=signing.kid if signing is not None else None,
            issued=self.issued,
            refused_skewed=self.refused_skewed,
            verified=self.verified,
            refused=dict(self.refused),
            reloads=self.reloads,
            reload_failures=self.reload_failures,
            rotations=self.rotations,
            last_incident=self.last_incident,
        )

    async def handle(self, message: KeyRingMessage) -> object:
        match message:
            case Reload():
                await self._reload()
                if self._pending is not None:
                    await self._rotate(self._pending)
                return None
            case Issue():
                return await self._issue(message)
            case Verify():
                return await self._verify(message)
            case Rotate():
                await self._rotate(message)
                return None

    # -- reloading ----------------------------------------------------------------------

    def _enter_signing_state(self, why: str) -> None:
        if self.ring.signing_key(self.retired) is None:
            self.states.enter(KeyRingState.NO_SIGNING_KEY, f"{why}: no kid may sign")
        else:
            self.states.enter(KeyRingState.SIGNING, why)

    async def _reload(self) -> None:
        key_dir = self.config.key_dir
        try:
            fingerprint = await self.offload(functools.partial(scan, key_dir))
            if fingerprint != self.ring.fingerprint:
                ring = await self.offload(functools.partial(load_ring, key_dir))
                self.ring = ring
                self.reloads += 1
                log.info("key ring reloaded", extra={"kids": sorted(ring.keys)})
            self._refused_with = None
        except KeyFileError as exc:
            if str(exc) != self._refused_with:  # once per problem, not once per poll
                self._refuse_file(exc)
            self._refused_with = str(exc)
        try:
            self.retired = set(await self.store.retired())
        except ProviderError as exc:  # keep the retired kids known; they only grow
            log.warning("key ring: retired kids not refreshed: %s", exc)
        self._enter_signing_state("reloaded")

    def _refuse_file(self, exc: KeyFileError) -> None:
        self.reload_failures += 1
        if self._metrics is not None:
            self._metrics.reload_failures.inc()
        log.error("key ring: reload refused, the ring in use is kept: %s", exc)
        if self.events is not None:
            self.events.emit(
                KeyFileRefused(
                    at=trio.current_time(),
                    wall=self.clock.wall(),
                    path=exc.path,
                    problem=exc.problem,
                )
            )

    # -- issuing and verifying -----------------------------------------------------------

    async def _issue(self, message: Issue) -> IssuedJoinToken | Exception:
        key = self.ring.signing_key(self.retired)
        if key is None:
            return SigningUnavailable(
                f"no key of {self.config.key_dir} may sign (retired: {sorted(self.retired)})"
            )
        config = self.config
        nbf_skew_s = config.nbf_skew_s
        if self.skew is not None:  # row 16: Prosody checks nbf and exp by its own clock
            if self.skew.skewed():
                self.refused_skewed += 1
                return ClockSkewed(
                    f"this host's clock is off the database's by more than the limit"
                    f" (bound {self.skew.bound_s():.3f}s): no join token is issued on it"
                )
            nbf_skew_s = self.skew.leeway_s(nbf_skew_s, unknown_s=self.unknown_skew_s)
        now = self.clock.wall()
        token, claims = issue_token(
            key, self.expect, room=message.room, session=message.session_id,
            tenant=str(message.tenant_id), user=message.user, now=now, ttl_s=config.ttl_s,
            nbf_skew_s=min(nbf_skew_s, config.ttl_s / 2),
        )  # fmt: skip
        row = IssuedToken(
            jti=uuid.UUID(claims.jti), tenant_id=message.tenant_id, session_id=message.session_id,
            room=message.room, kid=key.kid, user_id=message.user.id, issued_at=claims.iat,
            expires_at=claims.exp,
        )  # fmt: skip
        try:
            await self.store.record_issued(row)
        except ProviderError as exc:
            return exc
        self.issued += 1
        if self._metrics is not None:
            self._metrics.issued.inc()
        return IssuedJoinToken(token=token, kid=key.kid, claims=claims)

    async def _verify(self, message: Verify) -> JoinClaims | Exception:
        try:
            claims = verify_token(
                message.token, self.ring, self.expect, room=message.room, now=self.clock.wall(),
                retired=self.retired, max_bytes=self.config.max_token_bytes,
            )  # fmt: skip
            tenant, jti = _uuid(claims.tenant), _uuid(claims.jti)
            if tenant is None or jti is None:
                raise TokenMalformed(
                    "tenant and jti must be UUIDs", kid=unverified_kid(message.token)
                )
            try:
                revoked = await self.store.is_revoked(tenant, jti)
            except ProviderError as exc:  # revocation unknown: fail closed (a 503)
                return exc
            if revoked:
                raise TokenRevoked(
                    f"token {claims.jti} was revoked", kid=unverified_kid(message.token)
                )
        except TokenRefused as exc:
            self._count_refusal(exc, message.origin)
            return exc
        self.verified += 1
        if self.detector is not None:
            self.detector.observe(0)  # keeps the window moving with the traffic
        return claims

    def _count_refusal(self, exc: TokenRefused, origin: str) -> None:
        reason = exc.reason
        self.refused[reason] += 1
        self.recent.append((trio.current_time(), reason, exc.kid, origin))
        if self._metrics is not None:
            self._metrics.failures.inc()
            self._metrics.refusals.labels(reason=reason).inc()
        if self.detector is not None:
            self.detector.observe(1)

    # -- the mitigation ------------------------------------------------------------------

    def _window(self) -> list[tuple[float, str, str | None, str]]:
        span = self.detector.window_s if self.detector is not None else None
        if span is None:
            return list(self.recent)
        since = trio.current_time() - span
        return [entry for entry in self.recent if entry[0] >= since]

    def _suspect(self, window: Sequence[tuple[float, str, str | None, str]]) -> str | None:
        """The kid to retire: the live kid of the ring most named by the refusals, else the
        signing kid -- or None when every refusal names a kid already retired (the old
        tokens of an earlier rotation coming back: rotating again would not help)."""
        fresh = [kid for _, _, kid, _ in window if kid is None or kid not in self.retired]
        if window and not fresh:
            return None
        named = collections.Counter(
            kid for kid in fresh if kid is not None and kid in self.ring.keys
        )
        if named:
            return named.most_common(1)[0][0]
        signing = self.ring.signing_key(self.retired)
        return signing.kid if signing is not None else None

    async def _rotate(self, message: Rotate) -> None:
        window = self._window()
        kid = message.kid if message.kid is not None else self._suspect(window)
        if kid is None or kid in self.retired:
            log.warning("key ring: rotation asked (%s), but no live kid to retire", message.reason)
            return
        retired = self.retired | {kid}
        following = self.ring.signing_key(retired)
        if following is None and self.config.generate_when_exhausted:
            following_kid = await self._generate()
        else:
            following_kid = following.kid if following is not None else None
        failures = dict(collections.Counter(reason for _, reason, _, _ in window))
        origins = sorted({origin for _, _, _, origin in window if origin})
        record = IncidentRecord(
            kid=kid, detected_at=self.clock.wall(), recorded_by=self.recorded_by,
            reason=message.reason, failures=failures, origins=origins[: self.config.forensic_origins],
            new_kid=following_kid,
        )  # fmt: skip
        try:
            result = await self.store.retire_and_revoke(record)
        except ProviderError as exc:
            self._pending = Rotate(reason=message.reason, kid=kid)
            log.error(
                "key ring: rotation of %s not stored, retried at the next reload: %s", kid, exc
            )
            return
        self._pending = None
        self.retired.add(kid)
        self.rotations += 1
        self.last_incident = result.incident_id
        if self._metrics is not None:
            self._metrics.rotations.inc()
        self._enter_signing_state(f"kid {kid} retired")
        log.critical(
            "join key rotated",
            extra={
                "kid": kid, "new_kid": following_kid, "revoked_tokens": result.revoked_tokens,
                "incident_id": result.incident_id, "failures": failures,
            },
        )  # fmt: skip
        if self.events is not None:
            self.events.emit(
                JoinKeyRotated(
                    at=trio.current_time(),
                    wall=self.clock.wall(),
                    kid=kid,
                    new_kid=following_kid,
                    revoked_tokens=result.revoked_tokens,
                    sessions=len(result.sessions),
                    incident_id=result.incident_id,
                    failures=failures,
                )
            )

    async def _generate(self) -> str | None:
        """A fresh key in ``key_dir`` (none left to activate); None if the directory refuses."""
        try:
            kid = await self.offload(
                functools.partial(
                    generate_key,
                    self.config.key_dir,
                    now=self.clock.wall(),
                    bits=self.config.generated_key_bits,
                )
            )
            self.ring = await self.offload(functools.partial(load_ring, self.config.key_dir))
        except KeyFileError as exc:
            self._refuse_file(exc)
            return None
        return kid


class JoinTokens:
    """What the HTTP API (and the rooms) call: asks the key ring, raises what it answers."""

    def __init__(self, ref: ActorRef[KeyRingMessage], *, timeout_s: float) -> None:
        self.ref = ref
        self.timeout_s = timeout_s

    async def issue(
        self, *, tenant_id: uuid.UUID, session_id: str, room: str, user: JoinUser
    ) -> IssuedJoinToken:
        answer = await self.ref.ask(
            Issue(tenant_id=tenant_id, session_id=session_id, room=room, user=user),
            timeout_s=self.timeout_s,
        )
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, IssuedJoinToken), answer
        return answer

    async def verify(self, token: str, *, room: str, origin: str = "") -> JoinClaims:
        answer = await self.ref.ask(
            Verify(token=token, room=room, origin=origin), timeout_s=self.timeout_s
        )
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, JoinClaims), answer
        return answer


def key_ring_child(
    *,
    store: TokenStore,
    config: TokensConfig,
    mailbox: MailboxConfig,
    shutdown_s: float,
    detector: SpikeOverBaselineDetector | None = None,
    registry: CollectorRegistry | None = None,
    events: EventBus | None = None,
    clock: Clock | None = None,
    recorded_by: str = "triage",
    offload: Offload = _in_thread,
    skew: SkewSource | None = None,
    unknown_skew_s: float = 0.0,
    restart: Restart | None = None,
    deadlines: Deadlines | None = None,
    metrics: Metrics | None = None,
    actor: Callable[..., KeyRingActor] = KeyRingActor,
) -> tuple[ChildSpec, ActorRef[KeyRingMessage]]:
    """The key ring's child spec (id ``key_ring``) and ref."""
    factory: Callable[[], KeyRingActor] = functools.partial(
        actor, store=store, config=config, detector=detector, registry=registry,
        events=events, clock=clock, recorded_by=recorded_by, offload=offload, skew=skew,
        unknown_skew_s=unknown_skew_s,
    )  # fmt: skip
    return actor_child(
        KeyRingActor.name,
        factory,
        capacity=mailbox.capacity,
        overflow=Overflow(mailbox.overflow),
        restart=restart,
        shutdown_s=shutdown_s,
        deadlines=deadlines,
        metrics=metrics,
    )
