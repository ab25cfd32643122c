"""The configuration schema: one frozen msgspec Struct per TOML section.

Every number an SRE may tune is constrained here (``Annotated[..., Meta(...)]``),
so a bad value is refused when the file is decoded, with the TOML path of the
value, never later inside the engine. Unknown keys are refused too
(``forbid_unknown_fields``): a typo is an error, not a silently ignored setting.

Field names are the keyword names the engine's constructors take, so a section
can be handed over field by field. Durations are float seconds ending in
``_s``; counts are plain nouns.

Named profiles
    The dict sections (``[breakers.NAME]``, ``[bulkheads.NAME]``, ...) hold named
    profiles. A profile may say ``base = "other"`` to inherit every field of
    ``[breakers.other]`` and override the ones it gives (chains allowed, cycles
    refused). The loader resolves ``base`` on the raw TOML before decoding; the
    decoded Struct keeps the name of its direct base in ``base`` for display.
    ``base`` is not an engine parameter: drop it when building engine objects
    (see :func:`engine_kwargs`).

Cross-field rules live in ``__post_init__`` and raise ``ValueError`` whose
message starts with ``"<field>: "``; the loader turns that into the path of
the field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

__all__ = [
    "OVERFLOW_POLICIES",
    "ApnsConfig",
    "BouncesConfig",
    "BreakerConfig",
    "BulkheadConfig",
    "ChannelsConfig",
    "DaemonConfig",
    "DetectorConfig",
    "DetectorKind",
    "DispatchConfig",
    "DlrConfig",
    "EmulatorsConfig",
    "FcmConfig",
    "GhasiConfig",
    "GuardConfig",
    "LogLevel",
    "MailboxConfig",
    "OverflowPolicy",
    "ProvidersConfig",
    "PushFeedbackConfig",
    "RateLimitConfig",
    "RetryConfig",
    "ServicesConfig",
    "SmtpConfig",
    "Strategy",
    "SupervisorConfig",
    "TriageConfig",
    "TwilioConfig",
    "engine_kwargs",
]

# Reusable constrained number types.
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Fraction = Annotated[float, msgspec.Meta(gt=0, le=1)]
Multiplier = Annotated[float, msgspec.Meta(ge=1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
ProfileName = Annotated[str, msgspec.Meta(min_length=1)]

OverflowPolicy = Literal["wait", "drop_newest", "reject"]
OVERFLOW_POLICIES: tuple[OverflowPolicy, ...] = ("wait", "drop_newest", "reject")
Strategy = Literal["one_for_one", "one_for_all", "rest_for_one"]
DetectorKind = Literal[
    "rate", "ratio", "count_in_window", "age_of_newest", "gauge_sustained", "spike_over_baseline"
]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class _Section(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """Base of every section: strict keys, immutable, keyword-only."""


class _Profile(_Section, frozen=True, kw_only=True):
    """A named entry of a dict section; ``base`` names the profile it inherits from."""

    base: str | None = None


class BreakerConfig(_Profile, frozen=True, kw_only=True):
    """A circuit breaker.

    Trips after ``fail_max`` consecutive failures, or when at least
    ``minimum_calls`` calls in the last ``rate_window_s`` show a failure rate
    (or a slow-call rate, calls over ``slow_call_s``) at or above its threshold.
    Open for ``reset_timeout_s``; each consecutive trip multiplies the interval
    by ``reset_backoff_multiplier`` up to ``reset_timeout_max_s``. Half-open
    admits at most ``half_open_max_calls`` probes.
    """

    fail_max: PositiveInt
    reset_timeout_s: PositiveFloat
    reset_timeout_max_s: PositiveFloat
    reset_backoff_multiplier: Multiplier
    failure_rate_threshold: Fraction
    rate_window_s: PositiveFloat
    minimum_calls: PositiveInt
    slow_call_s: PositiveFloat
    slow_call_rate_threshold: Fraction
    half_open_max_calls: PositiveInt

    def __post_init__(self) -> None:
        if self.reset_timeout_max_s < self.reset_timeout_s:
            raise ValueError(
                f"reset_timeout_max_s: must be >= reset_timeout_s ({self.reset_timeout_s:g})"
            )


class BulkheadConfig(_Profile, frozen=True, kw_only=True):
    """Concurrency limit with a bounded wait, optionally partitioned per key (LRU-bounded)."""

    capacity: PositiveInt
    max_wait_s: NonNegativeFloat
    max_partitions: PositiveInt
    partition_capacity: PositiveInt

    def __post_init__(self) -> None:
        if self.partition_capacity > self.capacity:
            raise ValueError(f"partition_capacity: must be <= capacity ({self.capacity})")


class RetryConfig(_Profile, frozen=True, kw_only=True):
    """Exponential backoff with jitter, bounded by attempts and by a time budget."""

    max_attempts: PositiveInt
    time_budget_s: PositiveFloat
    backoff_initial_s: PositiveFloat
    backoff_max_s: PositiveFloat
    backoff_multiplier: Multiplier
    jitter: Annotated[float, msgspec.Meta(ge=0, le=1)]  # a wait is shortened by up to this fraction

    def __post_init__(self) -> None:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s: must be >= backoff_initial_s ({self.backoff_initial_s:g})"
            )


class RateLimitConfig(_Profile, frozen=True, kw_only=True):
    """Token bucket per key: ``rate_per_s`` refill, ``burst`` tokens, at most ``max_keys`` buckets."""

    rate_per_s: PositiveFloat
    burst: PositiveInt
    max_keys: PositiveInt


class MailboxConfig(_Profile, frozen=True, kw_only=True):
    """An actor's bounded mailbox and what ``tell`` does when it is full."""

    capacity: PositiveInt
    overflow: OverflowPolicy


class SupervisorConfig(_Profile, frozen=True, kw_only=True):
    """OTP-style supervisor: strategy, restart intensity, restart backoff, child bound."""

    strategy: Strategy
    max_restarts: NonNegativeInt
    period_s: PositiveFloat
    backoff_min_s: NonNegativeFloat
    backoff_max_s: NonNegativeFloat
    backoff_random_factor: NonNegativeFloat
    backoff_reset_s: PositiveFloat
    max_children: PositiveInt
    shutdown_s: PositiveFloat

    def __post_init__(self) -> None:
        if self.backoff_max_s < self.backoff_min_s:
            raise ValueError(f"backoff_max_s: must be >= backoff_min_s ({self.backoff_min_s:g})")


class GuardConfig(_Profile, frozen=True, kw_only=True):
    """A call policy: bulkhead -> breaker -> deadline -> retry, by profile name.

    The loader checks that every name refers to an existing profile.
    """

    breaker: ProfileName
    bulkhead: ProfileName
    retry: ProfileName
    timeout_s: PositiveFloat
    rate_limit: ProfileName | None = None


class DetectorConfig(_Profile, frozen=True, kw_only=True):
    """A sliding-window rule over one metric.

    Fires when the windowed value compares ``op`` against ``threshold``
    (``gt``: above, ``lt``: below) for ``for_s`` seconds, and clears once it is
    back past ``clear_threshold`` (hysteresis; defaults to ``threshold``). The
    window of ``window_s`` seconds is kept in ``buckets`` buckets.
    ``spike_over_baseline`` compares the window's rate with an EWMA of the rates
    of the buckets that left the window (weight ``baseline_alpha`` on the newest);
    its threshold is a factor. ``min_volume`` is the fewest observations in a
    ratio's denominator, or the warm-up in buckets of a spike baseline; the other
    kinds do not use it, so setting it there is refused. ``age_of_newest`` and
    ``gauge_sustained`` do not use the window either (``engine.detectors`` has
    the exact semantics).

    Kinds: ``rate`` (events per second), ``ratio`` (matching share of events, in
    [0, 1]), ``count_in_window`` (events), ``age_of_newest`` (seconds since the
    newest event), ``gauge_sustained`` (a level), ``spike_over_baseline``
    (window rate / baseline rate).
    """

    kind: DetectorKind
    metric: Annotated[str, msgspec.Meta(min_length=1)]
    op: Literal["gt", "lt"] = "gt"
    threshold: float
    clear_threshold: float | None = None
    window_s: PositiveFloat
    min_volume: NonNegativeInt = 0
    for_s: NonNegativeFloat = 0.0
    baseline_alpha: Fraction = 0.1
    buckets: PositiveInt = 60

    def __post_init__(self) -> None:
        clear = self.clear_threshold
        if clear is not None:
            if self.op == "gt" and clear > self.threshold:
                raise ValueError(
                    f"clear_threshold: must be <= threshold ({self.threshold:g}) when op is 'gt'"
                )
            if self.op == "lt" and clear < self.threshold:
                raise ValueError(
                    f"clear_threshold: must be >= threshold ({self.threshold:g}) when op is 'lt'"
                )
        if self.kind == "ratio":
            for name, value in (("threshold", self.threshold), ("clear_threshold", clear)):
                if value is not None and not 0.0 <= value <= 1.0:
                    raise ValueError(f"{name}: a ratio must be within [0, 1]")
        elif self.threshold < 0:
            raise ValueError(f"threshold: must be >= 0 for kind '{self.kind}'")
        if self.min_volume and self.kind not in ("ratio", "spike_over_baseline"):
            raise ValueError(
                f"min_volume: only ratio and spike_over_baseline detectors use it, not '{self.kind}'"
            )
        if self.kind == "age_of_newest" and self.op != "gt":
            raise ValueError("op: age_of_newest only supports 'gt' (too old)")
        if self.kind == "spike_over_baseline" and self.threshold <= 0:
            raise ValueError("threshold: a spike factor must be > 0")

    @property
    def effective_clear_threshold(self) -> float:
        """The level that clears a firing detector: ``clear_threshold`` or ``threshold``."""
        return self.threshold if self.clear_threshold is None else self.clear_threshold


class DaemonConfig(_Section, frozen=True, kw_only=True):
    """The long-running process: address, drain deadline, logging, bounds."""

    host: Annotated[str, msgspec.Meta(min_length=1)] = "127.0.0.1"
    port: Port = 8080
    drain_s: PositiveFloat
    log_level: LogLevel = "info"
    seed: int | None = None
    max_label_values: PositiveInt
    detector_tick_s: PositiveFloat
    # After SIGTERM, keep serving (with /readyz at 503) this long so load balancers
    # notice before the listener closes: Kubernetes' pre-stop pause, inside drain_s.
    drain_grace_s: NonNegativeFloat = 0.0

    def __post_init__(self) -> None:
        if self.drain_grace_s >= self.drain_s:
            raise ValueError(f"drain_grace_s: must be below drain_s ({self.drain_s:g})")


class ServicesConfig(_Section, frozen=True, kw_only=True):
    """Outside services. ``None`` means: start the embedded one."""

    postgres_url: str | None = None
    postgres_replica_url: str | None = None  # optional read replica; reads fall to it (row 5)
    nats_url: str | None = None
    redis_url: str | None = None


class DatabaseConfig(_Section, frozen=True, kw_only=True):
    """The PostgreSQL pools the daemon opens (as ``daemon_role``, never the owner)."""

    daemon_role: Annotated[str, msgspec.Meta(min_length=1)] = "triage_daemon"
    pool_min: NonNegativeInt = 1
    pool_max: PositiveInt = 10
    connect_timeout_s: PositiveFloat = 5.0
    command_timeout_s: PositiveFloat = 5.0
    migrate_cleanup_s: PositiveFloat = 5.0

    def __post_init__(self) -> None:
        if self.pool_min > self.pool_max:
            raise ValueError(f"pool_min: must be <= pool_max ({self.pool_max})")


class RelayConfig(_Section, frozen=True, kw_only=True):
    """The transactional outbox relay: batches from PostgreSQL to JetStream.

    ``enabled = false`` runs a replica without a relay (another replica relays: they
    share the outbox through SKIP LOCKED); events then wait in the outbox.
    """

    enabled: bool = True
    pool_size: PositiveInt = 1  # the relay's own connections (never the daemon's pool)
    stream: Annotated[str, msgspec.Meta(min_length=1)] = "TRIAGE_EVENTS"
    subjects: Annotated[str, msgspec.Meta(min_length=1)] = "triage.events.>"
    dlq_subject: Annotated[str, msgspec.Meta(min_length=1)] = "triage.dlq.outbox"
    batch_size: PositiveInt = 200
    poll_interval_s: PositiveFloat = 0.2
    ack_timeout_s: PositiveFloat = 5.0
    max_attempts: PositiveInt = 5  # failed publishes of one event before it is dead-lettered
    duplicate_window_s: PositiveFloat = 120.0  # the stream's; must cover the retry horizon


class IdempotencyConfig(_Section, frozen=True, kw_only=True):
    """The idempotency store: Redis in front, the database's unique key as the truth."""

    cache_ttl_s: PositiveFloat = 86_400.0
    key_ttl_s: PositiveFloat = 7 * 86_400.0
    warm_batch: PositiveInt = 1000
    max_tenants: PositiveInt = 10_000  # tenants remembered for warm-up (least recent dropped)


class InboxConfig(_Section, frozen=True, kw_only=True):
    """The scheduling-event inbox (row 18): a durable JetStream pull consumer.

    JetStream redelivers a message not acked within ``ack_wait_s``, or nak'ed,
    after ``backoff_s[n]`` for its (n+1)-th redelivery (the last entry repeats),
    at most ``max_deliver`` deliveries in all; the consumer dead-letters the
    event on its last delivery rather than let it vanish.
    """

    stream: Annotated[str, msgspec.Meta(min_length=1)] = "TRIAGE_SCHEDULING"
    subjects: Annotated[str, msgspec.Meta(min_length=1)] = "triage.scheduling.>"
    durable: Annotated[str, msgspec.Meta(min_length=1)] = "triage-inbox"
    batch_size: PositiveInt = 100
    fetch_timeout_s: PositiveFloat = 1.0
    ack_wait_s: PositiveFloat = 30.0
    max_deliver: PositiveInt = 5
    backoff_s: list[PositiveFloat] = msgspec.field(default_factory=lambda: [1.0, 5.0, 30.0])
    duplicate_window_s: PositiveFloat = 120.0  # the stream's, for publishers' Nats-Msg-Id

    def __post_init__(self) -> None:
        if self.backoff_s and len(self.backoff_s) >= self.max_deliver:
            raise ValueError(
                f"backoff_s: must have fewer entries than max_deliver ({self.max_deliver})"
            )


class SpoolConfig(_Section, frozen=True, kw_only=True):
    """The durable local write journal (row 5): writes spooled while the primary is down.

    ``path`` is a file (its directory is created); ``max_bytes`` bounds it (a full
    spool refuses further writes); ``fsync`` syncs each append before the caller is
    answered; ``spoolable_kinds`` are the write kinds that may be spooled (every
    other kind is refused with a 503-style error); ``replay_batch`` records are
    replayed per pass once the primary is back.
    """

    path: Annotated[str, msgspec.Meta(min_length=1)] = "/var/lib/triage/spool"
    max_bytes: PositiveInt = 64 * 1024 * 1024
    fsync: bool = True
    spoolable_kinds: list[Annotated[str, msgspec.Meta(min_length=1)]] = msgspec.field(
        default_factory=list
    )
    replay_batch: PositiveInt = 100


Name = Annotated[str, msgspec.Meta(min_length=1)]
UrlPath = Annotated[str, msgspec.Meta(pattern=r"^/")]


class EmulatorsConfig(_Section, frozen=True, kw_only=True):
    """Loopback provider emulators (``providers.emulators``) for ``make run`` and chaos.

    With ``enabled``, every provider whose address is unset (``base_url`` / ``host``)
    is played by its emulator on ``host`` (a free port each), with credentials the
    daemon generates for both sides. Without, an unset address is a config error.
    """

    enabled: bool = False
    host: Name = "127.0.0.1"
    receipt_delay_s: NonNegativeFloat = 0.2  # an accepted message's receipt follows this late
    receipt_attempts: PositiveInt = 5  # a refused receipt (429, 5xx) is re-sent, as gateways do
    receipt_retry_s: PositiveFloat = 0.5  # first wait before a re-send, doubling
    seed_demo: bool = False  # ensure the demo tenant and its templates (supervisors.demo)


class GhasiConfig(_Section, frozen=True, kw_only=True):
    """The primary SMS gateway ("Ghasi-SMS-Gateway"): generic HTTP JSON, shaped by config."""

    base_url: str | None = None  # unset: the emulator
    guard: Name = "sms_primary"
    api_key_env: Name = "TRIAGE_GHASI_API_KEY"  # the environment variable holding the key
    receipt_secret_env: Name = "TRIAGE_GHASI_RECEIPT_SECRET"
    receipt_tolerance_s: PositiveFloat = 300.0  # receipts signed longer ago are refused
    send_path: UrlPath = "/api/v1/messages"
    status_path: UrlPath = "/api/v1/messages"
    auth_header: Name = "Authorization"
    auth_scheme: str = "Bearer"
    idempotency_header: Name = "Idempotency-Key"
    sender: Name = "TRIAGE"
    # The wire's names (providers.ghasi.GhasiWire, field by field): JSON fields of the
    # send, the answer and the receipt, and the receipt's signature headers.
    to_field: Name = "to"
    text_field: Name = "text"
    sender_field: Name = "sender"
    ref_field: Name = "client_ref"
    id_field: Name = "message_id"
    status_field: Name = "status"
    error_field: Name = "error_code"
    timestamp_field: Name = "timestamp"
    signature_header: Name = "X-Ghasi-Signature"
    timestamp_header: Name = "X-Ghasi-Timestamp"


class TwilioConfig(_Section, frozen=True, kw_only=True):
    """The secondary SMS provider, Twilio's Messages API."""

    base_url: str | None = None  # unset: the emulator; else https://api.twilio.com
    guard: Name = "sms_secondary"
    account_sid: Name = "ACtriage"
    auth_token_env: Name = "TRIAGE_TWILIO_AUTH_TOKEN"
    from_number: Annotated[str, msgspec.Meta(pattern=r"^\+[1-9][0-9]{6,14}$")] = "+15550000000"


class FcmConfig(_Section, frozen=True, kw_only=True):
    """Firebase Cloud Messaging HTTP v1, with an OAuth2 token from a service account."""

    base_url: str | None = None  # unset: the emulator; else https://fcm.googleapis.com
    guard: Name = "fcm"
    project_id: Name = "triage"
    service_account_file: str | None = None  # the JSON key file (unset with the emulator)
    refresh_margin_s: PositiveFloat = 300.0  # renew the access token this long before expiry
    assertion_lifetime_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 3600.0  # JWT exp - iat
    feedback_url: str | None = None  # the Pub/Sub-style feedback service (unset: base_url)
    feedback_subscription: Name = "projects/triage/subscriptions/fcm-feedback"


class ApnsConfig(_Section, frozen=True, kw_only=True):
    """Apple Push Notification service over HTTP/2 with an ES256 provider token."""

    base_url: str | None = None  # unset: the emulator; else https://api.push.apple.com
    guard: Name = "apns"
    key_id: Name = "TRIAGEKEY1"
    team_id: Name = "TRIAGETEAM"
    key_file: str | None = None  # the .p8 key (unset with the emulator)
    topic: Name = "org.triage.app"
    token_refresh_s: Annotated[float, msgspec.Meta(ge=1200, lt=3600)] = 1800.0
    expiration_s: NonNegativeFloat = 3600.0  # how long APNs keeps trying an offline device
    priority: Literal[1, 5, 10] = 10
    keepalive_expiry_s: PositiveFloat = 60.0  # drop idle HTTP/2 connections before APNs does
    feedback_url: str | None = None
    feedback_subscription: Name = "projects/triage/subscriptions/apns-feedback"


class SmtpConfig(_Section, frozen=True, kw_only=True):
    """Email over SMTP; bounces come back as DSNs or provider events on the webhook."""

    host: str | None = None  # unset: the emulator
    port: Port = 25
    guard: Name = "smtp"
    sender: Name = "noreply@triage.invalid"
    helo_name: Name = "triage.invalid"
    username_env: str | None = None
    password_env: str | None = None
    bounce_secret_env: Name = "TRIAGE_SMTP_BOUNCE_SECRET"


class ProvidersConfig(_Section, frozen=True, kw_only=True):
    """One section per vendor adapter (``providers/<vendor>.py``)."""

    ghasi: GhasiConfig = msgspec.field(default_factory=GhasiConfig)
    twilio: TwilioConfig = msgspec.field(default_factory=TwilioConfig)
    fcm: FcmConfig = msgspec.field(default_factory=FcmConfig)
    apns: ApnsConfig = msgspec.field(default_factory=ApnsConfig)
    smtp: SmtpConfig = msgspec.field(default_factory=SmtpConfig)


ProviderName = Literal["ghasi", "twilio", "fcm", "apns", "smtp"]


class ChannelsConfig(_Section, frozen=True, kw_only=True):
    """Which providers serve each channel, in failover order (push: by token platform)."""

    sms: list[Literal["ghasi", "twilio"]] = msgspec.field(default_factory=lambda: ["ghasi", "twilio"])
    push: list[Literal["fcm", "apns"]] = msgspec.field(default_factory=lambda: ["fcm", "apns"])
    email: list[Literal["smtp"]] = msgspec.field(default_factory=lambda: ["smtp"])

    def __post_init__(self) -> None:
        for name in ("sms", "push", "email"):
            order = getattr(self, name)
            if len(set(order)) != len(order):
                raise ValueError(f"{name}: a provider is listed twice")


class DispatchConfig(_Section, frozen=True, kw_only=True):
    """Dispatch intake (HTTP and NATS) and the channel dispatchers."""

    max_body_bytes: PositiveInt = 65_536
    # An oversize body declared up to this many bytes is read and discarded before the
    # 413, so the client gets the answer instead of a reset; a larger one is cut.
    drain_max_bytes: PositiveInt = 1_048_576
    nats_subject: Name = "triage.commands.dispatch"
    nats_queue: Name = "triage-dispatch"
    concurrency: PositiveInt = 64  # sends in flight per channel
    template_cache_ttl_s: PositiveFloat = 60.0
    template_cache_max: PositiveInt = 10_000
    settle_timeout_s: PositiveFloat = 5.0  # the status query that settles an ambiguous timeout
    requeue_after_s: PositiveFloat = 60.0  # a dispatch every provider refused waits this long
    give_up_after_s: PositiveFloat = 86_400.0  # then ends failed (providers_exhausted)
    resume_interval_s: PositiveFloat = 30.0  # how often queued dispatches left behind are resumed
    phi_fields: list[Name] = msgspec.field(
        default_factory=lambda: ["diagnosis", "mrn", "dob", "ssn", "medication", "condition"]
    )
    phi_patterns: list[Name] = msgspec.field(default_factory=list)  # regexes over push text
    retry_after_s: PositiveFloat = 1.0  # what a 429/503 answer tells the client
    max_key_chars: PositiveInt = 200  # the Idempotency-Key
    max_template_chars: PositiveInt = 200
    max_recipient_chars: PositiveInt = 320
    max_data_fields: PositiveInt = 64
    max_field_name_chars: PositiveInt = 64
    max_value_chars: PositiveInt = 2048
    record_attempts: PositiveInt = 5  # tries of the outcome write after a send
    record_backoff_s: PositiveFloat = 0.2
    max_parked: NonNegativeInt = 10_000  # dispatches waiting in memory for a requeue
    backlog_batch: PositiveInt = 500
    max_tenants: PositiveInt = 10_000  # tenants whose queued backlog is resumed
    nats_batch_max: PositiveInt = 100
    nats_poll_timeout_s: PositiveFloat = 0.5
    nats_pending_limit: PositiveInt = 10_000
    nats_unsubscribe_timeout_s: PositiveFloat = 2.0

    def __post_init__(self) -> None:
        if self.give_up_after_s < self.requeue_after_s:
            raise ValueError(f"give_up_after_s: must be >= requeue_after_s ({self.requeue_after_s:g})")


class DlrConfig(_Section, frozen=True, kw_only=True):
    """The delivery-receipt and bounce webhooks (catalog row 13)."""

    # How providers reach /webhooks/... (Twilio's StatusCallback, signature checks);
    # unset: the daemon's own address (loopback emulators).
    callback_base_url: str | None = None
    retry_after_s: PositiveFloat = 1.0  # what a 429/503 tells the provider
    max_body_bytes: PositiveInt = 16_384
    rate_limit: Name = "dlr_callbacks"  # [rate_limits.NAME], per provider
    queue_capacity: PositiveInt = 1000
    workers_min: PositiveInt = 2
    workers_max: PositiveInt = 16
    scale_up_depth: PositiveInt = 200  # queue depth that asks for one more worker...
    scale_up_after_s: PositiveFloat = 2.0  # ...when it holds this long
    scale_down_after_s: PositiveFloat = 30.0  # an idle extra worker stops after this
    ack_timeout_s: PositiveFloat = 2.0
    batch_max: PositiveInt = 100
    db_units: PositiveInt = 3  # pooled connections receipts may hold at once (of database.pool_max)

    def __post_init__(self) -> None:
        if self.workers_min > self.workers_max:
            raise ValueError(f"workers_min: must be <= workers_max ({self.workers_max})")
        if self.scale_up_depth > self.queue_capacity:
            raise ValueError(f"scale_up_depth: must be <= queue_capacity ({self.queue_capacity})")


class PushFeedbackConfig(_Section, frozen=True, kw_only=True):
    """Push delivery feedback (catalog row 2)."""

    watchdog_interval_s: PositiveFloat = 5.0
    poll_interval_s: PositiveFloat = 1.0
    max_messages: PositiveInt = 100
    pull_timeout_s: PositiveFloat = 30.0
    stall_after_s: PositiveFloat = 600.0  # no feedback this long with pushes outstanding: refresh
    stale_after_s: PositiveFloat = 1800.0  # a push dispatched this long without feedback: unknown
    sweep_interval_s: PositiveFloat = 60.0
    sweep_batch: PositiveInt = 500


class BouncesConfig(_Section, frozen=True, kw_only=True):
    """Email bounce tracking (catalog row 3; threshold, window and volume are the row's)."""

    disable_after_s: NonNegativeFloat = 300.0  # above threshold this long: disable the category
    max_keys: PositiveInt = 10_000  # (tenant, category) pairs tracked
    throttle_rate_per_s: PositiveFloat = 1.0
    throttle_burst: PositiveInt = 10
    ceiling_ratio: Fraction = 0.5  # at once disabled when this share bounces (with min volume)
    reload_interval_s: PositiveFloat = 30.0  # re-read blocks (an operator's enable)


class TriageConfig(_Section, frozen=True, kw_only=True):
    """The whole file. ``catalog`` is the failure catalog, relative to this file's directory."""

    daemon: DaemonConfig
    services: ServicesConfig = msgspec.field(default_factory=ServicesConfig)
    database: DatabaseConfig = msgspec.field(default_factory=DatabaseConfig)
    relay: RelayConfig = msgspec.field(default_factory=RelayConfig)
    idempotency: IdempotencyConfig = msgspec.field(default_factory=IdempotencyConfig)
    inbox: InboxConfig = msgspec.field(default_factory=InboxConfig)
    spool: SpoolConfig = msgspec.field(default_factory=SpoolConfig)
    emulators: EmulatorsConfig = msgspec.field(default_factory=EmulatorsConfig)
    providers: ProvidersConfig = msgspec.field(default_factory=ProvidersConfig)
    channels: ChannelsConfig = msgspec.field(default_factory=ChannelsConfig)
    dispatch: DispatchConfig = msgspec.field(default_factory=DispatchConfig)
    dlr: DlrConfig = msgspec.field(default_factory=DlrConfig)
    push_feedback: PushFeedbackConfig = msgspec.field(default_factory=PushFeedbackConfig)
    bounces: BouncesConfig = msgspec.field(default_factory=BouncesConfig)
    catalog: Annotated[str, msgspec.Meta(min_length=1)] = "failures.toml"
    mailboxes: dict[str, MailboxConfig] = msgspec.field(default_factory=dict)
    supervisors: dict[str, SupervisorConfig] = msgspec.field(default_factory=dict)
    breakers: dict[str, BreakerConfig] = msgspec.field(default_factory=dict)
    bulkheads: dict[str, BulkheadConfig] = msgspec.field(default_factory=dict)
    retries: dict[str, RetryConfig] = msgspec.field(default_factory=dict)
    rate_limits: dict[str, RateLimitConfig] = msgspec.field(default_factory=dict)
    guards: dict[str, GuardConfig] = msgspec.field(default_factory=dict)
    detectors: dict[str, DetectorConfig] = msgspec.field(default_factory=dict)


def engine_kwargs(section: msgspec.Struct) -> dict[str, Any]:
    """The fields of ``section`` as constructor keywords, without the profile's ``base``."""
    fields = msgspec.structs.asdict(section)
    fields.pop("base", None)
    return fields
