"""Bulkhead permits, bounded waits, cancellation, partitions and live retuning (a config
reload), on the autojump clock."""

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


# -- retune (a config reload) ----------------------------------------------------------


async def enter(
    bulkhead: Bulkhead, name: str, seconds: float, log: list[tuple[str, float]]
) -> None:
    """Hold a permit ``seconds``; log (name, time) on entering and (name + " out", time)."""
    async with bulkhead.acquire():
        log.append((name, trio.current_time()))
        await trio.sleep(seconds)
    log.append((f"{name} out", trio.current_time()))


def by_time(entry: tuple[str, float]) -> tuple[float, str]:
    return entry[1], entry[0]  # tasks started together run in either order


async def test_a_higher_capacity_admits_the_waiter_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bulkhead = make(capacity=2, max_wait_s=30.0)
    log: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(enter, bulkhead, "a", 10.0, log)
        nursery.start_soon(enter, bulkhead, "b", 10.0, log)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(enter, bulkhead, "w", 1.0, log)
        await trio.sleep(1.0)
        assert bulkhead.statistics() == BulkheadStatistics(
            in_use=2, capacity=2, waiting=1, partitions=0
        )
        assert bulkhead.retune(capacity=3) == ["bulkhead scan: capacity 2 -> 3"]
        # The permit is the waiter's before it even runs again.
        assert bulkhead.statistics().in_use == 3
        await trio.testing.wait_all_tasks_blocked()
        assert bulkhead.statistics() == BulkheadStatistics(
            in_use=3, capacity=3, waiting=0, partitions=0
        )
        assert trio.current_time() == 1.0
    assert sorted(log, key=by_time) == [
        ("a", 0.0), ("b", 0.0), ("w", 1.0), ("w out", 2.0), ("a out", 10.0), ("b out", 10.0),
    ]  # fmt: skip


async def test_a_lower_capacity_lets_the_calls_in_flight_finish(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bulkhead = make(capacity=2, max_wait_s=100.0)
    log: list[tuple[str, float]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(enter, bulkhead, "a", 10.0, log)
        nursery.start_soon(enter, bulkhead, "b", 20.0, log)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(enter, bulkhead, "w1", 5.0, log)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(enter, bulkhead, "w2", 5.0, log)
        await trio.sleep(1.0)
        assert bulkhead.retune(capacity=1) == ["bulkhead scan: capacity 2 -> 1"]
        # Nothing taken back: both calls still in flight, above the new capacity.
        assert bulkhead.statistics() == BulkheadStatistics(
            in_use=2, capacity=1, waiting=2, partitions=0
        )
        assert bulkhead.try_acquire_nowait() is None
        await trio.sleep(10.0)  # now 11: a left at 10, b is still in flight
        assert bulkhead.statistics() == BulkheadStatistics(
            in_use=1, capacity=1, waiting=2, partitions=0
        )
    # w1 enters only when b leaves (in flight 0 < 1), w2 only when w1 leaves.
    assert sorted(log, key=by_time) == [
        ("a", 0.0), ("b", 0.0), ("a out", 10.0), ("b out", 20.0), ("w1", 20.0),
        ("w1 out", 25.0), ("w2", 25.0), ("w2 out", 30.0),
    ]  # fmt: skip


async def test_a_new_max_wait_moves_the_deadlines_of_the_waiters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    bulkhead = make(capacity=1, max_wait_s=30.0)
    refused: list[tuple[str, float, str]] = []

    async def wait(name: str) -> None:
        try:
            await hold(bulkhead, 1.0)
        except BulkheadFull as exc:
            refused.append((name, trio.current_time(), str(exc)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hold, bulkhead, 100.0)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(wait, "w0")  # waits from 0
        await trio.sleep(4.0)
        nursery.start_soon(wait, "w4")  # waits from 4
        await trio.sleep(1.0)
        assert bulkhead.retune(max_wait_s=3.0) == ["bulkhead scan: max_wait_s 30.0 -> 3.0"]
        await trio.sleep(5.0)
        assert refused == [  # w0 had waited longer than 3 s: refused at once
            ("w0", 5.0, "bulkhead 'scan' is full (1 in use, waited 5.000s)"),
            ("w4", 7.0, "bulkhead 'scan' is full (1 in use, waited 3.000s)"),
        ]
        nursery.cancel_scope.cancel()


async def test_partitions_retune_in_place(autojump_clock: trio.testing.MockClock) -> None:
    bulkhead = make(capacity=10, max_partitions=4, partition_capacity=1, max_wait_s=30.0)
    log: list[tuple[str, float]] = []

    async def keyed(name: str, key: str) -> None:
        async with bulkhead.acquire(key):
            log.append((name, trio.current_time()))
            await trio.sleep(10.0)

    for key in "abc":
        async with bulkhead.acquire(key):
            pass
    async with trio.open_nursery() as nursery:
        nursery.start_soon(keyed, "d1", "d")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(keyed, "d2", "d")  # waits for d's only permit
        await trio.sleep(1.0)
        assert bulkhead.retune(max_partitions=2, partition_capacity=2) == [
            "bulkhead scan: max_partitions 4 -> 2",
            "bulkhead scan: partition_capacity 1 -> 2",
        ]
        # The idle a and b were forgotten, LRU first, down to 2; d2 enters at once.
        assert bulkhead.partition_keys() == ["c", "d"]
        await trio.testing.wait_all_tasks_blocked()
        assert bulkhead.statistics() == BulkheadStatistics(
            in_use=2, capacity=10, waiting=0, partitions=2
        )
    assert log == [("d1", 0.0), ("d2", 1.0)]


def test_invalid_values_change_nothing() -> None:
    bulkhead = make(capacity=2, max_wait_s=3.0)
    before = bulkhead.settings()
    assert before == {
        "capacity": 2, "max_wait_s": 3.0, "max_partitions": 4, "partition_capacity": 1,
    }  # fmt: skip
    with pytest.raises(ValueError, match="capacities must be >= 1"):
        bulkhead.retune(capacity=0, max_wait_s=1.0)
    with pytest.raises(ValueError, match="whole numbers"):
        bulkhead.retune(capacity=2.5)
    with pytest.raises(ValueError, match="max_wait_s must be >= 0"):
        bulkhead.retune(max_wait_s=-1.0)
    with pytest.raises(ValueError, match="not tunable: name"):
        bulkhead.retune(name="x")
    assert bulkhead.settings() == before
    assert bulkhead.retune(capacity=2, max_wait_s=3.0) == []  # nothing changed, nothing said
