"""The one answer table: an error -> HTTP status, NATS answer, JSON error code, Retry-After.

Every ingress door answers from here -- ``POST /v1/dispatches``
(:mod:`supervisors.dispatch_api`) and the NATS command subject
(:class:`~actors.dispatch_commands.DispatchCommands`) -- and the DLR webhooks
(:class:`~actors.dlr_ingress.DlrIngress`), which pass their own rules first
(``ruling_for(exc, rules=(*DLR_RULES, *RULES))``) and write the ruling in their own
body (it names the provider).

:data:`RULES` is read top to bottom; the first rule whose type matches answers::

    error                           status  code                   field            Retry-After
    RequestRejected                 its own (the door's refusals: bad body, 413, 415 ...)
    MissingIdempotencyKey           400     missing_idempotency_key its field
    InvalidIdempotencyKey           400     invalid_idempotency_key its field
    InvalidJson                     400     invalid_json
    InvalidField                    400     invalid_field          its field
    InvalidRequest                  400     invalid_request        its field
    UnstorableValue                 400     invalid_field
    IdempotencyConflict             409     idempotency_conflict   Idempotency-Key
    UnknownTenant                   422     unknown_tenant         tenant_id
    TemplateRetired                 422     template_retired
    TemplateNotFound                422     template_not_found
    CategoryDisabled                422     category_disabled
    PhiRefused                      422     phi_guard
    RateLimitExceeded               429     overloaded                              its own
    Overloaded, any other LoadShed  503     overloaded                              its own, else the door's
    TransientProviderError          503     unavailable                             the door's
    (an error with ``code`` + ``http_status`` attributes: answered by them -- the
     extension point for errors defined outside this table)
    anything else (a bug)           500     internal_error (logged)

The JSON body is ``{"error": code, "message": str(exc), "field"?: ...}``; a NATS
reply carries it with the status in its ``Triage-Status`` header (and
``Retry-After`` when set): :meth:`Answer.nats_headers`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import msgspec

from actors.dispatch_request import (
    InvalidField,
    InvalidIdempotencyKey,
    InvalidJson,
    InvalidRequest,
    MissingIdempotencyKey,
)
from actors.dispatcher import CategoryDisabled, Overloaded, PhiRefused
from actors.idempotency import IdempotencyConflict
from actors.templates import TemplateNotFound, TemplateRetired
from engine.errors import LoadShed, RateLimitExceeded, TransientProviderError, TriageError
from providers.db.dispatches import UnknownTenant, UnstorableValue

__all__ = [
    "IDEMPOTENCY_HEADER",
    "RULES",
    "STATUS_HEADER",
    "AcceptedBody",
    "Answer",
    "ErrorBody",
    "RequestRejected",
    "Rule",
    "Ruling",
    "answer_for",
    "ruling_for",
]

log = logging.getLogger("triage.answers")

IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
STATUS_HEADER: Final = "Triage-Status"


class AcceptedBody(msgspec.Struct, frozen=True, kw_only=True):
    dispatch_id: str
    status: str


class ErrorBody(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    error: str
    message: str
    field: str | None = None


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP status, its JSON body, and the ``Retry-After`` seconds if any."""

    status: int
    body: bytes
    retry_after_s: float | None = None

    @property
    def retry_after(self) -> str | None:
        """``Retry-After`` as HTTP wants it: whole seconds, rounded up, at least 1."""
        if self.retry_after_s is None:
            return None
        return str(max(1, math.ceil(self.retry_after_s)))

    def nats_headers(self) -> dict[str, str]:
        """The headers of the same answer as a NATS reply."""
        headers = {STATUS_HEADER: str(self.status), "Content-Type": "application/json"}
        if self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        return headers

    @classmethod
    def accepted(cls, dispatch_id: str, status: str, *, replay: bool) -> Answer:
        """202 for a new dispatch, 200 for an idempotent replay (the original answer)."""
        body = msgspec.json.encode(AcceptedBody(dispatch_id=dispatch_id, status=status))
        return cls(200 if replay else 202, body)

    @classmethod
    def error(
        cls,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        retry_after_s: float | None = None,
    ) -> Answer:
        body = msgspec.json.encode(ErrorBody(error=code, message=message, field=field))
        return cls(status, body, retry_after_s)


class RequestRejected(TriageError):
    """A request a door refused before the dispatcher saw it; it carries its own answer."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        http_status: int = 400,
        field: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status
        self.field = field
        self.retry_after_s = retry_after_s


Retry = Literal["none", "own", "door"]


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the table: errors of ``kind`` answer ``status`` / ``code``.

    ``field``: the field to blame (``"*"``: the error's own ``field`` attribute);
    ``retry``: no Retry-After, the error's own ``retry_after_s`` (else the door's),
    or the door's.
    """

    kind: type[BaseException]
    status: int
    code: str
    field: str | None = None
    retry: Retry = "none"


RULES: Final[tuple[Rule, ...]] = (
    Rule(MissingIdempotencyKey, 400, "missing_idempotency_key", field="*"),
    Rule(InvalidIdempotencyKey, 400, "invalid_idempotency_key", field="*"),
    Rule(InvalidJson, 400, "invalid_json"),
    Rule(InvalidField, 400, "invalid_field", field="*"),
    Rule(InvalidRequest, 400, "invalid_request", field="*"),
    Rule(UnstorableValue, 400, "invalid_field"),
    Rule(IdempotencyConflict, 409, "idempotency_conflict", field=IDEMPOTENCY_HEADER),
    Rule(UnknownTenant, 422, "unknown_tenant", field="tenant_id"),
    Rule(TemplateRetired, 422, "template_retired"),
    Rule(TemplateNotFound, 422, "template_not_found"),
    Rule(CategoryDisabled, 422, "category_disabled"),
    Rule(PhiRefused, 422, "phi_guard"),
    Rule(RateLimitExceeded, 429, "overloaded", retry="own"),
    Rule(Overloaded, 503, "overloaded", retry="own"),
    Rule(LoadShed, 503, "overloaded", retry="own"),
    Rule(TransientProviderError, 503, "unavailable", retry="door"),
)


def _own_retry(exc: BaseException) -> float | None:
    own = getattr(exc, "retry_after_s", None)
    return float(own) if isinstance(own, (int, float)) else None


@dataclass(frozen=True, slots=True)
class Ruling:
    """What the table says about one error: status, code, message, field, Retry-After.

    A door that writes its own JSON body (the DLR ingress names the provider) reads
    this; the dispatch doors take :func:`answer_for`, which encodes :class:`ErrorBody`.
    """

    status: int
    code: str
    message: str
    field: str | None = None
    retry_after_s: float | None = None

    def answer(self) -> Answer:
        return Answer.error(
            self.status, self.code, self.message, field=self.field,
            retry_after_s=self.retry_after_s,
        )  # fmt: skip


def ruling_for(exc: Exception, *, retry_after_s: float, rules: Sequence[Rule] = RULES) -> Ruling:
    """The table's ruling on ``exc`` (``rules``, read top to bottom, then the
    ``code`` / ``http_status`` extension point, else a logged 500); ``retry_after_s`` is
    the door's ``Retry-After`` for load shedding that does not say when to come back."""
    if isinstance(exc, RequestRejected):
        wait = exc.retry_after_s
        if wait is None and exc.http_status in (429, 503):
            wait = retry_after_s
        return Ruling(exc.http_status, exc.code, str(exc), exc.field, wait)
    for rule in rules:
        if isinstance(exc, rule.kind):
            field = rule.field
            if field == "*":
                own_field = getattr(exc, "field", None)
                field = own_field if isinstance(own_field, str) else None
            wait = None
            if rule.retry == "door":
                wait = retry_after_s
            elif rule.retry == "own":
                own = _own_retry(exc)
                wait = own if own is not None else retry_after_s
            return Ruling(rule.status, rule.code, str(exc), field, wait)
    code = getattr(exc, "code", None)
    status = getattr(exc, "http_status", None)
    if isinstance(code, str) and isinstance(status, int) and 400 <= status <= 599:
        own_field = getattr(exc, "field", None)
        wait = _own_retry(exc)
        if wait is None and status in (429, 503):
            wait = retry_after_s
        field = own_field if isinstance(own_field, str) else None
        return Ruling(status, code, str(exc), field, wait)
    log.error("unexpected error answered 500", exc_info=exc)
    return Ruling(500, "internal_error", f"internal error ({type(exc).__name__})")


def answer_for(exc: Exception, *, retry_after_s: float, rules: Sequence[Rule] = RULES) -> Answer:
    """The typed answer for ``exc``: :func:`ruling_for`, as :class:`ErrorBody` JSON."""
    return ruling_for(exc, retry_after_s=retry_after_s, rules=rules).answer()
