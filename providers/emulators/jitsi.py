"""A Jitsi Videobridge on loopback: its health, stats and drain endpoints, and our room API.

What Jitsi Videobridge serves on its private REST port, and this emulator with it:

==============================  ==================================================
``GET /about/health``           200 with an empty body when healthy; 500 when not
``GET /colibri/stats``          JSON: ``conferences``, ``participants``,
                                ``stress_level``, ``graceful_shutdown``,
                                ``drain``, ``largest_conference``, ``region``,
                                ``version``
``GET /colibri/drain``          ``{"drain": bool}``
``POST /colibri/drain/enable``  enter drain mode (``/disable`` leaves it)
==============================  ==================================================

Rooms are not allocated over this REST port in a real deployment (jicofo speaks
Colibri2 over XMPP). The pool's allocation call is **ours**, and named so:

==================================  ==============================================
``POST /triage/v1/rooms``           ``{"room": NAME}``: 201 with the room, or 200
                                    when the room exists (idempotent by name: a
                                    retried allocation never makes a second one)
``DELETE /triage/v1/rooms/{NAME}``  204 (404 if unknown)
``GET /triage/v1/rooms``            every room hosted here
==================================  ==============================================

Faults (:class:`BridgeFaults`, :meth:`JitsiBridgeEmulator.set_bridge_faults`, or
``PUT /_emulator/bridge``): ``health_status`` (e.g. 500: unhealthy), ``hang`` (no
answer on any route until cleared), ``drain``, ``stress_level`` (a fixed stress in
place of the computed one), ``graceful_shutdown``, ``allocate_status`` (our room
API answers this status). *Down* is the server's: ``server.go_down()`` closes the
port, so connects are refused, and ``come_up()`` listens again on the same port.

The computed stress is ``participants / capacity_participants`` (a stand-in for the
bridge's packet-rate load measure, in the same 0..1+ range).
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from providers.emulators.base import Emulator, ReceiptPost, Request, Response, StoredMessage

__all__ = ["ROOMS_PATH", "BridgeFaults", "JitsiBridgeEmulator", "Room"]

#: Our room-allocation route (not Jitsi's: see the module docstring).
ROOMS_PATH = "/triage/v1/rooms"


class BridgeFaults(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the bridge does wrong; replaced whole by ``set_bridge_faults``."""

    health_status: Annotated[int, msgspec.Meta(ge=500, le=599)] | None = None
    hang: bool = False
    drain: bool = False
    stress_level: Annotated[float, msgspec.Meta(ge=0)] | None = None
    graceful_shutdown: bool = False
    allocate_status: Annotated[int, msgspec.Meta(ge=400, le=599)] | None = None


@dataclass
class Room:
    name: str
    conference_id: str
    created_at: float
    participants: int = 0


class JitsiBridgeEmulator(Emulator):
    """One videobridge node. ``participants_per_room`` is what each allocated room adds to
    the load (the stress level counts it), ``capacity_participants`` the load of stress 1."""

    def __init__(
        self,
        name: str = "jvb",
        *,
        region: str = "local",
        participants_per_room: int = 2,
        capacity_participants: int = 200,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(name, auto_receipts=False, clock=clock)
        if participants_per_room < 0 or capacity_participants < 1:
            raise ValueError("participants_per_room >= 0 and capacity_participants >= 1 required")
        self.region = region
        self.participants_per_room = participants_per_room
        self.capacity_participants = capacity_participants
        self.bridge_faults = BridgeFaults()
        self.rooms: dict[str, Room] = {}
        self.allocations = 0  # POSTs that created a room
        self.health_checks = 0

    # -- faults -----------------------------------------------------------------------

    def set_bridge_faults(self, **fields: Any) -> BridgeFaults:
        faults = msgspec.convert(fields, BridgeFaults)
        self.bridge_faults = faults
        return faults

    def clear_bridge_faults(self) -> None:
        self.set_bridge_faults()

    # -- what the bridge reports ----------------------------------------------------------

    @property
    def participants(self) -> int:
        return sum(room.participants for room in self.rooms.values())

    @property
    def stress_level(self) -> float:
        fixed = self.bridge_faults.stress_level
        if fixed is not None:
            return fixed
        return self.participants / self.capacity_participants

    def colibri_stats(self) -> dict[str, Any]:
        faults = self.bridge_faults
        largest = max((room.participants for room in self.rooms.values()), default=0)
        return {
            "conferences": len(self.rooms),
            "participants": self.participants,
            "stress_level": self.stress_level,
            "graceful_shutdown": faults.graceful_shutdown,
            "drain": faults.drain,
            "largest_conference": largest,
            "region": self.region,
            "version": "emulated",
        }

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out.update(
            rooms=len(self.rooms),
            allocations=self.allocations,
            health_checks=self.health_checks,
            bridge_faults=msgspec.to_builtins(self.bridge_faults),
        )
        return out

    # -- routes -------------------------------------------------------------------------

    async def handle(self, request: Request) -> Response | None:
        if self.bridge_faults.hang:
            return None  # the base waits for the client to give up
        method, path = request.method, request.path
        match (method, path):
            case ("GET", "/about/health"):
                self.health_checks += 1
                status = self.bridge_faults.health_status
                return Response(200) if status is None else Response(status)
            case ("GET", "/colibri/stats"):
                return Response.json(200, self.colibri_stats())
            case ("GET", "/colibri/drain"):
                return Response.json(200, {"drain": self.bridge_faults.drain})
            case ("POST", "/colibri/drain/enable" | "/colibri/drain/disable"):
                self.bridge_faults.drain = path.endswith("/enable")
                return Response(200)
            case ("POST", _) if path == ROOMS_PATH:
                return self._allocate(request)
            case ("GET", _) if path == ROOMS_PATH:
                return Response.json(200, {"rooms": sorted(self.rooms)})
            case ("DELETE", _) if path.startswith(ROOMS_PATH + "/"):
                name = urllib.parse.unquote(path[len(ROOMS_PATH) + 1 :])
                if self.rooms.pop(name, None) is None:
                    return Response.json(404, {"error": f"no room {name!r}"})
                return Response(204)
        return Response.json(404, {"error": f"no route {method} {path}"})

    def _allocate(self, request: Request) -> Response:
        status = self.bridge_faults.allocate_status
        if status is not None:
            return Response.json(status, {"error": "injected fault"})
        if self.bridge_faults.graceful_shutdown:
            return Response.json(503, {"error": "bridge is shutting down"})
        try:
            body = msgspec.json.decode(request.body, type=dict[str, Any])
        except msgspec.DecodeError:
            return Response.json(400, {"error": "body is not JSON"})
        name = body.get("room")
        if not isinstance(name, str) or not name or len(name) > 200:
            return Response.json(422, {"error": "room must be a name of 1..200 characters"})
        room = self.rooms.get(name)
        if room is not None:
            return Response.json(200, self._room(room))
        room = Room(name, self.next_id("conf-"), self.clock(), self.participants_per_room)
        self.rooms[name] = room
        self.allocations += 1
        return Response.json(201, self._room(room))

    def _room(self, room: Room) -> dict[str, Any]:
        return {"room": room.name, "conference_id": room.conference_id, "bridge": self.name}

    async def control(self, method: str, path: str, request: Request) -> Response | None:
        if path != "/bridge":
            return None
        if method == "PUT":
            fields = msgspec.json.decode(request.body or b"{}", type=dict[str, Any])
            return Response.json(200, msgspec.to_builtins(self.set_bridge_faults(**fields)))
        if method == "DELETE":
            self.clear_bridge_faults()
            return Response.json(200, msgspec.to_builtins(self.bridge_faults))
        if method == "GET":
            return Response.json(200, msgspec.to_builtins(self.bridge_faults))
        return None

    def receipt_for(self, message: StoredMessage, state: str) -> ReceiptPost | None:
        return None  # a bridge posts no receipts
