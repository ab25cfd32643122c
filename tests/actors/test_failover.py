"""Failover rules with in-test adapters, on the autojump clock (exact virtual times).

One attempt (rounds, happy eyeballs, settling) is :meth:`Failover.attempt`; the
requeue after ``requeue_after_s`` and the give-up after ``give_up_after_s`` are
the channel dispatcher's, exercised here through the actor itself. Its outcome
write goes to a recording stand-in for the pool: on an autojump clock asyncpg's
own timeouts would fire while the database works (the same dispatcher against
the real PostgreSQL, in real time: tests/actors/test_dispatcher.py).
"""

from __future__ import annotations

import uuid
from typing import Any, cast

import msgspec
import pytest
import trio
from prometheus_client import CollectorRegistry
from trio.testing import MockClock

from actors.dispatcher import DispatcherStatistics, Job, Send, dispatcher_child
from actors.failover import (
    AMBIGUOUS_REASON,
    EXHAUSTED_REASON,
    AttemptResult,
    Failover,
    OutcomeKind,
    Route,
)
from engine.actor import Overflow
from engine.breaker import Breaker
from engine.bulkhead import Bulkhead
from engine.clock import Chance
from engine.detectors import RatioDetector
from engine.errors import (
    ProviderTimeout,
    ProviderUnavailable,
    RateLimited,
    Rejected,
)
from engine.guard import Guard
from engine.retry import RetryPolicy
from providers.channel import (
    Accepted,
    ChannelName,
    DeliveryState,
    Message,
    RecipientGone,
    StatusAnswer,
)
from providers.db.dispatches import DeadRecipient, DispatchStatus, Transition, record_outcome_async
from providers.db.pool import DbPool


class FakeAdapter:
    """An in-test provider: ``send`` raises or accepts per a script; ``status`` answers."""

    channel = ChannelName.SMS

    def __init__(
        self,
        name: str,
        *,
        fail: list[BaseException | float | None] | None = None,
        status: StatusAnswer | BaseException | None = None,
    ) -> None:
        self.name = name
        self.script = list(fail or [])
        self.answer = status
        self.sent: list[tuple[float, Message]] = []
        self.status_calls = 0
        self.t0 = trio.current_time()  # MockClock does not start at 0

    def elapsed(self) -> float:
        return trio.current_time() - self.t0

    async def send(self, message: Message) -> Accepted:
        self.sent.append((self.elapsed(), message))
        step = self.script.pop(0) if self.script else None
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, float):  # hang this long (the guard's deadline may fire)
            await trio.sleep(step)
        return Accepted(provider=self.name, provider_ref=f"{self.name}-{len(self.sent)}")

    async def status(self, message: Message) -> StatusAnswer | None:
        self.status_calls += 1
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    async def aclose(self) -> None:
        return None


def guard(name: str, *, timeout_s: float = 1.0, max_attempts: int = 1) -> Guard:
    breaker = Breaker(
        name,
        fail_max=100,
        reset_timeout_s=30.0,
        reset_timeout_max_s=30.0,
        reset_backoff_multiplier=1.0,
        failure_rate_threshold=2.0,
        rate_window_s=60.0,
        minimum_calls=10,
        slow_call_s=60.0,
        slow_call_rate_threshold=2.0,
        half_open_max_calls=1,
    )
    bulkhead = Bulkhead(name, capacity=4, max_wait_s=0.0, max_partitions=0, partition_capacity=4)
    retry = RetryPolicy(
        name,
        max_attempts=max_attempts,
        time_budget_s=10.0,
        backoff_initial_s=0.1,
        backoff_max_s=1.0,
        backoff_multiplier=2.0,
        jitter=0.0,
    )
    return Guard(name, breaker=breaker, bulkhead=bulkhead, retry=retry, timeout_s=timeout_s)


def rounds(*, max_attempts: int = 3, budget: float = 100.0, jitter: float = 0.0) -> RetryPolicy:
    return RetryPolicy(
        "rounds",
        max_attempts=max_attempts,
        time_budget_s=budget,
        backoff_initial_s=1.0,
        backoff_max_s=8.0,
        backoff_multiplier=2.0,
        jitter=jitter,
        chance=Chance(7),
    )


def failover(
    *adapters: FakeAdapter,
    requeue_after_s: float = 10.0,
    give_up_after_s: float = 20.0,
    **kw: Any,
) -> Failover:
    return Failover(
        "sms",
        [Route(a, guard(a.name)) for a in adapters],
        rounds=kw.pop("policy", rounds()),
        status_timeout_s=0.5,
        requeue_after_s=requeue_after_s,
        give_up_after_s=give_up_after_s,
        **kw,
    )


MESSAGE = Message(
    client_ref="d-1",
    tenant_id="t-1",
    idempotency_key="idem-1",
    channel=ChannelName.SMS,
    recipient="+15550100",
    body="hello",
)


class RecordingPool:
    """Stands in for the dispatcher's pool: records each outcome write, at its time."""

    def __init__(self) -> None:
        self.units: list[tuple[float, str, list[Transition], DeadRecipient | None]] = []
        self.recorded = trio.Event()

    async def run_unit(self, fn: object, *args: Any) -> None:
        await trio.lowlevel.checkpoint()
        assert fn is record_outcome_async
        tenant, steps, dead = args
        self.units.append((trio.current_time(), tenant, list(steps), dead))
        self.recorded.set()


async def through_dispatcher(
    fo: Failover, accepted_at: float
) -> tuple[float, list[Transition], DispatcherStatistics]:
    """Send MESSAGE's dispatch through a channel dispatcher actor over ``fo``: when its
    outcome was written, the steps written and the dispatcher's numbers once settled."""
    pool = RecordingPool()
    child = dispatcher_child(
        ChannelName.SMS, cast(DbPool, pool), {"default": fo}, capacity=4,
        overflow=Overflow.WAIT, concurrency=2, record_attempts=1, record_backoff_s=0.1,
        max_parked=4, shutdown_s=1.0,
    )  # fmt: skip
    job = Job(
        dispatch_id=uuid.uuid4(), tenant_id=MESSAGE.tenant_id,
        idempotency_key=MESSAGE.idempotency_key, channel="sms", recipient=MESSAGE.recipient,
        body=MESSAGE.body, subject=None, category="default", data={}, accepted_at=accepted_at,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        await nursery.start(child.spec.start)
        child.ref.tell_nowait(Send(job))
        await pool.recorded.wait()
        await child.memory.idle.wait()  # the Recorded report handled: nothing held
        stats = child.ref.statistics()
        nursery.cancel_scope.cancel()
    [(at, tenant, steps, dead)] = pool.units
    assert tenant == MESSAGE.tenant_id and dead is None
    assert all(step.dispatch_id == job.dispatch_id for step in steps)
    assert isinstance(stats, DispatcherStatistics) and stats.held == 0
    return at, steps, stats


async def test_breaker_open_goes_to_the_secondary_at_once(autojump_clock: MockClock) -> None:
    primary, secondary = FakeAdapter("ghasi"), FakeAdapter("twilio")
    fo = failover(primary, secondary)
    fo.routes[0].guard.breaker.force_open("test")
    outcome = await fo.attempt(MESSAGE)
    assert outcome.kind is OutcomeKind.DISPATCHED and outcome.provider == "twilio"
    assert primary.elapsed() == 0.0
    assert primary.sent == [] and [t for t, _ in secondary.sent] == [0.0]
    assert [a.result for a in outcome.attempts] == [AttemptResult.SKIPPED, AttemptResult.ACCEPTED]
    # A refusal by the open breaker counts as a failed call of that provider (row 1).
    assert fo.stats.calls == 2 and fo.stats.failed_calls == 1
    assert fo.stats.per_provider == {"ghasi": [1, 1], "twilio": [0, 1]}


async def test_5xx_goes_to_the_secondary_at_once_and_is_measured(autojump_clock: MockClock) -> None:
    registry = CollectorRegistry()
    detector = RatioDetector(
        "sms_errors", metric="triage_sms_provider_error_ratio", threshold=0.2, window_s=300.0,
        buckets=10,
    )  # fmt: skip
    primary = FakeAdapter("ghasi", fail=[ProviderUnavailable("503")])
    secondary = FakeAdapter("twilio")
    fo = failover(primary, secondary, registry=registry, error_ratio=detector)
    outcome = await fo.attempt(MESSAGE)
    assert outcome.kind is OutcomeKind.DISPATCHED and outcome.provider == "twilio"
    assert outcome.provider_ref == "twilio-1" and not outcome.possible_duplicate
    assert primary.elapsed() == 0.0
    # the idempotency key travelled to both providers
    assert [m.idempotency_key for _, m in primary.sent + secondary.sent] == ["idem-1"] * 2
    sample = registry.get_sample_value
    assert sample("triage_sms_provider_error_ratio_numerator_total", {"provider": "ghasi"}) == 1
    assert sample("triage_sms_provider_error_ratio_denominator_total", {"provider": "ghasi"}) == 1
    assert sample("triage_sms_provider_error_ratio_numerator_total", {"provider": "twilio"}) == 0
    assert sample("triage_sms_provider_error_ratio_denominator_total", {"provider": "twilio"}) == 1
    assert detector.volume == 2 and detector.evaluate().value == 0.5


async def test_timeout_with_status_accepted_is_taken_without_failover(
    autojump_clock: MockClock,
) -> None:
    primary = FakeAdapter(
        "ghasi", fail=[5.0], status=StatusAnswer(state=DeliveryState.ACCEPTED, provider_ref="g-9")
    )
    secondary = FakeAdapter("twilio")
    fo = failover(primary, secondary)
    outcome = await fo.attempt(MESSAGE)
    assert outcome.kind is OutcomeKind.DISPATCHED
    assert (outcome.provider, outcome.provider_ref) == ("ghasi", "g-9")
    assert not outcome.possible_duplicate
    assert primary.elapsed() == 1.0  # the guard's deadline, then the status answer
    assert secondary.sent == [] and primary.status_calls == 1
    assert fo.stats.settled_taken == 1 and fo.stats.possible_duplicates == 0


async def test_timeout_with_status_not_found_fails_over(autojump_clock: MockClock) -> None:
    primary = FakeAdapter(
        "ghasi",
        fail=[ProviderTimeout("read timeout")],
        status=StatusAnswer(state=DeliveryState.NOT_FOUND),
    )
    secondary = FakeAdapter("twilio")
    fo = failover(primary, secondary)
    outcome = await fo.attempt(MESSAGE)
    assert outcome.kind is OutcomeKind.DISPATCHED and outcome.provider == "twilio"
    assert not outcome.possible_duplicate
    assert fo.stats.settled_not_taken == 1
    assert [a.result for a in outcome.attempts] == [
        AttemptResult.TIMEOUT_NOT_TAKEN,
        AttemptResult.ACCEPTED,
    ]


@pytest.mark.parametrize("answer", [None, ProviderUnavailable("status down")])
async def test_timeout_without_status_fails_over_as_possible_duplicate(
    answer: BaseException | None, autojump_clock: MockClock
) -> None:
    registry = CollectorRegistry()
    primary = FakeAdapter("ghasi", fail=[ProviderTimeout("read timeout")], status=answer)
    secondary = FakeAdapter("twilio")
    fo = failover(primary, secondary, registry=registry)
    outcome = await fo.attempt(MESSAGE)
    assert outcome.kind is OutcomeKind.DISPATCHED and outcome.provider == "twilio"
    assert outcome.possible_duplicate  # recorded, never silent
    assert fo.stats.possible_duplicates == 1
    assert (
        registry.get_sample_value("triage_dispatch_possible_duplicates_total", {"channel": "sms"})
        == 1
    )


async def test_status_that_hangs_is_bounded_and_unsettled(autojump_clock: MockClock) -> None:
    class Slow(FakeAdapter):
        async def status(self, message: Message) -> StatusAnswer | None:
            await trio.sleep(60)
            return StatusAnswer(state=DeliveryState.ACCEPTED)

    primary = Slow("ghasi", fail=[ProviderTimeout("read timeout")])
    secondary = FakeAdapter("twilio")
    outcome = await failover(primary, secondary).attempt(MESSAGE)
    assert outcome.possible_duplicate and outcome.provider == "twilio"
    assert primary.elapsed() == 0.5  # status_timeout_s


async def test_rejected_and_recipient_gone_stop(autojump_clock: MockClock) -> None:
    bad = FakeAdapter("ghasi", fail=[Rejected("bad number")])
    second = FakeAdapter("twilio")
    outcome = await failover(bad, second).attempt(MESSAGE)
    assert outcome.kind is OutcomeKind.FAILED and outcome.reason is not None
    assert outcome.reason.startswith("rejected") and second.sent == []

    gone = FakeAdapter("ghasi", fail=[RecipientGone("+15550100", "unregistered")])
    second = FakeAdapter("twilio")
    outcome = await failover(gone, second).attempt(MESSAGE)
    assert outcome.kind is OutcomeKind.UNDELIVERABLE and outcome.recipient_gone
    assert second.sent == []


async def test_all_down_backs_off_in_rounds_then_stays_queued(autojump_clock: MockClock) -> None:
    down = [ProviderUnavailable("503")] * 10
    primary = FakeAdapter("ghasi", fail=list(down))
    secondary = FakeAdapter("twilio", fail=list(down))
    fo = failover(primary, secondary)
    outcome = await fo.attempt(MESSAGE)
    # rounds at t=0, 1 (backoff 1 s) and 3 (backoff 2 s); the policy allows 3 rounds
    assert outcome.kind is OutcomeKind.QUEUED and outcome.rounds == 3
    assert [t for t, _ in primary.sent] == [0.0, 1.0, 3.0]
    assert [t for t, _ in secondary.sent] == [0.0, 1.0, 3.0]
    assert outcome.retry_at == primary.t0 + 13.0 and primary.elapsed() == 3.0


async def test_rate_limited_hint_lengthens_the_backoff(autojump_clock: MockClock) -> None:
    primary = FakeAdapter("ghasi", fail=[RateLimited("429", retry_after_s=5.0)] * 3)
    secondary = FakeAdapter("twilio", fail=[ProviderUnavailable("503")] * 3)
    outcome = await failover(primary, secondary, policy=rounds(max_attempts=2)).attempt(MESSAGE)
    assert outcome.kind is OutcomeKind.QUEUED
    assert [t for t, _ in primary.sent] == [0.0, 5.0]


async def test_requeues_until_give_up_then_providers_exhausted(autojump_clock: MockClock) -> None:
    primary = FakeAdapter("ghasi", fail=[ProviderUnavailable("503")] * 20)
    secondary = FakeAdapter("twilio", fail=[ProviderUnavailable("503")] * 20)
    fo = failover(primary, secondary, requeue_after_s=10.0, give_up_after_s=20.0)
    at, steps, stats = await through_dispatcher(fo, accepted_at=primary.t0)
    # rounds 0, 1, 3; requeued at 13 (<= 20): rounds 13, 14, 16; 16 + 10 > 20: give up
    assert [t for t, _ in primary.sent] == [0.0, 1.0, 3.0, 13.0, 14.0, 16.0]
    assert [t for t, _ in secondary.sent] == [0.0, 1.0, 3.0, 13.0, 14.0, 16.0]
    [step] = steps
    assert (step.status, step.reason, step.provider) == (
        DispatchStatus.FAILED, EXHAUSTED_REASON, None
    )  # fmt: skip
    assert not step.possible_duplicate
    assert at == primary.t0 + 16.0 and fo.stats.queued == 2
    assert (stats.exhausted, stats.requeued, stats.failed, stats.sent) == (1, 1, 1, 2)


async def test_requeue_recovers_when_a_provider_comes_back(autojump_clock: MockClock) -> None:
    primary = FakeAdapter("ghasi", fail=[ProviderUnavailable("503")] * 3)
    at, steps, stats = await through_dispatcher(failover(primary), accepted_at=primary.t0)
    # rounds 0, 1, 3 fail; requeued at 13: taken
    assert [t for t, _ in primary.sent] == [0.0, 1.0, 3.0, 13.0]
    [step] = steps
    assert (step.status, step.provider, step.provider_ref) == (
        DispatchStatus.DISPATCHED, "ghasi", "ghasi-4"
    )  # fmt: skip
    assert at == primary.t0 + 13.0
    assert (stats.dispatched, stats.requeued, stats.exhausted) == (1, 1, 0)


async def test_unsettled_timeout_asked_again_later_or_ends_unknown(
    autojump_clock: MockClock,
) -> None:
    # The primary times out unsettled, the secondary is down; in the next round the
    # primary's status says it was taken: dispatched by it, no duplicate.
    class Late(FakeAdapter):
        async def status(self, message: Message) -> StatusAnswer | None:
            self.status_calls += 1
            if self.status_calls == 1:
                return None
            return StatusAnswer(state=DeliveryState.DELIVERED, provider_ref="g-1")

    primary = Late("ghasi", fail=[ProviderTimeout("t")])
    secondary = FakeAdapter("twilio", fail=[ProviderUnavailable("503")] * 5)
    outcome = await failover(primary, secondary).attempt(MESSAGE)
    assert outcome.kind is OutcomeKind.DISPATCHED and outcome.provider == "ghasi"
    assert not outcome.possible_duplicate and len(primary.sent) == 1
    assert primary.elapsed() == 1.0

    never = FakeAdapter("ghasi", fail=[ProviderTimeout("t")] * 20)
    down = FakeAdapter("twilio", fail=[ProviderUnavailable("503")] * 20)
    fo = failover(never, down, give_up_after_s=0.0)
    queued = await fo.attempt(MESSAGE)
    assert queued.kind is OutcomeKind.QUEUED and queued.possible_duplicate
    # Past give_up_after_s the dispatcher ends it unknown: ghasi may have sent it.
    never = FakeAdapter("ghasi", fail=[ProviderTimeout("t")] * 20)
    down = FakeAdapter("twilio", fail=[ProviderUnavailable("503")] * 20)
    fo = failover(never, down, give_up_after_s=0.0)
    at, steps, stats = await through_dispatcher(fo, accepted_at=never.t0)
    assert [(s.status, s.provider, s.reason, s.possible_duplicate) for s in steps] == [
        (DispatchStatus.DISPATCHED, "ghasi", None, True),
        (DispatchStatus.UNKNOWN, None, AMBIGUOUS_REASON, False),
    ]
    # rounds at 0, 1 and 3 (ghasi asked again first in each): no requeue past 0 s
    assert [t for t, _ in never.sent] == [0.0, 1.0, 3.0] and at == never.t0 + 3.0
    assert never.status_calls == 5  # after its timeout in round 1; before and after in 2, 3
    assert (stats.unknown, stats.exhausted, stats.requeued) == (1, 1, 0)


async def test_jitter_is_seeded(autojump_clock: MockClock) -> None:
    async def run_once() -> list[float]:
        a = FakeAdapter("ghasi", fail=[ProviderUnavailable("503")] * 3)
        await failover(a, policy=rounds(jitter=0.5)).attempt(MESSAGE)
        return [t for t, _ in a.sent]

    first, second = await run_once(), await run_once()
    assert first == second and first[1] < 1.0  # jitter only shortens a wait


async def test_guards_that_retry_are_refused(autojump_clock: MockClock) -> None:
    with pytest.raises(ValueError, match="retries"):
        Failover(
            "sms",
            [Route(FakeAdapter("ghasi"), guard("ghasi", max_attempts=3))],
            rounds=rounds(),
            status_timeout_s=1.0,
            requeue_after_s=1.0,
            give_up_after_s=1.0,
        )


async def test_a_resumed_message_is_probed_first_and_not_sent_again(
    autojump_clock: MockClock,
) -> None:
    # Taken before a crash (the primary says so): nothing is sent again.
    taken = StatusAnswer(state=DeliveryState.ACCEPTED, provider_ref="g-7")
    primary, secondary = FakeAdapter("ghasi", status=taken), FakeAdapter("twilio")
    outcome = await failover(primary, secondary).attempt(MESSAGE, probe=True)
    assert (outcome.kind, outcome.provider, outcome.provider_ref) == (
        OutcomeKind.DISPATCHED, "ghasi", "g-7"
    )  # fmt: skip
    assert primary.sent == [] and secondary.sent == []
    # Not taken anywhere (or a provider that cannot tell): sent as usual, no flag.
    not_found = StatusAnswer(state=DeliveryState.NOT_FOUND)
    primary, secondary = FakeAdapter("ghasi", status=not_found), FakeAdapter("twilio")
    outcome = await failover(primary, secondary).attempt(MESSAGE, probe=True)
    assert outcome.kind is OutcomeKind.DISPATCHED and outcome.provider == "ghasi"
    assert len(primary.sent) == 1 and not outcome.possible_duplicate
    assert (primary.status_calls, secondary.status_calls) == (1, 1)
    # Without probe (a fresh dispatch) nobody is asked.
    primary = FakeAdapter("ghasi", status=taken)
    await failover(primary, FakeAdapter("twilio")).attempt(MESSAGE)
    assert primary.status_calls == 0 and len(primary.sent) == 1


async def test_the_send_rate_limit_is_per_tenant(autojump_clock: MockClock) -> None:
    from engine.ratelimit import RateLimiter

    primary, secondary = FakeAdapter("ghasi"), FakeAdapter("twilio")
    limited = guard("ghasi")
    limited.rate_limiter = RateLimiter("ghasi", rate_per_s=0.001, burst=1, max_keys=10)
    fo = Failover(
        "sms", [Route(primary, limited), Route(secondary, guard("twilio"))], rounds=rounds(),
        status_timeout_s=0.5, requeue_after_s=10.0, give_up_after_s=20.0,
    )  # fmt: skip
    other_tenant = msgspec.structs.replace(MESSAGE, tenant_id="t-2", client_ref="d-2")
    second_of_t1 = msgspec.structs.replace(MESSAGE, client_ref="d-3")
    # One token per tenant: each tenant's first send goes through the primary; the
    # same tenant's second is refused there (our own limit: not a provider failure).
    assert (await fo.attempt(MESSAGE)).provider == "ghasi"
    assert (await fo.attempt(other_tenant)).provider == "ghasi"
    assert (await fo.attempt(second_of_t1)).provider == "twilio"
    assert fo.stats.per_provider["ghasi"] == [0, 2]
