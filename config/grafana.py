"""A Grafana dashboard generated from the failure catalog (``triage dashboard``).

One time-series panel per catalog row, in catalog order, plotting the value its
detector judges (the windowed rate, ratio, count, age, level or spike factor, as
:mod:`engine.detectors` computes it and ``triage rules`` alerts on) with the row's
threshold drawn as a red line, the runbook as the panel's description. Above them
the error budget (burned share and burn rate per SLO, the freeze), and below them
the engine: breaker states, mailbox depth, bulkheads in use, restarts. The queries
read the metrics the daemon exports (``supervisors.vocabulary.METRICS`` and the
engine's), through a ``datasource`` variable; the dashboard's ``uid`` is fixed so a
re-import replaces it.
"""

from __future__ import annotations

from typing import Any, Final

from config.catalog import Catalog, CatalogRow, _duration
from config.schema import DetectorConfig

__all__ = ["UID", "dashboard", "detector_value_expr"]

UID: Final = "triage-catalog"
_DATASOURCE: Final = {"type": "prometheus", "uid": "${datasource}"}
_UNITS: Final = {
    "rate": "ops",
    "ratio": "percentunit",
    "count_in_window": "short",
    "age_of_newest": "s",
    "gauge_sustained": "short",
    "spike_over_baseline": "short",
}


def detector_value_expr(detector: DetectorConfig) -> str:
    """The PromQL of the value ``detector`` compares with its threshold (summed over the
    daemon's replicas where the value is a rate or a count)."""
    m = detector.metric
    w = _duration(detector.window_s)
    match detector.kind:
        case "rate":
            return f"sum(rate({m}[{w}]))"
        case "count_in_window":
            return f"sum(increase({m}[{w}]))"
        case "ratio":
            return f"sum(rate({m}_numerator_total[{w}])) / sum(rate({m}_denominator_total[{w}]))"
        case "spike_over_baseline":
            span = detector.window_s / detector.buckets / detector.baseline_alpha
            return f"sum(rate({m}[{w}])) / sum(rate({m}[{_duration(span)}] offset {w}))"
        case "age_of_newest":
            return f"time() - min({m})"
        case "gauge_sustained":
            return f"max({m})"


class _Grid:
    """Panels placed left to right, two per line, 24 columns wide."""

    def __init__(self) -> None:
        self.y = 0
        self.x = 0
        self.next_id = 1
        self.panels: list[dict[str, Any]] = []

    def row(self, title: str) -> None:
        if self.x:
            self.y += 8
            self.x = 0
        self._add({"type": "row", "title": title, "collapsed": False, "panels": []}, 24, 1)
        self.y += 1

    def panel(self, panel: dict[str, Any], width: int = 12, height: int = 8) -> None:
        if self.x + width > 24:
            self.y += height
            self.x = 0
        self._add(panel, width, height)
        self.x += width

    def _add(self, panel: dict[str, Any], width: int, height: int) -> None:
        panel["id"] = self.next_id
        self.next_id += 1
        panel["gridPos"] = {"x": self.x, "y": self.y, "w": width, "h": height}
        self.panels.append(panel)


def _timeseries(
    title: str,
    targets: list[tuple[str, str]],
    *,
    unit: str = "short",
    description: str = "",
    threshold: float | None = None,
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if threshold is not None:
        steps.append({"color": "red", "value": threshold})
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": _DATASOURCE,
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": expr,
                "legendFormat": legend,
                "datasource": _DATASOURCE,
            }
            for i, (expr, legend) in enumerate(targets)
        ],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {"mode": "absolute", "steps": steps},
                "custom": {"thresholdsStyle": {"mode": "line" if threshold is not None else "off"}},
            },
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
    }


def _row_panel(row: CatalogRow) -> dict[str, Any]:
    detector = row.detector
    title = f"#{row.id} {row.name}"
    return _timeseries(
        title,
        [(detector_value_expr(detector), detector.kind)],
        unit=_UNITS[detector.kind],
        description=f"{row.trigger}. Impact: {row.impact}.\n\n{row.runbook.strip()}",
        threshold=detector.threshold,
    )


def dashboard(catalog: Catalog, *, title: str = "Triage: the failure catalog") -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (import it, or provision it from a file)."""
    grid = _Grid()
    grid.row("Error budget")
    grid.panel(
        _timeseries(
            "Error budget burned (share of the window's budget)",
            [
                ("max by (slo) (triage_slo_budget_burned_ratio)", "{{slo}} window"),
                ("max by (slo) (triage_slo_budget_worst_window_ratio)", "{{slo}} worst 7 days"),
            ],
            unit="percentunit",
            threshold=0.5,
            description="Above half of the budget within the freeze window, adapter changes are"
            " refused at start (`triage budget`).",
        )
    )
    burn = (
        'sum by (slo) (rate(triage_slo_events_total{outcome="bad"}[1h]))'
        " / sum by (slo) (rate(triage_slo_events_total[1h]))"
    )
    grid.panel(
        _timeseries("Bad share of SLO events (1 h)", [(burn, "{{slo}}")], unit="percentunit")
    )
    grid.row("Failure catalog")
    for row in catalog.rows:
        grid.panel(_row_panel(row))
    grid.row("Engine")
    grid.panel(
        _timeseries(
            "Breaker state (0 closed, 1 open, 2 half-open, 3 forced open)",
            [("max by (breaker) (triage_breaker_state)", "{{breaker}}")],
        )
    )
    grid.panel(
        _timeseries("Mailbox depth", [("max by (actor) (triage_mailbox_depth)", "{{actor}}")])
    )
    grid.panel(
        _timeseries(
            "Bulkhead permits in use",
            [("max by (bulkhead) (triage_bulkhead_in_use)", "{{bulkhead}}")],
        )
    )
    grid.panel(
        _timeseries(
            "Restarts per minute",
            [("sum by (child) (increase(triage_actor_restarts_total[1m]))", "{{child}}")],
        )
    )
    return {
        "uid": UID,
        "title": title,
        "tags": ["triage"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                    "current": {},
                }
            ]
        },
        "annotations": {"list": []},
        "panels": grid.panels,
        "description": (
            f"Generated by `triage dashboard` from the catalog ({len(catalog.rows)} rows):"
            " each row's detector value against its threshold."
        ),
    }
