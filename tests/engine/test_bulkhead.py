"""Bulkhead permits, bounded waits, cancellation and partitions, on the autojump clock."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

from engine.bulkhead import Bulkhead, BulkheadStatistics
from engine.errors import BulkheadFull
from engine.metrics import Metrics


def make(
    *,
    capacity: int = 2,
    max_wait_s: float = 3.0,
    max_partitions: int = 4,
    partition_capacity: int = 1,
    metrics: Metrics | None = None,
) -> Bulkhead:
    return Bulkhead(
        "scan",
        capacity=capacity,
        max_wait_s=max_wait_s,
        max_partitions=max_partitions,
        partition_capacity=partition_capacity,
        metrics=metrics,
    )


async def hold(bulkhead: Bulkhead, seconds: float, key: str | None = None) -> None:
    async with bulkhead.acquire(key):
        await trio.sleep(seconds)


async def test_free_permit_is_taken_without_a_checkpoint(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bulkhead = make(capacity=2)
    with trio.testing.assert_no_checkpoints():
        async with bulkhead.acquire() as first, bulkhead.acquire("tenant-a") as second:
            assert first is not second
            assert bulkhead.statistics().in_use == 2
    assert bulkhead.statistics().in_use == 0


async def test_full_bulkhead_refuses_after_exactly_max_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics = Metrics()
    bulkhead = make(capacity=1, max_wait_s=3.0, metrics=metrics)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, bulkhead, 10.0)
        await trio.testing.wait_all_tasks_blocked()
        assert bulkhead.try_acquire_nowait() is None
        with pytest.raises(BulkheadFull) as refused:
            await hold(bulkhead, 1.0)
        assert trio.current_time() == 3.0
        assert refused.value.capacity == 1
        assert "waited 3.000s" in str(refused.value)
        assert bulkhead.statistics() == BulkheadStatistics(
            in_use=1, capacity=1, waiting=0, partitions=0
        )
    labels = {"bulkhead": "scan"}
    assert metrics.registry.get_sample_value("triage_bulkhead_rejected_total", labels) == 1
    assert metrics.registry.get_sample_value("triage_bulkhead_in_use", labels) == 0


async def test_waiter_gets_a_permit_released_within_max_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bulkhead = make(capacity=1, max_wait_s=3.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, bulkhead, 2.5)
        await trio.testing.wait_all_tasks_blocked()
        async with bulkhead.acquire():
            assert trio.current_time() == 2.5
            assert bulkhead.statistics().in_use == 1


async def test_zero_max_wait_refuses_at_once(autojump_clock: trio.testing.MockClock) -> None:
    bulkhead = make(capacity=1, max_wait_s=0.0)
    async with bulkhead.acquire():
        with pytest.raises(BulkheadFull):
            await bulkhead.acquire_permit()
        assert trio.current_time() == 0.0


async def test_cancelled_waiter_leaks_no_permit(autojump_clock: trio.testing.MockClock) -> None:
    bulkhead = make(capacity=1, max_wait_s=10.0, partition_capacity=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, bulkhead, 5.0, "a")
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(1.0) as scope:
            await hold(bulkhead, 1.0, "b")  # partition b is free, the global permit is not
        assert scope.cancelled_caught
        with trio.move_on_after(1.0) as scope:
            await hold(bulkhead, 1.0, "a")  # waits on its own partition
        assert scope.cancelled_caught
        assert bulkhead.statistics() == BulkheadStatistics(
            in_use=1, capacity=1, waiting=0, partitions=2
        )
    assert trio.current_time() == 5.0
    assert bulkhead.statistics().in_use == 0
    # Every permit is back: both partitions and the global limiter are whole.
    async with bulkhead.acquire("b"):
        pass
    async with bulkhead.acquire("a"):
        pass


async def test_a_partition_bounds_one_key(autojump_clock: trio.testing.MockClock) -> None:
    bulkhead = make(capacity=3, partition_capacity=2, max_wait_s=1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, bulkhead, 5.0, "noisy")
        nursery.start_soon(hold, bulkhead, 5.0, "noisy")
        await trio.testing.wait_all_tasks_blocked()
        assert bulkhead.try_acquire_nowait("noisy") is None
        permit = bulkhead.try_acquire_nowait("quiet")
        assert permit is not None
        bulkhead.release(permit)
        with pytest.raises(BulkheadFull):
            await bulkhead.acquire_permit("noisy")
        assert trio.current_time() == 1.0


async def test_lru_idle_partition_is_evicted(autojump_clock: trio.testing.MockClock) -> None:
    bulkhead = make(capacity=10, max_partitions=2)
    async with bulkhead.acquire("a"):
        pass
    async with bulkhead.acquire("b"):
        pass
    async with bulkhead.acquire("a"):  # a is now the most recently used
        pass
    async with bulkhead.acquire("c"):
        pass
    assert bulkhead.partition_keys() == ["a", "c"]


async def test_busy_partition_is_never_evicted(autojump_clock: trio.testing.MockClock) -> None:
    bulkhead = make(capacity=10, max_partitions=2, max_wait_s=5.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, bulkhead, 4.0, "a")  # a: least recently used, but busy
        await trio.testing.wait_all_tasks_blocked()
        async with bulkhead.acquire("b"):
            pass
        async with bulkhead.acquire("c"):  # evicts idle b, not busy a
            assert bulkhead.partition_keys() == ["a", "c"]
            # Now a and c are both busy: a new key is refused at once, not after a wait.
            with pytest.raises(BulkheadFull, match="scan") as refused:
                await bulkhead.acquire_permit("d")
            assert trio.current_time() == 0.0
            assert any("partitions are busy" in note for note in refused.value.__notes__)
    assert bulkhead.partition_keys() == ["a", "c"]


async def test_a_waiter_pins_its_partition(autojump_clock: trio.testing.MockClock) -> None:
    bulkhead = make(capacity=10, max_partitions=1, max_wait_s=5.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, bulkhead, 2.0, "a")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(hold, bulkhead, 1.0, "a")  # waits for a's only permit
        await trio.testing.wait_all_tasks_blocked()
        assert bulkhead.statistics().waiting == 1
        with pytest.raises(BulkheadFull):
            bulkhead.try_acquire_nowait("b")
    assert trio.current_time() == 3.0
    async with bulkhead.acquire("b"):
        assert bulkhead.partition_keys() == ["b"]


async def test_zero_partitions_means_keys_share_the_global_limiter(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bulkhead = make(capacity=2, max_partitions=0, partition_capacity=1)
    async with bulkhead.acquire("a"), bulkhead.acquire("a"):
        assert bulkhead.statistics().in_use == 2
    assert bulkhead.statistics().partitions == 0


def test_statistics_is_a_frozen_record() -> None:
    stats = make().statistics()
    assert stats == BulkheadStatistics(in_use=0, capacity=2, waiting=0, partitions=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.in_use = 1  # type: ignore[misc]  # proving it is frozen
