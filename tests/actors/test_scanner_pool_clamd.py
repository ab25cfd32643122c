"""The scanner pool against a real clamd (the tests' signatures) and real PostgreSQL.

Rows written ``pending`` before the pool starts are reloaded from the database (as
after a restart) and scanned through clamd's INSTREAM: clean stays served-able,
EICAR and the test pattern are infected and quarantined, a blob over clamd's
StreamMaxLength is retried and ends ``failed`` with the size-limit error -- never
clean.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import trio

from actors.scanner_pool import DbScanStore, ScannerStatistics, scanner_pool_child
from bench.chaos.fixtures import create_tenants
from config.schema import ScannerConfig
from providers.blobstore import LocalBlobStore
from providers.bridge import run
from providers.clamd import ClamdClient
from providers.db import DAEMON_ROLE, migrate
from providers.db.attachments import NewAttachment, insert_attachment
from providers.embedded_clamd import EmbeddedClamd
from providers.services import postgres_url_with
from tests.clamd_fixture import EICAR, STREAM_MAX_BYTES, TEST_PATTERN


async def _rows(url: str) -> dict[uuid.UUID, asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT id, status, signature, scan_attempts, last_error FROM attachments"
        )
        return {r["id"]: r for r in rows}
    finally:
        await conn.close()


async def one(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def test_pending_rows_are_scanned_by_clamd_after_a_restart(
    bridge: object, postgres_url: str, clamd_server: EmbeddedClamd, tmp_path: Path
) -> None:
    await migrate(postgres_url)
    [tenant] = await run(create_tenants, postgres_url, 1)
    create = functools.partial(
        asyncpg.create_pool, postgres_url_with(postgres_url, user=DAEMON_ROLE), min_size=1,
        max_size=2,
    )  # fmt: skip
    pool: asyncpg.Pool[asyncpg.Record] = await run(create)
    blobs = LocalBlobStore(tmp_path, fsync=False)
    files = {
        "clean": b"a clean note\n" * 1000,
        "eicar": EICAR,
        "pattern": b"z" * 70_000 + TEST_PATTERN + b"z" * 10,
        "too_big": b"q" * (STREAM_MAX_BYTES + 1),
    }
    ids: dict[str, uuid.UUID] = {}
    try:
        for name, data in files.items():
            ids[name] = attachment = uuid.uuid4()
            key = f"{tenant}/{attachment}"
            info = await blobs.put(key, one(data), max_bytes=len(data))
            row = NewAttachment(id=attachment, tenant_id=tenant, blob_key=key, filename=name,
                                content_type="application/octet-stream", size_bytes=info.size,
                                sha256=hashlib.sha256(data).hexdigest())  # fmt: skip
            assert await run(insert_attachment, pool, row) is True
        config = ScannerConfig(poll_interval_s=0.05, retry_backoff_s=0.05, max_attempts=2,
                               chunk_bytes=8192, scan_timeout_s=10.0)  # fmt: skip
        clamd = ClamdClient(clamd_server.address, connect_timeout_s=2.0, timeout_s=10.0,
                            chunk_bytes=config.chunk_bytes, command_timeout_s=2.0)  # fmt: skip
        spec, ref = scanner_pool_child(
            scanner=clamd, blobs=blobs, store=DbScanStore(pool), config=config,
            backed_up_max_bytes=1, capacity=100, shutdown_s=2.0,
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            await nursery.start(spec.start)
            with trio.fail_after(30):  # a guard, not a measurement
                while True:
                    rows = await run(_rows, postgres_url)
                    if all(r["status"] != "pending" for r in rows.values()):
                        break
                    await trio.sleep(0.05)
            stats: ScannerStatistics = ref.statistics()
            nursery.cancel_scope.cancel()
    finally:
        await run(pool.close)

    clean, eicar, pattern, big = (rows[ids[n]] for n in ("clean", "eicar", "pattern", "too_big"))
    assert (clean["status"], clean["signature"], clean["scan_attempts"]) == ("clean", None, 0)
    assert (eicar["status"], eicar["signature"]) == ("infected", "Triage.Test.EICAR.UNOFFICIAL")
    assert (pattern["status"], pattern["signature"]) == (
        "infected",
        "Triage.Test.Pattern.UNOFFICIAL",
    )
    assert (big["status"], big["scan_attempts"]) == ("failed", 2)
    assert "ScanSizeLimit" in big["last_error"]
    for name in ("eicar", "pattern"):
        key = f"{tenant}/{ids[name]}"
        assert await blobs.quarantined(key) and not await blobs.exists(key)
    assert await blobs.exists(f"{tenant}/{ids['clean']}")
    assert (stats.clean, stats.infected, stats.failed, stats.retries) == (1, 2, 1, 1)
