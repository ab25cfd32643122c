"""The SMTP adapter against a real independent server (aiosmtpd), every fault mapping
against our emulator, and the emulator spoken to by the stdlib ``smtplib`` client.

Timeouts here run on real time: every exchange is real TCP on loopback, which an
autojump clock would skip over. The budgets are generous (a hang is what ends
them), so nothing here measures speed.
"""

from __future__ import annotations

import asyncio
import base64
import smtplib
import socket
from collections.abc import AsyncIterator, Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import pytest
import trio
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as AioSmtp
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from engine.errors import AuthFailed, ConfigError, ProviderTimeout, ProviderUnavailable, Rejected
from providers.channel import Accepted, ChannelName, Message, RecipientGone
from providers.emulators.smtp import SmtpEmulator, serve_smtp_emulator
from providers.smtp import Reply, SmtpAdapter, dot_stuff, queue_id

SENDER = "noreply@clinic.example"
HELO = "triage.clinic.example"
TIMEOUT_S = 5.0  # the budget of an exchange that should succeed or fail by a reply
HANG_TIMEOUT_S = 0.5  # the budget of an exchange the server never answers

BODY = (
    "Your appointment is tomorrow at 09:30.\n"
    ".leading dot\n"
    "..two dots\n"
    ".\n"
    "a line after a lone dot\n"
    "Grüße aus der Praxis\n"
)


def message(n: int = 1, *, recipient: str = "patient@example.org", body: str = BODY) -> Message:
    return Message(
        client_ref=f"dispatch-{n}",
        tenant_id="tenant-a",
        idempotency_key=f"key-{n}",
        channel=ChannelName.EMAIL,
        recipient=recipient,
        body=body,
        subject="Reminder: appointment",
        category="reminders",
    )


def adapter(port: int, *, timeout_s: float = TIMEOUT_S, **kwargs: Any) -> SmtpAdapter:
    return SmtpAdapter(
        "smtp",
        host="127.0.0.1",
        port=port,
        sender=SENDER,
        helo_name=HELO,
        timeout_s=timeout_s,
        **kwargs,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- against aiosmtpd, an independent implementation ------------------------------


class Sink:
    """An aiosmtpd handler that keeps every envelope and answers with ``reply``."""

    def __init__(self, reply: str = "250 Message accepted for delivery") -> None:
        self.envelopes: list[Envelope] = []
        self.reply = reply

    async def handle_DATA(self, server: AioSmtp, session: Session, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return self.reply


def authenticator(
    server: AioSmtp, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"relay", b"s3cret")
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers 535


@pytest.fixture
def sink() -> Iterator[tuple[Sink, int]]:
    handler = Sink()
    port = free_port()
    # A plain asyncio loop of its own: trio-asyncio (imported by the conftest) installs
    # an event loop policy whose loops cannot run in aiosmtpd's thread.
    loop = asyncio.SelectorEventLoop()
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=port,
        loop=loop,
        authenticator=authenticator,
        auth_require_tls=False,
    )
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()
        loop.close()


def received(envelope: Envelope) -> EmailMessage:
    raw = envelope.original_content
    assert isinstance(raw, bytes)
    parsed = message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


async def test_message_arrives_intact_at_an_independent_server(sink: tuple[Sink, int]) -> None:
    handler, port = sink
    answer = await adapter(port).send(message())

    assert answer == Accepted(provider="smtp", provider_ref=f"<dispatch-1@{HELO}>")
    [envelope] = handler.envelopes
    assert envelope.mail_from == SENDER
    assert envelope.rcpt_tos == ["patient@example.org"]
    mail = received(envelope)
    assert mail["From"] == SENDER
    assert mail["To"] == "patient@example.org"
    assert mail["Subject"] == "Reminder: appointment"
    assert mail["Message-ID"] == f"<dispatch-1@{HELO}>"
    assert mail["X-Triage-Ref"] == "tenant-a:dispatch-1"
    assert mail["X-Triage-Category"] == "reminders"
    assert mail["X-Idempotency-Key"] == "key-1"
    assert mail["Date"] is not None
    # Dot-stuffed on the wire, unstuffed by the server: the body is exactly the text.
    assert mail.get_content().replace("\r\n", "\n") == BODY
    raw = envelope.original_content
    assert isinstance(raw, bytes)
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF line endings only


async def test_queue_id_in_the_reply_becomes_the_provider_ref(sink: tuple[Sink, int]) -> None:
    handler, port = sink
    handler.reply = "250 2.0.0 Ok: queued as 4Fz3Y2kQ9"
    answer = await adapter(port).send(message())
    assert answer.provider_ref == "4Fz3Y2kQ9"


async def test_auth_plain_against_an_independent_server(sink: tuple[Sink, int]) -> None:
    handler, port = sink
    await adapter(port, username="relay", password="s3cret").send(message())
    assert len(handler.envelopes) == 1
    with pytest.raises(AuthFailed, match="535"):
        await adapter(port, username="relay", password="wrong").send(message(2))
    assert len(handler.envelopes) == 1


# -- the wire helpers -------------------------------------------------------------


def test_dot_stuffing_and_line_endings() -> None:
    assert dot_stuff(b"a\n.b\r\n..c\r.\n") == b"a\r\n..b\r\n...c\r\n..\r\n"
    assert dot_stuff(b"no newline at end") == b"no newline at end\r\n"
    assert dot_stuff(b"") == b""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2.0.0 Ok: queued as 4Fz3Y2", "4Fz3Y2"),
        ("OK id=1tAbCd-0001Xy-2Q", "1tAbCd-0001Xy-2Q"),
        ("Ok 0100018c2f6e3a1b", "0100018c2f6e3a1b"),
        ("2.0.0 5ASDq9Lk012345 Message accepted for delivery", "5ASDq9Lk012345"),
        ("OK", None),
        ("2.0.0 Ok", None),
    ],
)
def test_queue_id_formats(text: str, expected: str | None) -> None:
    assert queue_id(Reply(250, [text])) == expected


def test_bad_configuration_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="timeout_s"):
        adapter(25, timeout_s=0)
    with pytest.raises(ConfigError, match="username and password"):
        adapter(25, username="only")
    with pytest.raises(ConfigError, match="sender"):
        SmtpAdapter("smtp", host="h", port=25, sender="not an address", helo_name=HELO, timeout_s=1)


async def test_unusable_recipient_or_header_is_rejected_before_connecting() -> None:
    nobody = adapter(free_port())  # nothing listens there: only validation can answer
    with pytest.raises(Rejected, match="recipient"):
        await nobody.send(message(recipient="a@b.org\r\nRCPT TO:<evil@x.org>"))
    with pytest.raises(Rejected, match="recipient"):
        await nobody.send(message(recipient="pätient@example.org"))
    injected = Message(
        client_ref="d",
        tenant_id="t",
        idempotency_key="k\r\nBcc: evil@x.org",
        channel=ChannelName.EMAIL,
        recipient="a@b.org",
        body="x",
    )
    with pytest.raises(Rejected, match="cannot be encoded"):
        await nobody.send(injected)


# -- against the emulator: every mapping ------------------------------------------


@pytest.fixture
async def emulator() -> AsyncIterator[SmtpEmulator]:
    async with serve_smtp_emulator(SmtpEmulator()) as served:
        yield served


async def test_accepted_with_the_emulators_queue_id(emulator: SmtpEmulator) -> None:
    answer = await adapter(emulator.port).send(message())
    assert answer.provider_ref == emulator.received[0].queue_id
    assert emulator.accepted == {"key-1": 1}
    stored = emulator.messages["tenant-a:dispatch-1"]
    assert stored.message.get_content().replace("\r\n", "\n") == BODY
    assert stored.rcpt_to == ("patient@example.org",)


async def test_connection_refused_is_unavailable_and_the_port_comes_back(
    emulator: SmtpEmulator,
) -> None:
    port = emulator.port
    await emulator.go_down()
    with pytest.raises(ProviderUnavailable, match="unreachable"):
        await adapter(port).send(message())
    await emulator.come_up()
    assert emulator.port == port
    await adapter(port).send(message())
    assert emulator.accepted == {"key-1": 1}


@pytest.mark.parametrize(
    ("code", "stage"),
    [
        (421, "connect"),
        (421, "mail"),
        (451, "mail"),
        (450, "rcpt"),
        (451, "data"),
        (451, "end_of_data"),
    ],
)
async def test_temporary_failures_are_unavailable(
    emulator: SmtpEmulator, code: int, stage: Any
) -> None:
    emulator.tempfail(code, stage=stage)
    with pytest.raises(ProviderUnavailable, match=str(code)):
        await adapter(emulator.port).send(message())
    assert emulator.accepted == {}
    emulator.tempfail(None)
    await adapter(emulator.port).send(message(2))
    assert emulator.accepted == {"key-2": 1}


async def test_user_unknown_at_rcpt_is_recipient_gone(emulator: SmtpEmulator) -> None:
    emulator.fail_rcpt("gone@example.org")
    with pytest.raises(RecipientGone) as caught:
        await adapter(emulator.port).send(message(recipient="gone@example.org"))
    assert caught.value.recipient == "gone@example.org"
    assert "5.1.1" in caught.value.reason
    assert emulator.accepted == {}


@pytest.mark.parametrize(
    ("code", "text", "gone"),
    [
        (550, "5.7.1 Relaying denied", False),
        (554, "5.7.1 Message refused by policy", False),
        (553, "5.1.10 Recipient address has null MX", True),
        (550, "Requested action not taken: mailbox unavailable", True),
        (550, "No such user here", True),
    ],
)
async def test_other_permanent_rcpt_failures(
    emulator: SmtpEmulator, code: int, text: str, gone: bool
) -> None:
    emulator.fail_rcpt("x@example.org", code=code, text=text)
    with pytest.raises(Rejected) as caught:
        await adapter(emulator.port).send(message(recipient="x@example.org"))
    assert isinstance(caught.value, RecipientGone) is gone


async def test_oversize_message_is_rejected_after_data() -> None:
    async with serve_smtp_emulator(SmtpEmulator(max_message_bytes=200)) as emulator:
        with pytest.raises(Rejected, match="552"):
            await adapter(emulator.port).send(message())
        assert emulator.accepted == {}


async def test_auth_failures() -> None:
    async with serve_smtp_emulator(SmtpEmulator(username="relay", password="s3cret")) as emulator:
        await adapter(emulator.port, username="relay", password="s3cret").send(message())
        with pytest.raises(AuthFailed, match="535"):
            await adapter(emulator.port, username="relay", password="nope").send(message(2))
        with pytest.raises(AuthFailed, match="530"):
            await adapter(emulator.port).send(message(3))  # no credentials configured
        assert emulator.accepted == {"key-1": 1}
    async with serve_smtp_emulator(SmtpEmulator()) as emulator:
        with pytest.raises(AuthFailed, match="does not offer AUTH PLAIN"):
            await adapter(emulator.port, username="relay", password="s3cret").send(message())


async def test_ehlo_refused_falls_back_to_helo(emulator: SmtpEmulator) -> None:
    emulator.set_faults(refuse_ehlo=True)
    await adapter(emulator.port).send(message())
    assert emulator.accepted == {"key-1": 1}


async def test_hang_after_the_final_dot_is_ambiguous(emulator: SmtpEmulator) -> None:
    emulator.set_faults(hang_after_data=True)
    with pytest.raises(ProviderTimeout, match="may have been queued"):
        await adapter(emulator.port, timeout_s=HANG_TIMEOUT_S).send(message())
    assert emulator.accepted == {"key-1": 1}  # taken: a retry would be a duplicate


async def test_drop_after_the_final_dot_is_ambiguous(emulator: SmtpEmulator) -> None:
    emulator.set_faults(drop_at="end_of_data")
    with pytest.raises(ProviderTimeout):
        await adapter(emulator.port).send(message())
    assert emulator.accepted == {"key-1": 1}


@pytest.mark.parametrize("stage", ["connect", "mail", "rcpt", "data"])
async def test_drop_before_the_final_dot_is_unavailable(emulator: SmtpEmulator, stage: Any) -> None:
    emulator.set_faults(drop_at=stage)
    with pytest.raises(ProviderUnavailable, match="before the message was sent"):
        await adapter(emulator.port).send(message())
    assert emulator.accepted == {}


async def test_latency_within_and_beyond_the_budget(emulator: SmtpEmulator) -> None:
    emulator.set_faults(latency_s=0.01)
    await adapter(emulator.port).send(message())
    emulator.set_faults(latency_s=HANG_TIMEOUT_S * 4)
    with pytest.raises(ProviderUnavailable, match="no reply in time"):
        await adapter(emulator.port, timeout_s=HANG_TIMEOUT_S).send(message(2))
    assert emulator.accepted == {"key-1": 1}


async def test_a_server_that_never_greets_is_bounded_by_timeout_s() -> None:
    async def mute(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, mute, [listener])
        start = trio.current_time()
        with pytest.raises(ProviderUnavailable, match="no reply in time"):
            await adapter(port, timeout_s=HANG_TIMEOUT_S).send(message())
        assert trio.current_time() - start >= HANG_TIMEOUT_S
        nursery.cancel_scope.cancel()


async def test_duplicates_are_counted_by_idempotency_key(emulator: SmtpEmulator) -> None:
    smtp = adapter(emulator.port)
    await smtp.send(message(1))
    await smtp.send(message(1))
    await smtp.send(message(2))
    assert emulator.accepted == {"key-1": 2, "key-2": 1}
    assert emulator.duplicates() == 1
    assert await smtp.status(message(1)) is None
    await smtp.aclose()


# -- the emulator speaks real SMTP: the stdlib client --------------------------------


async def test_emulator_speaks_smtp_to_smtplib() -> None:
    emulator = SmtpEmulator(hostname="mx.test", username="relay", password="s3cret")
    async with serve_smtp_emulator(emulator):
        emulator.fail_rcpt("gone@example.org")

        def conversation() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            with smtplib.SMTP("127.0.0.1", emulator.port, timeout=TIMEOUT_S) as client:
                code, _ = client.ehlo("client.test")
                seen["ehlo"] = code
                seen["features"] = dict(client.esmtp_features)
                seen["early_data"] = client.docmd("DATA")
                seen["unauthed_mail"] = client.docmd("MAIL FROM:<a@client.test>")
                with pytest.raises(smtplib.SMTPAuthenticationError):
                    client.login("relay", "wrong")
                # AUTH PLAIN without an initial response: the 334 challenge path.
                seen["challenge"] = client.docmd("AUTH", "PLAIN")
                seen["auth"] = client.docmd(base64.b64encode(b"\0relay\0s3cret").decode())
                seen["noop"] = client.noop()
                seen["vrfy"] = client.verify("someone")
                refused = client.sendmail(
                    "a@client.test",
                    ["b@example.org", "gone@example.org"],
                    b"X-Idempotency-Key: k-1\r\nX-Triage-Ref: t:d1\r\n\r\n.first\r\nsecond\r\n",
                )
                seen["refused"] = refused
                client.mail("a@client.test")
                client.rset()
                client.sendmail(
                    "a@client.test", ["c@example.org"], b"X-Idempotency-Key: k-2\r\n\r\nhi\r\n"
                )
                with pytest.raises(smtplib.SMTPRecipientsRefused):
                    client.sendmail("a@client.test", ["gone@example.org"], b"\r\nx\r\n")
            return seen

        seen = await trio.to_thread.run_sync(conversation)

    assert seen["ehlo"] == 250
    assert seen["features"]["auth"].strip() == "PLAIN"
    assert "size" in seen["features"]
    assert seen["early_data"][0] == 503
    assert seen["unauthed_mail"][0] == 530
    assert seen["challenge"][0] == 334
    assert seen["auth"][0] == 235
    assert seen["noop"][0] == 250
    assert seen["vrfy"][0] == 252
    assert seen["refused"] == {"gone@example.org": (550, b"5.1.1 User unknown")}
    assert emulator.accepted == {"k-1": 1, "k-2": 1}
    first = emulator.messages["t:d1"]
    assert first.rcpt_to == ("b@example.org",)
    assert first.raw.endswith(b"\r\n\r\n.first\r\nsecond\r\n")  # unstuffed by the server


async def test_smtplib_sees_tempfail_and_goes_away() -> None:
    async with serve_smtp_emulator(SmtpEmulator()) as emulator:
        emulator.tempfail(421)

        def connect() -> int:
            try:
                smtplib.SMTP("127.0.0.1", emulator.port, timeout=TIMEOUT_S)
            except smtplib.SMTPConnectError as exc:
                return int(exc.smtp_code)
            return 0

        assert await trio.to_thread.run_sync(connect) == 421
