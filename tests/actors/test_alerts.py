"""The alert sink: events from the bus become JSON log lines and the active-alert board."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry

from actors.alerts import ActiveAlerts, Alert, AlertEvent, AlertSink, AlertState, forward_events
from actors.templates import TemplateNotFound, TemplateRegistry
from engine.actor import ActorRef, Overflow, actor_child
from engine.detectors import GaugeSustainedDetector, make_detector
from engine.events import (
    ActorCrashed,
    ActorRestarted,
    BreakerStateChanged,
    DetectorCleared,
    DetectorFired,
    Event,
    Notice,
    SupervisorEscalated,
)
from engine.metrics import Metrics
from engine.runtime import Runtime, open_runtime
from engine.supervisor import Supervisor
from supervisors.logging import JsonFormatter

WALL = 1_767_225_600.0


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    async with open_runtime(seed=7, metrics=Metrics(CollectorRegistry()), wall=lambda: WALL) as rt:
        yield rt


class Sink:
    def __init__(self, runtime: Runtime, board: ActiveAlerts, ref: ActorRef[AlertEvent]) -> None:
        self.runtime = runtime
        self.board = board
        self.ref = ref

    def emit(self, event: Event) -> None:
        self.runtime.events.emit(event)

    async def settle(self) -> None:
        await trio.testing.wait_all_tasks_blocked()


async def start_sink(
    nursery: trio.Nursery,
    runtime: Runtime,
    *,
    capacity: int = 100,
    overflow: Overflow = Overflow.DROP_NEWEST,
) -> Sink:
    board = ActiveAlerts()
    spec, ref = actor_child(
        "alerts",
        partial(AlertSink, board),
        capacity=capacity,
        overflow=overflow,
        deadlines=runtime.deadlines,
        metrics=runtime.metrics,
        shutdown_s=1.0,
    )
    supervisor = Supervisor("test", [spec], runtime=runtime)
    await nursery.start(supervisor.run)
    forward_events(runtime.events, ref)
    return Sink(runtime, board, ref)


def json_line(record: logging.LogRecord) -> dict[str, Any]:
    line = JsonFormatter(lambda: WALL).format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert isinstance(parsed, dict)
    return parsed


def records(caplog: pytest.LogCaptureFixture, msg: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "triage.alerts" and r.getMessage() == msg]


async def test_detector_fired_logs_a_json_line_and_raises_an_alert(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="triage.alerts")
    async with trio.open_nursery() as nursery:
        sink = await start_sink(nursery, runtime)
        sink.emit(
            DetectorFired(
                at=12.5, wall=WALL - 1, detector="sms_errors", value=0.4, threshold=0.2, row=1
            )
        )
        await sink.settle()

        (record,) = records(caplog, "alert fired")
        assert record.levelno == logging.WARNING
        line = json_line(record)
        assert line["ts"] == WALL
        assert line["level"] == "warning"
        assert line["logger"] == "triage.alerts"
        assert line["msg"] == "alert fired"
        assert line["event"] == "DetectorFired"
        assert (line["detector"], line["row"], line["value"], line["threshold"]) == (
            "sms_errors",
            1,
            0.4,
            0.2,
        )
        assert (line["at"], line["wall"]) == (12.5, WALL - 1)

        assert sink.board.state("detector:sms_errors") is AlertState.FIRING
        (alert,) = sink.board.snapshot()
        assert alert == Alert(
            key="detector:sms_errors",
            kind="detector",
            name="sms_errors",
            row=1,
            since=12.5,
            since_wall=WALL - 1,
            value=0.4,
            threshold=0.2,
        )

        sink.emit(
            DetectorCleared(
                at=20.0, wall=WALL, detector="sms_errors", value=0.05, threshold=0.2, row=1
            )
        )
        await sink.settle()
        assert sink.board.state("detector:sms_errors") is AlertState.QUIET
        assert len(sink.board) == 0
        (cleared,) = records(caplog, "alert cleared")
        assert cleared.levelno == logging.INFO
        assert json_line(cleared)["value"] == 0.05
        nursery.cancel_scope.cancel()


async def test_refiring_keeps_the_original_since() -> None:
    board = ActiveAlerts()
    first = Alert(key="detector:d", kind="detector", name="d", since=1.0, since_wall=10.0)
    assert board.fire(first)
    again = Alert(
        key="detector:d", kind="detector", name="d", since=5.0, since_wall=50.0, value=3.0
    )
    assert not board.fire(again)
    (alert,) = board.snapshot()
    assert (alert.since, alert.since_wall, alert.value) == (1.0, 10.0, 3.0)
    assert board.clear("detector:d") == alert
    assert board.clear("detector:d") is None


async def test_breaker_alert_follows_its_state(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="triage.alerts")
    async with trio.open_nursery() as nursery:
        sink = await start_sink(nursery, runtime)

        def change(old: str, new: str, at: float) -> None:
            sink.emit(
                BreakerStateChanged(
                    at=at, wall=WALL, breaker="sms_primary", old=old, new=new, reason="test"
                )
            )

        change("closed", "open", 1.0)
        await sink.settle()
        (alert,) = sink.board.snapshot()
        assert (alert.key, alert.state, alert.since) == ("breaker:sms_primary", "open", 1.0)

        change("open", "half-open", 2.0)
        await sink.settle()
        (alert,) = sink.board.snapshot()
        assert (alert.state, alert.since) == ("half-open", 1.0)

        change("half-open", "closed", 3.0)
        await sink.settle()
        assert sink.board.snapshot() == ()
        levels = [r.levelno for r in records(caplog, "breaker state changed")]
        assert levels == [logging.WARNING, logging.WARNING, logging.INFO]
        assert json_line(records(caplog, "breaker state changed")[-1])["new"] == "closed"
        nursery.cancel_scope.cancel()


async def test_supervisor_events_are_log_lines_only(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="triage.alerts")
    async with trio.open_nursery() as nursery:
        sink = await start_sink(nursery, runtime)
        sink.emit(ActorCrashed(at=1.0, wall=WALL, supervisor="root", child="relay", error="boom"))
        sink.emit(
            ActorRestarted(
                at=1.5,
                wall=WALL,
                supervisor="root",
                child="relay",
                delay_s=0.5,
                restarts_in_period=1,
            )
        )
        sink.emit(SupervisorEscalated(at=2.0, wall=WALL, supervisor="root", reason="too many"))
        await sink.settle()
        assert len(sink.board) == 0
        crashed = json_line(records(caplog, "child crashed")[0])
        assert (crashed["level"], crashed["supervisor"], crashed["child"], crashed["error"]) == (
            "error",
            "root",
            "relay",
            "boom",
        )
        restarted = json_line(records(caplog, "child restarted")[0])
        assert (restarted["level"], restarted["delay_s"]) == ("warning", 0.5)
        escalated = json_line(records(caplog, "supervisor escalated")[0])
        assert (escalated["level"], escalated["reason"]) == ("critical", "too many")
        nursery.cancel_scope.cancel()


async def test_a_real_detector_reaches_the_board(runtime: Runtime) -> None:
    async with trio.open_nursery() as nursery:
        sink = await start_sink(nursery, runtime)
        detector = make_detector(
            "queue_depth",
            kind="gauge_sustained",
            metric="triage_scan_queue_depth",
            threshold=10.0,
            row=8,
            clock=runtime.clock,
            events=runtime.events,
            metrics=runtime.metrics,
        )
        gauge = detector.expect(GaugeSustainedDetector)
        gauge.set(50.0)
        detector.evaluate()
        await sink.settle()
        (alert,) = sink.board.snapshot()
        assert (alert.name, alert.row, alert.value, alert.threshold) == (
            "queue_depth",
            8,
            50.0,
            10.0,
        )
        gauge.set(1.0)
        detector.evaluate()
        await sink.settle()
        assert sink.board.snapshot() == ()
        nursery.cancel_scope.cancel()


async def test_a_full_mailbox_loses_events_without_blocking_the_emitter(runtime: Runtime) -> None:
    async with trio.open_nursery() as nursery:
        sink = await start_sink(nursery, runtime, capacity=2, overflow=Overflow.DROP_NEWEST)
        # No checkpoint in between: the sink, waiting in receive(), takes the first
        # event straight from the channel, two more fill the mailbox, two are dropped.
        for i in range(5):
            sink.emit(
                DetectorFired(at=float(i), wall=WALL, detector=f"d{i}", value=1.0, threshold=0.0)
            )
        assert sink.ref.dropped == 2
        await sink.settle()
        assert [a.name for a in sink.board.snapshot()] == ["d0", "d1", "d2"]
        nursery.cancel_scope.cancel()


async def test_a_rejecting_mailbox_is_counted_by_the_forwarder(runtime: Runtime) -> None:
    board = ActiveAlerts()
    _, ref = actor_child(
        "alerts", partial(AlertSink, board), capacity=1, overflow=Overflow.REJECT, shutdown_s=1.0
    )
    forwarder, unsubscribe = forward_events(runtime.events, ref)
    for i in range(3):  # nobody runs the sink: only the first fits
        runtime.events.emit(
            DetectorFired(at=float(i), wall=WALL, detector="d", value=1.0, threshold=0.0)
        )
    assert (forwarder.refused, ref.queued(), runtime.events.handler_errors) == (2, 1, 0)
    unsubscribe()
    runtime.events.emit(DetectorFired(at=9.0, wall=WALL, detector="d", value=1.0, threshold=0.0))
    assert forwarder.refused == 2


class Unrelated(Event, frozen=True):
    note: str


async def test_events_the_sink_does_not_handle_are_not_forwarded(runtime: Runtime) -> None:
    board = ActiveAlerts()
    _, ref = actor_child("alerts", partial(AlertSink, board), capacity=1, shutdown_s=1.0)
    forwarder, unsubscribe = forward_events(runtime.events, ref)
    runtime.events.emit(Unrelated(at=0.0, wall=WALL, note="x"))
    assert (ref.queued(), forwarder.refused) == (0, 0)
    unsubscribe()


class SpikeNotice(Notice, frozen=True):
    tenant: str
    action: str

    def alert_key(self) -> str:
        return f"spike:{self.tenant}"

    @property
    def resolved(self) -> bool:
        return self.action == "lifted"


async def test_a_page_notice_holds_the_board_until_resolved_a_ticket_is_a_log_line(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="triage.alerts")
    async with trio.open_nursery() as nursery:
        sink = await start_sink(nursery, runtime)
        sink.emit(SpikeNotice(at=1.0, wall=WALL, severity="ticket", row=2, tenant="t", action="x"))
        await sink.settle()
        assert len(sink.board) == 0
        assert json_line(records(caplog, "notice")[0])["tenant"] == "t"
        sink.emit(SpikeNotice(at=2.0, wall=WALL, severity="page", row=3, tenant="a", action="on"))
        await sink.settle()
        (alert,) = sink.board.snapshot()
        assert (alert.key, alert.kind, alert.name, alert.row, alert.state) == (
            "notice:spike:a", "notice", "SpikeNotice", 3, "page"
        )  # fmt: skip
        assert json_line(records(caplog, "page")[0])["level"] == "critical"
        sink.emit(
            SpikeNotice(at=3.0, wall=WALL, severity="info", row=3, tenant="a", action="lifted")
        )
        await sink.settle()
        assert len(sink.board) == 0
        assert records(caplog, "notice resolved")
        nursery.cancel_scope.cancel()


async def test_a_missing_template_is_logged_as_a_row_19_ticket(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="triage.alerts")
    registry = TemplateRegistry(
        None,  # type: ignore[arg-type]  # never reaches the database here
        ttl_s=1.0,
        max_entries=1,
        events=runtime.events,
        clock=runtime.clock,
    )
    async with trio.open_nursery() as nursery:
        sink = await start_sink(nursery, runtime)
        registry.not_found(TemplateNotFound("t-1", "reminder", 3), channel="sms")
        await sink.settle()
        assert len(sink.board) == 0  # a ticket is a log line, not a held alert
        (record,) = records(caplog, "notice")
        line = json_line(record)
        assert (line["tenant"], line["template"], line["version"], line["channel"]) == (
            "t-1", "reminder", 3, "sms"
        )  # fmt: skip
        assert (line["severity"], line["row"]) == ("ticket", 19)
        nursery.cancel_scope.cancel()
