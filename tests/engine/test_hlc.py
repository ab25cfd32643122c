"""The hybrid logical clock, its wall clock driven by Trio's autojump MockClock."""

from __future__ import annotations

import pytest
import trio

from engine.hlc import ClockOffsetExceeded, HlcTimestamp, HybridLogicalClock

NS = 1_000_000_000


class Wall:
    """A wall clock: Trio time plus a settable shift (the host's skew)."""

    def __init__(self, shift_s: float = 0.0) -> None:
        self.shift_s = shift_s

    def __call__(self) -> float:
        return trio.current_time() + self.shift_s


async def test_now_follows_the_wall_and_counts_within_one_instant(
    autojump_clock: trio.abc.Clock,
) -> None:
    clock = HybridLogicalClock(Wall(), max_offset_s=0.5)
    assert clock.last == HlcTimestamp(0, 0)
    await trio.sleep(1.0)
    assert clock.now() == HlcTimestamp(1 * NS, 0)
    assert clock.now() == HlcTimestamp(1 * NS, 1)  # same instant: the counter breaks the tie
    assert clock.now() == HlcTimestamp(1 * NS, 2)
    await trio.sleep(0.25)
    assert clock.now() == HlcTimestamp(1_250_000_000, 0)
    assert trio.current_time() == 1.25


async def test_monotonic_when_the_wall_clock_steps_back(autojump_clock: trio.abc.Clock) -> None:
    wall = Wall()
    clock = HybridLogicalClock(wall, max_offset_s=0.5)
    await trio.sleep(2.0)
    assert clock.now() == HlcTimestamp(2 * NS, 0)
    wall.shift_s = -1.0  # NTP steps the host clock back a second
    assert clock.now() == HlcTimestamp(2 * NS, 1)
    await trio.sleep(0.5)  # wall now reads 1.5
    assert clock.now() == HlcTimestamp(2 * NS, 2)
    await trio.sleep(1.0)  # wall reads 2.5: physical time leads again
    assert clock.now() == HlcTimestamp(2_500_000_000, 0)


async def test_update_orders_a_receipt_after_the_send_across_skewed_hosts(
    autojump_clock: trio.abc.Clock,
) -> None:
    ahead = HybridLogicalClock(Wall(+0.4), max_offset_s=0.5)  # 400 ms fast
    behind = HybridLogicalClock(Wall(), max_offset_s=0.5)
    await trio.sleep(1.0)
    sent = ahead.now()
    assert sent == HlcTimestamp(1_400_000_000, 0)
    received = behind.update(sent)  # its own wall reads 1.0: behind the sender
    assert received == HlcTimestamp(1_400_000_000, 1)
    assert received > sent
    assert behind.now() == HlcTimestamp(1_400_000_000, 2)  # later events order after
    # The same physical part on both sides: the larger counter wins, plus one.
    assert ahead.update(HlcTimestamp(1_400_000_000, 7)) == HlcTimestamp(1_400_000_000, 8)
    # A remote timestamp from the past changes only the counter.
    assert behind.update(HlcTimestamp(0, 99)) == HlcTimestamp(1_400_000_000, 3)
    await trio.sleep(1.0)  # behind's wall reads 2.0, past everything seen
    assert behind.update(HlcTimestamp(1_900_000_000, 4)) == HlcTimestamp(2 * NS, 0)


async def test_a_remote_too_far_ahead_is_refused_and_changes_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    clock = HybridLogicalClock(Wall(), max_offset_s=0.5)
    await trio.sleep(10.0)
    before = clock.now()
    with pytest.raises(ClockOffsetExceeded) as refused:
        clock.update(HlcTimestamp(10_800_000_000, 0))  # 800 ms ahead of this host
    assert refused.value.ahead_s == pytest.approx(0.8)
    assert "0.800 s ahead" in str(refused.value)
    assert clock.last == before
    # Exactly at the bound is accepted.
    assert clock.update(HlcTimestamp(10_500_000_000, 0)) == HlcTimestamp(10_500_000_000, 1)


def test_max_offset_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_offset_s"):
        HybridLogicalClock(lambda: 0.0, max_offset_s=0.0)


def test_timestamps_order_as_tuples() -> None:
    assert HlcTimestamp(1, 5) < HlcTimestamp(2, 0) < HlcTimestamp(2, 1)
    assert HlcTimestamp(3, 0).wall_s == 3e-9
