"""Both dispatch doors of the real daemon, fed random bodies: 2xx or a typed 4xx, nothing else.

One in-process daemon (``config/dev.toml``, the session's PostgreSQL and NATS, the
loopback emulators). Hypothesis generates bodies -- raw bytes, any JSON, and
dispatch-shaped objects with every field mutated (unknown tenants, template
versions beyond PostgreSQL's integer, template names with NUL bytes, lone
surrogates, non-UTF-8 bytes, overlong text) -- and sends each to ``POST
/v1/dispatches`` and to the NATS subject ``triage.commands.dispatch``. Every answer
must be 2xx, a typed 4xx (``{"error", "message"}``) or the documented 503
``overloaded``/``unavailable``; never a 500, never a dropped connection or a
missing reply. A request refused as invalid leaves no dispatch row.
"""

from __future__ import annotations

import asyncio
import json
import string
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import asyncpg
import httpx
import msgspec
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.answers import IDEMPOTENCY_HEADER, STATUS_HEADER
from providers import jetstream
from providers.bridge import run
from supervisors.demo import DEMO_TENANT_ID
from tests.supervisors.test_channels_daemon import Live, live_daemon

EXAMPLES = int(__import__("os").environ.get("DOORS_EXAMPLES", "150"))
REPLY_S = 10.0
#: 503 is documented for load shedding and unavailable dependencies, nothing else.
DOCUMENTED_503 = frozenset({"overloaded", "unavailable"})
#: Refusals of the request itself: nothing may be written for them.
INVALID_CODES = frozenset(
    {"invalid_json", "invalid_field", "invalid_request", "invalid_idempotency_key",
     "missing_idempotency_key", "payload_too_large", "unknown_tenant"}
)  # fmt: skip

KEY_CHARS = string.ascii_letters + string.digits + "-_ .:/"
keys = st.one_of(
    st.uuids().map(lambda u: f"p-{u.hex}"),
    st.none(),
    st.text(alphabet=KEY_CHARS, min_size=1, max_size=24).map(lambda k: f"p-{k}-"),
    st.text(alphabet=KEY_CHARS, min_size=0, max_size=260),
)
texts = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(["\x00", "a\x00b", "\ud800", "reminder\udfff", "", " ", "." * 5]),
    st.text(alphabet=string.ascii_letters + "_.-", min_size=150, max_size=400),
)
ints = st.one_of(
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([2**31 - 1, 2**31, -(2**31) - 1, 2**63, 10**30]),
    st.integers(),
)
NAME_CHARS = string.ascii_letters + string.digits + "_.-"
FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "tenant_id": st.one_of(st.uuids().map(str), texts, ints),
    "channel": st.one_of(st.sampled_from(["sms", "push", "email"]), texts),
    "template": st.one_of(
        st.sampled_from(["reminder", "push_reminder", "email_reminder"]),
        st.text(alphabet=NAME_CHARS, min_size=1, max_size=260),
        texts,
        # overlong: past the body cap (dev.toml: 64 KiB), answered before it is all read
        st.integers(min_value=1_000, max_value=300_000).map(lambda n: "t" * n),
    ),
    "template_version": st.one_of(st.none(), ints, texts),
    "recipient": st.one_of(st.sampled_from(["+15550100", "fcm:t1", "pat@example.org"]), texts),
    "data": st.one_of(
        st.dictionaries(texts, st.one_of(texts, ints), max_size=4),
        st.dictionaries(st.text(alphabet=NAME_CHARS, min_size=1, max_size=70), texts, max_size=4),
        texts,
    ),
    "idempotency_key": st.one_of(keys, ints),
    "extra": texts,
}
VALID: dict[str, Any] = {
    "tenant_id": str(DEMO_TENANT_ID),
    "channel": "sms",
    "template": "reminder",
    "recipient": "+15550100",
    "data": {"time": "10:30"},
}


def _mutated(overrides: list[dict[str, Any]], dropped: set[str]) -> dict[str, Any]:
    body = {k: v for k, v in VALID.items() if k not in dropped}
    for override in overrides:
        body.update(override)
    return body


# A valid body with zero to two fields replaced and maybe one left out: most bodies
# get past the cheap checks, so the deep ones (database, templates) are reached.
dispatch_like = st.builds(
    _mutated,
    st.lists(st.one_of(*(st.fixed_dictionaries({k: v}) for k, v in FIELDS.items())), max_size=2),
    st.sets(st.sampled_from(sorted(VALID)), max_size=1),
)
json_any = st.recursive(
    st.none() | st.booleans() | ints | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=8,
)


def _encoded(value: Any, how: str) -> bytes:
    if how == "ascii":  # lone surrogates and NUL travel as \u escapes
        return json.dumps(value).encode()
    # raw UTF-8, lone surrogates as invalid bytes: not UTF-8 at all
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


bodies = st.one_of(
    st.binary(max_size=120),
    st.builds(_encoded, json_any, st.sampled_from(["ascii", "raw"])),
    st.builds(_encoded, dispatch_like, st.sampled_from(["ascii", "raw"])),
)


@dataclass
class Seen:
    invalid_keys: set[str] = field(default_factory=set)
    accepted_keys: set[str] = field(default_factory=set)  # a key may come back in another body
    statuses: dict[int, int] = field(default_factory=dict)


def _check(status: int, data: bytes, where: str, body: bytes) -> str | None:
    """The answer's error code (None for a 2xx), asserting it is an allowed, typed answer."""
    assert status in (200, 202) or 400 <= status <= 499 or status == 503, (
        where,
        status,
        data,
        body,
    )
    answer = msgspec.json.decode(data)
    if status < 300:
        assert isinstance(answer["dispatch_id"], str), (where, answer)
        return None
    assert isinstance(answer["error"], str) and isinstance(answer["message"], str), (where, answer)
    if status == 503:
        assert answer["error"] in DOCUMENTED_503, (where, answer, body)
    return str(answer["error"])


async def _both_doors(live: Live, nats: jetstream.JetStreamClient, body: bytes, key: str | None,
                      seen: Seen) -> None:  # fmt: skip
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers[IDEMPOTENCY_HEADER] = key
    try:
        answer: httpx.Response | None = await live.client.post(
            "/v1/dispatches", content=body, headers=headers
        )
    except httpx.LocalProtocolError:  # h11 will not send it (e.g. a key of spaces): NATS only
        answer = None
    except httpx.TransportError as exc:  # a dropped connection: the bug this test hunts
        raise AssertionError(f"HTTP: no answer ({exc!r}) to {body!r} key {key!r}") from exc
    if answer is not None:
        code = _check(answer.status_code, answer.content, "http", body)
        seen.statuses[answer.status_code] = seen.statuses.get(answer.status_code, 0) + 1
        if code in INVALID_CODES and key is not None:
            seen.invalid_keys.add(key)
        if code is None and key is not None:
            seen.accepted_keys.add(key)
    nats_headers = {IDEMPOTENCY_HEADER: key} if key is not None else None
    reply = await run(
        partial(nats.nc.request, live.daemon.config.dispatch.nats_subject, body,
                timeout=REPLY_S, headers=nats_headers),
        service="nats",
    )  # fmt: skip
    status = int((reply.headers or {})[STATUS_HEADER])
    code = _check(status, reply.data, "nats", body)
    if code in INVALID_CODES and key is not None:
        seen.invalid_keys.add(key)
    if code is None:  # the command's own key field, when it has one, was the key used
        try:
            own = msgspec.json.decode(body).get("idempotency_key")
        except (msgspec.DecodeError, AttributeError):
            own = None
        seen.accepted_keys.update(k for k in (own, key) if isinstance(k, str))
    if code is None and key is not None:
        seen.accepted_keys.add(key)


async def _rows_with_keys(url: str, wanted: list[str]) -> list[str]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT idempotency_key FROM dispatches WHERE idempotency_key = ANY($1::text[])",
            wanted,
        )
        return [r["idempotency_key"] for r in rows]
    finally:
        await conn.close()


async def test_random_bodies_get_a_typed_answer_at_both_doors(
    postgres_url: str, nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    seen = Seen()
    async with live_daemon(postgres_url, nats_url) as live:
        nats = await run(jetstream.connect, nats_url)
        token = trio.lowlevel.current_trio_token()
        try:

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            )
            @given(body=bodies, key=keys)
            def property_holds(body: bytes, key: str | None) -> None:
                trio.from_thread.run(_both_doors, live, nats, body, key, seen, trio_token=token)

            await trio.to_thread.run_sync(property_holds)
        finally:
            await run(jetstream.close, nats)
        stored = await run(
            _rows_with_keys, live.owner_url, sorted(seen.invalid_keys), service="postgres"
        )
    assert set(stored) <= seen.accepted_keys  # a refused request wrote nothing
    assert seen.statuses.get(202, 0) + seen.statuses.get(200, 0) > 0 or EXAMPLES < 50


async def test_an_overlong_template_name_is_answered_413_not_dropped(
    postgres_url: str, nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    async with live_daemon(postgres_url, nats_url) as live:
        cap = live.daemon.config.dispatch.max_body_bytes
        drained = live.daemon.config.dispatch.drain_max_bytes  # read before the 413 up to this
        for size in (cap // 2, cap + 1, 8 * cap, drained - 1024):
            body = json.dumps({**VALID, "template": "t" * size}).encode()
            headers = {"Content-Type": "application/json", IDEMPOTENCY_HEADER: f"long-{size}"}
            answer = await live.client.post("/v1/dispatches", content=body, headers=headers)
            expected = 400 if len(body) <= cap else 413
            assert answer.status_code == expected, (size, answer.text)


async def test_one_bad_key_gets_one_error_code_at_both_doors(
    postgres_url: str, nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    """One key rule (check_idempotency_key, [dispatch] max_key_chars) and one answer table."""
    async with live_daemon(postgres_url, nats_url) as live:
        cap = live.daemon.config.dispatch.max_key_chars
        nats = await run(jetstream.connect, nats_url)
        try:
            for bad, code in [
                ("k" * (cap + 1), "invalid_idempotency_key"),  # one door only had the limit
                ("tab\there", "invalid_idempotency_key"),
                ("", "missing_idempotency_key"),
                (" padded", "invalid_idempotency_key"),
            ]:
                payload = json.dumps(VALID).encode()
                answers = []
                if bad.strip() == bad and "\t" not in bad:  # what h11 will put in a header
                    http = await live.client.post(
                        "/v1/dispatches",
                        content=payload,
                        headers={"Content-Type": "application/json", IDEMPOTENCY_HEADER: bad},
                    )
                    answers.append((http.status_code, http.json()["error"]))
                command = json.dumps({**VALID, "idempotency_key": bad}).encode()
                reply = await run(
                    partial(nats.nc.request, live.daemon.config.dispatch.nats_subject, command,
                            timeout=REPLY_S),
                    service="nats",
                )  # fmt: skip
                status = int((reply.headers or {})[STATUS_HEADER])
                answers.append((status, msgspec.json.decode(reply.data)["error"]))
                assert answers == [(400, code)] * len(answers), bad
        finally:
            await run(jetstream.close, nats)
