"""The dispatch command subject on a real nats-server: request/reply, garbage, queue group."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import msgspec
import pytest
import trio
from nats.aio.msg import Msg
from prometheus_client import CollectorRegistry

from actors.answers import STATUS_HEADER
from actors.dispatch_commands import (
    CommandsMessage,
    CommandsState,
    CommandsStatistics,
    DispatchCommands,
    dispatch_commands_child,
)
from actors.dispatch_request import DispatchLimits, RequestDecoder, SubmitRequest
from config.schema import DispatchConfig, MailboxConfig
from engine.actor import ActorRef
from engine.errors import BulkheadFull, ProviderUnavailable
from providers import jetstream
from providers.bridge import run
from providers.channel import ChannelName
from tests.fakes import Submitter, Typed

TENANT = "6f1c2f1e-4a8b-4c36-9d76-0e4f7a1b2c3d"
MAX_BODY = 1024


def command(**changes: Any) -> bytes:
    base: dict[str, Any] = {
        "tenant_id": TENANT,
        "channel": "push",
        "template": "visit_ready",
        "recipient": "fcm:device-token-1",
        "data": {"room": "7"},
        "idempotency_key": "key-1",
    }
    base.update(changes)
    return msgspec.json.encode({k: v for k, v in base.items() if v is not ...})


@dataclass
class Door:
    """One replica of the door: its ref, and every incarnation it made."""

    ref: ActorRef[CommandsMessage]
    incarnations: list[DispatchCommands] = field(default_factory=list)

    def statistics(self) -> CommandsStatistics:
        stats = self.ref.statistics()
        assert isinstance(stats, CommandsStatistics)
        return stats

    def final(self) -> CommandsStatistics:
        """The last incarnation's record, once it stopped."""
        stats = self.incarnations[-1].statistics()
        assert stats.state is CommandsState.STOPPED
        return stats


MAILBOX = MailboxConfig(capacity=16, overflow="wait")


@asynccontextmanager
async def serving(
    nats_url: str, subject: str, submitter: Submitter, *, replicas: int = 1
) -> AsyncIterator[tuple[jetstream.JetStreamClient, list[Door]]]:
    clients = [await run(jetstream.connect, nats_url) for _ in range(replicas + 1)]
    registry = CollectorRegistry()
    doors: list[Door] = []
    specs = []
    for client in clients[1:]:
        made: list[DispatchCommands] = []

        def recording(made: list[DispatchCommands] = made, **kw: Any) -> DispatchCommands:
            actor = DispatchCommands(**kw)
            made.append(actor)
            return actor

        spec, ref = dispatch_commands_child(
            mailbox=MAILBOX,
            shutdown_s=2.0,
            actor=recording,
            client=client,
            submitter=submitter,
            subject=subject,
            queue="triage-dispatch",
            max_body_bytes=MAX_BODY,
            batch_max=16,
            poll_timeout_s=0.2,
            pending_msgs_limit=256,
            retry_after_s=2.0,
            unsubscribe_timeout_s=1.0,
            requests=RequestDecoder(DispatchLimits.of(DispatchConfig())),
            registry=registry,
        )
        specs.append(spec)
        doors.append(Door(ref, made))
    try:
        async with trio.open_nursery() as nursery:
            for spec in specs:
                await nursery.start(spec.start)
            for door in doors:  # started means subscribed
                assert door.statistics().state is CommandsState.SERVING
            yield clients[0], doors
            nursery.cancel_scope.cancel()
    finally:
        for client in clients:
            await run(jetstream.close, client)
    for door in doors:
        assert door.ref.statistics() is None  # no incarnation runs
        assert [a.states.state for a in door.incarnations] == [CommandsState.STOPPED]
        assert door.incarnations[0].subscription is None  # unsubscribed


async def request(
    client: jetstream.JetStreamClient,
    subject: str,
    data: bytes,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], Msg]:
    reply: Msg = await run(
        partial(client.nc.request, subject, data, timeout=5.0, headers=headers), service="nats"
    )
    status = int((reply.headers or {})[STATUS_HEADER])
    return status, msgspec.json.decode(reply.data), reply


def subject() -> str:
    return f"test.commands.dispatch.{uuid.uuid4().hex[:8]}"


async def test_request_reply_accepts_then_replays(
    nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    submitter = Submitter()
    name = subject()
    async with serving(nats_url, name, submitter) as (client, _):
        first = await request(client, name, command())
        by_header = await request(
            client, name, command(idempotency_key=...), {"Idempotency-Key": "key-1"}
        )
        other = await request(client, name, command(idempotency_key="key-2"))
    assert first[:2] == (202, {"dispatch_id": "d1", "status": "queued"})
    assert by_header[:2] == (200, {"dispatch_id": "d1", "status": "queued"})
    assert other[:2] == (202, {"dispatch_id": "d2", "status": "queued"})
    assert submitter.seen[0] == SubmitRequest(
        idempotency_key="key-1",
        tenant_id=TENANT,
        channel=ChannelName.PUSH,
        template="visit_ready",
        recipient="fcm:device-token-1",
        data={"room": "7"},
    )


GARBAGE: Sequence[Any] = [
    pytest.param(b"\x00\x01garbage", None, 400, "invalid_json", id="not-json"),
    pytest.param(b"", None, 400, "invalid_json", id="empty"),
    pytest.param(command(channel="fax"), None, 400, "invalid_field", id="bad-channel"),
    pytest.param(command(extra=1), None, 400, "invalid_field", id="unknown-field"),
    pytest.param(command(idempotency_key=...), None, 400, "missing_idempotency_key", id="no-key"),
    pytest.param(
        command(idempotency_key="a"),
        {"Idempotency-Key": "b"},
        400,
        "invalid_idempotency_key",
        id="header-and-field-differ",
    ),
    pytest.param(
        command(data={"x": "y" * MAX_BODY}), None, 413, "payload_too_large", id="oversize"
    ),
    pytest.param(command(recipient="device-token-1"), None, 400, "invalid_field", id="push-shape"),
    pytest.param(command(template="a\x00"), None, 400, "invalid_field", id="nul-template"),
    pytest.param(command(data={"9x": "v"}), None, 400, "invalid_field", id="bad-field-name"),
]


@pytest.mark.parametrize(("data", "headers", "status", "code"), GARBAGE)
async def test_garbage_gets_a_typed_error_reply_and_the_subject_keeps_serving(
    nats_url: str,
    bridge: asyncio.AbstractEventLoop,
    data: bytes,
    headers: dict[str, str] | None,
    status: int,
    code: str,
) -> None:
    submitter = Submitter()
    name = subject()
    async with serving(nats_url, name, submitter) as (client, actors):
        refused = await request(client, name, data, headers)
        assert submitter.seen == []
        accepted = await request(client, name, command())
    assert refused[0] == status
    assert refused[1]["error"] == code and refused[1]["message"]
    assert accepted[0] == 202
    assert actors[0].final().rejected == 1


async def test_submitter_errors_are_typed_replies_with_retry_after(
    nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    submitter = Submitter()
    name = subject()
    async with serving(nats_url, name, submitter) as (client, _):
        submitter.error = Typed("template_not_found", 422)
        missing = await request(client, name, command())
        submitter.error = BulkheadFull("push", capacity=8, waited_s=0.05)
        shed = await request(client, name, command())
    assert missing[:2] == (
        422,
        {"error": "template_not_found", "message": "template_not_found happened"},
    )
    assert (shed[0], shed[1]["error"]) == (503, "overloaded")
    assert (shed[2].headers or {})["Retry-After"] == "2"


async def test_replicas_in_the_queue_group_answer_each_command_once(
    nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    submitter = Submitter()
    name = subject()
    async with (
        serving(nats_url, name, submitter, replicas=2) as (client, actors),
        trio.open_nursery() as nursery,
    ):
        for i in range(20):
            nursery.start_soon(request, client, name, command(idempotency_key=f"k{i}"))
    assert sum(door.final().answered for door in actors) == 20
    assert len(submitter.seen) == 20


async def test_a_command_without_a_reply_subject_is_counted_and_dropped(
    nats_url: str, bridge: asyncio.AbstractEventLoop
) -> None:
    submitter = Submitter()
    name = subject()
    async with serving(nats_url, name, submitter) as (client, actors):
        await run(partial(client.nc.publish, name, command()), service="nats")
        # One connection, one subscriber: the server delivers in publish order, so the
        # command without a reply was handled by the time this request is answered.
        after = await request(client, name, command(idempotency_key="k2"))
        assert actors[0].statistics().unanswerable == 1
    assert submitter.seen[0].idempotency_key == "k2"  # the dropped one never reached it
    assert after[0] == 202


async def test_a_fetch_nats_refuses_pauses_then_serves_again(
    nats_url: str, bridge: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refused fetch: DISCONNECTED, and the next turn comes poll_timeout_s later
    (send_after), not at once; the first fetch that works is SERVING again."""
    from actors import dispatch_commands

    real = dispatch_commands.next_commands
    refusing = True

    async def flaky(subscription: Any, batch_max: int, timeout_s: float) -> Any:
        if refusing:
            raise ProviderUnavailable("nats: unavailable (test)")
        return await real(subscription, batch_max, timeout_s)

    monkeypatch.setattr(dispatch_commands, "next_commands", flaky)
    submitter = Submitter()
    name = subject()
    async with serving(nats_url, name, submitter) as (client, doors):
        await trio.sleep(1.0)  # poll_timeout_s = 0.2: about five turns, not thousands
        stats = doors[0].statistics()
        assert stats.state is CommandsState.DISCONNECTED
        assert 2 <= stats.turns <= 7, stats
        refusing = False
        answered = await request(client, name, command())
        assert doors[0].statistics().state is CommandsState.SERVING
    assert answered[0] == 202
