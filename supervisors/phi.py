"""Catalog row 11 wired from config: the push PHI guard and the PII scanner.

:func:`build_phi` is called by :func:`supervisors.tree.build_tree` when the daemon
has channels: the :class:`~actors.phi_guard.PhiGuard` goes to the dispatch service
(:func:`supervisors.channels.build_channels`), the scanner's child spec joins the
tree after the channels.

=====================  ==================================================
piece                  from
=====================  ==================================================
the rules              ``[phi]`` fields, patterns, ``[[phi.templates]]``
                       (compiled once: :func:`actors.phi_rules.phi_rules`)
guard                  the rules, row 11's detector, the bus and metrics
scanner ``phi_scanner``  ``[daemon] log_file`` + ``[phi] log_files``,
                       ``scan_*``; mailbox ``[mailboxes.monitor]``
=====================  ==================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from actors.phi_guard import PhiGuard, PhiScanner, ScanMemory, ScannerMessage
from actors.phi_rules import PhiRules, phi_rules
from config import TriageConfig
from engine.actor import ActorRef, Overflow, actor_child
from engine.detectors import CountInWindowDetector
from engine.runtime import Runtime
from engine.supervisor import ChildSpec, Restart

if TYPE_CHECKING:
    from supervisors.backbone import Backbone

__all__ = ["MAILBOX", "Phi", "build_phi"]

MAILBOX = "monitor"


@dataclass(frozen=True, slots=True)
class Phi:
    rules: PhiRules
    guard: PhiGuard
    scanner: ActorRef[ScannerMessage]
    scanner_spec: ChildSpec
    memory: ScanMemory


def build_phi(
    config: TriageConfig,
    runtime: Runtime,
    backbone: Backbone,
    detector: CountInWindowDetector | None,
    *,
    shutdown_s: float,
    severity: str = "page",
) -> Phi:
    """The guard and the scanner of row 11 (nothing runs yet)."""
    section = config.phi
    rules = phi_rules(section)
    registry = runtime.metrics.registry if runtime.metrics is not None else None
    guard = PhiGuard(
        backbone.pool, rules, detector=detector, registry=registry,
        events=runtime.events, clock=runtime.clock, severity=severity,
    )  # fmt: skip
    files = [f for f in (config.daemon.log_file, *section.log_files) if f is not None]
    memory = ScanMemory()
    mailbox = config.mailboxes[MAILBOX]
    spec, ref = actor_child(
        PhiScanner.name,
        partial(
            PhiScanner,
            backbone.pool,
            rules,
            memory=memory,
            log_files=files,
            interval_s=section.scan_interval_s,
            max_bytes=section.scan_max_bytes,
            max_letters=section.scan_max_letters,
            scan_dead_letters=section.scan_dead_letters,
            detector=detector,
            registry=registry,
            events=runtime.events,
            clock=runtime.clock,
            severity=severity,
        ),
        capacity=mailbox.capacity,
        overflow=Overflow(mailbox.overflow),
        restart=Restart.PERMANENT,
        shutdown_s=shutdown_s,
        deadlines=runtime.deadlines,
        metrics=runtime.metrics,
    )
    return Phi(rules=rules, guard=guard, scanner=ref, scanner_spec=spec, memory=memory)
