"""Alert events to an Alertmanager: the active alerts board, posted as Alertmanager's API v2.

The :class:`~actors.alerts.AlertSink` keeps the :class:`~actors.alerts.ActiveAlerts`
board (detectors firing, breakers open, paging notices). :class:`AlertmanagerForwarder`
reads it every ``[alertmanager] poll_s`` and posts to ``POST {url}/api/v2/alerts``
when something changed -- an alert appeared or cleared -- and every ``resend_s``
regardless, as Prometheus does, so an Alertmanager that restarted learns them
again. Each firing alert is sent with ``endsAt`` ``4 x resend_s`` ahead: if this
daemon dies, Alertmanager resolves its alerts by itself after that (Prometheus's
own rule). A cleared alert is sent once more with ``endsAt`` now: resolved.

Labels (what Alertmanager groups, silences and routes on)::

    alertname   the detector's name: a catalog row's is its Prometheus alert's
                (TriageSmsProviderOutage), so both sources of one alert group together;
                a breaker's is TriageBreakerOpen, a notice's its class
    severity    the catalog row's (page | ticket); breakers and unrowed alerts: ticket;
                a paging notice: page
    catalog_id  the row, when there is one
    breaker     for a breaker alert: its name
    replica     this daemon (``[alertmanager] replica``, else the host name)
    + ``[alertmanager.labels]`` (cluster, environment...)

Annotations: the summary (value against threshold, or the breaker's state), and
the row's runbook. A post that fails (refused, 5xx, timeout) is counted and
retried on the next poll with everything still unsent: nothing cleared is
forgotten before Alertmanager took it.

    triage_alertmanager_posts_total{outcome}   ok | failed
    triage_alertmanager_alerts_sent_total      alerts carried by successful posts
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
from prometheus_client import CollectorRegistry, Counter

from actors.alerts import ActiveAlerts, Alert
from config.catalog import Catalog, CatalogRow
from config.schema import AlertmanagerConfig
from engine.actor import Actor, Timer
from engine.metrics import families

__all__ = [
    "AlertmanagerForwarder",
    "Forward",
    "ForwarderStatistics",
    "Plan",
    "alert_labels",
    "plan",
    "to_postable",
]

log = logging.getLogger("triage.alertmanager")

BREAKER_ALERT = "TriageBreakerOpen"
API_PATH = "/api/v2/alerts"


class Forward(msgspec.Struct, frozen=True, tag=True):
    """Compare the board with what Alertmanager was told; post if due."""


class ForwarderStatistics(msgspec.Struct, frozen=True, kw_only=True):
    posts: int
    failures: int
    firing: int  # alerts Alertmanager was last told are firing


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    """One post: the alerts still firing and those that cleared since the last one."""

    firing: tuple[Alert, ...]
    resolved: tuple[Alert, ...]


def plan(
    board: Sequence[Alert],
    told: Mapping[str, Alert],
    *,
    now: float,
    last_post: float | None,
    resend_s: float,
) -> Plan | None:
    """What to post now, or None: a post when an alert appeared or cleared since the last
    successful one (``told``), and every ``resend_s`` while any alert fires."""
    current = {a.key: a for a in board}
    resolved = tuple(a for key, a in told.items() if key not in current)
    appeared = any(key not in told for key in current)
    due = last_post is None or now - last_post >= resend_s
    if appeared or resolved or (current and due):
        return Plan(firing=tuple(current.values()), resolved=resolved)
    return None


def _row(catalog: Catalog | None, row_id: int | None) -> CatalogRow | None:
    if catalog is None or row_id is None:
        return None
    return next((r for r in catalog.rows if r.id == row_id), None)


def alert_labels(
    alert: Alert, catalog: Catalog | None, config: AlertmanagerConfig, replica: str
) -> dict[str, str]:
    """The Alertmanager labels of ``alert`` (see the module docstring)."""
    labels = dict(config.labels)
    severity = "ticket"
    match alert.kind:
        case "breaker":
            labels["alertname"] = BREAKER_ALERT
            labels["breaker"] = alert.name
        case "notice":
            labels["alertname"] = alert.name
            severity = "page" if alert.state == "page" else "ticket"
        case _:
            labels["alertname"] = alert.name
    if alert.row is not None:
        labels["catalog_id"] = str(alert.row)
        row = _row(catalog, alert.row)
        if row is not None:
            severity = row.severity
    labels["severity"] = severity
    labels["replica"] = replica
    return labels


def _summary(alert: Alert) -> str:
    if alert.kind == "breaker":
        return f"breaker {alert.name} is {alert.state}"
    if alert.value is not None and alert.threshold is not None:
        return f"{alert.name}: {alert.value:g} against a threshold of {alert.threshold:g}"
    return alert.name


def _stamp(wall: float) -> str:
    return (
        datetime.fromtimestamp(wall, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def to_postable(
    batch: Plan,
    *,
    catalog: Catalog | None,
    config: AlertmanagerConfig,
    replica: str,
    now_wall: float,
) -> list[dict[str, Any]]:
    """The body of ``POST /api/v2/alerts`` for ``batch`` (Alertmanager's postableAlerts)."""
    body: list[dict[str, Any]] = []
    for alert, ends in [(a, now_wall + 4 * config.resend_s) for a in batch.firing] + [
        (a, now_wall) for a in batch.resolved
    ]:
        annotations = {"summary": _summary(alert)}
        row = _row(catalog, alert.row)
        if row is not None:
            annotations["description"] = f"#{row.id} {row.name}: {row.impact}"
            annotations["runbook"] = row.runbook.strip()
        item: dict[str, Any] = {
            "labels": alert_labels(alert, catalog, config, replica),
            "annotations": annotations,
            "startsAt": _stamp(alert.since_wall),
            "endsAt": _stamp(ends),
        }
        if config.generator_url is not None:
            item["generatorURL"] = config.generator_url
        body.append(item)
    return body


class _ForwarderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.posts = Counter(
            "triage_alertmanager_posts_total",
            "Posts of alerts to the Alertmanager, by outcome (ok, failed)",
            ["outcome"],
            registry=registry,
        )
        self.sent = Counter(
            "triage_alertmanager_alerts_sent_total",
            "Alerts (firing and resolved) carried by successful posts to the Alertmanager",
            registry=registry,
        )


class AlertmanagerForwarder(Actor[Forward]):
    """Post the board's alerts to ``config.url``; see the module docstring."""

    name = "alertmanager"

    def __init__(
        self,
        board: ActiveAlerts,
        config: AlertmanagerConfig,
        *,
        catalog: Catalog | None,
        wall: Callable[[], float],
        registry: CollectorRegistry | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if config.url is None:
            raise ValueError("the forwarder needs [alertmanager] url")
        self.board = board
        self.config = config
        self.catalog = catalog
        self.wall = wall
        self.replica = config.replica or socket.gethostname()
        self.url = config.url.rstrip("/") + API_PATH
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._metrics = families(registry, _ForwarderMetrics) if registry is not None else None
        self.told: dict[str, Alert] = {}
        self.last_post: float | None = None
        self.posts = 0
        self.failures = 0

    def timers(self) -> Sequence[Timer]:
        return [Timer(self.config.poll_s, Forward())]

    async def init(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.config.timeout_s, transport=self._transport)

    async def terminate(self, reason: BaseException | None) -> None:
        if self._client is not None:
            await self._client.aclose()

    def statistics(self) -> ForwarderStatistics:
        return ForwarderStatistics(posts=self.posts, failures=self.failures, firing=len(self.told))

    async def handle(self, message: Forward) -> None:
        match message:
            case Forward():
                await self._forward()

    async def _forward(self) -> None:
        now = self.wall()
        batch = plan(
            self.board.snapshot(),
            self.told,
            now=now,
            last_post=self.last_post,
            resend_s=self.config.resend_s,
        )
        if batch is None:
            return
        body = to_postable(
            batch, catalog=self.catalog, config=self.config, replica=self.replica, now_wall=now
        )
        assert self._client is not None
        try:
            response = await self._client.post(self.url, json=body)
            response.raise_for_status()
        except httpx.HTTPError as exc:  # refused, timed out, 4xx/5xx: retried next poll
            self.failures += 1
            if self._metrics is not None:
                self._metrics.posts.labels("failed").inc()
            log.warning(
                "alertmanager post failed",
                extra={"url": self.url, "error": f"{type(exc).__name__}: {exc}"},
            )
            return
        self.posts += 1
        self.told = {a.key: a for a in batch.firing}
        self.last_post = now
        if self._metrics is not None:
            self._metrics.posts.labels("ok").inc()
            self._metrics.sent.inc(len(body))
