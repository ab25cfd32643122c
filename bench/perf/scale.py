"""The ``scale`` perf suite: end-to-end dispatch throughput of two replicas against one.

``scale_2_vs_1`` (dispatches/s)
    Ours: two ``triage run`` processes (the daemon as Kubernetes runs it, each its
    own interpreter, port and spool; ``config/default.toml`` with the vendors at
    the gateway process, :mod:`bench.perf.gateway`) on *one* PostgreSQL (started
    with ``FAST_POSTGRES``, as the dispatch suite's), one NATS and one Redis,
    both holding their share of the singletons' leases (:mod:`supervisors.singleton`).
    Baseline: the same with one replica. N SMS dispatches enter through ``POST
    /v1/dispatches``: one load generator process per replica (:mod:`bench.perf.loadgen`,
    ``CONCURRENCY`` requests in flight in all, N split evenly), after a warm-up
    of ``CONCURRENCY`` per replica. Timed from the first request to the moment
    all N rows read ``delivered`` (the receipts the gateway sends come back
    through one replica's DLR ingress -- any replica applies a receipt, as behind
    a Service). ``ratio`` = two / one. Nothing lost: a run with a row not
    delivered, or a duplicate at the gateway, fails the result.

    Reported, no target: on a machine with fewer cores than two replicas plus
    PostgreSQL plus the gateway need, the second replica only shares the same
    CPUs (``details.cpus`` says how many there were).

The outbox relay is off as in the dispatch suite (``bench.perf relay`` measures it).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import trio

import config
from bench.chaos.channels_rig import _seed
from bench.perf.common import Better, Result, Worker, measure_alternating
from bench.perf.dispatch import (
    CONCURRENCY,
    FAST_POSTGRES,
    SETTLE_TIMEOUT_S,
    TENANTS,
    _loadgen,
    _wait_delivered,
    bench_config,
)
from bench.perf.gateway import Gateway, open_gateway
from providers.bridge import open_bridge, run
from providers.embedded import EmbeddedNats, EmbeddedPostgres, EmbeddedRedis
from providers.services import ENV_NATS_URL, ENV_POSTGRES_URL, ENV_REDIS_URL

__all__ = ["CASES", "run_suite"]

MODULE = __name__ if __name__ != "__main__" else "bench.perf.scale"
ROOT = Path(__file__).resolve().parents[2]
#: Longest wait for a replica's ``/readyz`` 200.
START_S = 60.0


def overlay(gateway: Gateway, directory: Path) -> str:
    """A ``triage run`` config: default.toml with the vendors at ``gateway``, port 0,
    the emulators and the relay off (as :func:`bench.perf.dispatch.bench_config`),
    a spool of its own in ``directory``."""
    providers, _, sections = gateway.provider_settings(directory)
    q = json.dumps
    lines = [
        f"extends = {q(str(config.default_path('default.toml')))}",
        f"catalog = {q(str(config.default_path('failures.toml')))}",
        "",
        '[daemon]\nport = 0\nlog_level = "info"',
        "[emulators]\nenabled = false",
        "[relay]\nenabled = false",
        f"[spool]\npath = {q(str(directory / 'spool'))}",
    ]
    for vendor, fields in providers.items():
        body = "\n".join(f"{key} = {q(value)}" for key, value in fields.items())
        lines.append(f"[providers.{vendor}]\n{body}")
    for node in sections["jitsi"]["nodes"]:
        lines.append(f"[[jitsi.nodes]]\nname = {q(node['name'])}\nurl = {q(node['url'])}")
    return "\n\n".join(lines) + "\n"


class Replica:
    """A ``triage run`` process and the port it serves."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.port = 0
        self.log: list[str] = []

    async def read(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        while chunk := await self.process.stderr.receive_some():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                self.log.append(line)
                if not self.port and '"http listening"' in line:
                    self.port = int(json.loads(line)["port"])


@asynccontextmanager
async def open_replicas(
    count: int, gateway: Gateway, env: dict[str, str], directory: Path
) -> AsyncIterator[list[Replica]]:
    """``count`` replicas started at once and ready; SIGTERM (then SIGKILL) at exit."""
    replicas: list[Replica] = []
    async with trio.open_nursery() as nursery:
        for index in range(count):
            home = directory / f"replica-{index}"
            home.mkdir()
            path = home / "triage.toml"
            path.write_text(overlay(gateway, home))
            argv = [sys.executable, "-m", "supervisors.cli", "run", "--config", str(path)]
            start = partial(
                trio.run_process, argv, cwd=ROOT, env=env, check=False,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )  # fmt: skip
            replica = Replica(await nursery.start(start))
            nursery.start_soon(replica.read)
            replicas.append(replica)
        try:
            with trio.fail_after(START_S):
                async with httpx.AsyncClient() as client:
                    for replica in replicas:
                        while not await _ready(client, replica):
                            if replica.process.returncode is not None:
                                tail = "\n".join(replica.log[-20:])
                                raise RuntimeError(f"a replica exited at start:\n{tail}")
                            await trio.sleep(0.05)
            yield replicas
        finally:
            for replica in replicas:
                if replica.process.returncode is None:
                    replica.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(30) as scope:
                scope.shield = True
                for replica in replicas:
                    await replica.process.wait()
            for replica in replicas:
                if replica.process.returncode is None:
                    replica.process.kill()


async def _ready(client: httpx.AsyncClient, replica: Replica) -> bool:
    if not replica.port:
        return False
    try:
        answer = await client.get(f"http://127.0.0.1:{replica.port}/readyz")
    except httpx.TransportError:
        return False
    return answer.status_code == 200


async def _spread(
    replicas: Sequence[Replica], tenants: Sequence[uuid.UUID], n: int, *, first: int
) -> list[dict[str, Any]]:
    """``n`` dispatches split over the replicas, one load generator process each."""
    outs: list[dict[str, Any]] = []
    share, lanes = n // len(replicas), max(1, CONCURRENCY // len(replicas))

    async def one(index: int, replica: Replica) -> None:
        count = share + (n - share * len(replicas) if index == 0 else 0)
        offset = first + index * share
        outs.append(await _loadgen(replica.port, tenants, count, lanes, first=offset))

    async with trio.open_nursery() as nursery:
        for index, replica in enumerate(replicas):
            nursery.start_soon(one, index, replica)
    return outs


async def _scale_main(count: int, n: int) -> dict[str, float]:
    postgres = EmbeddedPostgres(settings=FAST_POSTGRES)
    nats, redis = EmbeddedNats(), EmbeddedRedis()
    for server in (postgres, nats, redis):
        await trio.to_thread.run_sync(server.start)
    try:
        async with AsyncExitStack() as stack:
            gateway = await stack.enter_async_context(open_gateway(bench_config()))
            home = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="triage-scale-")))
            _, secrets, _ = gateway.provider_settings(home)
            env = {
                **os.environ, **secrets, "PYTHONUNBUFFERED": "1",
                ENV_POSTGRES_URL: postgres.url, ENV_NATS_URL: nats.url, ENV_REDIS_URL: redis.url,
            }  # fmt: skip
            await stack.enter_async_context(open_bridge())
            replicas = await stack.enter_async_context(open_replicas(count, gateway, env, home))
            await gateway.command(receipts=f"http://127.0.0.1:{replicas[0].port}")
            tenants = await run(_seed, postgres.url, TENANTS, service="postgres")
            owner = await run(asyncpg.connect, postgres.url, service="postgres")
            try:
                warm = await _spread(replicas, tenants, CONCURRENCY * count, first=0)
                warm_ids = [i for out in warm for i in out["ids"]]
                await _wait_delivered(owner, warm_ids, SETTLE_TIMEOUT_S)
                timed = await _spread(replicas, tenants, n, first=CONCURRENCY * count)
                ids = [i for out in timed for i in out["ids"]]
                delivered, last = await _wait_delivered(owner, ids, SETTLE_TIMEOUT_S)
            finally:
                await run(owner.close, service="postgres")
            stats = await gateway.stats()
            began = min(float(out["started"]) for out in timed)
            return {
                "seconds": last - began,
                "accepted": float(len(ids)),
                "delivered": float(delivered),
                "lost": float(n - delivered),
                "duplicates": stats["duplicates"],
                "replicas": float(count),
            }
    finally:
        for server in (redis, nats, postgres):
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(server.close)


def scale_1(n: int) -> dict[str, float]:
    return trio.run(_scale_main, 1, n)


def scale_2(n: int) -> dict[str, float]:
    return trio.run(_scale_main, 2, n)


CASES: dict[str, Worker] = {"scale_1": scale_1, "scale_2": scale_2}


def run_suite(
    n: int, *, repeat: int, progress: Callable[[str], None] | None = None
) -> list[Result]:
    """Two replicas against one, ``repeat`` alternating rounds of ``n`` dispatches each."""
    if progress is not None:
        progress(f"scale_2 vs scale_1: {n} dispatches")
    samples = measure_alternating(
        MODULE, [("scale_2", n), ("scale_1", n)], repeat=repeat, progress=progress
    )
    two, one = samples["scale_2"], samples["scale_1"]

    def rate(s: dict[str, float]) -> float:
        return s["delivered"] / s["seconds"] if s["seconds"] > 0 else 0.0

    lost = max(s["lost"] for s in [*two, *one])
    duplicates = max(s["duplicates"] for s in [*two, *one])
    result = Result.build(
        name="scale_2_vs_1",
        unit="dispatches/s",
        baseline="the same run with one replica (same PostgreSQL build and settings, gateway)",
        samples=[rate(s) for s in two],
        baseline_samples=[rate(s) for s in one],
        better=Better.HIGHER,
        targets=[],
        note=(
            f"two `triage run` processes vs one on one PostgreSQL/NATS/Redis, {n} SMS"
            f" dispatches through POST /v1/dispatches, {CONCURRENCY} in flight in all, until"
            " every row is delivered; reported, no target (see details.cpus)"
        ),
        details={
            "two_replicas_per_s": max(rate(s) for s in two),
            "one_replica_per_s": max(rate(s) for s in one),
            "lost": lost,
            "duplicates": duplicates,
            "cpus": float(os.cpu_count() or 0),
        },
    )
    if lost or duplicates or not math.isfinite(result.ratio):
        result.passed = False
    return [result]


if __name__ == "__main__":  # a worker by hand: python -m bench.perf.scale CASE N
    print(json.dumps(CASES[sys.argv[1]](int(sys.argv[2]))))
