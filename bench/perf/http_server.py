"""The daemon's HTTP/1.1 server against hypercorn, on a trivial ASGI app.

``python -m bench.perf.http_server [--n N] [--concurrency C] [--repeat R] [--json FILE]``

Each contender runs in a fresh interpreter (:func:`bench.perf.common.run_worker`)
that serves the same trivial app (read the body, answer 202 with the 20-byte
``{"dispatch_id":"d1"}``) on a loopback port, and drives it with
:mod:`bench.perf.loadgen` in a separate process: ``C`` keep-alive connections,
``N`` POSTs of a dispatch request in all, one in flight per connection. Measured
in the server's process: requests per second (the load generator's clock) and
server CPU per request (``time.process_time`` around the load). The baseline is
hypercorn 0.18 on Trio serving the same app in the same run; rounds alternate
which contender goes first and each side keeps its best round.

Contenders:

``ours``       :class:`supervisors.http.HttpServer` (providers.http_server), the
               ``[daemon.http]`` defaults
``hypercorn``  ``hypercorn.trio.serve``, access log off (as the daemon had it)
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import trio

from bench.perf.common import (
    ROOT,
    Better,
    Result,
    Target,
    measure_alternating,
    render_table,
)
from providers.asgi import lifespan

__all__ = ["CASES", "main", "run_suite"]

_BODY = b'{"dispatch_id":"d1"}'
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_BODY))]
_TEMPLATE = {
    "channel": "sms",
    "template": "reminder",
    "category": "reminders",
    "recipient": "+15551230000",
    "data": {"time": "10:30"},
}
_WARMUP = 500
CONCURRENCY = 64
#: Server CPU per request the daemon can afford: two crossings per dispatch at >= 500/s
#: on two cores leave ~1 ms of CPU per dispatch for everything, a quarter for HTTP.
CPU_TARGET_US = 250.0


async def trivial_app(scope: Any, receive: Any, send: Any) -> None:
    """Lifespan acknowledged; a request's body read, then 202 and 20 bytes."""
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 202, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY, "more_body": False})


async def _serve_ours(shutdown: trio.Event, *, task_status: trio.TaskStatus[int]) -> None:
    from supervisors.http import HttpServer

    server = HttpServer(trivial_app, host="127.0.0.1", port=0, graceful_timeout_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        assert server.port is not None
        task_status.started(server.port)
        await shutdown.wait()
        server.shutdown()


async def _serve_hypercorn(shutdown: trio.Event, *, task_status: trio.TaskStatus[int]) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 1.0
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(
            functools.partial(
                serve, trivial_app, config, shutdown_trigger=shutdown.wait, mode="asgi"
            )
        )
        task_status.started(int(binds[0].rsplit(":", 1)[1]))


async def _load(port: int, n: int, concurrency: int) -> dict[str, Any]:
    spec = {
        "host": "127.0.0.1",
        "port": port,
        "path": "/v1/dispatches",
        "tenants": ["00000000-0000-4000-8000-000000000001"],
        "body": _TEMPLATE,
        "n": n,
        "concurrency": concurrency,
    }
    done = await trio.run_process(
        [sys.executable, "-m", "bench.perf.loadgen", json.dumps(spec)],
        capture_stdout=True,
        cwd=ROOT,
    )
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


def _measure(serve: Callable[..., Any], n: int, concurrency: int) -> dict[str, float]:
    logging.disable(logging.INFO)  # "http listening": not the measured path

    async def main() -> dict[str, float]:
        shutdown = trio.Event()
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(serve, shutdown)
            await _load(port, _WARMUP, concurrency)
            cpu = time.process_time()
            result = await _load(port, n, concurrency)
            cpu = time.process_time() - cpu
            shutdown.set()
        answered = len(result["ids"])
        if answered != n:
            raise RuntimeError(f"{answered} of {n} requests answered 2xx: {result['refused']}")
        return {
            "req_s": n / (result["ended"] - result["started"]),
            "cpu_us": cpu / n * 1e6,
            "latency_p50_ms": result["latency_p50"] * 1e3,
            "latency_p99_ms": result["latency_p99"] * 1e3,
        }

    return trio.run(main)


def _ours(n: int) -> dict[str, float]:
    return _measure(_serve_ours, n, CONCURRENCY)


def _hypercorn(n: int) -> dict[str, float]:
    return _measure(_serve_hypercorn, n, CONCURRENCY)


CASES: dict[str, Callable[[int], dict[str, float]]] = {"ours": _ours, "hypercorn": _hypercorn}


def run_suite(
    n: int, *, repeat: int, progress: Callable[[str], None] | None = None
) -> list[Result]:
    samples = measure_alternating(
        "bench.perf.http_server", [("ours", n), ("hypercorn", n)], repeat=repeat, progress=progress
    )
    ours, base = samples["ours"], samples["hypercorn"]
    note = f"{n} POSTs over {CONCURRENCY} keep-alive connections from bench.perf.loadgen"
    return [
        Result.build(
            name="http_trivial_cpu_per_request",
            unit="us",
            baseline="hypercorn 0.18 on Trio, same app",
            samples=[s["cpu_us"] for s in ours],
            baseline_samples=[s["cpu_us"] for s in base],
            better=Better.LOWER,
            targets=[Target("value", "<=", CPU_TARGET_US)],
            note=note,
        ),
        Result.build(
            name="http_trivial_throughput",
            unit="req/s",
            baseline="hypercorn 0.18 on Trio, same app",
            samples=[s["req_s"] for s in ours],
            baseline_samples=[s["req_s"] for s in base],
            better=Better.HIGHER,
            targets=[Target("ratio", ">=", 1.0)],
            note=note,
            details={
                "ours_p99_ms": min(s["latency_p99_ms"] for s in ours),
                "hypercorn_p99_ms": min(s["latency_p99_ms"] for s in base),
            },
        ),
    ]


class _Report(msgspec.Struct):
    suite: str
    results: list[Result]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.perf.http_server")
    parser.add_argument("--n", type=int, default=5000, help="requests per round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, best kept")
    parser.add_argument("--json", type=Path, metavar="FILE")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = run_suite(args.n, repeat=args.repeat, progress=progress if args.verbose else None)
    if args.json is not None:
        report = _Report("http_server", results)
        args.json.write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    print(render_table("http_server", results))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
