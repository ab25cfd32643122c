"""The providers in their own process: every emulator a throughput run needs, outside the daemon.

A real SMS gateway does not share the daemon's interpreter, so a throughput run
must not either: the emulator's HTTP server and its receipt client would take
the daemon's CPU (a profile of the in-process rig spent a sixth of it posting
receipts). ``python -m bench.perf.gateway CONFIG_JSON`` starts the loopback
emulators of :func:`supervisors.emulated.open_emulators` and talks over its
standard streams, one JSON object per line:

* at start it prints ``{"endpoints": {...}}`` -- every address and secret the
  daemon's ``[providers]`` need (the parent writes them into a config overlay,
  environment variables and key files, as for real vendors);
* it reads commands: ``{"receipts": BASE_URL}`` (post Ghasi receipts to the
  daemon there), ``{"fault": {"status": 503}}`` / ``{"clear": true}`` (the Ghasi
  emulator's faults), ``{"stats": true}`` (answers ``{"stats": {...}}``: messages
  accepted per provider, duplicates, receipts sent), ``{"quit": true}``.

:class:`Gateway` is the parent's side (Trio).
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import msgspec
import trio

import config
from providers.fcm import ServiceAccount
from supervisors.emulated import Emulated, Endpoints, open_emulators

__all__ = ["Gateway", "open_gateway"]


def _stats(emulated: Emulated) -> dict[str, float]:
    return {
        "ghasi_accepted": float(sum(emulated.ghasi.accepted.values())),
        "twilio_accepted": float(sum(emulated.twilio.accepted.values())),
        "duplicates": float(emulated.duplicates()),
        "receipts_sent": float(emulated.ghasi.receipts_sent),
        "receipt_retries": float(emulated.ghasi.receipt_retries),
    }


async def _serve(cfg: config.TriageConfig) -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))

    def say(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async with open_emulators(cfg) as emulated:
        say({"endpoints": msgspec.to_builtins(emulated.endpoints)})
        buffer = b""
        while True:
            chunk = await stdin.receive_some()
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command = json.loads(line)
                if "receipts" in command:
                    emulated.point_receipts_at(command["receipts"])
                    say({"ok": True})
                elif "fault" in command:
                    emulated.ghasi.set_faults(**command["fault"])
                    say({"ok": True})
                elif "clear" in command:
                    emulated.ghasi.clear_faults()
                    say({"ok": True})
                elif "stats" in command:
                    say({"stats": _stats(emulated)})
                elif "quit" in command:
                    return


class Gateway:
    """The parent's handle on a gateway process."""

    def __init__(self, process: trio.Process) -> None:
        self._process = process
        self._buffer = b""
        self.endpoints: Endpoints | None = None

    async def start(self) -> Endpoints:
        """Read the endpoints the process prints first."""
        fields = (await self._line())["endpoints"]
        fields["fcm_account"] = msgspec.convert(fields["fcm_account"], ServiceAccount)
        self.endpoints = Endpoints(**fields)
        return self.endpoints

    async def _line(self) -> dict[str, Any]:
        assert self._process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self._process.stdout.receive_some()
            if not chunk:
                raise RuntimeError("the gateway process ended")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def send(self, **command: Any) -> None:
        assert self._process.stdin is not None
        await self._process.stdin.send_all(json.dumps(command).encode() + b"\n")

    async def command(self, **command: Any) -> dict[str, Any]:
        await self.send(**command)
        return await self._line()

    async def stats(self) -> dict[str, float]:
        answer = await self.command(stats=True)
        stats: dict[str, float] = answer["stats"]
        return stats

    def provider_settings(
        self, directory: Path
    ) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
        """``[providers]`` overrides, environment and other sections' overrides (the
        videobridge nodes of ``[jitsi]``) for a daemon reaching this gateway as it reaches
        real vendors (key files written into ``directory``)."""
        e = self.endpoints
        assert e is not None, "start() first"
        account = directory / "fcm-service-account.json"
        account.write_bytes(msgspec.json.encode(e.fcm_account))
        apns_key = directory / "apns.p8"
        apns_key.write_text(e.apns_private_key)
        providers = {
            "ghasi": {"base_url": e.ghasi_url},
            "twilio": {"base_url": e.twilio_url},
            "fcm": {
                "base_url": e.fcm_url,
                "service_account_file": str(account),
                "feedback_url": e.fcm_feedback_url,
            },
            "apns": {
                "base_url": e.apns_url,
                "key_file": str(apns_key),
                "feedback_url": e.apns_feedback_url,
            },
            "smtp": {"host": e.smtp_host, "port": e.smtp_port},
        }
        env = {
            "TRIAGE_GHASI_API_KEY": e.ghasi_api_key,
            "TRIAGE_GHASI_RECEIPT_SECRET": e.ghasi_receipt_secret,
            "TRIAGE_TWILIO_AUTH_TOKEN": e.twilio_auth_token,
            "TRIAGE_SMTP_BOUNCE_SECRET": e.smtp_bounce_secret,
            # the pre-signed upload URLs' key, as a Secret would hold it (nothing here
            # verifies the daemon's URLs but the daemon itself: a fresh one)
            "TRIAGE_UPLOAD_SIGNING_SECRET": secrets.token_hex(32),
        }
        sections = {"jitsi": {"nodes": [{"name": n, "url": url} for n, url in e.jitsi_nodes]}}
        return providers, env, sections


@asynccontextmanager
async def open_gateway(cfg: config.TriageConfig) -> AsyncIterator[Gateway]:
    """Start the gateway process for ``cfg`` (its ``[emulators]`` and ``[providers]``
    shapes); stopped at exit."""
    argv = [sys.executable, "-m", "bench.perf.gateway", msgspec.json.encode(cfg).decode()]
    async with trio.open_nursery() as nursery:
        start = functools.partial(trio.run_process, argv, stdin=-1, stdout=-1, check=False)
        process: trio.Process = await nursery.start(start)
        gateway = Gateway(process)
        await gateway.start()
        try:
            yield gateway
        finally:
            with trio.move_on_after(5) as scope:
                scope.shield = True
                with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await gateway.send(quit=True)
                await process.wait()
            if process.returncode is None:
                process.kill()


def main() -> None:
    cfg = msgspec.json.decode(sys.argv[1].encode(), type=config.TriageConfig)
    trio.run(_serve, cfg)


if __name__ == "__main__":
    main()
