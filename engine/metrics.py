"""Engine metrics on a prometheus-client registry that is passed in.

Every engine metric is declared here once, Prometheus-style. Label values are
capped per metric family: past ``max_label_values`` distinct values, new ones
are folded into ``"_other"`` so a runaway tenant id cannot explode the registry.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["OVERFLOW_LABEL", "Metrics", "families"]

F = TypeVar("F")

OVERFLOW_LABEL = "_other"


class _LabelCap:
    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OVERFLOW_LABEL
        self._seen.add(value)
        return value


class Metrics:
    """The engine's metric families. One instance per registry (per daemon or per test)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, *, max_label_values: int = 1000
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.max_label_values = max_label_values
        self._caps: dict[str, _LabelCap] = {}
        # The breakers and bulkheads built on these metrics, held weakly: what the live
        # dashboard lists (a component that is gone drops out by itself).
        self._tracked: weakref.WeakSet[object] = weakref.WeakSet()
        r = self.registry
        self.breaker_state = Gauge(
            "triage_breaker_state",
            "Breaker state: 0 closed, 1 open, 2 half-open, 3 forced open, 4 disabled, 5 metrics only",
            ["breaker"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "triage_breaker_transitions_total",
            "Breaker state transitions",
            ["breaker", "to"],
            registry=r,
        )
        self.breaker_calls = Counter(
            "triage_breaker_calls_total",
            "Calls through a breaker by outcome (failures, rejected, slow)",
            ["breaker", "outcome"],
            registry=r,
        )
        self.actor_restarts = Counter(
            "triage_actor_restarts_total",
            "Restarts of a supervised child",
            ["supervisor", "child"],
            registry=r,
        )
        self.actor_crashes = Counter(
            "triage_actor_crashes_total",
            "Abnormal exits of a supervised child",
            ["supervisor", "child"],
            registry=r,
        )
        self.supervisor_children = Gauge(
            "triage_supervisor_children",
            "Children running under a supervisor",
            ["supervisor"],
            registry=r,
        )
        self.mailbox_depth = Gauge(
            "triage_mailbox_depth",
            "Messages waiting in an actor's mailbox",
            ["actor"],
            registry=r,
        )
        self.mailbox_rejected = Counter(
            "triage_mailbox_rejected_total",
            "Messages refused or dropped by a full mailbox",
            ["actor", "policy"],
            registry=r,
        )
        self.bulkhead_in_use = Gauge(
            "triage_bulkhead_in_use",
            "Bulkhead permits in use",
            ["bulkhead"],
            registry=r,
        )
        self.bulkhead_rejected = Counter(
            "triage_bulkhead_rejected_total",
            "Calls refused by a full bulkhead",
            ["bulkhead"],
            registry=r,
        )
        self.retry_attempts = Counter(
            "triage_retry_attempts_total",
            "Retry attempts after a failed first attempt",
            ["policy"],
            registry=r,
        )
        self.ratelimit_rejected = Counter(
            "triage_ratelimit_rejected_total",
            "Calls refused by a rate limiter",
            ["limiter"],
            registry=r,
        )
        self.detector_firing = Gauge(
            "triage_detector_firing",
            "1 while a detector fires",
            ["detector"],
            registry=r,
        )
        self.detector_value = Gauge(
            "triage_detector_value",
            "Last value a detector evaluated",
            ["detector"],
            registry=r,
        )
        self.call_seconds = Histogram(
            "triage_call_seconds",
            "Duration of guarded calls",
            ["guard"],
            registry=r,
        )

    def track(self, component: object) -> None:
        """Remember ``component`` (a breaker, a bulkhead) weakly, for :meth:`tracked`."""
        self._tracked.add(component)

    def tracked(self, kind: type[F]) -> list[F]:
        """The live components of ``kind`` built on these metrics, by name."""
        found = [c for c in list(self._tracked) if isinstance(c, kind)]
        return sorted(found, key=lambda c: str(getattr(c, "name", "")))

    def label(self, family: str, value: str) -> str:
        """``value`` if the family still has room for a new label value, else ``"_other"``."""
        cap = self._caps.get(family)
        if cap is None:
            cap = self._caps[family] = _LabelCap(self.max_label_values)
        return cap(value)


# Families already declared, per registry and per declaring class: prometheus_client
# refuses a name registered twice, and an actor may be built again on the same registry
# (a restart, a second store in a test). Weak keys: a dropped registry takes its entry.
_FAMILIES: weakref.WeakKeyDictionary[CollectorRegistry, dict[object, object]] = (
    weakref.WeakKeyDictionary()
)


def families(registry: CollectorRegistry, declare: Callable[[CollectorRegistry], F]) -> F:
    """``declare(registry)`` once per registry; later calls return the same families."""
    known = _FAMILIES.setdefault(registry, {})
    found = known.get(declare)
    if found is None:
        found = known[declare] = declare(registry)
    return found  # type: ignore[return-value]  # stored by this same ``declare``
