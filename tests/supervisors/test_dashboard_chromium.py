"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``) loads the
page from the real daemon (dev.toml, the backbone, the provider emulators), a fault is
injected (the Ghasi emulator answers 503) while SMS dispatches are posted, and the page's
DOM shows the ``ghasi`` breaker turn ``open``, live, over the websocket.

Chromium is driven over its DevTools protocol with trio-websocket as the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from config.schema import DashboardConfig
from supervisors.daemon import Daemon
from tests.supervisors.test_channels_daemon import body
from tests.supervisors.test_daemon import dev_config, shipped_catalog, start
from tests.supervisors.test_daemon_services import service_env

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
START_S = 30.0  # the daemon's start (migrations, emulators)
BROWSER_S = 30.0  # Chromium up and the page live
OPEN_S = 30.0  # the breaker seen open on the page once the fault is in
LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")


class DevTools:
    """One page target of Chromium, over the DevTools protocol."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.next_id = 0

    async def evaluate(self, expression: str) -> Any:
        self.next_id += 1
        ask = self.next_id
        await self.ws.send_message(
            json.dumps({
                "id": ask, "method": "Runtime.evaluate",
                "params": {"expression": expression, "returnByValue": True},
            })
        )  # fmt: skip
        while True:
            answer = json.loads(await self.ws.get_message())
            if answer.get("id") == ask:
                result = answer["result"]
                assert "exceptionDetails" not in result, result
                return result["result"].get("value")

    async def until(self, expression: str, wanted: object, within_s: float) -> None:
        """Poll ``expression`` in the page until it evaluates to ``wanted``."""
        last: object = None
        with trio.move_on_after(within_s):
            while (last := await self.evaluate(expression)) != wanted:  # noqa: ASYNC110  # the page
                await trio.sleep(0.05)
            return
        raise AssertionError(f"{expression} stayed {last!r}, never {wanted!r}")


@contextlib.asynccontextmanager
async def chromium(url: str, profile: Path) -> AsyncIterator[DevTools]:
    """Headless Chromium showing ``url``; its page, over the DevTools protocol."""
    process = await trio.lowlevel.open_process(
        [
            CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",
            "--remote-debugging-port=0", f"--user-data-dir={profile}",
            "--no-first-run", "--no-default-browser-check", url,
        ],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        async with trio.open_nursery() as nursery:
            found: list[bytes] = []
            seen = trio.Event()

            async def drain() -> None:  # read stderr to the end (a full pipe stalls it)
                assert process.stderr is not None
                text = b""
                while chunk := await process.stderr.receive_some(65536):
                    if not seen.is_set():
                        text += chunk
                        match = LISTENING.search(text)
                        if match:
                            found.append(match.group(1))
                            seen.set()

            nursery.start_soon(drain)
            with trio.fail_after(BROWSER_S):
                await seen.wait()
            port = int(found[0].decode().split(":")[2].split("/")[0])
            async with httpx.AsyncClient(timeout=5.0) as client:
                with trio.fail_after(BROWSER_S):
                    while True:
                        targets = (await client.get(f"http://127.0.0.1:{port}/json/list")).json()
                        pages = [t for t in targets if t["type"] == "page"]
                        if pages:
                            break
                        await trio.sleep(0.1)
            async with open_websocket_url(pages[0]["webSocketDebuggerUrl"]) as ws:
                yield DevTools(ws)
            nursery.cancel_scope.cancel()
    finally:
        process.terminate()
        with trio.move_on_after(10.0) as waited:
            await process.wait()
        if waited.cancelled_caught:
            process.kill()
            await process.wait()


GHASI_STATE = (
    "(function () { var r = document.querySelector('#breakers tr[data-key=\"ghasi\"]');"
    " return r ? r.dataset.state : null; })()"
)
STATUS = "(document.getElementById('status') || {dataset: {}}).dataset.status || null"
GHASI_SETTINGS = (
    "document.querySelector('#breakers tr[data-key=\"ghasi\"] td.settings').textContent"
)


async def test_the_page_shows_the_ghasi_breaker_turn_open_after_a_fault(
    postgres_url: str, nats_url: str, bridge: asyncio.AbstractEventLoop, tmp_path: Path
) -> None:
    config = msgspec.structs.replace(
        dev_config(), dashboard=DashboardConfig(enabled=True, interval_s=0.1)
    )
    daemon = Daemon(
        config,
        shipped_catalog(),
        handle_signals=False,
        backbone=True,
        env=service_env(postgres_url, nats_url),
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(START_S):
            running = await start(nursery, daemon)
        assert daemon.emulated is not None and daemon.tree is not None
        assert daemon.tree.dashboard is not None
        breaker = daemon.tree.dashboard.snapshot()["breakers"]["ghasi"]
        page = f"http://127.0.0.1:{running.port}{config.dashboard.path}"
        async with chromium(page, tmp_path / "profile") as tab:
            await tab.until(STATUS, "live", BROWSER_S)
            assert await tab.evaluate(GHASI_STATE) == "closed"
            # The effective thresholds, as the breaker has them.
            shown = await tab.evaluate(GHASI_SETTINGS)
            assert f"fail_max={breaker['settings']['fail_max']}" in shown
            assert "tree" in await tab.evaluate("document.body.innerHTML")
            assert await tab.evaluate(
                "document.querySelector('#tree tr[data-key=\"root/http\"]') !== null"
            )

            daemon.emulated.ghasi.set_faults(status=503)
            async with httpx.AsyncClient(base_url=running.url, timeout=10.0) as client:

                async def dispatch() -> None:
                    while True:
                        await client.post(
                            "/v1/dispatches",
                            json=body("sms", "reminder", "+15550100001"),
                            headers={"Idempotency-Key": uuid.uuid4().hex},
                        )
                        await trio.sleep(0.05)

                async with trio.open_nursery() as load:
                    load.start_soon(dispatch)
                    await tab.until(GHASI_STATE, "open", OPEN_S)
                    load.cancel_scope.cancel()
            # The page and the daemon agree.
            assert daemon.tree.dashboard.snapshot()["breakers"]["ghasi"]["state"] in (
                "open", "half-open",
            )  # fmt: skip
        daemon.request_drain("test over")
