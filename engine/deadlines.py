"""A deadline service: one task that fires timeouts for many cheap waiters.

Why not ``trio.fail_after`` per ``ask``? Entering and leaving a cancel scope costs
about as much as a whole scheduler round trip here, and an ``ask`` round trip is
only a few of those. A :class:`Reply` instead parks its caller with
``wait_task_rescheduled`` and registers its deadline in one heap owned by a single
:class:`Deadlines` task; whoever comes first — the reply, the deadline, or a
cancellation of the caller — settles it, and the others find it settled.

Invariants:

* a :class:`Reply` is settled at most once; later ``set``/``expire`` calls are no-ops,
  so a server replying to a caller that gave up never raises (triotp's bug);
* heap entries are deleted lazily; the heap is compacted (settled entries
  dropped) whenever it has doubled since the last compaction, so its size stays
  within about twice the number of live deadlines (plus a small floor), at an
  amortised O(log n) per ``add``.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any

import outcome
import trio

from .errors import AskTimeout

__all__ = ["Deadlines", "Reply"]

_COMPACT_FLOOR = 1024


class Reply:
    """A one-shot reply slot: one waiter, settled once by value, error or deadline."""

    __slots__ = ("_outcome", "_task", "done", "what")

    def __init__(self, what: str = "reply") -> None:
        self.done = False
        self.what = what
        self._task: trio.lowlevel.Task | None = None
        self._outcome: outcome.Outcome[Any] | None = None

    def set(self, value: object) -> None:
        self._settle(outcome.Value(value))

    def fail(self, error: BaseException) -> None:
        self._settle(outcome.Error(error))

    def expire(self) -> None:
        """Called by :class:`Deadlines` when the deadline passes."""
        if not self.done:
            self._settle(outcome.Error(AskTimeout(f"no {self.what} before the deadline")))

    def _settle(self, result: outcome.Outcome[Any]) -> None:
        if self.done:
            return
        self.done = True
        task = self._task
        if task is not None:
            self._task = None
            trio.lowlevel.reschedule(task, result)
        else:
            self._outcome = result

    async def wait(self) -> Any:
        """Wait for the reply. Cancelling the waiter settles the slot as abandoned."""
        if self.done:
            if self._outcome is None:
                raise RuntimeError("Reply.wait() called twice")
            result, self._outcome = self._outcome, None
            return result.unwrap()
        self._task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._task = None
            self.done = True
            return trio.lowlevel.Abort.SUCCEEDED

        return await trio.lowlevel.wait_task_rescheduled(abort)


class Deadlines:
    """Fires :meth:`Reply.expire` at each registered deadline. Run :meth:`run` in a nursery."""

    __slots__ = ("_compacted", "_heap", "_running", "_seq", "_target", "_wake")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Reply]] = []
        self._seq = itertools.count()
        self._compacted = 0
        self._target = math.inf
        self._wake: trio.Event | None = None
        self._running = False

    def add(self, deadline: float, reply: Reply) -> None:
        if not self._running:
            raise RuntimeError("Deadlines.run() is not running; open the runtime first")
        heapq.heappush(self._heap, (deadline, next(self._seq), reply))
        if len(self._heap) > 2 * self._compacted + _COMPACT_FLOOR:
            self._compact()
        if deadline < self._target and self._wake is not None:
            self._wake.set()

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if not entry[2].done]
        heapq.heapify(self._heap)
        self._compacted = len(self._heap)

    def __len__(self) -> int:
        return len(self._heap)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._running = True
        task_status.started()
        try:
            while True:
                now = trio.current_time()
                heap = self._heap
                while heap and heap[0][0] <= now:
                    heapq.heappop(heap)[2].expire()
                while heap and heap[0][2].done:
                    heapq.heappop(heap)
                self._target = heap[0][0] if heap else math.inf
                self._wake = trio.Event()
                with trio.move_on_at(self._target):
                    await self._wake.wait()
        finally:
            self._running = False
