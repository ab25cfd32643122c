"""Attachments end to end in the real daemon: dev.toml, the backbone, its own clamd.

The daemon starts its embedded clamd (no ``[scanner] clamd_address``; the EICAR
signature shipped in providers/clamd_db), mounts the upload routes on its HTTP
server and runs the scanner pool and the upload admission in its tree: an upload
through a pre-signed URL is scanned and served back once clean; the EICAR test
file is quarantined and never served.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import msgspec
import trio

from supervisors.daemon import Daemon
from supervisors.demo import DEMO_TENANT_ID
from tests.clamd_fixture import EICAR, clamd_or_fail
from tests.supervisors.test_daemon import dev_config, shipped_catalog, start
from tests.supervisors.test_daemon_services import service_env

START_S = 30.0


async def _scanned(client: httpx.AsyncClient, url: str) -> httpx.Response:
    while True:
        answer = await client.get(url)
        if answer.status_code != 409:  # scan_pending
            return answer
        await trio.sleep(0.05)


async def test_an_upload_is_scanned_by_the_daemons_own_clamd_and_served_once_clean(
    postgres_url: str, nats_url: str, tmp_path: Path
) -> None:
    clamd_or_fail()  # a clear failure, not a daemon error, when clamd is missing
    config = dev_config()
    uploads = msgspec.structs.replace(config.uploads, blob_root=str(tmp_path / "blobs"))
    daemon = Daemon(
        msgspec.structs.replace(config, uploads=uploads), shipped_catalog(),
        handle_signals=False, backbone=True, env=service_env(postgres_url, nats_url),
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_S):
            running = await start(nursery, daemon)
        tree = daemon.tree
        assert tree is not None and tree.attachments is not None
        assert tree.attachments.embedded is not None  # its own clamd
        async with httpx.AsyncClient(base_url=running.url, timeout=10.0) as client:
            answers = {}
            for name, data in (("note", b"hello, attachment\n"), ("eicar", EICAR)):
                issued = await client.post(
                    "/v1/attachments/upload-urls", json={"tenant_id": str(DEMO_TENANT_ID)}
                )
                assert issued.status_code == 201
                urls = issued.json()
                stored = await client.put(urls["upload_url"], content=data)
                assert (stored.status_code, stored.json()["status"]) == (202, "pending")
                with trio.fail_after(10):
                    answers[name] = (data, await _scanned(client, urls["download_url"]))
            oversize = await client.put(
                urls["upload_url"].replace("max_bytes=26214400", "max_bytes=1"), content=b"x"
            )
            metrics = (await client.get("/metrics")).text
        daemon.request_drain("test over")
    note_data, note = answers["note"]
    assert (note.status_code, note.content) == (200, note_data)
    _, eicar = answers["eicar"]
    assert (eicar.status_code, eicar.json()["error"]) == (403, "quarantined")
    assert "Triage.Test.EICAR" in eicar.json()["message"]
    assert oversize.json()["error"] == "bad_signature"  # a cap lowered by hand is a forgery too
    assert 'triage_scans_total{result="clean"} 1.0' in metrics
    assert 'triage_scans_total{result="infected"} 1.0' in metrics
    assert "triage_scan_queue_depth 0.0" in metrics
