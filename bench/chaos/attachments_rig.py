"""What scenarios 8 and 17 (and the attachment tests) run on: the daemon's attachment wiring
against a real PostgreSQL and a real clamd, served over HTTP.

:func:`open_attachments` starts an embedded PostgreSQL (migrated, ``tenants``
tenants), an embedded clamd (Debian's clamav-daemon with the shipped EICAR
signature, ``max_threads`` / ``max_queue`` / StreamMaxLength from ``[scanner]``),
builds :func:`supervisors.attachments.build_attachments` exactly as the daemon
does, with a blob store in a temporary directory, runs its children under a
supervisor and serves the routes on a free port with the daemon's HTTP server.
Everything stops when the block exits.
"""

from __future__ import annotations

import functools
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import trio
from prometheus_client import CollectorRegistry

from bench.chaos.fixtures import create_tenants
from config import Catalog, TriageConfig
from engine.detectors import DetectorSet
from engine.events import Event
from engine.metrics import Metrics
from engine.runtime import Runtime, open_runtime
from engine.supervisor import Supervisor
from providers.bridge import open_bridge, run
from providers.db import DAEMON_ROLE, migrate
from providers.embedded import EmbeddedPostgres
from providers.embedded_clamd import EmbeddedClamd, shipped_signatures
from providers.presigned import random_secret
from providers.services import postgres_url_with
from supervisors.attachments import Attachments, build_attachments
from supervisors.http import HealthApp, HttpServer

__all__ = ["EICAR", "AttachmentsRig", "Upload", "database_rows", "open_attachments"]

FAST_POSTGRES = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
#: The EICAR standard antivirus test file: the shipped signature finds it.
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


class _Ready:
    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return True, {"status": "ready"}


@dataclass
class Upload:
    """One upload's answer: the HTTP status, the JSON body and the attachment id."""

    status: int
    body: dict[str, Any]
    attachment: uuid.UUID | None
    headers: httpx.Headers


@dataclass
class AttachmentsRig:
    config: TriageConfig
    postgres: EmbeddedPostgres
    clamd: EmbeddedClamd
    pool: asyncpg.Pool[asyncpg.Record]
    tenants: list[uuid.UUID]
    runtime: Runtime
    attachments: Attachments
    detectors: DetectorSet
    client: httpx.AsyncClient
    blob_root: Path
    registry: CollectorRegistry
    events: list[Event] = field(default_factory=list)

    async def upload_url(
        self, tenant: uuid.UUID, *, max_bytes: int | None = None
    ) -> httpx.Response:
        body: dict[str, Any] = {"tenant_id": str(tenant), "filename": "note.txt"}
        if max_bytes is not None:
            body["max_bytes"] = max_bytes
        return await self.client.post(f"{self.config.uploads.path}/upload-urls", json=body)

    async def upload(
        self, tenant: uuid.UUID, data: bytes, *, chunked: bool = False, max_bytes: int | None = None
    ) -> Upload:
        """Ask for a URL, then PUT ``data`` (``chunked``: without Content-Length)."""
        issued = await self.upload_url(tenant, max_bytes=max_bytes)
        if issued.status_code != 201:
            return Upload(issued.status_code, issued.json(), None, issued.headers)
        url = issued.json()
        content: Any = data
        if chunked:

            async def stream() -> AsyncIterator[bytes]:
                step = 16384
                for start in range(0, len(data), step):
                    yield data[start : start + step]

            content = stream()
        answer = await self.client.put(url["upload_url"], content=content)
        return Upload(answer.status_code, answer.json(), uuid.UUID(url["attachment_id"]),
                      answer.headers)  # fmt: skip

    async def put_raw(
        self, url: str, *, declared: int | None, body: bytes = b"", chunk_bytes: int = 16384
    ) -> tuple[int, dict[str, Any]]:
        """PUT over a plain socket: ``declared`` as ``Content-Length`` (None: chunked), then
        ``body`` (for a declared length, possibly none of it: the answer must come at
        once). The status and JSON body of the answer."""
        port = int(str(self.client.base_url).rsplit(":", 1)[1].rstrip("/"))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            head = f"PUT {url} HTTP/1.1\r\nHost: triage\r\nConnection: close\r\n"
            head += (f"Content-Length: {declared}\r\n" if declared is not None
                     else "Transfer-Encoding: chunked\r\n")  # fmt: skip
            await stream.send_all(head.encode() + b"\r\n")
            try:
                if declared is not None:
                    await stream.send_all(body)
                else:
                    for start in range(0, len(body), chunk_bytes):
                        piece = body[start : start + chunk_bytes]
                        await stream.send_all(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                    await stream.send_all(b"0\r\n\r\n")
            except trio.BrokenResourceError:
                pass  # the server answered and closed before taking it all
            received = b""
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not chunk:
                    break
                received += chunk
        head_bytes, _, payload = received.partition(b"\r\n\r\n")
        status = int(head_bytes.split(b" ", 2)[1])
        return status, msgspec.json.decode(payload) if payload else {}

    def download_url(self, tenant: uuid.UUID, attachment: uuid.UUID) -> str:
        from providers.presigned import SignedUrl

        path = f"{self.config.uploads.path}/{tenant}/{attachment}"
        expires = int(time.time() + self.config.uploads.url_lifetime_s)
        signed = SignedUrl(method="GET", path=path, expires=expires, max_bytes=0)
        return self.attachments.signer.sign(signed)


async def database_rows(url: str) -> list[asyncpg.Record]:
    """Every attachment row (read as the owner, across tenants): asyncio side."""
    conn = await asyncpg.connect(url)
    try:
        return list(
            await conn.fetch(
                "SELECT id, tenant_id, status, signature, sha256, size_bytes, scan_attempts,"
                " last_error FROM attachments"
            )
        )
    finally:
        await conn.close()


@asynccontextmanager
async def open_attachments(
    config: TriageConfig, catalog: Catalog, *, tenants: int = 2, pool_max: int = 4
) -> AsyncIterator[AttachmentsRig]:
    scanner = config.scanner
    with tempfile.TemporaryDirectory(prefix="triage-blobs-") as blob_dir:
        uploads = msgspec.structs.replace(config.uploads, blob_root=blob_dir)
        config = msgspec.structs.replace(config, uploads=uploads)
        postgres = EmbeddedPostgres(settings=FAST_POSTGRES)
        clamd = EmbeddedClamd(
            database=shipped_signatures(), max_threads=scanner.embedded_max_threads,
            max_queue=scanner.embedded_max_queue,
            stream_max_bytes=scanner.embedded_stream_max_bytes,
            start_timeout_s=scanner.embedded_start_timeout_s,
        )  # fmt: skip
        try:
            async with trio.open_nursery() as starting:
                starting.start_soon(trio.to_thread.run_sync, postgres.start)
                starting.start_soon(trio.to_thread.run_sync, clamd.start)
            async with open_bridge():
                await migrate(postgres.url)
                tenant_ids = await run(create_tenants, postgres.url, tenants)
                daemon_url = postgres_url_with(postgres.url, user=DAEMON_ROLE)
                create = functools.partial(
                    asyncpg.create_pool, daemon_url, min_size=1, max_size=pool_max
                )
                pool: asyncpg.Pool[asyncpg.Record] = await run(create, service="postgres")
                try:
                    async with _serve(config, catalog, postgres, clamd, pool, tenant_ids,
                                      Path(blob_dir)) as rig:  # fmt: skip
                        yield rig
                finally:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await run(pool.close)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(clamd.close)
                await trio.to_thread.run_sync(postgres.close)


@asynccontextmanager
async def _serve(
    config: TriageConfig,
    catalog: Catalog,
    postgres: EmbeddedPostgres,
    clamd: EmbeddedClamd,
    pool: asyncpg.Pool[asyncpg.Record],
    tenants: Sequence[uuid.UUID],
    blob_root: Path,
) -> AsyncIterator[AttachmentsRig]:
    registry = CollectorRegistry()
    metrics = Metrics(registry, max_label_values=config.daemon.max_label_values)
    async with open_runtime(seed=config.daemon.seed, metrics=metrics) as runtime:
        detectors = DetectorSet()
        shutdown_s = config.supervisors["default"].shutdown_s
        attachments = build_attachments(
            config, catalog, runtime, pool, detectors, shutdown_s=shutdown_s,
            secret=random_secret(), wall=runtime.clock.wall, clamd_address=clamd.address,
        )  # fmt: skip
        assert attachments is not None, "[uploads] enabled"
        events: list[Event] = []
        unsubscribe = runtime.events.on(Event, events.append)
        app = HealthApp(readiness=_Ready(), registry=registry, mounts=attachments.mounts)
        http = HttpServer(app, host="127.0.0.1", port=0, graceful_timeout_s=shutdown_s,
                          limits=config.daemon.http)  # fmt: skip
        supervisor = Supervisor(
            "attachments", attachments.specs, shutdown_s=shutdown_s, runtime=runtime
        )
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(supervisor.run)
                await nursery.start(http.run)
                base = f"http://127.0.0.1:{http.port}"
                async with httpx.AsyncClient(base_url=base, timeout=30.0) as client:
                    yield AttachmentsRig(
                        config=config, postgres=postgres, clamd=clamd, pool=pool,
                        tenants=list(tenants), runtime=runtime, attachments=attachments,
                        detectors=detectors, client=client, blob_root=blob_root,
                        registry=registry, events=events,
                    )  # fmt: skip
                http.shutdown()
                nursery.cancel_scope.cancel()
        finally:
            unsubscribe()
