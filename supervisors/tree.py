"""The supervision tree, built from config, and the readiness it reports.

:func:`build_tree` wires the root supervisor (``[supervisors.root]``) with its
children, started in this order and stopped in the reverse one:

=============  ==========================================  ==========
child id       what                                        restart
=============  ==========================================  ==========
``alerts``     :class:`actors.alerts.AlertSink`, mailbox   permanent
               ``[mailboxes.alerts]``; fed from the event
               bus by a non-blocking forwarder
``detectors``  :class:`engine.detectors.DetectorSet` of    permanent
               the catalog's built rows and the config's
               ``[detectors.*]``, evaluated every
               ``daemon.detector_tick_s``
``http``       hypercorn serving ``/livez``, ``/readyz``,  transient
               ``/metrics`` on ``daemon.host:port``
=============  ==========================================  ==========

The HTTP child is transient: after a graceful shutdown it returns normally and
is not restarted; a crash restarts it. It starts last, so the daemon answers
probes only once everything before it runs.

Readiness (:class:`Readiness`) is a phase plus the state of every watched
supervisor's static children:

* ``starting`` until the root supervisor has started all its children;
* ``draining`` from the moment a drain is requested (a signal), for good;
* ``stopped`` once the root supervisor has exited;
* otherwise ready iff every static child of every watched supervisor is
  ``running``; a child ``restarting`` (waiting out a backoff or an open
  breaker), ``starting`` or ``stopping`` makes it not ready, and is named.

Dynamic children (one per tenant...) never make the daemon unready, and
neither do firing alerts: they are listed in the body as detail only.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import msgspec

from actors.alerts import ActiveAlerts, AlertEvent, AlertSink, EventForwarder, forward_events
from config import Catalog, CatalogRow, ConfigError, ConfigProblem, TriageConfig, engine_kwargs
from config.catalog import alert_name
from engine.actor import ActorRef, Overflow, actor_child
from engine.detectors import DetectorSet, make_detector
from engine.runtime import Runtime
from engine.supervisor import ChildSpec, Restart, Supervisor
from supervisors.http import HealthApp, HttpServer

__all__ = [
    "REQUIRED_PROFILES",
    "Phase",
    "Readiness",
    "Tree",
    "build_detectors",
    "build_tree",
    "check_profiles",
    "detector_name",
]

#: Profiles the tree needs: (section, name).
REQUIRED_PROFILES: Final = (("supervisors", "root"), ("mailboxes", "alerts"))


def check_profiles(config: TriageConfig, source: str) -> None:
    """Raise :class:`ConfigError` naming every profile the tree needs that ``config`` lacks."""
    problems = [
        ConfigProblem(
            source=source,
            line=None,
            path=f"$.{section}.{name}",
            message=f"missing required profile [{section}.{name}] (the daemon's tree uses it)",
        )
        for section, name in REQUIRED_PROFILES
        if name not in getattr(config, section)
    ]
    if problems:
        raise ConfigError(problems)


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Readiness:
    """What ``/readyz`` answers; see the module docstring for the rules."""

    def __init__(self, board: ActiveAlerts) -> None:
        self.board = board
        self.phase = Phase.STARTING
        self._supervisors: list[Supervisor] = []

    def watch(self, supervisor: Supervisor) -> None:
        """Count ``supervisor``'s static children in readiness."""
        self._supervisors.append(supervisor)

    def mark_running(self) -> None:
        """The root supervisor has started every child (ignored once draining)."""
        if self.phase is Phase.STARTING:
            self.phase = Phase.RUNNING

    def begin_drain(self) -> None:
        if self.phase is not Phase.STOPPED:
            self.phase = Phase.DRAINING

    def mark_stopped(self) -> None:
        self.phase = Phase.STOPPED

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        alerts = msgspec.to_builtins(list(self.board.snapshot()))
        if self.phase is not Phase.RUNNING:
            return False, {"status": "not_ready", "reason": self.phase.value, "alerts": alerts}
        children = [
            {"supervisor": sup.name, "child": info.id, "state": info.state}
            for sup in self._supervisors
            for info in sup.which_children()
            if not info.dynamic and info.state != "running"
        ]
        if children:
            body = {"status": "not_ready", "reason": "children", "children": children}
            body["alerts"] = alerts
            return False, body
        return True, {"status": "ready", "alerts": alerts}


@dataclass(frozen=True, slots=True)
class Tree:
    """Everything :func:`build_tree` wired, for the daemon (and later issues) to use."""

    root: Supervisor
    readiness: Readiness
    board: ActiveAlerts
    alerts: ActorRef[AlertEvent]
    forwarder: EventForwarder
    unsubscribe: Callable[[], None]
    detectors: DetectorSet
    http: HttpServer


def detector_name(row: CatalogRow) -> str:
    """A catalog row's detector is named like its Prometheus alert: ``TriageSmsProviderOutage``."""
    return alert_name(row)


def build_detectors(
    config: TriageConfig, rows: Iterable[CatalogRow], runtime: Runtime
) -> DetectorSet:
    """The detectors of the given (built) catalog rows, then those of ``[detectors.*]``."""
    common: dict[str, Any] = {
        "clock": runtime.clock,
        "events": runtime.events,
        "metrics": runtime.metrics,
    }
    detectors = DetectorSet()
    for row in rows:
        fields = engine_kwargs(row.detector)
        detectors.add(make_detector(detector_name(row), row=row.id, **fields, **common))
    for name, section in config.detectors.items():
        detectors.add(make_detector(name, **engine_kwargs(section), **common))
    return detectors


def build_tree(
    config: TriageConfig,
    catalog: Catalog,
    runtime: Runtime,
    *,
    source: str = "<config>",
) -> Tree:
    """Wire the root supervisor and its children from ``config`` (nothing runs yet).

    Subscribes the alert forwarder to the runtime's event bus at once, so the
    events of the tree's own start are logged; call ``tree.unsubscribe()`` when
    the tree is gone.
    """
    check_profiles(config, source)
    daemon = config.daemon
    root_config = engine_kwargs(config.supervisors["root"])
    child_shutdown_s = float(root_config["shutdown_s"])

    board = ActiveAlerts()
    mailbox = config.mailboxes["alerts"]
    alerts_spec, alerts_ref = actor_child(
        "alerts",
        partial(AlertSink, board),
        capacity=mailbox.capacity,
        overflow=Overflow(mailbox.overflow),
        restart=Restart.PERMANENT,
        shutdown_s=child_shutdown_s,
        deadlines=runtime.deadlines,
        metrics=runtime.metrics,
    )
    detectors = build_detectors(config, (row for row in catalog.rows if row.built), runtime)
    detectors_spec = ChildSpec(
        id="detectors",
        start=partial(detectors.run, daemon.detector_tick_s),
        restart=Restart.PERMANENT,
        shutdown_s=child_shutdown_s,
    )

    readiness = Readiness(board)
    registry = runtime.metrics.registry if runtime.metrics is not None else None
    if registry is None:
        raise ValueError("the daemon's runtime needs metrics (a registry to serve on /metrics)")
    app = HealthApp(readiness=readiness, registry=registry)
    http = HttpServer(app, host=daemon.host, port=daemon.port, graceful_timeout_s=daemon.drain_s)
    http_spec = ChildSpec(
        id="http", start=http.run, restart=Restart.TRANSIENT, shutdown_s=child_shutdown_s
    )

    root = Supervisor(
        "root", [alerts_spec, detectors_spec, http_spec], **root_config, runtime=runtime
    )
    readiness.watch(root)
    forwarder, unsubscribe = forward_events(runtime.events, alerts_ref)
    return Tree(
        root=root,
        readiness=readiness,
        board=board,
        alerts=alerts_ref,
        forwarder=forwarder,
        unsubscribe=unsubscribe,
        detectors=detectors,
        http=http,
    )
