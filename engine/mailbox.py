"""An actor's mailbox: a bounded FIFO with many senders and one receiver.

What :func:`trio.open_memory_channel` gives an actor, without what it does not
use: one object (and its deque) per actor instead of a channel state, two
channel ends and two wait queues -- an actor is spawned by the hundred thousand,
and every object it carries is one more for each pass of the garbage collector.

The semantics an actor relies on are trio's, kept:

* :meth:`put` and :meth:`get` are checkpoints; a full mailbox parks the sender
  (FIFO among senders) until the receiver takes a message, an empty one parks
  the receiver; a parked task that is cancelled leaves without a trace (its
  message is not delivered).
* :meth:`put_nowait` / :meth:`get_nowait` raise :class:`trio.WouldBlock`.
* :meth:`close` (the supervisor removing the actor for good) drops what is
  queued; later and parked senders get :class:`trio.BrokenResourceError`, the
  receiver :class:`trio.EndOfChannel`.

A waiting receiver gets a message handed over directly (it never touches the
deque); a taken message frees a place that the first parked sender fills.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import outcome
import trio
from trio.lowlevel import (
    Abort,
    Task,
    cancel_shielded_checkpoint,
    checkpoint_if_cancelled,
    current_task,
    reschedule,
    wait_task_rescheduled,
)

__all__ = ["Mailbox"]


class Mailbox:
    """See the module docstring. ``capacity`` >= 1 messages."""

    __slots__ = ("_closed", "_items", "_receiver", "_senders", "capacity")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("mailbox capacity must be >= 1")
        self.capacity = capacity
        self._items: deque[Any] = deque()
        self._receiver: Task | None = None
        # Parked senders and their messages, in arrival order (made on first use).
        self._senders: dict[Task, Any] | None = None
        self._closed = False

    def __len__(self) -> int:
        """Messages queued (a parked sender's message is not queued yet)."""
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- sending ---------------------------------------------------------------------------

    def put_nowait(self, item: Any) -> None:
        if self._closed:
            raise trio.BrokenResourceError("the mailbox is closed")
        receiver = self._receiver
        if receiver is not None:
            self._receiver = None
            reschedule(receiver, outcome.Value(item))
            return
        if len(self._items) >= self.capacity:
            raise trio.WouldBlock
        self._items.append(item)

    async def put(self, item: Any) -> None:
        await checkpoint_if_cancelled()
        try:
            self.put_nowait(item)
        except trio.WouldBlock:
            pass
        else:
            await cancel_shielded_checkpoint()
            return
        task = current_task()
        senders = self._senders
        if senders is None:
            senders = self._senders = {}
        senders[task] = item

        def abort(_: Any) -> Abort:
            senders.pop(task, None)
            return Abort.SUCCEEDED

        await wait_task_rescheduled(abort)

    # -- receiving -------------------------------------------------------------------------

    def get_nowait(self) -> Any:
        items = self._items
        if items:
            item = items.popleft()
            senders = self._senders
            if senders:  # a place is free: the first parked sender's message takes it
                task = next(iter(senders))
                items.append(senders.pop(task))
                reschedule(task)
            return item
        if self._closed:
            raise trio.EndOfChannel
        raise trio.WouldBlock

    async def get(self) -> Any:
        await checkpoint_if_cancelled()
        try:
            item = self.get_nowait()
        except trio.WouldBlock:
            pass
        else:
            await cancel_shielded_checkpoint()
            return item
        if self._receiver is not None:
            raise trio.BusyResourceError("a mailbox has one receiver")
        self._receiver = current_task()

        def abort(_: Any) -> Abort:
            self._receiver = None
            return Abort.SUCCEEDED

        return await wait_task_rescheduled(abort)

    # -- the end ---------------------------------------------------------------------------

    def close(self) -> None:
        """Drop what is queued; parked senders are told, the receiver ends."""
        if self._closed:
            return
        self._closed = True
        self._items.clear()
        senders, self._senders = self._senders, None
        for task in senders or ():
            reschedule(task, outcome.Error(trio.BrokenResourceError("the mailbox is closed")))
        receiver, self._receiver = self._receiver, None
        if receiver is not None:
            reschedule(receiver, outcome.Error(trio.EndOfChannel()))
