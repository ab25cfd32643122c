"""The receipt sink: delivery receipts to dispatch rows, bounces to the bounce tracker (row 3).

The DLR ingress workers and push feedback hand their parsed receipts here
(moved out of ``supervisors/channels.py``: supervisors only wire).

With a group commit (``commits``, the ``receipt_commit`` board of
:mod:`actors.group_commit`, unit
:func:`~providers.db.dispatches.apply_receipt_batch_async`) the receipts of every
worker gather into one statement per batch: one connection and one round trip for
up to ``[dlr] commit_batch_max`` receipts, where each receipt alone cost a tenant
switch and a transition round trip. Without one, each call is one unit of work of
its own, at most ``db_units`` at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import trio

from providers.channel import DeliveryState, Receipt
from providers.db.dispatches import ReceiptResult, apply_receipts_async

if TYPE_CHECKING:
    from actors.bounce_tracker import BounceFeed
    from actors.group_commit import GroupCommit
    from providers.db.pool import DbPool

__all__ = ["ReceiptApplier"]


class ReceiptApplier:
    """The DLR workers' and push feedback's sink: receipts to dispatch rows, bounces to row 3.

    A soft bounce (``FAILED``, not permanent) leaves its dispatch as it is: the mail
    server goes on trying; only the bounce tracker hears of it.
    """

    def __init__(
        self,
        db: DbPool,
        tracker: BounceFeed | None,
        *,
        db_units: int,
        commits: GroupCommit[Receipt, ReceiptResult] | None = None,
    ) -> None:
        self.db = db
        self.tracker = tracker
        self.commits = commits
        # However many DLR workers run, receipts hold at most this many pooled
        # connections: a receipt flood never starves the accepts and the sends.
        self.limiter = trio.CapacityLimiter(db_units)

    async def apply(self, receipts: Sequence[Receipt]) -> None:
        final = [r for r in receipts if r.permanent or r.state is not DeliveryState.FAILED]
        if final and self.commits is not None:
            # Raises the first receipt's error: its callback gets 503, the provider
            # retries, and the receipts applied meanwhile apply again as no-ops.
            await self.commits.submit_all(final)
        elif final:
            async with self.limiter:
                await self.db.run_unit(apply_receipts_async, final)
        if self.tracker is not None:
            for receipt in receipts:
                if receipt.provider in _BOUNCE_PROVIDERS and receipt.state in _BOUNCES:
                    self.tracker.record_bounce(receipt)


_BOUNCE_PROVIDERS: Final = frozenset({"smtp"})
_BOUNCES: Final = frozenset({DeliveryState.UNDELIVERABLE, DeliveryState.FAILED})
