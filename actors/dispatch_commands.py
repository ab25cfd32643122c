"""Dispatch commands: the request's wire format, its answers, and the NATS command subject.

A dispatch request comes in two ways and is answered the same way by both:

* HTTP, ``POST /v1/dispatches`` (:mod:`supervisors.dispatch_api`), with the
  ``Idempotency-Key`` header and a JSON :class:`DispatchBody`;
* NATS request/reply on a command subject (:class:`DispatchCommands`, default
  ``triage.commands.dispatch``, subscribed in a queue group so replicas share
  the load), with the same JSON plus an ``"idempotency_key"`` field, or the
  NATS header ``Idempotency-Key``.

This module holds what both share -- the wire structs, the validation, and the
mapping of a :class:`Submitter`'s result or error onto an :class:`Answer` (an
HTTP status, a JSON body, and an optional ``Retry-After``) -- because the HTTP
API (``supervisors/``) may import ``actors/`` but not the other way round.

Answers::

    202 {"dispatch_id", "status"}         accepted (a new request)
    200 {"dispatch_id", "status"}         an idempotent replay: the original answer
    4xx/5xx {"error", "message", "field"?} a typed refusal (``field`` when one is to blame)

The error convention
    An error the submitter raises is answered from two attributes when it has
    them: ``code: str`` (machine-readable, e.g. ``"template_not_found"``) and
    ``http_status: int``; optionally ``field: str`` and ``retry_after_s: float``.
    Errors without them are answered by kind:

    ==========================================  ===  =======================
    ``IdempotencyConflict``                     409  idempotency_conflict
    ``RateLimitExceeded``                       429  overloaded (Retry-After)
    any other ``LoadShed`` (breaker, bulkhead,  503  overloaded (Retry-After)
    mailbox, database unavailable)
    ``TransientProviderError``                  503  unavailable (Retry-After)
    anything else (a bug)                       500  internal_error (logged)
    ==========================================  ===  =======================

    :class:`RequestRejected` is this module's own error in that convention (bad
    bodies, bad keys); the dispatcher's typed errors follow it too.

NATS replies carry the JSON body above; the status is in the reply header
``Triage-Status`` (``Retry-After`` too when set). Garbage -- bytes that are not
JSON, a body that fails validation, a missing key, a body over the cap -- gets
a typed error reply, never a crash; a message without a reply subject is
counted and dropped (there is nobody to answer).

Bridging (DESIGN.md section 7): the subscription lives on the asyncio side.
Each turn crosses the bridge twice: :func:`next_commands` waits for the first
message and drains what is already buffered (up to ``batch_max``), then every
reply of the batch goes out in one :func:`publish_replies`. Commands of a batch
are submitted concurrently. The subscription's buffer is bounded
(``pending_msgs_limit``): past it nats-py drops messages (a slow consumer) and
their requesters time out -- bounded, never an unbounded queue.

State machine (logged on every transition)::

    STARTING --subscribed--> SERVING
    SERVING --NATS unreachable--> DISCONNECTED --a fetch works--> SERVING
    any --cancelled--> STOPPED
"""

from __future__ import annotations

import enum
import logging
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Final, Protocol, TypeVar

import msgspec
import nats.errors
import trio
from nats.aio.subscription import Subscription
from prometheus_client import CollectorRegistry, Counter

from actors.idempotency import IdempotencyConflict
from engine.errors import LoadShed, ProviderError, RateLimitExceeded, TransientProviderError
from engine.metrics import families
from engine.supervisor import ChildSpec, Restart
from providers import jetstream
from providers.bridge import run
from providers.channel import ChannelName
from providers.db.dispatches import MAX_TEMPLATE_VERSION, UnknownTenant, UnstorableValue

__all__ = [
    "IDEMPOTENCY_HEADER",
    "MAX_IDEMPOTENCY_KEY_LENGTH",
    "STATUS_HEADER",
    "AcceptedBody",
    "Answer",
    "Command",
    "CommandsState",
    "CommandsStats",
    "DispatchBody",
    "DispatchCommandBody",
    "DispatchCommands",
    "DispatchRequest",
    "ErrorBody",
    "Reply",
    "RequestRejected",
    "SubmitResult",
    "Submitter",
    "answer_for_error",
    "check_idempotency_key",
    "decode_body",
    "decode_command",
    "next_commands",
    "publish_replies",
    "submit_and_answer",
    "subscribe",
    "unsubscribe",
]

log = logging.getLogger("triage.dispatch_commands")

IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
STATUS_HEADER: Final = "Triage-Status"
#: The default longest ``Idempotency-Key`` (a constructor keyword wherever it is used).
MAX_IDEMPOTENCY_KEY_LENGTH: Final = 200

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


# -- the wire --------------------------------------------------------------------------


class DispatchBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The JSON body of ``POST /v1/dispatches``. Unknown fields are refused."""

    tenant_id: uuid.UUID
    channel: ChannelName
    template: NonEmpty
    recipient: NonEmpty
    template_version: Annotated[int, msgspec.Meta(ge=1, le=MAX_TEMPLATE_VERSION)] | None = None
    data: dict[str, str] = msgspec.field(default_factory=dict)


class DispatchCommandBody(DispatchBody, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The NATS command: the HTTP body plus the key (or the ``Idempotency-Key`` header)."""

    idempotency_key: str | None = None


class DispatchRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A validated request, as the :class:`Submitter` gets it (either door)."""

    idempotency_key: str
    tenant_id: str  # canonical UUID text
    channel: ChannelName
    template: str
    recipient: str
    template_version: int | None = None
    data: dict[str, str] = msgspec.field(default_factory=dict)

    @classmethod
    def of(cls, body: DispatchBody, idempotency_key: str) -> DispatchRequest:
        return cls(
            idempotency_key=idempotency_key,
            tenant_id=str(body.tenant_id),
            channel=body.channel,
            template=body.template,
            recipient=body.recipient,
            template_version=body.template_version,
            data=dict(body.data),
        )


class SubmitResult(msgspec.Struct, frozen=True, kw_only=True):
    """The submitter's answer: the dispatch and its status; ``replay`` for a known key."""

    dispatch_id: str
    status: str
    replay: bool = False


class Submitter(Protocol):
    """What both doors call (the dispatcher implements it)."""

    async def submit(self, request: DispatchRequest) -> SubmitResult:
        """Accept ``request`` or raise a typed error (see the module's convention)."""
        ...


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


class RequestRejected(Exception):
    """A request refused before it reached the submitter, in the module's error convention."""

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


# -- validation ------------------------------------------------------------------------

_HTTP_DECODER = msgspec.json.Decoder(DispatchBody)
_NATS_DECODER = msgspec.json.Decoder(DispatchCommandBody)
_AT_PATH = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_NAMED = re.compile(r"field `(?P<name>[^`]+)`")
# Visible ASCII and the space: what a header carries unmangled.
_KEY_CHARS = re.compile(r"^[\x20-\x7e]+$")


def _field_of(message: str) -> str | None:
    """The field msgspec's message names (``$.data[...]`` -> ``data[...]``), if any."""
    at = _AT_PATH.search(message)
    if at is not None:
        path = at.group("path")
        named = _NAMED.search(message)
        if named is not None:  # a nested object missing or refusing a field
            return f"{path}.{named.group('name')}" if path else named.group("name")
        return path or None
    named = _NAMED.search(message)
    return named.group("name") if named is not None else None


B = TypeVar("B", bound=DispatchBody)


def _decode(decoder: msgspec.json.Decoder[B], data: bytes) -> B:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise RequestRejected("invalid_field", str(exc), field=_field_of(str(exc))) from exc
    except msgspec.DecodeError as exc:
        raise RequestRejected("invalid_json", f"the body is not JSON: {exc}") from exc


def decode_body(data: bytes) -> DispatchBody:
    """The typed HTTP body.

    Raises :class:`RequestRejected` ``invalid_json`` (400) for bytes that are not
    JSON and ``invalid_field`` (400, with ``field``) for JSON that fails validation.
    """
    return _decode(_HTTP_DECODER, data)


def decode_command(data: bytes) -> DispatchCommandBody:
    """The typed NATS command body (with ``idempotency_key``); errors as :func:`decode_body`."""
    return _decode(_NATS_DECODER, data)


def check_idempotency_key(value: str | None, *, max_length: int) -> str:
    """The key, or :class:`RequestRejected` (400 ``missing_idempotency_key`` /
    ``invalid_idempotency_key``): 1..``max_length`` visible ASCII characters or spaces,
    not starting or ending with a space."""
    if value is None or value == "":
        raise RequestRejected(
            "missing_idempotency_key",
            f"the {IDEMPOTENCY_HEADER} header is required",
            field=IDEMPOTENCY_HEADER,
        )
    if len(value) > max_length:
        raise RequestRejected(
            "invalid_idempotency_key",
            f"{IDEMPOTENCY_HEADER} is {len(value)} characters long; at most {max_length}",
            field=IDEMPOTENCY_HEADER,
        )
    if not _KEY_CHARS.match(value) or value != value.strip():
        raise RequestRejected(
            "invalid_idempotency_key",
            f"{IDEMPOTENCY_HEADER} must be printable ASCII without leading or trailing spaces",
            field=IDEMPOTENCY_HEADER,
        )
    return value


# -- answers ---------------------------------------------------------------------------


def answer_for_error(exc: Exception, *, retry_after_s: float) -> Answer:
    """The typed answer for an error (the module's table); ``retry_after_s`` is the
    ``Retry-After`` for load shedding that does not say when to come back."""
    code = getattr(exc, "code", None)
    status = getattr(exc, "http_status", None)
    own_retry = getattr(exc, "retry_after_s", None)
    if isinstance(code, str) and isinstance(status, int) and 400 <= status <= 599:
        field = getattr(exc, "field", None)
        wait = float(own_retry) if isinstance(own_retry, (int, float)) else None
        if wait is None and status in (429, 503):
            wait = retry_after_s
        return Answer.error(
            status,
            code,
            str(exc),
            field=field if isinstance(field, str) else None,
            retry_after_s=wait,
        )
    if isinstance(exc, UnknownTenant):
        return Answer.error(422, "unknown_tenant", str(exc), field="tenant_id")
    if isinstance(exc, UnstorableValue):
        return Answer.error(400, "invalid_field", str(exc))
    if isinstance(exc, IdempotencyConflict):
        return Answer.error(409, "idempotency_conflict", str(exc), field=IDEMPOTENCY_HEADER)
    if isinstance(exc, RateLimitExceeded):
        return Answer.error(429, "overloaded", str(exc), retry_after_s=exc.retry_after_s)
    if isinstance(exc, LoadShed):
        wait = own_retry if isinstance(own_retry, (int, float)) else retry_after_s
        return Answer.error(503, "overloaded", str(exc), retry_after_s=float(wait))
    if isinstance(exc, TransientProviderError):
        return Answer.error(503, "unavailable", str(exc), retry_after_s=retry_after_s)
    log.error("dispatch: unexpected error from the submitter", exc_info=exc)
    return Answer.error(500, "internal_error", f"internal error ({type(exc).__name__})")


async def submit_and_answer(
    submitter: Submitter, request: DispatchRequest, *, retry_after_s: float
) -> Answer:
    """Submit ``request`` and answer: 202 (new), 200 (replay), or the error's answer."""
    try:
        result = await submitter.submit(request)
    except Exception as exc:
        return answer_for_error(exc, retry_after_s=retry_after_s)
    body = msgspec.json.encode(AcceptedBody(dispatch_id=result.dispatch_id, status=result.status))
    return Answer(200 if result.replay else 202, body)


# -- NATS, asyncio side (each function is one unit of work for providers.bridge.run) ------


@dataclass(frozen=True, slots=True)
class Command:
    """One request off the subject (copied out of nats-py's message)."""

    subject: str
    reply: str
    data: bytes
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class Reply:
    subject: str
    data: bytes
    headers: dict[str, str]


async def subscribe(
    client: jetstream.JetStreamClient, subject: str, queue: str, pending_msgs_limit: int
) -> Subscription:
    """asyncio side: a queue-group subscription without a callback (read by :func:`next_commands`)."""
    subscription: Subscription = await client.nc.subscribe(
        subject, queue=queue, pending_msgs_limit=pending_msgs_limit
    )
    return subscription


async def unsubscribe(subscription: Subscription) -> None:
    """asyncio side: leave the queue group (buffered requests are dropped; requesters time out)."""
    await subscription.unsubscribe()


async def next_commands(subscription: Subscription, batch: int, timeout_s: float) -> list[Command]:
    """asyncio side: wait up to ``timeout_s`` for one request, then take what is buffered
    (at most ``batch`` in all); [] when none came."""
    try:
        first = await subscription.next_msg(timeout=timeout_s)
    except nats.errors.TimeoutError:
        return []
    messages = [first]
    while len(messages) < batch and subscription.pending_msgs > 0:
        messages.append(await subscription.next_msg(timeout=None))
    return [
        Command(
            subject=msg.subject,
            reply=msg.reply,
            data=bytes(msg.data),
            headers=dict(msg.headers or {}),
        )
        for msg in messages
    ]


async def publish_replies(client: jetstream.JetStreamClient, replies: Sequence[Reply]) -> None:
    """asyncio side: publish every reply, then flush once."""
    for reply in replies:
        await client.nc.publish(reply.subject, reply.data, headers=reply.headers)
    await client.nc.flush()


# -- NATS, Trio side -------------------------------------------------------------------


class CommandsState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DISCONNECTED = "disconnected"
    STOPPED = "stopped"


class _CommandMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.answered = Counter(
            "triage_dispatch_commands_total",
            "Dispatch commands answered on the NATS subject, by HTTP-style status",
            ["status"],
            registry=registry,
        )
        self.unanswerable = Counter(
            "triage_dispatch_commands_unanswerable_total",
            "Dispatch commands dropped because they carried no reply subject",
            registry=registry,
        )


def _command_metrics(registry: CollectorRegistry) -> _CommandMetrics:
    return families(registry, _CommandMetrics)


@dataclass
class CommandsStats:
    received: int = 0
    answered: int = 0
    rejected: int = 0  # answered with a 4xx/5xx
    unanswerable: int = 0  # no reply subject: dropped


class DispatchCommands:
    """Serves the dispatch command subject; run :meth:`run` under a supervisor.

    Every number comes from the caller: ``max_body_bytes`` (a larger command is
    refused with 413), ``batch_max`` (requests taken, and submitted concurrently,
    per turn), ``poll_timeout_s`` (how long one fetch waits; also the pause after
    NATS was unreachable), ``pending_msgs_limit`` (the subscription's buffer),
    ``retry_after_s`` (``Retry-After`` for load shedding that names none),
    ``unsubscribe_timeout_s`` (the shielded cleanup's deadline).
    """

    name = "dispatch_commands"

    def __init__(
        self,
        *,
        client: jetstream.JetStreamClient,
        submitter: Submitter,
        subject: str,
        queue: str,
        max_body_bytes: int,
        batch_max: int,
        poll_timeout_s: float,
        pending_msgs_limit: int,
        retry_after_s: float,
        unsubscribe_timeout_s: float,
        max_key_length: int = MAX_IDEMPOTENCY_KEY_LENGTH,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if max_body_bytes < 1 or batch_max < 1 or pending_msgs_limit < 1:
            raise ValueError("max_body_bytes, batch_max and pending_msgs_limit must be >= 1")
        if not (poll_timeout_s > 0 and retry_after_s > 0 and unsubscribe_timeout_s > 0):
            raise ValueError("poll_timeout_s, retry_after_s, unsubscribe_timeout_s must be > 0")
        self.client = client
        self.submitter = submitter
        self.subject = subject
        self.queue = queue
        self.max_body_bytes = max_body_bytes
        self.batch_max = batch_max
        self.poll_timeout_s = poll_timeout_s
        self.pending_msgs_limit = pending_msgs_limit
        self.retry_after_s = retry_after_s
        self.unsubscribe_timeout_s = unsubscribe_timeout_s
        self.max_key_length = max_key_length
        self.state = CommandsState.STARTING
        self.stats = CommandsStats()
        self.subscription: Subscription | None = None
        self._metrics = _command_metrics(registry) if registry is not None else None

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe, signal started (the subscription is registered with the server), serve."""
        try:
            self.subscription = await run(
                subscribe, self.client, self.subject, self.queue, self.pending_msgs_limit,
                service="nats",
            )  # fmt: skip
            # The SUB must reach the server before callers are told we are ready.
            await run(self.client.nc.flush, service="nats")
            self._enter(CommandsState.SERVING, f"subscribed to {self.subject!r} ({self.queue})")
            task_status.started()
            while True:
                await self.step()
        finally:
            subscription, self.subscription = self.subscription, None
            if subscription is not None:
                with trio.move_on_after(self.unsubscribe_timeout_s) as cleanup:
                    cleanup.shield = True
                    try:
                        await run(unsubscribe, subscription, service="nats")
                    except (ProviderError, nats.errors.Error) as exc:
                        log.info("dispatch commands: unsubscribe failed: %s", exc)
            self._enter(CommandsState.STOPPED, "stopped")

    def child_spec(self, *, shutdown_s: float, restart: Restart | None = None) -> ChildSpec:
        """A supervisor child running :meth:`run`."""
        return ChildSpec.of(self, shutdown_s=shutdown_s, restart=restart)

    async def step(self) -> int:
        """One turn: fetch a batch, answer every command, publish the replies. Returns the count."""
        subscription = self.subscription
        if subscription is None:
            raise RuntimeError("dispatch commands: step() before run() subscribed")
        try:
            batch = await run(
                next_commands, subscription, self.batch_max, self.poll_timeout_s, service="nats"
            )
        except ProviderError as exc:
            self._enter(CommandsState.DISCONNECTED, str(exc))
            await trio.sleep(self.poll_timeout_s)
            return 0
        self._enter(CommandsState.SERVING, "fetching")
        if not batch:
            return 0
        self.stats.received += len(batch)
        answers: list[Answer | None] = [None] * len(batch)
        async with trio.open_nursery() as nursery:
            for index, command in enumerate(batch):
                if not command.reply:
                    self._unanswerable(command)
                    continue
                nursery.start_soon(self._answer_into, answers, index, command)
        replies = [
            self._reply(command, answer)
            for command, answer in zip(batch, answers, strict=True)
            if answer is not None
        ]
        if replies:
            try:
                await run(publish_replies, self.client, replies, service="nats")
            except ProviderError as exc:  # the requesters time out; a retry with the key replays
                self._enter(CommandsState.DISCONNECTED, f"replies not sent: {exc}")
        return len(batch)

    async def answer(self, command: Command) -> Answer:
        """The answer to one command (validation, then the submitter); never raises."""
        if len(command.data) > self.max_body_bytes:
            return Answer.error(
                413,
                "payload_too_large",
                f"the command is {len(command.data)} bytes; at most {self.max_body_bytes}",
            )
        try:
            body = decode_command(command.data)
            key = self._key(command, body)
        except RequestRejected as exc:
            return answer_for_error(exc, retry_after_s=self.retry_after_s)
        request = DispatchRequest.of(body, key)
        return await submit_and_answer(self.submitter, request, retry_after_s=self.retry_after_s)

    def _key(self, command: Command, body: DispatchCommandBody) -> str:
        header = _header(command.headers, IDEMPOTENCY_HEADER)
        field = body.idempotency_key
        if header is not None and field is not None and header != field:
            raise RequestRejected(
                "invalid_idempotency_key",
                f"the {IDEMPOTENCY_HEADER} header and the idempotency_key field differ",
                field="idempotency_key",
            )
        return check_idempotency_key(field if field is not None else header,
                                     max_length=self.max_key_length)  # fmt: skip

    async def _answer_into(
        self, answers: list[Answer | None], index: int, command: Command
    ) -> None:
        answer = await self.answer(command)
        answers[index] = answer
        self.stats.answered += 1
        if answer.status >= 400:
            self.stats.rejected += 1
        if self._metrics is not None:
            self._metrics.answered.labels(str(answer.status)).inc()

    def _reply(self, command: Command, answer: Answer) -> Reply:
        headers = {STATUS_HEADER: str(answer.status), "Content-Type": "application/json"}
        retry_after = answer.retry_after
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        return Reply(subject=command.reply, data=answer.body, headers=headers)

    def _unanswerable(self, command: Command) -> None:
        self.stats.unanswerable += 1
        if self._metrics is not None:
            self._metrics.unanswerable.inc()
        log.warning(
            "dispatch commands: a command on %r without a reply subject was dropped",
            command.subject,
        )

    def _enter(self, state: CommandsState, reason: str) -> None:
        if state is self.state:
            return
        old, self.state = self.state, state
        level = logging.WARNING if state is CommandsState.DISCONNECTED else logging.INFO
        log.log(level, "dispatch commands: %s -> %s (%s)", old.value, state.value, reason)


def _header(headers: dict[str, str], name: str) -> str | None:
    """A NATS header by case-insensitive name."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None
