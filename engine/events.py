"""The event bus: state changes as typed, immutable events.

Breakers, supervisors, bulkheads and detectors publish here; mitigations, the
alert sink, logs and tests subscribe. Emitting never blocks and never raises:
a slow subscriber loses events (counted in ``dropped``), it never slows the
emitter. Handlers registered with :meth:`EventBus.on` run synchronously inside
``emit``; an exception in a handler is counted and logged, never propagated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import msgspec
import trio

__all__ = [
    "ActorCrashed",
    "ActorRestarted",
    "BreakerStateChanged",
    "DetectorCleared",
    "DetectorFired",
    "Event",
    "EventBus",
    "ReloadFailed",
    "SupervisorEscalated",
    "tap",
]

log = logging.getLogger("triage.events")


class Event(msgspec.Struct, frozen=True, tag=True, kw_only=True):
    """Base of all events. ``at`` is Trio time; ``wall`` is the injectable wall clock."""

    at: float
    wall: float


class BreakerStateChanged(Event, frozen=True):
    breaker: str
    old: str
    new: str
    reason: str


class ActorCrashed(Event, frozen=True):
    supervisor: str
    child: str
    error: str


class ActorRestarted(Event, frozen=True):
    supervisor: str
    child: str
    delay_s: float
    restarts_in_period: int


class SupervisorEscalated(Event, frozen=True):
    supervisor: str
    reason: str


class DetectorFired(Event, frozen=True):
    detector: str
    value: float
    threshold: float
    row: int | None = None


class DetectorCleared(Event, frozen=True):
    detector: str
    value: float
    threshold: float
    row: int | None = None


class ReloadFailed(Event, frozen=True, tag="reload_failed"):
    """A config reload refused its file: the running config stays (``problems``: one
    ``FILE: $.path: message`` line each)."""

    source: str
    problems: list[str]


class Notice(Event, frozen=True):
    """An actor's own alert: a mitigation it ran, for the on-call engineer.

    ``severity`` is ``page``, ``ticket`` or ``info``. The alert sink logs every
    notice; a ``page`` notice stays on the active-alert board under
    :meth:`alert_key` until a notice with the same key says it is ``resolved``.
    Subclasses add their own fields and override the key and resolution.
    """

    severity: str
    row: int | None  # the catalog row whose mitigation this is, if any

    def alert_key(self) -> str:
        return type(self).__name__

    @property
    def resolved(self) -> bool:
        return False


Handler = Callable[[Event], Any]


#: Process-wide observers of every bus (:func:`tap`): the chaos report's recorder.
_TAPS: list[Handler] = []


def tap(handler: Handler) -> Callable[[], None]:
    """Call ``handler(event)`` for every event emitted on any :class:`EventBus` of this
    process, from now on (a recorder that sees buses it did not create: the chaos
    report's timeline); returns the function that removes it. A failing tap is logged."""
    _TAPS.append(handler)
    return lambda: _TAPS.remove(handler)


class EventBus:
    """Fan-out of events to synchronous handlers and bounded subscriber channels."""

    def __init__(self) -> None:
        self._handlers: list[tuple[type[Event], Handler]] = []
        self._channels: list[trio.MemorySendChannel[Event]] = []
        self.dropped = 0
        self.handler_errors = 0

    def on(self, kind: type[Event], handler: Handler) -> Callable[[], None]:
        """Call ``handler(event)`` for every event of ``kind``; returns an unsubscribe function."""
        entry = (kind, handler)
        self._handlers.append(entry)
        return lambda: self._handlers.remove(entry)

    def subscribe(self, capacity: int) -> trio.MemoryReceiveChannel[Event]:
        """A receive channel of every event, bounded: when full, new events are dropped."""
        send, receive = trio.open_memory_channel[Event](capacity)
        self._channels.append(send)
        return receive

    def emit(self, event: Event) -> None:
        for observer in _TAPS:
            try:
                observer(event)
            except Exception:
                log.exception("event tap failed for %s", type(event).__name__)
        for kind, handler in tuple(self._handlers):
            if isinstance(event, kind):
                try:
                    handler(event)
                except Exception:
                    self.handler_errors += 1
                    log.exception("event handler failed for %s", type(event).__name__)
        if not self._channels:
            return
        alive = []
        for channel in self._channels:
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                continue
            alive.append(channel)
        self._channels = alive
