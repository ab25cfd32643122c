"""The ``actors`` perf suite: the engine's messaging, footprint and call-wrapping costs.

Each result races an engine path against the plainest Trio code that does the
same job, every contender in its own fresh interpreter (see :mod:`bench.perf.common`):

``tell``
    A producer task ``await ref.tell(i)`` N times to an actor (a static child of a
    :class:`~engine.supervisor.Supervisor`, ``Overflow.WAIT``, ``batch_max=1``)
    whose ``handle`` counts; against a raw ``trio.open_memory_channel`` of the same
    capacity, ``await send(i)`` / ``async for`` counting. Timed from the first
    send until the consumer has handled all N.
``tell_batch``
    The same N messages, all handled, but the producer offers with
    ``ref.tell_nowait`` and only when the mailbox is full falls back to
    ``await ref.tell``; the actor drains with ``batch_max = capacity``. Same raw
    channel baseline as ``tell`` (the very same samples).
``ask``
    ``await ref.ask(i, timeout_s=10)`` (deadline kept by the runtime's
    :class:`~engine.deadlines.Deadlines` service) against a raw request/reply: a
    future holding a ``trio.Event`` sent on a memory channel, set by the server.
``idle_actor_memory``
    Python heap (``tracemalloc``) per idle actor: N actors added with
    ``Supervisor.start_child_nowait`` (refs kept), against N raw tasks each parked
    on its own memory channel (send sides kept).
``teardown_100k``
    Spawn N idle actors, wait until all are parked, then cancel the supervisor and
    wait for it to exit; against ``start_soon`` of N raw tasks + channels, then
    cancelling their nursery. The value is the total; ``details`` splits spawn
    from teardown.
``wrapper_overhead``
    ns added per call by :class:`~engine.guard.Guard` (built from the ``provider``
    guard of ``config/default.toml``, its deadline enforced by the transport)
    around ``async def op(): return 1``, minus a bare ``await op()`` loop in the
    same process (``details`` also gives the Guard keeping its own CancelScope
    deadline); against the naive composition
    ``tenacity.AsyncRetrying`` → ``trio.CapacityLimiter`` → pybreaker
    ``calling()`` → ``trio.fail_after``.
"""

from __future__ import annotations

import gc
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
import trio.testing  # wait_all_tasks_blocked; imports pytest, outside any timing

from bench.perf.common import (
    Better,
    Result,
    Target,
    Worker,
    measure_alternating,
)
from engine.actor import Actor, ActorRef, Overflow, actor_child
from engine.errors import MailboxFull
from engine.runtime import Runtime, open_runtime
from engine.supervisor import Supervisor

__all__ = ["CASES", "Sizes", "run_suite"]

MODULE = __name__ if __name__ != "__main__" else "bench.perf.actors"

#: Mailbox / channel capacity of the messaging results (the same on both sides).
CAPACITY = 1024
#: Shutdown deadline of the benched actors (none of them ignores cancellation).
SHUTDOWN_S = 5.0
#: Mailbox capacity of every idle actor, and of every raw channel it races.
IDLE_CAPACITY = 100
ASK_TIMEOUT_S = 10.0


# ---------------------------------------------------------------------------- actors


class _Counter(Actor[int]):
    """Counts messages; sets ``done`` at the ``n``-th."""

    def __init__(self, n: int, done: trio.Event) -> None:
        self.n = n
        self.done = done
        self.count = 0

    async def handle(self, message: int) -> None:
        self.count += 1
        if self.count == self.n:
            self.done.set()


class _Echo(Actor[int]):
    async def handle(self, message: int) -> int:
        return message


class _Idle(Actor[int]):
    """No ``init``: ready on spawn, so ``start_child_nowait`` accepts it."""

    async def handle(self, message: int) -> None:
        return None


async def _settle() -> None:
    """Wait until every task spawned so far is parked.

    Not a loop on ``current_statistics().tasks_runnable``: that counts the next
    batch only, not the tasks of the current batch that have yet to run.
    """
    await trio.testing.wait_all_tasks_blocked()


def _supervisor(rt: Runtime, n_children: int = 10_000) -> Supervisor:
    return Supervisor("bench", runtime=rt, max_children=max(n_children, 1), shutdown_s=600.0)


def _run(main: Callable[[], Awaitable[dict[str, float]]]) -> dict[str, float]:
    return trio.run(main)


# ---------------------------------------------------------------------------- tell


def tell_raw(n: int) -> dict[str, float]:
    async def main() -> dict[str, float]:
        send, receive = trio.open_memory_channel[int](CAPACITY)
        done = trio.Event()

        async def consumer() -> None:
            count = 0
            async for _ in receive:
                count += 1
                if count == n:
                    done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(consumer)
            await _settle()
            start = time.perf_counter()
            for i in range(n):
                await send.send(i)
            await done.wait()
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        return {"seconds": elapsed}

    return _run(main)


async def _with_counter(
    n: int, batch_max: int, produce: Callable[[ActorRef[int]], Awaitable[None]]
) -> dict[str, float]:
    done = trio.Event()
    spec, ref = actor_child(
        "counter",
        partial(_Counter, n, done),
        capacity=CAPACITY,
        overflow=Overflow.WAIT,
        batch_max=batch_max,
        shutdown_s=SHUTDOWN_S,
    )
    async with open_runtime() as rt:
        sup = Supervisor("bench", [spec], runtime=rt)
        async with trio.open_nursery() as nursery:
            await nursery.start(sup.run)
            await _settle()
            start = time.perf_counter()
            await produce(ref)
            await done.wait()
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
    return {"seconds": elapsed}


def tell_ours(n: int) -> dict[str, float]:
    async def produce(ref: ActorRef[int]) -> None:
        for i in range(n):
            await ref.tell(i)

    return _run(lambda: _with_counter(n, 1, produce))


def tell_batch_ours(n: int) -> dict[str, float]:
    async def produce(ref: ActorRef[int]) -> None:
        for i in range(n):
            try:
                ref.tell_nowait(i)
            except MailboxFull:
                await ref.tell(i)  # waits for room; the actor drains a whole batch

    return _run(lambda: _with_counter(n, CAPACITY, produce))


# ---------------------------------------------------------------------------- ask


class _Future:
    __slots__ = ("event", "value")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.value: object = None


def ask_raw(n: int) -> dict[str, float]:
    async def main() -> dict[str, float]:
        send, receive = trio.open_memory_channel[tuple[int, _Future]](CAPACITY)

        async def server() -> None:
            async for request, future in receive:
                future.value = request
                future.event.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            await _settle()
            start = time.perf_counter()
            for i in range(n):
                future = _Future()
                await send.send((i, future))
                await future.event.wait()
                if future.value != i:
                    raise AssertionError("wrong reply")
            elapsed = time.perf_counter() - start
            nursery.cancel_scope.cancel()
        return {"seconds": elapsed}

    return _run(main)


def ask_ours(n: int) -> dict[str, float]:
    async def main() -> dict[str, float]:
        async with open_runtime() as rt:
            spec, ref = actor_child(
                "echo",
                _Echo,
                capacity=CAPACITY,
                overflow=Overflow.WAIT,
                deadlines=rt.deadlines,
                shutdown_s=SHUTDOWN_S,
            )
            sup = Supervisor("bench", [spec], runtime=rt)
            async with trio.open_nursery() as nursery:
                await nursery.start(sup.run)
                await _settle()
                start = time.perf_counter()
                for i in range(n):
                    if await ref.ask(i, timeout_s=ASK_TIMEOUT_S) != i:
                        raise AssertionError("wrong reply")
                elapsed = time.perf_counter() - start
                nursery.cancel_scope.cancel()
        return {"seconds": elapsed}

    return _run(main)


# ---------------------------------------------------------------------------- idle actors


async def _idle_raw_task(receive: trio.MemoryReceiveChannel[int]) -> None:
    async for _ in receive:
        pass


async def _spawn_raw(nursery: trio.Nursery, n: int) -> list[trio.MemorySendChannel[int]]:
    sends = []
    for _ in range(n):
        send, receive = trio.open_memory_channel[int](IDLE_CAPACITY)
        sends.append(send)
        nursery.start_soon(_idle_raw_task, receive)
    await _settle()
    return sends


async def _spawn_actors(sup: Supervisor, n: int) -> list[ActorRef[int]]:
    refs = []
    for i in range(n):
        spec, ref = actor_child(f"idle-{i}", _Idle, capacity=IDLE_CAPACITY, shutdown_s=SHUTDOWN_S)
        sup.start_child_nowait(spec)
        refs.append(ref)
    await _settle()
    return refs


def _heap_delta_per(n: int, spawn: Callable[[], Awaitable[list[Any]]]) -> Awaitable[float]:
    async def measure() -> float:
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            kept = await spawn()
            gc.collect()
            after = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        if len(kept) != n:
            raise AssertionError("spawned the wrong number")
        return (after - before) / n

    return measure()


def memory_raw(n: int) -> dict[str, float]:
    async def main() -> dict[str, float]:
        async with trio.open_nursery() as nursery:
            await _settle()
            per = await _heap_delta_per(n, lambda: _spawn_raw(nursery, n))
            nursery.cancel_scope.cancel()
        return {"bytes": per}

    return _run(main)


def memory_ours(n: int) -> dict[str, float]:
    async def main() -> dict[str, float]:
        async with open_runtime() as rt:
            sup = _supervisor(rt, n)
            async with trio.open_nursery() as nursery:
                await nursery.start(sup.run)
                await _settle()
                per = await _heap_delta_per(n, lambda: _spawn_actors(sup, n))
                if sup.count_children() != n:
                    raise AssertionError("children missing")
                nursery.cancel_scope.cancel()
        return {"bytes": per}

    return _run(main)


# ---------------------------------------------------------------------------- teardown


def teardown_raw(n: int) -> dict[str, float]:
    async def main() -> dict[str, float]:
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            await _spawn_raw(nursery, n)
            spawned = time.perf_counter()
            nursery.cancel_scope.cancel()
        end = time.perf_counter()
        return {"seconds": end - start, "spawn_s": spawned - start, "teardown_s": end - spawned}

    return _run(main)


def teardown_ours(n: int) -> dict[str, float]:
    async def main() -> dict[str, float]:
        async with open_runtime() as rt:
            sup = _supervisor(rt, n)
            async with trio.open_nursery() as nursery:
                await nursery.start(sup.run)
                await _settle()
                start = time.perf_counter()
                await _spawn_actors(sup, n)
                spawned = time.perf_counter()
                nursery.cancel_scope.cancel()
            end = time.perf_counter()
            if sup.count_children() != 0:
                raise AssertionError("children left behind")
        return {"seconds": end - start, "spawn_s": spawned - start, "teardown_s": end - spawned}

    return _run(main)


# ---------------------------------------------------------------------------- wrapper


async def _op() -> int:
    return 1


async def _loop_ns(n: int, call: Callable[[], Awaitable[int]]) -> float:
    start = time.perf_counter()
    for _ in range(n):
        await call()
    return (time.perf_counter() - start) / n * 1e9


async def _overhead(
    n: int, wrapped: Callable[[], Awaitable[int]], **others: Callable[[], Awaitable[int]]
) -> dict[str, float]:
    """ns per call of ``wrapped`` (and of each of ``others``) minus a bare ``await _op()``.

    Best of 3 loops each, the loops alternated within the process.
    """
    contenders = {"ns": wrapped, **{f"{name}_ns": fn for name, fn in others.items()}}
    for fn in contenders.values():
        await _loop_ns(min(n, 1000), fn)  # warm up caches and lazy imports
    bare: list[float] = []
    loops: dict[str, list[float]] = {key: [] for key in contenders}
    for _ in range(3):
        bare.append(await _loop_ns(n, _op))
        for key, fn in contenders.items():
            loops[key].append(await _loop_ns(n, fn))
    result = {key: min(times) - min(bare) for key, times in loops.items()}
    result["bare_ns"] = min(bare)
    return result


def wrapper_guard(n: int) -> dict[str, float]:
    from config import default_path, engine_kwargs, load_config
    from engine.breaker import Breaker
    from engine.bulkhead import Bulkhead
    from engine.guard import Guard
    from engine.retry import RetryPolicy

    cfg = load_config(default_path("default.toml"))
    policy = cfg.guards["provider"]

    async def main() -> dict[str, float]:
        def build(*, deadline_enforced_by_transport: bool) -> Guard:
            return Guard(
                "provider",
                breaker=Breaker("provider", **engine_kwargs(cfg.breakers[policy.breaker])),
                bulkhead=Bulkhead("provider", **engine_kwargs(cfg.bulkheads[policy.bulkhead])),
                retry=RetryPolicy("provider", **engine_kwargs(cfg.retries[policy.retry])),
                timeout_s=policy.timeout_s,
                deadline_enforced_by_transport=deadline_enforced_by_transport,
            )

        transport = build(deadline_enforced_by_transport=True)
        own = build(deadline_enforced_by_transport=False)
        return await _overhead(n, lambda: transport.call(_op), own_deadline=lambda: own.call(_op))

    return _run(main)


def wrapper_naive(n: int) -> dict[str, float]:
    import pybreaker
    import tenacity

    async def main() -> dict[str, float]:
        limiter = trio.CapacityLimiter(32)
        breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=30)

        async def naive() -> int:
            async for attempt in tenacity.AsyncRetrying(
                stop=tenacity.stop_after_attempt(3),
                wait=tenacity.wait_exponential_jitter(initial=0.2, max=5.0),
                reraise=True,
            ):
                with attempt:
                    async with limiter:
                        with breaker.calling(), trio.fail_after(10.0):
                            return await _op()
            raise AssertionError("unreachable")  # reraise=True: the loop returns or raises

        return await _overhead(n, naive)

    return _run(main)


CASES: dict[str, Worker] = {
    "tell_raw": tell_raw,
    "tell_ours": tell_ours,
    "tell_batch_ours": tell_batch_ours,
    "ask_raw": ask_raw,
    "ask_ours": ask_ours,
    "memory_raw": memory_raw,
    "memory_ours": memory_ours,
    "teardown_raw": teardown_raw,
    "teardown_ours": teardown_ours,
    "wrapper_naive": wrapper_naive,
    "wrapper_guard": wrapper_guard,
}


# ---------------------------------------------------------------------------- the suite


class Sizes:
    """How much work each measurement does."""

    def __init__(self, *, messages: int, asks: int, actors: int, calls: int) -> None:
        self.messages = messages
        self.asks = asks
        self.actors = actors
        self.calls = calls

    @classmethod
    def full(cls) -> Sizes:
        return cls(messages=200_000, asks=50_000, actors=100_000, calls=50_000)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(messages=1_000, asks=200, actors=1_000, calls=500)


def _rates(samples: list[dict[str, float]], n: int) -> list[float]:
    return [n / s["seconds"] for s in samples]


def _field(samples: list[dict[str, float]], key: str) -> list[float]:
    return [s[key] for s in samples]


def run_suite(
    sizes: Sizes, *, repeat: int, progress: Callable[[str], None] | None = None
) -> list[Result]:
    """Measure every result of the suite; the caller writes JSON and the table."""

    def measure(
        *contenders: tuple[str, int], rounds: int = repeat
    ) -> dict[str, list[dict[str, float]]]:
        if progress is not None:
            progress(" vs ".join(case for case, _ in contenders))
        return measure_alternating(MODULE, contenders, repeat=rounds, progress=progress)

    results: list[Result] = []
    m = sizes.messages
    tells = measure(("tell_ours", m), ("tell_raw", m), ("tell_batch_ours", m))
    raw_channel = (
        f"raw trio.open_memory_channel({CAPACITY}): await send() / async for, same trivial work"
    )
    results.append(
        Result.build(
            name="tell",
            unit="msgs/s",
            baseline=raw_channel,
            samples=_rates(tells["tell_ours"], m),
            baseline_samples=_rates(tells["tell_raw"], m),
            better=Better.HIGHER,
            targets=[Target("ratio", ">=", 0.85)],
            note=f"{m} messages, actor under a Supervisor, Overflow.WAIT, batch_max=1",
        )
    )
    results.append(
        Result.build(
            name="tell_batch",
            unit="msgs/s",
            baseline=raw_channel,
            samples=_rates(tells["tell_batch_ours"], m),
            baseline_samples=_rates(tells["tell_raw"], m),
            better=Better.HIGHER,
            targets=[Target("ratio", ">=", 5.0)],
            note=(
                f"{m} messages all handled; tell_nowait, await tell on MailboxFull;"
                f" actor batch_max={CAPACITY}"
            ),
        )
    )

    a = sizes.asks
    asks = measure(("ask_ours", a), ("ask_raw", a))
    results.append(
        Result.build(
            name="ask",
            unit="round trips/s",
            baseline="raw request/reply: (req, future with trio.Event) on a memory channel",
            samples=_rates(asks["ask_ours"], a),
            baseline_samples=_rates(asks["ask_raw"], a),
            better=Better.HIGHER,
            targets=[Target("ratio", ">=", 0.8)],
            note=f"{a} sequential asks, timeout_s={ASK_TIMEOUT_S:g} via runtime Deadlines",
        )
    )

    k = sizes.actors
    # Heap deltas repeat to the byte from run to run, and a traced run of 100k
    # actors is slow: two rounds are enough to show the figure is stable.
    memory = measure(("memory_ours", k), ("memory_raw", k), rounds=min(repeat, 2))
    results.append(
        Result.build(
            name="idle_actor_memory",
            unit="bytes/actor",
            baseline="raw Trio task parked on its own memory channel (bytes/task)",
            samples=_field(memory["memory_ours"], "bytes"),
            baseline_samples=_field(memory["memory_raw"], "bytes"),
            better=Better.LOWER,
            targets=[Target("value", "<=", 8192)],
            note=(
                f"tracemalloc heap delta over {k} idle actors (start_child_nowait, refs kept)"
                f" / raw tasks (send channels kept), mailbox capacity {IDLE_CAPACITY}"
            ),
        )
    )

    teardown = measure(("teardown_ours", k), ("teardown_raw", k))
    ours_best = min(teardown["teardown_ours"], key=lambda s: s["seconds"])
    raw_best = min(teardown["teardown_raw"], key=lambda s: s["seconds"])
    results.append(
        Result.build(
            name="teardown_100k",
            unit="s",
            baseline="raw start_soon of tasks + channels, then cancel the nursery",
            samples=_field(teardown["teardown_ours"], "seconds"),
            baseline_samples=_field(teardown["teardown_raw"], "seconds"),
            better=Better.LOWER,
            targets=[Target("ratio", "<=", 1.5)],
            note=(
                f"{k} actors; value = spawn (start_child_nowait) + wait until all are parked"
                " + cancel the running supervisor and wait for it to exit (its own start is"
                " not timed); details split the best run of each side"
            ),
            details={
                "spawn_s": ours_best["spawn_s"],
                "teardown_s": ours_best["teardown_s"],
                "baseline_spawn_s": raw_best["spawn_s"],
                "baseline_teardown_s": raw_best["teardown_s"],
            },
        )
    )

    c = sizes.calls
    wrap = measure(("wrapper_guard", c), ("wrapper_naive", c))
    own_deadline_ns = min(_field(wrap["wrapper_guard"], "own_deadline_ns"))
    bare_ns = min(_field(wrap["wrapper_guard"] + wrap["wrapper_naive"], "bare_ns"))
    results.append(
        Result.build(
            name="wrapper_overhead",
            unit="ns/call",
            baseline="naive: tenacity AsyncRetrying > CapacityLimiter > pybreaker calling() > fail_after",
            samples=_field(wrap["wrapper_guard"], "ns"),
            baseline_samples=_field(wrap["wrapper_naive"], "ns"),
            better=Better.LOWER,
            targets=[Target("value", "<=", 5000), Target("ratio", "<=", 0.3)],
            note=(
                f"{c} calls of an op that returns at once, minus a bare await loop;"
                " Guard from guards.provider in config/default.toml on its fast path:"
                " permit taken with acquire_nowait, breaker bookkeeping skipped when"
                " nothing can change, no tenacity on the first attempt, and the deadline"
                " left to the transport (deadline_enforced_by_transport=True, as an httpx"
                " client built with the same timeout does); details.own_deadline_ns: the"
                " same Guard keeping its own deadline (one trio.CancelScope per call)"
            ),
            details={"own_deadline_ns": own_deadline_ns, "bare_ns": bare_ns},
        )
    )
    return results
