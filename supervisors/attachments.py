"""Attachments wired from config: blob store, clamd, scanner pool, upload admission (rows 8, 17).

:func:`build_attachments` is what the daemon's tree (and the chaos scenarios, so
they run the same wiring) calls with the database pool and the detector set:

=========================  ===================================================
piece                      from
=========================  ===================================================
blob store                 ``[uploads] blob_root`` (:class:`LocalBlobStore`)
clamd                      ``[scanner] clamd_address``; unset: an embedded clamd
                           (child ``clamd``, started before the pool) when the
                           binary exists -- Debian's clamav-daemon -- with
                           ``embedded_database`` or ``/var/lib/clamav`` (when it
                           holds a database) or the shipped EICAR signature
scanner pool (row 8)       ``[scanner]``, ``[mailboxes.scanner]``, row 8's
                           detector (``[detectors.*]`` on its metric overrides)
upload admission (row 17)  ``[uploads]``, ``[mailboxes.uploads]``, row 17's
                           detector; its HTTP routes mounted at ``[uploads] path``
signing secret             ``Endpoints.upload_secret`` (a file or the
                           environment); None (emulators, the dry build): a
                           random one for this process, logged
=========================  ===================================================

The pool tells the admission "backed up" through ``gate``: a closure over the
admission's ref (the two refs exist before either actor runs).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

import asyncpg
import trio
from hypercorn.typing import ASGIFramework

from actors.scanner_pool import ROW as SCANNER_ROW
from actors.scanner_pool import (
    DbScanStore,
    ScannerMessage,
    ScannerPool,
    scanner_pool_child,
)
from actors.scanner_pool import build_detector as scanner_detector
from actors.upload_admission import ROW as UPLOAD_ROW
from actors.upload_admission import (
    AdmissionMessage,
    SetBackedUp,
    UploadAdmission,
    UploadApi,
    upload_admission_child,
)
from actors.upload_admission import build_detector as upload_detector
from config import Catalog, ConfigProblem, TriageConfig
from config.catalog import module_path
from engine.actor import ActorRef
from engine.detectors import DetectorSet
from engine.errors import ActorError, LoadShed
from engine.runtime import Runtime
from engine.supervisor import ChildSpec, Restart
from providers.blobstore import LocalBlobStore
from providers.clamd import ClamdAddress, ClamdClient, parse_address
from providers.embedded_clamd import EmbeddedClamd, find_clamd, shipped_signatures
from providers.presigned import UrlSigner, random_secret

if TYPE_CHECKING:
    from providers.embedded import EmbeddedServer

__all__ = [
    "ATTACHMENT_MODULES",
    "ATTACHMENT_ROWS",
    "Attachments",
    "ClamdServer",
    "attachment_problems",
    "build_attachments",
    "clamd_database",
]

log = logging.getLogger("triage.attachments")

#: The actor modules wired here, as the catalog's ``module`` names them.
ATTACHMENT_MODULES: Final = frozenset(
    module_path(cls.__module__) for cls in (ScannerPool, UploadAdmission)
)
#: The rows whose detectors :func:`build_attachments` builds itself.
ATTACHMENT_ROWS: Final = frozenset({SCANNER_ROW, UPLOAD_ROW})
#: Mailbox profiles used here.
MAILBOXES: Final = ("scanner", "uploads")
_DEBIAN_DATABASE: Final = Path("/var/lib/clamav")


def attachment_problems(config: TriageConfig, source: str) -> list[ConfigProblem]:
    """The mailbox profiles this wiring needs that ``config`` lacks."""
    if not config.uploads.enabled:
        return []
    return [
        ConfigProblem(
            source=source,
            line=None,
            path=f"$.mailboxes.{name}",
            message=f"missing required profile [mailboxes.{name}] (attachments use it)",
        )
        for name in MAILBOXES
        if name not in config.mailboxes
    ]


def clamd_database(config: TriageConfig) -> Path:
    """The embedded clamd's signature directory (see the module docstring)."""
    if config.scanner.embedded_database is not None:
        return Path(config.scanner.embedded_database)
    if _DEBIAN_DATABASE.is_dir() and any(_DEBIAN_DATABASE.glob("*.c[vl]d")):
        return _DEBIAN_DATABASE
    return shipped_signatures()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ClamdServer:
    """The embedded clamd as a supervised child (id ``clamd``): started in a worker
    thread, watched every ``poll_interval_s`` (a clamd that died crashes the child,
    so its supervisor starts another on the same port), stopped when cancelled."""

    name = "clamd"

    def __init__(self, config: TriageConfig, port: int) -> None:
        self.config = config
        self.port = port
        self.server: EmbeddedServer | None = None

    @property
    def address(self) -> ClamdAddress:
        return ClamdAddress(host="127.0.0.1", port=self.port)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        scanner = self.config.scanner
        server = EmbeddedClamd(
            database=clamd_database(self.config), port=self.port,
            max_threads=scanner.embedded_max_threads, max_queue=scanner.embedded_max_queue,
            stream_max_bytes=scanner.embedded_stream_max_bytes,
            start_timeout_s=scanner.embedded_start_timeout_s,
        )  # fmt: skip
        self.server = server
        try:
            await trio.to_thread.run_sync(server.start)
            log.info("embedded clamd listening", extra={"clamd": server.url})
            task_status.started()
            # A process exit has no Trio event: it is polled, every poll_interval_s.
            while server.running:  # noqa: ASYNC110 - see above
                await trio.sleep(scanner.poll_interval_s)
            raise RuntimeError(f"embedded clamd exited; log tail:\n{server.log_tail()}")
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(server.close)
            self.server = None


@dataclass
class Attachments:
    """Everything :func:`build_attachments` wired."""

    blobs: LocalBlobStore
    clamd: ClamdClient
    scanner: ActorRef[ScannerMessage]
    admission: ActorRef[AdmissionMessage]
    api: UploadApi
    signer: UrlSigner
    embedded: ClamdServer | None = None
    specs: list[ChildSpec] = field(default_factory=list)
    mounts: dict[str, ASGIFramework] = field(default_factory=dict)


def build_attachments(
    config: TriageConfig,
    catalog: Catalog,
    runtime: Runtime,
    pool: asyncpg.Pool[asyncpg.Record],
    detectors: DetectorSet,
    *,
    shutdown_s: float,
    secret: bytes | None,
    wall: Callable[[], float],
    clamd_address: ClamdAddress | None = None,
) -> Attachments | None:
    """Wire the attachments (nothing runs yet); None when ``[uploads] enabled`` is false.

    ``clamd_address`` overrides ``[scanner] clamd_address`` (the chaos scenarios
    pass their own clamd); with neither, an embedded clamd child is wired when the
    binary exists, else the pool finds clamd unreachable (and row 8 fires).
    """
    uploads, scanner_config = config.uploads, config.scanner
    if not uploads.enabled:
        return None
    registry = runtime.metrics.registry if runtime.metrics is not None else None
    blobs = LocalBlobStore(uploads.blob_root, fsync=uploads.fsync)
    embedded: ClamdServer | None = None
    address = clamd_address
    if address is None and scanner_config.clamd_address is not None:
        address = parse_address(scanner_config.clamd_address)
    if address is None:
        if find_clamd() is not None:
            embedded = ClamdServer(config, _free_port())
            address = embedded.address
        else:
            log.error("no [scanner] clamd_address and no clamd binary: uploads stay pending")
            address = ClamdAddress(host="127.0.0.1", port=9)
    clamd = ClamdClient(
        address, connect_timeout_s=scanner_config.connect_timeout_s,
        timeout_s=scanner_config.scan_timeout_s, chunk_bytes=scanner_config.chunk_bytes,
        command_timeout_s=scanner_config.ping_timeout_s,
    )  # fmt: skip
    if secret is None:
        log.info("no upload signing secret configured: a random one for this process")
        secret = random_secret()
    signer = UrlSigner(secret)

    row8 = scanner_detector(config, catalog, runtime=runtime)
    row17 = upload_detector(config, catalog, runtime=runtime)
    detectors.add(row8)
    detectors.add(row17)

    refs: dict[str, ActorRef[AdmissionMessage]] = {}

    def gate(limit: int | None) -> None:
        admission = refs.get("admission")
        if admission is None:
            return
        try:
            admission.tell_nowait(SetBackedUp(limit))
        except (LoadShed, ActorError):
            log.warning("scanner pool: the upload admission did not take the backed-up limit")

    scanner_mailbox = config.mailboxes["scanner"]
    scanner_spec, scanner = scanner_pool_child(
        scanner=clamd, blobs=blobs, store=DbScanStore(pool), config=scanner_config,
        backed_up_max_bytes=uploads.backed_up_max_bytes, capacity=scanner_mailbox.capacity,
        shutdown_s=shutdown_s, gate=gate, detector=row8, registry=registry,
        deadlines=runtime.deadlines, metrics=runtime.metrics,
    )  # fmt: skip
    admission_spec, admission = upload_admission_child(
        pool=pool, scanner=scanner, mailbox=config.mailboxes["uploads"], shutdown_s=shutdown_s,
        detector=row17, registry=registry, deadlines=runtime.deadlines, metrics=runtime.metrics,
    )  # fmt: skip
    refs["admission"] = admission
    api = UploadApi(
        config=uploads, admission=admission, blobs=blobs, pool=pool, signer=signer, wall=wall
    )
    specs = [admission_spec, scanner_spec]
    if embedded is not None:
        clamd_spec = ChildSpec(
            id=embedded.name, start=embedded.run, restart=Restart.PERMANENT,
            shutdown_s=shutdown_s,
        )  # fmt: skip
        specs.insert(0, clamd_spec)
    return Attachments(
        blobs=blobs, clamd=clamd, scanner=scanner, admission=admission, api=api, signer=signer,
        embedded=embedded, specs=specs, mounts={uploads.path.rstrip("/") + "/": api},
    )  # fmt: skip
