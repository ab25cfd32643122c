"""``triage run``: the long-running daemon, wired in this one place.

:func:`main_run` loads the config and the failure catalog (a bad file raises
:class:`config.ConfigError` before anything starts; the CLI prints its problems
and exits 2), turns on JSON-lines logging at ``daemon.log_level`` and runs a
:class:`Daemon` under ``trio.run``.

A :class:`Daemon` run, step by step:

1. open the runtime (seed ``daemon.seed``, metrics on a fresh registry capped at
   ``daemon.max_label_values`` label values per family);
2. log the catalog: a summary of which rows are live (``built``) and which are
   not, then one debug line per row;
3. listen for SIGTERM and SIGINT (each starts a drain);
4. with ``backbone=True`` (``triage run`` always): open the backbone
   (:mod:`supervisors.backbone`): resolve the services, embedded PostgreSQL and
   NATS when no URL is configured; open the bridge; migrate; open the pool as
   ``[database].daemon_role`` and verify RLS holds it (a role that could see
   across tenants is refused: ``database role refused``, exit 1). A drain
   requested meanwhile abandons the start (exit 0); with ``[slo] enabled``, the
   error-budget policy (:mod:`actors.error_budget`): while the budget is frozen,
   adapter sections changed since the last start are refused (exit 2, one line
   per section with the reason) unless ``TRIAGE_BREAK_GLASS`` gives one;
5. build the tree (:mod:`supervisors.tree`) and start the root supervisor,
   which starts its children in order; the HTTP child reports started only once
   its socket listens (the bound port is logged, port 0 included);
6. mark the daemon ready and log ``ready``;
7. wait for a drain request or for the root supervisor to fail.

A drain, bounded as a whole by ``daemon.drain_s`` from the moment it starts:

1. ``/readyz`` answers 503 ``draining`` at once; log ``draining``;
2. optionally keep serving for ``drain_grace_s`` (see :class:`Daemon`);
3. hypercorn shuts down gracefully: the listener closes, requests in flight
   finish (its ``graceful_timeout`` is ``drain_s``, cut short at the drain's
   deadline);
4. the root supervisor stops its remaining children in reverse start order,
   each within its shutdown deadline, and its own deadline is lowered to what
   is left of the drain budget;
5. the backbone closes: the pool (by the drain's deadline), the bridge, then
   the embedded servers (waited for, so none outlives the daemon);
6. log ``stopped``; the exit status is 0.

If the root supervisor fails (a child fails to start, or restart intensity is
exceeded) the daemon logs it at ``critical``, logs ``stopped`` and exits 1. A
:class:`~engine.errors.ConfigError` met while wiring (a value an actor's
constructor refuses) is no crash: one ``config invalid: FILE: $.path: message``
line per problem, no traceback, exit 2 — as ``triage check-config`` reports it
(:func:`~supervisors.tree.check_config` runs before anything starts, so most
such problems never get this far).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Final, TypeVar

import trio
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from actors.error_budget import BREAK_GLASS_ENV, enforce_freeze
from actors.phi_rules import phi_rules
from config import (
    Catalog,
    ConfigError,
    TriageConfig,
    catalog_path,
    describe_detector,
    load_catalog,
    load_config,
    located,
)
from engine.errors import TriageError
from engine.metrics import Metrics
from engine.runtime import Runtime, open_runtime
from providers.bridge import run
from providers.db import UnsafeRoleError
from supervisors.backbone import Backbone, StartAbandoned, StartGuard, open_backbone
from supervisors.demo import seed_demo_async
from supervisors.emulated import Emulated, Endpoints, open_emulators, resolve_endpoints
from supervisors.logging import json_logging
from supervisors.reload import Reloader
from supervisors.tree import (
    Phase,
    Readiness,
    Tree,
    build_tree,
    built_catalog,
    check_config,
    check_profiles,
)
from supervisors.vocabulary import METRICS, MITIGATIONS

__all__ = ["EXIT_FAILED", "EXIT_INVALID", "EXIT_OK", "Daemon", "main_run"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
#: A config problem found while wiring the tree (``triage check-config`` exits 2 too).
EXIT_INVALID: Final = 2

#: The signals that start a drain.
DRAIN_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)
#: The signal that reloads the config file (:mod:`supervisors.reload`).
RELOAD_SIGNAL: Final = signal.SIGHUP

log = logging.getLogger("triage.daemon")

E = TypeVar("E", bound=BaseException)


def _metrics(max_label_values: int) -> Metrics:
    """The engine's metrics plus the process, platform and GC collectors, on a fresh registry."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return Metrics(registry, max_label_values=max_label_values)


def log_catalog(catalog: Catalog, source: str) -> None:
    """One summary line (live and not-built row ids), then one debug line per row."""
    live = [row.id for row in catalog.rows if catalog.is_built(row.id)]
    not_built = [row.id for row in catalog.rows if not catalog.is_built(row.id)]
    summary = f"catalog: {len(live)}/{len(catalog.rows)} rows live"
    if live:
        summary += "; live: " + ",".join(map(str, live))
    if not_built:
        summary += "; not built: " + ",".join(map(str, not_built))
    log.info(
        summary,
        extra={"catalog": source, "live": live, "not_built": not_built},
    )
    for row in catalog.rows:
        log.debug(
            "catalog row",
            extra={
                "row": row.id,
                "row_name": row.name,
                "state": catalog.state(row),
                "detector": describe_detector(row.detector),
                "owner": row.owner,
                "owner_module": row.module,  # not "module": a LogRecord attribute
                "scenario": row.scenario,
            },
        )


class Daemon:
    """One run of the daemon: the tree, its readiness and the drain.

    ``wall`` is the wall clock for event and log timestamps (the one the log
    formatter reads too). ``handle_signals`` turns SIGTERM/SIGINT into a drain
    (off for in-process tests, which call :meth:`request_drain`).

    ``drain_grace_s`` keeps the listener serving that long after ``/readyz``
    turned 503, inside the drain budget, so that load balancers see the pod
    go unready before its connections close. It defaults to 0 until the config
    schema has a field for it.

    ``backbone`` brings up services, migrations and the database pool before the
    tree (off by default for in-process tests of the tree alone; ``triage run``
    turns it on). ``env`` is where ``TRIAGE_*_URL`` overrides are read.

    A Daemon is run once.
    """

    def __init__(
        self,
        config: TriageConfig,
        catalog: Catalog,
        *,
        source: str = "<config>",
        catalog_source: str = "<catalog>",
        wall: Callable[[], float] = time.time,
        handle_signals: bool = True,
        drain_grace_s: float = 0.0,
        backbone: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        check_profiles(config, source)
        if not 0.0 <= drain_grace_s < config.daemon.drain_s:
            raise ValueError("drain_grace_s must be >= 0 and below daemon.drain_s")
        self.config = config
        self.catalog = built_catalog(catalog)
        self.source = source
        self.catalog_source = catalog_source
        self.wall = wall
        self.handle_signals = handle_signals
        self.drain_grace_s = drain_grace_s
        self.use_backbone = backbone
        self.env: Mapping[str, str] = os.environ if env is None else env
        self.backbone: Backbone | None = None
        self.emulated: Emulated | None = None  # the loopback provider emulators, when enabled
        self.tree: Tree | None = None
        self.runtime: Runtime | None = None
        self.drain_reason: str | None = None
        self._wake = trio.Event()
        self._failure: BaseException | None = None
        self._root_scope = trio.CancelScope()
        self._start_guard = StartGuard()  # the backbone's start; a drain abandons it
        self.reloader: Reloader | None = None  # once the tree runs
        # SIGHUP before the reloader exists waits here (one pending reload is enough).
        self._reload_send, self._reload_receive = trio.open_memory_channel[str](1)

    # ------------------------------------------------------------------ control

    @property
    def readiness(self) -> Readiness | None:
        return self.tree.readiness if self.tree is not None else None

    @property
    def port(self) -> int | None:
        """The port the HTTP child is bound to (None before it listens)."""
        return self.tree.http.port if self.tree is not None else None

    def request_reload(self, trigger: str = "SIGHUP") -> None:
        """Ask for a config reload (what SIGHUP does); several pending ones make one."""
        with contextlib.suppress(trio.WouldBlock):
            self._reload_send.send_nowait(trigger)

    def request_drain(self, reason: str) -> None:
        """Start a drain (what SIGTERM does). ``/readyz`` turns 503 before this returns."""
        if self.drain_reason is not None:
            log.info("drain already in progress", extra={"reason": reason})
            return
        self.drain_reason = reason
        if self.tree is not None:
            self.tree.readiness.begin_drain()
        self._start_guard.abandon()
        self._wake.set()

    # ------------------------------------------------------------------ running

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> int:
        """Run until drained (0) or until the root supervisor fails (1).

        ``task_status.started(port)`` once the daemon is ready (``started(0)`` if a
        drain abandoned the backbone's start).
        """
        daemon = self.config.daemon
        started_at = trio.current_time()
        log.info(
            "starting",
            extra={
                "config": self.source,
                "pid": os.getpid(),
                "host": daemon.host,
                "port": daemon.port,
                "seed": daemon.seed,
                "log_level": daemon.log_level,
            },
        )
        log_catalog(self.catalog, self.catalog_source)
        code = EXIT_FAILED
        awaited = task_status is not trio.TASK_STATUS_IGNORED
        status = _StartedPort(task_status)
        try:
            async with open_runtime(
                seed=daemon.seed, metrics=_metrics(daemon.max_label_values), wall=self.wall
            ) as runtime:
                self.runtime = runtime
                async with trio.open_nursery() as nursery:
                    if self.handle_signals:
                        await nursery.start(self._watch_signals)
                    code = await self._run_with_backbone(runtime, status)
                    nursery.cancel_scope.cancel()  # the signal watcher
        except Exception as exc:  # a failed start: a child could not start, a port in use...
            refused = _sole(exc, UnsafeRoleError)
            invalid = _sole(exc, ConfigError)
            if invalid is not None:
                # A config problem found while wiring: one line per problem, each with
                # its file and TOML path, and no traceback (as `triage check-config`).
                for problem in invalid.problems:
                    log.critical(
                        "config invalid: %s",
                        problem,
                        extra={"source": problem.source, "path": problem.path},
                    )
                code = EXIT_INVALID
            elif refused is not None:
                log.critical(
                    "database role refused: %s",
                    refused,
                    extra={"role": self.config.database.daemon_role},
                )
            else:
                log.critical("daemon failed", exc_info=exc)
            if awaited and not status.flag:
                # ``await nursery.start(daemon.run)``: the caller gets why, not trio's
                # "child exited without calling task_status.started()".
                raise DaemonStartFailed(code, exc) from exc
        finally:
            if self.tree is not None:
                self.tree.readiness.mark_stopped()
                self.tree.unsubscribe()
                if self.tree.dashboard is not None:
                    self.tree.dashboard.close()
            log.info(
                "stopped",
                extra={
                    "exit_code": code,
                    "reason": self.drain_reason,
                    "uptime_s": trio.current_time() - started_at,
                },
            )
        return code

    async def _run_with_backbone(self, runtime: Runtime, task_status: trio.TaskStatus[int]) -> int:
        async with contextlib.AsyncExitStack() as stack:
            endpoints: Endpoints | None = None
            if self.use_backbone:
                try:
                    self.backbone = await stack.enter_async_context(
                        open_backbone(self.config, self.env, guard=self._start_guard)
                    )
                except StartAbandoned:
                    log.info("start abandoned", extra={"reason": self.drain_reason})
                    task_status.started(0)  # nothing listens: port 0
                    return EXIT_OK
                if self.config.slo.enabled:
                    # The error-budget policy: changed adapters are refused during a freeze
                    # (BudgetFrozen, a ConfigError: one line per section, exit 2).
                    await enforce_freeze(
                        self.backbone.pool,
                        self.config,
                        source=self.source,
                        today=datetime.fromtimestamp(self.wall(), UTC).date(),
                        break_glass=self.env.get(BREAK_GLASS_ENV) or None,
                    )
                endpoints = await self._open_providers(stack)
            return await self._run(runtime, self.backbone, task_status, endpoints)
        raise AssertionError("unreachable")  # pragma: no cover - mypy: the stack may swallow

    async def _open_providers(self, stack: contextlib.AsyncExitStack) -> Endpoints:
        """The providers' endpoints: the loopback emulators (``[emulators] enabled``),
        else the configured vendors (a :class:`ConfigError` names what is missing)."""
        config = self.config
        if config.emulators.seed_demo and self.backbone is not None:
            tenant = await run(
                seed_demo_async, self.backbone.services.postgres_url, service="postgres"
            )
            log.info("demo tenant ready", extra={"tenant_id": str(tenant)})
        if not config.emulators.enabled:
            return resolve_endpoints(config, self.env)
        emulated = self.emulated = await stack.enter_async_context(open_emulators(config))
        log.info(
            "provider emulators listening",
            extra={name: server.url for name, server in emulated.servers.items()}
            | {"smtp": f"{emulated.endpoints.smtp_host}:{emulated.endpoints.smtp_port}"},
        )
        return emulated.endpoints

    def _point_providers_at(self, tree: Tree) -> None:
        """Once the daemon listens: receipts, bounces and callbacks come to its address."""
        if tree.http.port is None:
            return
        host = self.config.daemon.host
        base = (
            f"http://[{host}]:{tree.http.port}"
            if ":" in host
            else f"http://{host}:{tree.http.port}"
        )
        if self.emulated is not None:
            self.emulated.point_receipts_at(base)
        if tree.channels is not None:
            tree.channels.set_public_base(base)

    async def _run(
        self,
        runtime: Runtime,
        backbone: Backbone | None,
        task_status: trio.TaskStatus[int],
        endpoints: Endpoints | None = None,
    ) -> int:
        # Whatever the wiring refuses without a place of its own is placed in the file.
        with located(self.source, "$"):
            tree = self.tree = build_tree(
                self.config,
                self.catalog,
                runtime,
                source=self.source,
                backbone=backbone,
                endpoints=endpoints,
            )
        try:
            return await self._serve(tree, task_status)
        finally:
            if tree.channels is not None:
                with trio.CancelScope(shield=True):
                    await tree.channels.aclose()
            if tree.virtual is not None:
                with trio.CancelScope(shield=True):
                    await tree.virtual.aclose()

    async def _serve(self, tree: Tree, task_status: trio.TaskStatus[int]) -> int:
        if self.drain_reason is not None:  # requested before the tree existed
            tree.readiness.begin_drain()
        root_stopped = trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(self._supervise, tree, root_stopped)
            self._point_providers_at(tree)
            tree.readiness.mark_running()
            if tree.readiness.phase is Phase.RUNNING:
                log.info(
                    "ready",
                    extra={
                        "host": self.config.daemon.host,
                        "port": tree.http.port,
                        "children": [c.id for c in tree.root.which_children()],
                    },
                )
            reloads = trio.CancelScope()
            nursery.start_soon(self._watch_reloads, tree, reloads)
            task_status.started(tree.http.port if tree.http.port is not None else 0)
            await self._wake.wait()
            reloads.cancel()  # no reload during a drain
            if self.drain_reason is not None and not root_stopped.is_set():
                await self._drain(tree, root_stopped, self.drain_reason)
        if self._failure is not None:
            log.critical("root supervisor failed", exc_info=self._failure)
            return EXIT_FAILED
        return EXIT_OK

    async def _supervise(
        self,
        tree: Tree,
        root_stopped: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the root supervisor until the drain cancels it; record its failure if it fails.

        A failure to start propagates out of ``nursery.start`` (the daemon then
        exits 1); a failure after the start is recorded and wakes the daemon.
        """
        status = _Started(task_status)
        try:
            with self._root_scope:
                await tree.root.run(task_status=status)
            if not self._root_scope.cancelled_caught:
                self._failure = RuntimeError("the root supervisor returned")
        except Exception as exc:
            if not status.flag:
                raise
            self._failure = exc
        finally:
            root_stopped.set()
            self._wake.set()

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(*DRAIN_SIGNALS, RELOAD_SIGNAL) as signals:
            task_status.started()
            async for signum in signals:
                if signum == RELOAD_SIGNAL:
                    self.request_reload(signal.Signals(signum).name)
                else:
                    self.request_drain(signal.Signals(signum).name)

    async def _watch_reloads(self, tree: Tree, scope: trio.CancelScope) -> None:
        """Reload on request (SIGHUP) and when the file changes (``daemon.reload_poll_s``)."""
        assert self.runtime is not None
        reloader = self.reloader = Reloader(
            self.config,
            self.catalog,
            self.runtime,
            tree.detectors,
            source=self.source,
            pool=self.backbone.pool if self.backbone is not None else None,
            env=self.env,
            started_at=datetime.fromtimestamp(self.wall(), UTC),
        )
        with scope:
            async with trio.open_nursery() as nursery:
                if reloader.watchable:
                    nursery.start_soon(reloader.poll, self.request_reload)
                async for trigger in self._reload_receive:
                    await reloader.reload(trigger)
                    self.config = reloader.config

    async def _drain(self, tree: Tree, root_stopped: trio.Event, reason: str) -> None:
        drain_s = self.config.daemon.drain_s
        begun = trio.current_time()
        deadline = begun + drain_s
        if self.backbone is not None:
            self.backbone.deadline = deadline  # the pool closes by then too
        tree.readiness.begin_drain()
        log.info(
            "draining",
            extra={"reason": reason, "drain_s": drain_s, "grace_s": self.drain_grace_s},
        )
        with trio.move_on_at(deadline):
            if self.drain_grace_s > 0:
                await trio.sleep(self.drain_grace_s)
            tree.http.shutdown()
            await tree.http.wait_stopped()
        remaining = deadline - trio.current_time()
        if remaining > 0:
            # The root's shielded stop is bounded by its own shutdown_s: fit it
            # into what is left of the drain budget.
            tree.root.shutdown_s = min(tree.root.shutdown_s, remaining)
        self._root_scope.cancel()
        await root_stopped.wait()
        elapsed = trio.current_time() - begun
        if elapsed > drain_s:
            log.warning(
                "drain overran its budget", extra={"elapsed_s": elapsed, "drain_s": drain_s}
            )
        else:
            log.info("drained", extra={"elapsed_s": elapsed, "drain_s": drain_s})


def _sole(exc: BaseException, kind: type[E]) -> E | None:
    """``exc`` if it is a ``kind``, or the one ``kind`` inside nested single-member groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, kind) else None


class DaemonStartFailed(TriageError):
    """The daemon failed before it was ready (raised to a caller that awaited its start)."""

    def __init__(self, code: int, cause: BaseException) -> None:
        super().__init__(f"the daemon did not start (exit {code}): {cause!r}")
        self.code = code
        self.cause = cause


class _StartedPort:
    """A task_status proxy for the daemon's port that remembers ``started()``."""

    __slots__ = ("flag", "real")

    def __init__(self, real: trio.TaskStatus[int]) -> None:
        self.real = real
        self.flag = False

    def started(self, value: int = 0) -> None:
        self.flag = True
        self.real.started(value)


class _Started:
    """A task_status proxy that remembers whether ``started()`` was called."""

    __slots__ = ("flag", "real")

    def __init__(self, real: trio.TaskStatus[None]) -> None:
        self.real = real
        self.flag = False

    def started(self, value: None = None) -> None:
        self.flag = True
        self.real.started()


def main_run(config_path: str) -> int:
    """``triage run --config FILE``: the daemon's exit status (0 after a drain).

    Raises :class:`config.ConfigError` for a bad config or catalog before
    anything starts (the CLI prints each problem and exits 2).
    """
    config = load_config(config_path)
    catalog_file = catalog_path(config, config_path)
    catalog = load_catalog(catalog_file, metrics=METRICS, mitigations=MITIGATIONS)
    wall = time.time
    redact = phi_rules(config.phi).redact_value  # row 11: no PHI value reaches a log line
    # The dry build of check_config logs too (a missing clamd): as JSON, like the rest.
    with json_logging(
        config.daemon.log_level, wall=wall, log_file=config.daemon.log_file, redact=redact
    ):
        try:
            check_config(config, catalog, config_path)  # what `triage check-config` checks
            if not config.emulators.enabled:
                resolve_endpoints(config)  # every provider's address and secrets, or a ConfigError
        except ConfigError as exc:
            # resolve_endpoints knows no file: its problems are in this one.
            placed = (replace(p, source=config_path) if p.source == "<config>" else p
                      for p in exc.problems)  # fmt: skip
            raise ConfigError(placed) from exc
        daemon = Daemon(
            config,
            catalog,
            source=config_path,
            catalog_source=str(catalog_file),
            wall=wall,
            drain_grace_s=config.daemon.drain_grace_s,
            backbone=True,
        )
        return trio.run(daemon.run)
