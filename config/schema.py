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
message starts with ``"<field>: "`` (or ``"<field>[<index>]: "`` for one entry of
a list); the loader turns that into the path of the field. Values the daemon would
hand to something stricter than a number range are checked there too, so a file
the loader accepts is one the daemon can start with: regexes compile
(:func:`regex_problem`), NATS names and subjects are ones JetStream takes
(:mod:`config.nats_names`), and every channel has a provider.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

import msgspec

from config.nats_names import (
    MIN_DUPLICATE_WINDOW_S,
    name_problem,
    queue_problem,
    subject_problem,
    subjects_problem,
)

__all__ = [
    "OVERFLOW_POLICIES",
    "SINGLETON_ACTORS",
    "AlertmanagerConfig",
    "ApnsConfig",
    "BouncesConfig",
    "BreakerConfig",
    "BulkheadConfig",
    "BurnAlert",
    "ChannelsConfig",
    "ClockConfig",
    "DaemonConfig",
    "DashboardConfig",
    "DetectorConfig",
    "DetectorKind",
    "DispatchConfig",
    "DlrConfig",
    "EmulatorsConfig",
    "ErasureConfig",
    "FallbackConfig",
    "FcmConfig",
    "GhasiConfig",
    "GuardConfig",
    "HttpConfig",
    "JitsiConfig",
    "JitsiNodeConfig",
    "LogLevel",
    "MailboxConfig",
    "OverflowPolicy",
    "PhiConfig",
    "PhiTemplateRule",
    "ProvidersConfig",
    "PushFeedbackConfig",
    "RateLimitConfig",
    "RecorderConfig",
    "RecordingsConfig",
    "RetryConfig",
    "ScannerConfig",
    "ServicesConfig",
    "SingletonsConfig",
    "SloConfig",
    "SloObjective",
    "SmtpConfig",
    "StatusSweepConfig",
    "Strategy",
    "SupervisorConfig",
    "ThreadsConfig",
    "TokensConfig",
    "TriageConfig",
    "TwilioConfig",
    "UploadsConfig",
    "engine_kwargs",
    "regex_problem",
    "url_problem",
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
#: JetStream's shortest duplicate window (the server refuses a stream with less).
DuplicateWindow = Annotated[float, msgspec.Meta(ge=MIN_DUPLICATE_WINDOW_S)]


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` does not compile as the daemon compiles it (``re.compile``), or None."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"not a regular expression: {exc}"
    return None


_HTTP: Final = ("http", "https")


def url_problem(value: str | None, schemes: Sequence[str]) -> str | None:
    """Why ``value`` (unset: fine) is not a URL of one of ``schemes`` with a host, or None
    (a ``unix`` URL has a path instead)."""
    if value is None:
        return None
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - a port that is no number raises here
    except ValueError as exc:
        return f"not a URL: {exc}"
    if parts.scheme not in schemes:
        return f"must be a {' or '.join(f'{s}://' for s in schemes)} URL"
    if not (parts.hostname or (parts.scheme == "unix" and parts.path)):
        return "names no host"
    if any(c.isspace() for c in value):
        return "must not contain whitespace"
    return None


def _refuse(field: str, problem: str | None) -> None:
    """Raise the loader's ``"<field>: <problem>"`` when there is a problem."""
    if problem is not None:
        raise ValueError(f"{field}: {problem}")


def _refuse_entries(field: str, values: Sequence[str], check: Any) -> None:
    """:func:`_refuse` for the first entry of a list that ``check`` finds a problem with."""
    for index, value in enumerate(values):
        _refuse(f"{field}[{index}]", check(value))


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


class HttpConfig(_Section, frozen=True, kw_only=True):
    """``[daemon.http]``: the bounds of the daemon's HTTP/1.1 server (providers.http_server).

    A request whose line or headers pass their caps is answered 414 / 431 and its
    connection closed; one that stalls is cut off (``header_timeout_s`` from its
    first byte to its last header, ``body_timeout_s`` per wait for body bytes the
    app asked for). The graceful-shutdown grace is ``[daemon].drain_s``.
    """

    backlog: PositiveInt = 1024  # the listen queue: connections past max_connections wait here
    max_connections: PositiveInt = 1000  # served at once; the next is accepted when one closes
    max_request_line_bytes: PositiveInt = 8192  # the request target: 414 past it
    max_header_bytes: PositiveInt = 16384  # all header lines together: 431 past it
    max_headers: PositiveInt = 100  # header lines: 431 past it
    read_chunk_bytes: PositiveInt = 65536  # one socket read: the most read ahead of the app
    keepalive_timeout_s: PositiveFloat = 5.0  # an idle connection between requests is closed
    header_timeout_s: PositiveFloat = 10.0  # first byte to last header (slowloris): then closed
    body_timeout_s: PositiveFloat = 10.0  # one wait for body bytes the app asked for
    write_timeout_s: PositiveFloat = 10.0  # one write to a client that does not read
    discard_body_max_bytes: NonNegativeInt = 65536  # unread body read away to keep a connection
    lifespan_timeout_s: PositiveFloat = 10.0  # the app's lifespan startup / shutdown
    accept_retry_s: PositiveFloat = 0.1  # pause after accept fails for want of descriptors


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
    # The JSON log lines also go to this file (reopened when rotated); the PHI scanner
    # reads it. None: stderr only.
    log_file: str | None = None
    # The config's files (the file, each file it extends, its catalog) are read this
    # often and the config reloaded when one's content changed, as SIGHUP does; 0
    # turns the poll off.
    reload_poll_s: NonNegativeFloat = 2.0
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)

    def __post_init__(self) -> None:
        if self.drain_grace_s >= self.drain_s:
            raise ValueError(f"drain_grace_s: must be below drain_s ({self.drain_s:g})")


class ServicesConfig(_Section, frozen=True, kw_only=True):
    """Outside services. ``None`` means: start the embedded one."""

    postgres_url: str | None = None
    postgres_replica_url: str | None = None  # optional read replica; reads fall to it (row 5)
    nats_url: str | None = None
    redis_url: str | None = None

    def __post_init__(self) -> None:
        for name in ("postgres_url", "postgres_replica_url"):
            _refuse(name, url_problem(getattr(self, name), ("postgresql", "postgres")))
        _refuse("redis_url", url_problem(self.redis_url, ("redis", "rediss", "unix")))


class DatabaseConfig(_Section, frozen=True, kw_only=True):
    """The PostgreSQL pools the daemon opens (as ``daemon_role``, never the owner).

    ``reset_on_release``: asyncpg's reset query (``RESET ALL``, ``UNLISTEN *``,
    ``CLOSE ALL``, ``pg_advisory_unlock_all()``) on every release -- one round trip
    per unit of work that restores nothing here, since every setting the daemon
    makes is transaction-local and no pool connection holds a session lock, a
    LISTEN or a cursor. Off by default; an open transaction is rolled back at
    release either way."""

    daemon_role: Annotated[str, msgspec.Meta(min_length=1)] = "triage_daemon"
    pool_min: NonNegativeInt = 1
    pool_max: PositiveInt = 10
    connect_timeout_s: PositiveFloat = 5.0
    command_timeout_s: PositiveFloat = 5.0
    migrate_cleanup_s: PositiveFloat = 5.0
    reset_on_release: bool = False

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
    duplicate_window_s: DuplicateWindow = 120.0  # the stream's; must cover the retry horizon
    # How long one relay session (one bridge crossing, one transaction) goes on claiming,
    # publishing and marking batches back to back while the backlog lasts; 0: one batch.
    session_s: NonNegativeFloat = 1.0

    def __post_init__(self) -> None:
        _refuse("stream", name_problem(self.stream))
        _refuse("subjects", subjects_problem(self.subjects))
        _refuse("dlq_subject", subject_problem(self.dlq_subject, literal=True))
        if self.session_s >= self.duplicate_window_s:
            # A session rolled back publishes again what it had marked: the stream
            # must still know those Nats-Msg-Ids.
            raise ValueError(
                f"session_s: {self.session_s:g} must be shorter than duplicate_window_s"
                f" ({self.duplicate_window_s:g})"
            )


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
    duplicate_window_s: DuplicateWindow = 120.0  # the stream's, for publishers' Nats-Msg-Id

    def __post_init__(self) -> None:
        _refuse("stream", name_problem(self.stream))
        _refuse("subjects", subjects_problem(self.subjects))
        _refuse("durable", name_problem(self.durable))
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

    def __post_init__(self) -> None:
        _refuse("base_url", url_problem(self.base_url, _HTTP))


class TwilioConfig(_Section, frozen=True, kw_only=True):
    """The secondary SMS provider, Twilio's Messages API."""

    base_url: str | None = None  # unset: the emulator; else https://api.twilio.com
    guard: Name = "sms_secondary"
    account_sid: Name = "ACtriage"
    auth_token_env: Name = "TRIAGE_TWILIO_AUTH_TOKEN"
    from_number: Annotated[str, msgspec.Meta(pattern=r"^\+[1-9][0-9]{6,14}$")] = "+15550000000"

    def __post_init__(self) -> None:
        _refuse("base_url", url_problem(self.base_url, _HTTP))


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

    def __post_init__(self) -> None:
        _refuse("base_url", url_problem(self.base_url, _HTTP))
        _refuse("feedback_url", url_problem(self.feedback_url, _HTTP))


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

    def __post_init__(self) -> None:
        _refuse("base_url", url_problem(self.base_url, _HTTP))
        _refuse("feedback_url", url_problem(self.feedback_url, _HTTP))


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

    def __post_init__(self) -> None:
        if (self.username_env is None) != (self.password_env is None):
            raise ValueError("username_env: give both username_env and password_env, or neither")


class HttpClientConfig(_Section, frozen=True, kw_only=True):
    """The HTTP/1.1 client of the JSON providers (Ghasi, Twilio, FCM): one pool per origin
    (``providers.http_transport.Http1Transport``; APNs keeps its own HTTP/2 client)."""

    connections_per_origin: PositiveInt = 64  # beyond it a request waits (its pool timeout)
    keepalive_expiry_s: PositiveFloat = 4.0  # idle longer: closed; under the server's timeout


class ProvidersConfig(_Section, frozen=True, kw_only=True):
    """One section per vendor adapter (``providers/<vendor>.py``), and their HTTP client."""

    http: HttpClientConfig = msgspec.field(default_factory=HttpClientConfig)
    ghasi: GhasiConfig = msgspec.field(default_factory=GhasiConfig)
    twilio: TwilioConfig = msgspec.field(default_factory=TwilioConfig)
    fcm: FcmConfig = msgspec.field(default_factory=FcmConfig)
    apns: ApnsConfig = msgspec.field(default_factory=ApnsConfig)
    smtp: SmtpConfig = msgspec.field(default_factory=SmtpConfig)


ProviderName = Literal["ghasi", "twilio", "fcm", "apns", "smtp"]


class ChannelsConfig(_Section, frozen=True, kw_only=True):
    """Which providers serve each channel, in failover order (push: by token platform)."""

    sms: list[Literal["ghasi", "twilio"]] = msgspec.field(
        default_factory=lambda: ["ghasi", "twilio"]
    )
    push: list[Literal["fcm", "apns"]] = msgspec.field(default_factory=lambda: ["fcm", "apns"])
    email: list[Literal["smtp"]] = msgspec.field(default_factory=lambda: ["smtp"])

    def __post_init__(self) -> None:
        for name in ("sms", "push", "email"):
            order = getattr(self, name)
            if not order:
                raise ValueError(
                    f"{name}: needs at least one provider (its dispatcher has no route)"
                )
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
    backlog_batch: PositiveInt = 500  # queued rows the resumer claims per channel per turn
    # A resumed row is claimed this long (renewed while its dispatcher holds it): no other
    # replica resumes it meanwhile. More than two resume_interval_s. After a kill -9 the
    # rows the dead replica held wait this long (a restart resumes every queued row
    # within max(requeue_after_s, resume_lease_s) + resume_interval_s).
    resume_lease_s: PositiveFloat = 90.0
    accept_batch_max: PositiveInt = 64  # accepts stored by one statement (the group commit)
    outcome_batch_max: PositiveInt = 64  # send outcomes recorded by one transaction
    nats_batch_max: PositiveInt = 100
    nats_poll_timeout_s: PositiveFloat = 0.5
    nats_pending_limit: PositiveInt = 10_000
    nats_unsubscribe_timeout_s: PositiveFloat = 2.0

    def __post_init__(self) -> None:
        _refuse("nats_subject", subject_problem(self.nats_subject))
        _refuse("nats_queue", queue_problem(self.nats_queue))
        if self.give_up_after_s < self.requeue_after_s:
            raise ValueError(
                f"give_up_after_s: must be >= requeue_after_s ({self.requeue_after_s:g})"
            )


def _versions(versions: Sequence[int]) -> list[int | None]:
    """A template rule's versions; None stands for every version."""
    return [*versions] if versions else [None]


class PhiTemplateRule(_Section, frozen=True, kw_only=True):
    """PHI rules of one template (``versions``: those versions; empty: every version)."""

    template: Name
    versions: list[PositiveInt] = msgspec.field(default_factory=list)
    fields: list[Name] = msgspec.field(default_factory=list)  # data keys that are PHI
    patterns: dict[Name, Name] = msgspec.field(default_factory=dict)  # rule name -> regex

    def __post_init__(self) -> None:
        if len(set(self.versions)) != len(self.versions):
            raise ValueError("versions: a version is listed twice")
        if not self.fields and not self.patterns:
            raise ValueError("a template rule needs fields or patterns")
        for name, pattern in self.patterns.items():
            _refuse(f"patterns.{name}", regex_problem(pattern))


#: The data classes an erasure covers (each a step of the saga, see actors/erasure_saga.py).
ERASURE_CLASSES: Final = (
    "dispatches", "outbox", "dead_letters", "idempotency_db", "idempotency_redis",
    "virtual_sessions", "threads", "recordings", "attachments", "jetstream",
)  # fmt: skip


class ErasureConfig(_Section, frozen=True, kw_only=True):
    """Catalog row 15: the GDPR erasure saga, its reconciler and its receipt.

    ``exempt`` maps a data class (:data:`ERASURE_CLASSES`) to the legal reason it is
    kept (medical-record retention): that step is skipped and the receipt says why.
    ``receipt_key_file`` holds the HMAC-SHA256 key that signs receipts and makes the
    patient tokens of subjects (at least 32 bytes); unset, a random key made once and
    kept in PostgreSQL (``erasure_keys``, migration 0014) does both, the same for every
    replica and every restart (``key_id`` ``db:sha256:...``).
    """

    subject_prefix: Name = "triage.events.patient"  # <prefix>.<tenant>.<patient token>.<kind>
    stream: Name = "TRIAGE_EVENTS"  # the JetStream stream purged by subject
    # Streams whose subjects others name (the scheduling inbox, the relay's DLQ): read
    # whole, a message holding a needle deleted by sequence (overwritten).
    scan_streams: tuple[Name, ...] = ("TRIAGE_SCHEDULING", "TRIAGE_EVENTS_DLQ")
    scan_batch: PositiveInt = 500  # messages per fetch while reading a scanned stream
    scan_idle_s: PositiveFloat = 0.5  # a fetch answered by nothing for this long ends the read
    api_timeout_s: PositiveFloat = 5.0  # a JetStream API request ($JS.API.STREAM.*)
    reconcile_interval_s: PositiveFloat = 3600.0  # the reconciler's turn
    reconcile_max_requests: PositiveInt = 200  # erasures re-searched per turn
    ask_timeout_s: PositiveFloat = 30.0  # a CLI or HTTP request waiting for the saga
    max_body_bytes: PositiveInt = 16384  # the /v1/erasures request bodies (413 beyond)
    receipt_key_file: str | None = None
    exempt: dict[Name, Name] = msgspec.field(default_factory=dict)
    wal_horizon_s: PositiveFloat = 86400.0  # until WAL segments holding erased rows recycle
    backup_horizon_days: PositiveInt = 35  # until the last backup holding them expires

    def __post_init__(self) -> None:
        for name in self.exempt:
            if name not in ERASURE_CLASSES:
                raise ValueError(
                    f"exempt.{name}: not a data class (one of {', '.join(ERASURE_CLASSES)})"
                )
        _refuse("stream", name_problem(self.stream))
        _refuse_entries("scan_streams", self.scan_streams, name_problem)
        if "." in self.subject_prefix and any(not p for p in self.subject_prefix.split(".")):
            raise ValueError(f"subject_prefix: {self.subject_prefix!r} has an empty token")
        if any(c in self.subject_prefix for c in "*> \t"):
            raise ValueError("subject_prefix: must be a literal subject (no wildcards or spaces)")


class PhiConfig(_Section, frozen=True, kw_only=True):
    """Catalog row 11: what is PHI, the push guard's rules, redaction and the scanner.

    ``fields`` / ``patterns`` hold for every template (and every log line and dead
    letter); ``templates`` add rules per template@version. A pattern is a regex
    named by its key: the incident record names the rule, never the value.
    """

    fields: list[Name] = msgspec.field(
        default_factory=lambda: ["diagnosis", "mrn", "dob", "ssn", "medication", "condition"]
    )
    patterns: dict[Name, Name] = msgspec.field(default_factory=dict)
    templates: list[PhiTemplateRule] = msgspec.field(default_factory=list)
    redaction: Name = "[redacted]"  # what replaces a PHI value in logs and dead letters
    excerpt_chars: PositiveInt = 24  # context kept each side of a find in an incident
    scan_interval_s: PositiveFloat = 60.0  # the scanner's turn
    scan_max_bytes: PositiveInt = 1_048_576  # log bytes read per file per turn
    scan_max_letters: PositiveInt = 500  # dead letters read per turn
    scan_dead_letters: bool = True
    # More JSON log files to scan besides [daemon] log_file (another replica's, say).
    log_files: list[Name] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        lowered = [f.lower() for f in self.fields]
        if len(set(lowered)) != len(lowered):
            raise ValueError("fields: a field is listed twice")
        for name, pattern in self.patterns.items():
            _refuse(f"patterns.{name}", regex_problem(pattern))
        seen: set[tuple[str, int | None]] = set()
        for index, rule in enumerate(self.templates):
            for version in _versions(rule.versions):
                key = (rule.template, version)
                if key in seen:
                    which = "every version" if version is None else f"version {version}"
                    raise ValueError(
                        f"templates[{index}]: {rule.template!r} {which} has rules already"
                    )
                seen.add(key)
        for name, pattern in self._all_patterns():
            if re.search(pattern, self.redaction):
                raise ValueError(
                    f"redaction: {self.redaction!r} matches pattern {name!r} (a redacted"
                    " line would be found again)"
                )

    def _all_patterns(self) -> list[tuple[str, str]]:
        found = list(self.patterns.items())
        for rule in self.templates:
            found += rule.patterns.items()
        return found


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
    commit_batch_max: PositiveInt = 200  # receipts applied by one statement (the group commit)

    def __post_init__(self) -> None:
        _refuse("callback_base_url", url_problem(self.callback_base_url, _HTTP))
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


class StatusSweepConfig(_Section, frozen=True, kw_only=True):
    """SMS and email dispatches whose receipt never came (issue 13): asked, then unknown."""

    query_after_s: PositiveFloat = 600.0  # dispatched this long without a receipt: ask
    query_interval_s: PositiveFloat = 900.0  # then at most this often (the claim's length)
    query_timeout_s: PositiveFloat = 5.0  # one status query
    sms_stale_after_s: PositiveFloat = 86_400.0  # no final answer this long: unknown
    email_stale_after_s: PositiveFloat = 259_200.0  # (SMTP answers no status query)
    sweep_interval_s: PositiveFloat = 60.0
    batch: PositiveInt = 200  # rows claimed per channel per turn
    concurrency: PositiveInt = 8  # status queries in flight


class BouncesConfig(_Section, frozen=True, kw_only=True):
    """Email bounce tracking (catalog row 3; threshold, window and volume are the row's)."""

    disable_after_s: NonNegativeFloat = 300.0  # above threshold this long: disable the category
    max_keys: PositiveInt = 10_000  # (tenant, category) pairs tracked
    throttle_rate_per_s: PositiveFloat = 1.0
    throttle_burst: PositiveInt = 10
    ceiling_ratio: Fraction = 0.5  # at once disabled when this share bounces (with min volume)
    reload_interval_s: PositiveFloat = 30.0  # re-read blocks (an operator's enable)


class UploadsConfig(_Section, frozen=True, kw_only=True):
    """Attachment uploads (row 17): the size cap, the blob store, pre-signed URLs.

    Every upload goes to a pre-signed URL (``POST {path}/upload-urls`` issues one):
    an HMAC-SHA256, keyed by the secret in ``signing_secret_file`` (a mounted
    secret) or else the environment variable ``signing_secret_env``, over the
    method, path, expiry and byte cap. The byte cap of a URL is at most
    ``max_upload_bytes``; bytes are counted as they stream and the upload is
    refused (413) the moment it passes its cap, before any of it is buffered.
    While row 8 fires (scans backed up), uploads over ``backed_up_max_bytes``
    are refused (503, ``Retry-After: retry_after_s``).
    """

    enabled: bool = True
    path: UrlPath = "/v1/attachments"
    max_upload_bytes: PositiveInt = 25 * 1024 * 1024
    backed_up_max_bytes: NonNegativeInt = 1024 * 1024
    blob_root: Name = "/var/lib/triage/blobs"
    fsync: bool = True
    signing_secret_env: Name = "TRIAGE_UPLOAD_SIGNING_SECRET"
    signing_secret_file: str | None = None
    url_lifetime_s: PositiveFloat = 900.0  # a pre-signed URL is valid this long
    max_body_bytes: PositiveInt = 4096  # the JSON body of an upload-URL request
    drain_max_bytes: NonNegativeInt = 65536  # of a refused body, read away so the 413 arrives
    download_chunk_bytes: PositiveInt = 65536
    retry_after_s: PositiveFloat = 30.0
    ask_timeout_s: PositiveFloat = 5.0  # an upload's wait for the admission actor

    def __post_init__(self) -> None:
        if self.backed_up_max_bytes > self.max_upload_bytes:
            raise ValueError(
                f"backed_up_max_bytes: must be at most max_upload_bytes ({self.max_upload_bytes})"
            )


class ScannerConfig(_Section, frozen=True, kw_only=True):
    """The antivirus scanner pool (row 8): clamd, our pending-scan queue, the workers.

    ``clamd_address`` is ``tcp://host:port`` or ``unix:///path``; unset, the daemon
    starts its own clamd when the binary exists (``embedded_*``: its signature
    directory -- unset: Debian's ``/var/lib/clamav`` if it holds a database, else
    the EICAR signature shipped with Triage --, threads, queue and stream cap).
    Workers scale between ``min_workers`` and ``max_workers``: one more every
    ``poll_interval_s`` while more than ``scale_up_depth`` scans wait per worker
    and clamd has an idle thread, all of them while row 8 fires; one fewer per
    poll while the queue is empty. A scan that clamd refuses (an ERROR, its size
    limit) is retried ``max_attempts`` times in all, ``retry_backoff_s`` apart,
    then ``failed``; a scan that cannot reach clamd waits for it (never counted
    as an attempt: clamd is down, not the file).
    """

    clamd_address: str | None = None
    connect_timeout_s: PositiveFloat = 2.0
    scan_timeout_s: PositiveFloat = 60.0
    ping_timeout_s: PositiveFloat = 2.0
    chunk_bytes: PositiveInt = 65536  # one INSTREAM chunk
    min_workers: PositiveInt = 1
    max_workers: PositiveInt = 8
    scale_up_depth: PositiveInt = 4
    queue_capacity: PositiveInt = 100_000  # our pending-scan queue; past it rows wait in the db
    poll_interval_s: PositiveFloat = 1.0  # STATS, the row-8 gauge, scaling, clamd health
    max_attempts: PositiveInt = 3
    retry_backoff_s: PositiveFloat = 1.0
    resume_batch: PositiveInt = 500  # pending rows reloaded from the database per turn
    embedded_database: str | None = None
    embedded_max_threads: PositiveInt = 4
    embedded_max_queue: PositiveInt = 100  # clamd's MaxQueue (its default)
    embedded_stream_max_bytes: PositiveInt = 26 * 1024 * 1024
    embedded_start_timeout_s: PositiveFloat = 60.0

    def __post_init__(self) -> None:
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers: must be at least min_workers ({self.min_workers})")
        if self.clamd_address is not None:
            try:
                _clamd_address_problem(self.clamd_address)
            except ValueError as exc:
                raise ValueError(f"clamd_address: {exc}") from None


def _clamd_address_problem(value: str) -> None:
    parts = urlsplit(value)
    port = parts.port
    if parts.scheme == "unix" and parts.path.startswith("/") and not parts.netloc:
        return
    if parts.scheme == "tcp" and parts.hostname and port is not None:
        return
    raise ValueError("must be tcp://host:port or unix:///absolute/path")


_NODE_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class JitsiNodeConfig(_Section, frozen=True, kw_only=True, omit_defaults=True):
    """One videobridge node of ``[jitsi] nodes``: unset ``url`` is played by the
    loopback emulator when ``[emulators] enabled``, else a config error."""

    name: Annotated[str, msgspec.Meta(pattern=_NODE_NAME)]
    url: str | None = None

    def __post_init__(self) -> None:
        _refuse("url", url_problem(self.url, _HTTP))


class JitsiConfig(_Section, frozen=True, kw_only=True):
    """The Jitsi pool (catalog row 4): one polled child per node, placement like jicofo's.

    Every ``poll_interval_s`` each node's ``/about/health``, ``/colibri/stats`` and
    ``/colibri/drain`` are read, each within its timeout, through the node's breaker
    (``[breakers.<breaker>]``). A node whose poll or allocation failed is skipped for
    ``failure_reset_s``; one not heard from for ``stale_after_s`` is not operational.
    Placement: operational, not shutting down; non-draining before draining; stress
    below ``overload_threshold`` before overloaded; then least loaded. Until its next
    poll, a node's stress counts ``room_stress`` more for each room placed on it (as
    jicofo adds an estimate per allocation), so one burst is spread over the nodes. Every
    ``place_interval_s`` up to ``place_batch`` waiting sessions are claimed for
    ``claim_lease_s``; a session that failed ``max_failures`` times stays failed.
    """

    nodes: list[JitsiNodeConfig] = msgspec.field(
        default_factory=lambda: [JitsiNodeConfig(name="jvb1"), JitsiNodeConfig(name="jvb2")]
    )
    breaker: ProfileName = "jitsi"
    mailbox: ProfileName = "jitsi"
    supervisor: ProfileName = "jitsi_pool"
    poll_interval_s: PositiveFloat = 5.0
    health_timeout_s: PositiveFloat = 2.0
    stats_timeout_s: PositiveFloat = 2.0
    allocate_timeout_s: PositiveFloat = 5.0
    failure_reset_s: PositiveFloat = 60.0
    stale_after_s: PositiveFloat = 15.0
    overload_threshold: Fraction = 0.8
    room_stress: NonNegativeFloat = 0.01
    place_interval_s: PositiveFloat = 1.0
    place_batch: PositiveInt = 50
    claim_lease_s: PositiveFloat = 60.0
    max_failures: PositiveInt = 5
    room_prefix: Annotated[str, msgspec.Meta(pattern=r"^[a-z][a-z0-9-]{0,30}$")] = "triage"
    #: the Jitsi Meet web address the join route's ``join_url`` starts with; unset: none
    meet_url: str | None = None

    def __post_init__(self) -> None:
        if self.meet_url is not None:
            scheme, _, rest = self.meet_url.partition("://")
            if scheme not in ("http", "https") or not rest or rest.startswith("/"):
                raise ValueError(
                    f"meet_url: {self.meet_url!r} is not an http(s) address like"
                    " https://meet.example.org"
                )
        if not self.nodes:
            raise ValueError("nodes: at least one videobridge node is needed")
        seen: set[str] = set()
        for index, node in enumerate(self.nodes):
            if node.name in seen:
                raise ValueError(f"nodes[{index}]: node name {node.name!r} is given twice")
            seen.add(node.name)
        for name in ("health_timeout_s", "stats_timeout_s"):
            if getattr(self, name) > self.poll_interval_s:
                raise ValueError(
                    f"{name}: must be <= poll_interval_s ({self.poll_interval_s:g}): a poll"
                    " ends before the next one"
                )
        if not self.stale_after_s > self.poll_interval_s:
            raise ValueError(f"stale_after_s: must be > poll_interval_s ({self.poll_interval_s:g})")
        if not self.claim_lease_s > self.allocate_timeout_s:
            raise ValueError(
                f"claim_lease_s: must be > allocate_timeout_s ({self.allocate_timeout_s:g})"
                " (a claim outlives the allocation it covers)"
            )


class FallbackConfig(_Section, frozen=True, kw_only=True):
    """Fallback message threads after a failed virtual visit (catalog rows 4, 14).

    A breaker per patient and day (``[breakers.<breaker>]``) counts the patient-day's
    failed visits: closed, a failure opens a thread; open, later failures share the
    patient-day's thread. ``max_threads_per_patient_day`` is the hard cap, kept by the
    database as well. At most ``max_patient_days`` breakers are kept (least recently
    used dropped; the database still holds the threads and the cap). A request the
    database could not take is tried again after ``retry_after_s``, ``max_attempts``
    times in all. Every ``sweep_interval_s`` up to ``sweep_batch`` failed sessions that
    have had no fallback thread for ``sweep_after_s`` (a request lost in a crash) are
    requested again.
    """

    breaker: ProfileName = "fallback_patient_day"
    mailbox: ProfileName = "fallback"
    max_threads_per_patient_day: PositiveInt = 3
    max_patient_days: PositiveInt = 100_000
    retry_after_s: PositiveFloat = 1.0  # a request the database refused is tried again
    max_attempts: PositiveInt = 10
    sweep_interval_s: PositiveFloat = 60.0
    sweep_after_s: PositiveFloat = 30.0
    sweep_batch: PositiveInt = 100


#: An objective: a share of good events, below 1 (a 100% objective has no budget).
Objective = Annotated[float, msgspec.Meta(gt=0, lt=1)]


class SloObjective(_Section, frozen=True, kw_only=True):
    """One SLO: the share of good events over ``[slo] window_days``."""

    target: Objective
    threshold_s: PositiveFloat | None = None  # send_latency: good when sent within this


class SloObjectives(_Section, frozen=True, kw_only=True):
    """The two SLOs of the seed's error-budget policy (section 2)."""

    dispatch_success: SloObjective = msgspec.field(
        default_factory=lambda: SloObjective(target=0.995)
    )
    send_latency: SloObjective = msgspec.field(
        default_factory=lambda: SloObjective(target=0.99, threshold_s=30.0)
    )

    def __post_init__(self) -> None:
        if self.send_latency.threshold_s is None:
            raise ValueError("send_latency.threshold_s: required (good when sent within it)")
        if self.dispatch_success.threshold_s is not None:
            raise ValueError("dispatch_success.threshold_s: a success SLO has no threshold")


class BurnAlert(_Section, frozen=True, kw_only=True):
    """A multiwindow burn-rate alert: the budget burns ``factor`` times too fast over
    both windows (the long one says it is real, the short one that it still is)."""

    factor: Annotated[float, msgspec.Meta(gt=0)]
    long_s: PositiveFloat
    short_s: PositiveFloat
    severity: Literal["page", "ticket"]

    def __post_init__(self) -> None:
        if self.short_s >= self.long_s:
            raise ValueError("short_s: must be shorter than long_s")


def _workbook_burn_alerts() -> list[BurnAlert]:
    # The SRE workbook's pairs (chapter "Alerting on SLOs"): page fast burns, ticket slow ones.
    return [
        BurnAlert(factor=14.4, long_s=3600.0, short_s=300.0, severity="page"),
        BurnAlert(factor=6.0, long_s=21600.0, short_s=1800.0, severity="page"),
        BurnAlert(factor=3.0, long_s=86400.0, short_s=7200.0, severity="ticket"),
        BurnAlert(factor=1.0, long_s=259200.0, short_s=21600.0, severity="ticket"),
    ]


class SloConfig(_Section, frozen=True, kw_only=True):
    """The error-budget policy (seed section 2): SLOs, their budget, the freeze.

    While more than ``freeze_burned_fraction`` of a ``window_days`` budget burned within
    any ``freeze_window_days``, a start (or reload) that changes an ``adapter_sections``
    section is refused, with the reason."""

    enabled: bool = True
    window_days: Annotated[int, msgspec.Meta(ge=1, le=366)] = 30
    freeze_window_days: Annotated[int, msgspec.Meta(ge=1, le=366)] = 7
    freeze_burned_fraction: Fraction = 0.5
    adapter_sections: list[Annotated[str, msgspec.Meta(min_length=1)]] = msgspec.field(
        default_factory=lambda: ["providers", "channels"]
    )
    rollup_interval_s: PositiveFloat = 10.0  # samples folded into minute buckets this often
    rollup_batch: PositiveInt = 20_000  # samples taken per rollup statement
    budget_interval_s: PositiveFloat = 60.0  # the budget gauges recomputed this often
    timeout_s: PositiveFloat = 10.0  # one rollup or budget query
    objectives: SloObjectives = msgspec.field(default_factory=SloObjectives)
    burn_alerts: list[BurnAlert] = msgspec.field(default_factory=_workbook_burn_alerts)

    def __post_init__(self) -> None:
        if self.freeze_window_days > self.window_days:
            raise ValueError("freeze_window_days: longer than window_days")
        known = {"providers", "channels", "dispatch", "dlr", "push_feedback", "status_sweep"}
        for i, section in enumerate(self.adapter_sections):
            if section not in known:
                raise ValueError(
                    f"adapter_sections[{i}]: {section!r} is not an adapter section"
                    f" (one of {', '.join(sorted(known))})"
                )


_LABEL_NAME: Final = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
#: Labels the forwarder sets itself (actors/alertmanager.py).
ALERT_LABELS: Final = frozenset({"alertname", "severity", "catalog_id", "breaker", "replica"})


class AlertmanagerConfig(_Section, frozen=True, kw_only=True):
    """Alert events to an Alertmanager (API v2). ``url`` unset: not forwarded."""

    url: str | None = None  # e.g. "http://alertmanager:9093"
    poll_s: PositiveFloat = 1.0  # the board is compared with what was told this often
    resend_s: PositiveFloat = 60.0  # firing alerts re-sent (endsAt: 4x this ahead)
    timeout_s: PositiveFloat = 5.0  # one post
    replica: str | None = None  # the `replica` label; unset: the host name
    generator_url: str | None = None  # a link back (the dashboard), on every alert
    labels: dict[str, str] = msgspec.field(default_factory=dict)  # added to every alert

    def __post_init__(self) -> None:
        _refuse("url", url_problem(self.url, _HTTP))
        _refuse("generator_url", url_problem(self.generator_url, _HTTP))
        for name in self.labels:
            if not _LABEL_NAME.fullmatch(name):
                raise ValueError(f"labels: {name!r} is not a Prometheus label name")
            if name in ALERT_LABELS:
                raise ValueError(f"labels: {name!r} is set by the forwarder itself")
        if self.poll_s > self.resend_s:
            raise ValueError("poll_s: longer than resend_s")


class DashboardConfig(_Section, frozen=True, kw_only=True):
    """The live dashboard (:mod:`supervisors.dashboard`): a page on the daemon's HTTP port
    at ``path``, fed over a websocket on ``port`` (the HTTP/1.1 server takes no upgrade).

    Each client gets a snapshot, then a diff every ``interval_s`` (nothing when nothing
    changed); at most ``max_clients`` at once (one more is refused with 503). A client
    whose send takes over ``send_timeout_s``, or with ``client_queue`` updates waiting
    unsent, is dropped (the page reconnects and starts from a new snapshot)."""

    enabled: bool = False
    path: str = "/dashboard"  # the page, on the daemon's HTTP port
    port: Port = 0  # the websocket, on daemon.host; 0 picks a free port
    max_clients: PositiveInt = 8
    interval_s: PositiveFloat = 1.0
    send_timeout_s: PositiveFloat = 2.0
    client_queue: PositiveInt = 4  # updates waiting for one client before it is dropped
    restart_history: PositiveInt = 10  # restart times kept per child

    def __post_init__(self) -> None:
        if not self.path.startswith("/") or self.path.endswith("/") or " " in self.path:
            raise ValueError(
                f"path: {self.path!r} must start with '/', not end with one, hold no space"
            )
        if self.path in ("/livez", "/readyz", "/metrics"):
            raise ValueError(f"path: {self.path!r} is one of the daemon's probes")


class RecorderConfig(_Section, frozen=True, kw_only=True):
    """The input recorder (:mod:`engine.recorder`) for ``triage tune what-if``: what the
    breakers and detectors were fed, kept in ``path`` and its rotated segments
    (``<path>.1`` ... ``<path>.<segments-1>``), each up to ``segment_bytes``, so the
    whole stays under ``segments * segment_bytes``. Inputs wait in a buffer of
    ``buffer`` records written every ``flush_s``; beyond it they are dropped and the
    recording says how many."""

    enabled: bool = False
    path: Annotated[str, msgspec.Meta(min_length=1)] = "/var/lib/triage/inputs"
    segment_bytes: Annotated[int, msgspec.Meta(ge=4096)] = 8 << 20
    segments: Annotated[int, msgspec.Meta(ge=1, le=100)] = 4
    buffer: PositiveInt = 65536
    flush_s: PositiveFloat = 1.0

    def __post_init__(self) -> None:
        if "\0" in self.path:
            raise ValueError("path: holds a NUL byte")


class TokensConfig(_Section, frozen=True, kw_only=True):
    """Join tokens for the virtual rooms (catalog row 10; :mod:`actors.key_ring`).

    Tokens are JWTs as Prosody's token module checks them: ``iss`` = ``issuer``,
    ``aud`` = ``audience``, ``sub`` = ``subject``. Prosody allows no clock leeway,
    so ``nbf`` is issued ``nbf_skew_s`` in the past (a bridge whose clock is behind
    ours by less still admits the token); a token lives ``ttl_s``. ``key_dir`` holds
    one key per file (a secret mount: ``<kid>.pem`` RS256, ``<kid>.hs256`` HS256),
    polled every ``reload_interval_s``. ``create_missing`` makes a missing directory
    with a fresh key (development); ``generate_when_exhausted`` writes a new key
    when a rotation leaves no spare (a read-only mount refuses: nothing signs).
    """

    issuer: Name = "triage"
    audience: Name = "jitsi"
    subject: Name = "meet.jitsi"
    key_dir: Name = "/etc/triage/join-keys"
    create_missing: bool = False
    nbf_skew_s: NonNegativeFloat = 30.0
    ttl_s: PositiveFloat = 7200.0
    reload_interval_s: PositiveFloat = 10.0
    max_token_bytes: PositiveInt = 8192
    max_body_bytes: PositiveInt = 16384  # the issue/verify API's request bodies
    ask_timeout_s: PositiveFloat = 2.0  # the API's wait for the key ring
    forensic_failures: PositiveInt = 1000  # refusals remembered for the forensic record
    forensic_origins: PositiveInt = 100  # distinct origins the record lists
    generate_when_exhausted: bool = True
    generated_key_bits: Annotated[int, msgspec.Meta(ge=2048, le=8192)] = 2048

    def __post_init__(self) -> None:
        if self.nbf_skew_s >= self.ttl_s:
            raise ValueError(f"nbf_skew_s: must be below ttl_s ({self.ttl_s})")


class RecordingsConfig(_Section, frozen=True, kw_only=True):
    """Recording ingest (catalog row 20; :mod:`actors.recording_ingest`).

    A recording is read from ``path`` (the blob path where the recorder drops its
    files; a recording names a file under it) and copied to ``store_path``. A
    denied or missing file is retried with the ``[retries.<retry>]`` profile's
    backoff and budget, then dead-lettered with a ``recording.failed`` event.
    ``resume_interval_s``: pending recordings (of a crashed or busy replica, lease
    ``lease_s``) are picked up again; at most ``concurrency`` ingests run at once.
    """

    path: Name = "/var/lib/triage/recordings/incoming"
    store_path: Name = "/var/lib/triage/recordings/store"
    retry: ProfileName = "recording_ingest"
    concurrency: PositiveInt = 4
    resume_interval_s: PositiveFloat = 30.0
    lease_s: PositiveFloat = 900.0
    resume_batch: PositiveInt = 100
    chunk_bytes: PositiveInt = 1024 * 1024
    event_subject: Name = "triage.events.recording.failed"
    max_body_bytes: PositiveInt = 4096  # the registration API's request bodies
    ask_timeout_s: PositiveFloat = 2.0  # the API's wait for the ingest actor

    def __post_init__(self) -> None:
        _refuse("event_subject", subject_problem(self.event_subject, literal=True))


class ThreadsConfig(_Section, frozen=True, kw_only=True):
    """The thread service (catalog row 12): threads, participants, read receipts."""

    list_limit: PositiveInt = 500  # participants or receipts returned by one list
    max_body_bytes: PositiveInt = 16_384  # a request body of the threads API (413 beyond)
    # the notice logged per refusal (row 12's detector pages; a page notice would stay held)
    severity: Annotated[str, msgspec.Meta(pattern="^(page|ticket|info)$")] = "ticket"


class ClockConfig(_Section, frozen=True, kw_only=True):
    """The clock monitor (catalog row 16): the host clock against the database's.

    Every ``interval_s`` it takes ``samples`` NTP-style readings (``SELECT
    clock_timestamp()`` between two wall-clock readings) on one connection, all
    within ``timeout_s``, and keeps the one with the smallest round trip.
    ``max_offset_s`` is the tolerated skew: a reading whose error bars lie wholly
    beyond it is skew (row 16's detector, whose threshold must be the same), one
    whose bars straddle it warns; the hybrid logical clock refuses remote
    timestamps further ahead than it.
    """

    enabled: bool = True
    interval_s: PositiveFloat = 10.0
    samples: Annotated[int, msgspec.Meta(ge=1, le=100)] = 5
    max_offset_s: PositiveFloat = 0.5
    timeout_s: PositiveFloat = 2.0

    def __post_init__(self) -> None:
        if self.timeout_s > self.interval_s:
            raise ValueError(
                f"timeout_s: must not exceed interval_s ({self.interval_s:g}): a turn ends"
                " before the next is due"
            )


#: The children that may run as singletons (``[singletons] actors``): work that must run
#: on one replica at a time. See :mod:`supervisors.singleton` for why these and no others.
SINGLETON_ACTORS: Final = frozenset({"push_feedback", "push_stale_sweep"})


class SingletonsConfig(_Section, frozen=True, kw_only=True):
    """Singletons under a PostgreSQL advisory-lock lease (:mod:`supervisors.singleton`).

    Each child named in ``actors`` runs only on the replica that holds its lease
    (a session-level advisory lock on a connection of its own, opened within
    ``connect_timeout_s``). A replica without the lease tries again every
    ``retry_s``; the holder checks its lease's connection every ``check_s`` and
    stops the child at once when it is gone. ``enabled = false`` runs every child
    on every replica (one daemon alone needs no lease).
    """

    enabled: bool = True
    actors: tuple[str, ...] = ("push_feedback",)
    retry_s: PositiveFloat = 2.0
    check_s: PositiveFloat = 1.0
    connect_timeout_s: PositiveFloat = 2.0

    def __post_init__(self) -> None:
        unknown = [name for name in self.actors if name not in SINGLETON_ACTORS]
        if unknown:
            known = ", ".join(sorted(SINGLETON_ACTORS))
            raise ValueError(f"actors: no singleton child {unknown[0]!r} (known: {known})")
        if len(set(self.actors)) != len(self.actors):
            raise ValueError("actors: a child is named twice")
        if self.connect_timeout_s > self.retry_s:
            raise ValueError(
                f"connect_timeout_s: must not exceed retry_s ({self.retry_s:g}): an attempt"
                " ends before the next is due"
            )


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
    status_sweep: StatusSweepConfig = msgspec.field(default_factory=StatusSweepConfig)
    bounces: BouncesConfig = msgspec.field(default_factory=BouncesConfig)
    uploads: UploadsConfig = msgspec.field(default_factory=UploadsConfig)
    scanner: ScannerConfig = msgspec.field(default_factory=ScannerConfig)
    jitsi: JitsiConfig = msgspec.field(default_factory=JitsiConfig)
    fallback: FallbackConfig = msgspec.field(default_factory=FallbackConfig)
    slo: SloConfig = msgspec.field(default_factory=SloConfig)
    alertmanager: AlertmanagerConfig = msgspec.field(default_factory=AlertmanagerConfig)
    dashboard: DashboardConfig = msgspec.field(default_factory=DashboardConfig)
    recorder: RecorderConfig = msgspec.field(default_factory=RecorderConfig)
    tokens: TokensConfig = msgspec.field(default_factory=TokensConfig)
    recordings: RecordingsConfig = msgspec.field(default_factory=RecordingsConfig)
    threads: ThreadsConfig = msgspec.field(default_factory=ThreadsConfig)
    clock: ClockConfig = msgspec.field(default_factory=ClockConfig)
    singletons: SingletonsConfig = msgspec.field(default_factory=SingletonsConfig)
    phi: PhiConfig = msgspec.field(default_factory=PhiConfig)
    erasure: ErasureConfig = msgspec.field(default_factory=ErasureConfig)
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
