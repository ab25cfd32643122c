"""The safeguards on the backbone: the thread service (row 12) and the clock monitor (row 16).

:func:`build_safeguards` wires, on the daemon's pool:

- :class:`~actors.thread_service.ThreadService` (``[threads]``), a direct-call
  store: its refusals feed row 12's detector (the tree's, when the row is live)
  and ``triage_tenant_check_violations_total``;
- :class:`~actors.clock_monitor.ClockMonitor` (``[clock]``, mailbox
  ``[mailboxes.monitor]``), a permanent child of the root supervisor started
  after the backbone's actors, unless ``[clock] enabled = false``; it writes the
  :class:`~actors.clock_monitor.ClockBoard` handed out here (``Safeguards.clock_board``)
  -- the seam through which join-token issuing allows for this host's skew -- and
  feeds row 16's detector.

:func:`safeguard_problems` is what ``check-config`` adds for them: ``[clock]
max_offset_s`` must be row 16's effective detector threshold (one limit, or the
monitor's warnings and the alert would disagree), and the monitor's mailbox
profile must exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from hypercorn.typing import ASGIFramework

from actors.clock_monitor import ROW as CLOCK_ROW
from actors.clock_monitor import (
    ClockBoard,
    ClockMonitorMessage,
    DatabaseClock,
    clock_monitor_child,
)
from actors.clock_monitor import build_detector as build_clock_detector
from actors.thread_service import ROW as THREADS_ROW
from actors.thread_service import ThreadService
from actors.thread_service import build_detector as build_threads_detector
from config import Catalog, CatalogRow, ConfigProblem, TriageConfig
from config.catalog import alert_name, row_override
from engine.actor import ActorRef
from engine.detectors import CountInWindowDetector, Detector, DetectorSet, GaugeSustainedDetector
from engine.hlc import HybridLogicalClock
from engine.runtime import Runtime
from engine.supervisor import ChildSpec, Restart
from supervisors.backbone import BACKBONE_MAILBOXES, Backbone
from supervisors.threads_api import ThreadsApi

__all__ = ["SAFEGUARD_MAILBOXES", "Safeguards", "build_safeguards", "safeguard_problems"]

#: Each safeguard actor's ``[mailboxes.*]`` profile.
SAFEGUARD_MAILBOXES: Final = {"clock_monitor": "monitor"}

D = TypeVar("D", bound=Detector)


@dataclass(frozen=True, slots=True)
class Safeguards:
    """What :func:`build_safeguards` wired."""

    threads: ThreadService
    #: The latest clock reading, for whoever must allow for this host's skew.
    clock_board: ClockBoard
    clock: ActorRef[ClockMonitorMessage] | None
    #: This process's hybrid logical clock (the wall clock, bounded by ``[clock]
    #: max_offset_s``), for ordering messages between daemons.
    hlc: HybridLogicalClock
    specs: tuple[ChildSpec, ...]
    #: ``/v1/threads`` (:class:`~supervisors.threads_api.ThreadsApi`), for the HTTP server.
    mounts: dict[str, ASGIFramework]


def _live(
    rows: Sequence[CatalogRow], detectors: DetectorSet, row_id: int, kind: type[D]
) -> D | None:
    for row in rows:
        if row.id == row_id:
            return detectors[alert_name(row)].expect(kind)
    return None


def build_safeguards(
    config: TriageConfig,
    catalog: Catalog,
    backbone: Backbone,
    runtime: Runtime,
    *,
    rows: Sequence[CatalogRow],
    detectors: DetectorSet,
    shutdown_s: float,
) -> Safeguards:
    """Wire the thread service and the clock monitor (nothing runs yet)."""
    registry = runtime.metrics.registry if runtime.metrics is not None else None
    violations = _live(rows, detectors, THREADS_ROW, CountInWindowDetector)
    threads = ThreadService.for_runtime(
        backbone.pool,
        runtime,
        config=config.threads,
        detector=violations
        if violations is not None
        else build_threads_detector(config, catalog, runtime=runtime),
    )
    board = ClockBoard()
    specs: list[ChildSpec] = []
    ref: ActorRef[ClockMonitorMessage] | None = None
    if config.clock.enabled:
        skew = _live(rows, detectors, CLOCK_ROW, GaugeSustainedDetector)
        spec, ref = clock_monitor_child(
            sampler=DatabaseClock(backbone.pool, runtime.clock.wall),
            config=config.clock,
            board=board,
            mailbox=config.mailboxes[SAFEGUARD_MAILBOXES["clock_monitor"]],
            shutdown_s=shutdown_s,
            detector=skew
            if skew is not None
            else build_clock_detector(config, catalog, runtime=runtime),
            registry=registry,
            events=runtime.events,
            clock=runtime.clock,
            restart=Restart.PERMANENT,
            deadlines=runtime.deadlines,
            metrics=runtime.metrics,
        )
        specs.append(spec)
    hlc = HybridLogicalClock(runtime.clock.wall, max_offset_s=config.clock.max_offset_s)
    api = ThreadsApi(threads, max_body_bytes=config.threads.max_body_bytes)
    return Safeguards(
        threads=threads, clock_board=board, clock=ref, hlc=hlc, specs=tuple(specs),
        mounts={"/v1/threads": api},
    )  # fmt: skip


def safeguard_problems(config: TriageConfig, catalog: Catalog, source: str) -> list[ConfigProblem]:
    """What the daemon would refuse in ``[clock]`` and the safeguards' profiles."""
    problems: list[ConfigProblem] = []
    for actor, name in SAFEGUARD_MAILBOXES.items():
        # A profile the backbone's actors need too is reported once, by the backbone.
        if name not in config.mailboxes and name not in BACKBONE_MAILBOXES.values():
            problems.append(
                ConfigProblem(
                    source=source, line=None, path=f"$.mailboxes.{name}",
                    message=f"missing required profile [mailboxes.{name}] (the {actor} actor uses it)",
                )
            )  # fmt: skip
    try:
        row = catalog.row(CLOCK_ROW)
    except KeyError:
        return problems
    threshold = row_override(config, row).threshold
    if config.clock.enabled and config.clock.max_offset_s != threshold:
        problems.append(
            ConfigProblem(
                source=source, line=None, path="$.clock.max_offset_s",
                message=f"must equal row {CLOCK_ROW}'s detector threshold ({threshold:g}):"
                f" one limit for the monitor's warnings and the alert; got"
                f" {config.clock.max_offset_s:g}",
            )
        )  # fmt: skip
    return problems
