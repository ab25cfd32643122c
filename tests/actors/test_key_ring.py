"""The key ring actor on the autojump clock, over an in-memory model of its store.

The model keeps the database's rules (:mod:`providers.db.join_tokens`, tested on
PostgreSQL in tests/providers/test_join_tokens_db.py): a retired kid stays retired,
a rotation revokes every live token of its kid. File work runs inline, so the clock
never moves while it runs and every time below is exact.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
import trio
import trio.testing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry

from actors.clock_monitor import ClockBoard, ClockReading, judge
from actors.key_ring import (
    JoinKeyRotated,
    JoinTokens,
    KeyFileRefused,
    KeyRingMessage,
    KeyRingState,
    KeyRingStatistics,
    key_ring_child,
)
from config.schema import MailboxConfig, TokensConfig
from engine.actor import ActorRef
from engine.clock import Clock
from engine.detectors import SpikeOverBaselineDetector
from engine.errors import ProviderUnavailable
from engine.events import Event, EventBus
from engine.runtime import open_runtime
from providers.db.join_tokens import IncidentRecord, IncidentResult, IssuedToken
from providers.join_tokens import (
    ClockSkewed,
    JoinUser,
    SigningUnavailable,
    TokenExpired,
    TokenForged,
    TokenRevoked,
    UnknownKeyId,
)

T = TypeVar("T")
TENANT = uuid.UUID("5b1f3c52-6f55-4a35-9f3e-0c2c1d1e7a10")
USER = JoinUser(id="patient-1", name="Pat")
WALL0 = 1_800_000_000.0
MAILBOX = MailboxConfig(capacity=1000, overflow="reject")


async def inline(fn: Callable[[], T]) -> T:
    return fn()


@dataclass
class MemoryStore:
    tokens: dict[uuid.UUID, IssuedToken] = field(default_factory=dict)
    revoked: set[uuid.UUID] = field(default_factory=set)
    retired_kids: set[str] = field(default_factory=set)
    incidents: list[IncidentRecord] = field(default_factory=list)
    down: bool = False

    def _check(self) -> None:
        if self.down:
            raise ProviderUnavailable("postgres: unavailable (test)")

    async def retired(self) -> list[str]:
        self._check()
        return sorted(self.retired_kids)

    async def record_issued(self, token: IssuedToken) -> None:
        self._check()
        self.tokens[token.jti] = token

    async def is_revoked(self, tenant_id: uuid.UUID, jti: uuid.UUID) -> bool:
        self._check()
        return jti in self.revoked

    async def retire_and_revoke(self, record: IncidentRecord) -> IncidentResult:
        self._check()
        new = record.kid not in self.retired_kids
        self.retired_kids.add(record.kid)
        hit = [t for t in self.tokens.values() if t.kid == record.kid and t.jti not in self.revoked]
        self.revoked |= {t.jti for t in hit}
        self.incidents.append(record)
        sessions = [
            {"tenant_id": str(t.tenant_id), "session_id": t.session_id, "room": t.room} for t in hit
        ]
        return IncidentResult(len(self.incidents), len(hit), sessions, new)


@pytest.fixture(scope="module")
def pems() -> list[bytes]:
    return [
        rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        for _ in range(2)
    ]


@dataclass
class Ring:
    ref: ActorRef[KeyRingMessage]
    tokens: JoinTokens
    store: MemoryStore
    events: list[Event]
    key_dir: Path
    t0: float

    def stats(self) -> KeyRingStatistics:
        stats: object = self.ref.statistics()
        assert isinstance(stats, KeyRingStatistics), stats
        return stats

    async def at(self, offset: float) -> None:
        """Sleep until ``t0 + offset`` and let every task settle there."""
        await trio.sleep_until(self.t0 + offset)
        await trio.testing.wait_all_tasks_blocked()


@asynccontextmanager
async def open_ring(
    key_dir: Path,
    *,
    store: MemoryStore | None = None,
    detector: SpikeOverBaselineDetector | None = None,
    registry: CollectorRegistry | None = None,
    skew: ClockBoard | None = None,
    unknown_skew_s: float = 0.0,
    **overrides: Any,
) -> AsyncIterator[Ring]:
    settings: dict[str, Any] = {
        "key_dir": str(key_dir), "reload_interval_s": 1.0, "ttl_s": 600.0, "nbf_skew_s": 30.0,
        "generate_when_exhausted": False,
    }  # fmt: skip
    settings.update(overrides)
    config = TokensConfig(**settings)
    store = store if store is not None else MemoryStore()
    bus = EventBus()
    seen: list[Event] = []
    bus.on(Event, seen.append)
    t0 = trio.current_time()
    clock = Clock(lambda: WALL0 + (trio.current_time() - t0))
    async with open_runtime() as runtime:
        spec, ref = key_ring_child(
            store=store, config=config, mailbox=MAILBOX, shutdown_s=1.0, detector=detector,
            registry=registry, events=bus, clock=clock, recorded_by="replica-1/key_ring",
            offload=inline, deadlines=runtime.deadlines, skew=skew, unknown_skew_s=unknown_skew_s,
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            await nursery.start(spec.start)
            yield Ring(ref, JoinTokens(ref, timeout_s=2.0), store, seen, key_dir, t0)
            nursery.cancel_scope.cancel()


@pytest.fixture
def key_dir(tmp_path: Path, pems: list[bytes]) -> Path:
    directory = tmp_path / "keys"
    directory.mkdir()
    (directory / "2026-a.pem").write_bytes(pems[0])
    return directory


async def _issue(ring: Ring, session: str = "s-1", room: str = "visit-1") -> str:
    issued = await ring.tokens.issue(tenant_id=TENANT, session_id=session, room=room, user=USER)
    return issued.token


# -- reloading ----------------------------------------------------------------------------


async def test_a_new_key_file_is_in_the_ring_at_the_next_poll(
    autojump_clock: trio.abc.Clock, key_dir: Path, pems: list[bytes]
) -> None:
    async with open_ring(key_dir) as ring:
        assert ring.stats().state is KeyRingState.SIGNING
        assert ring.stats().kids == ("2026-a",) and ring.stats().signing_kid == "2026-a"
        await ring.at(0.5)
        (key_dir / "2026-b.pem").write_bytes(pems[1])
        await ring.at(0.999)
        assert ring.stats().kids == ("2026-a",)
        await ring.at(1.0)
        assert ring.stats().kids == ("2026-a", "2026-b")
        assert ring.stats().reloads == 2  # the start, then the poll at t0 + 1.0
        # A spare: the first kid in name order still signs.
        assert ring.stats().signing_kid == "2026-a"


async def test_a_bad_file_is_refused_once_and_the_old_ring_kept(
    autojump_clock: trio.abc.Clock, key_dir: Path, pems: list[bytes]
) -> None:
    registry = CollectorRegistry()
    async with open_ring(key_dir, registry=registry) as ring:
        token = await _issue(ring)
        bad = key_dir / "2026-b.pem"
        bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        await ring.at(1.0)
        stats = ring.stats()
        assert (stats.kids, stats.reload_failures) == (("2026-a",), 1)
        [refused] = [e for e in ring.events if isinstance(e, KeyFileRefused)]
        assert refused.path == str(bad) and "PEM" in refused.problem
        assert refused.at == ring.t0 + 1.0 and refused.severity == "ticket"
        await ring.at(3.0)  # polled again twice: the same problem is not reported again
        assert ring.stats().reload_failures == 1
        assert registry.get_sample_value("triage_join_key_reload_failures_total") == 1.0
        # The ring in use still verifies and signs.
        assert (await ring.tokens.verify(token, room="visit-1")).session == "s-1"
        bad.write_bytes(pems[1])
        await ring.at(4.0)
        assert ring.stats().kids == ("2026-a", "2026-b")


async def test_a_missing_directory_leaves_the_ring_empty_until_it_appears(
    autojump_clock: trio.abc.Clock, tmp_path: Path, pems: list[bytes]
) -> None:
    key_dir = tmp_path / "later"
    async with open_ring(key_dir) as ring:
        assert ring.stats().state is KeyRingState.NO_SIGNING_KEY
        with pytest.raises(SigningUnavailable):
            await _issue(ring)
        key_dir.mkdir()
        (key_dir / "k1.pem").write_bytes(pems[0])
        await ring.at(1.0)
        assert ring.stats().state is KeyRingState.SIGNING
        assert await _issue(ring)


async def test_create_missing_makes_the_directory_with_a_fresh_key(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    key_dir = tmp_path / "dev-keys"
    async with open_ring(key_dir, create_missing=True) as ring:
        [kid] = ring.stats().kids
        assert kid.startswith("gen-20270115T080000Z-")
        assert ring.stats().signing_kid == kid


# -- issuing and verifying ----------------------------------------------------------------------


async def test_a_token_is_recorded_and_valid_until_exp_exactly(
    autojump_clock: trio.abc.Clock, key_dir: Path
) -> None:
    async with open_ring(key_dir) as ring:
        issued = await ring.tokens.issue(
            tenant_id=TENANT, session_id="s-1", room="visit-1", user=USER
        )
        claims = issued.claims
        assert (claims.nbf, claims.iat, claims.exp) == (WALL0 - 30, WALL0, WALL0 + 600)
        [row] = ring.store.tokens.values()
        assert (row.kid, row.session_id, row.room, str(row.jti)) == (
            "2026-a",
            "s-1",
            "visit-1",
            claims.jti,
        )
        await ring.at(599.999)
        assert (await ring.tokens.verify(issued.token, room="visit-1")).jti == claims.jti
        await ring.at(600.0)
        with pytest.raises(TokenExpired):
            await ring.tokens.verify(issued.token, room="visit-1")
        assert ring.stats().refused == {"expired": 1}


async def test_issuing_widens_nbf_by_the_measured_skew_and_stops_while_skewed(
    autojump_clock: trio.abc.Clock, key_dir: Path
) -> None:
    """Row 16 for join tokens: nbf is back-dated by nbf_skew_s plus the worst case of
    the clock monitor's latest reading (unknown_skew_s before one); a host whose clock
    is proven off by more than the limit issues nothing (ClockSkewed, typed)."""
    board = ClockBoard()
    async with open_ring(key_dir, skew=board, unknown_skew_s=0.5) as ring:
        before = await ring.tokens.issue(tenant_id=TENANT, session_id="s", room="r", user=USER)
        assert before.claims.nbf == WALL0 - 31  # 30 + 0.5 unknown, rounded down
        board.update(ClockReading(offset_s=-0.3, error_s=0.05, rtt_s=0.1,
                                  verdict=judge(-0.3, 0.05, 0.5), at=0.0, wall=WALL0))  # fmt: skip
        wide = await ring.tokens.issue(tenant_id=TENANT, session_id="s", room="r", user=USER)
        assert wide.claims.nbf == WALL0 - 31 and wide.claims.exp == WALL0 + 600
        board.update(ClockReading(offset_s=4.0, error_s=0.05, rtt_s=0.1,
                                  verdict=judge(4.0, 0.05, 0.5), at=1.0, wall=WALL0))  # fmt: skip
        with pytest.raises(ClockSkewed, match="off the database's"):
            await ring.tokens.issue(tenant_id=TENANT, session_id="s", room="r", user=USER)
        assert (ring.stats().issued, ring.stats().refused_skewed) == (2, 1)
        assert len(ring.store.tokens) == 2  # the refused one was never recorded
        board.update(ClockReading(offset_s=0.0, error_s=0.01, rtt_s=0.02,
                                  verdict=judge(0.0, 0.01, 0.5), at=2.0, wall=WALL0))  # fmt: skip
        back = await ring.tokens.issue(tenant_id=TENANT, session_id="s", room="r", user=USER)
        assert back.claims.nbf == WALL0 - 31  # 30.01 rounded down


async def test_a_revoked_jti_is_refused(autojump_clock: trio.abc.Clock, key_dir: Path) -> None:
    async with open_ring(key_dir) as ring:
        token = await _issue(ring)
        ring.store.revoked.add(next(iter(ring.store.tokens)))
        with pytest.raises(TokenRevoked, match="was revoked"):
            await ring.tokens.verify(token, room="visit-1")


async def test_verify_fails_closed_when_revocations_cannot_be_read(
    autojump_clock: trio.abc.Clock, key_dir: Path
) -> None:
    async with open_ring(key_dir) as ring:
        token = await _issue(ring)
        ring.store.down = True
        with pytest.raises(ProviderUnavailable):
            await ring.tokens.verify(token, room="visit-1")
        with pytest.raises(ProviderUnavailable):  # nothing is issued without its row
            await _issue(ring)
        assert ring.stats().issued == 1


# -- row 10: the spike, the rotation, the record ------------------------------------------------


def _detector() -> SpikeOverBaselineDetector:
    return SpikeOverBaselineDetector(
        "join_token_verify_failures", metric="triage_join_token_verify_failures_total",
        threshold=5.0, window_s=1.0, buckets=4, baseline_alpha=0.3, min_volume=4, row=10,
    )  # fmt: skip


def _forged(token: str) -> str:
    head, payload, _ = token.split(".")
    return f"{head}.{payload}.{'A' * 342}"


async def _spike(ring: Ring, detector: SpikeOverBaselineDetector, token: str) -> float:
    """One refusal per bucket for 2 s (the baseline, once ``token`` expired at 1 s), then a
    flood; when it fired."""
    for n in range(8):
        await ring.at(1.0 + 0.25 * n)
        with pytest.raises(TokenExpired):
            await ring.tokens.verify(token, room="visit-1")
        detector.evaluate()
    await ring.at(3.1)
    for _ in range(30):
        with pytest.raises(TokenForged):
            await ring.tokens.verify(_forged(token), room="visit-1", origin="203.0.113.7:5000")
    assert detector.evaluate().firing
    fired = trio.current_time()
    await trio.testing.wait_all_tasks_blocked()
    return fired


async def test_a_spike_rotates_the_key_revokes_its_tokens_and_writes_the_record(
    autojump_clock: trio.abc.Clock, key_dir: Path, pems: list[bytes]
) -> None:
    (key_dir / "2026-b.pem").write_bytes(pems[1])  # the spare
    detector = _detector()
    registry = CollectorRegistry()
    async with open_ring(
        key_dir, detector=detector, registry=registry, ttl_s=1.0, nbf_skew_s=0.5
    ) as ring:
        stale = await _issue(ring, session="old")  # expires at WALL0 + 1: refused "expired"
        live = await _issue(ring, session="s-2", room="visit-2")
        fired = await _spike(ring, detector, stale)

        stats = ring.stats()
        assert stats.retired == ("2026-a",) and stats.signing_kid == "2026-b"
        assert stats.rotations == 1 and stats.last_incident == 1
        [record] = ring.store.incidents
        assert record.kid == "2026-a" and record.new_kid == "2026-b"
        assert record.recorded_by == "replica-1/key_ring"
        assert record.detected_at == WALL0 + (fired - ring.t0)
        # The refusals of the detector's window (1 s): the flood and the baseline's last three.
        assert record.failures == {"bad_signature": 30, "expired": 3}
        assert record.origins == ["203.0.113.7:5000"]
        assert ring.store.revoked == set(ring.store.tokens)  # both tokens of 2026-a
        [notice] = [e for e in ring.events if isinstance(e, JoinKeyRotated)]
        assert (notice.kid, notice.new_kid, notice.revoked_tokens, notice.sessions) == (
            "2026-a",
            "2026-b",
            2,
            2,
        )
        assert notice.severity == "page" and notice.row == 10
        assert registry.get_sample_value("triage_join_key_rotations_total") == 1.0
        refusals = "triage_join_token_refusals_total"
        assert registry.get_sample_value(refusals, {"reason": "bad_signature"}) == 30.0
        assert registry.get_sample_value(refusals, {"reason": "expired"}) == 8.0
        assert registry.get_sample_value("triage_join_token_verify_failures_total") == 38.0

        assert {t.session_id for t in ring.store.tokens.values()} == {"old", "s-2"}
        assert live.count(".") == 2
        fresh = await ring.tokens.issue(
            tenant_id=TENANT, session_id="s-3", room="visit-3", user=USER
        )
        assert fresh.kid == "2026-b"
        assert (await ring.tokens.verify(fresh.token, room="visit-3")).session == "s-3"


async def test_no_spare_and_a_read_only_ring_means_nothing_signs(
    autojump_clock: trio.abc.Clock, key_dir: Path
) -> None:
    detector = _detector()
    async with open_ring(key_dir, detector=detector, ttl_s=1.0, nbf_skew_s=0.5) as ring:
        await _spike(ring, detector, await _issue(ring))
        assert ring.stats().state is KeyRingState.NO_SIGNING_KEY
        assert ring.store.incidents[0].new_kid is None
        with pytest.raises(SigningUnavailable):
            await _issue(ring)


async def test_no_spare_left_generates_a_new_key(
    autojump_clock: trio.abc.Clock, key_dir: Path
) -> None:
    detector = _detector()
    async with open_ring(
        key_dir, detector=detector, ttl_s=1.0, nbf_skew_s=0.5, generate_when_exhausted=True
    ) as ring:
        await _spike(ring, detector, await _issue(ring))
        new_kid = ring.store.incidents[0].new_kid
        assert new_kid is not None and new_kid.startswith("gen-")
        assert ring.stats().signing_kid == new_kid
        assert (key_dir / f"{new_kid}.pem").is_file()


async def test_a_rotation_the_database_refused_is_retried_at_the_next_reload(
    autojump_clock: trio.abc.Clock, key_dir: Path, pems: list[bytes]
) -> None:
    (key_dir / "2026-b.pem").write_bytes(pems[1])
    detector = _detector()
    async with open_ring(key_dir, detector=detector, ttl_s=1.0, nbf_skew_s=0.5) as ring:
        stale = await _issue(ring)
        ring.store.down = False
        original = ring.store.retire_and_revoke
        calls: list[float] = []

        async def refuse_once(record: IncidentRecord) -> IncidentResult:
            calls.append(trio.current_time())
            if len(calls) == 1:
                raise ProviderUnavailable("postgres: unavailable (test)")
            return await original(record)

        ring.store.retire_and_revoke = refuse_once  # type: ignore[method-assign]  # fault injection
        fired = await _spike(ring, detector, stale)
        assert ring.stats().retired == ()
        await ring.at(4.0)  # the next poll after the fire at 3.1
        assert calls == [fired, ring.t0 + 4.0]
        assert ring.stats().retired == ("2026-a",)


async def test_an_unknown_kid_flood_retires_the_signing_kid(
    autojump_clock: trio.abc.Clock, key_dir: Path, pems: list[bytes]
) -> None:
    (key_dir / "2026-b.pem").write_bytes(pems[1])
    async with open_ring(key_dir) as ring:
        import jwt

        foreign = jwt.encode({"room": "x"}, "k" * 40, algorithm="HS256", headers={"kid": "nope"})
        with pytest.raises(UnknownKeyId):
            await ring.tokens.verify(foreign, room="x")
        from actors.key_ring import Rotate

        await ring.ref.tell(Rotate(reason="test"))
        await trio.testing.wait_all_tasks_blocked()
        assert ring.store.incidents[0].kid == "2026-a"
        assert ring.store.incidents[0].failures == {"unknown_kid": 1}


async def test_the_revoked_tokens_of_a_rotation_do_not_rotate_the_next_key(
    autojump_clock: trio.abc.Clock, key_dir: Path, pems: list[bytes]
) -> None:
    (key_dir / "2026-b.pem").write_bytes(pems[1])
    async with open_ring(key_dir) as ring:
        token = await _issue(ring)
        from actors.key_ring import Rotate

        await ring.ref.tell(Rotate(reason="first"))
        await trio.testing.wait_all_tasks_blocked()
        assert ring.stats().retired == ("2026-a",)
        await ring.at(0.5)  # the old refusals left ... but a new flood of old tokens:
        for _ in range(20):
            with pytest.raises(TokenRevoked):
                await ring.tokens.verify(token, room="visit-1")
        await ring.ref.tell(Rotate(reason="second spike"))
        await trio.testing.wait_all_tasks_blocked()
        assert ring.stats().retired == ("2026-a",) and ring.stats().signing_kid == "2026-b"
        assert len(ring.store.incidents) == 1


def test_messages_are_frozen_structs() -> None:
    from actors.key_ring import Issue, Reload, Rotate, Verify

    for cls in (Issue, Reload, Rotate, Verify):
        assert issubclass(cls, msgspec.Struct) and cls.__struct_config__.frozen
