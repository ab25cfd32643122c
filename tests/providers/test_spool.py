"""The durable write spool: append (fsync), replay in order, torn tail, full, compaction."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import trio

from engine.errors import LoadShed
from providers.spool import HEADER, Spool, SpoolFull, SpoolRecord, encode_frame


async def test_append_then_reopen_replays_in_order(tmp_path: Path) -> None:
    path = tmp_path / "state" / "spool"
    spool = Spool(path, max_bytes=1 << 20)
    await spool.open()
    for n in range(5):
        record = await spool.append("inbox", f"k{n}", {"n": n})
        assert record.seq == n + 1
    await spool.aclose()

    again = Spool(path, max_bytes=1 << 20)
    await again.open()
    assert again.count == 5 and again.torn_bytes == 0
    records = await again.peek(10)
    assert [r.key for r in records] == [f"k{n}" for n in range(5)]
    assert [r.payload for r in records] == [{"n": n} for n in range(5)]
    assert (await again.append("inbox", "k5", None)).seq == 6  # numbering goes on
    await again.aclose()


async def test_append_fsyncs_before_returning(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=1 << 20)
    await spool.open()
    with mock.patch("providers.spool.os.fsync", wraps=os.fsync) as fsync:
        await spool.append("inbox", "k", 1)
    assert fsync.call_count == 1
    await spool.aclose()

    unsynced = Spool(tmp_path / "spool2", max_bytes=1 << 20, fsync=False)
    await unsynced.open()
    with mock.patch("providers.spool.os.fsync", wraps=os.fsync) as fsync:
        await unsynced.append("inbox", "k", 1)
    assert fsync.call_count == 0
    await unsynced.aclose()


async def test_drop_compacts_and_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = Spool(path, max_bytes=1 << 20)
    await spool.open()
    for n in range(6):
        await spool.append("inbox", f"k{n}", n)
    size = path.stat().st_size
    await spool.drop(4)
    assert spool.count == 2 and spool.size == path.stat().st_size < size
    await spool.append("inbox", "k6", 6)  # appends go to the new file
    assert [r.key for r in await spool.read_all()] == ["k4", "k5", "k6"]
    await spool.drop(10)
    assert spool.count == 0 and spool.size == 0 == path.stat().st_size
    await spool.aclose()
    reopened = Spool(path, max_bytes=1 << 20)
    await reopened.open()
    assert reopened.count == 0
    await reopened.aclose()


@pytest.mark.parametrize("cut", [1, HEADER.size, HEADER.size + 3])
async def test_torn_last_record_is_cut_off(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "spool"
    spool = Spool(path, max_bytes=1 << 20)
    await spool.open()
    for n in range(3):
        await spool.append("inbox", f"k{n}", n)
    await spool.aclose()
    good = path.stat().st_size
    torn = encode_frame(SpoolRecord(seq=4, kind="inbox", key="k3", payload=3))[:cut]
    path.write_bytes(path.read_bytes() + torn)  # a crash in the middle of the fourth append

    again = Spool(path, max_bytes=1 << 20)
    await again.open()
    assert again.count == 3 and again.torn_bytes == cut
    assert path.stat().st_size == good
    assert (await again.append("inbox", "k3", 3)).seq == 4
    assert [r.key for r in await again.read_all()] == ["k0", "k1", "k2", "k3"]
    await again.aclose()


async def test_corrupt_last_record_is_cut_off(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = Spool(path, max_bytes=1 << 20)
    await spool.open()
    await spool.append("inbox", "k0", 0)
    await spool.append("inbox", "k1", "x" * 20)
    await spool.aclose()
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte in the last payload: the checksum no longer matches
    path.write_bytes(bytes(data))
    again = Spool(path, max_bytes=1 << 20)
    await again.open()
    assert [r.key for r in await again.peek(5)] == ["k0"]
    assert again.torn_bytes > 0
    await again.aclose()


async def test_full_spool_refuses_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = Spool(path, max_bytes=100)
    await spool.open()
    appended = 0
    with pytest.raises(SpoolFull) as caught:
        while True:
            await spool.append("inbox", f"k{appended}", "payload")
            appended += 1
    assert isinstance(caught.value, LoadShed)
    assert appended > 0 and spool.count == appended
    assert path.stat().st_size == spool.size <= 100
    await spool.drop(1)  # room again
    await spool.append("inbox", "again", "payload")
    await spool.aclose()


async def test_closed_spool_refuses(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", max_bytes=100)
    with pytest.raises(RuntimeError, match="not open"):
        await spool.append("inbox", "k", 1)


ROOT = Path(__file__).resolve().parents[2]
_CHILD = """
import sys, trio
from providers.spool import Spool

async def main() -> None:
    spool = Spool(sys.argv[1], max_bytes=1 << 24)
    await spool.open()
    n = 0
    while True:
        await spool.append("inbox", f"k{n}", {"n": n, "pad": "x" * 300})
        print(n, flush=True)  # acknowledged: on disk
        n += 1

trio.run(main)
"""


async def test_a_killed_process_loses_no_acknowledged_record(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", _CHILD, str(path)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stdout is not None
    seen = b""
    with trio.fail_after(20):
        while seen.count(b"\n") < 50:
            chunk = await process.stdout.receive_some()
            assert chunk, "the child died"
            seen += chunk
    process.kill()  # SIGKILL, wherever it is: maybe in the middle of a write
    await process.wait()
    seen += await process.stdout.receive_some()
    acknowledged = [int(line) for line in seen.split(b"\n")[:-1]]

    spool = Spool(path, max_bytes=1 << 24)
    await spool.open()
    records = await spool.peek(1 << 20)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert [r.key for r in records][: len(acknowledged)] == [f"k{n}" for n in acknowledged]
    assert len(records) - len(acknowledged) <= 1  # at most one written but not acknowledged
    await spool.aclose()
