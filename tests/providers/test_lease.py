"""The singleton lease against the real PostgreSQL: one holder, freed with its connection.

Real time here (the server's I/O does not run on a mock clock); the wrapper's own
timing is asserted exactly on the autojump clock in tests/supervisors/test_singleton.py.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import trio

from engine.errors import ProviderUnavailable
from engine.supervisor import ChildSpec
from providers.bridge import run
from providers.db.lease import LEASE_CLASS, AdvisoryLease, lease_key, lease_oid
from supervisors.singleton import Singleton, SingletonState

TIMEOUT_S = 2.0
RETRY_S = 0.4
CHECK_S = 0.1
#: Scheduling slack on this shared machine, on top of the configured periods.
SLACK_S = 1.0


async def _holder_pids(url: str, name: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND classid = $1 AND objid = $2 AND objsubid = 2",
            LEASE_CLASS,
            lease_oid(name),
        )
        return [r["pid"] for r in rows]
    finally:
        await conn.close()


async def _terminate(url: str, pids: list[int]) -> None:
    conn = await asyncpg.connect(url)
    try:
        for pid in pids:
            await conn.execute("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()


def test_the_key_is_stable_and_an_int4() -> None:
    assert lease_key("push_feedback") == lease_key("push_feedback")
    assert lease_key("push_feedback") != lease_key("push_stale_sweep")
    for name in ("a", "push_feedback", "x" * 200):
        assert -(2**31) <= lease_key(name) < 2**31
        assert lease_oid(name) % 2**32 == lease_key(name) % 2**32


async def test_one_of_two_holds_the_lease_until_it_releases(
    postgres_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    a = AdvisoryLease(postgres_url, "push_feedback", timeout_s=TIMEOUT_S)
    b = AdvisoryLease(postgres_url, "push_feedback", timeout_s=TIMEOUT_S)
    other = AdvisoryLease(postgres_url, "push_stale_sweep", timeout_s=TIMEOUT_S)
    try:
        assert await a.try_acquire() is True
        assert await b.try_acquire() is False and not b.held
        assert await other.try_acquire() is True  # another name, another lock
        assert len(await run(_holder_pids, postgres_url, "push_feedback")) == 1
        await a.check()  # still held
        await a.release()
        assert await run(_holder_pids, postgres_url, "push_feedback") == []
        assert await b.try_acquire() is True
    finally:
        for lease in (a, b, other):
            await lease.release()


async def test_a_terminated_holder_loses_the_lease_and_the_other_takes_it(
    postgres_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    a = AdvisoryLease(postgres_url, "push_feedback", timeout_s=TIMEOUT_S)
    b = AdvisoryLease(postgres_url, "push_feedback", timeout_s=TIMEOUT_S)
    try:
        assert await a.try_acquire()
        assert not await b.try_acquire()
        await run(_terminate, postgres_url, await run(_holder_pids, postgres_url, "push_feedback"))
        with pytest.raises(ProviderUnavailable):
            await a.check()
        assert not a.held
        assert await b.try_acquire()
    finally:
        await a.release()
        await b.release()


class _Child:
    def __init__(self) -> None:
        self.running = False
        self.runs = 0

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.running = True
        self.runs += 1
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            self.running = False


async def test_the_standby_replica_takes_over_within_retry_s_of_the_holder_losing_its_connection(
    postgres_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    children = [_Child(), _Child()]
    wrappers = [
        Singleton(
            ChildSpec(id="push_feedback", start=child.run),
            AdvisoryLease(postgres_url, "push_feedback", timeout_s=TIMEOUT_S),
            retry_s=RETRY_S,
            check_s=CHECK_S,
            release_s=TIMEOUT_S,
        )
        for child in children
    ]
    async with trio.open_nursery() as nursery:
        for wrapper in wrappers:
            await nursery.start(wrapper.run)
        with trio.fail_after(RETRY_S + SLACK_S):
            while not any(w.state is SingletonState.LEADING for w in wrappers):  # noqa: ASYNC110 - two wrappers, no one event
                await trio.sleep(0.01)
        await trio.sleep(2 * RETRY_S)  # the other has tried and stood by meanwhile
        states = [w.state for w in wrappers]
        assert sorted(s.value for s in states) == ["leading", "standby"]
        winner = states.index(SingletonState.LEADING)
        loser = 1 - winner
        assert children[winner].running and not children[loser].running

        pids = await run(_holder_pids, postgres_url, "push_feedback")
        assert len(pids) == 1
        began = trio.current_time()
        await run(_terminate, postgres_url, pids)
        with trio.fail_after(CHECK_S + SLACK_S):
            while children[winner].runs == 1 and children[winner].running:  # noqa: ASYNC110 - polled state
                await trio.sleep(0.01)
        assert wrappers[winner].losses == 1  # it noticed and stopped its child
        with trio.fail_after(RETRY_S + CHECK_S + SLACK_S):
            while sum(c.running for c in children) != 1:  # noqa: ASYNC110 - polled state
                await trio.sleep(0.01)
        took = trio.current_time() - began
        assert took <= RETRY_S + CHECK_S + SLACK_S
        assert len(await run(_holder_pids, postgres_url, "push_feedback")) == 1
        nursery.cancel_scope.cancel()
    assert not any(c.running for c in children)
    with trio.fail_after(SLACK_S):  # the server ends the dropped backends by itself
        while await run(_holder_pids, postgres_url, "push_feedback"):  # noqa: ASYNC110 - the server's state
            await trio.sleep(0.01)
