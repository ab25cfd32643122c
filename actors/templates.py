"""The template registry: cached lookups, strict rendering, and failing closed (catalog row 19).

::

    registry = TemplateRegistry(db, ttl_s=..., negative_ttl_s=..., max_entries=...,
                                runtime=runtime, detector=row19)
    template = await registry.lookup(tenant, "reminder", None)   # the active version
    text = registry.render(template, {"time": "10:00"})           # Rendered(body, subject)

**Lookup** reads PostgreSQL once per (tenant, name, version) per ``ttl_s``; the
cache is an LRU of at most ``max_entries`` entries, so the hot path of a
dispatch costs no crossing at all. A missing template is remembered for
``negative_ttl_s`` (0: not at all), so a deploy mismatch does not turn every
dispatch into a query; :meth:`TemplateRegistry.invalidate` drops entries at once
(after a template is added or activated).

**Failing closed**: a missing template raises :class:`TemplateNotFound`, a retired
version (row 11: the PHI guard retired it) :class:`TemplateRetired` (a
``TemplateNotFound`` naming the version and the retirement's reason; its stored
reason is ``template_retired``, and it feeds row 19's detector no more than the
guard's incident does: a retirement is no deploy mismatch).
The dispatcher then writes the ``failed`` dispatch (reason ``template_not_found``)
and, in the same transaction, the internal-ops notice of
:meth:`TemplateRegistry.notice_for` (``triage.events.ops.notice``, ``kind =
"template_not_found"``); once that row is new, :meth:`TemplateRegistry.not_found`
counts ``triage_template_not_found_total`` (label ``channel``), feeds row 19's
count-in-window detector and emits a :class:`TemplateMissing` notice (severity
``severity``, the catalog's ``ticket``) on the runtime's bus: the alert sink logs
it. Nothing is sent.

**Rendering** is ``str.format_map`` over a strict mapping: a placeholder the data
lacks raises :class:`MissingField` naming it; a malformed template raises
:class:`TemplateRenderError`. Values are inserted as they are, never formatted again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry, Counter

from engine.clock import Clock
from engine.detectors import CountInWindowDetector
from engine.errors import TriageError
from engine.events import EventBus, Notice
from engine.metrics import families
from providers.db.templates import RetiredVersion, TemplateRow, lookup_template_async

if TYPE_CHECKING:
    from engine.runtime import Runtime
    from providers.db.pool import DbPool

__all__ = [
    "NOTICE_KIND",
    "ROW",
    "MissingField",
    "Rendered",
    "TemplateMissing",
    "TemplateNotFound",
    "TemplateRegistry",
    "TemplateRenderError",
    "TemplateRetired",
]

log = logging.getLogger("triage.templates")

ROW = 19
SEVERITY = "ticket"  # row 19's severity in the catalog (config/failures.toml)
NOTICE_KIND = "template_not_found"


class TemplateNotFound(TriageError):
    """No usable template (tenant, name, version): the dispatch fails closed.

    ``dispatch_id`` is set by the dispatcher once the ``failed`` row is written.
    Its answer (422 ``template_not_found``) is :mod:`actors.answers`'.
    """

    #: The dispatch row's ``reason`` when it fails closed for this.
    reason = "template_not_found"

    def __init__(self, tenant_id: str, name: str, version: int | None) -> None:
        which = "the active version" if version is None else f"version {version}"
        super().__init__(f"template {name!r} ({which}) not found for tenant {tenant_id}")
        self.tenant_id = tenant_id
        self.name = name
        self.version = version
        self.dispatch_id: str | None = None


class TemplateRetired(TemplateNotFound):
    """The version named (or, asking for the active one, the newest) is retired: refused
    like a missing one, with the retirement's reason (``phi_guard: <rule>``, row 11)."""

    reason = "template_retired"

    def __init__(
        self, tenant_id: str, name: str, version: int | None, retired: int, why: str
    ) -> None:
        super().__init__(tenant_id, name, version)
        self.args = (
            f"template {name!r} version {retired} is retired for tenant {tenant_id} ({why})",
        )
        self.retired_version = retired
        self.why = why


class TemplateRenderError(TriageError):
    """The template could not be rendered with the data given."""

    def __init__(self, template: str, problem: str) -> None:
        super().__init__(f"template {template!r}: {problem}")
        self.template = template
        self.problem = problem


class MissingField(TemplateRenderError):
    """The template names a field the request's data does not carry."""

    def __init__(self, template: str, field: str) -> None:
        super().__init__(template, f"missing field {field!r}")
        self.field = field


class TemplateMissing(Notice, frozen=True, kw_only=True):
    """Row 19's notice: a dispatch named a template that does not exist.

    The alert sink logs it (a ``ticket``, the catalog's severity for row 19, is
    logged and not held on the active-alert board); its :meth:`alert_key` is one
    per tenant and template.
    """

    tenant: str
    template: str
    version: int | None
    channel: str
    severity: str = SEVERITY
    row: int | None = ROW

    def alert_key(self) -> str:
        return f"template_missing:{self.tenant}:{self.template}"


@dataclass(frozen=True, slots=True)
class Rendered:
    body: str
    subject: str | None


class _Strict(dict[str, str]):
    __slots__ = ("template",)

    def __init__(self, data: Mapping[str, str], template: str) -> None:
        super().__init__(data)
        self.template = template

    def __missing__(self, key: str) -> str:
        raise MissingField(self.template, key)


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.not_found = Counter(
            "triage_template_not_found",
            "Dispatches refused because their template version is missing",
            ["channel"],
            registry=registry,
        )


Key = tuple[str, str, int | None]
Found = TemplateRow | RetiredVersion | None


class TemplateRegistry:
    """Cached template lookups for every dispatcher; see the module docstring."""

    def __init__(
        self,
        db: DbPool,
        *,
        ttl_s: float,
        max_entries: int,
        negative_ttl_s: float = 0.0,
        registry: CollectorRegistry | None = None,
        events: EventBus | None = None,
        clock: Clock | None = None,
        detector: CountInWindowDetector | None = None,
        severity: str = SEVERITY,
    ) -> None:
        if not ttl_s > 0 or negative_ttl_s < 0 or max_entries < 1:
            raise ValueError("ttl_s must be > 0, negative_ttl_s >= 0 and max_entries >= 1")
        self.db = db
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self.max_entries = max_entries
        self.events = events
        self.clock = clock if clock is not None else Clock()
        self.detector = detector
        self.severity = severity
        self.hits = 0
        self.misses = 0
        self.not_found_count = 0
        self.retired_count = 0
        self._cache: OrderedDict[Key, tuple[float, Found]] = OrderedDict()
        self._metrics = families(registry, _Metrics) if registry is not None else None

    @classmethod
    def for_runtime(cls, db: DbPool, runtime: Runtime, **kwargs: Any) -> TemplateRegistry:
        """A registry using the runtime's bus, clock and metrics registry."""
        metrics = runtime.metrics
        return cls(
            db,
            events=runtime.events,
            clock=runtime.clock,
            registry=metrics.registry if metrics is not None else None,
            **kwargs,
        )

    # -- lookup ---------------------------------------------------------------------------

    async def lookup(self, tenant_id: str, name: str, version: int | None = None) -> TemplateRow:
        """The template, from the cache or the database; :class:`TemplateNotFound` if none."""
        key: Key = (tenant_id, name, version)
        now = trio.current_time()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(key)
            self.hits += 1
            row = cached[1]
        else:
            self.misses += 1
            row = await self.db.run_unit(lookup_template_async, tenant_id, name, version)
            ttl = self.ttl_s if isinstance(row, TemplateRow) else self.negative_ttl_s
            if ttl > 0:
                self._store(key, trio.current_time() + ttl, row)
            else:
                self._cache.pop(key, None)
        if row is None:
            raise TemplateNotFound(tenant_id, name, version)
        if isinstance(row, RetiredVersion):
            raise TemplateRetired(tenant_id, name, version, row.version, row.reason)
        return row

    def _store(self, key: Key, expires: float, row: Found) -> None:
        cache = self._cache
        cache[key] = (expires, row)
        cache.move_to_end(key)
        while len(cache) > self.max_entries:
            cache.popitem(last=False)

    def invalidate(self, tenant_id: str | None = None, name: str | None = None) -> int:
        """Drop cached entries (all, a tenant's, or one name's); how many were dropped."""
        doomed = [
            k
            for k in self._cache
            if (tenant_id is None or k[0] == tenant_id) and (name is None or k[1] == name)
        ]
        for k in doomed:
            del self._cache[k]
        return len(doomed)

    @property
    def size(self) -> int:
        return len(self._cache)

    # -- failing closed ---------------------------------------------------------------------

    @staticmethod
    def notice_for(
        error: TemplateNotFound, *, channel: str, dispatch_id: str | None = None
    ) -> dict[str, Any]:
        """The internal-ops notice payload for one refused dispatch (no side effects)."""
        return {
            "kind": error.reason,  # NOTICE_KIND, or template_retired
            "tenant": error.tenant_id,
            "template": error.name,
            "version": error.version,
            "channel": channel,
            "dispatch_id": dispatch_id,
        }

    def not_found(self, error: TemplateNotFound, *, channel: str) -> None:
        """Count and alert one dispatch refused for ``error`` (call once per refused row).
        A retired version is counted and logged only (row 11's incident says why)."""
        if isinstance(error, TemplateRetired):
            self.retired_count += 1
            log.warning("%s (channel %s): the dispatch fails closed", error, channel)
            return
        self.not_found_count += 1
        if self._metrics is not None:
            self._metrics.not_found.labels(channel).inc()
        if self.detector is not None:
            self.detector.observe()
        if self.events is not None:
            self.events.emit(
                TemplateMissing(
                    at=trio.current_time(),
                    wall=self.clock.wall(),
                    tenant=error.tenant_id,
                    template=error.name,
                    version=error.version,
                    channel=channel,
                    severity=self.severity,
                    row=ROW,
                )
            )
        log.warning("%s (channel %s): the dispatch fails closed", error, channel)

    # -- rendering --------------------------------------------------------------------------

    @staticmethod
    def render(template: TemplateRow, data: Mapping[str, str]) -> Rendered:
        """The body (and subject) with ``data`` filled in; :class:`MissingField` names a gap."""
        return Rendered(
            body=_format(template.name, template.body, data),
            subject=None
            if template.subject is None
            else _format(template.name, template.subject, data),
        )


def _format(name: str, text: str, data: Mapping[str, str]) -> str:
    try:
        return text.format_map(_Strict(data, name))
    except MissingField:
        raise
    except (ValueError, IndexError, KeyError, AttributeError) as exc:
        raise TemplateRenderError(name, f"cannot render: {exc}") from exc
