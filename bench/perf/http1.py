"""The HTTP/1.1 client: :class:`providers.http_transport.Http1Transport` vs httpx's default.

``python -m bench.perf.http1 [--requests N] [--repeat R]``

Both contenders are an ``httpx.AsyncClient`` POSTing a small JSON body, ``C`` at
once, ``N`` in all, to a loopback server in its **own process** (raw Trio,
``httptools`` parsing, answering ``202`` with a JSON body and keep-alive), so the
client's CPU is measured alone: ``time.process_time()`` around the requests, per
request, in microseconds; and requests per second of wall time. Each contender runs
in a fresh interpreter (:mod:`bench.perf.common`), alternating order each round,
best sample kept. Target (issue 9): ours at most 600 µs of client CPU per request,
httpx's own layer included.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import httptools
import httpx
import trio

from bench.perf.common import (
    ROOT,
    Better,
    Result,
    Target,
    Worker,
    measure_alternating,
    render_table,
)
from providers.http_transport import Http1Transport

MODULE: Final = "bench.perf.http1"
CONCURRENCY: Final = 64
REQUESTS: Final = 3000
TARGET_US: Final = 600.0
_ANSWER: Final = b'{"message_id":"m-1","status":"accepted"}'
_RESPONSE: Final = (
    b"HTTP/1.1 202 Accepted\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
    % (len(_ANSWER), _ANSWER)
)
_PAYLOAD: Final = {"to": "+15551234567", "text": "Your appointment is at 10:00", "sender": "T"}


# -- the server (its own process) --------------------------------------------------------


class _Requests:
    """Counts complete requests on one connection (the httptools protocol)."""

    def __init__(self) -> None:
        self.complete = 0

    def on_message_complete(self) -> None:
        self.complete += 1


async def _answer(stream: trio.SocketStream) -> None:
    requests = _Requests()
    parser = httptools.HttpRequestParser(requests)
    try:
        while data := await stream.receive_some(65_536):
            parser.feed_data(data)
            if requests.complete:
                await stream.send_all(_RESPONSE * requests.complete)
                requests.complete = 0
    except (trio.BrokenResourceError, httptools.HttpParserError):
        pass


async def _serve() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(_answer, listeners)


def serve() -> None:
    """The server process's entry: prints its port, serves until killed."""
    trio.run(_serve)


# -- the client (the measured worker) ----------------------------------------------------


@contextlib.contextmanager
def _server() -> Iterator[str]:
    """The answering server in its own process; yields the URL to POST to."""
    server = subprocess.Popen(
        [sys.executable, "-c", "from bench.perf.http1 import serve; serve()"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        yield f"http://127.0.0.1:{int(server.stdout.readline())}/api/v1/messages"
    finally:
        server.kill()
        server.wait()


async def _client_main(
    n: int, url: str, transport: httpx.AsyncBaseTransport | None
) -> dict[str, float]:
    async with httpx.AsyncClient(transport=transport, timeout=10.0) as client:
        failures = 0

        async def worker(count: int) -> None:
            nonlocal failures
            for _ in range(count):
                answer = await client.post(url, json=_PAYLOAD)
                if answer.status_code != 202 or answer.json()["status"] != "accepted":
                    failures += 1

        # Warm up: open the connections, fill the caches.
        async with trio.open_nursery() as nursery:
            for _ in range(CONCURRENCY):
                nursery.start_soon(worker, 2)
        per_task, extra = divmod(n, CONCURRENCY)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(CONCURRENCY):
                nursery.start_soon(worker, per_task + (1 if i < extra else 0))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"cpu_us": cpu / n * 1e6, "per_s": n / wall, "failures": float(failures)}


def http1_ours(n: int) -> dict[str, float]:
    with _server() as url:
        return trio.run(_client_main, n, url, Http1Transport(connections_per_origin=CONCURRENCY))


def http1_httpx(n: int) -> dict[str, float]:
    with _server() as url:
        return trio.run(_client_main, n, url, None)


CASES: dict[str, Worker] = {"http1_ours": http1_ours, "http1_httpx": http1_httpx}


def run_suite(
    n: int, *, repeat: int, progress: Callable[[str], None] | None = None
) -> list[Result]:
    """Client CPU per request and request rate, ours against httpx's default transport."""
    samples = measure_alternating(
        MODULE, [("http1_ours", n), ("http1_httpx", n)], repeat=repeat, progress=progress
    )
    ours, base = samples["http1_ours"], samples["http1_httpx"]
    failures = max(s["failures"] for s in [*ours, *base])
    note = f"{n} POSTs of a small JSON body, {CONCURRENCY} at once, server in its own process"
    baseline = "httpx.AsyncClient default transport (httpcore + h11), same server and load"
    results = [
        Result.build(
            name=name,
            unit=unit,
            baseline=baseline,
            samples=[s[key] for s in ours],
            baseline_samples=[s[key] for s in base],
            better=better,
            targets=[target],
            note=note,
            details={"failures": failures},
        )
        for name, unit, key, better, target in (
            (
                "http1_client_cpu",
                "us/request",
                "cpu_us",
                Better.LOWER,
                Target("value", "<=", TARGET_US),
            ),
            ("http1_rate", "requests/s", "per_s", Better.HIGHER, Target("ratio", ">=", 1.0)),
        )
    ]
    if failures:
        for result in results:
            result.passed = False
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    parser.add_argument("--requests", type=int, default=REQUESTS)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    results = run_suite(
        args.requests,
        repeat=args.repeat,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(render_table("http1", results))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
