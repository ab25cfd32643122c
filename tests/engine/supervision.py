"""A controllable child for supervision tests: each incarnation logs its start and
stop and waits until the test makes it crash or exit normally.

Log kinds: ``start`` (ready, just before ``started()``), ``stop`` (cancelled
after its start), ``abort`` (cancelled during its start, before ``started()``),
``crash`` and ``exit``. ``stop_s`` is how long an incarnation ignores its
cancellation (a shielded cleanup), in both ``stop`` and ``abort``."""

from __future__ import annotations

import trio

from engine.supervisor import ChildSpec, Restart


class Children:
    def __init__(self) -> None:
        self.log: list[tuple[str, str, float]] = []
        self._triggers: dict[str, trio.Event] = {}
        self._outcome: dict[str, str] = {}
        self._next_init: dict[str, float] = {}

    def spec(
        self,
        id: str,
        restart: Restart = Restart.PERMANENT,
        *,
        shutdown_s: float = 1.0,
        init_s: float = 0.0,
        stop_s: float = 0.0,
    ) -> ChildSpec:
        async def start(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            trigger = self._triggers[id] = trio.Event()
            delay = self._next_init.pop(id, init_s)
            if delay:
                try:
                    await trio.sleep(delay)
                except trio.Cancelled:
                    if stop_s:
                        with trio.CancelScope(shield=True):
                            await trio.sleep(stop_s)
                    self.log.append(("abort", id, trio.current_time()))
                    raise
            self.log.append(("start", id, trio.current_time()))
            task_status.started()
            try:
                await trigger.wait()
            except trio.Cancelled:
                if stop_s:
                    with trio.CancelScope(shield=True):
                        await trio.sleep(stop_s)
                self.log.append(("stop", id, trio.current_time()))
                raise
            if self._outcome.pop(id) == "crash":
                self.log.append(("crash", id, trio.current_time()))
                raise RuntimeError(f"{id} crashed")
            self.log.append(("exit", id, trio.current_time()))

        return ChildSpec(id=id, start=start, restart=restart, shutdown_s=shutdown_s)

    def slow_next_start(self, id: str, init_s: float) -> None:
        """The next incarnation of ``id`` takes ``init_s`` before ``started()``."""
        self._next_init[id] = init_s

    def crash(self, id: str) -> None:
        self._outcome[id] = "crash"
        self._triggers[id].set()

    def exit(self, id: str) -> None:
        self._outcome[id] = "exit"
        self._triggers[id].set()

    def events(self, kind: str) -> list[str]:
        return [child for what, child, _ in self.log if what == kind]

    def clear(self) -> None:
        self.log.clear()
