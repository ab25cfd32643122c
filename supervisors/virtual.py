"""Virtual rooms wired from config: the Jitsi pool, its node pollers, fallback threads.

:func:`build_virtual` is what the daemon's tree (and the chaos scenarios 4 and 14,
so that they run the same wiring) calls with the database pool, the detector set
and the nodes' addresses (``Endpoints.jitsi_nodes``: the configured ``url``, or the
loopback emulator's under ``[emulators] enabled``). One supervisor,
``[supervisors.<jitsi.supervisor>]``, holds, in start order:

=====================  =========================================================
child                  what
=====================  =========================================================
``fallback_threads``   :class:`actors.fallback_thread.FallbackThreads` (row 14):
                       ``[fallback]``, the patient-day breaker profile
                       ``[breakers.<fallback.breaker>]``, row 14's detector
``jitsi_pool``         :class:`actors.jitsi_pool.JitsiPool` (row 4): ``[jitsi]``
                       placement, row 4's detector, failed sessions to the
                       fallback actor
``jitsi_node_<name>``  one :class:`actors.jitsi_pool.BridgeNode` per node of
                       ``[jitsi] nodes``, its breaker ``[breakers.<jitsi.breaker>]``
=====================  =========================================================

Each row's detector is the row's own unless a ``[detectors.*]`` section watches
the row's metric (``config/chaos.toml`` shortens windows that way). Row 4's fire
sends the pool :class:`~actors.jitsi_pool.FailOver`; row 14's fire and clear send
the fallback actor ``Contain`` / ``Release``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from actors.fallback_thread import (
    CONTAIN,
    RELEASE,
    FallbackMessage,
    FallbackRequest,
    FallbackThreads,
)
from actors.fallback_thread import ROW as FALLBACK_ROW
from actors.jitsi_pool import ROW as POOL_ROW
from actors.jitsi_pool import (
    BridgeNode,
    JitsiPool,
    PlacementRules,
    PoolHandle,
    SessionFailed,
)
from config import Catalog, ConfigError, ConfigProblem, TriageConfig, engine_kwargs
from config.catalog import alert_name, module_path, row_override
from engine.actor import ActorRef, Overflow, actor_child
from engine.breaker import Breaker
from engine.detectors import (
    CountInWindowDetector,
    DetectorSet,
    SpikeOverBaselineDetector,
    make_detector,
)
from engine.errors import ActorStopped, MailboxFull
from engine.runtime import Runtime
from engine.supervisor import ChildSpec, Restart, Supervisor
from providers.db import virtual_sessions as units
from providers.db.virtual_sessions import FallbackFacts, FallbackResult, SessionRef
from providers.http_transport import Http1Transport
from providers.jitsi import BridgeClient, HttpBridgeClient

if TYPE_CHECKING:
    from providers.db.pool import DbPool

__all__ = [
    "VIRTUAL_MODULES",
    "VIRTUAL_ROWS",
    "DbFallbackStore",
    "DbSessionStore",
    "Virtual",
    "build_virtual",
    "virtual_problems",
]

#: Catalog rows whose detectors are built here (the tree leaves them out).
VIRTUAL_ROWS: Final = frozenset({POOL_ROW, FALLBACK_ROW})
#: The actor modules wired here, as the catalog's ``module`` names them.
VIRTUAL_MODULES: Final = frozenset(
    module_path(cls.__module__) for cls in (JitsiPool, FallbackThreads)
)


def virtual_problems(config: TriageConfig, source: str = "<config>") -> list[ConfigProblem]:
    """What :func:`build_virtual` refuses in ``config``, as problems in ``source``."""
    j, f = config.jitsi, config.fallback

    def missing(section: str, name: str, field_path: str) -> ConfigProblem:
        return ConfigProblem(
            source=source, line=None, path=field_path,
            message=f"names profile [{section}.{name}], which does not exist",
        )  # fmt: skip

    problems: list[ConfigProblem] = []
    for section, name, where in (
        ("breakers", j.breaker, "$.jitsi.breaker"),
        ("mailboxes", j.mailbox, "$.jitsi.mailbox"),
        ("supervisors", j.supervisor, "$.jitsi.supervisor"),
        ("breakers", f.breaker, "$.fallback.breaker"),
        ("mailboxes", f.mailbox, "$.fallback.mailbox"),
    ):
        if name not in getattr(config, section):
            problems.append(missing(section, name, where))
    for name, where in ((j.mailbox, "$.jitsi.mailbox"), (f.mailbox, "$.fallback.mailbox")):
        mailbox = config.mailboxes.get(name)
        if mailbox is not None and mailbox.overflow != "wait":
            problems.append(
                ConfigProblem(
                    source=source,
                    line=None,
                    path=f"$.mailboxes.{name}.overflow",
                    message=f"must be 'wait', got {mailbox.overflow!r} (named by {where[2:]}:"
                    " node reports and fallback requests are never dropped)",
                )
            )
    supervisor = config.supervisors.get(j.supervisor)
    needed = len(j.nodes) + 2
    if supervisor is not None and supervisor.max_children < needed:
        problems.append(
            ConfigProblem(
                source=source,
                line=None,
                path=f"$.supervisors.{j.supervisor}.max_children",
                message=f"must be >= {needed} (one child per node of [jitsi] nodes, the pool"
                f" and the fallback actor), got {supervisor.max_children}",
            )
        )
    return problems


class DbSessionStore:
    """The pool's :class:`~actors.jitsi_pool.SessionStore` on PostgreSQL (as triage_relay)."""

    def __init__(self, db: DbPool) -> None:
        self.db = db

    async def claim(self, limit: int, lease_s: float, max_failures: int) -> list[SessionRef]:
        return await self.db.run_unit(units.claim_waiting, limit, lease_s, max_failures)

    async def placed(self, session_id: uuid.UUID, node: str, room: str) -> bool:
        return await self.db.run_unit(units.mark_placed, session_id, node, room)

    async def failed(self, ids: Sequence[uuid.UUID], reason: str) -> list[SessionRef]:
        return await self.db.run_unit(units.mark_failed, ids, reason)

    async def fail_node(self, node: str, reason: str) -> list[SessionRef]:
        return await self.db.run_unit(units.fail_node_sessions, node, reason)

    async def fail_pending(self, limit: int, reason: str) -> list[SessionRef]:
        return await self.db.run_unit(units.fail_pending, limit, reason)


class DbFallbackStore:
    """The fallback actor's :class:`~actors.fallback_thread.FallbackStore` (as the tenant)."""

    def __init__(self, db: DbPool) -> None:
        self.db = db

    async def facts(self, tenant_id: uuid.UUID, session_id: uuid.UUID) -> FallbackFacts | None:
        return await self.db.run_unit(units.fallback_facts, tenant_id, session_id)

    async def spawn(
        self, tenant_id: uuid.UUID, session_id: uuid.UUID, cap: int, allow_new: bool
    ) -> FallbackResult:
        return await self.db.run_unit(units.spawn_fallback, tenant_id, session_id, cap, allow_new)

    async def without_fallback(self, limit: int, older_than_s: float) -> list[SessionRef]:
        return await self.db.run_unit(units.without_fallback, limit, older_than_s)


@dataclass
class Virtual:
    """Everything :func:`build_virtual` wired."""

    supervisor: Supervisor
    pool: PoolHandle
    fallback: ActorRef[FallbackMessage]
    clients: dict[str, BridgeClient]
    breakers: dict[str, Breaker]
    pool_detector: CountInWindowDetector
    fallback_detector: SpikeOverBaselineDetector
    specs: list[ChildSpec] = field(default_factory=list)

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()


def _detector(
    config: TriageConfig, catalog: Catalog, runtime: Runtime, detectors: DetectorSet, row: int
) -> Any:
    detector = make_detector(
        alert_name(catalog.row(row)),
        row=row,
        **engine_kwargs(row_override(config, catalog.row(row))),
        clock=runtime.clock,
        events=runtime.events,
        metrics=runtime.metrics,
    )
    return detectors.add(detector)


def build_virtual(
    config: TriageConfig,
    catalog: Catalog,
    runtime: Runtime,
    db: DbPool,
    detectors: DetectorSet,
    nodes: Mapping[str, str],
    *,
    shutdown_s: float,
    source: str = "<config>",
    clients: Mapping[str, BridgeClient] | None = None,
) -> Virtual:
    """Wire the virtual rooms (nothing runs yet); see the module docstring.

    ``nodes`` maps each node of ``[jitsi] nodes`` to its base URL; ``clients`` replaces
    the HTTP clients (tests). A :class:`ConfigError` names what is wrong."""
    problems = virtual_problems(config, source)
    names = [n.name for n in config.jitsi.nodes]
    absent = [n for n in names if n not in nodes]
    if absent:
        problems.append(
            ConfigProblem(
                source=source,
                line=None,
                path="$.jitsi.nodes",
                message=f"no address for node(s) {', '.join(absent)}",
            )
        )
    if problems:
        raise ConfigError(problems)
    j, f = config.jitsi, config.fallback
    registry = runtime.metrics.registry if runtime.metrics is not None else None
    wall = runtime.clock.wall
    pool_detector = _detector(config, catalog, runtime, detectors, POOL_ROW).expect(
        CountInWindowDetector
    )
    fallback_detector = _detector(config, catalog, runtime, detectors, FALLBACK_ROW).expect(
        SpikeOverBaselineDetector
    )

    # Row 14: the fallback actor.
    fb_mailbox = config.mailboxes[f.mailbox]
    fallback_spec, fallback = actor_child(
        FallbackThreads.name,
        partial(
            FallbackThreads,
            store=DbFallbackStore(db),
            breaker=engine_kwargs(config.breakers[f.breaker]) | {"clock": runtime.clock},
            cap=f.max_threads_per_patient_day,
            max_patient_days=f.max_patient_days,
            retry_after_s=f.retry_after_s,
            max_attempts=f.max_attempts,
            sweep_interval_s=f.sweep_interval_s,
            sweep_after_s=f.sweep_after_s,
            sweep_batch=f.sweep_batch,
            detector=fallback_detector,
            events=runtime.events,
            wall=wall,
            severity=catalog.row(FALLBACK_ROW).severity,
            registry=registry,
        ),
        capacity=fb_mailbox.capacity,
        overflow=Overflow(fb_mailbox.overflow),
        shutdown_s=shutdown_s,
        deadlines=runtime.deadlines,
        metrics=runtime.metrics,
    )

    def tell_fallback(message: FallbackMessage) -> None:
        # Full or stopped: dropped; the detector tells again on its next transition.
        with contextlib.suppress(MailboxFull, ActorStopped):
            fallback.tell_nowait(message)

    fallback_detector.on_fire(lambda _state: tell_fallback(CONTAIN))
    fallback_detector.on_clear(lambda _state: tell_fallback(RELEASE))

    async def on_failed(failed: SessionFailed) -> None:
        session = failed.session
        await fallback.tell(
            FallbackRequest(
                tenant_id=session.tenant_id,
                session_id=session.id,
                appointment_id=session.appointment_id,
                reason=failed.reason,
            )
        )

    # Row 4: the pool and one poller per node.
    if clients is None:
        http = engine_kwargs(config.providers.http)
        built: dict[str, BridgeClient] = {
            name: HttpBridgeClient(
                name,
                nodes[name],
                timeout_s=max(j.allocate_timeout_s, j.health_timeout_s, j.stats_timeout_s),
                transport=Http1Transport(**http),
            )
            for name in names
        }
    else:
        built = {name: clients[name] for name in names}
    breakers = {
        name: runtime.tunables.breaker(  # a reload retunes it in place
            j.breaker,
            Breaker(
                f"jitsi_{name}",
                **engine_kwargs(config.breakers[j.breaker]),
                clock=runtime.clock,
                events=runtime.events,
                metrics=runtime.metrics,
            ),
        )
        for name in names
    }
    mailbox = config.mailboxes[j.mailbox]
    pool_spec, pool_ref = actor_child(
        JitsiPool.name,
        partial(
            JitsiPool,
            clients=built,
            breakers=breakers,
            store=DbSessionStore(db),
            rules=PlacementRules(
                overload_threshold=j.overload_threshold,
                failure_reset_s=j.failure_reset_s,
                stale_after_s=j.stale_after_s,
                room_stress=j.room_stress,
            ),
            place_interval_s=j.place_interval_s,
            place_batch=j.place_batch,
            claim_lease_s=j.claim_lease_s,
            max_failures=j.max_failures,
            allocate_timeout_s=j.allocate_timeout_s,
            room_prefix=j.room_prefix,
            detector=pool_detector,
            on_failed=on_failed,
            events=runtime.events,
            wall=wall,
            severity=catalog.row(POOL_ROW).severity,
            registry=registry,
        ),
        capacity=mailbox.capacity,
        overflow=Overflow(mailbox.overflow),
        shutdown_s=shutdown_s,
        deadlines=runtime.deadlines,
        metrics=runtime.metrics,
    )
    handle = PoolHandle(pool_ref)
    pool_detector.on_fire(lambda _state: handle.request_failover())
    node_specs: list[ChildSpec] = []
    for name in names:
        spec, ref = actor_child(
            f"jitsi_node_{name}",
            partial(
                BridgeNode,
                built[name],
                breakers[name],
                pool_ref,
                poll_interval_s=j.poll_interval_s,
                health_timeout_s=j.health_timeout_s,
                stats_timeout_s=j.stats_timeout_s,
            ),
            capacity=mailbox.capacity,
            overflow=Overflow(mailbox.overflow),
            shutdown_s=shutdown_s,
            deadlines=runtime.deadlines,
            metrics=runtime.metrics,
        )
        handle.nodes[name] = ref
        node_specs.append(spec)
    supervisor = Supervisor(
        j.supervisor,
        [fallback_spec, pool_spec, *node_specs],
        **engine_kwargs(config.supervisors[j.supervisor]),
        runtime=runtime,
    )
    return Virtual(
        supervisor=supervisor,
        pool=handle,
        fallback=fallback,
        clients=built,
        breakers=breakers,
        pool_detector=pool_detector,
        fallback_detector=fallback_detector,
        specs=[supervisor.child_spec(Restart.PERMANENT)],
    )
