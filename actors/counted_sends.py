"""An adapter wrapper that counts accepted emails for the bounce ratio (row 3).

Moved out of ``supervisors/channels.py`` (supervisors only wire).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actors.bounce_tracker import BounceFeed
    from providers.channel import Accepted, Adapter, Message, StatusAnswer

__all__ = ["CountedSends"]


class CountedSends:
    """An adapter wrapper: each accepted email counts as sent for the bounce ratio (row 3)."""

    def __init__(self, inner: Adapter, tracker: BounceFeed) -> None:
        self.inner = inner
        self.tracker = tracker
        self.name = inner.name
        self.channel = inner.channel

    async def send(self, message: Message) -> Accepted:
        accepted = await self.inner.send(message)
        self.tracker.record_sent(message.tenant_id, message.category)
        return accepted

    async def status(self, message: Message) -> StatusAnswer | None:
        return await self.inner.status(message)

    async def aclose(self) -> None:
        await self.inner.aclose()
