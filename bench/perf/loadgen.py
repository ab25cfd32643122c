"""The load generator in its own process: plain asyncio, HTTP/1.1 keep-alive, written by hand.

A client in the daemon's interpreter takes the daemon's CPU (httpx cost a
tenth of the in-process rig's profile), so the throughput runs drive the
service from here: ``python -m bench.perf.loadgen SPEC_JSON`` opens
``concurrency`` keep-alive connections to ``host:port`` and POSTs ``n``
dispatch requests (``tenants`` round robin from index ``first``, a fresh
``Idempotency-Key`` each), one request in flight per connection, and prints one
JSON line::

    {"started": t, "ended": t, "ids": [...], "refused": {status: count},
     "latency_p50": s, "latency_p99": s, "latency_max": s}

``started``/``ended`` are ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for
every process of the machine), so the parent can time the rest of the path
from the same origin. The request bytes are built before the clock starts; the
client parses only the status line, ``Content-Length`` and the answer's
``dispatch_id``. It shares no code with the service it measures.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import uuid
from collections import Counter
from typing import Any

__all__ = ["main", "request_bytes"]


def request_bytes(host: str, path: str, body: dict[str, Any], key: str) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Idempotency-Key: {key}\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


async def _body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    """The answer's body: ``Content-Length`` bytes, or the chunks of a chunked answer."""
    length, chunked = 0, False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if not chunked:
        return await reader.readexactly(length)
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        parts.append(await reader.readexactly(size + 2))
        if size == 0:
            return b"".join(part[:-2] for part in parts)


async def _lane(
    host: str,
    port: int,
    requests: list[bytes],
    cursor: list[int],
    ids: list[str],
    refused: Counter[int],
    latencies: list[float],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while cursor[0] < len(requests):
            request = requests[cursor[0]]
            cursor[0] += 1
            sent = time.monotonic()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            answer = await _body(reader, head)
            latencies.append(time.monotonic() - sent)
            if 200 <= status < 300:
                ids.append(json.loads(answer)["dispatch_id"])
            else:
                refused[status] += 1
    finally:
        writer.close()


async def _run(spec: dict[str, Any]) -> dict[str, Any]:
    host, port, path = spec["host"], int(spec["port"]), spec["path"]
    tenants: list[str] = spec["tenants"]
    template: dict[str, Any] = spec["body"]
    first = int(spec.get("first", 0))
    requests = [
        request_bytes(
            host,
            path,
            {**template, "tenant_id": tenants[(first + i) % len(tenants)]},
            uuid.uuid4().hex,
        )
        for i in range(int(spec["n"]))
    ]
    ids: list[str] = []
    refused: Counter[int] = Counter()
    latencies: list[float] = []
    cursor = [0]
    started = time.monotonic()
    await asyncio.gather(
        *(
            _lane(host, port, requests, cursor, ids, refused, latencies)
            for _ in range(int(spec["concurrency"]))
        )
    )
    ended = time.monotonic()
    latencies.sort()
    return {
        "started": started,
        "ended": ended,
        "ids": ids,
        "refused": {str(k): v for k, v in refused.items()},
        "latency_p50": _percentile(latencies, 50),
        "latency_p99": _percentile(latencies, 99),
        "latency_max": latencies[-1] if latencies else math.nan,
    }


def main() -> None:
    print(json.dumps(asyncio.run(_run(json.loads(sys.argv[1])))), flush=True)


if __name__ == "__main__":
    main()
