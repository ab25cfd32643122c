"""Scenario 10, join-token forged: a leaked signing key, and a flood of forged tokens.

The scenario owns its server (an embedded PostgreSQL, migrated, two tenants) and a
key directory of two RS256 keys, ``k-0001`` (signing) and ``k-0002`` (the spare),
and runs the key ring actor with the ``[tokens]`` section of the scenario config
(only ``key_dir`` is the scenario's) and row 10's detector
(``[detectors.join_token_verify_failures]`` if set).

1. N sessions each get a join token (``k-0001``), and each verifies.
2. Steady state: legitimate traffic -- tokens verified, and a trickle of honest
   mistakes (a token shown for the wrong room) that makes the detector's baseline.
3. Trigger, the KMS key leaked: an attacker signs with ``k-0001``'s private key.
   One such token has our claims and verifies (unauthorized entry); the rest of the
   attacker's probing fails -- tokens with the wrong audience (signed with the
   leaked key), others signed with a key of their own under our kid, and ``alg:
   none`` tokens.
4. The spike detector fires; its hook tells the ring to rotate.

Judged from outside, in the database (as the superuser) and by verifying again:

- detected: row 10's detector fired;
- mitigated: ``k-0001`` is retired and ``k-0002`` signs; every token ``k-0001``
  signed is revoked; the forensic record names the kid, who recorded it, the
  refusals by reason (the attacker's counted exactly) and the revoked sessions (all
  N); the attacker's token that verified before is refused now (``revoked``); each
  session gets a new token, which verifies;
- ``lost``: sessions without a live (unrevoked) token at the end;
  ``duplicates``: live tokens beyond one per session.
"""

from __future__ import annotations

import base64
import json
import socket
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import msgspec
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry

from actors.key_ring import (
    ROW,
    DbTokenStore,
    JoinKeyRotated,
    JoinTokens,
    KeyRingStatistics,
    key_ring_child,
)
from bench.chaos.fixtures import evaluate_every, wait_until
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from bench.chaos.postgres_rig import open_postgres
from config import engine_kwargs
from config.catalog import row_detector
from engine.detectors import SpikeOverBaselineDetector, make_detector
from engine.events import DetectorFired, Event, EventBus
from engine.runtime import open_runtime
from providers.bridge import run
from providers.join_tokens import JoinUser, TokenRefused, TokenRevoked

__all__ = ["DETECTOR_OVERRIDE", "ROW", "SCENARIO", "run_scenario"]

DETECTOR_OVERRIDE = "join_token_verify_failures"
LEAKED, SPARE = "k-0001", "k-0002"
MAILBOX = "key_ring"
ATTACK_REASONS = ("bad_signature", "wrong_audience", "algorithm_refused")


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def _database_view(url: str) -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
    conn = await asyncpg.connect(url)
    try:
        tokens = await conn.fetch("SELECT session_id, kid, revoked_at FROM join_tokens")
        incidents = await conn.fetch("SELECT * FROM join_token_incidents ORDER BY id")
        return list(tokens), list(incidents)
    finally:
        await conn.close()


class _Attacker:
    """Tokens an attacker makes with the leaked private key (and without it)."""

    def __init__(self, leaked: rsa.RSAPrivateKey, template: dict[str, Any]) -> None:
        self.leaked = leaked
        self.own = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.template = template

    def admitted(self) -> str:
        """The attacker got our claims right: this one verifies (before the rotation)."""
        claims = {**self.template, "jti": str(uuid.uuid4()), "session": "intruder"}
        return jwt.encode(claims, self.leaked, algorithm="RS256", headers={"kid": LEAKED})

    def wrong_audience(self) -> str:
        claims = {**self.template, "aud": "meet", "jti": str(uuid.uuid4())}
        return jwt.encode(claims, self.leaked, algorithm="RS256", headers={"kid": LEAKED})

    def bad_signature(self) -> str:
        return jwt.encode(self.template, self.own, algorithm="RS256", headers={"kid": LEAKED})

    def alg_none(self) -> str:
        header = _b64(json.dumps({"alg": "none", "typ": "JWT", "kid": LEAKED}).encode())
        return f"{header}.{_b64(json.dumps(self.template).encode())}."


async def run_scenario(ctx: ChaosContext) -> Outcome:
    config = ctx.config
    sessions = 20 if ctx.quick else 200
    fields = engine_kwargs(row_detector(config, ctx.catalog, ROW, DETECTOR_OVERRIDE))
    bus = EventBus()
    seen: list[Event] = []
    bus.on(Event, seen.append)
    detector = make_detector(DETECTOR_OVERRIDE, row=ROW, events=bus, **fields).expect(
        SpikeOverBaselineDetector
    )
    window_s = float(fields["window_s"])
    bucket_s = window_s / int(fields["buckets"])
    warm_s = window_s + bucket_s * (int(fields["min_volume"]) + 1)
    tick_s = config.daemon.detector_tick_s
    registry = CollectorRegistry()
    ledger = Ledger()
    notes: list[str] = []
    room = "visit-room"

    with tempfile.TemporaryDirectory(prefix="triage-join-keys-") as key_dir:
        leaked = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        spare = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (Path(key_dir) / f"{LEAKED}.pem").write_bytes(_pem(leaked))
        (Path(key_dir) / f"{SPARE}.pem").write_bytes(_pem(spare))
        tokens_config = msgspec.structs.replace(
            config.tokens, key_dir=key_dir, create_missing=False, generate_when_exhausted=False
        )
        async with open_postgres(tenants=2) as pg, open_runtime() as runtime:
            spec, ref = key_ring_child(
                store=DbTokenStore(pg.pool), config=tokens_config,
                mailbox=config.mailboxes[MAILBOX], shutdown_s=config.supervisors["default"].shutdown_s,
                detector=detector, registry=registry, events=bus,
                recorded_by=f"{socket.gethostname()}/key_ring", deadlines=runtime.deadlines,
            )  # fmt: skip
            service = JoinTokens(ref, timeout_s=tokens_config.ask_timeout_s)

            def stats() -> KeyRingStatistics:
                got: object = ref.statistics()
                assert isinstance(got, KeyRingStatistics)
                return got

            async def verify(token: str, for_room: str = room) -> str:
                """The refusal's reason, or "ok"."""
                try:
                    await service.verify(token, room=for_room, origin="198.51.100.9:443")
                except TokenRefused as exc:
                    return exc.reason
                return "ok"

            async with trio.open_nursery() as nursery:
                await nursery.start(spec.start)
                nursery.start_soon(evaluate_every, detector, tick_s)

                # 1. one token per session
                first: dict[str, str] = {}
                for n in range(sessions):
                    session = f"session-{n}"
                    issued = await service.issue(
                        tenant_id=pg.tenants[n % 2], session_id=session, room=room,
                        user=JoinUser(id=f"patient-{n}", name=f"Patient {n}"),
                    )  # fmt: skip
                    ledger.accept(session)
                    first[session] = issued.token
                admitted = Counter([await verify(t) for t in first.values()])
                notes.append(
                    f"{sessions} sessions issued under {LEAKED}, verified: {dict(admitted)}"
                )

                # 2. steady state: valid tokens, and a few shown for the wrong room
                tokens = list(first.values())
                started = trio.current_time()
                mistakes = 0
                while trio.current_time() - started < warm_s:
                    await verify(tokens[mistakes % len(tokens)])
                    await verify(tokens[mistakes % len(tokens)], "another-room")
                    mistakes += 1
                    await trio.sleep(bucket_s)

                # 3. the leak: one forgery that verifies, then the attacker's probing
                template = jwt.decode(tokens[0], options={"verify_signature": False})
                attacker = _Attacker(leaked, template)
                intruder = attacker.admitted()
                intruder_before = await verify(intruder)
                flood = 90 if ctx.quick else 300
                forged = Counter[str]()
                triggered = trio.current_time()
                for n in range(flood):
                    make = (attacker.bad_signature, attacker.wrong_audience, attacker.alg_none)[
                        n % 3
                    ]
                    forged[await verify(make())] += 1
                fired = await wait_until(lambda: stats().rotations >= 1, timeout_s=10 * window_s)
                intruder_after = await verify(intruder)
                old_after = Counter([await verify(t) for t in first.values()])

                # 4. legitimate sessions get a new token, under the spare
                for n in range(sessions):
                    session = f"session-{n}"
                    issued = await service.issue(
                        tenant_id=pg.tenants[n % 2], session_id=session, room=room,
                        user=JoinUser(id=f"patient-{n}", name=f"Patient {n}"),
                    )  # fmt: skip
                    if issued.kid == SPARE and await verify(issued.token) == "ok":
                        ledger.settle(session)
                final = stats()
                nursery.cancel_scope.cancel()
            rows, incidents = await run(_database_view, pg.admin_url)

    for row in rows:
        if row["revoked_at"] is None:
            ledger.receive(row["session_id"])
    leaked_live = sum(1 for r in rows if r["kid"] == LEAKED and r["revoked_at"] is None)
    rotated = [e for e in seen if isinstance(e, JoinKeyRotated)]
    alarms = [e for e in seen if isinstance(e, DetectorFired) and e.row == ROW]
    detect_s = alarms[0].at - triggered if alarms else None
    record_ok = False
    if len(incidents) == 1:
        record = incidents[0]
        failures = json.loads(record["failures"])
        revoked_sessions = {s["session_id"] for s in json.loads(record["sessions"])}
        record_ok = (
            record["kid"] == LEAKED
            and record["new_kid"] == SPARE
            and record["recorded_by"].endswith("/key_ring")
            # The refusals of the detector's window when it fired: the flood up to then.
            and all(0 < failures.get(r, 0) <= forged[r] for r in ATTACK_REASONS)
            and revoked_sessions == set(first)
            and record["revoked_tokens"] == sessions  # the intruder's token has no row
        )
        notes.append(f"forensic record: failures {failures}, {len(revoked_sessions)} sessions")
    mitigated = (
        fired
        and final.retired == (LEAKED,)
        and final.signing_kid == SPARE
        and leaked_live == 0
        and record_ok
        and intruder_before == "ok"
        and intruder_after == TokenRevoked.reason
        and old_after == Counter({TokenRevoked.reason: sessions})
        and len(rotated) == 1
        and rotated[0].severity == "page"
    )
    notes.append(
        f"attacker: {dict(forged)}; intruder before {intruder_before}, after {intruder_after};"
        f" old tokens after: {dict(old_after)}; retired {final.retired}, signing"
        f" {final.signing_kid}; {leaked_live} live {LEAKED} tokens"
    )
    return Outcome(
        detected=bool(alarms),
        detect_s=detect_s,
        mitigated=mitigated,
        ledger=ledger,
        notes=notes,
    )


SCENARIO = Scenario(ROW, run_scenario)
