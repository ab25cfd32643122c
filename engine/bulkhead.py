"""A bulkhead: a bounded number of calls in flight, a bounded wait, then a typed refusal.

Underneath is a :class:`trio.CapacityLimiter` of ``capacity`` permits. A caller
that finds a permit free takes it without a checkpoint (the fast path); otherwise
it waits at most ``max_wait_s`` and then gets :class:`~engine.errors.BulkheadFull`.

Calls may carry a partition key (a tenant, a provider account). Each key gets its
own limiter of ``partition_capacity`` inside the global one, so one noisy key can
hold at most ``partition_capacity`` of the ``capacity`` permits. At most
``max_partitions`` keys are tracked; a new key evicts the least recently used
*idle* partition (no permit held, nobody waiting). A partition in use is never
evicted: if every tracked partition is busy, the new key is refused at once. With
``max_partitions = 0`` keys are ignored and every call shares the global limiter.

Invariants:

- A permit is held in the partition (when keyed) and in the global limiter, or in
  neither: a keyed waiter takes its partition permit first and gives it back if the
  global one does not come.
- Cancellation while waiting gives back everything taken so far and re-raises.
- ``release`` is synchronous and never blocks; it hands freed permits to waiters.
- :meth:`Bulkhead.retune` (a config reload) never takes a permit back: a lower
  capacity lets the calls in flight finish and admits the next one only once fewer
  than the new capacity are in flight; a higher one admits waiters at once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import trio

from engine.errors import BulkheadFull

if TYPE_CHECKING:
    from prometheus_client import Counter

    from engine.metrics import Metrics

__all__ = ["Bulkhead", "BulkheadStatistics", "Permit"]


@dataclass(frozen=True, slots=True)
class BulkheadStatistics:
    in_use: int
    capacity: int
    waiting: int
    partitions: int


class _Partition:
    __slots__ = ("limiter", "refs")

    def __init__(self, capacity: int) -> None:
        self.limiter = trio.CapacityLimiter(capacity)
        self.refs = 0  # permits held plus tasks waiting: evictable only at zero


class Permit:
    """One permit of a bulkhead; it is also the borrower token in the Trio limiters."""

    __slots__ = ("partition",)

    def __init__(self, partition: _Partition | None) -> None:
        self.partition = partition


class _PermitContext:
    __slots__ = ("_bulkhead", "_key", "_permit")

    def __init__(self, bulkhead: Bulkhead, key: str | None) -> None:
        self._bulkhead = bulkhead
        self._key = key
        self._permit: Permit | None = None

    async def __aenter__(self) -> Permit:
        permit = self._bulkhead.try_acquire_nowait(self._key)
        if permit is None:
            permit = await self._bulkhead.acquire_permit(self._key)
        self._permit = permit
        return permit

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        permit, self._permit = self._permit, None
        if permit is not None:
            self._bulkhead.release(permit)


class Bulkhead:
    """Bounded concurrency with a bounded wait and per-key partitions.

    ::

        async with bulkhead.acquire(key=tenant):
            await provider.send(message)

    The Guard's fast path uses the primitives directly::

        permit = bulkhead.try_acquire_nowait(key) or await bulkhead.acquire_permit(key)
        try:
            ...
        finally:
            bulkhead.release(permit)
    """

    def __init__(
        self,
        name: str,
        *,
        capacity: int,
        max_wait_s: float,
        max_partitions: int,
        partition_capacity: int,
        metrics: Metrics | None = None,
    ) -> None:
        if not (isinstance(capacity, int) and isinstance(partition_capacity, int)):
            raise ValueError(f"bulkhead {name!r}: capacities must be whole numbers")
        if capacity < 1 or partition_capacity < 1:
            raise ValueError(f"bulkhead {name!r}: capacities must be >= 1")
        if max_partitions < 0 or max_wait_s < 0:
            raise ValueError(f"bulkhead {name!r}: max_partitions and max_wait_s must be >= 0")
        self.name = name
        self.capacity = capacity
        self.max_wait_s = max_wait_s
        self.max_partitions = max_partitions
        self.partition_capacity = partition_capacity
        self._limiter = trio.CapacityLimiter(capacity)
        self._partitions: OrderedDict[str, _Partition] = OrderedDict()
        # The cancel scope of each task waiting for a permit -> when it began to wait
        # (a retuned max_wait_s moves their deadlines); its size is the number waiting.
        self._waits: dict[trio.CancelScope, float] = {}
        self._m_rejected: Counter | None = None
        if metrics is not None:
            metrics.track(self)
            label = metrics.label("bulkhead", name)
            self._m_rejected = metrics.bulkhead_rejected.labels(label)
            limiter = self._limiter
            # Read at scrape time: the fast path never touches a metric.
            metrics.bulkhead_in_use.labels(label).set_function(lambda: limiter.borrowed_tokens)

    def acquire(self, key: str | None = None) -> _PermitContext:
        """``async with bulkhead.acquire(key):`` holds one permit for the block.

        Entering does not checkpoint when a permit is free at once.
        """
        return _PermitContext(self, key)

    def try_acquire_nowait(self, key: str | None = None) -> Permit | None:
        """A permit if one is free right now, else None; never blocks or checkpoints.

        Raises BulkheadFull (never worth waiting) when ``key`` is new and every one
        of the ``max_partitions`` partitions is busy.
        """
        if key is None or not self.max_partitions:
            permit = Permit(None)
            try:
                self._limiter.acquire_on_behalf_of_nowait(permit)
            except trio.WouldBlock:
                return None
            return permit
        partition = self._partition(key)
        permit = Permit(partition)
        try:
            partition.limiter.acquire_on_behalf_of_nowait(permit)
        except trio.WouldBlock:
            return None
        try:
            self._limiter.acquire_on_behalf_of_nowait(permit)
        except trio.WouldBlock:
            partition.limiter.release_on_behalf_of(permit)
            return None
        partition.refs += 1
        return permit

    async def acquire_permit(self, key: str | None = None) -> Permit:
        """A permit, waiting at most ``max_wait_s``; raises BulkheadFull after that.

        Returns without a checkpoint when a permit is free at once.
        """
        permit = self.try_acquire_nowait(key)
        if permit is not None:
            return permit
        start = trio.current_time()
        partition = self._partition(key) if key is not None and self.max_partitions else None
        permit = Permit(partition)
        in_partition = in_global = False
        if partition is not None:
            partition.refs += 1  # a waiter pins its partition
        scope = trio.move_on_at(start + self.max_wait_s)
        self._waits[scope] = start
        try:
            with scope:
                if partition is not None:
                    await partition.limiter.acquire_on_behalf_of(permit)
                    in_partition = True
                await self._limiter.acquire_on_behalf_of(permit)
                in_global = True
        finally:
            del self._waits[scope]
            if not in_global:
                if in_partition:
                    assert partition is not None
                    partition.limiter.release_on_behalf_of(permit)
                if partition is not None:
                    partition.refs -= 1
        if not in_global:
            self._refuse(trio.current_time() - start)
        return permit

    def release(self, permit: Permit) -> None:
        """Give ``permit`` back. Never blocks; wakes the next waiter."""
        self._limiter.release_on_behalf_of(permit)
        partition = permit.partition
        if partition is not None:
            partition.limiter.release_on_behalf_of(permit)
            partition.refs -= 1

    def statistics(self) -> BulkheadStatistics:
        return BulkheadStatistics(
            in_use=self._limiter.borrowed_tokens,
            capacity=self.capacity,
            waiting=len(self._waits),
            partitions=len(self._partitions),
        )

    # -- live tuning (a config reload) ------------------------------------------------

    #: The fields :meth:`retune` changes: every setting of the constructor.
    TUNABLE: ClassVar[tuple[str, ...]] = (
        "capacity", "max_wait_s", "max_partitions", "partition_capacity",
    )  # fmt: skip

    def settings(self) -> dict[str, Any]:
        """The effective capacity, wait and partitions (what a reload compares and changes)."""
        return {field: getattr(self, field) for field in self.TUNABLE}

    def retune(self, **fields: Any) -> list[str]:
        """Change the capacity, the wait and the partitions in place; answers one line per
        change. Invalid values raise ``ValueError`` and change nothing.

        No permit is ever taken back and no call is cancelled:

        - a higher ``capacity`` (or ``partition_capacity``) hands the new permits to the
          waiters at once, in the order they came;
        - a lower one lets the calls in flight finish; the next call enters only when
          fewer than the new capacity are in flight (so ``in_use`` may read above
          ``capacity`` until then);
        - a new ``max_wait_s`` moves the deadline of every call already waiting, counted
          from when it began to wait (one that has waited longer is refused at once);
        - a lower ``max_partitions`` forgets idle partitions, least recently used first,
          down to the new bound; busy ones stay until idle (a new key is refused
          meanwhile). 0 turns the partitions off: keys are ignored from now on.
        """
        unknown = set(fields) - set(self.TUNABLE)
        if unknown:
            raise ValueError(f"bulkhead {self.name!r}: not tunable: {', '.join(sorted(unknown))}")
        Bulkhead(self.name, **(self.settings() | fields))  # the constructor's checks
        changes: list[str] = []
        for field, value in fields.items():
            old = getattr(self, field)
            if old == value:
                continue
            setattr(self, field, value)
            changes.append(f"bulkhead {self.name}: {field} {old} -> {value}")
        if "capacity" in fields:
            self._limiter.total_tokens = self.capacity  # wakes waiters if it grew
        if "partition_capacity" in fields:
            for partition in self._partitions.values():
                partition.limiter.total_tokens = self.partition_capacity
        if "max_wait_s" in fields:
            for scope, begun in self._waits.items():
                scope.deadline = begun + self.max_wait_s
        if "max_partitions" in fields:
            if self.max_partitions:
                self._forget_idle(len(self._partitions) - self.max_partitions)
            else:  # keys ignored from now on; permits held keep their partition
                self._partitions.clear()
        return changes

    def partition_keys(self) -> list[str]:
        """Tracked partition keys, least recently used first."""
        return list(self._partitions)

    def _partition(self, key: str) -> _Partition:
        partitions = self._partitions
        partition = partitions.get(key)
        if partition is not None:
            partitions.move_to_end(key)
            return partition
        if len(partitions) >= self.max_partitions:
            self._forget_idle(len(partitions) - self.max_partitions + 1)
            if len(partitions) >= self.max_partitions:
                self._refuse(0.0, partitions=True)
        partition = partitions[key] = _Partition(self.partition_capacity)
        return partition

    def _forget_idle(self, count: int) -> None:
        """Forget up to ``count`` idle partitions, least recently used first."""
        idle: list[str] = []
        if count > 0:
            for key, partition in self._partitions.items():
                if partition.refs == 0:
                    idle.append(key)
                    if len(idle) == count:
                        break
        for key in idle:
            del self._partitions[key]

    def _refuse(self, waited_s: float, *, partitions: bool = False) -> NoReturn:
        if self._m_rejected is not None:
            self._m_rejected.inc()
        error = BulkheadFull(self.name, capacity=self.capacity, waited_s=waited_s)
        if partitions:
            error.add_note(f"all {self.max_partitions} partitions are busy")
        raise error
