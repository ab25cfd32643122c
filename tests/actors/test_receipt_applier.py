"""The receipt sink on the autojump clock: the receipts of every caller go to the receipt
group commit (one unit per batch), soft bounces are left alone, bounces reach the tracker,
and a receipt refused fails its caller (its callback gets 503 and is retried)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import trio

from actors.group_commit import GroupCommit, group_commit_child
from actors.receipt_applier import ReceiptApplier
from config.schema import MailboxConfig
from engine.errors import TriageError
from providers.channel import DeliveryState, Receipt
from providers.db.dispatches import ReceiptOutcome, ReceiptResult

MAILBOX = MailboxConfig(capacity=4, overflow="wait")


class Refused(TriageError):
    pass


class _Crossing:
    """What the committer and the applier need of a DbPool: ``run_unit(fn, *args)``."""

    def __init__(self) -> None:
        self.batches: list[list[Receipt]] = []
        self.direct: list[list[Receipt]] = []

    async def run_unit(self, fn: Any, *args: Any) -> Any:
        return await fn(self, *args)


async def _unit(crossing: _Crossing, receipts: Sequence[Receipt]) -> list[Any]:
    crossing.batches.append(list(receipts))
    await trio.sleep(0.01)
    return [
        Refused("refused") if r.provider_ref == "bad" else ReceiptResult(ReceiptOutcome.APPLIED)
        for r in receipts
    ]


class _Tracker:
    def __init__(self) -> None:
        self.bounces: list[Receipt] = []

    def record_bounce(self, receipt: Receipt) -> None:
        self.bounces.append(receipt)


def _receipt(ref: str, state: DeliveryState, *, provider: str = "ghasi", permanent: bool = True) -> Receipt:  # fmt: skip
    return Receipt(provider=provider, state=state, provider_ref=ref, permanent=permanent,
                   tenant_id="t")  # fmt: skip


async def test_every_callers_receipts_share_the_group_commit(
    autojump_clock: trio.abc.Clock,
) -> None:
    crossing, tracker = _Crossing(), _Tracker()
    board: GroupCommit[Receipt, ReceiptResult] = GroupCommit("receipt_commit", _unit, batch_max=8)
    sink = ReceiptApplier(crossing, tracker, db_units=1, commits=board)  # type: ignore[arg-type]  # the crossing stands in for DbPool
    soft = _receipt("m3", DeliveryState.FAILED, provider="smtp", permanent=False)
    hard = _receipt("m4", DeliveryState.UNDELIVERABLE, provider="smtp")
    async with trio.open_nursery() as nursery:
        spec, _ = group_commit_child(board, crossing, mailbox=MAILBOX, shutdown_s=1.0)  # type: ignore[arg-type]
        await nursery.start(spec.start)
        async with trio.open_nursery() as callers:
            callers.start_soon(sink.apply, [_receipt("m1", DeliveryState.DELIVERED)])
            callers.start_soon(sink.apply, [_receipt("m2", DeliveryState.DELIVERED), soft, hard])
        assert len(crossing.batches) == 1  # both callers' receipts in one statement
        assert sorted(r.provider_ref or "" for r in crossing.batches[0]) == ["m1", "m2", "m4"]
        assert tracker.bounces == [soft, hard]  # the tracker hears of both bounces
        with pytest.raises(Refused):
            await sink.apply([_receipt("bad", DeliveryState.DELIVERED),
                              _receipt("m5", DeliveryState.DELIVERED)])  # fmt: skip
        assert [r.provider_ref for r in crossing.batches[-1]] == ["bad", "m5"]
        nursery.cancel_scope.cancel()


async def test_without_a_group_commit_each_call_is_its_own_unit(
    autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    import actors.receipt_applier as module

    crossing = _Crossing()

    async def alone(pool: _Crossing, receipts: Sequence[Receipt]) -> None:
        pool.direct.append(list(receipts))

    monkeypatch.setattr(module, "apply_receipts_async", alone)
    sink = ReceiptApplier(crossing, None, db_units=1)  # type: ignore[arg-type]
    await sink.apply([_receipt("m1", DeliveryState.DELIVERED)])
    await sink.apply([_receipt("m2", DeliveryState.FAILED, permanent=False)])  # soft: nothing
    assert [[r.provider_ref for r in batch] for batch in crossing.direct] == [["m1"]]
    assert crossing.batches == []
