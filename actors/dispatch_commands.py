"""Dispatch commands: the request's wire format, its answers, and the NATS command subject.

A dispatch request comes in two ways and is answered the same way by both:

* HTTP, ``POST /v1/dispatches`` (:mod:`supervisors.dispatch_api`), with the
  ``Idempotency-Key`` header and a JSON body;
* NATS request/reply on a command subject (:class:`DispatchCommands`, default
  ``triage.commands.dispatch``, subscribed in a queue group so replicas share
  the load), with the same JSON plus an ``"idempotency_key"`` field, or the
  NATS header ``Idempotency-Key``.

This module holds what both share -- the one submit-and-answer step -- because the
HTTP API (``supervisors/``) may import ``actors/`` but not the other way round.
Both doors make the dispatcher's one request type
(:class:`~actors.dispatch_request.SubmitRequest`) with the one
:class:`~actors.dispatch_request.RequestDecoder` (every field validated once, by
decoding, with the ``[dispatch]`` limits; the key by the one rule,
:func:`~actors.dispatch_request.check_idempotency_key`), get the one result type
(:class:`~actors.dispatcher.SubmitResult`) and answer every error from the one
table, :mod:`actors.answers`::

    202 {"dispatch_id", "status"}         accepted (a new request)
    200 {"dispatch_id", "status"}         an idempotent replay: the original answer
    4xx/5xx {"error", "message", "field"?} a typed refusal (``field`` when one is to blame)

NATS replies carry the JSON body above; the status is in the reply header
``Triage-Status`` (``Retry-After`` too when set). Garbage -- bytes that are not
JSON, a body that fails validation, a missing key, a body over the cap -- gets
a typed error reply, never a crash; a message without a reply subject is
counted and dropped (there is nobody to answer).

The asyncio side of the subject (subscribe, fetch a batch, publish the replies)
is :mod:`providers.nats_commands`.

Bridging (DESIGN.md section 7): the subscription lives on the asyncio side.
Each turn crosses the bridge twice: :func:`next_commands` waits for the first
message and drains what is already buffered (up to ``batch_max``), then every
reply of the batch goes out in one :func:`publish_replies`. Commands of a batch
are submitted concurrently. The subscription's buffer is bounded
(``pending_msgs_limit``): past it nats-py drops messages (a slow consumer) and
their requesters time out -- bounded, never an unbounded queue.

An actor (:func:`dispatch_commands_child` builds its child spec and ref): each
:class:`Fetch` it sends itself is one turn; a turn NATS refused sends the next one
``poll_timeout_s`` later, so a NATS outage costs one fetch per pause, not a spin.

State machine (:class:`~engine.statelog.StateLog`, one log line per change)::

    STARTING --subscribed--> SERVING
    SERVING --NATS unreachable--> DISCONNECTED --a fetch works--> SERVING
    any --the incarnation ends--> STOPPED

Counts (:class:`CommandsStatistics`, through ``ref.statistics()``) are this
incarnation's; the Prometheus counters (``triage_dispatch_commands_*``) are the totals.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import nats.errors
import trio
from prometheus_client import CollectorRegistry, Counter

from actors.answers import IDEMPOTENCY_HEADER, Answer, answer_for
from actors.dispatch_request import InvalidRequest, RequestDecoder, SubmitRequest
from actors.dispatcher import SubmitResult
from engine.actor import Actor, ActorRef, Overflow, actor_child
from engine.errors import ProviderError
from engine.metrics import families
from engine.statelog import StateLog
from providers import jetstream
from providers.bridge import run
from providers.db.dispatches import DispatchStatus
from providers.nats_commands import (
    Command,
    Reply,
    Subscription,
    next_commands,
    publish_replies,
    subscribe,
    unsubscribe,
)

if TYPE_CHECKING:
    from config.schema import MailboxConfig
    from engine.deadlines import Deadlines
    from engine.metrics import Metrics
    from engine.supervisor import ChildSpec, Restart

__all__ = [
    "FETCH",
    "CommandsMessage",
    "CommandsState",
    "CommandsStatistics",
    "DispatchCommands",
    "Fetch",
    "Submitter",
    "dispatch_commands_child",
    "submit_and_answer",
]

log = logging.getLogger("triage.dispatch_commands")

# -- the shared step --------------------------------------------------------------------


class Submitter(Protocol):
    """What both doors call (:class:`~actors.dispatcher.DispatchService` implements it)."""

    async def submit(self, request: SubmitRequest) -> SubmitResult:
        """Accept ``request`` or raise a typed error (see :mod:`actors.answers`)."""
        ...


async def submit_and_answer(
    submitter: Submitter, request: SubmitRequest, *, retry_after_s: float
) -> Answer:
    """Submit ``request`` and answer: 202 (new), 200 (replay), or the error's answer."""
    try:
        result = await submitter.submit(request)
    except Exception as exc:
        return answer_for(exc, retry_after_s=retry_after_s)
    status = result.status if result.status is not None else DispatchStatus.QUEUED
    return Answer.accepted(result.dispatch_id, status.value, replay=result.replay)


# -- NATS, Trio side -------------------------------------------------------------------


class CommandsState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    DISCONNECTED = "disconnected"
    STOPPED = "stopped"


class Fetch(msgspec.Struct, frozen=True, tag=True):
    """Run a turn: fetch a batch, answer every command, publish the replies."""


FETCH = Fetch()

#: The door's messages (one kind: everything it does is a turn).
CommandsMessage = Fetch


class CommandsStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`DispatchCommands.statistics` reports (this incarnation's counts)."""

    state: CommandsState
    turns: int
    received: int
    answered: int
    rejected: int  # answered with a 4xx/5xx
    unanswerable: int  # no reply subject: dropped


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


class DispatchCommands(Actor[CommandsMessage]):
    """Serves the dispatch command subject, one turn per :class:`Fetch`.

    Build it with :func:`dispatch_commands_child`. ``init`` subscribes (the SUB
    reaches the server before the actor counts as started) and sends the first
    :class:`Fetch`; a turn that reached NATS sends the next at once (a fetch is a
    long poll of ``poll_timeout_s``); a turn NATS refused sends it
    ``poll_timeout_s`` later (:meth:`~engine.actor.Actor.send_after`).
    ``terminate`` unsubscribes, shielded, within ``unsubscribe_timeout_s``.

    Every number comes from the caller: ``max_body_bytes`` (a larger command is
    refused with 413), ``batch_max`` (requests taken, and submitted concurrently,
    per turn), ``poll_timeout_s``, ``pending_msgs_limit`` (the subscription's
    buffer), ``retry_after_s`` (``Retry-After`` for load shedding that names none),
    ``unsubscribe_timeout_s``; ``requests`` makes the request of a command (the
    HTTP door's decoder).
    """

    name = "dispatch_commands"
    uses_tasks = True  # send_after

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
        requests: RequestDecoder,
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
        self.requests = requests
        self.states = StateLog(
            "dispatch commands", CommandsState.STARTING, log, warn={CommandsState.DISCONNECTED}
        )
        self.subscription: Subscription | None = None
        self._turns = 0
        self._received = 0
        self._answered = 0
        self._rejected = 0
        self._unanswerable = 0
        self._metrics = _command_metrics(registry) if registry is not None else None

    # -- the actor -----------------------------------------------------------------------

    async def init(self) -> None:
        """Subscribe; the SUB must reach the server before callers are told we are ready."""
        self.subscription = await run(
            subscribe, self.client, self.subject, self.queue, self.pending_msgs_limit,
            service="nats",
        )  # fmt: skip
        await run(self.client.nc.flush, service="nats")
        self.states.enter(CommandsState.SERVING, f"subscribed to {self.subject!r} ({self.queue})")
        self.tell_self(FETCH)

    def statistics(self) -> CommandsStatistics:
        return CommandsStatistics(
            state=self.states.state,
            turns=self._turns,
            received=self._received,
            answered=self._answered,
            rejected=self._rejected,
            unanswerable=self._unanswerable,
        )

    async def handle(self, message: CommandsMessage) -> None:
        match message:
            case Fetch():
                if await self._turn():
                    self.tell_self(FETCH)
                else:  # NATS refused: the next turn after a pause, not at once
                    self.send_after(self.poll_timeout_s, FETCH)

    async def terminate(self, reason: BaseException | None) -> None:
        subscription, self.subscription = self.subscription, None
        if subscription is not None:
            # Already shielded by the runtime; bounded here by its own deadline.
            with trio.move_on_after(self.unsubscribe_timeout_s):
                try:
                    await run(unsubscribe, subscription, service="nats")
                except (ProviderError, nats.errors.Error) as exc:
                    log.info("dispatch commands: unsubscribe failed: %s", exc)
        crashed = reason is not None and not isinstance(reason, trio.Cancelled)
        self.states.enter(CommandsState.STOPPED, f"crashed: {reason!r}" if crashed else "stopped")

    # -- one turn ------------------------------------------------------------------------

    async def _turn(self) -> bool:
        """Fetch a batch, answer every command, publish the replies. False if NATS refused."""
        subscription = self.subscription
        assert subscription is not None, "init subscribes"
        self._turns += 1
        try:
            batch = await run(
                next_commands, subscription, self.batch_max, self.poll_timeout_s, service="nats"
            )
        except ProviderError as exc:
            self.states.enter(CommandsState.DISCONNECTED, str(exc))
            return False
        self.states.enter(CommandsState.SERVING, "fetching")
        if not batch:
            return True
        self._received += len(batch)
        answers: list[Answer | None] = [None] * len(batch)
        async with trio.open_nursery() as nursery:
            for index, command in enumerate(batch):
                if not command.reply:
                    self._drop_unanswerable(command)
                    continue
                nursery.start_soon(self._answer_into, answers, index, command)
        replies = [
            Reply(subject=command.reply, data=answer.body, headers=answer.nats_headers())
            for command, answer in zip(batch, answers, strict=True)
            if answer is not None
        ]
        if replies:
            try:
                await run(publish_replies, self.client, replies, service="nats")
            except ProviderError as exc:  # the requesters time out; a retry with the key replays
                self.states.enter(CommandsState.DISCONNECTED, f"replies not sent: {exc}")
                return False
        return True

    async def answer(self, command: Command) -> Answer:
        """The answer to one command (validation, then the submitter); never raises."""
        if len(command.data) > self.max_body_bytes:
            return Answer.error(
                413,
                "payload_too_large",
                f"the command is {len(command.data)} bytes; at most {self.max_body_bytes}",
            )
        try:
            request = self.requests.decode_command(
                command.data, _header(command.headers, IDEMPOTENCY_HEADER)
            )
        except InvalidRequest as exc:
            return answer_for(exc, retry_after_s=self.retry_after_s)
        return await submit_and_answer(self.submitter, request, retry_after_s=self.retry_after_s)

    async def _answer_into(
        self, answers: list[Answer | None], index: int, command: Command
    ) -> None:
        answer = await self.answer(command)
        answers[index] = answer
        self._answered += 1
        if answer.status >= 400:
            self._rejected += 1
        if self._metrics is not None:
            self._metrics.answered.labels(str(answer.status)).inc()

    def _drop_unanswerable(self, command: Command) -> None:
        self._unanswerable += 1
        if self._metrics is not None:
            self._metrics.unanswerable.inc()
        log.warning(
            "dispatch commands: a command on %r without a reply subject was dropped",
            command.subject,
        )


def dispatch_commands_child(
    *,
    mailbox: MailboxConfig,
    shutdown_s: float,
    restart: Restart | None = None,
    deadlines: Deadlines | None = None,
    metrics: Metrics | None = None,
    actor: Callable[..., DispatchCommands] = DispatchCommands,
    **settings: Any,
) -> tuple[ChildSpec, ActorRef[CommandsMessage]]:
    """The door's child spec (id ``dispatch_commands``) and ref, its mailbox from ``mailbox``.

    ``settings`` are :class:`DispatchCommands`' keywords; ``actor`` makes each
    incarnation from them (a subclass or a recording factory in tests).
    """
    return actor_child(
        DispatchCommands.name,
        functools.partial(actor, **settings),
        capacity=mailbox.capacity,
        overflow=Overflow(mailbox.overflow),
        restart=restart,
        shutdown_s=shutdown_s,
        deadlines=deadlines,
        metrics=metrics,
    )


def _header(headers: dict[str, str], name: str) -> str | None:
    """A NATS header by case-insensitive name."""
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None
