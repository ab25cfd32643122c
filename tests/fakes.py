"""In-test stand-ins for our own protocols (never for PostgreSQL, NATS or Redis)."""

from __future__ import annotations

import trio

from actors.dispatch_request import SubmitRequest
from actors.dispatcher import SubmitResult
from providers.db.dispatches import DispatchStatus

__all__ = ["Submitter", "Typed"]


class Typed(Exception):
    """An error outside the answer table carrying ``code`` + ``http_status`` (its fallback)."""

    def __init__(self, code: str, http_status: int, *, field: str | None = None) -> None:
        super().__init__(f"{code} happened")
        self.code = code
        self.http_status = http_status
        self.field = field


class Submitter:
    """Remembers what it was given; answers replays of a key with the first answer;
    raises ``error`` when one is set."""

    def __init__(self) -> None:
        self.seen: list[SubmitRequest] = []
        self.by_key: dict[str, SubmitResult] = {}
        self.error: Exception | None = None

    async def submit(self, request: SubmitRequest) -> SubmitResult:
        await trio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        self.seen.append(request)
        known = self.by_key.get(request.idempotency_key)
        if known is not None:
            return SubmitResult(dispatch_id=known.dispatch_id, status=known.status, replay=True)
        result = SubmitResult(dispatch_id=f"d{len(self.by_key) + 1}", status=DispatchStatus.QUEUED)
        self.by_key[request.idempotency_key] = result
        return result
