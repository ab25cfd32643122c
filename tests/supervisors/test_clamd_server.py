"""The embedded clamd as a supervised child: started before the pool, restarted when it dies."""

from __future__ import annotations

import trio

from config import default_path, load_config
from engine.supervisor import ChildSpec, Restart, Supervisor
from providers.clamd import ClamdClient, ClamdUnavailable
from supervisors.attachments import ClamdServer, _free_port
from tests.clamd_fixture import clamd_or_fail


async def test_a_clamd_that_died_is_started_again_on_the_same_port() -> None:
    clamd_or_fail()
    config = load_config(default_path("chaos.toml"))
    child = ClamdServer(config, _free_port())
    spec = ChildSpec(id=child.name, start=child.run, restart=Restart.PERMANENT, shutdown_s=5.0)
    supervisor = Supervisor("test", [spec], max_restarts=3, period_s=60.0)
    client = ClamdClient(child.address, connect_timeout_s=1.0, timeout_s=2.0, chunk_bytes=4096)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await client.ping()
        first = child.server
        assert first is not None and first.pid is not None
        await trio.to_thread.run_sync(first.kill)  # a crash of clamd itself
        with trio.fail_after(30):  # a guard: noticed within poll_interval_s, restarted
            while True:
                try:
                    await client.ping()  # the same address answers again
                except ClamdUnavailable:
                    await trio.sleep(config.scanner.poll_interval_s)
                else:
                    break
        assert child.server is not None and child.server is not first
        assert [c.restarts for c in supervisor.which_children()] == [1]
        nursery.cancel_scope.cancel()
    assert child.server is None  # stopped and removed with the child
