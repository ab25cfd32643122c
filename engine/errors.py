"""The engine's error tree, drawn once.

::

    TriageError
    ├─ ConfigError                     a config value or file is wrong (raised by config/)
    ├─ ProviderError                   an outside dependency answered badly
    │  ├─ TransientProviderError       worth retrying: ProviderTimeout, ProviderUnavailable,
    │  │                               RateLimited(retry_after_s)
    │  └─ PermanentProviderError       not worth retrying: Rejected, AuthFailed
    ├─ LoadShed                        refused fast to protect the process
    │  ├─ CircuitOpen                  the breaker is open (or forced open)
    │  ├─ BulkheadFull                 no permit within the bounded wait
    │  ├─ MailboxFull                  an actor's mailbox is full and its policy is REJECT
    │  ├─ RateLimitExceeded            the token bucket is empty
    │  └─ DatabaseUnavailable          the primary database is unreachable and the write
    │                                  cannot be spooled (a 503; retry later)
    ├─ ActorError
    │  ├─ ActorStopped                 the actor is gone; a tell or ask cannot be delivered
    │  └─ AskTimeout                   no reply within the ask's deadline
    └─ SupervisorError
       ├─ RestartIntensityExceeded     more than N restarts within T seconds
       └─ TooManyChildren              the dynamic-children bound is reached

Retry and restart decisions look at transient vs permanent, never at vendor codes.
``trio.Cancelled`` is never part of this tree and is never wrapped or counted.
"""

from __future__ import annotations

__all__ = [
    "ActorError",
    "ActorStopped",
    "AskTimeout",
    "AuthFailed",
    "BulkheadFull",
    "CircuitOpen",
    "ConfigError",
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


class ConfigError(TriageError):
    """A configuration file or value is invalid; the message names the TOML path."""


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
