"""Upload admission: attachments streamed to the blob store, never past their cap (row 17).

Two pieces, wired by :mod:`supervisors.attachments`:

* :class:`UploadAdmission`, the actor (child id ``upload_admission``): it registers
  each stored upload (its ``pending`` row, as the tenant, then :class:`Submit` to
  the scanner pool), counts uploads refused for their size
  (``triage_upload_oversize_rejected_total``, fed to row 17's count-in-window
  detector) and holds the "backed up" limit the scanner pool sets while row 8
  fires (:class:`SetBackedUp`);
* :class:`UploadApi`, the ASGI app mounted at ``[uploads] path`` (default
  ``/v1/attachments``), which streams each body in the request's own task and
  asks the actor only to register it.

Routes::

    POST {path}/upload-urls        {"tenant_id", "filename"?, "content_type"?, "max_bytes"?}
                                   -> 201 {"attachment_id", "upload_url", "download_url",
                                           "expires", "max_bytes"}
    PUT  {path}/{tenant}/{id}?expires&max_bytes&signature     the bytes -> 202 pending
    GET  {path}/{tenant}/{id}?expires&max_bytes=0&signature   200 the bytes, once clean

A pre-signed URL (:mod:`providers.presigned`) is signed over its method, path,
expiry and byte cap, and its cap is at most ``max_upload_bytes``: the same cap
whether the client asks for a URL or not. An upload is checked cheapest first,
and every refusal is ``{"error": code, "message": ..., "limit"?: n}`` with nothing
stored (no blob, no temporary file, no row):

======================================================  ====  =========================
not a tenant/attachment path, another method            404 / 405
no / a malformed signature parameter                    401   signature_required
a signature that does not match (forged, tampered)      403   bad_signature
an expired URL                                          403   url_expired
the actor is not running                                503   not_ready
``Content-Length`` not a number                         400   invalid_content_length
``Content-Length`` over the cap (URL's, else global)    413   payload_too_large (at once,
                                                              nothing read)
... over ``backed_up_max_bytes`` while row 8 fires       503   scanner_backed_up
                                                              (Retry-After)
the streamed bytes pass the cap (chunked, or a lying    413   payload_too_large (reading
``Content-Length``)                                           stops at the cap)
... pass ``backed_up_max_bytes`` while row 8 fires       503   scanner_backed_up
this attachment was uploaded already                    409   already_uploaded
the tenant does not exist                               404   unknown_tenant
the database is unreachable                             503   database_unavailable
stored and registered                                   202   {"attachment_id", "status":
                                                              "pending", "size_bytes",
                                                              "sha256"}
======================================================  ====  =========================

Bytes are counted as they arrive; the body is never buffered (the blob store
writes each chunk as it comes, and stops at the cap). A download is refused
(``GET``) unless the scan said clean: 409 ``scan_pending``, 403 ``quarantined``
(infected: the blob is in quarantine), 422 ``scan_failed``, 404 ``not_found``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import uuid
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any, Final

import asyncpg
import msgspec
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, HTTPScope, Scope
from prometheus_client import CollectorRegistry, Counter

from actors.scanner_pool import ScannerMessage, Submit
from config.catalog import Catalog, alert_name, row_detector
from config.schema import DetectorConfig, MailboxConfig, TriageConfig, UploadsConfig, engine_kwargs
from engine.actor import Actor, ActorRef, Overflow, actor_child
from engine.detectors import CountInWindowDetector, make_detector
from engine.errors import ActorError, LoadShed, ProviderError, TriageError
from engine.metrics import families
from providers.asgi import (
    BodyTooLarge,
    ClientDisconnected,
    declared_length,
    header_value,
    read_body,
    respond,
    send_json,
    serve_scope,
)
from providers.blobstore import BlobExists, BlobNotFound, BlobStore, BlobTooLarge
from providers.bridge import run
from providers.db.attachments import (
    AttachmentRow,
    AttachmentStatus,
    NewAttachment,
    PendingScan,
    get_attachment,
    insert_attachment,
)
from providers.presigned import PresignError, SignedUrl, UrlSigner

if TYPE_CHECKING:
    from engine.deadlines import Deadlines
    from engine.metrics import Metrics
    from engine.runtime import Runtime
    from engine.supervisor import ChildSpec, Restart

__all__ = [
    "DETECTOR_OVERRIDE",
    "ROW",
    "AdmissionMessage",
    "AdmissionStatistics",
    "Oversize",
    "Register",
    "Registered",
    "SetBackedUp",
    "UploadAdmission",
    "UploadApi",
    "UploadRefused",
    "build_detector",
    "detector_config",
    "upload_admission_child",
]

log = logging.getLogger("triage.uploads")

ROW = 17
DETECTOR_OVERRIDE = "upload_oversize"
_UPLOAD_URLS: Final = "upload-urls"


class UploadRefused(TriageError):
    """An upload or download refused at the door; ``status``/``code`` are its answer."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        limit: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.limit = limit
        self.retry_after_s = retry_after_s

    def body(self) -> bytes:
        fields: dict[str, object] = {"error": self.code, "message": str(self)}
        if self.limit is not None:
            fields["limit"] = self.limit
        return msgspec.json.encode(fields)


# -- the actor ----------------------------------------------------------------------------


class Register(msgspec.Struct, frozen=True, tag=True):
    """Write the pending row of a stored upload and hand it to the scanner pool."""

    row: NewAttachment


class Registered(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to :class:`Register`: ``ok``, or the refusal's status and code."""

    ok: bool
    status: int = 202
    code: str = ""
    message: str = ""


class Oversize(msgspec.Struct, frozen=True, tag=True):
    """An upload was refused for its size (counted, fed to row 17's detector)."""

    declared: int | None
    limit: int


class SetBackedUp(msgspec.Struct, frozen=True, tag=True):
    """From the scanner pool: refuse uploads over ``limit`` bytes (None: no longer)."""

    limit: int | None


AdmissionMessage = Register | Oversize | SetBackedUp


class AdmissionStatistics(msgspec.Struct, frozen=True, kw_only=True):
    registered: int
    duplicates: int
    oversize: int
    backed_up_limit: int | None
    submit_deferred: int  # the pool's mailbox was full: the row waits for its reload


class _UploadMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.oversize = Counter(
            "triage_upload_oversize_rejected_total",
            "Uploads refused with 413 for exceeding the size cap",
            registry=registry,
        )
        self.registered = Counter(
            "triage_uploads_registered_total", "Uploads stored and registered", registry=registry
        )


def _upload_metrics(registry: CollectorRegistry) -> _UploadMetrics:
    return families(registry, _UploadMetrics)


def detector_config(config: TriageConfig, catalog: Catalog) -> DetectorConfig:
    """Row 17's detector: ``[detectors.upload_oversize]`` if set, else the catalog row's."""
    return row_detector(config, catalog, ROW, DETECTOR_OVERRIDE)


def build_detector(
    config: TriageConfig, catalog: Catalog, *, runtime: Runtime | None = None
) -> CountInWindowDetector:
    common: dict[str, Any] = {}
    if runtime is not None:
        common = {"clock": runtime.clock, "events": runtime.events, "metrics": runtime.metrics}
    return make_detector(
        alert_name(catalog.row(ROW)), row=ROW, **engine_kwargs(detector_config(config, catalog)),
        **common,
    ).expect(CountInWindowDetector)  # fmt: skip


class UploadAdmission(Actor[AdmissionMessage]):
    """The admission actor; see the module docstring."""

    name = "upload_admission"

    def __init__(
        self,
        *,
        pool: asyncpg.Pool[asyncpg.Record],
        scanner: ActorRef[ScannerMessage] | None,
        detector: CountInWindowDetector | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.pool = pool
        self.scanner = scanner
        self.detector = detector
        self.registered = 0
        self.duplicates = 0
        self.oversize = 0
        self.deferred = 0
        self.backed_up_limit: int | None = None
        self._metrics = _upload_metrics(registry) if registry is not None else None

    def statistics(self) -> AdmissionStatistics:
        return AdmissionStatistics(
            registered=self.registered,
            duplicates=self.duplicates,
            oversize=self.oversize,
            backed_up_limit=self.backed_up_limit,
            submit_deferred=self.deferred,
        )

    async def handle(self, message: AdmissionMessage) -> Registered | None:
        match message:
            case Register(row=row):
                return await self._register(row)
            case Oversize(declared=declared, limit=limit):
                self.oversize += 1
                if self._metrics is not None:
                    self._metrics.oversize.inc()
                if self.detector is not None:
                    self.detector.observe()
                log.info("upload refused: over %d bytes (declared %s)", limit, declared)
            case SetBackedUp(limit=limit):
                self.backed_up_limit = limit
        return None

    async def _register(self, row: NewAttachment) -> Registered:
        try:
            inserted = await run(insert_attachment, self.pool, row, service="postgres")
        except ProviderError as exc:
            return Registered(ok=False, status=503, code="database_unavailable", message=str(exc))
        except asyncpg.ForeignKeyViolationError:
            return Registered(
                ok=False, status=404, code="unknown_tenant", message=f"no tenant {row.tenant_id}"
            )
        if not inserted:
            self.duplicates += 1
            return Registered(
                ok=False, status=409, code="already_uploaded",
                message=f"attachment {row.id} was uploaded already",
            )  # fmt: skip
        self.registered += 1
        if self._metrics is not None:
            self._metrics.registered.inc()
        scan = PendingScan(
            id=row.id, tenant_id=row.tenant_id, blob_key=row.blob_key, size_bytes=row.size_bytes
        )
        if self.scanner is not None:
            try:
                self.scanner.tell_nowait(Submit(scan))
            except (LoadShed, ActorError):  # the row is pending: the pool's reload finds it
                self.deferred += 1
        return Registered(ok=True)


def upload_admission_child(
    *,
    pool: asyncpg.Pool[asyncpg.Record],
    scanner: ActorRef[ScannerMessage] | None,
    mailbox: MailboxConfig,
    shutdown_s: float,
    detector: CountInWindowDetector | None = None,
    registry: CollectorRegistry | None = None,
    restart: Restart | None = None,
    deadlines: Deadlines | None = None,
    metrics: Metrics | None = None,
) -> tuple[ChildSpec, ActorRef[AdmissionMessage]]:
    """The actor's child spec (id ``upload_admission``) and ref, its mailbox from ``mailbox``."""
    factory = functools.partial(
        UploadAdmission, pool=pool, scanner=scanner, detector=detector, registry=registry
    )
    return actor_child(
        UploadAdmission.name, factory, capacity=mailbox.capacity,
        overflow=Overflow(mailbox.overflow), restart=restart, shutdown_s=shutdown_s,
        deadlines=deadlines, metrics=metrics,
    )  # fmt: skip


# -- the front ----------------------------------------------------------------------------


class _UrlRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tenant_id: uuid.UUID
    filename: str = ""
    content_type: str = "application/octet-stream"
    max_bytes: int | None = None


class _UrlAnswer(msgspec.Struct, frozen=True):
    attachment_id: uuid.UUID
    upload_url: str
    download_url: str
    expires: int
    max_bytes: int


class _Stored(msgspec.Struct, frozen=True):
    attachment_id: uuid.UUID
    status: str
    size_bytes: int
    sha256: str


def _refused(status: int, code: str, message: str, **extra: Any) -> UploadRefused:
    return UploadRefused(status, code, message, **extra)


class UploadApi:
    """The ASGI app of the upload routes (see the module docstring). Holds no state."""

    def __init__(
        self,
        *,
        config: UploadsConfig,
        admission: ActorRef[AdmissionMessage],
        blobs: BlobStore,
        pool: asyncpg.Pool[asyncpg.Record],
        signer: UrlSigner,
        wall: Callable[[], float],
    ) -> None:
        self.config = config
        self.path = config.path.rstrip("/")
        self.admission = admission
        self.blobs = blobs
        self.pool = pool
        self.signer = signer
        self.wall = wall

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        await serve_scope(scope, receive, send, self._http)

    async def _http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        try:
            await self._route(scope, receive, send)
        except UploadRefused as exc:
            await _answer(send, exc)
        except ClientDisconnected:
            return  # nobody to answer; nothing was kept

    async def _route(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        path = scope["path"]
        rest = path[len(self.path) :].strip("/") if path.startswith(self.path) else None
        method = scope["method"]
        if rest == _UPLOAD_URLS:
            if method != "POST":
                raise _refused(405, "method_not_allowed", f"{method} is not allowed; use POST")
            await self._issue(scope, receive, send)
            return
        parts = (rest or "").split("/")
        if rest is None or len(parts) != 2:
            raise _refused(404, "not_found", f"nothing at {path[:200]!r}")
        try:
            tenant, attachment = uuid.UUID(parts[0]), uuid.UUID(parts[1])
        except ValueError:
            raise _refused(404, "not_found", f"nothing at {path[:200]!r}") from None
        canonical = f"{self.path}/{tenant}/{attachment}"
        if method == "PUT":
            await self._upload(scope, receive, send, canonical, tenant, attachment)
        elif method in ("GET", "HEAD"):
            await self._download(scope, send, canonical, tenant, attachment)
        else:
            raise _refused(405, "method_not_allowed", f"{method} is not allowed; use PUT or GET")

    # -- issuing URLs -------------------------------------------------------------------

    async def _issue(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        try:
            data = await read_body(receive, max_bytes=self.config.max_body_bytes)
        except BodyTooLarge as exc:
            raise _refused(413, "payload_too_large", str(exc)) from exc
        try:
            request = msgspec.json.decode(data, type=_UrlRequest)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise _refused(400, "invalid_request", f"not an upload-URL request: {exc}") from exc
        cap = self.config.max_upload_bytes
        wanted = cap if request.max_bytes is None else request.max_bytes
        if wanted < 1:
            raise _refused(400, "invalid_request", "max_bytes must be at least 1")
        if wanted > cap:
            raise _refused(
                413, "payload_too_large", f"max_bytes {wanted} is over the cap of {cap} bytes",
                limit=cap,
            )  # fmt: skip
        attachment = uuid.uuid4()
        path = f"{self.path}/{request.tenant_id}/{attachment}"
        expires = math.floor(self.wall() + self.config.url_lifetime_s)
        upload = SignedUrl(method="PUT", path=path, expires=expires, max_bytes=wanted)
        download = SignedUrl(method="GET", path=path, expires=expires, max_bytes=0)
        body = _UrlAnswer(
            attachment_id=attachment, upload_url=self.signer.sign(upload),
            download_url=self.signer.sign(download), expires=expires, max_bytes=wanted,
        )  # fmt: skip
        await send_json(send, 201, msgspec.json.encode(body))

    # -- uploading ----------------------------------------------------------------------

    def _verify(self, method: str, scope: HTTPScope, path: str) -> SignedUrl:
        try:
            return self.signer.verify(method, path, scope["query_string"], now=self.wall())
        except PresignError as exc:
            raise _refused(exc.http_status, exc.code, str(exc)) from exc

    async def _upload(
        self,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        path: str,
        tenant: uuid.UUID,
        attachment: uuid.UUID,
    ) -> None:
        grant = self._verify("PUT", scope, path)
        stats = self.admission.statistics()
        if stats is None:
            raise _refused(503, "not_ready", "upload admission is not running",
                           retry_after_s=self.config.retry_after_s)  # fmt: skip
        cap = min(grant.max_bytes, self.config.max_upload_bytes)
        backed_up: int | None = stats.backed_up_limit
        try:
            declared = declared_length(scope)
        except ValueError as exc:
            raise _refused(400, "invalid_content_length", str(exc)) from exc
        if declared is not None and declared > cap:
            await self._oversize(declared, cap)
            await _drain(receive, declared, self.config.drain_max_bytes)
            raise _refused(413, "payload_too_large",
                           str(BodyTooLarge(cap, declared=declared)), limit=cap)  # fmt: skip
        if backed_up is not None and declared is not None and declared > backed_up:
            await _drain(receive, declared, self.config.drain_max_bytes)
            raise self._backed_up(backed_up)
        limit = cap if backed_up is None else min(cap, backed_up)
        key = f"{tenant}/{attachment}"
        try:
            async with contextlib.aclosing(_body(receive)) as body:
                info = await self.blobs.put(key, body, max_bytes=limit)
        except BlobTooLarge as exc:
            if exc.received > cap:
                await self._oversize(declared, cap)
                raise _refused(413, "payload_too_large", str(BodyTooLarge(cap)), limit=cap) from exc
            assert backed_up is not None
            raise self._backed_up(backed_up) from exc
        except BlobExists as exc:
            raise _refused(409, "already_uploaded", str(exc)) from exc
        media = header_value(scope, b"content-type") or "application/octet-stream"
        name = header_value(scope, b"x-filename") or ""
        row = NewAttachment(
            id=attachment, tenant_id=tenant, blob_key=key, filename=name[:255],
            content_type=media[:255], size_bytes=info.size, sha256=info.sha256,
        )  # fmt: skip
        try:
            answer: Registered = await self.admission.ask(
                Register(row), timeout_s=self.config.ask_timeout_s
            )
        except (ActorError, LoadShed) as exc:
            await self.blobs.delete(key)
            raise _refused(503, "not_ready", f"upload not registered: {exc}",
                           retry_after_s=self.config.retry_after_s) from exc  # fmt: skip
        if not answer.ok:
            if answer.code != "already_uploaded":
                await self.blobs.delete(key)  # nothing kept for a refused upload
            retry = self.config.retry_after_s if answer.status == 503 else None
            raise _refused(answer.status, answer.code, answer.message, retry_after_s=retry)
        stored = _Stored(attachment_id=attachment, status="pending", size_bytes=info.size,
                         sha256=info.sha256)  # fmt: skip
        await send_json(send, 202, msgspec.json.encode(stored))

    async def _oversize(self, declared: int | None, limit: int) -> None:
        try:
            self.admission.tell_nowait(Oversize(declared, limit))
        except (LoadShed, ActorError):
            log.warning("upload refused for its size, not counted: the admission is busy")

    def _backed_up(self, limit: int) -> UploadRefused:
        return _refused(
            503, "scanner_backed_up",
            f"attachment scans are backed up: uploads over {limit} bytes are refused until"
            " the scan queue drains", limit=limit, retry_after_s=self.config.retry_after_s,
        )  # fmt: skip

    # -- downloading --------------------------------------------------------------------

    async def _download(
        self, scope: HTTPScope, send: ASGISendCallable, path: str, tenant: uuid.UUID,
        attachment: uuid.UUID,
    ) -> None:  # fmt: skip
        self._verify("GET", scope, path)
        try:
            row: AttachmentRow | None = await run(
                get_attachment, self.pool, tenant, attachment, service="postgres"
            )
        except ProviderError as exc:
            raise _refused(503, "database_unavailable", str(exc),
                           retry_after_s=self.config.retry_after_s) from exc  # fmt: skip
        if row is None:
            raise _refused(404, "not_found", f"no attachment {attachment}")
        if row.status is AttachmentStatus.PENDING:
            raise _refused(409, "scan_pending", "the attachment has not been scanned yet",
                           retry_after_s=self.config.retry_after_s)  # fmt: skip
        if row.status is AttachmentStatus.INFECTED:
            raise _refused(
                403, "quarantined", f"the attachment is infected ({row.signature}) and quarantined"
            )
        if row.status is AttachmentStatus.FAILED:
            raise _refused(
                422, "scan_failed", f"the attachment could not be scanned: {row.last_error}"
            )
        await self._stream(scope, send, row)

    async def _stream(self, scope: HTTPScope, send: ASGISendCallable, row: AttachmentRow) -> None:
        chunks = self.blobs.get(row.blob_key, chunk_bytes=self.config.download_chunk_bytes)
        try:
            first = b"" if scope["method"] == "HEAD" else await anext(chunks, b"")
        except BlobNotFound as exc:
            raise _refused(404, "not_found", f"the blob of {row.id} is gone") from exc
        headers = [
            (b"content-type", row.content_type.encode("latin-1", "replace")),
            (b"content-length", str(row.size_bytes).encode()),
            (b"cache-control", b"no-store"),
            (b"x-content-sha256", row.sha256.encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if scope["method"] == "HEAD":
            await chunks.aclose()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        try:
            await send({"type": "http.response.body", "body": first, "more_body": True})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            await chunks.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _body(receive: ASGIReceiveCallable) -> AsyncGenerator[bytes, None]:
    """The request body as it arrives; :class:`ClientDisconnected` if the client left."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client disconnected while sending the body")
        if message["type"] != "http.request":
            continue
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _drain(receive: ASGIReceiveCallable, declared: int, max_bytes: int) -> None:
    """Read away (constant memory) a refused body of at most ``max_bytes``, so the answer
    reaches a client that sends it anyway; a larger one is left (the connection closes)."""
    if declared > max_bytes:
        return
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def _answer(send: ASGISendCallable, refused: UploadRefused) -> None:
    extra: list[tuple[bytes, bytes]] = []
    if refused.status == 405:
        extra.append((b"allow", b"GET, PUT, POST"))
    if refused.retry_after_s is not None:
        extra.append((b"retry-after", str(max(1, math.ceil(refused.retry_after_s))).encode()))
    await respond(send, refused.status, refused.body(), b"application/json", extra_headers=extra)
