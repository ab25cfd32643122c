"""The hot reload (issue 12): SIGHUP, or a change of the config, reloads the config.

The watch (:meth:`Reloader.poll`) looks every ``daemon.reload_poll_s`` at every file
the config is read from (:func:`~config.loader.source_files`): the file itself, each
file of its ``extends`` chain, and the catalog it names. It compares their contents
(a digest each), not their stat: an edit of the base file reloads exactly as an edit
of the top file does, a symlink swapped to a new target (a Kubernetes ConfigMap's
``..data``) is seen by reading through it, and an edit that keeps the size within
one mtime tick is not missed. A ``touch`` changes nothing and reloads nothing.

A :class:`Reloader` run, step by step (:meth:`Reloader.reload`):

1. load and validate the file as ``triage run`` does at start (the loader's
   checks, the catalog it names, :func:`~supervisors.tree.check_config`, the
   providers' endpoints when the emulators are off). A bad file is refused:
   ``config reload failed`` is logged with the file and one ``FILE: $.path:
   message`` line per problem, a :class:`~engine.events.ReloadFailed` event is
   emitted, ``triage_config_reloads_total{result="failed"}`` counts it, and the
   running config stays, untouched;
2. diff it against the running config, key by key (:func:`diff`), and sort each
   changed path (:func:`classify`): ``[breakers.*]``, ``[bulkheads.*]``,
   ``[detectors.*]`` and the catalog rows' detector settings apply live, as do
   ``daemon.reload_poll_s`` and ``daemon.log_level``; everything else needs a
   restart (logged and in the report, not applied);
3. the error-budget freeze (``[slo] enabled``): a changed adapter section
   (``[slo] adapter_sections``) while the budget is frozen is refused with the
   reason, as at start (:func:`~actors.error_budget.check_freeze`), unless
   ``TRIAGE_BREAK_GLASS`` gives one; the other changes still apply;
4. apply: every registered breaker and bulkhead (:class:`~engine.tuning.Tunables`)
   and every detector is retuned in place (:meth:`~engine.breaker.Breaker.retune`,
   :meth:`~engine.bulkhead.Bulkhead.retune`, :meth:`~engine.detectors.Detector.retune`):
   state, trip counts and window counts are kept (a HALF_OPEN breaker stays
   HALF_OPEN), a bulkhead's calls in flight are never cancelled (a lower capacity
   admits the next call once fewer are in flight, a higher one admits waiters at
   once); a window whose shape changes is migrated by time and the report says how
   many counts were kept (``window reshaped`` is logged at warning). Every value is
   checked before any object changes, so a reload applies all of its live changes
   or none.

The report (:class:`ReloadReport`) is logged (``config reloaded``) and kept as
:attr:`Reloader.last`; ``/metrics`` shows the effective breaker settings
(``triage_breaker_setting{breaker,setting}``), window counts
(``triage_breaker_window_calls``) and bulkhead settings
(``triage_bulkhead_setting{bulkhead,setting}``) through :class:`TunablesCollector`.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from functools import partial
from pathlib import Path
from typing import Any, Final, Protocol

import msgspec
import trio
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from actors.error_budget import (
    BREAK_GLASS_ENV,
    BudgetFrozen,
    BudgetReport,
    adapter_digests,
    check_freeze,
)
from actors.error_budget import read_report as read_budget_report
from config import (
    Catalog,
    ConfigError,
    TriageConfig,
    catalog_path,
    load_catalog,
    load_config,
    source_files,
)
from config.catalog import row_override
from config.schema import SloConfig, engine_kwargs
from engine.breaker import Breaker
from engine.bulkhead import Bulkhead
from engine.detectors import Detector, DetectorSet, make_detector
from engine.errors import ConfigProblem
from engine.events import ReloadFailed
from engine.runtime import Runtime
from providers.db.slo import AppliedConfig
from supervisors.emulated import resolve_endpoints
from supervisors.logging import LEVELS
from supervisors.tree import built_catalog, check_config
from supervisors.vocabulary import METRICS, MITIGATIONS

__all__ = [
    "LIVE",
    "RESTART",
    "Change",
    "ReloadReport",
    "Reloader",
    "TunablesCollector",
    "classify",
    "detector_rule",
    "detector_settings",
    "diff",
    "load_checked",
]

log = logging.getLogger("triage.reload")

LIVE: Final = "live"
RESTART: Final = "restart"

#: ``[daemon]`` keys a reload applies at once.
_LIVE_DAEMON_KEYS: Final = frozenset({"reload_poll_s", "log_level"})


@dataclass(frozen=True)
class Change:
    """One changed key: its TOML path, the values before and after (``None``: absent)."""

    path: str
    old: Any
    new: Any

    how: str = ""  # live or restart (:func:`classify`); diff fills it in

    def __str__(self) -> str:
        return f"{self.path}: {self.old!r} -> {self.new!r} ({self.how})"


def _flatten(value: Any, path: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):  # an empty table has no keys to differ in
        for key in sorted(value):
            _flatten(value[key], f"{path}.{key}", out)
    else:
        out[path] = value


def flatten(config: TriageConfig) -> dict[str, Any]:
    """Every leaf of ``config`` by TOML path (``$.breakers.default.fail_max``)."""
    out: dict[str, Any] = {}
    _flatten(msgspec.to_builtins(config), "$", out)
    return out


_ABSENT: Final = object()


def diff(old: TriageConfig, new: TriageConfig, catalog: Catalog | None = None) -> list[Change]:
    """The keys whose decoded values differ, path by path, sorted, each classified
    (:func:`classify`; ``catalog`` tells a row's ``[detectors.*]`` override apart)."""
    before, after = flatten(old), flatten(new)
    changes = []
    for path in sorted(before.keys() | after.keys()):
        a, b = before.get(path, _ABSENT), after.get(path, _ABSENT)
        if a != b:
            how = classify(path, old, new, catalog)
            changes.append(
                Change(path, None if a is _ABSENT else a, None if b is _ABSENT else b, how)
            )
    return changes


def classify(
    path: str,
    old: TriageConfig | None = None,
    new: TriageConfig | None = None,
    catalog: Catalog | None = None,
) -> str:
    """``live`` if a reload applies ``path`` in place, else ``restart``.

    Live: a breaker profile's thresholds and windows; a bulkhead profile's capacity,
    wait and partitions; a ``[detectors.*]`` section's
    thresholds, hysteresis and window; a whole row override (a ``[detectors.*]`` on a
    catalog row's metric, of the row's kind) added or removed, since the row's detector
    takes it, or its row's settings back, in place; ``daemon.reload_poll_s`` and
    ``daemon.log_level``. Anything else needs a restart (a detector's ``kind`` or
    ``metric``, a detector section nobody runs yet, every other section)."""
    parts = path.split(".")
    if len(parts) >= 4 and parts[1] == "breakers":
        return LIVE if parts[3] in (*Breaker.TUNABLE, "base") else RESTART
    if len(parts) >= 4 and parts[1] == "bulkheads":
        return LIVE if parts[3] in (*Bulkhead.TUNABLE, "base") else RESTART
    if len(parts) >= 4 and parts[1] == "detectors":
        name = parts[2]
        was = old.detectors.get(name) if old is not None else None
        now = new.detectors.get(name) if new is not None else None
        if (was is None) != (now is None):  # the section comes or goes
            section = was if was is not None else now
            return LIVE if _row_override_of_its_kind(catalog, section) else RESTART
        return LIVE if parts[3] in (*Detector.TUNABLE, "base") else RESTART
    if len(parts) == 3 and parts[1] == "daemon" and parts[2] in _LIVE_DAEMON_KEYS:
        return LIVE
    return RESTART


def _row_override_of_its_kind(catalog: Catalog | None, section: Any) -> bool:
    if catalog is None or section is None:
        return False
    return any(
        row.detector.metric == section.metric and row.detector.kind == section.kind
        for row in catalog.rows
    )


def load_checked(path: str, *, endpoints: bool = True) -> tuple[TriageConfig, Catalog]:
    """Load ``path`` and the catalog it names with every check ``triage run`` makes at
    start; raises :class:`ConfigError` (each problem with its file and TOML path).

    ``endpoints`` False skips the providers' addresses and secrets (read from this
    process's environment), as ``triage check-config`` does."""
    config = load_config(path)
    catalog = load_catalog(catalog_path(config, path), metrics=METRICS, mitigations=MITIGATIONS)
    try:
        check_config(config, catalog, path)
        if endpoints and not config.emulators.enabled:
            resolve_endpoints(config)
    except ConfigError as exc:
        placed = (replace(p, source=path) if p.source == "<config>" else p for p in exc.problems)
        raise ConfigError(placed) from exc
    return config, catalog


@dataclass
class ReloadReport:
    """What one reload did. ``ok`` False: the file was refused (``problems``)."""

    source: str
    ok: bool
    changes: list[Change] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # one line per value changed in place
    migrated: list[str] = field(default_factory=list)  # the window reshapes among them
    restart: list[str] = field(default_factory=list)  # paths changed but not applied
    refused: list[str] = field(default_factory=list)  # paths refused by the budget freeze
    problems: list[str] = field(default_factory=list)
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "ok": self.ok,
            "changes": [str(c) for c in self.changes],
            "applied": self.applied,
            "migrated": self.migrated,
            "restart": self.restart,
            "refused": self.refused,
            "problems": self.problems,
            "duration_s": self.duration_s,
        }


class BudgetSource(Protocol):
    """Where the error budget is read (the database: :func:`~actors.error_budget.read_report`)."""

    def __call__(self, config: SloConfig, *, today: date) -> Awaitable[BudgetReport]: ...


def detector_settings(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The effective settings of a detector built from ``kwargs`` (ConfigError if refused)."""
    return make_detector(name, **kwargs).settings()


def detector_rule(
    name: str, row: int | None, config: TriageConfig, catalog: Catalog
) -> dict[str, Any] | None:
    """The constructor keywords ``config`` gives the detector ``name`` (of catalog row
    ``row``, if any): the row's settings with their overrides, or ``[detectors.<name>]``;
    None when ``config`` has no rule for it."""
    if row is not None:
        try:
            found = catalog.row(row)
        except (KeyError, LookupError):
            return None
        return engine_kwargs(row_override(config, found))
    section = config.detectors.get(name)
    return None if section is None else engine_kwargs(section)


class Reloader:
    """Reloads the daemon's config file into the running objects (one reload at a time).

    ``config`` and ``catalog`` are what runs; after a reload they are the effective
    config (the live changes in, the restart-only ones not). ``detectors``: the tree's
    set; ``pool``: the database, where ``budget`` reads the error budget for the freeze
    (neither: no freeze check).
    """

    def __init__(
        self,
        config: TriageConfig,
        catalog: Catalog,
        runtime: Runtime,
        detectors: DetectorSet,
        *,
        source: str,
        pool: Any = None,
        env: Mapping[str, str] | None = None,
        started_at: datetime | None = None,
        budget: BudgetSource | None = None,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.runtime = runtime
        self.detectors = detectors
        self.source = source
        self.pool = pool
        self.env: Mapping[str, str] = os.environ if env is None else env
        self.started_at = started_at if started_at is not None else datetime.now(UTC)
        if budget is None and pool is not None:
            budget = partial(read_budget_report, pool)
        self._budget = budget
        self.last: ReloadReport | None = None
        self._lock = trio.Lock()
        self._files = source_files(source)
        self._stamp = _stamp(self._files)
        self._counter: Counter | None = None
        if runtime.metrics is not None:
            registry = runtime.metrics.registry
            self._counter = Counter(
                "triage_config_reloads",
                "Config reloads (SIGHUP or a change of the file) by result: ok, failed",
                ["result"],
                registry=registry,
            )
            for result in ("ok", "failed"):
                self._counter.labels(result)
            registry.register(TunablesCollector(runtime, detectors))

    # -- the watch --------------------------------------------------------------

    @property
    def watchable(self) -> bool:
        """Whether the source is a file that could be read (else there is nothing to poll)."""
        return self._stamp[0][1] is not None

    @property
    def watched(self) -> tuple[Path, ...]:
        """The files the poll looks at: the config, each file it extends, its catalog."""
        return tuple(self._files)

    def file_changed(self) -> Path | None:
        """The first watched file whose content changed since the last look, or None.

        After a change the chain is followed anew: an edited ``extends`` or ``catalog``
        moves the watch to the files the config now names."""
        stamp = _stamp(self._files)
        if stamp == self._stamp:
            return None
        changed = next(
            (path for path, now, was in zip(self._files, stamp, self._stamp, strict=True)
             if now != was),
            self._files[0],
        )  # fmt: skip
        self._restamp()
        return changed

    def _restamp(self) -> None:
        self._files = source_files(self.source)
        self._stamp = _stamp(self._files)

    async def poll(self, request: Callable[[str], None] | None = None) -> None:
        """Ask for a reload (``request``, else :meth:`reload` at once) whenever a watched
        file changes, looking every ``daemon.reload_poll_s`` (read anew each round: a
        reload may change it; 0 stops the poll). The trigger names the file."""
        while (interval := self.config.daemon.reload_poll_s) > 0:
            await trio.sleep(interval)
            # Read on Trio's thread, not in a worker: a few small files, and the
            # autojump clock of the tests must not run ahead of the look.
            changed = self.file_changed()
            if changed is not None:
                trigger = f"file changed: {changed}"
                if request is not None:
                    request(trigger)
                else:
                    await self.reload(trigger)

    # -- one reload ---------------------------------------------------------------

    async def reload(self, trigger: str = "SIGHUP") -> ReloadReport:
        async with self._lock:
            begun = trio.current_time()
            # Stamped before the files are read: an edit during the reload is a change
            # the next poll sees (a spare reload at worst, never a lost edit).
            self._restamp()
            report = await self._reload()
            report.duration_s = trio.current_time() - begun
            self.last = report
            if self._counter is not None:
                self._counter.labels("ok" if report.ok else "failed").inc()
            if report.ok:
                log.info("config reloaded", extra={"trigger": trigger, **report.as_dict()})
            else:
                log.error(
                    "config reload failed: %s",
                    "; ".join(report.problems),
                    extra={"trigger": trigger, **report.as_dict()},
                )
                events = self.runtime.events
                events.emit(
                    ReloadFailed(
                        at=trio.current_time(),
                        wall=self.runtime.clock.wall(),
                        source=self.source,
                        problems=report.problems,
                    )
                )
            return report

    async def _reload(self) -> ReloadReport:
        try:
            # In a thread: the checks dry-build the tree under a trio.run of their own.
            new, catalog = await trio.to_thread.run_sync(load_checked, self.source)
        except ConfigError as exc:
            return ReloadReport(self.source, ok=False, problems=[str(p) for p in exc.problems])
        catalog = built_catalog(catalog)
        report = ReloadReport(self.source, ok=True, changes=diff(self.config, new, catalog))
        refused = await self._frozen_sections(new)
        for change in report.changes:
            section = change.path.split(".")[1] if "." in change.path else change.path
            if section in refused:
                report.refused.append(f"{change.path}: {refused[section]}")
            elif change.how == RESTART:
                report.restart.append(change.path)
        try:
            plan = self._plan(new, catalog, refused)
        except ConfigError as exc:
            return ReloadReport(self.source, ok=False, problems=[str(p) for p in exc.problems])
        for apply in plan:
            lines = apply()
            report.applied += lines
            report.migrated += [line for line in lines if _reshapes(line)]
        for line in report.migrated:
            log.warning("window reshaped: %s", line, extra={"source": self.source})
        for path in report.restart:
            log.warning("config change needs a restart: %s", path, extra={"path": path})
        for line in report.refused:
            log.warning("config change refused: %s", line, extra={"source": self.source})
        self._adopt(new, catalog, refused)
        return report

    async def _frozen_sections(self, new: TriageConfig) -> dict[str, str]:
        """Adapter section -> why it is refused (the budget is frozen); empty if none."""
        if self._budget is None or not new.slo.enabled:
            return {}
        running = adapter_digests(self.config)
        wanted = adapter_digests(new)
        if running == wanted:
            return {}
        today: date = datetime.fromtimestamp(self.runtime.clock.wall(), UTC).date()
        report = await self._budget(new.slo, today=today)
        last = AppliedConfig(
            applied_at=self.started_at,
            digest="",
            sections=running,
            source=self.source,
            override=None,
        )
        try:
            check_freeze(
                report,
                last,
                wanted,
                source=self.source,
                break_glass=self.env.get(BREAK_GLASS_ENV) or None,
            )
        except BudgetFrozen as exc:
            return {p.path.removeprefix("$."): p.message for p in exc.problems}
        return {}

    def _plan(
        self, new: TriageConfig, catalog: Catalog, refused: Mapping[str, str]
    ) -> list[Callable[[], list[str]]]:
        """Every live change, checked; the callables that apply them (nothing changed yet)."""
        plan: list[Callable[[], list[str]]] = []
        problems: list[ConfigProblem] = []
        if "breakers" not in refused:
            self._plan_profiles(
                "breakers", self.runtime.tunables.breakers(), new.breakers, Breaker, plan, problems
            )
        if "bulkheads" not in refused:
            self._plan_profiles(
                "bulkheads", self.runtime.tunables.bulkheads(), new.bulkheads, Bulkhead, plan,
                problems,
            )  # fmt: skip
        if "detectors" not in refused:
            for detector in self.detectors:
                wanted = self._wanted(detector, new, catalog, problems)
                if wanted is not None:
                    plan.append(partial(detector.retune, **wanted))
        if problems:
            raise ConfigError(problems)
        return plan

    def _plan_profiles(
        self,
        section: str,
        registered: Mapping[str, Sequence[Breaker | Bulkhead]],
        profiles: Mapping[str, msgspec.Struct],
        build: Callable[..., object],
        plan: list[Callable[[], list[str]]],
        problems: list[ConfigProblem],
    ) -> None:
        """Plan the retune of every object built from a ``[<section>.<profile>]`` that NEW
        still has, each checked on a throwaway built with its merged settings."""
        for profile, objects in registered.items():
            found = profiles.get(profile)
            if found is None:
                continue  # the profile is gone: its objects keep theirs (a restart)
            fields = engine_kwargs(found)
            for obj in objects:
                try:
                    build(obj.name, **(obj.settings() | fields))
                except ValueError as exc:
                    problems.append(_problem(self.source, f"$.{section}.{profile}", exc))
                    continue
                plan.append(partial(obj.retune, **fields))

    def _wanted(
        self,
        detector: Detector,
        new: TriageConfig,
        catalog: Catalog,
        problems: list[ConfigProblem],
    ) -> dict[str, Any] | None:
        """The settings ``new`` gives ``detector`` (None: nothing to retune), checked.

        Only a detector built from the running config's rule (its row's settings, or
        its ``[detectors.<name>]``) is retuned; one an actor built from its own section
        keeps its settings until a restart."""
        old_kwargs = self._kwargs(detector, self.config, self.catalog)
        new_kwargs = self._kwargs(detector, new, catalog)
        if old_kwargs is None or new_kwargs is None or old_kwargs == new_kwargs:
            return None
        if detector_settings(detector.name, old_kwargs) != detector.settings():
            return None  # not built from this rule
        where = (
            f"$.detectors.{detector.name}"
            if detector.row is None
            else f"detector of catalog row {detector.row}"
        )
        if new_kwargs.get("kind") != detector.kind.value or new_kwargs.get("metric") != (
            detector.metric
        ):
            return None  # kind and metric need a restart (in the diff already)
        try:
            wanted = detector_settings(detector.name, new_kwargs)
        except ConfigError as exc:
            problems += exc.at(self.source, where).problems
            return None
        return wanted

    @staticmethod
    def _kwargs(
        detector: Detector, config: TriageConfig, catalog: Catalog
    ) -> dict[str, Any] | None:
        return detector_rule(detector.name, detector.row, config, catalog)

    def _adopt(self, new: TriageConfig, catalog: Catalog, refused: Mapping[str, str]) -> None:
        """The effective config: the running one with the live sections of ``new``."""
        old = self.config
        breakers = dict(new.breakers)
        for profile in self.runtime.tunables.breakers():
            if profile not in breakers and profile in old.breakers:
                breakers[profile] = old.breakers[profile]  # still in use until a restart
        bulkheads = dict(new.bulkheads)
        for profile in self.runtime.tunables.bulkheads():
            if profile not in bulkheads and profile in old.bulkheads:
                bulkheads[profile] = old.bulkheads[profile]  # still in use until a restart
        daemon = msgspec.structs.replace(
            old.daemon, reload_poll_s=new.daemon.reload_poll_s, log_level=new.daemon.log_level
        )
        if new.daemon.log_level != old.daemon.log_level:
            logging.getLogger().setLevel(LEVELS[new.daemon.log_level])
        self.config = msgspec.structs.replace(
            old,
            daemon=daemon,
            breakers=old.breakers if "breakers" in refused else breakers,
            bulkheads=old.bulkheads if "bulkheads" in refused else bulkheads,
            detectors=old.detectors if "detectors" in refused else new.detectors,
        )
        self.catalog = catalog


def _reshapes(line: str) -> bool:
    return ": window reshaped " in line or ": rate_window_s " in line


def _problem(source: str, path: str, exc: Exception) -> ConfigProblem:
    return ConfigProblem(source=source, line=None, path=path, message=str(exc))


def _stamp(files: list[Path]) -> tuple[tuple[str, bytes | None], ...]:
    """Each file with a digest of its content (None: it cannot be read), in order."""
    return tuple((os.fspath(path), _digest(path)) for path in files)


def _digest(path: Path) -> bytes | None:
    try:
        data = path.read_bytes()  # through a symlink: its current target
    except OSError:
        return None
    return hashlib.blake2b(data, digest_size=16).digest()


class TunablesCollector(Collector):
    """``/metrics``: the effective settings of the registered breakers, bulkheads and
    detectors."""

    def __init__(self, runtime: Runtime, detectors: DetectorSet) -> None:
        self.runtime = runtime
        self.detectors = detectors

    def collect(self) -> Iterator[GaugeMetricFamily]:
        settings = GaugeMetricFamily(
            "triage_breaker_setting",
            "A breaker's effective threshold or window (changed in place by a reload)",
            labels=["breaker", "setting"],
        )
        calls = GaugeMetricFamily(
            "triage_breaker_window_calls",
            "Calls counted in a breaker's rate window (kept across a reload)",
            labels=["breaker"],
        )
        bulkhead = GaugeMetricFamily(
            "triage_bulkhead_setting",
            "A bulkhead's effective capacity, wait or partitions (changed in place by a reload)",
            labels=["bulkhead", "setting"],
        )
        detector = GaugeMetricFamily(
            "triage_detector_setting",
            "A detector's effective threshold or window (changed in place by a reload)",
            labels=["detector", "setting"],
        )
        for breakers in self.runtime.tunables.breakers().values():
            for breaker in breakers:
                for name, value in breaker.settings().items():
                    settings.add_metric([breaker.name, name], float(value))
                stats = breaker.statistics()
                calls.add_metric([breaker.name], float(stats.window_calls))
        for bulkheads in self.runtime.tunables.bulkheads().values():
            for b in bulkheads:
                for name, value in b.settings().items():
                    bulkhead.add_metric([b.name, name], float(value))
        for d in self.detectors:
            for name, value in d.settings().items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    detector.add_metric([d.name, name], float(value))
        yield settings
        yield calls
        yield bulkhead
        yield detector
