"""Triage's domain-free runtime: supervised actors on Trio and the resilience primitives.

The modules are private in spirit; import from here::

    from engine import Supervisor, ChildSpec, Restart, Strategy, Actor, actor_child

Nothing in ``engine`` knows about SMS, tenants or the catalog, and nothing here
reads config: every number arrives through a constructor.
"""

from .actor import Actor, ActorRef, Overflow, Stop, Timer, actor_child
from .breaker import Breaker, BreakerStatistics, CircuitState
from .bulkhead import Bulkhead, BulkheadStatistics
from .clock import Chance, Clock
from .deadlines import Deadlines, Reply
from .detectors import (
    AgeOfNewestDetector,
    CountInWindowDetector,
    Detector,
    DetectorKind,
    DetectorSet,
    DetectorState,
    GaugeSustainedDetector,
    RateDetector,
    RatioDetector,
    SpikeOverBaselineDetector,
    make_detector,
)
from .errors import (
    ActorError,
    ActorStopped,
    AskTimeout,
    AuthFailed,
    BulkheadFull,
    CircuitOpen,
    ConfigError,
    LoadShed,
    MailboxFull,
    PermanentProviderError,
    ProviderError,
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    RateLimitExceeded,
    Rejected,
    RestartIntensityExceeded,
    SupervisorError,
    TooManyChildren,
    TransientProviderError,
    TriageError,
)
from .events import (
    ActorCrashed,
    ActorRestarted,
    BreakerStateChanged,
    DetectorCleared,
    DetectorFired,
    Event,
    EventBus,
    SupervisorEscalated,
)
from .guard import Guard
from .metrics import Metrics
from .ratelimit import RateLimiter
from .retry import RetryPolicy
from .runtime import Runtime, open_runtime
from .statelog import StateLog
from .supervisor import ChildInfo, ChildSpec, ChildState, Exit, Restart, Strategy, Supervisor

__all__ = [
    "Actor",
    "ActorCrashed",
    "ActorError",
    "ActorRef",
    "ActorRestarted",
    "ActorStopped",
    "AgeOfNewestDetector",
    "AskTimeout",
    "AuthFailed",
    "Breaker",
    "BreakerStateChanged",
    "BreakerStatistics",
    "Bulkhead",
    "BulkheadFull",
    "BulkheadStatistics",
    "Chance",
    "ChildInfo",
    "ChildSpec",
    "ChildState",
    "CircuitOpen",
    "CircuitState",
    "Clock",
    "ConfigError",
    "CountInWindowDetector",
    "Deadlines",
    "Detector",
    "DetectorCleared",
    "DetectorFired",
    "DetectorKind",
    "DetectorSet",
    "DetectorState",
    "Event",
    "EventBus",
    "Exit",
    "GaugeSustainedDetector",
    "Guard",
    "LoadShed",
    "MailboxFull",
    "Metrics",
    "Overflow",
    "PermanentProviderError",
    "ProviderError",
    "ProviderTimeout",
    "ProviderUnavailable",
    "RateDetector",
    "RateLimitExceeded",
    "RateLimited",
    "RateLimiter",
    "RatioDetector",
    "Rejected",
    "Reply",
    "Restart",
    "RestartIntensityExceeded",
    "RetryPolicy",
    "Runtime",
    "SpikeOverBaselineDetector",
    "StateLog",
    "Stop",
    "Strategy",
    "Supervisor",
    "SupervisorError",
    "SupervisorEscalated",
    "Timer",
    "TooManyChildren",
    "TransientProviderError",
    "TriageError",
    "actor_child",
    "make_detector",
    "open_runtime",
]
