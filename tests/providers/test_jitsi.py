"""The bridge client against the loopback Jitsi Videobridge emulator, over real sockets."""

from __future__ import annotations

import httpx
import pytest

from engine.errors import ProviderTimeout, ProviderUnavailable
from providers.emulators.base import serve_emulator
from providers.emulators.jitsi import JitsiBridgeEmulator
from providers.jitsi import HttpBridgeClient


async def test_health_stats_drain_and_rooms_as_the_bridge_serves_them() -> None:
    bridge = JitsiBridgeEmulator("jvb1", participants_per_room=3, capacity_participants=10)
    async with serve_emulator(bridge) as server:
        client = HttpBridgeClient("jvb1", server.url, timeout_s=5.0)
        try:
            async with httpx.AsyncClient() as raw:
                health = await raw.get(f"{server.url}/about/health")
                assert (health.status_code, health.content) == (200, b"")
                assert (await raw.get(f"{server.url}/colibri/drain")).json() == {"drain": False}
            await client.health()
            first = await client.allocate("triage-room-1")
            again = await client.allocate("triage-room-1")  # a retried allocation
            assert (first.created, again.created) == (True, False)
            assert first.conference_id == again.conference_id and first.url == server.url
            stats = await client.stats()
            assert (stats.conferences, stats.participants) == (1, 3)
            assert stats.stress_level == pytest.approx(0.3)
            assert bridge.allocations == 1 and list(bridge.rooms) == ["triage-room-1"]

            bridge.set_bridge_faults(drain=True, stress_level=0.9, graceful_shutdown=True)
            assert await client.drain() is True
            stats = await client.stats()
            assert (stats.stress_level, stats.graceful_shutdown) == (0.9, True)
            with pytest.raises(ProviderUnavailable, match="HTTP 503"):
                await client.allocate("triage-room-2")  # a bridge shutting down takes none

            bridge.set_bridge_faults(health_status=500)
            with pytest.raises(ProviderUnavailable, match="HTTP 500"):
                await client.health()
            bridge.clear_bridge_faults()
            await client.health()
        finally:
            await client.aclose()


async def test_a_hanging_bridge_times_out_and_a_down_one_refuses() -> None:
    bridge = JitsiBridgeEmulator("jvb2")
    async with serve_emulator(bridge) as server:
        client = HttpBridgeClient("jvb2", server.url, timeout_s=0.2)
        try:
            bridge.set_bridge_faults(hang=True)
            with pytest.raises(ProviderTimeout, match="jitsi jvb2"):
                await client.health()
            bridge.clear_bridge_faults()
            await server.go_down()
            with pytest.raises(ProviderUnavailable, match="not delivered"):
                await client.health()
            await server.come_up()  # the same port again
            await client.health()
        finally:
            await client.aclose()


async def test_faults_are_set_over_the_control_route() -> None:
    bridge = JitsiBridgeEmulator("jvb3")
    async with serve_emulator(bridge) as server, httpx.AsyncClient() as raw:
        answer = await raw.put(f"{server.url}/_emulator/bridge", json={"health_status": 503})
        assert answer.json()["health_status"] == 503
        assert (await raw.get(f"{server.url}/about/health")).status_code == 503
        bad = await raw.put(f"{server.url}/_emulator/bridge", json={"health_status": 200})
        assert bad.status_code == 400
        await raw.delete(f"{server.url}/_emulator/bridge")
        assert (await raw.get(f"{server.url}/about/health")).status_code == 200
        stats = (await raw.get(f"{server.url}/_emulator/stats")).json()
        assert stats["health_checks"] == 2 and stats["rooms"] == 0
