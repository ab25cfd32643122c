"""The error-budget policy (the seed's section 2): SLO burn, tracked, exported, enforced.

The indicators are counted in PostgreSQL (migration 0010: a statement trigger on
``dispatches`` writes a sample whenever a dispatch first ends or a provider takes
it), so the budget survives restarts and is shared by every replica. Two SLOs,
from ``[slo.objectives]``:

- ``dispatch_success``: delivered is good; failed and unknown are bad (the
  recipient's own undeliverable is not counted);
- ``send_latency``: a dispatch a provider took within ``threshold_s`` of its
  acceptance is good.

Over ``[slo] window_days`` (30) an SLO of target *t* may spend ``(1 - t)`` of its
events as bad ones: its **budget**. :func:`budget_report` says, per SLO, how much
of it burned over the whole window and in the worst ``freeze_window_days`` (7)
days within it. While more than ``freeze_burned_fraction`` (50%) of a 30-day
budget burned within any 7 days, the policy **freezes** adapter changes: a daemon
that starts with a ``[providers]`` or ``[channels]`` (``adapter_sections``) that
differs from the one the last start recorded is refused (:class:`BudgetFrozen`,
exit 2, one line per changed section saying why), unless started with
``TRIAGE_BREAK_GLASS=reason`` (``triage run --break-glass REASON``), which is
recorded beside the config. :func:`check_freeze` is the one check; a reload
(once the daemon reloads) calls it the same way.

:class:`ErrorBudget` is the daemon's actor for it. Every ``rollup_interval_s`` it
folds the samples into minute buckets (one statement; several replicas never
take one sample twice) and counts them on ``triage_slo_events_total{slo,
outcome}``, the series the burn-rate rules read (``triage rules``: the SRE
workbook's multiwindow pairs from ``[[slo.burn_alerts]]``). Every
``budget_interval_s`` it recomputes the budget gauges::

    triage_slo_budget_burned_ratio{slo}          share of the budget spent over window_days
    triage_slo_budget_worst_window_ratio{slo}    ... within the worst freeze_window_days
    triage_slo_budget_frozen                     1 while the policy freezes adapter changes

``triage budget`` prints the same report from the database.

**Replicas** (issue 12): runs on every replica, no lease. The fold takes each
sample once whichever replica runs it, and every replica needs the budget gauges
and the freeze check of its own start.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter, Gauge

from config.schema import SloConfig, TriageConfig
from engine.actor import Actor, Timer
from engine.errors import ConfigError, ConfigProblem, MailboxFull, ProviderError
from engine.metrics import families
from providers.db.pool import DbPool
from providers.db.slo import (
    SLOS,
    AppliedConfig,
    DayCount,
    WindowCount,
    last_applied_async,
    record_applied_async,
    rollup_async,
    window_counts_async,
)

__all__ = [
    "BREAK_GLASS_ENV",
    "BudgetFrozen",
    "BudgetReport",
    "ErrorBudget",
    "ErrorBudgetMessage",
    "Recompute",
    "Rollup",
    "SloStatus",
    "adapter_digests",
    "budget_report",
    "burn_windows",
    "check_freeze",
    "enforce_freeze",
    "read_report",
]

log = logging.getLogger("triage.error_budget")

#: The environment variable that lets a start through a freeze; its value is the reason.
BREAK_GLASS_ENV = "TRIAGE_BREAK_GLASS"
_DAY_S = 86_400.0


class SloStatus(msgspec.Struct, frozen=True, kw_only=True):
    """One SLO's budget over the window."""

    slo: str
    target: float
    good: int
    bad: int
    budget: float  # bad events the window allows: (1 - target) * events
    burned: float  # bad / budget (0 with no events)
    worst_window_bad: int
    worst_window_end: date | None  # the last day of the worst freeze window
    worst_window_burned: float  # worst_window_bad / budget
    burn_rates: dict[int, float]  # seconds -> (bad share over them) / (1 - target)
    frozen: bool

    @property
    def events(self) -> int:
        return self.good + self.bad


class BudgetReport(msgspec.Struct, frozen=True, kw_only=True):
    """Every SLO's budget, and whether the policy freezes adapter changes."""

    today: date
    window_days: int
    freeze_window_days: int
    limit: float  # freeze_burned_fraction
    slos: list[SloStatus]

    @property
    def frozen(self) -> bool:
        return any(s.frozen for s in self.slos)

    def reasons(self) -> list[str]:
        """Why the policy freezes, one sentence per SLO over the limit."""
        return [
            f"{s.slo} burned {s.worst_window_burned:.0%} of its {self.window_days}-day error"
            f" budget in the {self.freeze_window_days} days to {s.worst_window_end}"
            f" (the policy freezes adapter changes above {self.limit:.0%})"
            for s in self.slos
            if s.frozen
        ]


def burn_windows(config: SloConfig) -> list[float]:
    """The windows the burn rates are reported over (the alerts' long and short ones)."""
    return sorted({w for a in config.burn_alerts for w in (a.long_s, a.short_s)})


def _ratio(bad: float, budget: float) -> float:
    if bad == 0:
        return 0.0
    return bad / budget if budget > 0 else math.inf


def budget_report(
    config: SloConfig,
    days: Iterable[DayCount],
    windows: Iterable[WindowCount] = (),
    *,
    today: date,
) -> BudgetReport:
    """The budget of each SLO from its daily counts over the last ``window_days`` UTC days
    (``today`` the last) and its counts over the burn windows."""
    first = today - timedelta(days=config.window_days - 1)
    span = config.freeze_window_days
    by_slo: dict[str, dict[date, DayCount]] = {slo: {} for slo in SLOS}
    for d in days:
        if d.slo in by_slo and first <= d.day <= today:
            by_slo[d.slo][d.day] = d
    rates: dict[str, dict[int, tuple[int, int]]] = {slo: {} for slo in SLOS}
    for w in windows:
        if w.slo in rates:
            rates[w.slo][round(w.seconds)] = (w.good, w.bad)
    statuses: list[SloStatus] = []
    for slo in SLOS:
        target = getattr(config.objectives, slo).target
        counted = by_slo[slo]
        good = sum(d.good for d in counted.values())
        bad = sum(d.bad for d in counted.values())
        budget = (1.0 - target) * (good + bad)
        # Every freeze window that lies within the budget window, by its last day.
        worst_bad, worst_end = 0, None
        for k in range(span - 1, config.window_days):
            end = first + timedelta(days=k)
            window_bad = sum(
                counted[day].bad
                for day in (end - timedelta(days=j) for j in range(span))
                if day in counted
            )
            if worst_end is None or window_bad > worst_bad:
                worst_bad, worst_end = window_bad, end
        worst = _ratio(worst_bad, budget)
        burn_rates = {
            seconds: _ratio(b, (1.0 - target) * (g + b)) for seconds, (g, b) in rates[slo].items()
        }
        for seconds in (round(w) for w in burn_windows(config)):
            burn_rates.setdefault(seconds, 0.0)
        statuses.append(
            SloStatus(
                slo=slo,
                target=target,
                good=good,
                bad=bad,
                budget=budget,
                burned=_ratio(bad, budget),
                worst_window_bad=worst_bad,
                worst_window_end=worst_end,
                worst_window_burned=worst,
                burn_rates=dict(sorted(burn_rates.items())),
                frozen=config.enabled and worst > config.freeze_burned_fraction,
            )
        )
    return BudgetReport(
        today=today,
        window_days=config.window_days,
        freeze_window_days=span,
        limit=config.freeze_burned_fraction,
        slos=statuses,
    )


# -- the freeze ------------------------------------------------------------------------


class BudgetFrozen(ConfigError):
    """A start (or reload) changed adapter sections while the error budget is frozen."""


def adapter_digests(config: TriageConfig) -> dict[str, str]:
    """A digest of each adapter section (``[slo] adapter_sections``) as decoded."""
    digests: dict[str, str] = {}
    for section in config.slo.adapter_sections:
        encoded = msgspec.json.encode(getattr(config, section))
        digests[section] = hashlib.sha256(encoded).hexdigest()[:16]
    return digests


def _digest(sections: Mapping[str, str]) -> str:
    joined = ";".join(f"{k}={v}" for k, v in sorted(sections.items()))
    return hashlib.sha256(joined.encode()).hexdigest()[:16]


def check_freeze(
    report: BudgetReport,
    last: AppliedConfig | None,
    digests: Mapping[str, str],
    *,
    source: str,
    break_glass: str | None,
) -> list[str]:
    """The adapter sections that changed since ``last``; raises :class:`BudgetFrozen`
    (one problem per changed section) if any did while ``report`` freezes, unless a
    ``break_glass`` reason is given."""
    if last is None:
        return []
    changed = [s for s, d in digests.items() if last.sections.get(s) != d]
    if changed and report.frozen and not break_glass:
        why = "; ".join(report.reasons())
        raise BudgetFrozen(
            ConfigProblem(
                source=source,
                line=None,
                path=f"$.{section}",
                message=(
                    f"changed while the error budget is frozen: {why}. Start with the"
                    f" [{section}] last applied ({last.applied_at:%Y-%m-%d %H:%M} UTC, from"
                    f" {last.source}), or set {BREAK_GLASS_ENV}=REASON"
                    " (`triage run --break-glass REASON`) for an emergency change"
                ),
            )
            for section in changed
        )
    return changed


async def read_report(pool: DbPool, config: SloConfig, *, today: date) -> BudgetReport:
    """The budget report from the database (one crossing)."""
    days, windows = await pool.run_unit(
        window_counts_async, config.window_days, burn_windows(config)
    )
    return budget_report(config, days, windows, today=today)


async def enforce_freeze(
    pool: DbPool,
    config: TriageConfig,
    *,
    source: str,
    today: date,
    break_glass: str | None,
) -> BudgetReport:
    """At start: refuse changed adapter sections during a freeze (:class:`BudgetFrozen`),
    else record the sections this start applies (with the break-glass reason if one let
    a change through a freeze)."""
    report = await read_report(pool, config.slo, today=today)
    last = await pool.run_unit(last_applied_async)
    digests = adapter_digests(config)
    changed = check_freeze(report, last, digests, source=source, break_glass=break_glass)
    if last is None or changed:
        override = break_glass if (changed and report.frozen) else None
        await pool.run_unit(record_applied_async, _digest(digests), digests, source, override)
        if override is not None:
            log.warning(
                "error-budget freeze overridden",
                extra={"reason": override, "sections": changed, "why": report.reasons()},
            )
    if report.frozen:
        log.warning("error budget frozen", extra={"why": report.reasons()})
    return report


# -- the actor -------------------------------------------------------------------------


class Rollup(msgspec.Struct, frozen=True, tag=True):
    """Fold the samples into minute buckets and count them."""


class Recompute(msgspec.Struct, frozen=True, tag=True):
    """Recompute the budget gauges."""


ErrorBudgetMessage = Rollup | Recompute


class _BudgetMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "triage_slo_events_total",
            "SLO events counted from the database, by SLO and outcome (good, bad)",
            ["slo", "outcome"],
            registry=registry,
        )
        self.burned = Gauge(
            "triage_slo_budget_burned_ratio",
            "Share of the SLO's error budget spent over its window",
            ["slo"],
            registry=registry,
        )
        self.worst = Gauge(
            "triage_slo_budget_worst_window_ratio",
            "Share of the SLO's error budget spent within the worst freeze window",
            ["slo"],
            registry=registry,
        )
        self.frozen = Gauge(
            "triage_slo_budget_frozen",
            "1 while the error-budget policy freezes adapter changes",
            registry=registry,
        )


class ErrorBudget(Actor[ErrorBudgetMessage]):
    """Roll the SLO samples up and keep the budget gauges; see the module docstring."""

    name = "error_budget"

    def __init__(
        self,
        pool: DbPool,
        config: SloConfig,
        *,
        registry: CollectorRegistry | None,
        today: Callable[[], date] | None = None,
    ) -> None:
        self.pool = pool
        self.config = config
        self._metrics = families(registry, _BudgetMetrics) if registry is not None else None
        self._today = today if today is not None else _utc_today
        self.rollups = 0
        self.counted: dict[str, tuple[int, int]] = {slo: (0, 0) for slo in SLOS}
        self.report: BudgetReport | None = None
        self.failures = 0

    async def init(self) -> None:
        # The gauges at once, not an interval later (a full mailbox: the timer comes).
        with contextlib.suppress(MailboxFull):
            self.ref.tell_nowait(Recompute())

    def timers(self) -> Sequence[Timer]:
        return [
            Timer(self.config.rollup_interval_s, Rollup()),
            Timer(self.config.budget_interval_s, Recompute()),
        ]

    async def handle(self, message: ErrorBudgetMessage) -> None:
        match message:
            case Rollup():
                await self._rollup()
            case Recompute():
                await self._recompute()

    async def _rollup(self) -> None:
        latency = self.config.objectives.send_latency.threshold_s
        assert latency is not None  # SloObjectives requires it
        retain_s = (self.config.window_days + 1) * _DAY_S
        with trio.move_on_after(self.config.timeout_s):
            try:
                rolled = await self.pool.run_unit(
                    rollup_async, latency, self.config.rollup_batch, retain_s
                )
            except ProviderError as exc:
                self.failures += 1
                log.warning("slo rollup failed", extra={"error": str(exc)})
                return
            self.rollups += 1
            for r in rolled:
                good, bad = self.counted.get(r.slo, (0, 0))
                self.counted[r.slo] = (good + r.good, bad + r.bad)
                if self._metrics is not None:
                    self._metrics.events.labels(r.slo, "good").inc(r.good)
                    self._metrics.events.labels(r.slo, "bad").inc(r.bad)

    async def _recompute(self) -> None:
        with trio.move_on_after(self.config.timeout_s):
            try:
                report = await read_report(self.pool, self.config, today=self._today())
            except ProviderError as exc:
                self.failures += 1
                log.warning("error budget not recomputed", extra={"error": str(exc)})
                return
            was_frozen = self.report is not None and self.report.frozen
            self.report = report
            if report.frozen and not was_frozen:
                log.warning("error budget frozen", extra={"why": report.reasons()})
            elif was_frozen and not report.frozen:
                log.info("error budget freeze lifted")
            if self._metrics is not None:
                for s in report.slos:
                    self._metrics.burned.labels(s.slo).set(_finite(s.burned))
                    self._metrics.worst.labels(s.slo).set(_finite(s.worst_window_burned))
                self._metrics.frozen.set(1.0 if report.frozen else 0.0)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 1e9


def _utc_today() -> date:
    return datetime.now(UTC).date()
