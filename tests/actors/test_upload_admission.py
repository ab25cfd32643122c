"""Upload admission (row 17): every refusal path with its typed answer, against real PostgreSQL.

The ASGI app is driven directly (as tests/supervisors/test_dispatch_api.py does for
streamed refusals): the test counts how many body events the app pulled, which is
how "refused before buffering" is proven -- a declared Content-Length over the cap
is answered without reading one body byte, a streamed body is refused at the event
that passes the cap. The blob store is a real directory; nothing refused leaves a
blob, a temporary file or a row.
"""

from __future__ import annotations

import functools
import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import trio
import trio.testing
from hypercorn.typing import ASGIReceiveEvent, ASGISendEvent, HTTPScope
from prometheus_client import CollectorRegistry

from actors.scanner_pool import Submit
from actors.upload_admission import (
    Oversize,
    SetBackedUp,
    UploadApi,
    upload_admission_child,
)
from bench.chaos.fixtures import create_tenants
from config.schema import MailboxConfig, UploadsConfig
from engine.actor import ActorRef, actor_child
from engine.detectors import CountInWindowDetector
from engine.runtime import Runtime, open_runtime
from providers.blobstore import LocalBlobStore
from providers.bridge import run
from providers.db import DAEMON_ROLE, migrate
from providers.db.attachments import AttachmentStatus, ScanRecord, record_scans
from providers.presigned import SignedUrl, UrlSigner
from providers.services import postgres_url_with

NOW = 1_800_000_000.0
SECRET = b"s" * 32
CAP = 1000
BACKED_UP = 100
PATH = "/v1/attachments"


@dataclass
class World:
    api: UploadApi
    admission: ActorRef[Any]
    scanner: ActorRef[Any]
    blobs: LocalBlobStore
    pool: asyncpg.Pool[asyncpg.Record]
    tenant: uuid.UUID
    other: uuid.UUID
    signer: UrlSigner
    registry: CollectorRegistry
    detector: CountInWindowDetector
    admin_url: str
    runtime: Runtime


@pytest.fixture
async def world(bridge: object, postgres_url: str, tmp_path: Path) -> AsyncIterator[World]:
    await migrate(postgres_url)
    tenant, other = await run(create_tenants, postgres_url, 2)
    create = functools.partial(
        asyncpg.create_pool,
        postgres_url_with(postgres_url, user=DAEMON_ROLE),
        min_size=1,
        max_size=2,
    )
    pool: asyncpg.Pool[asyncpg.Record] = await run(create)
    config = UploadsConfig(
        max_upload_bytes=CAP, backed_up_max_bytes=BACKED_UP, drain_max_bytes=64,
        max_body_bytes=256, url_lifetime_s=60.0, retry_after_s=7.0, fsync=False,
    )  # fmt: skip
    registry = CollectorRegistry()
    detector = CountInWindowDetector("oversize", metric="m", threshold=2, window_s=60.0, buckets=1)
    try:
        async with open_runtime() as runtime, trio.open_nursery() as nursery:
            # The scanner pool's mailbox only: what admission submits waits there.
            _, scanner = actor_child("scanner_pool", lambda: None, capacity=10, shutdown_s=1.0)  # type: ignore[arg-type, return-value]  # the factory never runs
            spec, admission = upload_admission_child(
                pool=pool, scanner=scanner, mailbox=MailboxConfig(capacity=10, overflow="reject"),
                shutdown_s=1.0, detector=detector, registry=registry,
                deadlines=runtime.deadlines,
            )  # fmt: skip
            await nursery.start(spec.start)
            signer = UrlSigner(SECRET)
            blobs = LocalBlobStore(tmp_path / "blobs", fsync=False)
            api = UploadApi(
                config=config, admission=admission, blobs=blobs, pool=pool, signer=signer,
                wall=lambda: NOW,
            )  # fmt: skip
            yield World(api, admission, scanner, blobs, pool, tenant, other, signer, registry,
                        detector, postgres_url, runtime)  # fmt: skip
            nursery.cancel_scope.cancel()
    finally:
        await run(pool.close)


def scope(method: str, target: str, headers: list[tuple[bytes, bytes]] = ()) -> HTTPScope:  # type: ignore[assignment]  # a tuple default: never mutated
    path, _, query = target.partition("?")
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(),
        "query_string": query.encode(), "root_path": "", "headers": list(headers),
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8080), "extensions": {},
    }  # type: ignore[typeddict-item]  # no lifespan state in these tests  # fmt: skip


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    pulled: int  # body events the app received

    @property
    def json(self) -> Any:
        return msgspec.json.decode(self.body)


async def call(
    world: World, method: str, target: str, parts: list[bytes] = (),  # type: ignore[assignment]  # never mutated
    *, headers: list[tuple[bytes, bytes]] = (), endless: bool = False,  # type: ignore[assignment]  # never mutated
) -> Answer:  # fmt: skip
    sent: list[ASGISendEvent] = []
    pulled = 0

    async def receive() -> ASGIReceiveEvent:
        nonlocal pulled
        await trio.lowlevel.checkpoint()
        pulled += 1
        if endless:
            return {"type": "http.request", "body": parts[0], "more_body": True}
        index = pulled - 1
        if index >= len(parts):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": parts[index], "more_body": index < len(parts) - 1}

    async def send(event: ASGISendEvent) -> None:
        sent.append(event)

    await world.api(scope(method, target, headers), receive, send)
    start = sent[0]
    body = b"".join(e.get("body", b"") for e in sent[1:])  # type: ignore[misc]  # body events
    return Answer(start["status"], dict(start["headers"]), body, pulled)  # type: ignore[typeddict-item]  # response.start


def put_url(world: World, *, tenant: uuid.UUID | None = None, attachment: uuid.UUID | None = None,
            max_bytes: int = CAP, expires: float = NOW + 60, method: str = "PUT") -> str:  # fmt: skip
    path = f"{PATH}/{tenant or world.tenant}/{attachment or uuid.uuid4()}"
    return world.signer.sign(
        SignedUrl(method=method, path=path, expires=int(expires), max_bytes=max_bytes)
    )


def length(n: int) -> list[tuple[bytes, bytes]]:
    return [(b"content-length", str(n).encode())]


async def _count_rows(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM attachments"))
    finally:
        await conn.close()


async def settled() -> None:
    """Let the admission actor handle what was told to it."""
    await trio.testing.wait_all_tasks_blocked()


async def nothing_kept(world: World) -> None:
    assert world.blobs.temporary_files() == []
    assert await run(_count_rows, world.admin_url) == 0
    blobs = world.blobs.root / "blobs"
    assert not blobs.exists() or not any(p.is_file() for p in blobs.rglob("*"))


async def oversize_counted(world: World) -> float:
    await settled()
    return world.registry.get_sample_value("triage_upload_oversize_rejected_total") or 0.0


# -- accepted ---------------------------------------------------------------------------


async def test_an_upload_streams_to_the_store_and_is_registered_and_submitted(
    world: World,
) -> None:
    attachment = uuid.uuid4()
    data = [b"a" * 300, b"b" * 300, b"c" * 400]  # exactly the cap
    answer = await call(world, "PUT", put_url(world, attachment=attachment), data,
                        headers=[*length(1000), (b"x-filename", b"scan.pdf")])  # fmt: skip
    assert answer.status == 202
    digest = hashlib.sha256(b"".join(data)).hexdigest()
    assert answer.json == {"attachment_id": str(attachment), "status": "pending",
                           "size_bytes": 1000, "sha256": digest}  # fmt: skip
    assert await world.blobs.exists(f"{world.tenant}/{attachment}")
    assert world.scanner.queued() == 1  # Submit waits in the pool's mailbox
    stats = world.admission.statistics()
    assert (stats.registered, stats.oversize) == (1, 0)
    # Not served before its scan, then served once clean.
    download = put_url(world, attachment=attachment, method="GET", max_bytes=0)
    assert (await call(world, "GET", download)).json["error"] == "scan_pending"
    record = ScanRecord(id=attachment, tenant_id=world.tenant, status=AttachmentStatus.CLEAN)
    assert await run(record_scans, world.pool, [record]) == [True]
    served = await call(world, "GET", download)
    assert (served.status, served.body) == (200, b"".join(data))
    assert served.headers[b"x-content-sha256"] == digest.encode()


async def test_a_url_request_is_signed_with_the_cap(world: World) -> None:
    body = msgspec.json.encode({"tenant_id": str(world.tenant), "max_bytes": 500})
    answer = await call(world, "POST", f"{PATH}/upload-urls", [body])
    assert answer.status == 201
    issued = answer.json
    assert issued["max_bytes"] == 500 and issued["expires"] == int(NOW + 60)
    assert issued["upload_url"].startswith(f"{PATH}/{world.tenant}/{issued['attachment_id']}?")
    # The URL's cap is the cap: 501 bytes is over it.
    refused = await call(world, "PUT", issued["upload_url"], [b"x" * 501], headers=length(501))
    assert (refused.status, refused.json["error"], refused.json["limit"]) == (
        413,
        "payload_too_large",
        500,
    )
    assert refused.pulled == 0


# -- refused ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"max_bytes": CAP + 1}, 413, "payload_too_large"),
        ({"max_bytes": 0}, 400, "invalid_request"),
        ({"tenant_id": "not-a-uuid"}, 400, "invalid_request"),
        ({"surprise": 1}, 400, "invalid_request"),
    ],
)
async def test_bad_url_requests_are_refused(
    world: World, body: dict[str, Any], status: int, code: str
) -> None:
    payload = msgspec.json.encode({"tenant_id": str(world.tenant), **body})
    answer = await call(world, "POST", f"{PATH}/upload-urls", [payload])
    assert (answer.status, answer.json["error"]) == (status, code)
    too_big = await call(world, "POST", f"{PATH}/upload-urls", [b" " * 300])
    assert (too_big.status, too_big.json["error"]) == (413, "payload_too_large")


async def test_a_declared_length_over_the_cap_is_refused_before_any_byte_is_read(
    world: World,
) -> None:
    answer = await call(world, "PUT", put_url(world), [b"x" * 10], headers=length(CAP + 1),
                        endless=True)  # fmt: skip
    assert (answer.status, answer.json["error"], answer.json["limit"]) == (
        413,
        "payload_too_large",
        CAP,
    )
    assert "declared 1001 bytes" in answer.json["message"]
    assert answer.pulled == 0  # over drain_max_bytes: not one body event read
    assert await oversize_counted(world) == 1
    await nothing_kept(world)


async def test_a_streamed_body_is_refused_the_moment_it_passes_the_cap(world: World) -> None:
    answer = await call(world, "PUT", put_url(world), [b"x" * 300], endless=True)
    assert (answer.status, answer.json["error"]) == (413, "payload_too_large")
    assert answer.pulled == 4  # 1200 > 1000: the fourth chunk passed it; nothing after
    assert await oversize_counted(world) == 1
    await nothing_kept(world)
    # A lying Content-Length (under the cap, more bytes sent) is caught the same way.
    lying = await call(world, "PUT", put_url(world), [b"y" * 600, b"y" * 600],
                       headers=length(10))  # fmt: skip
    assert (lying.status, lying.json["error"]) == (413, "payload_too_large")
    assert await oversize_counted(world) == 2
    await nothing_kept(world)


async def test_oversize_refusals_feed_row_17s_detector(world: World) -> None:
    for _ in range(3):
        await call(world, "PUT", put_url(world), headers=length(CAP + 1))
    await settled()
    assert world.admission.statistics().oversize == 3
    state = world.detector.evaluate()
    assert state.firing and state.value == 3


@pytest.mark.parametrize(
    ("mangle", "status", "code"),
    [
        (lambda url: url.split("?")[0], 401, "signature_required"),
        (lambda url: url.replace("signature=", "signature=0"), 403, "bad_signature"),
        (lambda url: url.replace("max_bytes=1000", "max_bytes=9999"), 403, "bad_signature"),
        (lambda url: url + "&expires=1", 401, "signature_required"),
        (lambda url: url.replace("expires=", "expires=x"), 401, "signature_required"),
    ],
)
async def test_missing_or_forged_signatures_are_refused(
    world: World, mangle: Any, status: int, code: str
) -> None:
    answer = await call(world, "PUT", mangle(put_url(world)), [b"x"], headers=length(1))
    assert (answer.status, answer.json["error"]) == (status, code)
    await nothing_kept(world)


async def test_a_url_for_another_tenant_or_method_is_forged(world: World) -> None:
    attachment = uuid.uuid4()
    url = put_url(world, attachment=attachment)
    moved = url.replace(str(world.tenant), str(world.other))
    assert (await call(world, "PUT", moved, [b"x"], headers=length(1))).json["error"] == (
        "bad_signature"
    )
    assert (await call(world, "GET", url)).json["error"] == "bad_signature"  # a PUT URL
    await nothing_kept(world)


async def test_an_expired_url_is_refused(world: World) -> None:
    answer = await call(world, "PUT", put_url(world, expires=NOW - 1), [b"x"], headers=length(1))
    assert (answer.status, answer.json["error"]) == (403, "url_expired")
    await nothing_kept(world)


async def test_a_bad_content_length_is_400(world: World) -> None:
    answer = await call(world, "PUT", put_url(world), [b"x"], headers=[(b"content-length", b"1e3")])
    assert (answer.status, answer.json["error"]) == (400, "invalid_content_length")


async def test_while_scans_are_backed_up_large_uploads_are_503(world: World) -> None:
    world.admission.tell_nowait(SetBackedUp(BACKED_UP))
    await settled()
    declared = await call(world, "PUT", put_url(world), [b"x" * 101], headers=length(101))
    assert (declared.status, declared.json["error"], declared.json["limit"]) == (
        503,
        "scanner_backed_up",
        BACKED_UP,
    )
    assert declared.headers[b"retry-after"] == b"7"
    streamed = await call(world, "PUT", put_url(world), [b"x" * 60], endless=True)
    assert (streamed.status, streamed.json["error"]) == (503, "scanner_backed_up")
    assert streamed.pulled == 2
    assert await oversize_counted(world) == 0  # not over the cap: not row 17's business
    await nothing_kept(world)
    small = await call(world, "PUT", put_url(world), [b"x" * 100], headers=length(100))
    assert small.status == 202
    world.admission.tell_nowait(SetBackedUp(None))
    await settled()
    large = await call(world, "PUT", put_url(world), [b"x" * 900], headers=length(900))
    assert large.status == 202


async def test_a_second_upload_to_the_same_url_is_409(world: World) -> None:
    url = put_url(world)
    assert (await call(world, "PUT", url, [b"one"], headers=length(3))).status == 202
    again = await call(world, "PUT", url, [b"two"], headers=length(3))
    assert (again.status, again.json["error"]) == (409, "already_uploaded")
    assert world.blobs.temporary_files() == []


async def test_an_unknown_tenant_is_404_and_keeps_nothing(world: World) -> None:
    answer = await call(
        world, "PUT", put_url(world, tenant=uuid.uuid4()), [b"x"], headers=length(1)
    )
    assert (answer.status, answer.json["error"]) == (404, "unknown_tenant")
    await nothing_kept(world)


async def test_paths_and_methods(world: World) -> None:
    assert (await call(world, "GET", f"{PATH}/nope")).json["error"] == "not_found"
    assert (await call(world, "GET", f"{PATH}/{world.tenant}/x")).json["error"] == "not_found"
    deleted = await call(world, "DELETE", put_url(world))
    assert (deleted.status, deleted.headers[b"allow"]) == (405, b"GET, PUT, POST")
    assert (await call(world, "GET", f"{PATH}/upload-urls")).status == 405


async def test_downloads_are_refused_unless_clean(world: World) -> None:
    ids = {}
    for name in ("infected", "failed"):
        ids[name] = attachment = uuid.uuid4()
        await call(world, "PUT", put_url(world, attachment=attachment), [b"z"], headers=length(1))
    records = [
        ScanRecord(id=ids["infected"], tenant_id=world.tenant, status=AttachmentStatus.INFECTED,
                   signature="Triage.Test.EICAR"),
        ScanRecord(id=ids["failed"], tenant_id=world.tenant, status=AttachmentStatus.FAILED,
                   error="ScanSizeLimit: too big"),
    ]  # fmt: skip
    assert await run(record_scans, world.pool, records) == [True, True]
    infected = await call(world, "GET", put_url(world, attachment=ids["infected"], method="GET",
                                                 max_bytes=0))  # fmt: skip
    assert (infected.status, infected.json["error"]) == (403, "quarantined")
    failed = await call(world, "GET", put_url(world, attachment=ids["failed"], method="GET",
                                               max_bytes=0))  # fmt: skip
    assert (failed.status, failed.json["error"]) == (422, "scan_failed")
    assert "ScanSizeLimit" in failed.json["message"]
    # Another tenant's URL for the same id finds nothing (RLS).
    elsewhere = put_url(world, tenant=world.other, attachment=ids["infected"], method="GET",
                        max_bytes=0)  # fmt: skip
    assert (await call(world, "GET", elsewhere)).status == 404
    # A final state never moves again: a late "clean" changes nothing.
    late = ScanRecord(id=ids["infected"], tenant_id=world.tenant, status=AttachmentStatus.CLEAN)
    assert await run(record_scans, world.pool, [late]) == [False]


async def test_the_admission_not_running_is_503(world: World, tmp_path: Path) -> None:
    _, stopped = upload_admission_child(
        pool=world.pool, scanner=None, mailbox=MailboxConfig(capacity=1, overflow="reject"),
        shutdown_s=1.0,
    )  # fmt: skip
    api = UploadApi(config=world.api.config, admission=stopped, blobs=world.blobs,
                    pool=world.pool, signer=world.signer, wall=lambda: NOW)  # fmt: skip
    world.api = api
    answer = await call(world, "PUT", put_url(world), [b"x"], headers=length(1))
    assert (answer.status, answer.json["error"]) == (503, "not_ready")
    assert answer.headers[b"retry-after"] == b"7"


def test_oversize_message_is_typed() -> None:
    assert Oversize(declared=None, limit=5) == Oversize(None, 5)
    assert Submit.__struct_config__.tag == "Submit"
