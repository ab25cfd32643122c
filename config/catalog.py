"""The failure catalog as data, and the Prometheus alert rules derived from it.

``failures.toml`` holds one ``[[rows]]`` table per catalogued failure: what
triggers it, what users see, the detector that notices it, the mitigations
that run, the actor that owns it and the runbook for the on-call. The loader
checks every row against a vocabulary passed in by the caller (metric names and
mitigation names, kept in ``supervisors.vocabulary``), so a row can only name
things the code knows.

Metric conventions (what the exporter publishes, what the rules query), per
detector kind, for a catalog metric ``M``:

=====================  =========================================  ======================
kind                   exported series                            name must end in
=====================  =========================================  ======================
rate                   counter ``M``                              ``_total``
count_in_window        counter ``M``                              ``_total``
spike_over_baseline    counter ``M``                              ``_total``
ratio                  counters ``M_numerator_total`` and         ``_ratio``
                       ``M_denominator_total``
age_of_newest          gauge ``M``: Unix time of the newest       ``_timestamp_seconds``
                       event (or oldest pending; none: now)
gauge_sustained        gauge ``M``                                (not ``_total``)
=====================  =========================================  ======================
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import msgspec

from config.loader import (
    PathParts,
    Reporter,
    parse_toml,
    read_text,
    toml_repr,
)
from config.schema import DetectorConfig, DetectorKind, SloConfig, TriageConfig
from config.slo_rules import burn_rate_rules

__all__ = [
    "CATALOG_SIZE",
    "Catalog",
    "CatalogRow",
    "alert_name",
    "alert_rules",
    "derive_built",
    "describe_detector",
    "load_catalog",
    "load_catalog_text",
    "module_path",
    "project_root",
    "prometheus_expr",
    "row_detector",
    "rules_yaml",
]

#: The catalog has exactly these ids: 1..CATALOG_SIZE.
CATALOG_SIZE: Final = 20

Severity = Literal["page", "ticket", "info"]
_Text = Annotated[str, msgspec.Meta(min_length=1)]


class CatalogRow(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One catalogued failure, and where the code that answers it lives.

    ``module`` is the owning actor's file and ``scenario`` its chaos scenario,
    both relative to the project root (:func:`project_root`); ``owner`` is named
    after ``module``. Whether the row is built is not written here but derived
    (:func:`derive_built`): the module is wired into the daemon's tree and the
    scenario exists. ``issue`` names the issue that builds it (None: a later one).
    """

    id: Annotated[int, msgspec.Meta(ge=1, le=CATALOG_SIZE)]
    name: _Text
    trigger: _Text
    impact: _Text
    detector: DetectorConfig
    mitigations: Annotated[tuple[_Text, ...], msgspec.Meta(min_length=1)]
    owner: _Text
    module: Annotated[str, msgspec.Meta(pattern=r"^actors/[a-z_][a-z0-9_]*\.py$")]
    scenario: Annotated[str, msgspec.Meta(pattern=r"^bench/chaos/scenario_[a-z0-9_]+\.py$")]
    severity: Severity
    runbook: _Text
    issue: Annotated[int, msgspec.Meta(ge=1)] | None = None


class Catalog(msgspec.Struct, frozen=True, kw_only=True):
    """The twenty rows, ordered by id, and the ids of the built ones (derived)."""

    rows: tuple[CatalogRow, ...]
    #: The file the rows were read from (for messages).
    source: str = "<catalog>"
    #: Rows whose module the tree wires and whose scenario exists: see :func:`derive_built`.
    built: frozenset[int] = frozenset()

    def row(self, id: int) -> CatalogRow:
        """The row with this id; ``KeyError`` if there is none."""
        for row in self.rows:
            if row.id == id:
                return row
        raise KeyError(id)

    def is_built(self, id: int) -> bool:
        return id in self.built

    def state(self, row: CatalogRow) -> str:
        """``built``, ``not built (issue 3)`` or ``not built (later)``."""
        if self.is_built(row.id):
            return "built"
        return f"not built (issue {row.issue})" if row.issue is not None else "not built (later)"


def project_root() -> Path:
    """The directory the catalog's ``module`` and ``scenario`` paths are relative to."""
    return Path(__file__).resolve().parent.parent


def module_path(module: str) -> str:
    """A dotted module name as the catalog writes it: ``actors.inbox`` -> ``actors/inbox.py``."""
    return module.replace(".", "/") + ".py"


def derive_built(catalog: Catalog, *, wired: Collection[str], root: Path | None = None) -> Catalog:
    """``catalog`` with ``built`` derived: the rows whose ``module`` is in ``wired`` (the
    modules the daemon's tree wires, as :func:`module_path` writes them) and whose
    ``scenario`` file exists under ``root`` (default :func:`project_root`)."""
    base = project_root() if root is None else root
    built = frozenset(
        row.id for row in catalog.rows if row.module in wired and (base / row.scenario).is_file()
    )
    return msgspec.structs.replace(catalog, built=built)


# -- loading -------------------------------------------------------------------------------

_SUFFIX: Final[Mapping[DetectorKind, str]] = {
    "rate": "_total",
    "count_in_window": "_total",
    "spike_over_baseline": "_total",
    "ratio": "_ratio",
    "age_of_newest": "_timestamp_seconds",
}


def _metric_shape_problem(kind: DetectorKind, metric: str) -> str | None:
    if kind == "gauge_sustained":
        if metric.endswith("_total"):
            return "a gauge_sustained metric is a gauge; its name must not end in _total"
        return None
    suffix = _SUFFIX[kind]
    if not metric.endswith(suffix):
        return f"a {kind} metric must be named ...{suffix}"
    return None


def _unknown(kind: str, name: str, known: Mapping[str, str]) -> str:
    message = f"unknown {kind} {toml_repr(name)}"
    close = difflib.get_close_matches(name, list(known), n=1)
    return message + (f" (did you mean {toml_repr(close[0])}?)" if close else "")


def load_catalog(
    path: str | os.PathLike[str],
    *,
    metrics: Mapping[str, str],
    mitigations: Mapping[str, str],
) -> Catalog:
    """Read and check a catalog file against the metric and mitigation vocabularies.

    Raises :class:`~engine.errors.ConfigError` naming the row and field of
    every problem: unknown keys or detector kinds, out-of-range values, a
    metric not in ``metrics``, a mitigation not in ``mitigations``, duplicate or
    missing ids (all of 1..20 must be present).
    """
    return load_catalog_text(
        read_text(path), os.fspath(path), metrics=metrics, mitigations=mitigations
    )


def load_catalog_text(
    text: str,
    source: str = "<string>",
    *,
    metrics: Mapping[str, str],
    mitigations: Mapping[str, str],
) -> Catalog:
    """Like :func:`load_catalog`, from TOML text; ``source`` names it in messages."""
    raw = parse_toml(text, source)
    report = Reporter(text, source)
    for key in raw:
        if key != "rows":
            report.add((key,), "unknown key")
    entries = raw.get("rows", [])
    if not isinstance(entries, list):
        report.add(("rows",), "expected an array of tables [[rows]]")
        entries = []

    def add(row_label: str, parts: PathParts, message: str) -> None:
        report.add(parts, f"{row_label}: {message}")

    rows: list[CatalogRow] = []
    first_index: dict[int, int] = {}
    written_ids: set[object] = set()
    for index, entry in enumerate(entries):
        parts: PathParts = ("rows", index)
        label = f"row #{index + 1}"
        if isinstance(entry, dict):
            written_ids.add(entry.get("id"))
            if isinstance(entry.get("id"), int) and not isinstance(entry.get("id"), bool):
                label = f"row {entry['id']}"
            if isinstance(entry.get("name"), str):
                label += f" ({entry['name']})"
        row, problem, _ = report.attempt(entry, CatalogRow, parts)
        if problem is not None:
            report.problems.append(
                dataclasses.replace(problem, message=f"{label}: {problem.message}")
            )
            continue
        assert row is not None  # attempt returns a row or a problem
        if row.id in first_index:
            add(label, (*parts, "id"), f"duplicate id (also rows[{first_index[row.id]}])")
        else:
            first_index[row.id] = index
        if Path(row.module).stem != row.owner:
            add(label, (*parts, "owner"), f"must be named after its module ({row.module})")
        detector = row.detector
        if detector.base is not None:
            add(label, (*parts, "detector", "base"), "profiles do not apply in the catalog")
        if detector.metric not in metrics:
            add(label, (*parts, "detector", "metric"), _unknown("metric", detector.metric, metrics))
        elif (shape := _metric_shape_problem(detector.kind, detector.metric)) is not None:
            add(label, (*parts, "detector", "metric"), shape)
        for i, action in enumerate(row.mitigations):
            if action not in mitigations:
                add(label, (*parts, "mitigations", i), _unknown("mitigation", action, mitigations))
        rows.append(row)

    missing = sorted(set(range(1, CATALOG_SIZE + 1)) - written_ids)
    if missing:
        report.add(("rows",), "missing ids: " + ", ".join(map(str, missing)))
    report.raise_if_any()
    return Catalog(rows=tuple(sorted(rows, key=lambda r: r.id)), source=source)


# -- presentation --------------------------------------------------------------------------


def _number(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _duration(seconds: float) -> str:
    """A Prometheus duration, to the millisecond: ``300s``, or ``1500ms``."""
    ms = max(1, round(seconds * 1000))
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


_OP: Final = {"gt": ">", "lt": "<"}


def describe_detector(detector: DetectorConfig) -> str:
    """One line for humans, e.g. ``ratio triage_sms_provider_error_ratio > 0.2 / 300s``."""
    op = _OP[detector.op]
    threshold = _number(detector.threshold)
    if detector.kind == "age_of_newest":
        text = f"age_of_newest {detector.metric} {op} {threshold}s"
    elif detector.kind == "spike_over_baseline":
        text = f"spike_over_baseline {detector.metric} {op} {threshold}x baseline / {_number(detector.window_s)}s"
    else:
        text = f"{detector.kind} {detector.metric} {op} {threshold} / {_number(detector.window_s)}s"
    if detector.for_s > 0:
        text += f" for {_number(detector.for_s)}s"
    if detector.min_volume > 0:
        if detector.kind == "ratio":
            text += f" (min {detector.min_volume})"
        else:
            text += f" (warm-up {detector.min_volume} buckets)"
    return text


def prometheus_expr(detector: DetectorConfig) -> str:
    """The PromQL condition equivalent to a detector (see the module docstring).

    ``min_volume`` becomes a volume condition on a ratio's denominator; for a
    spike, whose ``min_volume`` is a warm-up, the baseline must be above zero.
    The in-process spike baseline is an EWMA over the buckets that left the
    window; its span, about ``1 / baseline_alpha`` buckets, becomes the range
    of the baseline rate just before the window.
    """
    m = detector.metric
    w = _duration(detector.window_s)
    op = _OP[detector.op]
    t = _number(detector.threshold)
    match detector.kind:
        case "rate":
            return f"rate({m}[{w}]) {op} {t}"
        case "count_in_window":
            return f"increase({m}[{w}]) {op} {t}"
        case "ratio":
            num, den = f"{m}_numerator_total", f"{m}_denominator_total"
            cond = f"rate({num}[{w}]) / rate({den}[{w}]) {op} {t}"
            if detector.min_volume > 0:
                cond = f"({cond}) and (increase({den}[{w}]) >= {detector.min_volume})"
            return cond
        case "spike_over_baseline":
            span = detector.window_s / detector.buckets / detector.baseline_alpha
            baseline = f"rate({m}[{_duration(span)}] offset {w})"
            return f"(rate({m}[{w}]) {op} {t} * {baseline}) and ({baseline} > 0)"
        case "age_of_newest":
            return f"time() - {m} > {t}"
        case "gauge_sustained":
            return f"{m} {op} {t}"


def alert_name(row: CatalogRow) -> str:
    """``TriageSmsProviderOutage`` for "SMS provider outage"."""
    words = re.findall(r"[A-Za-z0-9]+", row.name)
    return "Triage" + "".join(w[:1].upper() + w[1:].lower() for w in words)


def alert_rules(catalog: Catalog, *, group: str = "triage-failure-catalog") -> dict[str, Any]:
    """The catalog as a Prometheus rule file (as data): one alert per row."""
    rules: list[dict[str, Any]] = []
    for row in catalog.rows:
        rule: dict[str, Any] = {"alert": alert_name(row), "expr": prometheus_expr(row.detector)}
        if row.detector.for_s > 0:
            rule["for"] = _duration(row.detector.for_s)
        rule["labels"] = {
            "severity": row.severity,
            "catalog_id": str(row.id),
            "owner": row.owner,
        }
        rule["annotations"] = {
            "summary": f"#{row.id} {row.name}: {describe_detector(row.detector)}",
            "description": f"Trigger: {row.trigger}. Impact: {row.impact}.",
            "mitigations": ", ".join(row.mitigations),
            "status": catalog.state(row),
            "module": row.module,
            "scenario": row.scenario,
            "runbook": row.runbook.strip(),
        }
        rules.append(rule)
    return {"groups": [{"name": group, "rules": rules}]}


_YAML_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _yaml_scalar(value: object, indent: int) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _number(value)
    if isinstance(value, str):
        lines = value.split("\n")
        if (
            len(lines) > 1
            and not value.startswith((" ", "\n"))
            and not value.endswith("\n")
            and all(line.isprintable() for line in lines)
        ):
            pad = " " * indent
            return "|-\n" + "\n".join(pad + line if line else "" for line in lines)
        return json.dumps(value)
    raise TypeError(f"cannot write {type(value).__name__} as YAML")


def _yaml_lines(value: object, indent: int, out: list[str]) -> None:
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not _YAML_KEY.fullmatch(key):
                raise ValueError(f"not a plain YAML key: {key!r}")
            if isinstance(item, dict | list) and item:
                out.append(f"{pad}{key}:")
                _yaml_lines(item, indent + 2, out)
            else:
                out.append(f"{pad}{key}: {_yaml_block_or_scalar(item, indent + 2)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict | list) and item:
                nested: list[str] = []
                _yaml_lines(item, indent + 2, nested)
                out.append(f"{pad}- {nested[0][indent + 2 :]}")
                out.extend(nested[1:])
            else:
                out.append(f"{pad}- {_yaml_block_or_scalar(item, indent + 2)}")
    else:
        raise TypeError(f"expected a mapping or a sequence, got {type(value).__name__}")


def _yaml_block_or_scalar(value: object, indent: int) -> str:
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _yaml_scalar(value, indent)


def to_yaml(document: Mapping[str, Any]) -> str:
    """A small block-style YAML writer for plain data (maps, lists, str, numbers, bools).

    Strings are double-quoted with JSON escapes (valid YAML), multi-line ones
    written as ``|-`` literal blocks.
    """
    out: list[str] = []
    _yaml_lines(dict(document), 0, out)
    return "\n".join(out) + "\n"


def rules_yaml(catalog: Catalog, slo: SloConfig | None = None) -> str:
    """The Prometheus alert rules for ``catalog`` as a YAML rule file; with ``slo``, the
    error budget's burn-rate alerts too (:mod:`config.slo_rules`), in a second group."""
    header = "# Prometheus alert rules generated by `triage rules` from the failure catalog"
    header += " and [slo].\n" if slo is not None else ".\n"
    header += "# Do not edit: change config/failures.toml (and [slo]) and regenerate.\n"
    document = alert_rules(catalog)
    if slo is not None:
        document["groups"].append(burn_rate_rules(slo))
    return header + to_yaml(document)


def row_override(config: TriageConfig, row: CatalogRow) -> DetectorConfig:
    """Row ``row``'s detector settings in a daemon: a ``[detectors.*]`` section on the
    row's own metric replaces the row's (chaos.toml shortens windows that way), else
    the catalog row's own."""
    for section in config.detectors.values():
        if section.metric == row.detector.metric:
            return section
    return row.detector


def overrides_a_row(catalog: Catalog, section: DetectorConfig) -> bool:
    """Whether a ``[detectors.*]`` section is a row's override (not a detector of its own)."""
    return any(row.detector.metric == section.metric for row in catalog.rows)


def row_detector(
    config: TriageConfig, catalog: Catalog, row_id: int, override: str
) -> DetectorConfig:
    """Row ``row_id``'s detector settings: ``[detectors.<override>]`` when the config has
    one (chaos.toml shortens windows that way), else the catalog row's own."""
    found = config.detectors.get(override)
    return found if found is not None else catalog.row(row_id).detector
