"""A Jitsi Videobridge node, as the pool talks to it: health, stats, drain, our room call.

The bridge's own REST endpoints (Jitsi Videobridge's private port):

- ``GET /about/health``: 200 (empty body) healthy, 5xx unhealthy;
- ``GET /colibri/stats``: ``conferences``, ``participants``, ``stress_level``,
  ``graceful_shutdown`` (and more, ignored here);
- ``GET /colibri/drain``: ``{"drain": bool}``.

Room allocation is our own call (``POST /triage/v1/rooms`` ``{"room": NAME}``,
idempotent by name), served by our bridge-side agent and by the loopback emulator
(:mod:`providers.emulators.jitsi`); real deployments allocate through jicofo.

Failures map onto the error tree in one place (:mod:`providers.http_errors`):
refused / connect timeout: ``ProviderUnavailable``; no answer in time:
``ProviderTimeout``; 5xx: ``ProviderUnavailable``; a body that is not the bridge's
shape: ``ProviderUnavailable`` naming the field. No retry, breaker or deadline
here: the node actor wraps every call (``actors.jitsi_pool``).

The join token is not this module's business: :class:`Allocation` carries the room
name and the node's public URL, and the token service adds the token later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import msgspec

from engine.errors import ProviderUnavailable
from providers.http_errors import http_error, transport_error
from providers.http_transport import Http1Transport

__all__ = [
    "ROOMS_PATH",
    "Allocation",
    "BridgeClient",
    "BridgeStats",
    "HttpBridgeClient",
]

ROOMS_PATH = "/triage/v1/rooms"


class BridgeStats(msgspec.Struct, frozen=True, kw_only=True):
    """The part of ``/colibri/stats`` the pool places by (unknown fields ignored)."""

    conferences: int = 0
    participants: int = 0
    stress_level: float = 0.0
    graceful_shutdown: bool = False


class _Drain(msgspec.Struct, frozen=True):
    drain: bool


class _Room(msgspec.Struct, frozen=True):
    room: str
    conference_id: str


@dataclass(frozen=True, slots=True)
class Allocation:
    """A room on a node: what a join link needs, minus the token (added later)."""

    node: str
    url: str  # the node's base URL
    room: str
    conference_id: str
    created: bool  # False: the room existed (a retried allocation)


class BridgeClient(Protocol):
    """What the pool needs from a node (the HTTP client, or a test's fake)."""

    name: str
    url: str

    async def health(self) -> None:
        """Return when healthy; raise a ``ProviderError`` when not."""

    async def stats(self) -> BridgeStats: ...

    async def drain(self) -> bool: ...

    async def allocate(self, room: str) -> Allocation: ...

    async def aclose(self) -> None: ...


_stats = msgspec.json.Decoder(BridgeStats)
_drain = msgspec.json.Decoder(_Drain)
_room = msgspec.json.Decoder(_Room)


class HttpBridgeClient:
    """One bridge over HTTP/1.1; ``timeout_s`` bounds each call (the actor also does)."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        timeout_s: float,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self.url = url.rstrip("/")
        self._timeout = httpx.Timeout(timeout_s)
        self._client = httpx.AsyncClient(transport=transport or Http1Transport())

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            answer = await self._client.request(
                method, f"{self.url}{path}", timeout=self._timeout, **kwargs
            )
        except httpx.TransportError as exc:
            raise transport_error(exc, f"jitsi {self.name}") from exc
        if not answer.is_success:
            raise http_error(answer, f"jitsi {self.name}", answer.text[:200])
        return answer

    def _decode(self, decoder: msgspec.json.Decoder[Any], answer: httpx.Response, what: str) -> Any:
        try:
            return decoder.decode(answer.content)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ProviderUnavailable(
                f"jitsi {self.name}: {what} is not a bridge's: {exc}"
            ) from exc

    async def health(self) -> None:
        await self._request("GET", "/about/health")

    async def stats(self) -> BridgeStats:
        stats: BridgeStats = self._decode(
            _stats, await self._request("GET", "/colibri/stats"), "stats"
        )
        return stats

    async def drain(self) -> bool:
        drain: _Drain = self._decode(_drain, await self._request("GET", "/colibri/drain"), "drain")
        return drain.drain

    async def allocate(self, room: str) -> Allocation:
        answer = await self._request("POST", ROOMS_PATH, json={"room": room})
        got: _Room = self._decode(_room, answer, "room allocation")
        return Allocation(
            node=self.name,
            url=self.url,
            room=got.room,
            conference_id=got.conference_id,
            created=answer.status_code == 201,
        )

    async def aclose(self) -> None:
        await self._client.aclose()
