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
(attachments)  with a backbone and endpoints:            permanent
               :mod:`supervisors.attachments` (embedded
               ``clamd``, ``upload_admission``,
               ``scanner_pool``; routes at ``[uploads]
               path``)
``jitsi_pool``  :mod:`supervisors.virtual`: the Jitsi pool,  permanent
               a poller per node, fallback threads (rows
               4, 14; with a backbone and endpoints)
``phi_scanner``  row 11 (:mod:`supervisors.phi`), after the  permanent
               channels; its guard checks every push
(extra)        ``build_tree(children=...)``: the lead's   (theirs)
               actors (relay, idempotency...), in order
``dashboard``  ``[dashboard] enabled``: the live dashboard's  permanent
               websocket (:mod:`supervisors.dashboard`) on
               ``[dashboard] port``; its page is mounted at
               ``[dashboard] path`` on the HTTP child
``http``       HTTP/1.1 serving ``/livez``, ``/readyz``,   transient
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
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import msgspec
import trio
from prometheus_client import CollectorRegistry

from actors.alertmanager import AlertmanagerForwarder
from actors.alerts import ActiveAlerts, AlertEvent, AlertSink, EventForwarder, forward_events
from actors.clock_monitor import ClockMonitor
from actors.db_writer import DbWriter
from actors.idempotency import ROW as IDEMPOTENCY_ROW
from actors.idempotency import IdempotencyStore, warmer_child
from actors.inbox import InboxConsumer
from actors.outbox_relay import OutboxRelay, dlq_stream_name
from actors.phi_guard import ROW as PHI_ROW
from actors.phi_guard import PhiGuard
from actors.thread_service import ThreadService
from config import (
    Catalog,
    CatalogRow,
    ConfigError,
    ConfigProblem,
    TriageConfig,
    engine_kwargs,
    located,
)
from config.catalog import alert_name, derive_built, module_path, overrides_a_row, row_override
from config.preflight import (
    host_problems,
    nats_problems,
    path_problems,
    problem,
    reference_problems,
    references,
)
from engine.actor import ActorRef, Overflow, actor_child
from engine.detectors import (
    CountInWindowDetector,
    Detector,
    DetectorSet,
    RatioDetector,
    SpikeOverBaselineDetector,
    make_detector,
)
from engine.metrics import Metrics
from engine.recorder import InputRecorder
from engine.runtime import Runtime, open_runtime
from engine.supervisor import ChildSpec, Restart, Supervisor
from providers.db.pool import DbPool
from providers.db.virtual_sessions import join_target, open_session
from providers.emulators.push import generate_apns_key, generate_service_account
from providers.fcm import ServiceAccount
from providers.services import Services
from supervisors.attachments import (
    ATTACHMENT_MODULES,
    ATTACHMENT_ROWS,
    Attachments,
    attachment_problems,
    build_attachments,
)
from supervisors.backbone import (
    BACKBONE_MAILBOXES,
    DB_BREAKER,
    SPOOL_APPLIERS,
    Backbone,
    BackboneActors,
    build_backbone_actors,
)
from supervisors.channels import (
    CHANNEL_MODULES,
    CHANNEL_ROWS,
    Channels,
    build_channels,
    channel_problems,
)
from supervisors.dashboard import Dashboard
from supervisors.emulated import Endpoints
from supervisors.erasure import ERASURE_MODULES, ERASURE_ROW, ErasureWiring, build_erasure
from supervisors.http import HealthApp, HttpServer
from supervisors.join_tokens import (
    SESSIONS_PATH,
    TOKEN_MODULES,
    TOKEN_ROW,
    JoinTokenWiring,
    VirtualSessionsApi,
    build_join_tokens,
    token_problems,
)
from supervisors.phi import Phi, build_phi
from supervisors.recordings import (
    RECORDING_MODULES,
    RECORDING_ROW,
    RecordingWiring,
    build_recordings,
    recording_problems,
)
from supervisors.safeguards import Safeguards, build_safeguards, safeguard_problems
from supervisors.virtual import (
    VIRTUAL_MODULES,
    VIRTUAL_ROWS,
    Virtual,
    build_virtual,
    virtual_problems,
)

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

    from providers import jetstream

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
    "wiring_problems",
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


def _backbone_profile_problems(config: TriageConfig, source: str) -> list[ConfigProblem]:
    """The mailboxes of the backbone's actors (:data:`~supervisors.backbone.BACKBONE_MAILBOXES`)
    that ``config`` lacks, one problem per profile (several actors share one)."""
    problems: dict[str, ConfigProblem] = {}
    for actor, name in BACKBONE_MAILBOXES.items():
        if name not in config.mailboxes and name not in problems:
            problems[name] = problem(
                source,
                f"$.mailboxes.{name}",
                f"missing required profile [mailboxes.{name}] (the {actor} actor uses it)",
            )
    return list(problems.values())


def _spool_problems(config: TriageConfig, source: str) -> list[ConfigProblem]:
    """Spoolable write kinds the database writer has no applier for."""
    spoolable = ", ".join(sorted(SPOOL_APPLIERS))
    return [
        problem(
            source,
            f"$.spool.spoolable_kinds[{index}]",
            f"no such write kind {kind!r} (spoolable: {spoolable})",
        )
        for index, kind in enumerate(config.spool.spoolable_kinds)
        if kind not in SPOOL_APPLIERS
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

    First what can be named precisely, all at once: the tree's, the backbone's and the
    channels' profiles (:func:`supervisors.channels.channel_problems`), the profiles
    the plain sections name, the JetStream streams side by side, the spool's write
    kinds, the files and addresses the daemon opens (:mod:`config.preflight`). On a
    config without any of those, every detector the daemon would build, and then the
    whole tree, built as ``triage run`` builds it and thrown away
    (:func:`wiring_problems`): whatever a constructor refuses is refused here, before
    a service starts. One :class:`ConfigError` lists all problems. ``triage
    check-config`` runs this too, so a file it passes is one the daemon does not
    refuse for its content (provider secrets come from the environment and are
    checked at start). The dry build runs a Trio loop of its own: call this outside
    Trio (from Trio, in a worker thread).
    """
    dangling = {f"$.{section}.{name}" for _, section, name in references(config)}
    problems = [
        *profile_problems(config, source),
        *_backbone_profile_problems(config, source),
        *reference_problems(config, source),
        # A profile named by a dangling reference is reported at the reference.
        *(p for p in channel_problems(config, source) if p.path not in dangling),
        *attachment_problems(config, source),
        *virtual_problems(config, source),
        *nats_problems(config, source, dlq_stream=dlq_stream_name(config.relay)),
        *_spool_problems(config, source),
        *safeguard_problems(config, catalog, source),
        *path_problems(config, source),
        *host_problems(config, source),
        *token_problems(config, source),
        *recording_problems(config, source),
    ]
    if not problems:  # the detectors are only worth building on a complete config
        rows = live_rows(catalog, backbone=True, channels=True)
        if not config.relay.enabled:
            rows = [r for r in rows if r.module != _RELAY_MODULE]
        problems += detector_problems(config, catalog, source, rows)
    if not problems:
        problems += wiring_problems(config, catalog, source)
    if problems:
        raise ConfigError(problems)


# -- the dry build ---------------------------------------------------------------------


class _Unopened:
    """A connection the dry build hands the wiring: constructors only keep it."""

    asyncpg_pool = None


#: Where the dry build's providers are: nothing is ever sent there.
_NOWHERE: Final = "http://127.0.0.1:9"


@functools.cache
def _stand_in_keys() -> tuple[ServiceAccount, str]:
    """An FCM service account and an APNs key for the dry build (once per process)."""
    account, _ = generate_service_account(
        project_id="dry-build", client_email="dry-build@triage.invalid",
        token_uri=f"{_NOWHERE}/token", key_bits=1024,
    )  # fmt: skip
    apns_key, _ = generate_apns_key()
    return account, apns_key


def _dry_endpoints(config: TriageConfig) -> Endpoints:
    """Stand-in endpoints, with the configured key files where they are set (so the
    adapters check them as the daemon's would)."""
    account, apns_key = _stand_in_keys()
    p = config.providers
    if p.fcm.service_account_file is not None:
        with (
            open(p.fcm.service_account_file, "rb") as file,
            located("", "$.providers.fcm.service_account_file"),
        ):
            account = ServiceAccount.from_json(file.read())
    if p.apns.key_file is not None:
        with open(p.apns.key_file, encoding="utf-8", errors="replace") as text:
            apns_key = text.read()
    return Endpoints(
        ghasi_url=_NOWHERE, ghasi_api_key="dry", ghasi_receipt_secret="dry",
        twilio_url=_NOWHERE, twilio_auth_token="dry",
        fcm_url=_NOWHERE, fcm_account=account, fcm_feedback_url=_NOWHERE,
        apns_url=_NOWHERE, apns_private_key=apns_key, apns_feedback_url=_NOWHERE,
        smtp_host="127.0.0.1", smtp_port=p.smtp.port,
        smtp_username="dry" if p.smtp.username_env is not None else None,
        smtp_password="dry" if p.smtp.password_env is not None else None,
        smtp_bounce_secret="dry",
        jitsi_nodes=tuple((n.name, n.url or _NOWHERE) for n in config.jitsi.nodes),
    )  # fmt: skip


def _dry_backbone(config: TriageConfig) -> Backbone:
    unopened = cast("DbPool", _Unopened())
    return Backbone(
        services=Services(postgres_url=_NOWHERE, nats_url=_NOWHERE, redis_url=None),
        pool=unopened,
        nats=cast("jetstream.JetStreamClient", _Unopened()),
        replica=unopened if config.services.postgres_replica_url is not None else None,
        relay_pool=unopened if config.relay.enabled else None,
        redis=None,
        migrated=[],
    )


async def _dry_build(config: TriageConfig, catalog: Catalog, source: str) -> None:
    metrics = Metrics(CollectorRegistry(), max_label_values=config.daemon.max_label_values)
    async with open_runtime(seed=config.daemon.seed, metrics=metrics) as runtime:
        tree = build_tree(
            config, built_catalog(catalog), runtime, source=source,
            backbone=_dry_backbone(config), endpoints=_dry_endpoints(config),
        )  # fmt: skip
        tree.unsubscribe()
        if tree.channels is not None:
            await tree.channels.aclose()
        if tree.virtual is not None:
            await tree.virtual.aclose()


def wiring_problems(config: TriageConfig, catalog: Catalog, source: str) -> list[ConfigProblem]:
    """What the daemon's wiring refuses in ``config``: the whole tree is built as
    ``triage run`` builds it -- backbone actors, channels, adapters, detectors -- on
    stand-ins for the services and the providers (nothing connects, nothing runs) and
    thrown away. A :class:`ConfigError` keeps its path (``$`` when it has none); a
    constructor's ``ValueError`` is a problem at ``$``."""
    try:
        trio.run(_dry_build, config, catalog, source)
    except ConfigError as exc:
        return list(exc.at(source, "$").problems)
    except OSError as exc:  # a key file that went away since path_problems looked
        return [ConfigProblem(source=source, line=None, path="$", message=str(exc))]
    except ValueError as exc:
        return [
            ConfigProblem(
                source=source, line=None, path="$",
                message=f"the daemon's wiring refuses it: {exc}",
            )
        ]  # fmt: skip
    return []


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
    attachments: Attachments | None = None
    virtual: Virtual | None = None
    join_tokens: JoinTokenWiring | None = None
    recordings: RecordingWiring | None = None
    #: The thread service and the clock monitor's board (rows 12, 16).
    safeguards: Safeguards | None = None
    phi: Phi | None = None
    #: The live dashboard (``[dashboard] enabled``): its websocket child runs before ``http``.
    dashboard: Dashboard | None = None
    erasure: ErasureWiring | None = None  # row 15 (supervisors/erasure.py)
    #: The breakers' and detectors' inputs for ``triage tune what-if`` (``[recorder]``).
    recorder: InputRecorder | None = None


D = TypeVar("D", bound=Detector)

#: The actor modules this tree wires when it has a backbone (services and a pool), as
#: the catalog's ``module`` names them: derived from the classes it builds.
BACKBONE_MODULES: Final = frozenset(
    module_path(cls.__module__)
    for cls in (DbWriter, OutboxRelay, IdempotencyStore, InboxConsumer, ThreadService, ClockMonitor)
)
#: The actor modules wired beside the backbone's (join tokens, recordings: they need a pool).
CARE_MODULES: Final = TOKEN_MODULES | RECORDING_MODULES | ERASURE_MODULES
#: The actor modules wired beside the channels (row 11's guard and scanner).
PHI_MODULES: Final = frozenset({module_path(PhiGuard.__module__)})
#: Every actor module the daemon's tree wires (``triage run``: backbone, channels, the
#: care modules, attachments, virtual rooms, row 11's guard).
WIRED_MODULES: Final = (
    BACKBONE_MODULES
    | CHANNEL_MODULES
    | CARE_MODULES
    | ATTACHMENT_MODULES
    | VIRTUAL_MODULES
    | PHI_MODULES
)
_RELAY_MODULE: Final = module_path(OutboxRelay.__module__)


def built_catalog(catalog: Catalog) -> Catalog:
    """``catalog`` with its built rows derived (:func:`config.catalog.derive_built`): the
    owning module is wired into this tree and the row's chaos scenario exists."""
    return derive_built(catalog, wired=WIRED_MODULES)


def live_rows(catalog: Catalog, *, backbone: bool, channels: bool = False) -> list[CatalogRow]:
    """Built rows whose owning actor runs in this tree: only their detectors are evaluated
    (an unfed detector would raise a false alarm)."""
    modules = BACKBONE_MODULES | CARE_MODULES if backbone else frozenset()
    if backbone and channels:
        modules = modules | CHANNEL_MODULES | ATTACHMENT_MODULES | VIRTUAL_MODULES | PHI_MODULES
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
    recorder_specs: list[ChildSpec] = []
    recorder: InputRecorder | None = None
    if config.recorder.enabled:
        # Before anything is built: every breaker registered from here on, and every
        # detector of the set, has its inputs recorded (the writer is the first child).
        settings = config.recorder
        recorder = InputRecorder(
            settings.path,
            segment_bytes=settings.segment_bytes,
            segments=settings.segments,
            buffer=settings.buffer,
            flush_s=settings.flush_s,
            clock=runtime.clock,
        )
        runtime.tunables.recorder = recorder
        recorder_specs.append(
            ChildSpec(
                id="recorder",
                start=recorder.run,
                restart=Restart.PERMANENT,
                shutdown_s=child_shutdown_s,
            )
        )

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
    forward_specs: list[ChildSpec] = []
    if config.alertmanager.url is not None:
        # The board's alerts to the Alertmanager (actors/alertmanager.py).
        forward_spec, _ = actor_child(
            "alertmanager",
            partial(
                AlertmanagerForwarder,
                board,
                config.alertmanager,
                catalog=catalog,
                wall=runtime.clock.wall,
                registry=runtime.metrics.registry if runtime.metrics is not None else None,
            ),
            capacity=mailbox.capacity,
            overflow=Overflow(mailbox.overflow),
            restart=Restart.PERMANENT,
            shutdown_s=child_shutdown_s,
            deadlines=runtime.deadlines,
            metrics=runtime.metrics,
        )
        forward_specs.append(forward_spec)
    with_channels = backbone is not None and endpoints is not None
    rows = live_rows(catalog, backbone=backbone is not None, channels=with_channels)
    if not config.relay.enabled:  # its rows (lag, crash loop) belong to the replica that relays
        rows = [r for r in rows if r.module != _RELAY_MODULE]
    # The channels build their rows' detectors themselves (row 1: one per provider), and
    # so do the attachments (rows 8, 17) and the virtual rooms (rows 4, 14).
    own = CHANNEL_ROWS | ATTACHMENT_ROWS | VIRTUAL_ROWS
    detectors = build_detectors(
        config, [r for r in rows if r.id not in own], runtime, catalog, source=source
    )
    if recorder is not None:
        recorder.attach_set(detectors)  # and the detectors the channels add later
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
    safeguards: Safeguards | None = None
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
        safeguards = build_safeguards(
            config, catalog, backbone, runtime, rows=rows, detectors=detectors,
            shutdown_s=child_shutdown_s,
        )  # fmt: skip
        backbone_specs += [*actors.early, warmer_spec, *actors.late, *safeguards.specs]
    channels: Channels | None = None
    phi: Phi | None = None
    if backbone is not None and endpoints is not None:
        phi = build_phi(
            config, runtime, backbone,
            _row_detector(rows, detectors, PHI_ROW, CountInWindowDetector),
            shutdown_s=child_shutdown_s, severity=catalog.row(PHI_ROW).severity,
        )  # fmt: skip
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
            phi_guard=phi.guard,
        )
        backbone_specs += [*channels.specs, phi.scanner_spec]
    virtual: Virtual | None = None
    if backbone is not None and endpoints is not None:
        virtual = build_virtual(
            config, catalog, runtime, backbone.pool, detectors, dict(endpoints.jitsi_nodes),
            shutdown_s=child_shutdown_s, source=source,
        )  # fmt: skip
        backbone_specs += virtual.specs
    tokens: JoinTokenWiring | None = None
    recordings: RecordingWiring | None = None
    erasure: ErasureWiring | None = None
    mounts: dict[str, ASGIFramework] = dict(channels.mounts) if channels is not None else {}
    if backbone is not None:
        tokens = build_join_tokens(
            config, runtime, backbone, shutdown_s=child_shutdown_s,
            skew=safeguards.clock_board if safeguards is not None else None,
            detector=_row_detector(rows, detectors, TOKEN_ROW, SpikeOverBaselineDetector),
        )  # fmt: skip
        recordings = build_recordings(
            config, runtime, backbone, shutdown_s=child_shutdown_s,
            detector=_row_detector(rows, detectors, RECORDING_ROW, CountInWindowDetector),
        )  # fmt: skip
        erasure = build_erasure(
            config, runtime, backbone, shutdown_s=child_shutdown_s,
            detector=_row_detector(rows, detectors, ERASURE_ROW, CountInWindowDetector),
            severity=catalog.row(ERASURE_ROW).severity,
        )  # fmt: skip
        backbone_specs += [tokens.spec, recordings.spec, erasure.spec]
        mounts |= {**tokens.mounts, **recordings.mounts, **erasure.mounts}
        if virtual is not None:  # visits booked, and joined in the room the pool placed them in
            db = backbone.pool
            mounts[SESSIONS_PATH] = VirtualSessionsApi(
                tokens.tokens,
                lambda tenant, session: db.run_unit(join_target, tenant, session),
                lambda s: db.run_unit(
                    open_session, s.tenant_id, s.appointment_id, s.patient_id, s.starts_at
                ),
                max_body_bytes=config.tokens.max_body_bytes,
                retry_after_s=config.jitsi.place_interval_s,
                meet_url=config.jitsi.meet_url,
            )
    if safeguards is not None:
        mounts |= safeguards.mounts
    attachments: Attachments | None = None
    if backbone is not None and endpoints is not None:
        attachments = build_attachments(
            config, catalog, runtime, backbone.pool.asyncpg_pool, detectors,
            shutdown_s=child_shutdown_s, secret=endpoints.upload_secret, wall=runtime.clock.wall,
        )  # fmt: skip
        if attachments is not None:
            backbone_specs += attachments.specs
            mounts |= attachments.mounts
    registry = runtime.metrics.registry if runtime.metrics is not None else None
    if registry is None:
        raise ValueError("the daemon's runtime needs metrics (a registry to serve on /metrics)")
    dashboard: Dashboard | None = None
    dashboard_specs: list[ChildSpec] = []
    if config.dashboard.enabled:
        taken = HealthApp(readiness=readiness, registry=registry, mounts=mounts)
        if taken.mounted(config.dashboard.path) is not None:
            raise ConfigError(
                [problem(source, "$.dashboard.path",
                         f"{config.dashboard.path!r} is already served by another route")]
            )  # fmt: skip
        dashboard = Dashboard(
            config.dashboard, runtime, host=daemon.host, detectors=detectors, board=board
        )
        mounts[config.dashboard.path] = dashboard.app
        dashboard_specs.append(
            ChildSpec(
                id="dashboard",
                start=dashboard.run,
                restart=Restart.PERMANENT,
                shutdown_s=child_shutdown_s,
            )
        )
    app = HealthApp(readiness=readiness, registry=registry, mounts=mounts)
    http = HttpServer(
        app,
        host=daemon.host,
        port=daemon.port,
        graceful_timeout_s=daemon.drain_s,
        limits=daemon.http,
    )
    http_spec = ChildSpec(
        id="http", start=http.run, restart=Restart.TRANSIENT, shutdown_s=child_shutdown_s
    )

    specs = [
        *recorder_specs, alerts_spec, *forward_specs, detectors_spec, *backbone_specs, *children,
        *dashboard_specs, http_spec,
    ]  # fmt: skip
    root = Supervisor("root", specs, **root_config, runtime=runtime)
    if dashboard is not None:
        dashboard.root = root
        dashboard.http = http
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
        attachments=attachments,
        virtual=virtual,
        join_tokens=tokens,
        recordings=recordings,
        safeguards=safeguards,
        phi=phi,
        dashboard=dashboard,
        erasure=erasure,
        recorder=recorder,
    )


def _row_detector(
    rows: Sequence[CatalogRow], detectors: DetectorSet, row_id: int, kind: type[D]
) -> D | None:
    """The detector of catalog row ``row_id``, if that row is live here."""
    for row in rows:
        if row.id == row_id:
            return detectors[detector_name(row)].expect(kind)
    return None
