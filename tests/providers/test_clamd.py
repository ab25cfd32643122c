"""The clamd client against a real clamd (Debian's clamav-daemon, the tests' signatures).

The wire parsing is also checked on clamd's exact answers, and a loopback
listener plays a clamd that hangs or hangs up, for the typed transient errors.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from providers.clamd import (
    ClamdAddress,
    ClamdClient,
    ClamdTimeout,
    ClamdUnavailable,
    ScanError,
    ScanSizeLimit,
    parse_address,
    parse_scan_reply,
    parse_stats,
)
from providers.embedded_clamd import EmbeddedClamd
from tests.clamd_fixture import EICAR, STREAM_MAX_BYTES, TEST_PATTERN

STATS = (
    "POOLS: 1\n\nSTATE: VALID PRIMARY\nTHREADS: live 3  idle 1 max 4 idle-timeout 30\n"
    "QUEUE: 7 items\n\tSTATS 0.000004 \n\nMEMSTATS: heap N/A mmap N/A used N/A\nEND"
)


def client(address: ClamdAddress, *, timeout_s: float = 5.0) -> ClamdClient:
    return ClamdClient(address, connect_timeout_s=1.0, timeout_s=timeout_s, chunk_bytes=4096)


async def stream(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def test_parse_replies() -> None:
    assert parse_scan_reply("stream: OK").infected is False
    found = parse_scan_reply("stream: Eicar-Test-Signature FOUND")
    assert (found.infected, found.signature) == (True, "Eicar-Test-Signature")
    with pytest.raises(ScanSizeLimit):
        parse_scan_reply("INSTREAM size limit exceeded. ERROR")
    with pytest.raises(ScanError) as caught:
        parse_scan_reply("Can't allocate memory ERROR")
    assert not isinstance(caught.value, ScanSizeLimit)
    with pytest.raises(ScanError):
        parse_scan_reply("stream: ")
    stats = parse_stats(STATS)
    assert (stats.queue, stats.threads_live, stats.threads_idle, stats.threads_max) == (7, 3, 1, 4)
    with pytest.raises(ScanError):
        parse_stats("POOLS: 1\nEND")
    # A busy clamd appends its wait times to the QUEUE line.
    busy = STATS.replace("QUEUE: 7 items", "QUEUE: 4 items min_wait: 0.000111 max_wait: 0.004249")
    assert parse_stats(busy).queue == 4


def test_parse_address() -> None:
    assert parse_address("tcp://127.0.0.1:3310") == ClamdAddress(host="127.0.0.1", port=3310)
    assert parse_address("unix:///run/clamav/clamd.ctl") == ClamdAddress(
        path="/run/clamav/clamd.ctl"
    )
    for bad in ("http://x:1", "tcp://host", "unix://relative", "tcp://h:notaport"):
        with pytest.raises(ValueError, match="clamd address"):
            parse_address(bad)


async def test_real_clamd_ping_stats_and_verdicts(clamd_server: EmbeddedClamd) -> None:
    clamd = client(clamd_server.address)
    await clamd.ping()
    stats = await clamd.stats()
    assert stats.threads_max >= 1 and stats.queue >= 0
    assert (await clamd.scan(stream(b"a perfectly clean note\n" * 100))).infected is False
    infected = await clamd.scan(stream(EICAR))
    assert infected.infected and infected.signature == "Triage.Test.EICAR.UNOFFICIAL"
    # The body pattern split across chunks (and across INSTREAM chunks of 4096 bytes).
    big = b"x" * 5000 + TEST_PATTERN + b"y" * 5000
    pattern = await clamd.scan(stream(big[:4090], big[4090:]))
    assert pattern.signature == "Triage.Test.Pattern.UNOFFICIAL"


async def test_real_clamd_size_limit_is_a_typed_failure_never_clean(
    clamd_server: EmbeddedClamd,
) -> None:
    clamd = client(clamd_server.address)
    with pytest.raises(ScanSizeLimit):
        await clamd.scan(stream(b"z" * (STREAM_MAX_BYTES + 10)))


async def test_real_clamd_over_a_unix_socket(tmp_path: Path) -> None:
    # clamd's LocalSocket: the same protocol over a unix socket.
    from tests.clamd_fixture import clamd_or_fail

    sock = tmp_path / "clamd.ctl"
    with clamd_or_fail(directory=tmp_path, local_socket=sock):
        clamd = client(ClamdAddress(path=str(sock)))
        await clamd.ping()
        assert (await clamd.scan(stream(EICAR))).infected


async def test_nothing_listening_is_unavailable() -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ClamdUnavailable):
        await client(ClamdAddress(host="127.0.0.1", port=port)).ping()


async def _serve_once(behaviour: str, task_status: trio.TaskStatus[int]) -> None:
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        task_status.started(listener.socket.getsockname()[1])
        conn = await listener.accept()
    async with conn:
        await conn.receive_some(100)
        if behaviour == "hang":
            await trio.sleep_forever()
        elif behaviour == "garbage":
            await conn.send_all(b"what?\0")
        # "hangup": close at once


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [("hang", ClamdTimeout), ("hangup", ClamdUnavailable), ("garbage", ScanError)],
)
async def test_a_broken_clamd_is_a_typed_error(behaviour: str, error: type[Exception]) -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(_serve_once, behaviour)
        with pytest.raises(error):
            await client(ClamdAddress(host="127.0.0.1", port=port), timeout_s=0.3).scan(
                stream(b"data")
            )
        nursery.cancel_scope.cancel()


def test_instream_framing_is_big_endian_lengths_then_zero() -> None:
    # What _send_chunks writes for 5000 bytes in 4096-byte chunks.
    assert struct.pack(">I", 4096)[:1] == b"\x00" and struct.pack(">I", 0) == b"\0\0\0\0"
