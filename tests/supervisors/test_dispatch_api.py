"""The HTTP dispatch API: typed refusals that reach no submitter, answers, the size cap."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import pytest
import trio
from hypercorn.typing import ASGIReceiveEvent, ASGISendEvent, ConnectionState, HTTPScope
from prometheus_client import CollectorRegistry

from actors.dispatch_request import DispatchLimits, RequestDecoder, SubmitRequest
from actors.idempotency import IdempotencyConflict
from config.schema import DispatchConfig
from engine.errors import BulkheadFull, ProviderUnavailable, RateLimitExceeded
from providers.channel import ChannelName
from supervisors.dispatch_api import DispatchApi
from supervisors.http import HealthApp, HttpServer
from tests.fakes import Submitter, Typed

TENANT = "6f1c2f1e-4a8b-4c36-9d76-0e4f7a1b2c3d"
MAX_BODY = 1024
RETRY_AFTER_S = 2.5
# Small enough that every bound is reached below MAX_BODY.
LIMITS = DispatchLimits.of(DispatchConfig(max_value_chars=64, max_data_fields=8))


def body(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "tenant_id": TENANT,
        "channel": "sms",
        "template": "appointment_reminder",
        "template_version": None,
        "recipient": "+15551234567",
        "data": {"name": "Ada"},
    }
    base.update(changes)
    return base


def make_api(**kwargs: Any) -> tuple[DispatchApi, Submitter]:
    submitter = Submitter()
    kwargs.setdefault("requests", RequestDecoder(LIMITS))
    api = DispatchApi(submitter, max_body_bytes=MAX_BODY, retry_after_s=RETRY_AFTER_S, **kwargs)
    return api, submitter


def client_for(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://triage")


HEADERS = {"Idempotency-Key": "key-1", "Content-Type": "application/json"}


async def test_a_valid_request_is_accepted_and_submitted() -> None:
    api, submitter = make_api()
    async with client_for(api) as client:
        response = await client.post("/v1/dispatches", json=body(), headers=HEADERS)
    assert response.status_code == 202
    assert response.json() == {"dispatch_id": "d1", "status": "queued"}
    assert submitter.seen == [
        SubmitRequest(
            idempotency_key="key-1",
            tenant_id=TENANT,
            channel=ChannelName.SMS,
            template="appointment_reminder",
            recipient="+15551234567",
            template_version=None,
            data={"name": "Ada"},
        )
    ]


async def test_a_replay_gets_200_and_the_original_answer() -> None:
    api, _ = make_api()
    async with client_for(api) as client:
        first = await client.post("/v1/dispatches", json=body(), headers=HEADERS)
        again = await client.post("/v1/dispatches", json=body(), headers=HEADERS)
        other = await client.post(
            "/v1/dispatches", json=body(), headers={**HEADERS, "Idempotency-Key": "key-2"}
        )
    assert (first.status_code, again.status_code, other.status_code) == (202, 200, 202)
    assert again.json() == first.json() == {"dispatch_id": "d1", "status": "queued"}
    assert other.json()["dispatch_id"] == "d2"


def _json(value: Any) -> bytes:
    return msgspec.json.encode(value)


REFUSALS: list[tuple[str, dict[str, str], bytes, int, str, str | None]] = [
    ("garbage body", HEADERS, b"\x00not json{", 400, "invalid_json", None),
    ("truncated json", HEADERS, b'{"tenant_id": ', 400, "invalid_json", None),
    ("array body", HEADERS, b"[1, 2]", 400, "invalid_field", None),
    ("bad tenant", HEADERS, _json(body(tenant_id="nope")), 400, "invalid_field", "tenant_id"),
    ("bad channel", HEADERS, _json(body(channel="fax")), 400, "invalid_field", "channel"),
    ("empty template", HEADERS, _json(body(template="")), 400, "invalid_field", "template"),
    (
        "version 0",
        HEADERS,
        _json(body(template_version=0)),
        400,
        "invalid_field",
        "template_version",
    ),
    ("data not str", HEADERS, _json(body(data={"n": 1})), 400, "invalid_field", "data[...]"),
    ("unknown field", HEADERS, _json(body(priority="high")), 400, "invalid_field", "priority"),
    (
        "key in body",
        HEADERS,
        _json(body(idempotency_key="k")),
        400,
        "invalid_field",
        "idempotency_key",
    ),
    (
        "missing recipient",
        HEADERS,
        _json({k: v for k, v in body().items() if k != "recipient"}),
        400,
        "invalid_field",
        "recipient",
    ),
    (
        "missing key",
        {"Content-Type": "application/json"},
        _json(body()),
        400,
        "missing_idempotency_key",
        "Idempotency-Key",
    ),
    (
        "key too long",
        {**HEADERS, "Idempotency-Key": "k" * 201},
        _json(body()),
        400,
        "invalid_idempotency_key",
        "Idempotency-Key",
    ),
    (
        "key not printable",
        {**HEADERS, "Idempotency-Key": "k\x7fk"},
        _json(body()),
        400,
        "invalid_idempotency_key",
        "Idempotency-Key",
    ),
    (
        "wrong content type",
        {**HEADERS, "Content-Type": "text/plain"},
        _json(body()),
        415,
        "unsupported_media_type",
        "Content-Type",
    ),
    (
        "no content type",
        {"Idempotency-Key": "key-1"},
        _json(body()),
        415,
        "unsupported_media_type",
        "Content-Type",
    ),
    (
        "oversize",
        HEADERS,
        _json(body(data={"x": "y" * MAX_BODY})),
        413,
        "payload_too_large",
        None,
    ),
    # the [dispatch] bounds and shapes: refused while decoding, by the same table
    ("sms not e164", HEADERS, _json(body(recipient="0555")), 400, "invalid_field", "recipient"),
    (
        "push not a platform",
        HEADERS,
        _json(body(channel="push", recipient="+15551234567")),
        400,
        "invalid_field",
        "recipient",
    ),
    (
        "email not an address",
        HEADERS,
        _json(body(channel="email", recipient="nobody")),
        400,
        "invalid_field",
        "recipient",
    ),
    (
        "nul recipient",
        HEADERS,
        _json(body(recipient="+1555\x00")),
        400,
        "invalid_field",
        "recipient",
    ),
    ("bad template", HEADERS, _json(body(template="a b")), 400, "invalid_field", "template"),
    ("template newline", HEADERS, _json(body(template="ab\n")), 400, "invalid_field", "template"),
    (
        "template too long",
        HEADERS,
        _json(body(template="t" * (LIMITS.max_template_chars + 1))),
        400,
        "invalid_field",
        "template",
    ),
    (
        "version too big",
        HEADERS,
        _json(body(template_version=2**31)),
        400,
        "invalid_field",
        "template_version",
    ),
    (
        "too many fields",
        HEADERS,
        _json(body(data={f"f{i}": "v" for i in range(LIMITS.max_data_fields + 1)})),
        400,
        "invalid_field",
        "data",
    ),
    ("bad field name", HEADERS, _json(body(data={"9x": "v"})), 400, "invalid_field", "data"),
    (
        "field name too long",
        HEADERS,
        _json(body(data={"f" * (LIMITS.max_field_name_chars + 1): "v"})),
        400,
        "invalid_field",
        "data",
    ),
    (
        "value too long",
        HEADERS,
        _json(body(data={"name": "v" * (LIMITS.max_value_chars + 1)})),
        400,
        "invalid_field",
        "data.name",
    ),
    ("nul value", HEADERS, _json(body(data={"name": "A\x00"})), 400, "invalid_field", "data.name"),
]


@pytest.mark.parametrize(
    ("headers", "content", "status", "code", "field"),
    [case[1:] for case in REFUSALS],
    ids=[case[0] for case in REFUSALS],
)
async def test_bad_requests_get_a_typed_4xx_and_reach_no_submitter(
    headers: dict[str, str], content: bytes, status: int, code: str, field: str | None
) -> None:
    api, submitter = make_api()
    async with client_for(api) as client:
        response = await client.post("/v1/dispatches", content=content, headers=headers)
    assert response.status_code == status
    answer = response.json()
    assert answer["error"] == code
    assert answer.get("field") == field
    assert answer["message"]
    assert submitter.seen == []


async def test_json_with_a_charset_is_json() -> None:
    api, submitter = make_api()
    headers = {**HEADERS, "Content-Type": "Application/JSON; charset=utf-8"}
    async with client_for(api) as client:
        response = await client.post("/v1/dispatches", content=_json(body()), headers=headers)
    assert response.status_code == 202
    assert len(submitter.seen) == 1


class chunks:  # named like the generator it stands for
    """A streamed (chunked, no Content-Length) body. A class, not an async generator:
    a server that stops reading leaves a generator unfinalized (an unraisable warning)."""

    def __init__(self, parts: list[bytes]) -> None:
        self._parts = list(parts)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self._parts:
            raise StopAsyncIteration
        return self._parts.pop(0)


async def test_a_chunked_body_over_the_cap_is_413() -> None:
    # Driven directly: httpx's ASGITransport leaves a request stream the app stopped
    # reading unfinalized (an unraisable warning), so streamed refusals are tested here.
    api, submitter = make_api()
    scope = http_scope(headers=raw(HEADERS))  # no Content-Length
    sent, received = await call(api, scope, [b"x" * 400] * 5)
    assert sent[0]["status"] == 413  # type: ignore[typeddict-item]  # response.start
    assert msgspec.json.decode(sent[1]["body"])["error"] == "payload_too_large"  # type: ignore[typeddict-item]  # response.body
    assert received == 3  # 1200 bytes > 1024: the last two chunks were never read
    assert submitter.seen == []


async def test_a_chunked_body_under_the_cap_is_read() -> None:
    api, submitter = make_api()
    data = _json(body())
    parts = [data[:10], data[10:]]
    async with client_for(api) as client:
        response = await client.post("/v1/dispatches", content=chunks(parts), headers=HEADERS)
    assert response.status_code == 202
    assert len(submitter.seen) == 1


async def test_length_required_when_configured() -> None:
    api, submitter = make_api(require_content_length=True)
    sent, received = await call(api, http_scope(headers=raw(HEADERS)), [_json(body())])
    assert sent[0]["status"] == 411  # type: ignore[typeddict-item]  # response.start
    assert msgspec.json.decode(sent[1]["body"])["error"] == "length_required"  # type: ignore[typeddict-item]  # response.body
    assert received == 0
    async with client_for(api) as client:
        sized = await client.post("/v1/dispatches", json=body(), headers=HEADERS)
    assert sized.status_code == 202
    assert len(submitter.seen) == 1


async def test_a_bad_content_length_is_400() -> None:
    api, submitter = make_api()
    scope = http_scope(headers=[*raw(HEADERS), (b"content-length", b"12abc")])
    sent, _ = await call(api, scope, [b"{}"])
    assert sent[0]["status"] == 400  # type: ignore[typeddict-item]  # response.start
    assert msgspec.json.decode(sent[1]["body"])["error"] == "invalid_content_length"  # type: ignore[typeddict-item]  # response.body
    assert submitter.seen == []


def raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]


def http_scope(
    *, method: str = "POST", path: str = "/v1/dispatches", headers: list[tuple[bytes, bytes]]
) -> HTTPScope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8080),
        "state": ConnectionState({}),
        "extensions": {},
    }


async def call(
    app: Any, scope: HTTPScope, parts: list[bytes], *, endless: bool = False
) -> tuple[list[ASGISendEvent], int]:
    """Drive ``app`` directly; ``endless``: the client never stops sending ``parts[0]``."""
    sent: list[ASGISendEvent] = []
    received = 0

    async def receive() -> ASGIReceiveEvent:
        nonlocal received
        await trio.lowlevel.checkpoint()
        received += 1
        if endless:
            return {"type": "http.request", "body": parts[0], "more_body": True}
        index = received - 1
        more = index < len(parts) - 1
        return {"type": "http.request", "body": parts[index], "more_body": more}

    async def send(event: ASGISendEvent) -> None:
        await trio.lowlevel.checkpoint()
        sent.append(event)

    with trio.fail_after(5):
        await app(scope, receive, send)
    return sent, received


async def test_an_endless_body_is_refused_at_the_cap_without_reading_on() -> None:
    api, submitter = make_api()
    scope = http_scope(headers=raw(HEADERS))  # no Content-Length
    sent, received = await call(api, scope, [b"x" * 100], endless=True)
    assert sent[0]["status"] == 413  # type: ignore[typeddict-item]  # response.start
    # 11 chunks of 100 bytes pass the 1024-byte cap: reading stopped right there.
    assert received == 11
    assert submitter.seen == []


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405(method: str) -> None:
    api, submitter = make_api()
    async with client_for(api) as client:
        response = await client.request(method, "/v1/dispatches", headers=HEADERS)
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json()["error"] == "method_not_allowed"
    assert submitter.seen == []


async def test_other_paths_are_404_no_lookup_is_served() -> None:
    api, submitter = make_api()
    async with client_for(api) as client:
        lookup = await client.get(f"/v1/dispatches/d1?tenant_id={TENANT}")
        post = await client.post("/v1/dispatches/d1", json=body(), headers=HEADERS)
    assert (lookup.status_code, post.status_code) == (404, 404)
    assert lookup.json()["error"] == "not_found"
    assert submitter.seen == []


ERRORS: list[tuple[str, Exception, int, str, str | None, str | None]] = [
    (
        "template not found",
        Typed("template_not_found", 422),
        422,
        "template_not_found",
        None,
        None,
    ),
    ("category disabled", Typed("category_disabled", 422), 422, "category_disabled", None, None),
    (
        "invalid request",
        Typed("invalid_field", 400, field="recipient"),
        400,
        "invalid_field",
        "recipient",
        None,
    ),
    ("typed overload", Typed("overloaded", 503), 503, "overloaded", None, "3"),
    (
        "conflict",
        IdempotencyConflict(TENANT, "key-1"),
        409,
        "idempotency_conflict",
        "Idempotency-Key",
        None,
    ),
    (
        "rate limited",
        RateLimitExceeded("tenant_sends", TENANT, retry_after_s=7.2),
        429,
        "overloaded",
        None,
        "8",
    ),
    (
        "bulkhead full",
        BulkheadFull("sms", capacity=4, waited_s=0.1),
        503,
        "overloaded",
        None,
        "3",
    ),
    (
        "database down",
        ProviderUnavailable("postgres: unavailable"),
        503,
        "unavailable",
        None,
        "3",
    ),
    ("a bug", RuntimeError("boom"), 500, "internal_error", None, None),
]


@pytest.mark.parametrize(
    ("error", "status", "code", "field", "retry_after"),
    [case[1:] for case in ERRORS],
    ids=[case[0] for case in ERRORS],
)
async def test_submitter_errors_become_typed_answers(
    error: Exception, status: int, code: str, field: str | None, retry_after: str | None
) -> None:
    api, submitter = make_api()
    submitter.error = error
    async with client_for(api) as client:
        response = await client.post("/v1/dispatches", json=body(), headers=HEADERS)
    assert response.status_code == status
    assert response.json()["error"] == code
    assert response.json().get("field") == field
    assert response.headers.get("retry-after") == retry_after
    assert "boom" not in response.text  # a bug's message stays in the log


async def test_served_for_real_through_hypercorn_mounted_in_the_health_app() -> None:
    api, submitter = make_api()

    class Ready:
        def readiness(self) -> tuple[bool, dict[str, Any]]:
            return True, {"status": "ready"}

    app = HealthApp(readiness=Ready(), registry=CollectorRegistry(), mounts={"/v1/dispatches": api})
    server = HttpServer(app, host="127.0.0.1", port=0, graceful_timeout_s=2.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        base = f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=base) as client:
            accepted = await client.post("/v1/dispatches", json=body(), headers=HEADERS)
            replay = await client.post("/v1/dispatches", json=body(), headers=HEADERS)
            too_big = await client.post(
                "/v1/dispatches", content=b"x" * (MAX_BODY + 1), headers=HEADERS
            )
            garbage = await client.post("/v1/dispatches", content=b"{{{", headers=HEADERS)
            livez = await client.get("/livez")
        server.shutdown()
    assert (accepted.status_code, accepted.json()) == (
        202,
        {"dispatch_id": "d1", "status": "queued"},
    )
    assert replay.status_code == 200
    assert (too_big.status_code, too_big.json()["error"]) == (413, "payload_too_large")
    assert (garbage.status_code, garbage.json()["error"]) == (400, "invalid_json")
    assert livez.status_code == 200
    assert [r.idempotency_key for r in submitter.seen] == ["key-1", "key-1"]


def test_tenant_ids_are_canonicalised() -> None:
    upper = TENANT.upper()
    request = RequestDecoder(LIMITS).decode_http(_json(body(tenant_id=upper)), "k")
    assert request.tenant_id == str(uuid.UUID(TENANT))
    built = RequestDecoder(LIMITS).build(idempotency_key="k", **body(tenant_id=upper))
    assert built == request  # in-process callers: the same rules, the same request
