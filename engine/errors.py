"""Triage's error tree, drawn once: every exception the project raises on purpose.

The classes marked with a module are defined there (next to the code that raises
them) but rooted here; ``engine`` itself imports nothing from the other packages.

::

    TriageError
    ├─ ConfigError (also ValueError)   a config value or file is wrong; ``problems`` lists
    │  │                               each as ``FILE:LINE: $.path: message``
    │  └─ BudgetFrozen                 actors.error_budget: an adapter section changed while
    │                                  the error budget is frozen (the reason in each problem)
    ├─ ProviderError                   an outside dependency answered badly
    │  ├─ TransientProviderError       worth retrying
    │  │  ├─ ProviderTimeout           no answer in time (the request may have been acted upon)
    │  │  │  └─ ClamdTimeout           providers.clamd: clamd did not answer in time
    │  │  ├─ RateLimited               slow down (``retry_after_s``)
    │  │  └─ ProviderUnavailable       refused or 5xx before acceptance
    │  │     ├─ NatsPublishFailed      actors.outbox_relay
    │  │     ├─ ClamdUnavailable       providers.clamd: refused or dropped the connection
    │  │     └─ MalformedPull          providers.push_feedback (also a MalformedReceipt)
    │  └─ PermanentProviderError       not worth retrying
    │     ├─ AuthFailed                credentials refused
    │     ├─ Rejected                  the request itself refused
    │     │  └─ RecipientGone          providers.channel: the recipient no longer exists
    │     └─ ScanError                 providers.clamd: clamd answered an error (never "clean")
    │        └─ ScanSizeLimit          INSTREAM size limit exceeded
    ├─ LoadShed                        refused fast to protect the process
    │  ├─ CircuitOpen                  the breaker is open (or forced open)
    │  ├─ BulkheadFull                 no permit within the bounded wait
    │  ├─ MailboxFull                  an actor's mailbox is full and its policy is REJECT
    │  ├─ RateLimitExceeded            the token bucket is empty
    │  ├─ DatabaseUnavailable          the primary database is unreachable and the write
    │  │                               cannot be spooled (a 503; retry later)
    │  ├─ SpoolFull                    providers.spool: the durable write journal is full
    │  ├─ PublishNotAttempted          actors.outbox_relay: the publish breaker refused
    │  └─ Overloaded                   actors.dispatcher: too many dispatches in flight
    ├─ ActorError
    │  ├─ ActorStopped                 the actor is gone; a tell or ask cannot be delivered
    │  └─ AskTimeout                   no reply within the ask's deadline
    ├─ SupervisorError
    │  ├─ RestartIntensityExceeded     more than N restarts within T seconds
    │  └─ TooManyChildren              the dynamic-children bound is reached
    ├─ StartAbandoned                  supervisors.backbone: a drain cancelled the start
    ├─ DaemonStartFailed               supervisors.daemon: failed before ready (to an awaiting caller)
    ├─ RequestRejected                 actors.answers: refused at a door before the submitter
    ├─ InvalidRequest                  actors.dispatch_request: a request refused at decoding (400)
    │  ├─ InvalidField                 a field out of the [dispatch] limits or shape, named
    │  ├─ InvalidJson                  not JSON, or not the request's shape
    │  ├─ MissingIdempotencyKey        no Idempotency-Key given
    │  └─ InvalidIdempotencyKey        a key that is empty, too long or not visible ASCII
    ├─ WebhookRefused                  actors.dlr_ingress: a callback refused (DLR_RULES answer it)
    │  ├─ NoWebhook                    404 not_found
    │  ├─ MethodNotAllowed             405, Allow: POST
    │  ├─ UnknownProvider              404 unknown_provider
    │  ├─ InvalidContentLength         400
    │  ├─ PayloadTooLarge              413
    │  ├─ CallbackRateLimited          429 rate_limited, the provider's Retry-After
    │  ├─ BadCallbackSignature         401 bad_signature
    │  ├─ MalformedCallback            400 malformed_receipt
    │  ├─ ParserFailed                 500 internal_error (logged)
    │  ├─ TooManyReceipts              413 too_many_receipts
    │  ├─ NotReady                     503 not_ready
    │  ├─ QueueFull                    429 queue_full
    │  ├─ AckTimeout                   503 ack_timeout
    │  ├─ SinkFailed                   503 sink_failed
    │  └─ Disconnected                 the provider left mid-body: counted, not answered
    ├─ CategoryDisabled                actors.dispatcher: the tenant's category is disabled
    ├─ PhiRefused                      actors.dispatcher: the push PHI guard refused the payload
    │                                  (actors.phi_guard: category halted, version retired)
    ├─ IdempotencyConflict             actors.idempotency: one key, two different requests
    ├─ TemplateNotFound                actors.templates: fail closed (catalog row 19)
    │  └─ TemplateRetired              the version was retired (row 11: the PHI guard), with why
    ├─ TemplateRenderError             actors.templates
    │  └─ MissingField                 a template field the request did not give
    ├─ FeedbackStalled                 actors.push_feedback: no feedback while pushes wait
    ├─ ThreadError                     actors.thread_service: a thread operation refused
    │  ├─ ThreadNotFound               the acting tenant has no such thread (RLS hides whose)
    │  └─ CrossTenantParticipant       a participant of another tenant (app check or RLS, row 12)
    ├─ ClockOffsetExceeded             engine.hlc: a remote timestamp too far ahead (row 16)
    ├─ ReceiptError (also ValueError)  providers.receipts: an inbound receipt refused
    │  ├─ BadSignature
    │  │  └─ StaleReceipt              signed outside the accepted window, or at no finite time
    │  └─ MalformedReceipt
    ├─ TokenRefused                    providers.join_tokens: a join token refused (401, ``reason``)
    │  ├─ TokenMalformed               not a JWT with the claims Prosody checks
    │  ├─ AlgorithmRefused             ``alg: none``, or not the algorithm of the kid's key
    │  ├─ UnknownKeyId                 no kid, or one the key ring does not hold
    │  ├─ TokenForged                  the signature does not verify
    │  ├─ TokenExpired                 now >= exp (no leeway, as Prosody)
    │  ├─ TokenNotYetValid             now < nbf
    │  ├─ WrongIssuer                  iss is not [tokens] issuer
    │  ├─ WrongAudience                aud is not [tokens] audience
    │  ├─ WrongSubject                 sub is not [tokens] subject
    │  ├─ WrongRoom                    room is not the room asked for
    │  └─ TokenRevoked                 its kid is retired or its jti revoked (row 10)
    ├─ SigningUnavailable              providers.join_tokens: no key may sign (issuing fails closed)
    │  └─ ClockSkewed                  this host's clock proven off by more than the limit (row 16)
    ├─ PurgeDenied                     actors.erasure_saga: the stream refuses purges (deny_purge, row 15)
    ├─ ErasureRefused (+ ValueError)   actors.erasure_saga: an erasure naming no tenant or no patient
    ├─ KeyFileError                    providers.key_ring: a key file refused, named; the old ring kept
    ├─ InputRecordingError             engine.replay: a what-if recording unreadable (file, offset)
    ├─ RecordingError                  providers.recording_files: a recording not ingested (row 20)
    │  ├─ RecordingMissing             no file at the path (retried)
    │  ├─ RecordingDenied              the file is not readable (retried)
    │  ├─ RecordingStoreFailed         the store refused the copy (retried)
    │  └─ RecordingPathRefused         can never name a recording of the blob path (not retried)
    ├─ BodyTooLarge                    providers.asgi: the request body is over its cap
    ├─ ClientDisconnected              providers.asgi: the client left before the body was read
    ├─ CategoryError (also ValueError) providers.db.categories: not a category block's name
    ├─ UnknownTenant                   providers.db.dispatches: a well-formed tenant id of no tenant
    ├─ UnstorableValue                 providers.db.dispatches: a value the database refuses
    ├─ PoisonEvent                     providers.db.outbox: a publish result, dead-letter at once
    ├─ RedriveError                    providers.db.dead_letters: a redrive refused
    ├─ MigrationError                  providers.db.migrate
    │  ├─ ChecksumMismatch             an applied migration file changed
    │  ├─ MigrationOrderError
    │  └─ MigrationFailed
    ├─ UnsafeRoleError                 providers.db.roles: the daemon's role bypasses RLS
    ├─ EmbeddedServerError             providers.embedded: an embedded server did not start
    ├─ BlobStoreError                  providers.blobstore: the attachment store refused
    │  ├─ BlobKeyInvalid (also ValueError)  a key that could leave the root (traversal...)
    │  ├─ BlobNotFound
    │  ├─ BlobExists                   a key is written once
    │  └─ BlobTooLarge                 the stream passed the put's byte cap
    ├─ PresignError                    providers.presigned: a pre-signed URL refused
    │  ├─ SignatureMissing             401 signature_required
    │  ├─ SignatureForged              403 bad_signature
    │  └─ UrlExpired                   403 url_expired
    └─ UploadRefused                   actors.upload_admission: an upload or download refused
                                       (413 payload_too_large, 503 scanner_backed_up, ...)

Retry and restart decisions look at transient vs permanent, never at vendor codes.
``ValueError`` stays a second base where callers catch ``ValueError``.
``trio.Cancelled`` is never part of this tree and is never wrapped or counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

__all__ = [
    "ActorError",
    "ActorStopped",
    "AskTimeout",
    "AuthFailed",
    "BulkheadFull",
    "CircuitOpen",
    "ConfigError",
    "ConfigProblem",
    "DatabaseUnavailable",
    "LoadShed",
    "MailboxFull",
    "PermanentProviderError",
    "ProviderError",
    "ProviderTimeout",
    "ProviderUnavailable",
    "RateLimitExceeded",
    "RateLimited",
    "Rejected",
    "RestartIntensityExceeded",
    "SupervisorError",
    "TooManyChildren",
    "TransientProviderError",
    "TriageError",
]


class TriageError(Exception):
    """Root of every error Triage raises on purpose."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigProblem:
    """One thing wrong with a configuration: where (file, line, TOML path) and what.

    Printed as ``FILE:LINE: $.path: message``; a problem raised where no file is
    known (an engine constructor) has an empty ``source`` and ``path`` until
    :meth:`ConfigError.at` places it.
    """

    source: str
    line: int | None
    path: str
    message: str
    column: int | None = None

    def __str__(self) -> str:
        where = self.source
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return ": ".join(part for part in (where, self.path, self.message) if part)


class ConfigError(TriageError, ValueError):
    """A configuration file or value is invalid. ``problems`` lists every problem found.

    ``config`` raises it with the problems of a file; an engine constructor with
    one message (``ConfigError("detector 'x': window_s must be > 0")``), which the
    caller that knows the TOML path places with :meth:`at`.
    """

    def __init__(self, problems: str | Iterable[ConfigProblem]) -> None:
        if isinstance(problems, str):
            problems = [ConfigProblem(source="", line=None, path="", message=problems)]
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))

    def at(self, source: str, path: str) -> ConfigError:
        """This error with every problem that names no file placed in ``source`` at ``path``."""
        return ConfigError(
            p if p.source else replace(p, source=source, path=p.path or path) for p in self.problems
        )


class ProviderError(TriageError):
    """An outside dependency failed."""


class TransientProviderError(ProviderError):
    """A failure that may succeed on retry."""


class ProviderTimeout(TransientProviderError):
    """No answer in time. The request may or may not have been acted upon."""


class ProviderUnavailable(TransientProviderError):
    """Refused, reset or 5xx before acceptance: the request was definitely not acted upon."""


class RateLimited(TransientProviderError):
    """The provider asked us to slow down."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class PermanentProviderError(ProviderError):
    """A failure that will fail again: do not retry."""


class Rejected(PermanentProviderError):
    """The provider refused the request itself (bad recipient, bad payload)."""


class AuthFailed(PermanentProviderError):
    """Credentials were refused."""


class LoadShed(TriageError):
    """Refused fast to protect the process; the caller may try later."""


class CircuitOpen(LoadShed):
    """The breaker does not let this call through."""

    def __init__(self, breaker: str, *, retry_after_s: float | None = None) -> None:
        detail = f" (half-open in {retry_after_s:.3f}s)" if retry_after_s is not None else ""
        super().__init__(f"circuit {breaker!r} is open{detail}")
        self.breaker = breaker
        self.retry_after_s = retry_after_s


class BulkheadFull(LoadShed):
    """No bulkhead permit was free within the bounded wait."""

    def __init__(self, bulkhead: str, *, capacity: int, waited_s: float) -> None:
        super().__init__(
            f"bulkhead {bulkhead!r} is full ({capacity} in use, waited {waited_s:.3f}s)"
        )
        self.bulkhead = bulkhead
        self.capacity = capacity


class MailboxFull(LoadShed):
    """The actor's mailbox is full and its overflow policy is REJECT."""

    def __init__(self, actor: str, *, capacity: int) -> None:
        super().__init__(f"mailbox of {actor!r} is full ({capacity} messages)")
        self.actor = actor
        self.capacity = capacity


class RateLimitExceeded(LoadShed):
    """The token bucket for this key is empty."""

    def __init__(self, limiter: str, key: str, *, retry_after_s: float) -> None:
        super().__init__(
            f"rate limit {limiter!r} exceeded for {key!r}; retry in {retry_after_s:.3f}s"
        )
        self.limiter = limiter
        self.key = key
        self.retry_after_s = retry_after_s


class ActorError(TriageError):
    """A message could not be delivered or answered."""


class ActorStopped(ActorError):
    """The actor has stopped; its mailbox is closed."""


class AskTimeout(ActorError):
    """The actor did not reply within the ask's deadline."""


class SupervisorError(TriageError):
    """A supervisor gave up."""


class RestartIntensityExceeded(SupervisorError):
    """More than ``max_restarts`` restarts within ``period_s``: the supervisor stops and escalates."""

    def __init__(self, supervisor: str, *, max_restarts: int, period_s: float) -> None:
        super().__init__(
            f"supervisor {supervisor!r}: more than {max_restarts} restarts within {period_s}s"
        )
        self.supervisor = supervisor
        self.max_restarts = max_restarts
        self.period_s = period_s


class TooManyChildren(SupervisorError):
    """A dynamic supervisor already runs its maximum number of children."""


class DatabaseUnavailable(LoadShed):
    """A write the primary database cannot take now, and that may not be spooled: a 503."""

    def __init__(self, kind: str, *, reason: str) -> None:
        super().__init__(f"database unavailable for {kind!r} writes: {reason}")
        self.kind = kind
        self.reason = reason
