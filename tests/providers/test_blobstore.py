"""The local blob store: atomic streamed puts, refused keys, quarantine (real files, tmp dir)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from providers.blobstore import (
    BlobExists,
    BlobKeyInvalid,
    BlobNotFound,
    BlobTooLarge,
    LocalBlobStore,
    check_key,
)


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await trio.lowlevel.checkpoint()
        yield part


async def read_all(store: LocalBlobStore, key: str) -> bytes:
    return b"".join([c async for c in store.get(key, chunk_bytes=3)])


async def test_put_get_roundtrip_reports_size_and_sha256(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store", fsync=False)
    assert not (tmp_path / "store").exists()  # nothing made before the first write
    info = await store.put("t1/a1", chunks(b"hello ", b"world"), max_bytes=11)
    assert (info.key, info.size, info.sha256) == (
        "t1/a1",
        11,
        hashlib.sha256(b"hello world").hexdigest(),
    )
    assert await read_all(store, "t1/a1") == b"hello world"
    assert await store.exists("t1/a1")
    assert store.temporary_files() == []


async def test_put_over_the_cap_keeps_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path, fsync=False)
    with pytest.raises(BlobTooLarge) as caught:
        await store.put("t1/big", chunks(b"x" * 8, b"y" * 8), max_bytes=10)
    assert (caught.value.limit, caught.value.received) == (10, 16)
    assert not await store.exists("t1/big")
    assert store.temporary_files() == []


async def test_a_cancelled_put_leaves_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path, fsync=False)

    async def endless() -> AsyncIterator[bytes]:
        while True:
            await trio.sleep(0.01)
            yield b"z"

    with trio.move_on_after(0.05):
        await store.put("t1/c", endless(), max_bytes=1000)
    assert not await store.exists("t1/c")
    assert store.temporary_files() == []


async def test_keys_are_written_once(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path, fsync=True)
    await store.put("k", chunks(b"first"), max_bytes=100)
    with pytest.raises(BlobExists):
        await store.put("k", chunks(b"second"), max_bytes=100)
    assert await read_all(store, "k") == b"first"
    assert store.temporary_files() == []


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a/./b",
        "a//b",
        "a\\b",
        "a\0b",
        "a b",
        ".hidden/..",
        "a/" * 9 + "b",
        "é",
    ],
)
async def test_traversal_and_odd_keys_are_refused(tmp_path: Path, key: str) -> None:
    store = LocalBlobStore(tmp_path / "root", fsync=False)
    with pytest.raises(BlobKeyInvalid):
        check_key(key)
    with pytest.raises(BlobKeyInvalid):
        await store.put(key, chunks(b"x"), max_bytes=10)
    with pytest.raises(BlobKeyInvalid):
        await store.delete(key)
    with pytest.raises(BlobKeyInvalid):
        await store.quarantine(key)
    with pytest.raises(BlobKeyInvalid):
        await read_all(store, key)
    assert not (tmp_path / "x").exists()


async def test_a_symlink_inside_cannot_lead_outside(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = LocalBlobStore(tmp_path / "root", fsync=False)
    (tmp_path / "root" / "blobs").mkdir(parents=True)
    os.symlink(outside, tmp_path / "root" / "blobs" / "evil")
    with pytest.raises(BlobKeyInvalid, match="outside"):
        await store.put("evil/x", chunks(b"x"), max_bytes=10)
    assert list(outside.iterdir()) == []


async def test_quarantine_moves_the_blob_out_of_serving(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path, fsync=False)
    await store.put("t/v", chunks(b"virus"), max_bytes=10)
    await store.quarantine("t/v")
    await store.quarantine("t/v")  # idempotent once moved
    assert not await store.exists("t/v")
    assert await store.quarantined("t/v")
    with pytest.raises(BlobNotFound):
        await read_all(store, "t/v")
    with pytest.raises(BlobNotFound):
        await store.quarantine("t/none")
    assert await store.delete("t/v")
    assert not await store.delete("t/v")
    assert not await store.quarantined("t/v")
