"""A hybrid logical clock: timestamps that order causally even across skewed hosts.

A timestamp is ``(wall_ns, logical)``: the largest physical time seen so far (this
host's wall clock, or a peer's, in nanoseconds) and a counter that breaks ties
within it. Timestamps compare as tuples. The clock keeps two promises:

* **monotonic**: every :meth:`HybridLogicalClock.now` and
  :meth:`~HybridLogicalClock.update` returns a timestamp greater than every one
  this clock returned before, even if the wall clock steps back;
* **causal**: after ``update(remote)`` every later timestamp is greater than
  ``remote``, so a message stamped on receipt orders after its sending, whatever
  the two hosts' wall clocks say.

The physical part never runs ahead of the largest wall time seen, so it stays
within the hosts' skew of real time. That skew is bounded: a remote timestamp
more than ``max_offset_s`` ahead of this host's wall clock is refused with
:class:`ClockOffsetExceeded` and changes nothing (one host with a runaway clock
must not drag every other clock forward). Use the same bound as the clock
monitor's limit (``[clock] max_offset_s``).

Rules (``pt`` = this host's wall time now, ``l`` = the last timestamp returned,
``r`` = the remote one)::

    now():        w = max(l.wall, pt);        c = l.logical + 1 if w == l.wall else 0
    update(r):    w = max(l.wall, r.wall, pt)
                  c = max(l.logical, r.logical) + 1   if w == l.wall == r.wall
                      l.logical + 1                   if w == l.wall
                      r.logical + 1                   if w == r.wall
                      0                               otherwise

The wall clock is injected (``engine.clock.Clock.wall`` in the daemon), so tests
drive it from Trio's MockClock.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from engine.errors import TriageError

__all__ = ["ClockOffsetExceeded", "HlcTimestamp", "HybridLogicalClock"]

_NS = 1_000_000_000


class ClockOffsetExceeded(TriageError):
    """A remote timestamp is further ahead of this host's clock than the configured bound."""

    def __init__(self, ahead_s: float, max_offset_s: float) -> None:
        super().__init__(
            f"remote timestamp is {ahead_s:.3f} s ahead of this host's clock"
            f" (max_offset_s {max_offset_s:g}): refused"
        )
        self.ahead_s = ahead_s
        self.max_offset_s = max_offset_s


class HlcTimestamp(msgspec.Struct, frozen=True, order=True, array_like=True):
    """One hybrid-logical-clock reading; orders as ``(wall_ns, logical)``."""

    wall_ns: int
    logical: int = 0

    @property
    def wall_s(self) -> float:
        return self.wall_ns / _NS


class HybridLogicalClock:
    """See the module docstring. Not shared between threads; one per process."""

    __slots__ = ("_last", "_max_offset_ns", "_wall", "max_offset_s")

    def __init__(self, wall: Callable[[], float], *, max_offset_s: float) -> None:
        if not max_offset_s > 0:
            raise ValueError(f"max_offset_s must be > 0, got {max_offset_s!r}")
        self._wall = wall
        self.max_offset_s = max_offset_s
        self._max_offset_ns = round(max_offset_s * _NS)
        self._last = HlcTimestamp(0, 0)

    def _physical(self) -> int:
        return round(self._wall() * _NS)

    @property
    def last(self) -> HlcTimestamp:
        """The last timestamp returned (``(0, 0)`` before the first)."""
        return self._last

    def now(self) -> HlcTimestamp:
        """A timestamp for a local event (a send, a receipt written here)."""
        last = self._last
        pt = self._physical()
        if pt > last.wall_ns:
            stamp = HlcTimestamp(pt, 0)
        else:
            stamp = HlcTimestamp(last.wall_ns, last.logical + 1)
        self._last = stamp
        return stamp

    def update(self, remote: HlcTimestamp) -> HlcTimestamp:
        """Merge a peer's timestamp (a message received); return the receipt's timestamp.

        Raises :class:`ClockOffsetExceeded` (nothing changes) when ``remote`` is more
        than ``max_offset_s`` ahead of this host's wall clock.
        """
        pt = self._physical()
        ahead = remote.wall_ns - pt
        if ahead > self._max_offset_ns:
            raise ClockOffsetExceeded(ahead / _NS, self.max_offset_s)
        last = self._last
        wall = max(last.wall_ns, remote.wall_ns, pt)
        if wall == last.wall_ns == remote.wall_ns:
            logical = max(last.logical, remote.logical) + 1
        elif wall == last.wall_ns:
            logical = last.logical + 1
        elif wall == remote.wall_ns:
            logical = remote.logical + 1
        else:
            logical = 0
        stamp = HlcTimestamp(wall, logical)
        self._last = stamp
        return stamp
