"""The channels wired from config: adapters, guards, failover, dispatchers, receipts, rows.

:func:`build_channels` is what the daemon (and the chaos scenarios and the
dispatch bench, so that they measure the same wiring) calls with the backbone
and the resolved provider :class:`~supervisors.emulated.Endpoints`:

=========================  ===================================================
piece                      from
=========================  ===================================================
one adapter per vendor     ``[providers.<vendor>]``; its httpx timeout is the
                           guard's ``timeout_s`` (the transport keeps the
                           deadline: ``deadline_enforced_by_transport``)
one Guard per vendor       ``[guards.<providers.vendor.guard>]``: bulkhead,
                           breaker, rate limit; its retry runs *between
                           failover rounds*, never inside a route (a retry
                           inside would resend an unsettled timeout)
one Failover per route     ``[channels]`` order (push: by token platform);
                           ``[dispatch] settle_timeout_s / requeue_after_s /
                           give_up_after_s``
dispatchers + service      ``[dispatch]``, ``[mailboxes.dispatcher]``,
                           ``[supervisors.providers]``
HTTP API, NATS commands    ``POST /v1/dispatches``; ``[dispatch] nats_subject``,
                           ``[mailboxes.commands]``
DLR ingress (row 13)       ``/webhooks/dlr/{ghasi,twilio}``,
                           ``/webhooks/bounces/smtp``; ``[dlr]``
push feedback (row 2)      ``[push_feedback]``: FCM and APNs feedback sources,
                           the stall watchdog, the stale sweep
crash backlog              ``[dispatch] requeue_after_s / resume_lease_s /
                           resume_interval_s / backlog_batch``: queued rows of
                           every tenant, claimed, to their dispatchers
status sweep               ``[status_sweep]``: SMS/email rows without a receipt,
                           asked (Ghasi, Twilio), then ``unknown``
bounce tracker (row 3)     ``[bounces]`` and the row's detector
template registry (19)     ``[dispatch] template_cache_*``
=========================  ===================================================

Each catalog row's detector is the row's own unless a ``[detectors.*]`` section
watches the row's metric (``config/chaos.toml`` shortens windows that way);
row 1 gets one detector per SMS provider (the rule is per adapter).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import httpx

from actors.backlog_resumer import BacklogMessage, DbBacklogStore, backlog_resumer_child
from actors.bounce_tracker import ROW as BOUNCE_ROW
from actors.bounce_tracker import (
    BounceBoard,
    BounceFeed,
    BounceRules,
    BounceTracker,
    DbBlockStore,
    bounce_tracker_child,
)
from actors.counted_sends import CountedSends
from actors.dispatch_commands import CommandsMessage, dispatch_commands_child
from actors.dispatch_request import DispatchLimits
from actors.dispatcher import DispatcherChild, DispatchService, dispatcher_child
from actors.dlr_ingress import ROW as DLR_ROW
from actors.dlr_ingress import DlrIngress, dlr_pool_child
from actors.failover import ROW as SMS_ROW
from actors.failover import Failover, Route
from actors.group_commit import GroupCommit, group_commit_child
from actors.push_feedback import ROW as FEEDBACK_ROW
from actors.push_feedback import (
    FeedbackHistory,
    FeedbackMessage,
    PushFeedback,
    SweepMessage,
    push_feedback_child,
    stale_sweep_child,
)
from actors.receipt_applier import ReceiptApplier
from actors.status_sweep import (
    DbUnsettledStore,
    StatusQuery,
    StatusSweepMessage,
    status_sweep_child,
)
from actors.templates import ROW as TEMPLATE_ROW
from actors.templates import TemplateRegistry
from config import Catalog, ConfigError, ConfigProblem, TriageConfig, engine_kwargs, located
from config.catalog import alert_name, module_path, row_override
from engine.actor import ActorRef, Overflow
from engine.breaker import Breaker
from engine.bulkhead import Bulkhead
from engine.detectors import (
    AgeOfNewestDetector,
    CountInWindowDetector,
    DetectorSet,
    RatioDetector,
    SpikeOverBaselineDetector,
    make_detector,
)
from engine.guard import Guard
from engine.ratelimit import RateLimiter
from engine.retry import RetryPolicy
from engine.runtime import Runtime
from engine.supervisor import ChildSpec
from providers.apns import ApnsAdapter, apns_client
from providers.bounces import bounce_parser
from providers.channel import Adapter, ChannelName, Receipt
from providers.db.dispatches import (
    AcceptRequest,
    AcceptResult,
    OutcomeRecord,
    ReceiptResult,
    TransitionResult,
    accept_batch_async,
    apply_receipt_batch_async,
    mark_stale_unknown_async,
    outstanding_async,
    record_outcomes_async,
)
from providers.fcm import FcmAdapter
from providers.ghasi import GhasiAdapter, parse_ghasi_receipt
from providers.http_transport import Http1Transport
from providers.push_feedback import FeedbackSource
from providers.services import postgres_url_with
from providers.smtp import SmtpAdapter
from providers.twilio import TwilioAdapter, parse_twilio_receipt
from supervisors.dispatch_api import DispatchApi
from supervisors.emulated import Endpoints, ghasi_wire
from supervisors.singleton import singleton_specs

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

    from actors.phi_guard import PhiGuard
    from supervisors.backbone import Backbone

__all__ = [
    "CHANNEL_MODULES",
    "CHANNEL_ROWS",
    "Channels",
    "build_channels",
    "channel_problems",
    "channel_profiles",
]

#: Catalog rows whose detectors the channels build (the tree leaves them out): the
#: ``ROW`` of each actor module below.
CHANNEL_ROWS: Final = frozenset({SMS_ROW, FEEDBACK_ROW, BOUNCE_ROW, DLR_ROW, TEMPLATE_ROW})
#: The actor modules the channels wire, as the catalog's ``module`` names them.
CHANNEL_MODULES: Final = frozenset(
    module_path(cls.__module__)
    for cls in (Failover, PushFeedback, BounceTracker, DlrIngress, TemplateRegistry)
)


def channel_profiles(config: TriageConfig) -> list[tuple[str, str]]:
    """Profiles the channels need, as (section, name): the tree refuses to start without."""
    p = config.providers
    needed = [("mailboxes", "dispatcher"), ("mailboxes", "bounces"), ("mailboxes", "push_feedback")]
    needed.append(("mailboxes", "commands"))
    needed.append(("mailboxes", "sweeps"))
    needed.append(("mailboxes", "commits"))  # the group commits (build_channels reads it)
    needed.append(("supervisors", "providers"))
    needed += [("guards", getattr(p, vendor).guard) for vendor in _VENDORS]
    needed.append(("rate_limits", config.dlr.rate_limit))
    out: list[tuple[str, str]] = []
    for section, name in needed:
        if (section, name) not in out:
            out.append((section, name))
    return out


_VENDORS: Final = ("ghasi", "twilio", "fcm", "apns", "smtp")


def channel_problems(config: TriageConfig, source: str = "<config>") -> list[ConfigProblem]:
    """Every profile the channels need that ``config`` lacks, and guards naming an unknown
    retry profile, as problems in ``source`` (:func:`build_channels` refuses them)."""
    problems = [
        ConfigProblem(
            source=source,
            line=None,
            path=f"$.{section}.{name}",
            message=f"missing profile [{section}.{name}] (the channels use it)",
        )
        for section, name in channel_profiles(config)
        if name not in getattr(config, section)
    ]
    mailbox = config.mailboxes.get("dispatcher")
    if mailbox is not None and mailbox.overflow != "wait":
        problems.append(
            ConfigProblem(
                source=source,
                line=None,
                path="$.mailboxes.dispatcher.overflow",
                message=f"must be 'wait', got {mailbox.overflow!r} (the dispatchers' sends"
                " report back through their mailboxes)",
            )
        )
    problems += _sweep_problems(config, source)
    for vendor in _VENDORS:
        guard = config.guards.get(getattr(config.providers, vendor).guard)
        if guard is not None and guard.retry not in config.retries:
            problems.append(
                ConfigProblem(
                    source=source,
                    line=None,
                    path=f"$.guards.{getattr(config.providers, vendor).guard}.retry",
                    message=f"unknown retries profile {guard.retry!r}",
                )
            )
    return problems


def _sweep_problems(config: TriageConfig, source: str) -> list[ConfigProblem]:
    """What the backlog resumer and the status sweep would refuse (issue 13)."""
    problems: list[ConfigProblem] = []
    sweeps = config.mailboxes.get("sweeps")
    if sweeps is not None and sweeps.overflow != "wait":
        problems.append(
            ConfigProblem(
                source=source,
                line=None,
                path="$.mailboxes.sweeps.overflow",
                message=f"must be 'wait', got {sweeps.overflow!r} (the backlog resumer's and"
                " the status sweep's tasks report back through their mailboxes)",
            )
        )
    dispatch = config.dispatch
    if not dispatch.resume_lease_s > 2 * dispatch.resume_interval_s:
        problems.append(
            ConfigProblem(
                source=source,
                line=None,
                path="$.dispatch.resume_lease_s",
                message=f"must be more than twice resume_interval_s"
                f" ({dispatch.resume_interval_s:g}), got {dispatch.resume_lease_s:g} (the"
                " claims of held rows are renewed when they would lapse within two turns)",
            )
        )
    return problems


@dataclass
class Channels:
    """Everything :func:`build_channels` wired."""

    service: DispatchService
    adapters: dict[str, Adapter]
    guards: dict[str, Guard]
    failovers: dict[str, Failover]
    ingress: DlrIngress
    api: DispatchApi
    commands: ActorRef[CommandsMessage]
    templates: TemplateRegistry
    tracker: BounceFeed
    feedback: ActorRef[FeedbackMessage]
    sweep: ActorRef[SweepMessage]
    backlog: ActorRef[BacklogMessage]
    status_sweep: ActorRef[StatusSweepMessage]
    sources: list[FeedbackSource] = field(default_factory=list)
    specs: list[ChildSpec] = field(default_factory=list)
    mounts: dict[str, ASGIFramework] = field(default_factory=dict)

    def set_public_base(self, url: str) -> None:
        """The daemon's own address, once it listens: Twilio's StatusCallback base."""
        twilio = self.adapters.get("twilio")
        if isinstance(twilio, TwilioAdapter) and twilio.callback_base is None:
            twilio.callback_base = url.rstrip("/")

    async def aclose(self) -> None:
        """Close every provider connection (adapters, feedback sessions)."""
        for adapter in self.adapters.values():
            await adapter.aclose()
        for source in self.sources:
            await source.aclose()


def _row_config(config: TriageConfig, catalog: Catalog, row: int) -> Any:
    return row_override(config, catalog.row(row))


def _detector(
    config: TriageConfig,
    catalog: Catalog,
    runtime: Runtime,
    detectors: DetectorSet,
    row: int,
    kind: type[Any],
    suffix: str = "",
) -> Any:
    name = alert_name(catalog.row(row)) + suffix
    detector = make_detector(
        name,
        row=row,
        **engine_kwargs(_row_config(config, catalog, row)),
        clock=runtime.clock,
        events=runtime.events,
        metrics=runtime.metrics,
    )
    detectors.add(detector)
    return detector.expect(kind)


def _guard(config: TriageConfig, vendor: str, runtime: Runtime) -> tuple[Guard, RetryPolicy]:
    """The vendor's route guard (no retry inside) and its retry profile (for the rounds)."""
    profile = config.guards[getattr(config.providers, vendor).guard]
    common: dict[str, Any] = {"metrics": runtime.metrics}
    breaker = Breaker(
        vendor,
        **engine_kwargs(config.breakers[profile.breaker]),
        clock=runtime.clock,
        events=runtime.events,
        metrics=runtime.metrics,
    )
    runtime.tunables.breaker(profile.breaker, breaker)  # a reload retunes it in place
    bulkhead = runtime.tunables.bulkhead(  # a reload retunes it in place
        profile.bulkhead,
        Bulkhead(vendor, **engine_kwargs(config.bulkheads[profile.bulkhead]), **common),
    )
    limiter = None
    if profile.rate_limit is not None:
        limiter = RateLimiter(
            vendor, **engine_kwargs(config.rate_limits[profile.rate_limit]), **common
        )
    rounds = RetryPolicy(
        f"{vendor}_rounds",
        **engine_kwargs(config.retries[profile.retry]),
        chance=runtime.chance.fork(f"{vendor}_rounds"),
        **common,
    )
    single = RetryPolicy(
        vendor,
        max_attempts=1,
        time_budget_s=profile.timeout_s,
        backoff_initial_s=0.0,
        backoff_max_s=0.0,
        backoff_multiplier=1.0,
        jitter=0.0,
    )
    guard = Guard(
        vendor,
        breaker=breaker,
        bulkhead=bulkhead,
        retry=single,
        timeout_s=profile.timeout_s,
        rate_limiter=limiter,
        deadline_enforced_by_transport=True,
    )
    return guard, rounds


def _adapters(
    config: TriageConfig,
    endpoints: Endpoints,
    guards: Mapping[str, Guard],
    wall: Callable[[], float],
) -> dict[str, Adapter]:
    """One adapter per vendor; those that read the wall clock (token lifetimes,
    Retry-After dates, Twilio's status window) read ``wall``. The HTTP/1.1 vendors each
    get their own ``[providers.http]`` pool (:class:`Http1Transport`)."""
    p = config.providers
    http = engine_kwargs(p.http)
    return {
        "ghasi": GhasiAdapter(
            "ghasi",
            base_url=endpoints.ghasi_url,
            api_key=endpoints.ghasi_api_key,
            sender=p.ghasi.sender,
            timeout_s=guards["ghasi"].timeout_s,
            wire=ghasi_wire(config),
            transport=Http1Transport(**http),
        ),
        "twilio": TwilioAdapter(
            "twilio",
            base_url=endpoints.twilio_url,
            account_sid=p.twilio.account_sid,
            auth_token=endpoints.twilio_auth_token,
            from_number=p.twilio.from_number,
            timeout_s=guards["twilio"].timeout_s,
            callback_base=config.dlr.callback_base_url,
            transport=Http1Transport(**http),
            clock=wall,
        ),
        "fcm": FcmAdapter(
            "fcm",
            client=httpx.AsyncClient(
                timeout=guards["fcm"].timeout_s, transport=Http1Transport(**http)
            ),
            account=endpoints.fcm_account,
            refresh_margin_s=p.fcm.refresh_margin_s,
            token_lifetime_s=p.fcm.assertion_lifetime_s,
            base_url=endpoints.fcm_url,
            now=wall,
        ),
        "apns": ApnsAdapter(
            "apns",
            client=apns_client(
                timeout_s=guards["apns"].timeout_s, keepalive_expiry_s=p.apns.keepalive_expiry_s
            ),
            team_id=p.apns.team_id,
            key_id=p.apns.key_id,
            private_key=endpoints.apns_private_key,
            topic=p.apns.topic,
            token_refresh_s=p.apns.token_refresh_s,
            expiration_s=p.apns.expiration_s,
            priority=p.apns.priority,
            base_url=endpoints.apns_url,
            now=wall,
        ),
        "smtp": SmtpAdapter(
            "smtp",
            host=endpoints.smtp_host,
            port=endpoints.smtp_port,
            sender=p.smtp.sender,
            helo_name=p.smtp.helo_name,
            timeout_s=guards["smtp"].timeout_s,
            username=endpoints.smtp_username,
            password=endpoints.smtp_password,
        ),
    }


def build_channels(
    config: TriageConfig,
    catalog: Catalog,
    runtime: Runtime,
    backbone: Backbone,
    detectors: DetectorSet,
    endpoints: Endpoints,
    *,
    shutdown_s: float,
    idempotency: Any = None,
    wall: Callable[[], float] = time.time,
    source: str = "<config>",
    phi_guard: PhiGuard | None = None,
) -> Channels:
    """Wire the channels (nothing runs yet); see the module docstring.

    A :class:`ConfigError` names ``source`` and the TOML path of what is wrong."""
    problems = channel_problems(config, source)
    if problems:
        raise ConfigError(problems)
    registry = runtime.metrics.registry if runtime.metrics is not None else None
    dispatch = config.dispatch

    guards: dict[str, Guard] = {}
    rounds: dict[str, RetryPolicy] = {}
    for vendor in _VENDORS:
        guards[vendor], rounds[vendor] = _guard(config, vendor, runtime)
    with located(source, "$.providers"):
        adapters = _adapters(config, endpoints, guards, wall)

    # Row 3: the bounce tracker counts every accepted email and every bounce.
    bounce_cfg = _row_config(config, catalog, BOUNCE_ROW)
    bounces = config.bounces
    rules = BounceRules.of(
        **engine_kwargs(bounce_cfg),
        disable_after_s=bounces.disable_after_s,
        ceiling_ratio=bounces.ceiling_ratio,
        throttle_rate_per_s=bounces.throttle_rate_per_s,
        max_keys=bounces.max_keys,
        evaluate_interval_s=config.daemon.detector_tick_s,
        reload_interval_s=bounces.reload_interval_s,
    )
    tracker_mailbox = config.mailboxes["bounces"]
    tracker_spec, tracker = bounce_tracker_child(
        rules,
        store=DbBlockStore(backbone.pool.asyncpg_pool),
        board=BounceBoard(rules.throttle_rate_per_s),
        capacity=tracker_mailbox.capacity,
        overflow=Overflow(tracker_mailbox.overflow),
        shutdown_s=shutdown_s,
        deadlines=runtime.deadlines,
        detector=_detector(config, catalog, runtime, detectors, BOUNCE_ROW, RatioDetector),
        events=runtime.events,
        metrics=runtime.metrics,
        clock=runtime.clock,
    )
    routed: dict[str, Adapter] = dict(adapters)
    routed["smtp"] = CountedSends(adapters["smtp"], tracker)

    # Row 1: one error-ratio detector per SMS provider.
    sms_ratio = {
        vendor: _detector(config, catalog, runtime, detectors, SMS_ROW, RatioDetector, f"_{vendor}")
        for vendor in config.channels.sms
    }

    def failover(name: str, vendors: Sequence[str], ratio: Any = None) -> Failover:
        return Failover(
            name,
            [Route(routed[v], guards[v]) for v in vendors],
            rounds=rounds[vendors[0]],
            status_timeout_s=dispatch.settle_timeout_s,
            requeue_after_s=dispatch.requeue_after_s,
            give_up_after_s=dispatch.give_up_after_s,
            registry=registry,
            error_ratio=ratio,
        )

    failovers = {
        "sms": failover("sms", config.channels.sms, sms_ratio),
        "email": failover("email", config.channels.email),
        **{f"push_{v}": failover(f"push_{v}", [v]) for v in config.channels.push},
    }
    mailbox = config.mailboxes["dispatcher"]
    throttle = RateLimiter(
        "category_throttle",
        rate_per_s=bounces.throttle_rate_per_s,
        burst=bounces.throttle_burst,
        max_keys=bounces.max_keys,
        metrics=runtime.metrics,
    )

    # The group commits (actors/group_commit.py): accepts and send outcomes, one
    # statement / one transaction per batch instead of one transaction per request.
    commits = config.mailboxes["commits"]
    accepts: GroupCommit[AcceptRequest, AcceptResult] = GroupCommit(
        "accept_commit", accept_batch_async, batch_max=dispatch.accept_batch_max
    )
    outcomes: GroupCommit[OutcomeRecord, list[TransitionResult]] = GroupCommit(
        "outcome_commit", record_outcomes_async, batch_max=dispatch.outcome_batch_max
    )
    receipts: GroupCommit[Receipt, ReceiptResult] = GroupCommit(
        "receipt_commit", apply_receipt_batch_async, batch_max=config.dlr.commit_batch_max
    )
    commit_specs = [
        group_commit_child(
            board, backbone.pool, mailbox=commits, shutdown_s=shutdown_s,
            deadlines=runtime.deadlines, metrics=runtime.metrics,
        )[0]
        for board in (accepts, outcomes, receipts)
    ]  # fmt: skip

    def dispatcher(channel: ChannelName, routes: Mapping[str, Failover]) -> DispatcherChild:
        return dispatcher_child(
            channel,
            backbone.pool,
            routes,
            capacity=mailbox.capacity,
            overflow=Overflow(mailbox.overflow),
            concurrency=dispatch.concurrency,
            record_attempts=dispatch.record_attempts,
            record_backoff_s=dispatch.record_backoff_s,
            max_parked=dispatch.max_parked,
            throttle=throttle,
            shutdown_s=shutdown_s,
            metrics=runtime.metrics,
            outcomes=outcomes,
        )

    dispatchers = [
        dispatcher(ChannelName.SMS, {"default": failovers["sms"]}),
        dispatcher(ChannelName.EMAIL, {"default": failovers["email"]}),
        dispatcher(ChannelName.PUSH, {v: failovers[f"push_{v}"] for v in config.channels.push}),
    ]
    templates = TemplateRegistry(
        backbone.pool,
        ttl_s=dispatch.template_cache_ttl_s,
        max_entries=dispatch.template_cache_max,
        registry=registry,
        events=runtime.events,
        clock=runtime.clock,
        detector=_detector(
            config, catalog, runtime, detectors, TEMPLATE_ROW, CountInWindowDetector
        ),
        severity=catalog.row(TEMPLATE_ROW).severity,
    )
    service = DispatchService(
        backbone.pool,
        templates,
        dispatchers,
        limits=DispatchLimits.of(dispatch),
        key_ttl_s=config.idempotency.key_ttl_s,
        phi_guard=phi_guard,  # row 11 (supervisors/phi.py)
        idempotency=idempotency,
        accepts=accepts,
        registry=registry,
        runtime=runtime,
        channels_supervisor=engine_kwargs(config.supervisors["providers"]),
    )
    sweeps_mailbox = config.mailboxes["sweeps"]
    backlog_spec, backlog = backlog_resumer_child(
        DbBacklogStore(backbone.pool),
        dispatchers,
        older_than_s=dispatch.requeue_after_s,
        lease_s=dispatch.resume_lease_s,
        batch=dispatch.backlog_batch,
        interval_s=dispatch.resume_interval_s,
        capacity=sweeps_mailbox.capacity,
        overflow=Overflow(sweeps_mailbox.overflow),
        shutdown_s=shutdown_s,
        registry=registry,
        metrics=runtime.metrics,
    )
    sink = ReceiptApplier(backbone.pool, tracker, db_units=config.dlr.db_units, commits=receipts)

    # Row 13: the DLR and bounce webhooks.
    dlr = config.dlr
    secret_g = endpoints.ghasi_receipt_secret
    ghasi_cfg = config.providers.ghasi
    wire = ghasi_wire(config)

    def ghasi_parser(url: str, headers: Mapping[str, str], body: bytes) -> list[Receipt]:
        return [
            parse_ghasi_receipt(
                headers,
                body,
                secret=secret_g,
                now=wall(),
                tolerance_s=ghasi_cfg.receipt_tolerance_s,
                wire=wire,
            )
        ]

    token = endpoints.twilio_auth_token

    def twilio_parser(url: str, headers: Mapping[str, str], body: bytes) -> list[Receipt]:
        return [parse_twilio_receipt(url, headers, body, auth_token=token)]

    pool_spec, pool = dlr_pool_child(
        sink=sink,
        queue_capacity=dlr.queue_capacity,
        workers_min=dlr.workers_min,
        workers_max=dlr.workers_max,
        scale_up_depth=dlr.scale_up_depth,
        scale_up_after_s=dlr.scale_up_after_s,
        scale_down_after_s=dlr.scale_down_after_s,
        batch_max=dlr.batch_max,
        shutdown_s=shutdown_s,
        registry=registry,
        metrics=runtime.metrics,
    )
    ingress = DlrIngress(
        pool=pool,
        limiter=RateLimiter(
            "dlr", **engine_kwargs(config.rate_limits[dlr.rate_limit]), metrics=runtime.metrics
        ),
        dlr_parsers={"ghasi": ghasi_parser, "twilio": twilio_parser},
        bounce_parsers={"smtp": bounce_parser(endpoints.smtp_bounce_secret, provider="smtp")},
        max_body_bytes=dlr.max_body_bytes,
        queue_capacity=dlr.queue_capacity,
        ack_timeout_s=dlr.ack_timeout_s,
        retry_after_s=dlr.retry_after_s,
        public_base_url=dlr.callback_base_url,
        detector=_detector(config, catalog, runtime, detectors, DLR_ROW, SpikeOverBaselineDetector),
        registry=registry,
    )

    # Row 2: push feedback, its watchdog and the stale sweep.
    pf = config.push_feedback
    p = config.providers
    sources = [
        FeedbackSource(
            "fcm",
            endpoints.fcm_feedback_url,
            p.fcm.feedback_subscription,
            pf.pull_timeout_s,
            pf.max_messages,
        ),
        FeedbackSource(
            "apns",
            endpoints.apns_feedback_url,
            p.apns.feedback_subscription,
            pf.pull_timeout_s,
            pf.max_messages,
        ),
    ]

    async def outstanding() -> int:
        count: int = await backbone.pool.run_unit(outstanding_async, ChannelName.PUSH.value)
        return count

    push_mailbox = config.mailboxes["push_feedback"]
    feedback_age = _detector(config, catalog, runtime, detectors, FEEDBACK_ROW, AgeOfNewestDetector)
    feedback_spec, feedback = push_feedback_child(
        sources=sources,
        sink=sink,
        outstanding=outstanding,
        poll_interval_s=pf.poll_interval_s,
        batch_size=pf.max_messages,
        stall_after_s=pf.stall_after_s,
        watchdog_interval_s=pf.watchdog_interval_s,
        severity=catalog.row(FEEDBACK_ROW).severity,
        history=FeedbackHistory(),
        capacity=push_mailbox.capacity,
        overflow=Overflow(push_mailbox.overflow),
        shutdown_s=shutdown_s,
        detector=feedback_age,
        events=runtime.events,
        registry=registry,
        metrics=runtime.metrics,
        clock=runtime.clock,
    )

    async def sweeper(channel: str, older_than_s: float, limit: int) -> int:
        marked = await backbone.pool.run_unit(
            mark_stale_unknown_async, channel, older_than_s, limit
        )
        return len(marked)

    sweep_spec, sweep = stale_sweep_child(
        sweeper=sweeper,
        stale_after_s=pf.stale_after_s,
        sweep_interval_s=pf.sweep_interval_s,
        sweep_limit=pf.sweep_batch,
        capacity=push_mailbox.capacity,
        overflow=Overflow(push_mailbox.overflow),
        shutdown_s=shutdown_s,
        registry=registry,
        metrics=runtime.metrics,
    )

    # SMS and email rows whose receipt never came: asked about, then unknown (issue 13).
    ss = config.status_sweep
    queries = {
        name: adapter
        for name, adapter in adapters.items()
        if adapter.channel in (ChannelName.SMS, ChannelName.EMAIL)
        and isinstance(adapter, StatusQuery)
    }
    status_spec, status = status_sweep_child(
        store=DbUnsettledStore(backbone.pool),
        sink=sink,
        queries=queries,
        deadlines={
            ChannelName.SMS: ss.sms_stale_after_s,
            ChannelName.EMAIL: ss.email_stale_after_s,
        },
        query_after_s=ss.query_after_s,
        query_interval_s=ss.query_interval_s,
        query_timeout_s=ss.query_timeout_s,
        sweep_interval_s=ss.sweep_interval_s,
        batch=ss.batch,
        concurrency=ss.concurrency,
        capacity=sweeps_mailbox.capacity,
        overflow=Overflow(sweeps_mailbox.overflow),
        shutdown_s=shutdown_s,
        registry=registry,
        metrics=runtime.metrics,
    )

    api = DispatchApi(
        service,
        max_body_bytes=dispatch.max_body_bytes,
        drain_max_bytes=dispatch.drain_max_bytes,
        retry_after_s=dispatch.retry_after_s,
        requests=service.requests,
    )
    commands_spec, commands = dispatch_commands_child(
        mailbox=config.mailboxes["commands"],
        shutdown_s=shutdown_s,
        deadlines=runtime.deadlines,
        metrics=runtime.metrics,
        client=backbone.nats,
        submitter=service,
        subject=dispatch.nats_subject,
        queue=dispatch.nats_queue,
        max_body_bytes=dispatch.max_body_bytes,
        batch_max=dispatch.nats_batch_max,
        poll_timeout_s=dispatch.nats_poll_timeout_s,
        pending_msgs_limit=dispatch.nats_pending_limit,
        retry_after_s=dispatch.retry_after_s,
        unsubscribe_timeout_s=dispatch.nats_unsubscribe_timeout_s,
        requests=service.requests,
        registry=registry,
    )
    specs = [
        *commit_specs,
        *service.child_specs(),
        backlog_spec,
        tracker_spec,
        pool_spec,
        feedback_spec,
        sweep_spec,
        status_spec,
        commands_spec,
    ]
    # One replica at a time pulls the push feedback (supervisors/singleton.py); on a
    # standby, row 2's age detector is kept quiet: the holder's watches the feedback.
    specs = singleton_specs(
        specs,
        config.singletons,
        postgres_url_with(backbone.services.postgres_url, user=config.database.daemon_role),
        on_standby={} if feedback_age is None else {"push_feedback": feedback_age.touch},
        registry=registry,
    )
    return Channels(
        service=service,
        adapters=adapters,
        guards=guards,
        failovers=failovers,
        ingress=ingress,
        api=api,
        commands=commands,
        templates=templates,
        tracker=tracker,
        feedback=feedback,
        sweep=sweep,
        backlog=backlog,
        status_sweep=status,
        sources=sources,
        specs=specs,
        mounts={"/v1/dispatches": api, "/webhooks/": ingress},
    )
