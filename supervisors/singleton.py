"""Singletons: a child that runs on one replica at a time, under an advisory-lock lease.

Several replicas of the daemon share one PostgreSQL and one NATS. Almost all of
their work is shared *by the data*, and needs no leader:

==========================  =================================================  ==========
child                       how replicas share it                              singleton
==========================  =================================================  ==========
``outbox_relay``            claims ``FOR UPDATE SKIP LOCKED`` + a per-         no
                            aggregate transaction advisory lock (order kept)
``inbox_consumer``          one JetStream durable pull consumer, bound by      no
                            every replica: queue semantics, ack after commit
``dispatch_commands``       a NATS queue group                                 no
``backlog_resumer``,        rows claimed with a lease (``claimed_until``)      no
``status_sweep``            set by the statement that locks them
``recording_ingest``,       rows claimed with a lease; a dead replica's rows   no
``scanner_pool``            are claimed again when it runs out
``error_budget``            the fold takes each sample once (one statement);   no
                            every replica needs the gauges and the freeze
``clock_monitor``           measures *this host's* clock against the           no
                            database's: every replica has its own skew, and
                            its board gates this replica's join tokens
``push_stale_sweep``        one idempotent UPDATE per call                     allowed
``push_feedback`` (row 2)   pulls the FCM/APNs feedback subscriptions: with    **yes**
                            N pullers each gets a share, and the watchdog
                            ("no feedback here while some wait") would call a
                            healthy share a stall and restart its session
==========================  =================================================  ==========

So ``[singletons] actors`` holds ``push_feedback`` by default (``push_stale_sweep``
may be added: one sweeper is enough, though several are harmless); the set of
children that may be named is :data:`config.schema.SINGLETON_ACTORS`.

:class:`Singleton` wraps the child's spec. It reports started at once -- a
standby replica is healthy, and readiness counts the wrapper ``running`` -- and
then, in a loop::

    STANDBY --lease acquired--> LEADING       the child starts (its own start protocol)
    STANDBY --lock taken / database unreachable--> STANDBY   on_standby(); retry in retry_s
    LEADING --lease connection lost--> STANDBY               the child is cancelled at once
    LEADING --the child returned--> (the wrapper returns)    the lease is released
    LEADING --the child raised--> (the wrapper raises it)    released; the supervisor restarts

The lease is :class:`providers.db.lease.AdvisoryLease` (its docstring: a
session-level lock, freed by the server when a SIGKILLed holder's connection
drops). The holder checks it every ``check_s``; a replica that lost its
connection stops the child before another can have started it for longer than
one ``check_s`` plus the lease's ``connect_timeout_s`` (both config).

``on_standby`` runs at every attempt that did not get the lease: the wiring uses
it to keep detectors of the child's row quiet on a standby (row 2's
age-of-newest detector would otherwise count from the daemon's start and fire:
only the holder watches the feedback). ``triage_singleton_leader{singleton}``
is 1 on the holder, 0 elsewhere; each change is one log line.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Protocol

import trio
from prometheus_client import CollectorRegistry, Gauge

from config.schema import SINGLETON_ACTORS, SingletonsConfig
from engine.errors import ProviderError
from engine.metrics import families
from engine.statelog import StateLog
from engine.supervisor import ChildSpec
from providers.db.lease import AdvisoryLease

__all__ = ["Lease", "Singleton", "SingletonState", "singleton_specs"]

log = logging.getLogger("triage.singleton")


class Lease(Protocol):
    """What :class:`Singleton` needs of a lease (:class:`~providers.db.lease.AdvisoryLease`)."""

    @property
    def name(self) -> str: ...

    async def try_acquire(self) -> bool: ...

    async def check(self) -> None: ...

    async def release(self) -> None: ...

    def abandon(self) -> None: ...


class SingletonState(enum.Enum):
    STANDBY = "standby"
    LEADING = "leading"
    STOPPED = "stopped"


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.leader = Gauge(
            "triage_singleton_leader",
            "1 while this replica holds the singleton's lease and runs it, else 0",
            ["singleton"],
            registry=registry,
        )


class Singleton:
    """Run ``spec``'s child only while ``lease`` is held (see the module docstring)."""

    def __init__(
        self,
        spec: ChildSpec,
        lease: Lease,
        *,
        retry_s: float,
        check_s: float,
        release_s: float,
        on_standby: Callable[[], None] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        for field, value in (("retry_s", retry_s), ("check_s", check_s), ("release_s", release_s)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{field}: must be a finite number > 0, got {value!r}")
        self.spec = spec
        self.lease = lease
        self.retry_s = retry_s
        self.check_s = check_s
        self.release_s = release_s
        self.on_standby = on_standby
        self.acquisitions = 0
        self.losses = 0
        self._state = StateLog(f"singleton {spec.id}", SingletonState.STANDBY, log)
        self._gauge = (
            families(registry, _Metrics).leader.labels(spec.id) if registry is not None else None
        )
        if self._gauge is not None:
            self._gauge.set(0)

    @property
    def name(self) -> str:
        return self.spec.id

    @property
    def state(self) -> SingletonState:
        return self._state.state

    def child_spec(self) -> ChildSpec:
        """The wrapper as the supervisor's child, in place of ``spec`` (same id and restart)."""
        return replace(
            self.spec,
            start=self.run,
            shutdown_s=self.spec.shutdown_s + self.release_s,
            ready_on_spawn=False,
        )

    def _become(self, state: SingletonState, reason: str) -> None:
        self._state.enter(state, reason)
        if self._gauge is not None:
            self._gauge.set(1 if state is SingletonState.LEADING else 0)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()  # a standby replica is a healthy one
        try:
            while True:
                if await self._attempt():
                    if await self._lead():
                        return  # the child returned: so does its wrapper
                    continue  # lost: try again at once (someone else may hold it by now)
                if self.on_standby is not None:
                    self.on_standby()
                await trio.sleep(self.retry_s)
        finally:
            self.lease.abandon()
            self._become(SingletonState.STOPPED, "the wrapper ended")

    async def _attempt(self) -> bool:
        try:
            return await self.lease.try_acquire()
        except ProviderError as exc:
            log.warning(
                "singleton lease attempt failed",
                extra={"singleton": self.name, "error": str(exc), "retry_s": self.retry_s},
            )
            return False

    async def _lead(self) -> bool:
        """Run the child while the lease holds: True if it returned, False if the lease was lost."""
        self.acquisitions += 1
        self._become(SingletonState.LEADING, "lease acquired")
        log.info("singleton lease acquired", extra={"singleton": self.name})
        returned = False
        lost = False
        try:
            async with trio.open_nursery() as nursery:

                async def child(task_status: trio.TaskStatus[None]) -> None:
                    nonlocal returned
                    await self.spec.start(task_status=task_status)
                    returned = True
                    nursery.cancel_scope.cancel()

                async def watch() -> None:
                    nonlocal lost
                    while True:
                        await trio.sleep(self.check_s)
                        try:
                            await self.lease.check()
                        except ProviderError as exc:
                            lost = True
                            self.losses += 1
                            log.warning(
                                "singleton lease lost",
                                extra={"singleton": self.name, "error": str(exc)},
                            )
                            nursery.cancel_scope.cancel()  # the child stops at once
                            return

                nursery.start_soon(watch)
                await nursery.start(child)
        except BaseExceptionGroup as group:
            sole = _sole(group)
            if sole is None:
                raise
            raise sole from None
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(self.release_s) as scope:
                await self._release()
            if scope.cancelled_caught:
                self.lease.abandon()
            self._become(SingletonState.STANDBY, "lease released")
        return returned and not lost

    async def _release(self) -> None:
        try:
            await self.lease.release()
        except ProviderError:
            self.lease.abandon()


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    current: BaseException = group
    while isinstance(current, BaseExceptionGroup):
        if len(current.exceptions) != 1:
            return None
        current = current.exceptions[0]
    return current


def singleton_specs(
    specs: list[ChildSpec],
    config: SingletonsConfig,
    postgres_url: str,
    *,
    on_standby: Mapping[str, Callable[[], None]] | None = None,
    registry: CollectorRegistry | None = None,
) -> list[ChildSpec]:
    """``specs`` with every child named in ``[singletons] actors`` wrapped in a
    :class:`Singleton` on its own lease (unchanged when ``enabled`` is false)."""
    if not config.enabled:
        return specs
    hooks = on_standby or {}
    out: list[ChildSpec] = []
    for spec in specs:
        if spec.id in config.actors and spec.id in SINGLETON_ACTORS:
            lease = AdvisoryLease(postgres_url, spec.id, timeout_s=config.connect_timeout_s)
            spec = Singleton(
                spec,
                lease,
                retry_s=config.retry_s,
                check_s=config.check_s,
                release_s=config.connect_timeout_s,
                on_standby=hooks.get(spec.id),
                registry=registry,
            ).child_spec()
        out.append(spec)
    return out
