"""engine.mailbox.Mailbox: the semantics an actor relies on, as trio's memory channel has them."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from engine.mailbox import Mailbox


async def test_fifo_within_capacity_and_would_block_beyond() -> None:
    box = Mailbox(2)
    box.put_nowait("a")
    await box.put("b")
    with pytest.raises(trio.WouldBlock):
        box.put_nowait("c")
    assert len(box) == 2
    assert [box.get_nowait(), await box.get()] == ["a", "b"]
    with pytest.raises(trio.WouldBlock):
        box.get_nowait()


async def test_a_parked_receiver_is_handed_the_message(autojump_clock: trio.abc.Clock) -> None:
    box = Mailbox(1)
    got: list[tuple[float, object]] = []

    async def receiver() -> None:
        item = await box.get()
        got.append((trio.current_time(), item))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receiver)
        await trio.sleep(1.5)
        box.put_nowait("x")
    assert got == [(1.5, "x")] and len(box) == 0


async def test_parked_senders_fill_freed_places_in_arrival_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    box = Mailbox(1)
    box.put_nowait(0)
    done: list[tuple[int, float]] = []

    async def sender(n: int) -> None:
        await trio.sleep(n * 0.1)
        await box.put(n)
        done.append((n, trio.current_time()))

    async with trio.open_nursery() as nursery:
        for n in (1, 2, 3):
            nursery.start_soon(sender, n)
        await trio.sleep(1.0)
        assert done == [] and len(box) == 1
        received = []
        for at in (2.0, 3.0, 4.0, 5.0):
            await trio.sleep_until(at)
            received.append(box.get_nowait())
    assert received == [0, 1, 2, 3]
    assert done == [(1, 2.0), (2, 3.0), (3, 4.0)]


async def test_a_cancelled_parked_sender_delivers_nothing(autojump_clock: trio.abc.Clock) -> None:
    box = Mailbox(1)
    box.put_nowait("first")
    async with trio.open_nursery() as nursery:
        with trio.CancelScope() as scope:
            nursery.start_soon(box.put, "never")
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    del scope
    assert box.get_nowait() == "first"
    with pytest.raises(trio.WouldBlock):
        box.get_nowait()


async def test_put_and_get_are_checkpoints() -> None:
    box = Mailbox(1)
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await box.put("x")
    assert len(box) == 0  # a cancelled put delivered nothing
    box.put_nowait("y")
    with trio.CancelScope() as scope:
        scope.cancel()
        with pytest.raises(trio.Cancelled):
            await box.get()
    assert box.get_nowait() == "y"  # a cancelled get took nothing


async def test_close_drops_the_queue_and_tells_senders_and_the_receiver(
    autojump_clock: trio.abc.Clock,
) -> None:
    full = Mailbox(1)
    full.put_nowait("queued")
    outcomes: list[str] = []

    async def blocked_sender() -> None:
        try:
            await full.put("parked")
        except trio.BrokenResourceError:
            outcomes.append("sender broken")

    empty = Mailbox(1)

    async def blocked_receiver() -> None:
        try:
            await empty.get()
        except trio.EndOfChannel:
            outcomes.append("receiver ended")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(blocked_sender)
        nursery.start_soon(blocked_receiver)
        await trio.sleep(1)
        full.close()
        empty.close()
    assert sorted(outcomes) == ["receiver ended", "sender broken"]
    assert full.closed and len(full) == 0
    with pytest.raises(trio.BrokenResourceError):
        full.put_nowait("late")
    with pytest.raises(trio.EndOfChannel):
        full.get_nowait()
    full.close()  # twice: nothing more


async def test_one_receiver_only(autojump_clock: trio.abc.Clock) -> None:
    box = Mailbox(1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.get)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await box.get()
        nursery.cancel_scope.cancel()


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match=">= 1"):
        Mailbox(0)
