"""The template registry on real PostgreSQL: cached lookups, strict rendering, row 19."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
import trio
from prometheus_client import CollectorRegistry
from trio.testing import MockClock

from actors.templates import (
    NOTICE_KIND,
    MissingField,
    TemplateMissing,
    TemplateNotFound,
    TemplateRegistry,
    TemplateRenderError,
)
from config.schema import DatabaseConfig
from engine.detectors import CountInWindowDetector
from engine.events import Event, EventBus, Notice
from providers.bridge import run
from providers.db import DAEMON_ROLE, migrate
from providers.db.pool import DbPool, open_pool
from providers.db.templates import TemplateRow, put_template_async
from providers.services import postgres_url_with

DB_CONFIG = DatabaseConfig(pool_min=1, pool_max=2, connect_timeout_s=2.0, command_timeout_s=2.0)


async def _tenant(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return str(await conn.fetchval("INSERT INTO tenants (name) VALUES ('t') RETURNING id"))
    finally:
        await conn.close()


@pytest.fixture
async def world(bridge: object, postgres_url: str) -> AsyncIterator[tuple[DbPool, str]]:
    await migrate(postgres_url)
    tenant = await run(_tenant, postgres_url)
    async with open_pool(
        postgres_url_with(postgres_url, user=DAEMON_ROLE), DB_CONFIG, close_s=2.0
    ) as db:
        yield db, tenant


def row(tenant: str, version: int, body: str, **kw: str) -> TemplateRow:
    return TemplateRow(
        tenant_id=tenant,
        name=kw.get("name", "reminder"),
        version=version,
        channel="sms",
        category="reminders",
        subject=kw.get("subject"),
        body=body,
    )


async def test_lookup_active_and_versions_cached_with_ttl(
    world: tuple[DbPool, str], mock_clock: MockClock
) -> None:
    db, tenant = world
    await db.run_unit(put_template_async, row(tenant, 1, "v1 {time}"), True)
    await db.run_unit(put_template_async, row(tenant, 2, "v2 {time}"), False)
    registry = TemplateRegistry(db, ttl_s=60.0, max_entries=10)
    active = await registry.lookup(tenant, "reminder")
    assert (active.version, active.body, active.category) == (1, "v1 {time}", "reminders")
    assert (await registry.lookup(tenant, "reminder", 2)).body == "v2 {time}"
    assert (registry.hits, registry.misses) == (0, 2)
    # v2 becomes active in the database; the cache answers v1 until its TTL passes.
    await db.run_unit(put_template_async, row(tenant, 3, "v3 {time}"), True)
    assert (await registry.lookup(tenant, "reminder")).version == 1
    assert registry.hits == 1
    mock_clock.jump(60.0)
    assert (await registry.lookup(tenant, "reminder")).version == 3
    assert registry.misses == 3
    assert registry.invalidate(tenant) == 2 and registry.size == 0


async def test_cache_is_bounded_lru(world: tuple[DbPool, str]) -> None:
    db, tenant = world
    for name in ("a", "b", "c"):
        await db.run_unit(put_template_async, row(tenant, 1, name, name=name), True)
    registry = TemplateRegistry(db, ttl_s=60.0, max_entries=2)
    for name in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" comes
        await registry.lookup(tenant, name)
    assert registry.size == 2
    misses = registry.misses
    await registry.lookup(tenant, "a")
    assert registry.misses == misses
    await registry.lookup(tenant, "b")
    assert registry.misses == misses + 1


async def test_missing_template_is_typed_and_negative_cached(
    world: tuple[DbPool, str], mock_clock: MockClock
) -> None:
    db, tenant = world
    registry = TemplateRegistry(db, ttl_s=60.0, negative_ttl_s=5.0, max_entries=10)
    with pytest.raises(TemplateNotFound) as caught:
        await registry.lookup(tenant, "nope", 4)
    assert (caught.value.name, caught.value.version) == ("nope", 4)
    assert "version 4" in str(caught.value)
    with pytest.raises(TemplateNotFound):
        await registry.lookup(tenant, "nope", 4)
    assert registry.misses == 1  # remembered for negative_ttl_s
    mock_clock.jump(5.0)
    await db.run_unit(put_template_async, row(tenant, 4, "now here", name="nope"), False)
    assert (await registry.lookup(tenant, "nope", 4)).body == "now here"


async def test_not_found_counts_alerts_and_builds_the_notice() -> None:
    registry_metrics = CollectorRegistry()
    bus = EventBus()
    seen: list[Event] = []
    bus.on(TemplateMissing, seen.append)
    detector = CountInWindowDetector(
        "template_not_found", metric="triage_template_not_found_total", threshold=0,
        window_s=300.0, buckets=10,
    )  # fmt: skip
    registry = TemplateRegistry(
        None,  # type: ignore[arg-type]  # never reaches the database here
        ttl_s=1.0,
        max_entries=1,
        registry=registry_metrics,
        events=bus,
        detector=detector,
    )
    error = TemplateNotFound("t-1", "reminder", 3)
    notice = registry.notice_for(error, channel="sms", dispatch_id="d-1")
    assert notice == {
        "kind": NOTICE_KIND,
        "tenant": "t-1",
        "template": "reminder",
        "version": 3,
        "channel": "sms",
        "dispatch_id": "d-1",
    }
    registry.not_found(error, channel="sms")
    assert (
        registry_metrics.get_sample_value("triage_template_not_found_total", {"channel": "sms"})
        == 1
    )
    [event] = seen
    assert isinstance(event, TemplateMissing)
    assert (event.tenant, event.template, event.version, event.row) == ("t-1", "reminder", 3, 19)
    assert isinstance(event, Notice) and event.severity == "ticket" and not event.resolved
    assert event.alert_key() == "template_missing:t-1:reminder"
    assert detector.evaluate().firing


def test_render_is_strict() -> None:
    template = TemplateRow("t", "reminder", 1, "email", "default", "Hi {name}", "At {time}.")
    rendered = TemplateRegistry.render(template, {"name": "Ann", "time": "10:00", "extra": "x"})
    assert (rendered.subject, rendered.body) == ("Hi Ann", "At 10:00.")
    with pytest.raises(MissingField) as caught:
        TemplateRegistry.render(template, {"name": "Ann"})
    assert caught.value.field == "time" and "missing field 'time'" in str(caught.value)
    broken = TemplateRow("t", "broken", 1, "sms", "default", None, "At {time")
    with pytest.raises(TemplateRenderError):
        TemplateRegistry.render(broken, {"time": "1"})
    # a value is inserted as it is, never formatted again
    assert TemplateRegistry.render(template, {"name": "{time}", "time": "1"}).subject == "Hi {time}"


async def test_bad_config_refused() -> None:
    with pytest.raises(ValueError):
        TemplateRegistry(None, ttl_s=0.0, max_entries=1)  # type: ignore[arg-type]
    await trio.lowlevel.checkpoint()
