"""Row 11 on real PostgreSQL: the guard's trip (halt, retire, incident) and the PII scanner."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, cast

import msgspec
import pytest
import trio

from actors.dispatcher import CategoryDisabled, PhiRefused
from actors.phi_guard import SCAN, PhiLeak, PhiScanner, ScanMemory
from actors.phi_rules import phi_rules
from config.schema import PhiConfig
from engine.errors import ProviderUnavailable
from engine.events import Event
from providers.channel import ChannelName
from providers.db.templates import TemplateRow, put_template_async
from tests.actors.test_dispatcher import (
    PushAdapter,
    World,
    admin,
    dispatcher,
    failover,
    row,
    service,
    sms,
    world,
)

__all__ = ["world"]  # the fixture, shared with the dispatcher's tests

PHI = PhiConfig(fields=["diagnosis"], patterns={"ssn": r"\b\d{3}-\d{2}-\d{4}\b"})
RULES = phi_rules(PHI)


def _collect(world: World) -> list[PhiLeak]:
    leaks: list[PhiLeak] = []

    def on(event: Event) -> None:
        if isinstance(event, PhiLeak):
            leaks.append(event)

    world.bus.on(Event, on)
    return leaks


async def test_a_trip_halts_the_category_retires_the_version_and_records_the_incident(
    world: World,
) -> None:
    leaks = _collect(world)
    await world.db.run_unit(
        put_template_async,
        TemplateRow(world.tenant, "ping2", 1, "push", "reminders", None, "Hello {topic}"),
        True,
    )
    fcm = PushAdapter("fcm")
    p = dispatcher(world, ChannelName.PUSH, {"fcm": failover(fcm)})
    s = dispatcher(world, ChannelName.SMS, {"default": failover(PushAdapter("ghasi"))})
    svc = service(world, p, s, phi=PHI)
    push: dict[str, Any] = {"channel": "push", "template": "ping", "recipient": "fcm:t"}
    async with trio.open_nursery() as nursery:
        await nursery.start(p.spec.start)
        with pytest.raises(PhiRefused) as refused:
            await svc.submit(sms(world, "k1", data={"topic": "ssn 123-45-6789"}, **push))
        # The category is halted for the tenant: another template of it is refused too.
        with pytest.raises(CategoryDisabled):
            await svc.submit(sms(world, "k2", data={"topic": "x"}, **{**push, "template": "ping2"}))
        nursery.cancel_scope.cancel()
    assert fcm.sent == []  # nothing with PHI left
    did = refused.value.dispatch_id
    assert did is not None
    assert ((await row(world, did))["reason"]) == "phi_guard"
    [block] = await admin(world.admin_url, "SELECT * FROM category_blocks")
    assert (str(block["tenant_id"]), block["channel"], block["category"]) == (
        world.tenant, "push", "reminders",
    )  # fmt: skip
    assert (block["state"], block["reason"]) == ("disabled", "phi_guard")
    [template] = await admin(
        world.admin_url, "SELECT * FROM templates WHERE name = 'ping' AND version = 1"
    )
    assert template["retired_at"] is not None and not template["active"]
    assert template["retired_reason"] == "phi_guard: pattern:ssn"
    [incident] = await admin(world.admin_url, "SELECT * FROM incidents")
    assert (incident["source"], incident["ref"]) == ("push_guard", f"dispatch:{did}")
    assert (incident["template"], incident["template_version"]) == ("ping", 1)
    assert (incident["rule"], incident["location"]) == (
        "pattern:ssn",
        "body",
    )  # rendered: body first
    assert "123-45-6789" not in incident["excerpt"] and "[redacted]" in incident["excerpt"]
    assert [(e.source, e.rule, e.severity) for e in leaks] == [
        ("push_guard", "pattern:ssn", "page")
    ]
    assert "123-45-6789" not in str(leaks[0])


def _scanner(world: World, files: list[str], memory: ScanMemory, **kw: Any) -> PhiScanner:
    return PhiScanner(
        world.db, RULES, memory=memory, log_files=files, interval_s=1.0,
        max_bytes=kw.pop("max_bytes", 1 << 16), max_letters=kw.pop("max_letters", 10),
        scan_dead_letters=True, registry=world.metrics, events=world.bus, **kw,
    )  # fmt: skip


def _line(**entry: Any) -> bytes:
    return msgspec.json.encode({"ts": 1.0, "level": "info", "logger": "x", **entry}) + b"\n"


async def test_the_scanner_finds_pages_once_and_follows_rotation(
    world: World, tmp_path: Path
) -> None:
    leaks = _collect(world)
    path = tmp_path / "daemon.jsonl"
    path.write_bytes(
        _line(msg="clean")
        + _line(msg="x", diagnosis="flu", tenant=world.tenant)
        + b"plain text ssn 123-45-6789\n"
        + b'{"msg": "half a line", "diagnosis": "'  # no newline yet: not read this turn
    )
    memory = ScanMemory()
    scanner = _scanner(world, [str(path)], memory)
    await scanner.handle(SCAN)
    assert (memory.lines, memory.finds, memory.new_finds) == (3, 2, 2)
    incidents = await admin(world.admin_url, "SELECT * FROM incidents ORDER BY id")
    assert [(i["source"], i["rule"]) for i in incidents] == [
        ("log", "field:diagnosis"), ("log", "pattern:ssn"),
    ]  # fmt: skip
    assert str(incidents[0]["tenant_id"]) == world.tenant and incidents[1]["tenant_id"] is None
    assert all("flu" not in i["excerpt"] and "6789" not in i["excerpt"] for i in incidents)
    assert world.metrics.get_sample_value("triage_phi_guard_hits_total", {"source": "log"}) == 2

    with path.open("ab") as file:  # the half line completes
        file.write(b'asthma"}\n')
    await scanner.handle(SCAN)
    assert (memory.lines, memory.new_finds) == (4, 3)
    await scanner.handle(SCAN)  # nothing new
    assert (memory.lines, memory.new_finds) == (4, 3)

    # A restarted daemon (no memory) reads the file again: recorded before, paged never again.
    again = ScanMemory()
    await _scanner(world, [str(path)], again).handle(SCAN)
    assert (again.finds, again.new_finds) == (3, 0)
    assert len(leaks) == 3

    # Rotation: a new file at the path (another inode) is read from its start.
    os.rename(path, tmp_path / "daemon.jsonl.1")
    path.write_bytes(_line(msg="after rotation", diagnosis="gout"))
    await scanner.handle(SCAN)
    assert (memory.rotations, memory.new_finds) == (1, 4)
    assert len(leaks) == 4 and all("gout" not in e.excerpt for e in leaks)


async def test_the_scanner_reads_a_bounded_chunk_per_turn(world: World, tmp_path: Path) -> None:
    path = tmp_path / "daemon.jsonl"
    lines = [_line(msg=f"line {n}") for n in range(10)]
    path.write_bytes(b"".join(lines))
    memory = ScanMemory()
    scanner = _scanner(world, [str(path)], memory, max_bytes=2 * len(lines[0]) + 1)
    await scanner.handle(SCAN)
    assert (memory.lines, memory.bytes_read) == (2, 2 * len(lines[0]))
    for _ in range(4):
        await scanner.handle(SCAN)
    assert memory.lines == 10
    await scanner.handle(SCAN)
    assert memory.lines == 10 and memory.finds == 0


async def test_the_scanner_reads_the_dead_letters(world: World, tmp_path: Path) -> None:
    for payload in (b'{"ok": 1}', msgspec.json.encode({"note": "ssn 123-45-6789"}), b"\xff raw"):
        await admin(
            world.admin_url,
            "INSERT INTO dead_letters (tenant_id, source, ref, payload, error)"
            " VALUES ($1, 'test', $2, $3, 'e')",
            uuid.UUID(world.tenant), uuid.uuid4().hex, payload,
        )  # fmt: skip
    memory = ScanMemory()
    scanner = _scanner(world, [], memory, max_letters=2)
    await scanner.handle(SCAN)
    await scanner.handle(SCAN)
    assert (memory.letters, memory.new_finds) == (3, 1)
    [incident] = await admin(world.admin_url, "SELECT * FROM incidents")
    assert incident["source"] == "dlq" and str(incident["tenant_id"]) == world.tenant
    assert incident["ref"] == f"dlq:{memory.last_letter_id - 1}"
    assert "6789" not in incident["excerpt"]
    assert world.metrics.get_sample_value("triage_phi_guard_hits_total", {"source": "dlq"}) == 1


class _RefusingDb:
    """The guard's database when the trip cannot be written: the primary is gone."""

    async def run_unit(self, fn: Any, *args: Any) -> Any:
        raise ProviderUnavailable("postgres down")


async def test_the_guard_fails_closed_when_the_trip_cannot_be_written(world: World) -> None:
    fcm = PushAdapter("fcm")
    p = dispatcher(world, ChannelName.PUSH, {"fcm": failover(fcm)})
    svc = service(world, p, phi=PHI)
    assert svc.phi_guard is not None
    svc.phi_guard.db = cast("Any", _RefusingDb())
    push: dict[str, Any] = {"channel": "push", "template": "ping", "recipient": "fcm:t"}
    async with trio.open_nursery() as nursery:
        await nursery.start(p.spec.start)
        with pytest.raises(ProviderUnavailable):
            await svc.submit(sms(world, "k1", data={"topic": "ssn 123-45-6789"}, **push))
        nursery.cancel_scope.cancel()
    # Nothing stored, nothing sent; still counted (the page goes out).
    assert fcm.sent == []
    assert await admin(world.admin_url, "SELECT id FROM dispatches") == []
    hits = world.metrics.get_sample_value("triage_phi_guard_hits_total", {"source": "push_guard"})
    assert hits == 1
