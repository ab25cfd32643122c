"""Three replicas on one PostgreSQL and one NATS, one SIGKILLed mid-load (issue 12).

Three real ``triage run`` processes (the overlay of test_dispatch_crash.py: every
provider at emulators living in *this* test process, so one set of counters sees
every send of every replica) share the session's PostgreSQL, NATS and Redis;
each has its own spool and port. Dispatches are posted round robin to the
three; once enough are acknowledged, the replica that holds the push-feedback
singleton's lease is SIGKILLed with requests in flight. Every key is then posted
again to the survivors (a client retrying what went unanswered, and what was
answered, with the same key). Then:

* every key has exactly one dispatch row, and every answer names it;
* every key was sent exactly once across every provider and every replica (the
  emulators count sends per idempotency key; what the dead replica left queued is
  resumed by a survivor's backlog, a send it cut short is probed, not resent);
* every row ends ``delivered`` (the receipts reach a survivor);
* the singleton is re-elected: a survivor acquires the lease within
  ``[singletons] retry_s`` (plus slack) of the kill, and exactly one survivor
  reports ``triage_singleton_leader{singleton="push_feedback"} 1``.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import asyncpg
import httpx
import pytest
import trio

from providers.bridge import run
from supervisors.emulated import open_emulators
from tests.supervisors.test_daemon import dev_config
from tests.supervisors.test_dispatch_crash import (
    FAST_RESUME,
    Running,
    _config_text,
    _env,
    _rows_async,
    body,
    daemon_process,
)

REPLICAS = 3
KEYS = 300
IN_FLIGHT = 16  # per replica
KILL_AFTER = 100  # acknowledgements seen before the SIGKILL
RETRIES = 5
START_S = 30.0
SETTLE_S = 30.0
#: A short lease period, so the re-election is quick to see (config, like every number).
SINGLETONS = {"retry_s": 0.5, "check_s": 0.25, "connect_timeout_s": 0.5}
#: Scheduling slack on this shared 2-core machine, beyond retry_s.
ELECTION_SLACK_S = 5.0
LEADER = re.compile(r'(?m)^triage_singleton_leader\{singleton="push_feedback"\} (\S+)$')


def _overlay(directory: Path) -> str:
    q = json.dumps
    keys = "\n".join(f"{key} = {value!r}" for key, value in SINGLETONS.items())
    return f"""
[spool]
path = {q(str(directory / "spool"))}

[singletons]
{keys}
"""


def _holds(replica: Running) -> bool:
    acquired = lost = 0
    for line in replica.lines.lines:
        entry = json.loads(line)
        if entry.get("singleton") != "push_feedback":
            continue
        acquired += entry.get("msg") == "singleton lease acquired"
        lost += entry.get("msg") == "singleton lease lost"
    return acquired > lost


async def _delivered_async(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        value = await conn.fetchval("SELECT count(*) FROM dispatches WHERE status = 'delivered'")
        return int(value or 0)
    finally:
        await conn.close()


# httpx's request bodies cut short by the kill are collected unexhausted: not our code.
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in.*ByteStream:pytest.PytestUnraisableExceptionWarning"
)
async def test_three_replicas_one_killed_mid_load_lose_nothing_and_send_nothing_twice(
    tmp_path: Path,
    postgres_url: str,
    nats_url: str,
    redis_url: str,
    bridge: asyncio.AbstractEventLoop,
) -> None:
    keys = [f"replica-{n}-{uuid.uuid4().hex[:8]}" for n in range(KEYS)]
    acked: dict[str, str] = {}
    async with open_emulators(dev_config()) as emulated, AsyncExitStack() as stack:
        env = _env(emulated, postgres_url, nats_url, redis_url)
        replicas: list[Running] = []
        for index in range(REPLICAS):  # one after the other: the first takes the lease
            directory = tmp_path / f"replica-{index}"
            directory.mkdir()
            config = directory / "triage.toml"
            config.write_text(
                _config_text(emulated, directory, dispatch=FAST_RESUME, extra=_overlay(directory))
            )
            replicas.append(await stack.enter_async_context(daemon_process(config, env, emulated)))
        with trio.fail_after(START_S):
            while not any(_holds(r) for r in replicas):  # noqa: ASYNC110 - log lines of three processes
                await trio.sleep(0.05)
        holders = [r for r in replicas if _holds(r)]
        assert len(holders) == 1, "one replica holds the singleton's lease"
        victim = holders[0]
        survivors = [r for r in replicas if r is not victim]
        emulated.point_receipts_at(survivors[0].url)

        limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=r.url, limits=limits, timeout=20)
            )
            for r in replicas
        ]
        enough = trio.Event()

        async def post(n: int) -> None:
            try:
                answer = await clients[n % REPLICAS].post(
                    "/v1/dispatches", json=body(n), headers={"Idempotency-Key": keys[n]}
                )
            except httpx.TransportError:
                return  # the replica died under it: unacknowledged, retried below
            assert answer.status_code in (200, 202), answer.text
            acked[keys[n]] = answer.json()["dispatch_id"]
            if len(acked) >= KILL_AFTER:
                enough.set()

        async with trio.open_nursery() as nursery:
            for n in range(KEYS):
                nursery.start_soon(post, n)
            with trio.fail_after(START_S):
                await enough.wait()
            victim.process.send_signal(signal.SIGKILL)  # many requests still in flight
            killed_at = time.monotonic()
        with trio.fail_after(10):
            await victim.process.wait()
        assert KILL_AFTER <= len(acked) < KEYS, "the kill must land mid-load"
        assert any(keys[n] not in acked for n in range(KEYS) if replicas[n % REPLICAS] is victim)

        # Re-elected on a survivor, within retry_s of the victim's connection dropping.
        with trio.fail_after(SINGLETONS["retry_s"] + ELECTION_SLACK_S):
            while not any(_holds(r) for r in survivors):  # noqa: ASYNC110 - log lines of two processes
                await trio.sleep(0.05)
        elected_after_s = time.monotonic() - killed_at
        assert elected_after_s <= SINGLETONS["retry_s"] + ELECTION_SLACK_S
        assert sum(_holds(r) for r in survivors) == 1

        survivor_clients = [clients[replicas.index(r)] for r in survivors]
        answered: dict[str, str] = {}

        async def retry(n: int) -> None:
            client = survivor_clients[n % len(survivor_clients)]
            for _ in range(RETRIES):
                try:
                    answer = await client.post(
                        "/v1/dispatches", json=body(n), headers={"Idempotency-Key": keys[n]}
                    )
                    break
                except httpx.TransportError:
                    await trio.sleep(0.2)
            else:
                raise AssertionError(f"key {keys[n]}: no answer in {RETRIES} tries")
            assert answer.status_code in (200, 202), answer.text
            if keys[n] in acked:
                assert answer.status_code == 200, answer.text
            answered[keys[n]] = answer.json()["dispatch_id"]

        async with trio.open_nursery() as nursery:
            for n in range(KEYS):
                nursery.start_soon(retry, n)

        rows = await run(_rows_async, postgres_url, service="postgres")
        assert {k: len(v) for k, v in rows.items()} == dict.fromkeys(keys, 1)
        assert {k: rows[k][0] for k in keys} == answered
        assert {k: answered[k] for k in acked} == acked

        with trio.move_on_after(SETTLE_S):
            while not all(emulated.received(k) >= 1 for k in keys):  # noqa: ASYNC110 - several emulators, no one event
                await trio.sleep(0.1)
        with trio.move_on_after(SETTLE_S):
            while await run(_delivered_async, postgres_url, service="postgres") < KEYS:  # noqa: ASYNC110 - the database's state
                await trio.sleep(0.2)
        await trio.sleep(1.0)  # a duplicate would have had time to arrive
        assert {k: emulated.received(k) for k in keys} == dict.fromkeys(keys, 1)
        assert emulated.duplicates() == 0
        assert await run(_delivered_async, postgres_url, service="postgres") == KEYS

        leaders = []
        for client in survivor_clients:
            found = LEADER.search((await client.get("/metrics")).text)
            assert found is not None
            leaders.append(float(found.group(1)))
        assert sorted(leaders) == [0.0, 1.0]  # exactly one survivor runs the singleton
