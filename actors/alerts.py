"""The alert sink: engine events in, structured log lines and the active alerts out.

Detectors, breakers and supervisors publish on the runtime's
:class:`~engine.events.EventBus`; :func:`forward_events` hands every event the
sink cares about to the :class:`AlertSink` actor without blocking the emitter
(the sink's bounded mailbox decides what a burst loses: with ``drop_newest``
the newest events, counted in the ref's ``dropped``). The sink turns each event
into one log line on the ``triage.alerts`` logger, whose fields are the event's
own (``detector``, ``row``, ``value``, ``threshold``, ``breaker``, ``child``,
...), and keeps the :class:`ActiveAlerts` board up to date.

The board is the sink's whole state, and it lives outside the actor: it is
created once by the daemon and passed in, so it survives a restart of the sink
exactly as the mailbox does, and ``/readyz`` can show it without reaching into
the actor. Each alert's lifecycle is the two-state machine of
:class:`AlertState`::

    event                          alert key              state after
    DetectorFired(detector=d)      detector:d             FIRING
    DetectorCleared(detector=d)    detector:d             QUIET (removed)
    BreakerStateChanged(new=s)     breaker:b              FIRING if s is open,
                                                          half-open or forced-open;
                                                          else QUIET (removed)

A :class:`~engine.events.Notice` (an actor's own alert: a throttled category,
a forced refresh) is logged; a ``page`` notice also fires ``notice:<key>`` until
a notice with the same key is ``resolved``.

Crashes, restarts and escalations are log lines only (``error``, ``warning``,
``critical``): a restart is over when it is logged, and an escalation ends in
the parent supervisor, which logs its own events.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from typing import Final

import msgspec

from engine.actor import Actor, ActorRef
from engine.errors import ActorStopped, MailboxFull
from engine.events import (
    ActorCrashed,
    ActorRestarted,
    BreakerStateChanged,
    DetectorCleared,
    DetectorFired,
    Event,
    EventBus,
    Notice,
    SupervisorEscalated,
)

__all__ = [
    "ALERT_EVENTS",
    "ActiveAlerts",
    "Alert",
    "AlertEvent",
    "AlertSink",
    "AlertState",
    "EventForwarder",
    "forward_events",
]

#: The messages the sink handles: the engine's own events.
AlertEvent = (
    DetectorFired
    | DetectorCleared
    | BreakerStateChanged
    | ActorCrashed
    | ActorRestarted
    | SupervisorEscalated
    | Notice
)
ALERT_EVENTS: Final = (
    DetectorFired,
    DetectorCleared,
    BreakerStateChanged,
    ActorCrashed,
    ActorRestarted,
    SupervisorEscalated,
    Notice,
)

#: Breaker states (``engine.breaker.CircuitState`` values) in which calls are refused
#: or only probed: an alert stays active in these.
BREAKER_ALERT_STATES: Final = frozenset({"open", "half-open", "forced-open"})


class AlertState(enum.Enum):
    QUIET = "quiet"
    FIRING = "firing"


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    """One active alert, as ``/readyz`` shows it.

    ``since`` is the Trio time and ``since_wall`` the wall-clock time of the event
    that raised it. A detector alert carries ``value`` and ``threshold``; a
    breaker alert carries its ``state``.
    """

    key: str
    kind: str
    name: str
    row: int | None = None
    since: float
    since_wall: float
    value: float | None = None
    threshold: float | None = None
    state: str | None = None


class ActiveAlerts:
    """The alerts firing now, by key. Written by the sink, read by anyone."""

    __slots__ = ("_alerts",)

    def __init__(self) -> None:
        self._alerts: dict[str, Alert] = {}

    def state(self, key: str) -> AlertState:
        return AlertState.FIRING if key in self._alerts else AlertState.QUIET

    def fire(self, alert: Alert) -> bool:
        """Record ``alert`` as firing; True if it was quiet before."""
        new = alert.key not in self._alerts
        if new:
            self._alerts[alert.key] = alert
        else:
            # Keep the original ``since``: the alert has been firing since then.
            since = self._alerts[alert.key]
            self._alerts[alert.key] = msgspec.structs.replace(
                alert, since=since.since, since_wall=since.since_wall
            )
        return new

    def clear(self, key: str) -> Alert | None:
        """Remove the alert ``key``; returns it, or None if it was not firing."""
        return self._alerts.pop(key, None)

    def snapshot(self) -> tuple[Alert, ...]:
        """The firing alerts, oldest first."""
        return tuple(sorted(self._alerts.values(), key=lambda a: (a.since, a.key)))

    def __len__(self) -> int:
        return len(self._alerts)

    def __contains__(self, key: object) -> bool:
        return key in self._alerts


def _fields(event: Event) -> dict[str, object]:
    """The event as log-record extras: its own fields plus its type."""
    fields: dict[str, object] = {"event": type(event).__name__}
    fields.update(msgspec.structs.asdict(event))
    return fields


class AlertSink(Actor[AlertEvent]):
    """Logs every engine event it is told and keeps the :class:`ActiveAlerts` board."""

    name = "alerts"

    def __init__(self, board: ActiveAlerts, log: logging.Logger | None = None) -> None:
        self.board = board
        self.log = log if log is not None else logging.getLogger("triage.alerts")

    async def handle(self, message: AlertEvent) -> None:
        log, board = self.log, self.board
        match message:
            case DetectorFired(detector=name):
                board.fire(
                    Alert(
                        key=f"detector:{name}",
                        kind="detector",
                        name=name,
                        row=message.row,
                        since=message.at,
                        since_wall=message.wall,
                        value=message.value,
                        threshold=message.threshold,
                    )
                )
                log.warning("alert fired", extra=_fields(message))
            case DetectorCleared(detector=name):
                board.clear(f"detector:{name}")
                log.info("alert cleared", extra=_fields(message))
            case BreakerStateChanged(breaker=name, new=new):
                key = f"breaker:{name}"
                if new in BREAKER_ALERT_STATES:
                    board.fire(
                        Alert(
                            key=key,
                            kind="breaker",
                            name=name,
                            since=message.at,
                            since_wall=message.wall,
                            state=new,
                        )
                    )
                    log.warning("breaker state changed", extra=_fields(message))
                else:
                    board.clear(key)
                    log.info("breaker state changed", extra=_fields(message))
            case ActorCrashed():
                log.error("child crashed", extra=_fields(message))
            case ActorRestarted():
                log.warning("child restarted", extra=_fields(message))
            case SupervisorEscalated():
                log.critical("supervisor escalated", extra=_fields(message))
            case Notice():
                key = f"notice:{message.alert_key()}"
                if message.resolved:
                    board.clear(key)
                    log.info("notice resolved", extra=_fields(message))
                elif message.severity == "page":
                    board.fire(
                        Alert(
                            key=key,
                            kind="notice",
                            name=type(message).__name__,
                            row=message.row,
                            since=message.at,
                            since_wall=message.wall,
                            state=message.severity,
                        )
                    )
                    log.critical("page", extra=_fields(message))
                else:
                    log.warning("notice", extra=_fields(message))


class EventForwarder:
    """The bus handler that tells the sink every alert event, never blocking.

    ``refused`` counts events the sink's mailbox refused (a ``reject`` or
    ``wait`` mailbox that is full) or that arrived after it stopped; events a
    ``drop_newest`` mailbox drops are counted in the ref's ``dropped``.
    """

    __slots__ = ("_ref", "refused")

    def __init__(self, ref: ActorRef[AlertEvent]) -> None:
        self._ref = ref
        self.refused = 0

    def __call__(self, event: Event) -> None:
        if not isinstance(event, ALERT_EVENTS):
            return
        try:
            self._ref.tell_nowait(event)
        except (MailboxFull, ActorStopped):
            self.refused += 1


def forward_events(
    bus: EventBus, ref: ActorRef[AlertEvent]
) -> tuple[EventForwarder, Callable[[], None]]:
    """Forward the bus's alert events to the sink at ``ref``; returns the forwarder and an unsubscribe."""
    forwarder = EventForwarder(ref)
    return forwarder, bus.on(Event, forwarder)
