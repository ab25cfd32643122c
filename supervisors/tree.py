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
``db_health``  :class:`actors.db_health.DbHealth`: ``SELECT  permanent
               1`` every ``daemon.detector_tick_s``
               through ``[breakers.postgres_primary]``
               (only with a backbone)
(extra)        ``build_tree(children=...)``: the lead's   (theirs)
               actors (relay, idempotency...), in order
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
* ``database unavailable`` (and any other registered check,
  :meth:`Readiness.add_check`) while that check names a problem;
* otherwise ready iff every static child of every watched supervisor is
  ``running``; a child ``restarting`` (waiting out a backoff or an open
  breaker), ``starting`` or ``stopping`` makes it not ready, and is named.

Dynamic children (one per tenant...) never make the daemon unready, and
neither do firing alerts: they are listed in the body as detail only.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec

from actors.alerts import ActiveAlerts, AlertEvent, AlertSink, EventForwarder, forward_events
from actors.db_writer import DbWriter
from actors.idempotency import ROW as IDEMPOTENCY_ROW
from actors.idempotency import IdempotencyStore, warmer_child
from actors.inbox import InboxConsumer
from actors.outbox_relay import OutboxRelay
from config import Catalog, CatalogRow, ConfigError, ConfigProblem, TriageConfig, engine_kwargs
from config.catalog import alert_name, derive_built, module_path, overrides_a_row, row_override
from engine.actor import ActorRef, Overflow, actor_child
from engine.detectors import (
    Detector,
    DetectorSet,
    RatioDetector,
    make_detector,
)
from engine.runtime import Runtime
from engine.supervisor import ChildSpec, Restart, Supervisor
from supervisors.backbone import DB_BREAKER, BackboneActors, build_backbone_actors
from supervisors.channels import (
    CHANNEL_MODULES,
    CHANNEL_ROWS,
    Channels,
    build_channels,
    channel_problems,
)
from supervisors.http import HealthApp, HttpServer

if TYPE_CHECKING:
    from supervisors.backbone import Backbone
    from supervisors.emulated import Endpoints

__all__ = [
    "DB_BREAKER",
    "REQUIRED_PROFILES",
    "Phase",
    "Readiness",
    "Tree",
    "build_detectors",
    "build_tree",
    "built_catalog",
    "check_config",
    "check_profiles",
    "detector_name",
    "detector_problems",
    "profile_problems",
]

#: Profiles the tree needs: (section, name).
REQUIRED_PROFILES: Final = (
    ("supervisors", "root"),
    ("supervisors", "relay"),
    ("mailboxes", "alerts"),
    ("breakers", "postgres_primary"),  # the database probe and the writer's primary
    ("breakers", "postgres_replica"),  # reads when the primary is gone
    ("breakers", "nats_publish"),  # the outbox relay
    ("breakers", "redis"),  # the idempotency cache
    ("guards", "redis"),
)


def profile_problems(config: TriageConfig, source: str) -> list[ConfigProblem]:
    """Every profile the tree needs that ``config`` lacks, as problems in ``source``."""
    return [
        ConfigProblem(
            source=source,
            line=None,
            path=f"$.{section}.{name}",
            message=f"missing required profile [{section}.{name}] (the daemon's tree uses it)",
        )
        for section, name in REQUIRED_PROFILES
        if name not in getattr(config, section)
    ]


def check_profiles(config: TriageConfig, source: str) -> None:
    """Raise :class:`ConfigError` naming every profile the tree needs that ``config`` lacks."""
    problems = profile_problems(config, source)
    if problems:
        raise ConfigError(problems)


def detector_source(
    config: TriageConfig, catalog: Catalog | None, row: CatalogRow, source: str
) -> tuple[str, str]:
    """Where row ``row``'s detector settings are written: (file, TOML path).

    A ``[detectors.*]`` section on the row's metric (its override) is in the
    config ``source``; otherwise the row itself, in the catalog's file."""
    for name, section in config.detectors.items():
        if section.metric == row.detector.metric:
            return source, f"$.detectors.{name}"
    index = catalog.rows.index(row) if catalog is not None and row in catalog.rows else row.id - 1
    return (catalog.source if catalog is not None else "<catalog>"), f"$.rows[{index}].detector"


def detector_problems(
    config: TriageConfig, catalog: Catalog, source: str, rows: Iterable[CatalogRow]
) -> list[ConfigProblem]:
    """What the daemon refuses in the detectors of ``rows`` and of ``[detectors.*]``: an
    override of another kind than its row's (the row's actor would refuse it at start),
    and whatever the engine refuses (each detector is built as the daemon builds it,
    with nothing attached, and thrown away)."""
    problems: list[ConfigProblem] = []
    for row in rows:
        settings = row_override(config, row)
        where = detector_source(config, catalog, row, source)
        if settings.kind != row.detector.kind:  # the row's feeder is written for its kind
            problems.append(
                ConfigProblem(
                    source=where[0],
                    line=None,
                    path=f"{where[1]}.kind",
                    message=f"overrides row {row.id} ({row.name}), whose actor feeds a "
                    f"detector of kind {row.detector.kind!r}; got {settings.kind!r}",
                )
            )
            continue
        try:
            make_detector(detector_name(row), row=row.id, **engine_kwargs(settings))
        except ConfigError as exc:
            problems += exc.at(*where).problems
    for name, section in config.detectors.items():
        if overrides_a_row(catalog, section):
            continue
        try:
            make_detector(name, **engine_kwargs(section))
        except ConfigError as exc:
            problems += exc.at(source, f"$.detectors.{name}").problems
    return problems


def check_config(config: TriageConfig, catalog: Catalog, source: str) -> None:
    """Every check ``triage run`` makes of a loaded config before it starts anything.

    The tree's profiles, the channels' profiles (:func:`supervisors.channels.channel_problems`)
    and every detector the daemon would build; one :class:`ConfigError` lists all
    problems. ``triage check-config`` runs this too, so a file it passes is one the
    daemon does not refuse for its content (provider secrets come from the
    environment and are checked at start).
    """
    problems = profile_problems(config, source) + channel_problems(config, source)
    if not problems:  # the detectors are only worth building on a complete config
        rows = live_rows(catalog, backbone=True, channels=True)
        if not config.relay.enabled:
            rows = [r for r in rows if r.module != _RELAY_MODULE]
        problems += detector_problems(config, catalog, source, rows)
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
        self._checks: list[Callable[[], str | None]] = []

    def watch(self, supervisor: Supervisor) -> None:
        """Count ``supervisor``'s static children in readiness."""
        self._supervisors.append(supervisor)

    def add_check(self, check: Callable[[], str | None]) -> None:
        """Make the daemon unready while ``check()`` returns a reason (e.g. "database unavailable")."""
        self._checks.append(check)

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
        for check in self._checks:
            reason = check()
            if reason is not None:
                return False, {"status": "not_ready", "reason": reason, "alerts": alerts}
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
    backbone_actors: BackboneActors | None = None
    idempotency: IdempotencyStore | None = None
    channels: Channels | None = None


D = TypeVar("D", bound=Detector)

#: The actor modules this tree wires when it has a backbone (services and a pool), as
#: the catalog's ``module`` names them: derived from the classes it builds.
BACKBONE_MODULES: Final = frozenset(
    module_path(cls.__module__) for cls in (DbWriter, OutboxRelay, IdempotencyStore, InboxConsumer)
)
#: Every actor module the daemon's tree wires (``triage run``: backbone and channels).
WIRED_MODULES: Final = BACKBONE_MODULES | CHANNEL_MODULES
_RELAY_MODULE: Final = module_path(OutboxRelay.__module__)


def built_catalog(catalog: Catalog) -> Catalog:
    """``catalog`` with its built rows derived (:func:`config.catalog.derive_built`): the
    owning module is wired into this tree and the row's chaos scenario exists."""
    return derive_built(catalog, wired=WIRED_MODULES)


def live_rows(catalog: Catalog, *, backbone: bool, channels: bool = False) -> list[CatalogRow]:
    """Built rows whose owning actor runs in this tree: only their detectors are evaluated
    (an unfed detector would raise a false alarm)."""
    modules = BACKBONE_MODULES if backbone else frozenset()
    if backbone and channels:
        modules = modules | CHANNEL_MODULES
    built = built_catalog(catalog)
    return [row for row in catalog.rows if built.is_built(row.id) and row.module in modules]


def detector_name(row: CatalogRow) -> str:
    """A catalog row's detector is named like its Prometheus alert: ``TriageSmsProviderOutage``."""
    return alert_name(row)


def build_detectors(
    config: TriageConfig,
    rows: Iterable[CatalogRow],
    runtime: Runtime,
    catalog: Catalog | None = None,
    *,
    source: str = "<config>",
) -> DetectorSet:
    """The detectors of the given (built) catalog rows, then those of ``[detectors.*]``.

    A ``[detectors.*]`` on a row's metric is that row's override (see
    :func:`config.catalog.row_override`), not a detector of its own."""
    common: dict[str, Any] = {
        "clock": runtime.clock,
        "events": runtime.events,
        "metrics": runtime.metrics,
    }
    detectors = DetectorSet()
    for row in rows:
        fields = engine_kwargs(row_override(config, row))
        try:
            detectors.add(make_detector(detector_name(row), row=row.id, **fields, **common))
        except ConfigError as exc:
            raise exc.at(*detector_source(config, catalog, row, source)) from exc
    for name, section in config.detectors.items():
        if catalog is not None and overrides_a_row(catalog, section):
            continue
        try:
            detectors.add(make_detector(name, **engine_kwargs(section), **common))
        except ConfigError as exc:
            raise exc.at(source, f"$.detectors.{name}") from exc
    return detectors


def build_tree(
    config: TriageConfig,
    catalog: Catalog,
    runtime: Runtime,
    *,
    source: str = "<config>",
    backbone: Backbone | None = None,
    children: Sequence[ChildSpec] = (),
    endpoints: Endpoints | None = None,
) -> Tree:
    """Wire the root supervisor and its children from ``config`` (nothing runs yet).

    Subscribes the alert forwarder to the runtime's event bus at once, so the
    events of the tree's own start are logged; call ``tree.unsubscribe()`` when
    the tree is gone.

    With a ``backbone`` (the daemon's services and pool), the database probe
    joins the tree and its breaker counts in readiness. ``children`` are more
    child specs, started after those and before ``http`` (so the daemon reports
    ready only once they run), stopped before them.
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
    with_channels = backbone is not None and endpoints is not None
    rows = live_rows(catalog, backbone=backbone is not None, channels=with_channels)
    if not config.relay.enabled:  # its rows (lag, crash loop) belong to the replica that relays
        rows = [r for r in rows if r.module != _RELAY_MODULE]
    # The channels build their rows' detectors themselves (row 1: one per provider).
    detectors = build_detectors(
        config, [r for r in rows if r.id not in CHANNEL_ROWS], runtime, catalog, source=source
    )
    detectors_spec = ChildSpec(
        id="detectors",
        start=partial(detectors.run, daemon.detector_tick_s),
        restart=Restart.PERMANENT,
        shutdown_s=child_shutdown_s,
    )

    readiness = Readiness(board)
    backbone_specs: list[ChildSpec] = []
    actors: BackboneActors | None = None
    store: IdempotencyStore | None = None
    if backbone is not None:
        actors = build_backbone_actors(
            config, catalog, backbone, runtime, rows=rows, detectors=detectors,
            shutdown_s=child_shutdown_s, source=source,
        )  # fmt: skip
        readiness.add_check(actors.unavailable)
        store = IdempotencyStore.from_config(
            config,
            catalog,
            backbone.pool.asyncpg_pool,
            backbone.redis,
            runtime=runtime,
            detector=_row_detector(rows, detectors, IDEMPOTENCY_ROW, RatioDetector),
        )
        warmer_spec, _ = warmer_child(store, shutdown_s=child_shutdown_s)
        backbone_specs += [*actors.early, warmer_spec, *actors.late]
    channels: Channels | None = None
    if backbone is not None and endpoints is not None:
        channels = build_channels(
            config,
            catalog,
            runtime,
            backbone,
            detectors,
            endpoints,
            shutdown_s=child_shutdown_s,
            idempotency=store,
            wall=runtime.clock.wall,
            source=source,
        )
        backbone_specs += channels.specs
    registry = runtime.metrics.registry if runtime.metrics is not None else None
    if registry is None:
        raise ValueError("the daemon's runtime needs metrics (a registry to serve on /metrics)")
    mounts = channels.mounts if channels is not None else None
    app = HealthApp(readiness=readiness, registry=registry, mounts=mounts)
    http = HttpServer(app, host=daemon.host, port=daemon.port, graceful_timeout_s=daemon.drain_s)
    http_spec = ChildSpec(
        id="http", start=http.run, restart=Restart.TRANSIENT, shutdown_s=child_shutdown_s
    )

    specs = [alerts_spec, detectors_spec, *backbone_specs, *children, http_spec]
    root = Supervisor("root", specs, **root_config, runtime=runtime)
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
        backbone_actors=actors,
        idempotency=store,
        channels=channels,
    )


def _row_detector(
    rows: Sequence[CatalogRow], detectors: DetectorSet, row_id: int, kind: type[D]
) -> D | None:
    """The detector of catalog row ``row_id``, if that row is live here."""
    for row in rows:
        if row.id == row_id:
            return detectors[detector_name(row)].expect(kind)
    return None
