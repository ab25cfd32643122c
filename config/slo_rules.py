"""The error-budget policy's burn-rate alerts as Prometheus rules (``triage rules``).

One alert per SLO and ``[[slo.burn_alerts]]`` pair, as the SRE workbook builds
them ("multiwindow, multi-burn-rate"): the share of bad events over the long
window *and* over the short one are both above ``factor * (1 - target)``, i.e.
the budget burns ``factor`` times faster than the window allows. The long window
makes it real, the short one makes it stop soon after the burn stops. Both read
``triage_slo_events_total{slo, outcome}``, counted from the database by the
error-budget actor (:mod:`actors.error_budget`).
"""

from __future__ import annotations

from typing import Any

from config.schema import BurnAlert, SloConfig

__all__ = ["EVENTS", "burn_rate_rules", "window_label"]

#: The counter the rules read (``slo``, ``outcome`` = good | bad).
EVENTS = "triage_slo_events_total"
ALERT = "TriageErrorBudgetBurn"


def window_label(seconds: float) -> str:
    """``3600`` -> ``1h``; PromQL's duration units, largest exact first."""
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _bad_share(slo: str, window: str) -> str:
    bad = f'sum(rate({EVENTS}{{slo="{slo}",outcome="bad"}}[{window}]))'
    every = f'sum(rate({EVENTS}{{slo="{slo}"}}[{window}]))'
    return f"({bad} / {every})"


def _rule(slo: str, target: float, alert: BurnAlert) -> dict[str, Any]:
    threshold = f"{alert.factor * (1.0 - target):.6g}"
    long, short = window_label(alert.long_s), window_label(alert.short_s)
    expr = f"{_bad_share(slo, long)} > {threshold} and {_bad_share(slo, short)} > {threshold}"
    return {
        "alert": ALERT,
        "expr": expr,
        "labels": {
            "severity": alert.severity,
            "slo": slo,
            "long_window": long,
            "short_window": short,
            "burn_rate": f"{alert.factor:g}",
        },
        "annotations": {
            "summary": (
                f"{slo} burns its error budget {alert.factor:g}x too fast"
                f" (over {long} and {short}; target {target:.3%})"
            ),
            "description": (
                f"More than {float(threshold):.4%} of {slo} events were bad over the last"
                f" {long} and the last {short}. At this rate the budget of the SLO window"
                f" is spent in 1/{alert.factor:g} of it. `triage budget` shows the burn;"
                " above half of the budget within the freeze window, adapter changes are"
                " refused."
            ),
        },
    }


def burn_rate_rules(slo: SloConfig, *, group: str = "triage-slo-burn-rate") -> dict[str, Any]:
    """The burn-rate alert group for ``slo`` (one rule per SLO and alert pair)."""
    rules = [
        _rule(name, getattr(slo.objectives, name).target, alert)
        for name in ("dispatch_success", "send_latency")
        for alert in slo.burn_alerts
    ]
    return {"name": group, "rules": rules}
