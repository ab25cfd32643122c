"""Actors: one task, one bounded mailbox, one ``handle`` that matches on messages.

An :class:`Actor` subclass is a state machine readable in one file: its states an
``Enum``, its messages a tagged union of frozen structs, its ``handle`` one
``match``. Other code never touches an actor's state; it holds an
:class:`ActorRef` and sends messages:

* ``await ref.tell(msg)`` — fire and forget. When the mailbox is full the
  actor's :class:`Overflow` policy decides: ``WAIT`` for room, ``DROP_NEWEST``
  (the message is dropped and counted) or ``REJECT`` (:class:`MailboxFull`).
* ``ref.tell_nowait(msg)`` — never blocks; a full mailbox drops or rejects
  (``WAIT`` actors reject, since waiting is not possible).
* ``await ref.ask(msg, timeout_s=...)`` — request/reply. The deadline is kept by
  the runtime's :class:`~engine.deadlines.Deadlines` service, not a cancel scope
  per call; a caller that gave up (timeout or cancellation) leaves a settled
  reply slot behind, and the actor's late reply lands there harmlessly.

The mailbox outlives the actor's incarnations: when the supervisor restarts a
crashed actor, messages already queued are handled by the new incarnation; only
the message being handled when it crashed is lost (and if it was an ``ask``,
its caller gets :class:`ActorError` at once instead of waiting for the deadline).

An actor that needs time or concurrency keeps them inside itself, as a
gen_server does with ``erlang:send_after``:

* :meth:`Actor.timers` lists :class:`Timer` s — a message the actor is sent
  every ``interval_s`` (coalesced: a tick still queued or being handled is not
  sent again, so a slow actor never drowns in its own ticks);
* :meth:`Actor.send_after` sends one message to itself later;
* :meth:`Actor.start_soon` runs a task in the actor's own nursery (a send in
  flight, a worker), cancelled when the incarnation ends; the task reports back
  by telling the actor a message, so state is still changed by ``handle`` only.

Other code reads an actor's numbers through :meth:`ActorRef.statistics`, which
returns the current incarnation's :meth:`Actor.statistics` — a frozen record,
never the actor's attributes.

Batch drain: with ``batch_max > 1`` the actor, once woken, takes up to
``batch_max`` queued messages with ``receive_nowait`` before yielding to the
scheduler again, so a busy actor is not bounded by one scheduler round trip per
message.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
import trio

from .deadlines import Deadlines, Reply
from .errors import ActorError, ActorStopped, MailboxFull
from .mailbox import Mailbox

if TYPE_CHECKING:
    from .metrics import Metrics
    from .supervisor import BreakerLike, ChildSpec, Restart

__all__ = [
    "Actor",
    "ActorRef",
    "Overflow",
    "Stop",
    "Timer",
    "actor_child",
    "actor_ref_of",
    "ended_by_error",
]

M = TypeVar("M")


class Overflow(enum.Enum):
    """What ``tell`` does when the mailbox is full."""

    WAIT = "wait"
    DROP_NEWEST = "drop_newest"
    REJECT = "reject"


class Stop(msgspec.Struct, frozen=True):
    """Returned by :meth:`Actor.handle` to stop normally, after replying ``reply`` to an ask."""

    reply: Any = None


class Timer(msgspec.Struct, frozen=True):
    """``message`` is told to the actor every ``interval_s`` seconds (Trio time).

    The first tick comes ``interval_s`` after the incarnation started. A tick
    not yet handled is not sent again: ticks coalesce instead of queueing.
    """

    interval_s: float
    message: Any

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"timer interval_s must be > 0, got {self.interval_s!r}")


class _Ask:
    __slots__ = ("message", "reply")

    def __init__(self, message: object, reply: Reply | _TickDone) -> None:
        self.message = message
        self.reply = reply


class Actor(Generic[M]):
    """Base class of every actor. Override :meth:`handle`; optionally :meth:`init`,
    :meth:`terminate`, :meth:`timers` and :meth:`statistics`.

    ``init`` runs before the supervisor is told the actor is started, so a
    supervisor's ``started()`` means every child is really ready. ``terminate``
    runs when the actor stops for any reason (normal, crash or shutdown), shielded
    from cancellation but bounded by the child's ``shutdown_s``.

    ``self.ref`` is the actor's own :class:`ActorRef`, set before ``init``.
    An actor that overrides :meth:`timers` or sets ``uses_tasks = True`` runs in
    a nursery of its own (:meth:`start_soon`, :meth:`send_after`); others skip
    that nursery, so a plain actor costs no more than a task and a channel.
    """

    name: str = "actor"
    #: Set True in a subclass that calls :meth:`start_soon` or :meth:`send_after`.
    uses_tasks: bool = False
    ref: ActorRef[M]
    _nursery: trio.Nursery | None = None
    _woken_for: float | None = None  # the moment wake_at already scheduled

    async def init(self) -> None:
        """Prepare the actor's resources. Runs before the actor counts as started."""

    async def handle(self, message: M) -> object:
        """Handle one message; the return value is the reply to an ``ask``."""
        raise NotImplementedError

    async def terminate(self, reason: BaseException | None) -> None:
        """Release resources. ``reason`` is None for a normal stop."""

    def timers(self) -> Sequence[Timer]:
        """The periodic messages this incarnation sends itself (read once, after ``init``)."""
        return ()

    def statistics(self) -> Any:
        """A frozen record of the actor's numbers, for :meth:`ActorRef.statistics`."""
        return None

    def start_soon(self, fn: Callable[..., Awaitable[object]], *args: object) -> None:
        """Run ``fn(*args)`` in this incarnation's nursery (needs ``uses_tasks``)."""
        if self._nursery is None:
            raise RuntimeError(
                f"actor {self.name!r} has no nursery: set uses_tasks = True or override timers()"
            )
        self._nursery.start_soon(fn, *args)

    def send_after(self, delay_s: float, message: M) -> None:
        """Tell this actor ``message`` in ``delay_s`` seconds (dropped if it stopped meanwhile)."""
        self.start_soon(_send_after, self.ref, delay_s, message)

    def tell_self(self, message: M) -> bool:
        """Queue ``message`` behind what is queued, never blocking; False when the mailbox
        is full (something already queued, or the next timer tick, will wake it)."""
        try:
            self.ref.tell_nowait(message)
        except MailboxFull:
            return False
        return True

    def wake_at(self, at: float | None, message: M, *, sooner_than_s: float) -> None:
        """Tell this actor ``message`` at Trio time ``at`` (a breaker's half-open moment),
        once per moment, and only when it comes within ``sooner_than_s`` (else the
        actor's own timer comes first). ``None`` or an infinite ``at``: nothing."""
        if at is None or not math.isfinite(at) or at == self._woken_for:
            return
        delay = max(0.0, at - trio.current_time())
        if delay < sooner_than_s:
            self._woken_for = at
            self.send_after(delay, message)


async def _send_after(ref: ActorRef[Any], delay_s: float, message: object) -> None:
    await trio.sleep(delay_s)
    with contextlib.suppress(ActorStopped):
        await ref.tell(message)


class ActorRef(Generic[M]):
    """The only handle other code holds on an actor. Stays valid across restarts."""

    __slots__ = ("_current", "_deadlines", "_overflow", "_send", "dropped", "name")

    def __init__(
        self,
        name: str,
        send: Mailbox,
        overflow: Overflow,
        deadlines: Deadlines | None,
    ) -> None:
        self.name = name
        self._send = send
        self._overflow = overflow
        self._deadlines = deadlines
        self._current: Actor[M] | None = None
        self.dropped = 0

    def __repr__(self) -> str:
        return f"<ActorRef {self.name}>"

    async def tell(self, message: M) -> None:
        """Deliver ``message``; a full mailbox waits, drops or raises per the overflow policy."""
        try:
            if self._overflow is Overflow.WAIT:
                await self._send.put(message)
            else:
                await trio.lowlevel.checkpoint()
                self._offer(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ActorStopped(f"actor {self.name!r} has stopped") from exc

    def tell_nowait(self, message: M) -> None:
        """Deliver without blocking: a full mailbox drops (``DROP_NEWEST``) or raises :class:`MailboxFull`."""
        try:
            self._offer(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ActorStopped(f"actor {self.name!r} has stopped") from exc

    def _offer(self, message: object) -> None:
        try:
            self._send.put_nowait(message)
        except trio.WouldBlock:
            if self._overflow is Overflow.DROP_NEWEST:
                self.dropped += 1
                return
            raise MailboxFull(self.name, capacity=self._send.capacity) from None

    async def ask(self, message: M, *, timeout_s: float | None) -> Any:
        """Send ``message`` and wait for the reply; :class:`AskTimeout` after ``timeout_s``.

        ``timeout_s=None`` waits without a deadline. The deadline also bounds the
        wait for mailbox room.
        """
        reply = Reply(f"reply from {self.name!r}")
        item = _Ask(message, reply)
        deadline = math.inf if timeout_s is None else trio.current_time() + timeout_s
        try:
            try:
                self._send.put_nowait(item)
            except trio.WouldBlock:
                if self._overflow is not Overflow.WAIT:
                    raise MailboxFull(self.name, capacity=self._send.capacity) from None
                with trio.move_on_at(deadline):
                    await self._send.put(item)
                if trio.current_time() >= deadline:
                    reply.expire()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ActorStopped(f"actor {self.name!r} has stopped") from exc
        if deadline != math.inf and not reply.done:
            if self._deadlines is None:
                raise RuntimeError("ask with a deadline needs a runtime's Deadlines service")
            self._deadlines.add(deadline, reply)
        return await reply.wait()

    def queued(self) -> int:
        """Messages waiting in the mailbox."""
        return len(self._send)

    def capacity(self) -> int:
        """The mailbox's size."""
        return self._send.capacity

    def statistics(self) -> Any:
        """The running incarnation's :meth:`Actor.statistics` (None while none runs)."""
        current = self._current
        return None if current is None else current.statistics()


async def _run_actor(
    factory: Callable[[], Actor[Any]],
    ref: ActorRef[Any],
    receive: Mailbox,
    batch_max: int,
    shutdown_s: float,
    overrides_init: bool,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """One incarnation of an actor: init, signal started, loop, terminate."""
    actor = factory()
    actor.ref = ref
    ref._current = actor
    reason: BaseException | None = None
    initialised = not overrides_init
    try:
        if actor.uses_tasks or type(actor).timers is not Actor.timers:
            try:
                async with trio.open_nursery() as nursery:
                    actor._nursery = nursery
                    if overrides_init:
                        await actor.init()
                        initialised = True
                    pending: set[int] = set()
                    for i, timer in enumerate(actor.timers()):
                        nursery.start_soon(_tick, ref, timer, i, pending)
                    task_status.started()
                    await _loop(actor, receive, batch_max)
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                # The nursery is the actor's own business: its supervisor sees the one
                # error that ended the incarnation (FeedbackStalled), not a group of one.
                lone = _lone(group)
                if lone is None:
                    raise
                raise lone from None
        else:
            if overrides_init:
                await actor.init()
                initialised = True
            task_status.started()
            await _loop(actor, receive, batch_max)
    except BaseException as exc:
        reason = exc
        raise
    finally:
        actor._nursery = None
        if ref._current is actor:
            ref._current = None
        # As in OTP, an actor whose init failed has nothing to terminate.
        if initialised and type(actor).terminate is not Actor.terminate:
            with trio.move_on_after(shutdown_s, shield=True):
                await actor.terminate(reason)


def ended_by_error(reason: BaseException | None) -> bool:
    """Whether an incarnation ended by an error: not normally, not by cancellation
    (``reason`` as :meth:`Actor.terminate` gets it)."""
    if reason is None or isinstance(reason, trio.Cancelled):
        return False
    if isinstance(reason, BaseExceptionGroup):
        return reason.split(trio.Cancelled)[1] is not None
    return True


def _lone(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The single non-group error inside ``group`` (nested groups of one), else None."""
    while len(group.exceptions) == 1:
        inner = group.exceptions[0]
        if not isinstance(inner, BaseExceptionGroup):
            return inner
        group = inner
    return None


class _TickDone:
    """The reply slot of a timer's tick: handling it (or crashing on it) frees the timer
    to send the next. A tick travels as an :class:`_Ask` with this slot, so a plain
    message pays nothing for timers."""

    __slots__ = ("index", "pending")

    def __init__(self, pending: set[int], index: int) -> None:
        self.pending = pending
        self.index = index

    def set(self, value: object) -> None:
        self.pending.discard(self.index)

    def fail(self, exc: BaseException) -> None:
        self.pending.discard(self.index)


async def _tick(ref: ActorRef[Any], timer: Timer, index: int, pending: set[int]) -> None:
    item = _Ask(timer.message, _TickDone(pending, index))
    while True:
        await trio.sleep(timer.interval_s)
        if index in pending:
            continue
        try:
            ref._send.put_nowait(item)
        except trio.WouldBlock:
            continue
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        pending.add(index)


async def _loop(actor: Actor[Any], receive: Mailbox, batch_max: int) -> None:
    handle = actor.handle
    try:
        while True:
            item = await receive.get()
            budget = batch_max
            while True:
                if type(item) is _Ask:
                    try:
                        result = await handle(item.message)
                    except Exception as exc:
                        item.reply.fail(ActorError(f"actor {actor.name!r} crashed: {exc!r}"))
                        raise
                    except BaseException:
                        item.reply.fail(ActorStopped(f"actor {actor.name!r} stopped mid-reply"))
                        raise
                    if type(result) is Stop:
                        item.reply.set(result.reply)
                        return
                    item.reply.set(result)
                elif type(await handle(item)) is Stop:
                    return
                budget -= 1
                if budget <= 0:
                    break
                try:
                    item = receive.get_nowait()
                except trio.WouldBlock:
                    break
    except trio.EndOfChannel:
        return


def actor_child(
    id: str,
    factory: Callable[[], Actor[M]],
    *,
    capacity: int,
    overflow: Overflow = Overflow.WAIT,
    batch_max: int = 1,
    restart: Restart | None = None,
    shutdown_s: float,
    deadlines: Deadlines | None = None,
    breaker: BreakerLike | None = None,
    metrics: Metrics | None = None,
) -> tuple[ChildSpec, ActorRef[M]]:
    """A child spec that runs ``factory()`` as an actor, and the ref to reach it.

    The mailbox is created here, once: it survives restarts of the actor and is
    closed when the supervisor removes the child for good.
    """
    if capacity < 1:
        raise ValueError("mailbox capacity must be >= 1")
    if batch_max < 1:
        raise ValueError("batch_max must be >= 1")
    mailbox = Mailbox(capacity)
    ref: ActorRef[M] = ActorRef(id, mailbox, overflow, deadlines)
    overrides_init = _overrides(factory, "init")
    start = functools.partial(
        _run_actor, factory, ref, mailbox, batch_max, shutdown_s, overrides_init
    )

    from .supervisor import ChildSpec, Restart

    if metrics is not None:
        label = metrics.label("mailbox", id)
        if label == id:
            metrics.mailbox_depth.labels(actor=id).set_function(ref.queued)

    return (
        ChildSpec(
            id=id,
            start=start,
            restart=restart if restart is not None else Restart.PERMANENT,
            shutdown_s=shutdown_s,
            ready_on_spawn=not overrides_init,
            breaker=breaker,
            on_removed=mailbox.close,
        ),
        ref,
    )


def actor_ref_of(start: object) -> ActorRef[Any] | None:
    """The ref of the actor a child spec's ``start`` (made by :func:`actor_child`) runs;
    None for any other start."""
    if isinstance(start, functools.partial) and start.func is _run_actor:
        ref = start.args[1]
        return ref if isinstance(ref, ActorRef) else None
    return None


def _overrides(factory: Callable[[], Actor[Any]], method: str) -> bool:
    """Whether the actor class made by ``factory`` overrides ``method`` (unknown: assume yes)."""
    cls = factory if isinstance(factory, type) else None
    if cls is None:
        return True
    return getattr(cls, method) is not getattr(Actor, method)
