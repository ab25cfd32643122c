"""Alert events to an Alertmanager: the posting plan (exact), the wire shape, and the
forwarder against Debian's real prometheus-alertmanager over loopback."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
from prometheus_client import CollectorRegistry

import config
from actors.alertmanager import AlertmanagerForwarder, alert_labels, plan, to_postable
from actors.alerts import ActiveAlerts, Alert
from config.schema import AlertmanagerConfig
from engine.actor import actor_child
from engine.supervisor import Supervisor
from supervisors.vocabulary import METRICS, MITIGATIONS

ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
WALL = 1_796_400_000.0  # 2026-12-04T16:00:00Z


def _catalog() -> config.Catalog:
    path = config.default_path("failures.toml")
    return config.load_catalog(path, metrics=METRICS, mitigations=MITIGATIONS)


def _detector(name: str = "TriageSmsProviderOutage", row: int | None = 1, at: float = 0.0) -> Alert:
    return Alert(key=f"detector:{name}", kind="detector", name=name, row=row, since=at,
                 since_wall=WALL + at, value=0.35, threshold=0.2)  # fmt: skip


def _breaker(name: str = "sms_primary") -> Alert:
    return Alert(key=f"breaker:{name}", kind="breaker", name=name, since=1.0,
                 since_wall=WALL + 1, state="open")  # fmt: skip


def test_a_post_when_an_alert_appears_clears_or_is_due_again() -> None:
    a, b = _detector(), _breaker()
    told = {a.key: a}
    # Nothing firing, nothing told: nothing to say, ever.
    assert plan([], {}, now=0.0, last_post=None, resend_s=60.0) is None
    # A new alert: at once.
    assert plan([a], {}, now=5.0, last_post=None, resend_s=60.0) == plan_of([a], [])
    # The same alert, told 59 s ago: quiet; 60 s: re-sent.
    assert plan([a], told, now=59.0, last_post=0.0, resend_s=60.0) is None
    assert plan([a], told, now=60.0, last_post=0.0, resend_s=60.0) == plan_of([a], [])
    # Another one appears: both go, at once.
    assert plan([a, b], told, now=1.0, last_post=0.0, resend_s=60.0) == plan_of([a, b], [])
    # a cleared: resolved, once (told afterwards holds only what still fires).
    assert plan([b], {a.key: a, b.key: b}, now=2.0, last_post=1.0, resend_s=60.0) == plan_of(
        [b], [a]
    )
    assert plan([], told, now=2.0, last_post=1.0, resend_s=60.0) == plan_of([], [a])


def plan_of(firing: list[Alert], resolved: list[Alert]) -> object:
    from actors.alertmanager import Plan

    return Plan(firing=tuple(firing), resolved=tuple(resolved))


def test_labels_and_the_wire_shape() -> None:
    catalog = _catalog()
    cfg = AlertmanagerConfig(url="http://am:9093", resend_s=60.0, labels={"cluster": "eu-1"},
                             generator_url="http://triage:8080/")  # fmt: skip
    row = _detector()
    assert alert_labels(row, catalog, cfg, "pod-a") == {
        "cluster": "eu-1", "alertname": "TriageSmsProviderOutage", "catalog_id": "1",
        "severity": "page", "replica": "pod-a",
    }  # fmt: skip
    assert alert_labels(_breaker(), catalog, cfg, "pod-a") == {
        "cluster": "eu-1", "alertname": "TriageBreakerOpen", "breaker": "sms_primary",
        "severity": "ticket", "replica": "pod-a",
    }  # fmt: skip
    notice = Alert(key="notice:x", kind="notice", name="CategoryDisabled", row=3, since=0.0,
                   since_wall=WALL, state="page")  # fmt: skip
    assert alert_labels(notice, catalog, cfg, "p")["severity"] == "page"
    plan_ = plan([row], {_breaker().key: _breaker()}, now=0, last_post=0, resend_s=60)
    assert plan_ is not None
    firing, resolved = to_postable(plan_, catalog=catalog, config=cfg, replica="pod-a",
                                   now_wall=WALL + 10)  # fmt: skip
    assert firing["startsAt"] == "2026-12-04T16:00:00.000Z"
    assert firing["endsAt"] == "2026-12-04T16:04:10.000Z"  # 4 x resend ahead
    assert firing["annotations"]["summary"] == (
        "TriageSmsProviderOutage: 0.35 against a threshold of 0.2"
    )
    assert firing["annotations"]["runbook"].startswith("Meaning: more than 20% of calls")
    assert firing["generatorURL"] == "http://triage:8080/"
    assert resolved["endsAt"] == "2026-12-04T16:00:10.000Z"  # now: resolved
    assert resolved["labels"]["alertname"] == "TriageBreakerOpen"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"url": "ftp://am"}, "url"),
        ({"labels": {"severity": "x"}}, "set by the forwarder"),
        ({"labels": {"bad-name": "x"}}, "not a Prometheus label name"),
        ({"poll_s": 120.0, "resend_s": 60.0}, "poll_s"),
    ],
)
def test_bad_settings_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        msgspec.convert(fields, AlertmanagerConfig)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RealAlertmanager:
    def __init__(self, directory: Path) -> None:
        assert ALERTMANAGER is not None
        self.directory = directory
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (directory / "am.yml").write_text(
            "route:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n"
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.log = (directory / "log").open("ab")

    def start(self) -> None:
        assert ALERTMANAGER is not None
        self.process = subprocess.Popen(
            [ALERTMANAGER, f"--config.file={self.directory / 'am.yml'}",
             f"--storage.path={self.directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address="],
            stdout=subprocess.DEVNULL, stderr=self.log,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"alertmanager did not start: {(self.directory / 'log').read_text()}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[RealAlertmanager]:
    if ALERTMANAGER is None:
        pytest.fail("prometheus-alertmanager is not installed (Debian: prometheus-alertmanager)")
    am = RealAlertmanager(tmp_path)
    am.start()
    try:
        yield am
    finally:
        am.stop()
        am.log.close()


async def _active(am: RealAlertmanager) -> list[dict[str, object]]:
    async with httpx.AsyncClient() as client:
        answer = await client.get(f"{am.url}/api/v2/alerts", params={"active": "true"})
        answer.raise_for_status()
        alerts: list[dict[str, object]] = answer.json()
        return alerts


async def _until(check: object, what: str) -> None:
    for _ in range(200):  # up to 10 s
        if await check():  # type: ignore[operator]
            return
        await trio.sleep(0.05)
    raise AssertionError(f"not within 10 s: {what}")


async def test_the_forwarder_fires_resolves_and_survives_an_alertmanager_restart(
    alertmanager: RealAlertmanager,
) -> None:
    board = ActiveAlerts()
    registry = CollectorRegistry()
    cfg = AlertmanagerConfig(url=alertmanager.url, poll_s=0.05, resend_s=0.5, replica="pod-a")
    spec, ref = actor_child(
        "alertmanager",
        partial(AlertmanagerForwarder, board, cfg, catalog=_catalog(), wall=time.time,
                registry=registry),
        capacity=10, shutdown_s=1.0,
    )  # fmt: skip

    async def names() -> set[str]:
        return {a["labels"]["alertname"] for a in await _active(alertmanager)}  # type: ignore[index]

    async with trio.open_nursery() as nursery:
        await nursery.start(Supervisor("test", [spec]).run)
        board.fire(msgspec.structs.replace(_detector(), since_wall=time.time()))
        board.fire(msgspec.structs.replace(_breaker(), since_wall=time.time()))

        async def both() -> bool:
            return await names() == {"TriageSmsProviderOutage", "TriageBreakerOpen"}

        await _until(both, "both alerts active in the Alertmanager")
        [outage] = [a for a in await _active(alertmanager)
                    if a["labels"]["alertname"] == "TriageSmsProviderOutage"]  # type: ignore[index]  # fmt: skip
        assert outage["labels"] == {"alertname": "TriageSmsProviderOutage", "catalog_id": "1",
                                    "severity": "page", "replica": "pod-a"}  # fmt: skip
        # The breaker closes: resolved at the Alertmanager.
        board.clear(_breaker().key)

        async def outage_only() -> bool:
            return await names() == {"TriageSmsProviderOutage"}

        await _until(outage_only, "the breaker alert resolved")
        # The Alertmanager goes away (and its memory with it: no storage kept); posts fail,
        # counted; it comes back empty and learns the firing alert again by the resend.
        alertmanager.stop()
        shutil.rmtree(alertmanager.directory / "data", ignore_errors=True)

        async def failing() -> bool:
            return ref.statistics().failures >= 2

        await _until(failing, "failed posts counted")
        failed = registry.get_sample_value("triage_alertmanager_posts_total", {"outcome": "failed"})
        assert failed is not None and failed >= 2
        await trio.to_thread.run_sync(alertmanager.start)
        await _until(outage_only, "the firing alert re-sent to the restarted Alertmanager")
        nursery.cancel_scope.cancel()
