"""The error-budget freeze at the daemon's start, on real PostgreSQL and NATS.

A start records the adapter sections it runs with; while more than half of a
30-day budget burned within 7 days, a start with changed adapters exits 2 with one
``config invalid`` line per changed section saying why, and starts with
``TRIAGE_BREAK_GLASS`` (recorded). The error-budget actor runs in the tree and
counts what the trigger sampled on ``triage_slo_events_total``.
"""

from __future__ import annotations

import logging
import re

import asyncpg
import httpx
import msgspec
import pytest
import trio

from actors.error_budget import BREAK_GLASS_ENV
from config.schema import TriageConfig
from providers.bridge import run
from supervisors.daemon import Daemon
from tests.supervisors.test_daemon import dev_config, messages, shipped_catalog, start
from tests.supervisors.test_daemon_services import service_env


def _fast(config: TriageConfig) -> TriageConfig:
    slo = msgspec.structs.replace(config.slo, rollup_interval_s=0.1, budget_interval_s=0.1)
    return msgspec.structs.replace(config, slo=slo)


async def _admin(url: str, sql: str) -> None:
    async def go() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    await run(go)


async def _serve_once(daemon: Daemon, want: str) -> str:
    """Start ``daemon``, wait (up to 5 s) for ``want`` on /metrics, drain it."""
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            running = await start(nursery, daemon)
        async with httpx.AsyncClient(base_url=running.url) as client:
            text = ""
            for _ in range(100):  # the gauges appear after the first recompute
                text = (await client.get("/metrics")).text
                if want in text:
                    break
                await trio.sleep(0.05)
        daemon.request_drain("test")
    return text


async def test_changed_adapters_are_refused_while_the_budget_is_frozen(
    bridge: object, postgres_url: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    env = service_env(postgres_url, nats_url)
    config = _fast(dev_config())
    first = Daemon(config, shipped_catalog(), source="a.toml", handle_signals=False,
                   backbone=True, env=env)  # fmt: skip
    metrics = await _serve_once(first, "triage_slo_budget_frozen 0.0")
    assert 'triage_slo_budget_burned_ratio{slo="dispatch_success"} 0.0' in metrics
    # A bad week: 10 failures in 1000 dispatches, twice the 99.5% budget.
    await _admin(
        postgres_url,
        "INSERT INTO slo_buckets (minute, slo, good, bad)"
        " VALUES (date_trunc('minute', now()), 'dispatch_success', 990, 10)",
    )
    changed = msgspec.structs.replace(
        config,
        providers=msgspec.structs.replace(
            config.providers,
            ghasi=msgspec.structs.replace(config.providers.ghasi, send_path="/api/v2/messages"),
        ),
    )
    caplog.clear()
    refused = Daemon(changed, shipped_catalog(), source="b.toml", handle_signals=False,
                     backbone=True, env=env)  # fmt: skip
    with trio.fail_after(30):
        assert await refused.run() == 2
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1, critical
    assert critical[0].startswith(
        "config invalid: b.toml: $.providers: changed while the error budget is frozen:"
        " dispatch_success burned 200% of its 30-day error budget in the 7 days to"
    )
    assert "daemon failed" not in messages(caplog)
    # The same adapters as the last start: allowed during the freeze.
    again = Daemon(config, shipped_catalog(), source="a.toml", handle_signals=False,
                   backbone=True, env=env)  # fmt: skip
    metrics = await _serve_once(again, "triage_slo_budget_frozen 1.0")
    worst = re.search(
        r'triage_slo_budget_worst_window_ratio\{slo="dispatch_success"\} (\S+)', metrics
    )
    assert worst is not None and float(worst[1]) == pytest.approx(2.0)
    # Break glass: the change starts, and the override is recorded.
    glass = Daemon(changed, shipped_catalog(), source="b.toml", handle_signals=False,
                   backbone=True, env={**env, BREAK_GLASS_ENV: "INC-7 Ghasi v1 retired"})  # fmt: skip
    await _serve_once(glass, "triage_slo_budget_frozen 1.0")
    assert "error-budget freeze overridden" in messages(caplog)

    async def overrides() -> list[str | None]:
        conn = await asyncpg.connect(postgres_url)
        try:
            rows = await conn.fetch("SELECT override FROM config_applied ORDER BY id")
            return [r["override"] for r in rows]
        finally:
            await conn.close()

    assert await run(overrides) == [None, "INC-7 Ghasi v1 retired"]
