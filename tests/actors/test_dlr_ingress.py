"""The DLR ingress (catalog row 13): typed refusals that change nothing, the per-provider
rate limit, a bounded queue that sheds a flood with 429, and a worker pool that scales."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest
import trio
import trio.testing
from hypercorn.typing import ASGIReceiveEvent, ASGISendEvent, ConnectionState, HTTPScope
from prometheus_client import CollectorRegistry

from actors.dlr_ingress import (
    DLR_RULES,
    DlrIngress,
    DlrPoolStatistics,
    Outcome,
    Parser,
    PoolState,
    WebhookRefused,
    dlr_pool_child,
)
from engine.detectors import SpikeOverBaselineDetector
from engine.ratelimit import RateLimiter
from engine.supervisor import ChildSpec, Supervisor
from providers.channel import DeliveryState, Receipt
from providers.receipts import BadSignature, MalformedReceipt, header
from supervisors.http import HealthApp, HttpServer

SECRET = b"test-secret"
SIGNATURE = "X-Test-Signature"
MAX_BODY = 2048


# -- a provider of our own: HMAC-SHA256 over the body, JSON receipts ---------------------


class _Wire(msgspec.Struct, forbid_unknown_fields=True):
    ref: str
    state: DeliveryState


class _Batch(msgspec.Struct, forbid_unknown_fields=True):
    receipts: list[_Wire]


def sign(body: bytes, secret: bytes = SECRET) -> str:
    return hmac.new(secret, body, hashlib.sha256).hexdigest()


def make_parser(provider: str, urls: list[str] | None = None) -> Parser:
    def parse(url: str, headers: Mapping[str, str], body: bytes) -> Sequence[Receipt]:
        if urls is not None:
            urls.append(url)
        given = header(headers, SIGNATURE)
        if not given or not hmac.compare_digest(sign(body), given):
            raise BadSignature(f"{provider}: signature does not match the body")
        try:
            batch = msgspec.json.decode(body, type=_Batch)
        except msgspec.MsgspecError as exc:
            raise MalformedReceipt(f"{provider}: {exc}") from exc
        return [Receipt(provider=provider, state=w.state, client_ref=w.ref) for w in batch.receipts]

    return parse


def payload(*refs: str) -> bytes:
    return msgspec.json.encode({"receipts": [{"ref": r, "state": "delivered"} for r in refs]})


def signed(*refs: str) -> tuple[bytes, dict[str, str]]:
    body = payload(*refs)
    return body, {SIGNATURE: sign(body), "Content-Type": "application/json"}


class Sink:
    """Records every batch; ``hold`` blocks applying until set; ``fail`` raises once."""

    def __init__(self) -> None:
        self.batches: list[list[Receipt]] = []
        self.hold: trio.Event | None = None
        self.fail = False
        self.calls = 0

    async def apply(self, receipts: Sequence[Receipt]) -> None:
        self.calls += 1
        if self.hold is not None:
            await self.hold.wait()
        await trio.lowlevel.checkpoint()
        if self.fail:
            self.fail = False
            raise ConnectionError("database down")
        self.batches.append(list(receipts))

    @property
    def refs(self) -> list[str]:
        return [r.client_ref or "" for batch in self.batches for r in batch]


class Observer:
    def __init__(self) -> None:
        self.observed = 0

    def observe(self, count: int = 1) -> None:
        self.observed += count


_POOL_KNOBS = frozenset({
    "queue_capacity", "workers_min", "workers_max", "scale_up_depth", "scale_up_after_s",
    "scale_down_after_s", "batch_max", "registry",
})  # fmt: skip


def make_ingress(sink: Sink, **overrides: Any) -> DlrIngress:
    """The front and its pool's child spec (``ingress.spec``, not running yet)."""
    settings: dict[str, Any] = {
        "limiter": RateLimiter("dlr_callbacks", rate_per_s=1000.0, burst=1000, max_keys=16),
        "dlr_parsers": {"acme": make_parser("acme"), "zeta": make_parser("zeta")},
        "bounce_parsers": {"mailer": make_parser("mailer")},
        "max_body_bytes": MAX_BODY,
        "queue_capacity": 50,
        "workers_min": 1,
        "workers_max": 4,
        "scale_up_depth": 10,
        "scale_up_after_s": 2.0,
        "scale_down_after_s": 10.0,
        "ack_timeout_s": 30.0,
        "batch_max": 10,
        "retry_after_s": 3.0,
    }
    settings.update(overrides)
    pool = {k: v for k, v in settings.items() if k in _POOL_KNOBS}
    front = {k: v for k, v in settings.items() if k not in _POOL_KNOBS or k == "queue_capacity"}
    spec, ref = dlr_pool_child(sink=sink, shutdown_s=1.0, **pool)
    ingress = DlrIngress(pool=ref, registry=settings.get("registry"), **front)
    SPECS[ingress] = spec
    return ingress


SPECS: dict[DlrIngress, ChildSpec] = {}


def pool_stats(ingress: DlrIngress) -> DlrPoolStatistics:
    stats = ingress.pool.statistics()
    assert isinstance(stats, DlrPoolStatistics)
    return stats


async def start_pool(nursery: trio.Nursery, ingress: DlrIngress) -> Supervisor:
    sup = Supervisor("dlr", [SPECS[ingress]])
    await nursery.start(sup.run)
    return sup


def asgi(app: Any) -> httpx.ASGITransport:
    # httpx types ASGI messages as plain mappings; hypercorn's TypedDicts are narrower.
    return httpx.ASGITransport(app=app)


@asynccontextmanager
async def running(ingress: DlrIngress) -> AsyncIterator[httpx.AsyncClient]:
    async with trio.open_nursery() as nursery:
        await start_pool(nursery, ingress)
        transport = asgi(ingress)
        async with httpx.AsyncClient(transport=transport, base_url="http://triage") as client:
            yield client
        nursery.cancel_scope.cancel()


# -- the happy path ----------------------------------------------------------------------


async def test_a_signed_callback_is_applied_then_answered_200() -> None:
    sink = Sink()
    observer = Observer()
    registry = CollectorRegistry()
    ingress = make_ingress(sink, detector=observer, registry=registry)
    async with running(ingress) as client:
        content, headers = signed("r1", "r2")
        response = await client.post("/webhooks/dlr/acme", content=content, headers=headers)
        bounce, bounce_headers = signed("b1")
        bounced = await client.post(
            "/webhooks/bounces/mailer", content=bounce, headers=bounce_headers
        )
        await trio.testing.wait_all_tasks_blocked()  # the workers' reports handled
        pool = pool_stats(ingress)
    assert (response.status_code, response.json()) == (200, {"accepted": 2})
    assert bounced.status_code == 200
    assert sink.refs == ["r1", "r2", "b1"]
    assert {r.provider for batch in sink.batches for r in batch} == {"acme", "mailer"}
    assert observer.observed == 2
    sample = registry.get_sample_value
    assert sample("triage_dlr_callbacks_total", {"provider": "acme"}) == 1
    assert sample("triage_dlr_callbacks_total", {"provider": "mailer"}) == 1
    assert sample("triage_dlr_receipts_applied_total") == 3
    assert (ingress.statistics().accepted, pool.applied_receipts, pool.queue_depth) == (2, 3, 0)
    assert pool.state is PoolState.IDLE


# -- typed refusals that change nothing ------------------------------------------------


def _refusal_cases() -> list[Any]:
    good, good_headers = signed("r1")
    garbage = b"\x00\xffnot json"
    return [
        pytest.param(
            "/webhooks/dlr/acme", garbage, {SIGNATURE: sign(garbage)}, 400, "malformed_receipt",
            id="garbage-body-signed",
        ),
        pytest.param(
            "/webhooks/dlr/acme", payload("r1"), {SIGNATURE: sign(payload("r1"), b"forged")},
            401, "bad_signature", id="bad-signature",
        ),
        pytest.param(
            "/webhooks/dlr/acme", payload("r1"), {}, 401, "bad_signature", id="no-signature"
        ),
        pytest.param(
            "/webhooks/dlr/nobody", good, good_headers, 404, "unknown_provider",
            id="unknown-provider",
        ),
        pytest.param(
            "/webhooks/bounces/acme", good, good_headers, 404, "unknown_provider",
            id="dlr-provider-on-the-bounce-route",
        ),
        pytest.param(
            "/webhooks/dlr/acme", b"x" * (MAX_BODY + 1), {SIGNATURE: "x"}, 413,
            "payload_too_large", id="oversize-body",
        ),
        pytest.param(
            "/webhooks/dlr/acme", payload(*[f"r{i}" for i in range(51)]),
            {SIGNATURE: sign(payload(*[f"r{i}" for i in range(51)]))}, 413,
            "too_many_receipts", id="more-receipts-than-the-queue-holds",
        ),
        pytest.param("/webhooks/sms/acme", good, good_headers, 404, "not_found", id="bad-kind"),
        pytest.param(
            "/webhooks/dlr/acme/extra", good, good_headers, 404, "not_found", id="deep-path"
        ),
    ]  # fmt: skip


@pytest.mark.parametrize(("path", "content", "headers", "status", "code"), _refusal_cases())
async def test_bad_callbacks_get_a_typed_4xx_and_change_nothing(
    path: str, content: bytes, headers: dict[str, str], status: int, code: str
) -> None:
    sink = Sink()
    ingress = make_ingress(
        sink, max_body_bytes=MAX_BODY * 2 if code == "too_many_receipts" else MAX_BODY
    )
    async with running(ingress) as client:
        response = await client.post(path, content=content, headers=headers)
        await trio.testing.wait_all_tasks_blocked()
        pool = pool_stats(ingress)
    assert response.status_code == status
    assert response.json()["error"] == code
    assert response.json()["message"]
    # The body names the provider, except when there is none to name.
    named = None if code in ("unknown_provider", "not_found") else path.split("/")[3]
    assert set(response.json()) == {"error", "message"} | ({"provider"} if named else set())
    assert response.json().get("provider") == named
    assert "retry-after" not in response.headers
    assert sink.calls == 0 and sink.batches == []
    assert (pool.queue_depth, pool.max_queue_depth, ingress.statistics().accepted) == (0, 0, 0)
    assert ingress.statistics().refused == 1


async def test_other_methods_are_405() -> None:
    sink = Sink()
    async with running(make_ingress(sink)) as client:
        response = await client.get("/webhooks/dlr/acme")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json() == {
        "error": "method_not_allowed",
        "message": "GET is not allowed; use POST",
    }
    assert sink.calls == 0


def test_every_refusal_has_its_row_in_the_one_table() -> None:
    """Each WebhookRefused kind is answered by DLR_RULES, never by the 500 fallback."""
    kinds = {rule.kind for rule in DLR_RULES}
    pending = list(WebhookRefused.__subclasses__())
    while pending:
        kind = pending.pop()
        pending.extend(kind.__subclasses__())
        if kind.__name__ != "Disconnected":  # nobody to answer
            assert kind in kinds, kind


def scope_for(path: str, headers: list[tuple[bytes, bytes]]) -> HTTPScope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"ref=t1%3Ad1",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
        "state": ConnectionState({}),
        "extensions": {},
    }


async def drive(
    app: DlrIngress, scope: HTTPScope, chunk: bytes, *, endless: bool = True
) -> tuple[int, bytes, int]:
    """POST ``chunk`` (``endless``: again and again); returns (status, body, chunks read)."""
    sent: list[ASGISendEvent] = []
    read = 0

    async def receive() -> ASGIReceiveEvent:
        nonlocal read
        await trio.lowlevel.checkpoint()
        read += 1
        return {"type": "http.request", "body": chunk, "more_body": endless}

    async def send(event: ASGISendEvent) -> None:
        await trio.lowlevel.checkpoint()
        sent.append(event)

    with trio.fail_after(5):
        await app(scope, receive, send)
    start, body = sent
    assert start["type"] == "http.response.start" and body["type"] == "http.response.body"
    return start["status"], bytes(body["body"]), read


async def test_an_endless_body_is_refused_at_the_cap_without_reading_on() -> None:
    sink = Sink()
    ingress = make_ingress(sink)
    async with trio.open_nursery() as nursery:
        await start_pool(nursery, ingress)
        status, body, read = await drive(
            ingress, scope_for("/webhooks/dlr/acme", [(b"host", b"dlr.example")]), b"x" * 512
        )
        nursery.cancel_scope.cancel()
    assert status == 413
    assert msgspec.json.decode(body)["error"] == "payload_too_large"
    assert read == 5  # 2560 bytes > 2048: the fifth chunk passed the cap, nothing more read
    assert sink.calls == 0


async def test_a_declared_oversize_body_is_refused_before_reading() -> None:
    sink = Sink()
    ingress = make_ingress(sink)
    scope = scope_for("/webhooks/dlr/acme", [(b"content-length", str(MAX_BODY + 1).encode())])
    status, _, read = await drive(ingress, scope, b"x")
    assert (status, read) == (413, 0)


async def test_not_running_is_503_and_changes_nothing() -> None:
    sink = Sink()
    ingress = make_ingress(sink)
    transport = asgi(ingress)
    async with httpx.AsyncClient(transport=transport, base_url="http://triage") as client:
        content, headers = signed("r1")
        response = await client.post("/webhooks/dlr/acme", content=content, headers=headers)
    assert response.status_code == 503
    assert response.json() == {
        "error": "not_ready",
        "message": "the DLR pool is not running",
        "provider": "acme",
    }
    assert response.headers["retry-after"] == "3"
    assert sink.calls == 0


# -- rate limit per provider -------------------------------------------------------------


async def test_the_rate_limit_is_per_provider(autojump_clock: trio.testing.MockClock) -> None:
    sink = Sink()
    limiter = RateLimiter("dlr_callbacks", rate_per_s=0.5, burst=2, max_keys=16)
    ingress = make_ingress(sink, limiter=limiter)
    content, headers = signed("r1")
    async with running(ingress) as client:
        acme = [
            (await client.post("/webhooks/dlr/acme", content=content, headers=headers))
            for _ in range(3)
        ]
        zeta = await client.post("/webhooks/dlr/zeta", content=content, headers=headers)
        await trio.sleep(2.0)  # one token back at 0.5/s
        acme_later = await client.post("/webhooks/dlr/acme", content=content, headers=headers)
    assert [r.status_code for r in acme] == [200, 200, 429]
    assert acme[2].json()["error"] == "rate_limited"
    assert acme[2].headers["retry-after"] == "2"  # 1 token at 0.5/s
    assert zeta.status_code == 200
    assert acme_later.status_code == 200
    assert len(sink.refs) == 4
    assert ingress.statistics().rate_limited == 1


async def test_forged_callbacks_spend_tokens_before_any_hmac() -> None:
    sink = Sink()
    limiter = RateLimiter("dlr_callbacks", rate_per_s=0.001, burst=2, max_keys=16)
    verified: list[str] = []
    ingress = make_ingress(
        sink, limiter=limiter, dlr_parsers={"acme": make_parser("acme", verified)}
    )
    content = payload("r1")
    forged = {SIGNATURE: sign(content, b"forged")}
    async with running(ingress) as client:
        answers = [
            (await client.post("/webhooks/dlr/acme", content=content, headers=forged)).status_code
            for _ in range(5)
        ]
    assert answers == [401, 401, 429, 429, 429]
    assert len(verified) == 2  # the flood past the bucket never reached the parser
    assert sink.calls == 0


# -- the bounded queue under a flood ------------------------------------------------------


async def test_a_flood_over_the_queue_bound_is_shed_with_429() -> None:
    sink = Sink()
    sink.hold = trio.Event()
    registry = CollectorRegistry()
    ingress = make_ingress(
        sink, queue_capacity=10, workers_min=1, workers_max=1, batch_max=1,
        scale_up_depth=10, registry=registry,
    )  # fmt: skip
    answers: dict[str, httpx.Response] = {}
    async with running(ingress) as client:

        async def post(ref: str) -> None:
            content, headers = signed(ref)
            answers[ref] = await client.post("/webhooks/dlr/acme", content=content, headers=headers)

        async with trio.open_nursery() as flood:
            for i in range(40):
                flood.start_soon(post, f"r{i}")
            await trio.testing.wait_all_tasks_blocked()
            stats = pool_stats(ingress)
            # One batch in the worker's hands, the queue filled to its bound; every
            # callback past the bound was refused at once, none is waiting for room.
            assert (stats.max_queue_depth, stats.queue_depth, stats.busy_workers) == (10, 10, 1)
            assert ingress.statistics().shed == 29
            assert stats.state is PoolState.BACKLOGGED
            sink.hold.set()
        stats = pool_stats(ingress)
    statuses = sorted(r.status_code for r in answers.values())
    assert statuses == [200] * 11 + [429] * 29
    shed = [ref for ref, r in answers.items() if r.status_code == 429]
    assert all(answers[ref].json()["error"] == "queue_full" for ref in shed)
    assert all(answers[ref].headers["retry-after"] == "3" for ref in shed)
    # 2xx exactly for what was applied, never for what was shed.
    assert sorted(sink.refs) == sorted(ref for ref, r in answers.items() if r.status_code == 200)
    assert stats.max_queue_depth == 10 == stats.queue_capacity
    assert (stats.queue_depth, stats.applied_receipts) == (0, 11)
    assert registry.get_sample_value("triage_dlr_shed_total", {"provider": "acme"}) == 29
    assert registry.get_sample_value("triage_dlr_callbacks_total", {"provider": "acme"}) == 40


async def test_an_ack_timeout_is_503_and_a_queued_job_is_skipped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    sink.hold = trio.Event()
    ingress = make_ingress(sink, workers_min=1, workers_max=1, batch_max=1, ack_timeout_s=5.0)
    answers: dict[str, httpx.Response] = {}
    async with running(ingress) as client:

        async def post(ref: str) -> None:
            content, headers = signed(ref)
            answers[ref] = await client.post("/webhooks/dlr/acme", content=content, headers=headers)

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(post, "taken")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(post, "queued")
        assert trio.current_time() - start == 5.0
        assert pool_stats(ingress).queue_depth == 1  # abandoned, still counted until skipped
        sink.hold.set()
        await trio.testing.wait_all_tasks_blocked()
        assert pool_stats(ingress).queue_depth == 0
    assert [answers[r].status_code for r in ("taken", "queued")] == [503, 503]
    assert answers["queued"].json()["error"] == "ack_timeout"
    assert answers["queued"].headers["retry-after"] == "3"
    # The batch already in the sink's hands was applied (the provider's retry applies it
    # again: the sink is idempotent); the one still queued was skipped.
    assert sink.refs == ["taken"]


async def test_a_failing_sink_answers_503_so_the_provider_retries() -> None:
    sink = Sink()
    sink.fail = True
    ingress = make_ingress(sink)
    content, headers = signed("r1")
    async with running(ingress) as client:
        failed = await client.post("/webhooks/dlr/acme", content=content, headers=headers)
        retried = await client.post("/webhooks/dlr/acme", content=content, headers=headers)
    assert (failed.status_code, failed.json()["error"]) == (503, "sink_failed")
    assert failed.headers["retry-after"] == "3"
    assert retried.status_code == 200
    assert sink.refs == ["r1"]


async def test_stopping_the_ingress_answers_waiting_callbacks_503() -> None:
    sink = Sink()
    sink.hold = trio.Event()
    ingress = make_ingress(sink, workers_min=1, workers_max=1, batch_max=1)
    outcomes: list[Outcome | None] = []
    async with trio.open_nursery() as outer, trio.open_nursery() as inner:
        await start_pool(inner, ingress)

        async def deliver(ref: str) -> None:
            outcomes.append(
                await ingress.deliver(
                    "acme",
                    [Receipt(provider="acme", state=DeliveryState.DELIVERED, client_ref=ref)],
                )
            )

        outer.start_soon(deliver, "a")
        outer.start_soon(deliver, "b")
        await trio.testing.wait_all_tasks_blocked()
        assert (pool_stats(ingress).busy_workers, pool_stats(ingress).queue_depth) == (1, 1)
        inner.cancel_scope.cancel()
    # Both answered at once (not at the ack timeout): one taken, one still queued.
    assert outcomes == [Outcome.FAILED, Outcome.FAILED]
    assert sink.batches == []
    assert not ingress.running and ingress.pool.statistics() is None


# -- worker scaling ----------------------------------------------------------------------


def receipt(ref: str) -> list[Receipt]:
    return [Receipt(provider="acme", state=DeliveryState.DELIVERED, client_ref=ref)]


async def test_workers_scale_up_under_backlog_and_down_when_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    sink.hold = trio.Event()
    registry = CollectorRegistry()
    ingress = make_ingress(
        sink, workers_min=1, workers_max=3, batch_max=1, queue_capacity=20, scale_up_depth=3,
        scale_up_after_s=2.0, scale_down_after_s=10.0, ack_timeout_s=1000.0, registry=registry,
    )  # fmt: skip

    def workers() -> int:
        count = pool_stats(ingress).workers
        assert registry.get_sample_value("triage_dlr_workers") == count
        return count

    async with trio.open_nursery() as nursery:
        await start_pool(nursery, ingress)
        t0 = trio.current_time()
        jobs = [ingress.offer("acme", receipt(f"r{i}")) for i in range(8)]
        assert all(job is not None for job in jobs)
        await trio.testing.wait_all_tasks_blocked()
        assert (workers(), pool_stats(ingress).queue_depth) == (1, 7)

        await trio.sleep_until(t0 + 1.999)
        assert workers() == 1
        await trio.sleep_until(t0 + 2.0)
        await trio.testing.wait_all_tasks_blocked()
        assert (workers(), pool_stats(ingress).queue_depth) == (2, 6)
        await trio.sleep_until(t0 + 3.999)
        assert workers() == 2
        await trio.sleep_until(t0 + 4.0)
        await trio.testing.wait_all_tasks_blocked()
        assert (workers(), pool_stats(ingress).queue_depth) == (3, 5)
        await trio.sleep_until(t0 + 30.0)
        assert workers() == 3  # workers_max: the backlog holds, no fourth worker
        assert pool_stats(ingress).started_workers == 2

        sink.hold.set()
        await trio.testing.wait_all_tasks_blocked()
        released = trio.current_time()
        assert sorted(sink.refs) == sorted(f"r{i}" for i in range(8))
        assert pool_stats(ingress).queue_depth == 0
        # Idle from `released`: the extra workers stop after scale_down_after_s, all but one.
        await trio.sleep_until(released + 9.999)
        assert workers() == 3
        await trio.sleep_until(released + 10.0)
        await trio.testing.wait_all_tasks_blocked()
        assert workers() == 1
        await trio.sleep_until(released + 100.0)
        assert workers() == 1  # never below workers_min
        assert pool_stats(ingress).stopped_workers == 2
        nursery.cancel_scope.cancel()


async def test_a_backlog_that_drains_in_time_starts_no_worker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    sink.hold = trio.Event()
    ingress = make_ingress(
        sink, workers_min=1, workers_max=3, batch_max=1, scale_up_depth=3,
        scale_up_after_s=2.0, ack_timeout_s=1000.0,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await start_pool(nursery, ingress)
        t0 = trio.current_time()
        for i in range(4):
            ingress.offer("acme", receipt(f"r{i}"))
        await trio.sleep_until(t0 + 1.5)
        sink.hold.set()  # the backlog drains before it held for 2 s
        await trio.testing.wait_all_tasks_blocked()
        sink.hold = trio.Event()
        await trio.sleep_until(t0 + 1.9)
        for i in range(4, 8):  # a new backlog: its own 2 s start now
            ingress.offer("acme", receipt(f"r{i}"))
        await trio.sleep_until(t0 + 3.8)
        assert pool_stats(ingress).workers == 1
        await trio.sleep_until(t0 + 3.9)
        await trio.testing.wait_all_tasks_blocked()
        assert pool_stats(ingress).workers == 2
        sink.hold.set()
        nursery.cancel_scope.cancel()


async def test_the_row_13_detector_fires_on_a_callback_flood(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    detector = SpikeOverBaselineDetector(
        "dlr_callback_flood", metric="triage_dlr_callbacks_total", threshold=10,
        window_s=6.0, buckets=3, baseline_alpha=0.5, min_volume=3, row=13,
    )  # fmt: skip
    ingress = make_ingress(sink, detector=detector)
    content, headers = signed("r1")
    async with running(ingress) as client:
        for _ in range(12):  # baseline: one callback a second
            await client.post("/webhooks/dlr/acme", content=content, headers=headers)
            await trio.sleep(1.0)
        assert not detector.evaluate().firing
        for _ in range(150):  # a flood: 150 in a second, 25/s over the window
            await client.post("/webhooks/dlr/acme", content=content, headers=headers)
        state = detector.evaluate()
    assert state.firing and state.row == 13
    assert ingress.statistics().callbacks == 162


# -- served for real -------------------------------------------------------------------


async def test_served_for_real_mounted_under_webhooks_with_the_public_url() -> None:
    sink = Sink()
    urls: list[str] = []
    ingress = make_ingress(
        sink,
        dlr_parsers={"acme": make_parser("acme", urls)},
        public_base_url="https://triage.example.org/",
    )

    class Ready:
        def readiness(self) -> tuple[bool, dict[str, Any]]:
            return True, {"status": "ready"}

    app = HealthApp(readiness=Ready(), registry=CollectorRegistry(), mounts={"/webhooks/": ingress})
    server = HttpServer(app, host="127.0.0.1", port=0, graceful_timeout_s=2.0)
    async with trio.open_nursery() as nursery:
        await start_pool(nursery, ingress)
        await nursery.start(server.run)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
            content, headers = signed("r1")
            ok = await client.post("/webhooks/dlr/acme?ref=t%3Ad", content=content, headers=headers)
            forged = await client.post(
                "/webhooks/dlr/acme", content=content, headers={SIGNATURE: "00"}
            )
            unknown = await client.post("/webhooks/dlr/nobody", content=content, headers=headers)
        server.shutdown()
        await server.wait_stopped()
        nursery.cancel_scope.cancel()
    assert (ok.status_code, ok.json()) == (200, {"accepted": 1})
    assert (forged.status_code, forged.json()["error"]) == (401, "bad_signature")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_provider")
    assert urls[0] == "https://triage.example.org/webhooks/dlr/acme?ref=t%3Ad"
    assert sink.refs == ["r1"]


async def test_without_a_public_url_the_request_url_is_rebuilt() -> None:
    urls: list[str] = []
    ingress = make_ingress(Sink(), dlr_parsers={"acme": make_parser("acme", urls)})
    scope = scope_for("/webhooks/dlr/acme", [(b"host", b"dlr.example:8443")])
    status, _, _ = await drive(ingress, scope, b"{}", endless=False)
    assert status == 401  # unsigned, but the parser saw the URL
    assert urls == ["https://dlr.example:8443/webhooks/dlr/acme?ref=t1%3Ad1"]
