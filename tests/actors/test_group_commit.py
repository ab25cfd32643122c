"""The group commit on the autojump clock: batches grow with the load, errors reach their callers.

The unit here is an asyncio-free coroutine that records the batches it got and
takes ``UNIT_S`` of virtual time (the crossing itself is :class:`DbPool`'s, tested
with PostgreSQL in tests/providers/test_dispatches_db.py); ``_Crossing`` hands it
the items as ``DbPool.run_unit`` would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio

from actors.group_commit import GroupCommit, group_commit_child
from config.schema import MailboxConfig
from engine.errors import ActorStopped, ProviderUnavailable, TriageError

MAILBOX = MailboxConfig(capacity=4, overflow="wait")
UNIT_S = 0.01


class Refused(TriageError):
    pass


class _Crossing:
    """What the committer needs of a DbPool: ``run_unit(fn, items)``."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.fail_with: BaseException | None = None

    async def run_unit(self, fn: Any, items: Sequence[Any]) -> Any:
        return await fn(self, items)


async def _double(crossing: _Crossing, items: Sequence[int]) -> list[int | TriageError]:
    crossing.batches.append(list(items))
    await trio.sleep(UNIT_S)
    if crossing.fail_with is not None:
        raise crossing.fail_with
    if any(i < 0 for i in items) and len(items) > 1:
        raise ValueError("a negative item spoils the batch")
    return [Refused(f"odd {i}") if i % 2 else i * 2 for i in items]


async def _started(
    nursery: trio.Nursery, batch_max: int = 8
) -> tuple[GroupCommit[int, int], _Crossing]:
    crossing = _Crossing()
    board: GroupCommit[int, int] = GroupCommit("test_commit", _double, batch_max=batch_max)
    spec, _ = group_commit_child(board, crossing, mailbox=MAILBOX, shutdown_s=1.0)  # type: ignore[arg-type]  # the crossing stands in for DbPool.run_unit
    await nursery.start(spec.start)
    return board, crossing


async def test_alone_a_batch_of_one_without_waiting(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        board, crossing = await _started(nursery)
        began = trio.current_time()
        assert await board.submit(4) == 8
        assert trio.current_time() - began == pytest.approx(UNIT_S)  # no wait on purpose
        assert crossing.batches == [[4]]
        nursery.cancel_scope.cancel()


async def test_callers_arriving_during_a_batch_leave_together(
    autojump_clock: trio.abc.Clock,
) -> None:
    results: dict[int, int] = {}

    async def caller(i: int) -> None:
        results[i] = await board.submit(i)

    async with trio.open_nursery() as nursery:
        board, crossing = await _started(nursery, batch_max=8)
        async with trio.open_nursery() as callers:
            callers.start_soon(caller, 0)
            await trio.sleep(UNIT_S / 2)  # the first batch is in flight
            for i in range(2, 22, 2):  # ten more arrive meanwhile
                callers.start_soon(caller, i)
        # One alone, then the ten in batches of at most batch_max (trio starts the
        # callers in no set order, so the order inside a batch is not asserted).
        assert [len(b) for b in crossing.batches] == [1, 8, 2]
        assert sorted(i for b in crossing.batches[1:] for i in b) == list(range(2, 22, 2))
        assert results == {i: i * 2 for i in range(0, 22, 2)}
        stats = board.batches, board.committed, board.largest
        assert stats == (3, 11, 8)
        nursery.cancel_scope.cancel()


async def test_an_item_refused_alone_gets_its_own_error(autojump_clock: trio.abc.Clock) -> None:
    outcomes: dict[int, object] = {}

    async def caller(i: int) -> None:
        try:
            outcomes[i] = await board.submit(i)
        except TriageError as exc:
            outcomes[i] = exc

    async with trio.open_nursery() as nursery:
        board, _ = await _started(nursery)
        async with trio.open_nursery() as callers:
            for i in (2, 3, 4):
                callers.start_soon(caller, i)
        assert outcomes[2] == 4 and outcomes[4] == 8
        assert isinstance(outcomes[3], Refused)
        nursery.cancel_scope.cancel()


async def test_an_unreachable_database_fails_the_whole_batch_and_the_next_one_works(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with trio.open_nursery() as nursery:
        board, crossing = await _started(nursery)
        crossing.fail_with = ProviderUnavailable("postgres: connection refused")
        with pytest.raises(ProviderUnavailable):
            await board.submit(2)
        assert board.failed == 1
        crossing.fail_with = None
        assert await board.submit(6) == 12  # the committer did not crash
        nursery.cancel_scope.cancel()


async def test_a_batch_spoiled_by_a_bad_item_is_run_item_by_item(
    autojump_clock: trio.abc.Clock,
) -> None:
    outcomes: dict[int, object] = {}

    async def caller(i: int) -> None:
        try:
            outcomes[i] = await board.submit(i)
        except (TriageError, ValueError) as exc:
            outcomes[i] = exc

    async with trio.open_nursery() as nursery:
        board, crossing = await _started(nursery)
        async with trio.open_nursery() as callers:
            callers.start_soon(caller, 0)
            await trio.sleep(UNIT_S / 2)
            for i in (2, -2, 4):
                callers.start_soon(caller, i)
        assert crossing.batches[0] == [0] and sorted(crossing.batches[1]) == [-2, 2, 4]
        assert crossing.batches[2:] == [[i] for i in crossing.batches[1]]  # then each alone
        assert outcomes[2] == 4 and outcomes[4] == 8 and outcomes[-2] == -4
        nursery.cancel_scope.cancel()


async def test_submit_all_joins_the_batches_and_answers_in_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Several items of one caller (a DLR worker's receipts) leave with the batches that
    are due, beside other callers' items; the results come back in the caller's order."""
    results: dict[str, object] = {}

    async def many(name: str, items: list[int]) -> None:
        results[name] = await board.submit_all(items)

    async with trio.open_nursery() as nursery:
        board, crossing = await _started(nursery, batch_max=4)
        async with trio.open_nursery() as callers:
            callers.start_soon(many, "first", [2, 4, 6, 8, 10, 12])
            callers.start_soon(many, "second", [20, 22])
        assert results == {"first": [4, 8, 12, 16, 20, 24], "second": [40, 44]}
        assert [len(b) for b in crossing.batches] == [4, 4]  # batch_max each, both callers
        assert sorted(i for b in crossing.batches for i in b) == [2, 4, 6, 8, 10, 12, 20, 22]
        assert board.batches == 2 and board.largest == 4
        assert await board.submit_all([]) == []
        nursery.cancel_scope.cancel()


async def test_submit_all_raises_an_items_error_once_all_are_settled(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with trio.open_nursery() as nursery:
        board, crossing = await _started(nursery, batch_max=2)
        with pytest.raises(Refused, match="odd 3"):
            await board.submit_all([2, 3, 4])
        assert crossing.batches == [[2, 3], [4]]  # the others were stored all the same
        assert not board.pending
        nursery.cancel_scope.cancel()


async def test_not_running_is_a_typed_error() -> None:
    board: GroupCommit[int, int] = GroupCommit("idle", _double, batch_max=2)
    with pytest.raises(ActorStopped, match="idle"):
        await board.submit(1)
    with pytest.raises(ActorStopped, match="idle"):
        await board.submit_all([1, 2])


def test_batch_max_must_be_positive() -> None:
    with pytest.raises(ValueError, match="batch_max"):
        GroupCommit("bad", _double, batch_max=0)
