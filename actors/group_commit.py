"""Group commit: concurrent small writes stored by one unit of work per batch.

Every accepted dispatch must be committed before its 202, and every send's
outcome before the dispatcher moves on (the database is the truth). One
transaction per request costs several round trips and a bridge crossing, and
holds a pooled connection the whole time; at the load the daemon must carry,
the client side of those round trips fills the daemon's core and the pool
(``bench.perf dispatch`` before this: 64 outcome transactions queued for 10
connections, a batch of accepts waiting ~0.4 s for one of them). PostgreSQL's
remedy for many small commits is the group commit; this is ours, one level up::

    callers (each in its own task)
        GroupCommit.submit(item) ──append──▶ pending ──Flush──▶ GroupCommitter (actor)
                ▲                                                 │ one crossing, one
                └──────────── its result (or its error) ◀─────────┘ unit per batch

:class:`GroupCommit` is the board the callers and the actor share: a caller
appends its item and its reply slot, tells the actor :class:`Flush` unless a
flush is already due, and waits for its slot. The actor takes up to
``batch_max`` items at a time and runs the board's *unit*, an asyncio unit of
work ``unit(pool, items) -> [result or TriageError per item]``, through the
pool (one crossing, one connection): the accept's is
:func:`~providers.db.dispatches.accept_batch_async` (one statement, each request
under its own tenant, in its own subtransaction), the outcomes'
:func:`~providers.db.dispatches.record_outcomes_async` (one transaction). While
a batch is in flight, new items gather behind it and leave together with the
next: at low load a batch holds one item and waits for nothing; under load the
batches grow with the load, up to ``batch_max``. Nothing is delayed on purpose.

A caller gets its result only once the batch committed; an item the unit
refused alone (an unknown tenant) gets its own error. A batch that fails with a
:class:`~engine.errors.ProviderError` (the database unreachable, its breaker
open) fails every item of it with that error, as each would have failed alone:
nothing was written, and the caller does what it does on that error (503, a
retry). A batch that fails with any other error is run again item by item, so
one bad item fails alone. A caller cancelled while waiting leaves its item in
the batch: it is stored or not (the units are idempotent; a retry finds it).
The actor never crashes on a failed batch (the error is the callers'); if it
stops for another reason, the batch it held fails with
:class:`~engine.errors.ActorStopped` and the items still pending wait for the
next incarnation.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
import trio

from engine.actor import Actor, ActorRef, Overflow, actor_child
from engine.errors import ActorStopped, ProviderError, TriageError

if TYPE_CHECKING:
    from config.schema import MailboxConfig
    from engine.deadlines import Deadlines
    from engine.metrics import Metrics
    from engine.supervisor import ChildSpec, Restart
    from providers.db.pool import DbPool

__all__ = [
    "Flush",
    "GroupCommit",
    "GroupCommitStatistics",
    "GroupCommitter",
    "Unit",
    "group_commit_child",
]

I = TypeVar("I")  # noqa: E741 - an item
R = TypeVar("R")  # its result

Unit = Callable[[Any, Sequence[I]], Awaitable[list[R | TriageError]]]
"""``unit(pool, items)`` on the asyncio side: one result (or refusal) per item, in order."""


class Flush(msgspec.Struct, frozen=True, tag=True):
    """Store what is pending, batch after batch, until nothing is."""


class GroupCommitStatistics(msgspec.Struct, frozen=True, kw_only=True):
    batches: int
    committed: int  # items stored (or refused alone) by a committed batch
    failed: int  # items of batches that failed whole
    largest: int  # the largest batch so far
    pending: int  # waiting now


class _Slot(Generic[I, R]):
    """One caller's item and the reply it waits for."""

    __slots__ = ("done", "error", "item", "result")

    def __init__(self, item: I) -> None:
        self.item = item
        self.done = trio.Event()
        self.result: R | None = None
        self.error: BaseException | None = None

    def settle(self, outcome: R | BaseException) -> None:
        if isinstance(outcome, BaseException):
            self.error = outcome
        else:
            self.result = outcome
        self.done.set()


class GroupCommit(Generic[I, R]):
    """The board the callers and the :class:`GroupCommitter` share (module doc)."""

    def __init__(self, name: str, unit: Unit[I, R], *, batch_max: int) -> None:
        if batch_max < 1:
            raise ValueError("batch_max must be >= 1")
        self.name = name
        self.unit = unit
        self.batch_max = batch_max
        self.pending: collections.deque[_Slot[I, R]] = collections.deque()
        self.ref: ActorRef[Flush] | None = None
        self.flush_due = False
        self.batches = self.committed = self.failed = self.largest = 0

    async def submit(self, item: I) -> R:
        """Store ``item`` with the next batch; its result once that batch committed.

        Raises what the unit raised for the whole batch, or the error it answered for
        this item alone."""
        ref = self.ref
        if ref is None:
            raise ActorStopped(f"the {self.name} group commit is not running")
        slot: _Slot[I, R] = _Slot(item)
        self.pending.append(slot)
        if not self.flush_due:
            self.flush_due = True
            ref.tell_nowait(Flush())
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]  # set with done; R may be None

    async def submit_all(self, items: Sequence[I]) -> list[R]:
        """Store every item of ``items`` with the next batches (one flush asked for all);
        their results, in order, once all are settled. Raises the first error a batch
        or the unit answered for one of them (the others are stored all the same)."""
        ref = self.ref
        if ref is None:
            raise ActorStopped(f"the {self.name} group commit is not running")
        slots: list[_Slot[I, R]] = [_Slot(item) for item in items]
        self.pending.extend(slots)
        if slots and not self.flush_due:
            self.flush_due = True
            ref.tell_nowait(Flush())
        for slot in slots:
            await slot.done.wait()
        for slot in slots:
            if slot.error is not None:
                raise slot.error
        return [slot.result for slot in slots]  # type: ignore[misc]  # set with done

    def take(self) -> list[_Slot[I, R]]:
        """The next batch: up to ``batch_max`` of the oldest pending items."""
        pending = self.pending
        return [pending.popleft() for _ in range(min(self.batch_max, len(pending)))]


class GroupCommitter(Actor[Flush]):
    """Runs the :class:`GroupCommit`'s unit, one batch at a time (module doc)."""

    name = "group_commit"

    def __init__(self, board: GroupCommit[Any, Any], db: DbPool) -> None:
        self.board = board
        self.db = db
        self.name = board.name

    async def init(self) -> None:
        self.board.ref = self.ref
        if self.board.pending:  # left by a stopped incarnation: take them now
            self.board.flush_due = True
            self.tell_self(Flush())

    def statistics(self) -> GroupCommitStatistics:
        b = self.board
        return GroupCommitStatistics(
            batches=b.batches,
            committed=b.committed,
            failed=b.failed,
            largest=b.largest,
            pending=len(b.pending),
        )

    async def handle(self, message: Flush) -> None:
        match message:
            case Flush():
                await self._flush()

    async def _flush(self) -> None:
        board = self.board
        board.flush_due = True  # callers arriving meanwhile leave with a later batch
        while board.pending:
            batch = board.take()
            board.largest = max(board.largest, len(batch))
            try:
                outcomes = await self._run([s.item for s in batch])
            except ProviderError as exc:  # nothing written: each caller gets the error
                board.failed += len(batch)
                for slot in batch:
                    slot.settle(exc)
                continue
            except Exception:  # one bad item must not fail the others: each alone
                outcomes = [await self._alone(slot.item) for slot in batch]
            except BaseException:
                for slot in batch:
                    slot.settle(ActorStopped(f"the {board.name} group commit stopped mid-batch"))
                raise
            board.batches += 1
            board.committed += len(batch)
            for slot, outcome in zip(batch, outcomes, strict=True):
                slot.settle(outcome)
        board.flush_due = False  # nothing pending, and no await since the check

    async def _run(self, items: list[Any]) -> list[Any]:
        return await self.db.run_unit(self.board.unit, items)

    async def _alone(self, item: Any) -> Any:
        try:
            return (await self._run([item]))[0]
        except Exception as exc:
            return exc

    async def terminate(self, reason: BaseException | None) -> None:
        self.board.ref = None
        self.board.flush_due = False  # the successor flushes what is pending


def group_commit_child(
    board: GroupCommit[Any, Any],
    db: DbPool,
    *,
    mailbox: MailboxConfig,
    shutdown_s: float,
    restart: Restart | None = None,
    deadlines: Deadlines | None = None,
    metrics: Metrics | None = None,
    actor: Callable[..., GroupCommitter] = GroupCommitter,
) -> tuple[ChildSpec, ActorRef[Flush]]:
    """The committer's child spec (its id: the board's name; mailbox from ``[mailboxes.*]``)."""
    return actor_child(
        board.name,
        functools.partial(actor, board, db),
        capacity=mailbox.capacity,
        overflow=Overflow(mailbox.overflow),
        restart=restart,
        shutdown_s=shutdown_s,
        deadlines=deadlines,
        metrics=metrics,
    )
