"""Scenario 17, large-attachment OOM: uploads over the budget, refused before they are buffered.

The scenario runs the daemon's attachment wiring (:mod:`bench.chaos.attachments_rig`:
real PostgreSQL, a real clamd, the HTTP server) with the ``[uploads]`` of the
scenario config (chaos.toml: a 256 KiB cap) and row 17's detector
(``[detectors.upload_oversize]`` if set).

1. Legitimate uploads: N files of varied sizes up to the cap (a few of them the
   EICAR test file), each through a pre-signed URL.
2. Trigger, oversize uploads, interleaved with them: bodies that *declare* a
   ``Content-Length`` over the cap (refused at once, nothing read), bodies over
   their URL's own smaller cap, and chunked bodies (no length) that stream past
   the cap (refused the moment the count passes it); plus an upload-URL request
   for more than the cap, a forged signature and an expired URL.
3. The scanner pool scans every stored upload.

Judged from outside:

- detected: row 17's detector fired, and ``triage_upload_oversize_rejected_total``
  equals the oversize uploads sent;
- mitigated: every oversize upload was answered 413 ``payload_too_large`` naming
  its limit, the URL request 413, the forged one 403 ``bad_signature``, the
  expired one 403 ``url_expired``; none of them left a row, a blob or a
  temporary file; every legitimate upload ended ``clean`` with its SHA-256 and is
  served back byte for byte, and every EICAR upload ended ``infected``, its blob
  quarantined and its download refused (403 ``quarantined``);
- ``lost``: legitimate uploads without the right final state; ``duplicates``:
  attachment rows beyond one per upload.
"""

from __future__ import annotations

import hashlib
import random
import time
import uuid
from collections import Counter

import httpx
import trio

from actors.upload_admission import ROW
from bench.chaos.attachments_rig import (
    EICAR,
    AttachmentsRig,
    Upload,
    database_rows,
    open_attachments,
)
from bench.chaos.fixtures import evaluate_every
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from providers.bridge import run
from providers.presigned import SignedUrl

__all__ = ["ROW", "SCENARIO", "run_scenario"]

OVERSIZE_METRIC = "triage_upload_oversize_rejected_total"


async def _wait_scanned(rig: AttachmentsRig, count: int, timeout_s: float) -> bool:
    with trio.move_on_after(timeout_s):
        while True:
            rows = await run(database_rows, rig.postgres.url)
            if len(rows) >= count and all(r["status"] != "pending" for r in rows):
                return True
            await trio.sleep(rig.config.scanner.poll_interval_s)
    return False


async def run_scenario(ctx: ChaosContext) -> Outcome:
    count = 24 if ctx.quick else 200
    ledger = Ledger()
    notes: list[str] = []
    chance = random.Random(17)
    async with open_attachments(ctx.config, ctx.catalog, tenants=2) as rig:
        cap = rig.config.uploads.max_upload_bytes
        detector = next(d for d in rig.detectors if d.row == ROW)
        legit: dict[uuid.UUID, tuple[uuid.UUID, bytes]] = {}
        refusals: list[tuple[str, Upload]] = []
        started = trio.current_time()
        fired_at: float | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(evaluate_every, detector, rig.config.daemon.detector_tick_s)
            for n in range(count):
                tenant = rig.tenants[n % len(rig.tenants)]
                data = EICAR if n % 8 == 3 else chance.randbytes(chance.randint(1, cap))
                answer = await rig.upload(tenant, data, chunked=n % 5 == 0)
                if answer.status == 202 and answer.attachment is not None:
                    legit[answer.attachment] = (tenant, data)
                    ledger.accept(str(answer.attachment))
                else:
                    notes.append(f"legitimate upload {n} answered {answer.status} {answer.body}")
                if n % 3 == 0:  # the trigger, between the legitimate uploads
                    kind = ("declared", "url_cap", "chunked")[(n // 3) % 3]
                    refusals.append((kind, await _oversize(rig, tenant, kind, cap + 1 + n)))
                if fired_at is None and detector.firing:
                    fired_at = trio.current_time()
            over_url = await rig.upload_url(rig.tenants[0], max_bytes=cap + 1)
            forged, expired = await _bad_signatures(rig, cap)
            scanned = await _wait_scanned(rig, len(legit), 30 if ctx.quick else 120)
            if fired_at is None and detector.evaluate().firing:
                fired_at = trio.current_time()
            nursery.cancel_scope.cancel()

        rows = await run(database_rows, rig.postgres.url)
        by_id = {r["id"]: r for r in rows}
        served: list[bool] = []
        for attachment, (tenant, data) in legit.items():
            row = by_id.get(attachment)
            if row is None:
                continue
            got = await rig.client.get(rig.download_url(tenant, attachment))
            if data == EICAR:
                ok = (
                    row["status"] == "infected"
                    and got.status_code == 403
                    and got.json()["error"] == "quarantined"
                    and await rig.attachments.blobs.quarantined(f"{tenant}/{attachment}")
                    and not await rig.attachments.blobs.exists(f"{tenant}/{attachment}")
                )
            else:
                ok = (
                    row["status"] == "clean"
                    and row["sha256"] == hashlib.sha256(data).hexdigest()
                    and got.status_code == 200
                    and got.content == data
                )
            served.append(ok)
            if ok:
                ledger.settle(str(attachment))
        for attachment in Counter(r["id"] for r in rows).elements():
            ledger.receive(str(attachment))
        refused_ids = [u.attachment for _, u in refusals if u.attachment is not None]
        left = [a for a in refused_ids if a in by_id]
        stored = []
        for attachment in refused_ids:
            for tenant in rig.tenants:
                if await rig.attachments.blobs.exists(f"{tenant}/{attachment}"):
                    stored.append(attachment)
        temporary = rig.attachments.blobs.temporary_files()
        counted = rig.registry.get_sample_value(OVERSIZE_METRIC) or 0.0
        stats = rig.attachments.admission.statistics()

    all_413 = all(
        u.status == 413 and u.body.get("error") == "payload_too_large" and "limit" in u.body
        for _, u in refusals
    )
    limits = {
        kind: u.body.get("limit") for kind, u in refusals
    }  # the URL's own cap is the limit named for url_cap
    detected = fired_at is not None and counted == len(refusals)
    mitigated = (
        all_413
        and limits.get("url_cap") == 1024
        and limits.get("declared") == cap
        and over_url.status_code == 413
        and forged == (403, "bad_signature")
        and expired == (403, "url_expired")
        and not left
        and not stored
        and not temporary
        and scanned
        and all(served)
    )
    kinds = Counter(kind for kind, _ in refusals)
    notes.append(
        f"legitimate uploads {len(legit)} (EICAR {sum(1 for _, d in legit.values() if d == EICAR)}),"
        f" oversize {dict(kinds)} all 413: {all_413}, counted {int(counted)}, limits named"
        f" {limits}, URL over the cap {over_url.status_code}, forged {forged}, expired"
        f" {expired}, rows/blobs/temp files of refused uploads {len(left)}/{len(stored)}/"
        f"{len(temporary)}, scanned {scanned}, served right {sum(served)}/{len(served)},"
        f" admission {stats}"
    )
    return Outcome(
        detected=detected,
        detect_s=None if fired_at is None else fired_at - started,
        mitigated=mitigated,
        ledger=ledger,
        notes=notes,
    )


async def _oversize(rig: AttachmentsRig, tenant: uuid.UUID, kind: str, size: int) -> Upload:
    """One oversize upload: ``declared`` sends only its head (a Content-Length over the cap:
    the 413 must come before any byte of the body), ``url_cap`` a body over its URL's own
    cap, ``chunked`` a body without a length that streams past the cap."""
    issued = (await rig.upload_url(tenant, max_bytes=1024 if kind == "url_cap" else None)).json()
    url, attachment = issued["upload_url"], uuid.UUID(issued["attachment_id"])
    if kind == "declared":
        status, body = await rig.put_raw(url, declared=size)
    elif kind == "url_cap":
        status, body = await rig.put_raw(url, declared=2048, body=b"u" * 2048)
    else:
        status, body = await rig.put_raw(url, declared=None, body=b"c" * (size + 20000))
    return Upload(status, body, attachment, httpx.Headers())


async def _bad_signatures(rig: AttachmentsRig, cap: int) -> tuple[tuple[int, str], tuple[int, str]]:
    """A URL whose cap was raised by hand (forged) and one signed an hour ago (expired)."""
    issued = (await rig.upload_url(rig.tenants[0], max_bytes=1024)).json()
    tampered = issued["upload_url"].replace("max_bytes=1024", f"max_bytes={cap}")
    forged = await rig.client.put(tampered, content=b"f" * 2000)
    path = f"{rig.config.uploads.path}/{rig.tenants[0]}/{uuid.uuid4()}"
    old = SignedUrl(method="PUT", path=path, expires=int(time.time()) - 3600, max_bytes=1024)
    expired = await rig.client.put(rig.attachments.signer.sign(old), content=b"e" * 10)
    return (
        (forged.status_code, forged.json().get("error", "")),
        (expired.status_code, expired.json().get("error", "")),
    )


SCENARIO = Scenario(ROW, run_scenario)
