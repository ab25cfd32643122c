"""The daemon with its backbone: services, migrations, the daemon role's pool, the probe.

In process, the daemon uses the session's servers (URLs through ``env``); as a
process with no URL at all, it starts (and stops) embedded PostgreSQL and NATS
itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import uuid
from functools import partial
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
import trio

from actors.alerts import ActiveAlerts
from actors.clock_monitor import Verdict
from actors.db_health import UNAVAILABLE, DbHealth, HealthState, unavailable
from actors.outbox_relay import RelayState
from actors.thread_service import CrossTenantParticipant, Participant
from config import engine_kwargs, load_config_text
from engine.actor import Overflow, actor_child
from engine.breaker import Breaker, CircuitState
from engine.errors import ProviderUnavailable
from engine.runtime import open_runtime
from engine.supervisor import Supervisor
from providers import jetstream
from providers.db.migrate import load_migrations
from providers.db.pool import DbPool, Pool
from providers.services import (
    ENV_NATS_URL,
    ENV_POSTGRES_REPLICA_URL,
    ENV_POSTGRES_URL,
    ENV_REDIS_URL,
)
from supervisors.daemon import Daemon
from supervisors.tree import DB_BREAKER, Readiness
from tests.supervisors.test_daemon import (
    DEV_TEXT,
    REPO,
    Lines,
    _config_file,
    dev_config,
    messages,
    shipped_catalog,
    start,
)


def service_env(postgres_url: str, nats_url: str) -> dict[str, str]:
    return {ENV_POSTGRES_URL: postgres_url, ENV_NATS_URL: nats_url}


VERSIONS = [m.version for m in load_migrations()]  # the shipped migrations, in order


async def _new_tenant(pool: Pool, owner_url: str) -> uuid.UUID:
    conn = await asyncpg.connect(owner_url)
    try:
        tenant: uuid.UUID = await conn.fetchval(
            "INSERT INTO tenants (name) VALUES ('t12') RETURNING id"
        )
        return tenant
    finally:
        await conn.close()


async def _whoami(pool: Pool) -> tuple[str, int]:
    async with pool.acquire() as conn:
        user = await conn.fetchval("SELECT current_user")
        versions = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        return str(user), int(versions)


async def test_the_daemon_migrates_then_serves_ready_as_the_daemon_role(
    postgres_url: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = dev_config()
    daemon = Daemon(
        config,
        shipped_catalog(),
        handle_signals=False,
        backbone=True,
        env=service_env(postgres_url, nats_url),
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            running = await start(nursery, daemon)
        backbone = daemon.backbone
        assert backbone is not None
        assert backbone.migrated == VERSIONS
        assert backbone.services.embedded == frozenset()
        async with httpx.AsyncClient(base_url=running.url) as client:
            readyz = await client.get("/readyz")
            assert (readyz.status_code, readyz.json()) == (200, {"status": "ready", "alerts": []})
            metrics = await client.get("/metrics")
            assert 'triage_supervisor_children{supervisor="root"} 30.0' in metrics.text
            assert 'triage_breaker_state{breaker="postgres_primary"} 0.0' in metrics.text
            assert 'triage_breaker_state{breaker="nats_publish"} 0.0' in metrics.text
            tree = daemon.tree
            assert tree is not None and tree.backbone_actors is not None
            actors = tree.backbone_actors
            assert actors.relay is not None
            assert [c.id for c in tree.root.which_children()] == [
                "recorder", "alerts", "detectors", "db_health", "db_writer", "relay", "idempotency",
                "inbox_consumer", "error_budget", "clock_monitor", "accept_commit",
                "outcome_commit", "receipt_commit", "channels",
                "dispatch_backlog", "bounce_tracker", "dlr_ingress", "push_feedback",
                "push_stale_sweep", "status_sweep", "dispatch_commands", "phi_scanner", "jitsi_pool",
                "key_ring", "recording_ingest", "erasure_saga", "clamd", "upload_admission", "scanner_pool",
                "http",
            ]  # fmt: skip
            # The virtual rooms (rows 4, 14): one supervisor, the fallback actor, the
            # pool and one poller per node of [jitsi] nodes.
            assert tree.virtual is not None
            assert [c.id for c in tree.virtual.supervisor.which_children()] == [
                "fallback_threads", "jitsi_pool",
                *(f"jitsi_node_{n.name}" for n in config.jitsi.nodes),
            ]  # fmt: skip
            # Rows 10 and 20: their detectors are evaluated, their doors mounted.
            assert [d.kind.value for d in tree.detectors.for_row(10)] == ["spike_over_baseline"]
            assert [d.kind.value for d in tree.detectors.for_row(20)] == ["count_in_window"]
            assert tree.join_tokens is not None and tree.recordings is not None
            refused = await client.post(
                "/v1/join-tokens/verify", json={"token": "x.y.z", "room": "r"}
            )
            assert (refused.status_code, refused.json()["error"]) == (401, "malformed")
            # End to end: an event committed to the outbox reaches JetStream through
            # the daemon's own relay, with the outbox id as its Nats-Msg-Id.
            # (The test task has no bridge loop: cross on the daemon's, through its pool.)
            event_id = await backbone.pool.run_unit(_commit_event, postgres_url)
            stored: list[jetstream.StoredMessage] = []
            for _ in range(200):  # up to 10 s
                stored = await backbone.pool.run_unit(_stream, backbone.nats, config.relay.stream)
                if stored:
                    break
                await trio.sleep(0.05)
            assert [m.msg_id for m in stored] == [str(event_id)]
            # Queries run as the daemon's role, never the owner URL's.
            assert await backbone.pool.run_unit(_whoami) == ("triage_daemon", len(VERSIONS))
            # The relay has a pool of its own, as the daemon's role too.
            assert backbone.relay_pool is not None and backbone.relay_pool is not backbone.pool
            assert await backbone.relay_pool.run_unit(_whoami) == ("triage_daemon", len(VERSIONS))
            assert actors.relay_pool is backbone.relay_pool
            relay = actors.relay.statistics()
            assert relay.state is RelayState.RELAYING and relay.published >= 1

            # Rows 12 and 16 on the daemon's pool: the clock monitor has read the
            # database's clock (same machine: in sync), the thread service refuses a
            # participant of another tenant.
            safeguards = tree.safeguards
            assert safeguards is not None
            for _ in range(100):  # the first reading runs as the monitor starts
                if safeguards.clock_board.reading is not None:
                    break
                await trio.sleep(0.05)
            reading = safeguards.clock_board.reading
            assert reading is not None and reading.verdict is Verdict.IN_SYNC
            metrics = await client.get("/metrics")
            assert "triage_clock_skew_seconds 0.0" in metrics.text
            tenant = await backbone.pool.run_unit(_new_tenant, postgres_url)
            thread = await safeguards.threads.create_thread(tenant)
            with pytest.raises(CrossTenantParticipant):
                await safeguards.threads.add_participant(
                    tenant, thread,
                    Participant(tenant_id=uuid.uuid4(), participant_id="x", role="patient"),
                )  # fmt: skip

            # The probe's breaker open: unready, named; closed again: ready.
            health = actors.db_health.statistics()
            assert health.probes >= 1 and health.failures == 0
            assert health.state is HealthState.AVAILABLE
            actors.db_breaker.force_open("test")
            readyz = await client.get("/readyz")
            assert readyz.status_code == 503
            assert readyz.json()["reason"] == UNAVAILABLE == "database unavailable"
            actors.db_breaker.reset("test")
            again = await client.get("/readyz")
            assert again.status_code == 200, again.text
        daemon.request_drain("test")
        with trio.fail_after(config.daemon.drain_s):
            await running.done.wait()
    assert running.code == 0
    assert backbone.pool.closed
    log = messages(caplog)
    assert "services: postgres=external nats=external redis=none" in log
    order = ["migrations applied", "database pool open", "ready", "drained", "database pool closed"]
    assert [m for m in log if m in order] == order
    assert log[-1] == "stopped"


async def test_a_second_start_finds_the_schema_up_to_date(
    postgres_url: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    for expected in (VERSIONS, []):
        daemon = Daemon(
            dev_config(),
            shipped_catalog(),
            handle_signals=False,
            backbone=True,
            env=service_env(postgres_url, nats_url),
        )
        daemon.request_drain("test")  # before the start: nothing starts, exit 0
        with trio.fail_after(10):
            assert await daemon.run() == 0
        assert daemon.backbone is None
        assert "start abandoned" in messages(caplog)
        caplog.clear()
        daemon = Daemon(
            dev_config(),
            shipped_catalog(),
            handle_signals=False,
            backbone=True,
            env=service_env(postgres_url, nats_url),
        )
        async with trio.open_nursery() as nursery:
            with trio.fail_after(30):
                running = await start(nursery, daemon)
            assert daemon.backbone is not None
            assert daemon.backbone.migrated == expected
            daemon.request_drain("test")
        assert running.code == 0
    assert "schema up to date" in messages(caplog)


async def test_a_role_that_sees_through_rls_is_refused(
    postgres_url: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    superuser = urlsplit(postgres_url).username or "postgres"
    text = re.sub(r"(?m)^port = 8080$", "port = 0", DEV_TEXT)
    text = text.replace('daemon_role = "triage_daemon"', f"daemon_role = {json.dumps(superuser)}")
    daemon = Daemon(
        load_config_text(text),
        shipped_catalog(),
        handle_signals=False,
        backbone=True,
        env=service_env(postgres_url, nats_url),
    )
    with trio.fail_after(30):
        assert await daemon.run() == 1
    refused = [r for r in caplog.records if r.getMessage().startswith("database role refused")]
    assert refused and refused[0].levelno == logging.CRITICAL
    assert f"role {superuser} cannot be trusted with tenant data" in refused[0].getMessage()
    assert "is a superuser" in refused[0].getMessage()
    log = messages(caplog)
    assert "ready" not in log and "http listening" not in log
    assert log[-1] == "stopped"


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_triage_run_without_urls_starts_and_stops_embedded_services(
    tmp_path: Path,
) -> None:
    config = _config_file(tmp_path)
    stderr = Lines()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in (ENV_POSTGRES_URL, ENV_NATS_URL, ENV_REDIS_URL):
        env.pop(name, None)
    command = [sys.executable, "-m", "supervisors.cli", "run", "--config", str(config)]
    async with trio.open_nursery() as nursery:
        began = trio.current_time()
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                command,
                cwd=REPO,
                env=env,
                check=False,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        )
        assert process.stderr is not None
        nursery.start_soon(stderr.read, process.stderr)
        with trio.fail_after(30):
            services = await stderr.wait_for(lambda e: e["msg"].startswith("services:"))
            listening = await stderr.wait_for(lambda e: e["msg"] == "http listening")
            url = f"http://127.0.0.1:{listening['port']}"
            async with httpx.AsyncClient(base_url=url) as client:
                while True:
                    try:
                        response = await client.get("/readyz")
                    except httpx.TransportError:
                        response = None
                    if response is not None and response.status_code == 200:
                        break
                    await trio.sleep(0.05)
                assert (await client.get("/metrics")).status_code == 200
        ready_s = trio.current_time() - began
        assert ready_s < 30
        assert services["msg"] == "services: postgres=embedded nats=embedded redis=none"
        pids: dict[str, int] = services["pids"]
        assert set(pids) == {"postgres", "nats"}
        assert all(_group_alive(pid) for pid in pids.values())
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(15):
            code = await process.wait()
    assert code == 0
    msgs = [json.loads(line)["msg"] for line in stderr.lines]
    order = ["migrations applied", "ready", "draining", "database pool closed", "stopped"]
    assert [m for m in msgs if m in order] == order
    assert "embedded services stopped" in msgs
    # Nothing the daemon started outlives it (each server leads its own process group).
    with trio.fail_after(5):
        for _ in range(100):
            if not any(_group_alive(pid) for pid in pids.values()):
                break
            await trio.sleep(0.05)
    assert not [name for name, pid in pids.items() if _group_alive(pid)]


class FlakyPool:
    """Stands in for a DbPool: ``SELECT 1`` fails while ``down``."""

    def __init__(self) -> None:
        self.down = True

    async def run_unit(self, fn: object, *args: object) -> object:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise ProviderUnavailable("postgres: unavailable (test)")
        return 1


async def test_the_probe_opens_its_breaker_and_readiness_names_the_database(
    autojump_clock: trio.abc.Clock,
) -> None:
    config = dev_config()
    async with open_runtime(seed=1) as runtime:
        pool = FlakyPool()
        breaker = Breaker(
            DB_BREAKER, **engine_kwargs(config.breakers[DB_BREAKER]), clock=runtime.clock
        )
        mailbox = config.mailboxes["monitor"]
        spec, probe = actor_child(
            "db_health",
            partial(DbHealth, cast(DbPool, pool), breaker, tick_s=1.0, timeout_s=5.0),
            capacity=mailbox.capacity,
            overflow=Overflow(mailbox.overflow),
            shutdown_s=1.0,
            deadlines=runtime.deadlines,
        )
        readiness = Readiness(ActiveAlerts())
        readiness.add_check(partial(unavailable, breaker))
        readiness.mark_running()
        assert readiness.readiness()[0]
        supervisor = Supervisor("test", [spec], runtime=runtime)
        async with trio.open_nursery() as nursery:
            t0 = trio.current_time()
            await nursery.start(supervisor.run)
            fail_max = config.breakers[DB_BREAKER].fail_max
            await trio.sleep(fail_max - 0.5)  # fail_max failed probes, one a second, from 0
            stats = probe.statistics()
            assert (stats.probes, stats.failures) == (fail_max, fail_max)
            assert stats.state is HealthState.UNAVAILABLE
            assert breaker.state is CircuitState.OPEN
            assert readiness.readiness() == (
                False,
                {"status": "not_ready", "reason": "database unavailable", "alerts": []},
            )
            pool.down = False
            await trio.sleep(config.breakers[DB_BREAKER].reset_timeout_s + 3.0)
            assert unavailable(breaker) is None  # closed again (two half-open probes passed)
            assert probe.statistics().state is HealthState.AVAILABLE
            assert readiness.readiness()[0]
            # Ticks exactly one a second: the probe at 0, then one per tick.
            assert probe.statistics().probes == int(trio.current_time() - t0) + 1
            nursery.cancel_scope.cancel()


async def _commit_event(_pool: object, url: str) -> int:
    """As the owner: a tenant and one outbox event (the trigger assigns id and seq)."""
    conn = await asyncpg.connect(url)
    try:
        tenant = uuid.uuid4()
        await conn.execute("INSERT INTO tenants (id, name) VALUES ($1, $2)", tenant, str(tenant))
        return int(
            await conn.fetchval(
                "INSERT INTO outbox (tenant_id, aggregate_type, aggregate_id, subject, payload)"
                " VALUES ($1, 'dispatch', 'd-1', 'triage.events.dispatch', '{}') RETURNING id",
                tenant,
            )
        )
    finally:
        await conn.close()


async def _stream(
    _pool: object, client: jetstream.JetStreamClient, stream: str
) -> list[jetstream.StoredMessage]:
    return await jetstream.read_stream(client, stream)


async def test_reads_fall_to_the_configured_replica_when_the_primary_is_gone(
    postgres_url: str, nats_url: str
) -> None:
    # The stand-in replica is the same database: what matters is which pool answers.
    env = {**service_env(postgres_url, nats_url), ENV_POSTGRES_REPLICA_URL: postgres_url}
    daemon = Daemon(dev_config(), shipped_catalog(), handle_signals=False, backbone=True, env=env)
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            running = await start(nursery, daemon)
        tree, backbone = daemon.tree, daemon.backbone
        assert tree is not None and tree.backbone_actors is not None
        assert backbone is not None and backbone.replica is not None
        actors = tree.backbone_actors
        assert await actors.db.read(_whoami) == ("triage_daemon", len(VERSIONS))
        assert actors.db_writer.statistics().replica_reads == 0
        actors.db_breaker.force_open("test: primary failed over")
        assert await actors.db.read(_whoami) == ("triage_daemon", len(VERSIONS))
        stats = actors.db_writer.statistics()
        assert (stats.replica_reads, stats.written, stats.backlog) == (1, 0, 0)
        actors.db_breaker.reset()
        daemon.request_drain("test")
    assert running.code == 0
    assert backbone.replica.closed
