"""Bounce intake: DSNs the SMTP emulator generates and POSTs, parsed back into hard and
soft receipts; the JSON bounce event; signatures; and every refusal, typed and named.

The bounce webhook receiver here is a minimal HTTP/1.1 server on loopback that does what
the DLR ingress does with a bounce: verify, parse, answer 200 / 401 / 400.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser

import pytest
import trio

from engine.clock import Chance
from engine.errors import ConfigError
from providers.bounces import (
    SIGNATURE_HEADER,
    bounce_parser,
    parse_bounce,
    parse_bounce_event,
    parse_dsn,
    sign,
    verify_signature,
)
from providers.channel import ChannelName, DeliveryState, Message, Receipt
from providers.emulators.smtp import ReceivedMail, SmtpEmulator, build_dsn, serve_smtp_emulator
from providers.receipts import BadSignature, MalformedReceipt, ReceiptError
from providers.smtp import SmtpAdapter

SECRET = "bounce-s3cret"
WAIT_S = 5.0  # generous bound on a loopback POST arriving; never a speed assertion


@dataclass
class Intake:
    """A bounce webhook on loopback: verifies and parses what the emulator POSTs."""

    secret: str
    url: str = ""
    bodies: list[bytes] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    async def handle(self, stream: trio.SocketStream) -> None:
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = await stream.receive_some()
            if not chunk:
                return
            buffer += chunk
        head, _, body = buffer.partition(b"\r\n\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (
                line.partition(":") for line in head.decode("latin-1").split("\r\n")[1:]
            )
        }
        while len(body) < int(headers.get("content-length", "0")):
            body += await stream.receive_some()
        self.bodies.append(body)
        self.content_types.append(headers.get("content-type", ""))
        try:
            self.receipts += parse_bounce(
                body,
                content_type=headers.get("content-type"),
                signature=headers.get(SIGNATURE_HEADER.lower()),
                secret=self.secret,
            )
            status = 200
        except BadSignature:
            status = 401
        except MalformedReceipt:
            status = 400
        self.statuses.append(status)
        await stream.send_all(
            f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        await stream.aclose()


@pytest.fixture
async def intake() -> AsyncIterator[Intake]:
    receiver = Intake(SECRET)
    async with trio.open_nursery() as nursery:
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        receiver.url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}/bounces/smtp"
        nursery.start_soon(trio.serve_listeners, receiver.handle, [listener])
        yield receiver
        nursery.cancel_scope.cancel()


async def wait_until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(WAIT_S):
        while not predicate():  # noqa: ASYNC110  # counts fed by network I/O, not an event
            await trio.sleep(0.005)


def message(n: int, recipient: str) -> Message:
    return Message(
        client_ref=f"dispatch-{n}",
        tenant_id="tenant-a",
        idempotency_key=f"key-{n}",
        channel=ChannelName.EMAIL,
        recipient=recipient,
        body="See you tomorrow.",
        subject="Reminder",
        category="reminders",
    )


def adapter(port: int) -> SmtpAdapter:
    return SmtpAdapter(
        "smtp",
        host="127.0.0.1",
        port=port,
        sender="noreply@clinic.example",
        helo_name="triage.clinic.example",
        timeout_s=WAIT_S,
    )


# -- end to end: adapter → emulator → DSN POST → verify → parse ------------------


async def test_hard_bounce_round_trip(intake: Intake) -> None:
    emulator = SmtpEmulator(bounce_url=intake.url, bounce_secret=SECRET)
    async with serve_smtp_emulator(emulator):
        emulator.bounce("gone@example.org")
        smtp = adapter(emulator.port)
        bounced = await smtp.send(message(1, "gone@example.org"))
        await smtp.send(message(2, "fine@example.org"))
        await wait_until(lambda: len(intake.statuses) == 1)

    assert intake.statuses == [200]
    assert intake.content_types == ["message/rfc822"]
    assert len(emulator.dsns) == 1  # the message to fine@ did not bounce
    assert emulator.accepted == {"key-1": 1, "key-2": 1}  # a bounce is still an acceptance
    [receipt] = intake.receipts
    assert receipt.state is DeliveryState.UNDELIVERABLE
    assert receipt.permanent is True
    assert (receipt.tenant_id, receipt.client_ref, receipt.category) == (
        "tenant-a",
        "dispatch-1",
        "reminders",
    )
    assert receipt.provider_ref == bounced.provider_ref  # the queue id the adapter was given
    assert receipt.reason is not None and receipt.reason.startswith("5.1.1 ")
    # The DSN really is RFC 3464: check its structure with the stdlib parser too.
    dsn = BytesParser(policy=policy.default).parsebytes(intake.bodies[0])
    assert isinstance(dsn, EmailMessage)
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    kinds = [part.get_content_type() for part in dsn.iter_parts()]
    assert kinds == ["text/plain", "message/delivery-status", "text/rfc822-headers"]


async def test_soft_bounce_round_trip(intake: Intake) -> None:
    emulator = SmtpEmulator(bounce_url=intake.url, bounce_secret=SECRET)
    async with serve_smtp_emulator(emulator):
        emulator.bounce("full@example.org", hard=False)
        await adapter(emulator.port).send(message(1, "full@example.org"))
        await wait_until(lambda: len(intake.statuses) == 1)

    [receipt] = intake.receipts
    assert receipt.state is DeliveryState.FAILED
    assert receipt.permanent is False
    assert receipt.client_ref == "dispatch-1"
    assert receipt.reason is not None and "4.2.2" in receipt.reason


async def test_a_fraction_bounces_and_each_dsn_names_its_message(intake: Intake) -> None:
    emulator = SmtpEmulator(bounce_url=intake.url, bounce_secret=SECRET, chance=Chance(7))
    async with serve_smtp_emulator(emulator):
        emulator.bounce(fraction=0.5)
        smtp = adapter(emulator.port)
        for n in range(20):
            await smtp.send(message(n, f"p{n}@example.org"))
        await wait_until(lambda: len(intake.statuses) == len(emulator.dsns))

    assert 0 < len(emulator.dsns) < 20
    assert set(intake.statuses) == {200}
    bounced = {r.client_ref for r in intake.receipts}
    assert len(bounced) == len(emulator.dsns)
    assert bounced <= {f"dispatch-{n}" for n in range(20)}


async def test_paused_holds_bounces_and_resuming_sends_them(intake: Intake) -> None:
    emulator = SmtpEmulator(bounce_url=intake.url, bounce_secret=SECRET)
    async with serve_smtp_emulator(emulator):
        emulator.bounce("gone@example.org")
        emulator.paused = True
        await adapter(emulator.port).send(message(1, "gone@example.org"))
        assert len(emulator.dsns) == 1
        await trio.sleep(0.1)  # time for a POST, were one to be made
        assert intake.bodies == []
        assert emulator.bounces_sent == 0
        emulator.paused = False
        await wait_until(lambda: emulator.bounces_sent == 1)  # after the intake answered
    assert emulator.bounce_statuses == {200: 1}


async def test_bounce_waits_bounce_delay_s(intake: Intake) -> None:
    delay_s = 0.2
    emulator = SmtpEmulator(bounce_url=intake.url, bounce_secret=SECRET, bounce_delay_s=delay_s)
    async with serve_smtp_emulator(emulator):
        emulator.bounce("gone@example.org")
        start = trio.current_time()
        await adapter(emulator.port).send(message(1, "gone@example.org"))
        await wait_until(lambda: len(intake.statuses) == 1)
        assert trio.current_time() - start >= delay_s


async def test_a_wrongly_signed_bounce_is_refused_by_the_intake(intake: Intake) -> None:
    emulator = SmtpEmulator(bounce_url=intake.url, bounce_secret="not-the-secret")
    async with serve_smtp_emulator(emulator):
        emulator.bounce("gone@example.org")
        await adapter(emulator.port).send(message(1, "gone@example.org"))
        await wait_until(lambda: emulator.bounces_sent == 1)  # after the intake answered
    assert intake.statuses == [401]
    assert intake.receipts == []
    assert emulator.bounce_statuses == {401: 1}


# -- signatures --------------------------------------------------------------------


def test_signature_good_bad_and_missing() -> None:
    body = b"a bounce body"
    good = sign(body, SECRET)
    verify_signature(body, good, SECRET)
    verify_signature(body, f"  {good.upper()} ", SECRET)  # hex case and padding do not matter
    with pytest.raises(BadSignature, match="does not match"):
        verify_signature(body + b"!", good, SECRET)
    with pytest.raises(BadSignature, match="does not match"):
        verify_signature(body, sign(body, "other"), SECRET)
    with pytest.raises(BadSignature, match="does not match"):
        verify_signature(body, "zz-not-hex-\u00e9", SECRET)
    for missing in (None, "", "   "):
        with pytest.raises(BadSignature, match=f"missing {SIGNATURE_HEADER}"):
            verify_signature(body, missing, SECRET)
    with pytest.raises(ConfigError, match="secret is empty"):
        verify_signature(body, good, "")


def test_signature_is_checked_before_the_body_is_read() -> None:
    garbage = b"\x00\xffnot a bounce"
    with pytest.raises(BadSignature):
        parse_bounce(garbage, content_type="application/json", signature="00", secret=SECRET)
    with pytest.raises(MalformedReceipt, match="not JSON"):
        parse_bounce(
            garbage, content_type="application/json", signature=sign(garbage, SECRET), secret=SECRET
        )
    with pytest.raises(MalformedReceipt, match="unsupported Content-Type"):
        parse_bounce(
            garbage, content_type="text/html", signature=sign(garbage, SECRET), secret=SECRET
        )


def test_bounce_parser_for_the_ingress_reads_headers_in_any_case() -> None:
    parse = bounce_parser(SECRET, provider="mailer")
    body = b'{"type": "bounce", "bounce_type": "hard", "recipient": "a@b", "reference": "t:d"}'
    headers = {"content-type": "application/json", "x-triage-signature": sign(body, SECRET)}
    [receipt] = parse("http://ingress/bounces/mailer", headers, body)
    assert (receipt.provider, receipt.client_ref) == ("mailer", "d")
    with pytest.raises(BadSignature, match="missing"):
        parse("http://ingress/bounces/mailer", {"Content-Type": "application/json"}, body)
    with pytest.raises(ConfigError, match="secret is empty"):
        bounce_parser("")


# -- DSN parsing ------------------------------------------------------------------


def received(headers: bytes) -> ReceivedMail:
    raw = headers + b"\r\nbody\r\n"
    parsed = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(parsed, EmailMessage)
    return ReceivedMail(
        queue_id="00000000A1",
        mail_from="noreply@clinic.example",
        rcpt_to=("x@example.org",),
        raw=raw,
        message=parsed,
        reference=None,
        idempotency_key="k",
        received_at=1_764_000_000.0,
    )


ORIGINAL = (
    b"From: noreply@clinic.example\r\nX-Triage-Ref: tenant-b:dispatch-9\r\nX-Idempotency-Key: k\r\n"
)


@pytest.mark.parametrize(
    ("action", "status", "state", "permanent"),
    [
        ("failed", "5.1.1", DeliveryState.UNDELIVERABLE, True),
        ("failed", "5.2.1", DeliveryState.UNDELIVERABLE, True),
        ("failed", "4.4.7", DeliveryState.FAILED, False),
        ("delayed", "4.2.2", DeliveryState.FAILED, False),
        ("delivered", "2.0.0", DeliveryState.DELIVERED, False),
        ("relayed", "2.0.0", DeliveryState.ACCEPTED, False),
    ],
)
def test_dsn_classification(
    action: str, status: str, state: DeliveryState, permanent: bool
) -> None:
    dsn = build_dsn(
        received(ORIGINAL),
        "x@example.org",
        reporting_mta="mx.test",
        action=action,
        status=status,
        diagnostic=f"{status} diagnostic",
        date=1_764_000_060.0,
    )
    [receipt] = parse_dsn(dsn, provider="relay")
    assert receipt == Receipt(
        provider="relay",
        state=state,
        permanent=permanent,
        provider_ref="00000000A1",
        client_ref="dispatch-9",
        tenant_id="tenant-b",
        category=None,
        reason=f"{status} smtp; {status} diagnostic",
        occurred_at=1_764_000_060.0,
    )


# A DSN in another MTA's shape, written for this test: the whole original returned as
# message/rfc822, a folded Diagnostic-Code, two recipients (one hard, one soft).
FOREIGN_DSN = b"""\
From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r
Subject: Undelivered Mail Returned to Sender\r
Date: Wed, 26 Nov 2025 10:00:00 +0100\r
MIME-Version: 1.0\r
Content-Type: multipart/report; report-type="delivery-status";\r
\tboundary="XYZ.1/mx"\r
\r
--XYZ.1/mx\r
Content-Description: Notification\r
Content-Type: text/plain\r
\r
I'm sorry to have to inform you...\r
\r
--XYZ.1/mx\r
Content-Description: Delivery report\r
Content-Type: message/delivery-status\r
\r
Reporting-MTA: dns; mx.example.net\r
X-Postfix-Queue-ID: 4Fz3Y2kQ9\r
Arrival-Date: Wed, 26 Nov 2025 09:59:58 +0100\r
\r
Final-Recipient: rfc822; gone@example.org\r
Action: failed\r
Status: 5.1.1 (bad destination mailbox address)\r
Diagnostic-Code: smtp; 550 5.1.1 <gone@example.org>: Recipient address\r
    rejected: User unknown in local recipient table\r
\r
Final-Recipient: rfc822; full@example.org\r
Action: delayed\r
Status: 4.2.2\r
Will-Retry-Until: Thu, 27 Nov 2025 10:00:00 +0100\r
\r
--XYZ.1/mx\r
Content-Description: Undelivered Message\r
Content-Type: message/rfc822\r
\r
From: noreply@clinic.example\r
X-Triage-Ref: tenant-c:dispatch-42\r
X-Triage-Category: results\r
Subject: Your results\r
\r
The body comes back too.\r
\r
--XYZ.1/mx--\r
"""


def test_a_foreign_dsn_with_two_recipients() -> None:
    hard, soft = parse_dsn(FOREIGN_DSN)
    assert (hard.state, hard.permanent) == (DeliveryState.UNDELIVERABLE, True)
    assert (soft.state, soft.permanent) == (DeliveryState.FAILED, False)
    for receipt in (hard, soft):
        assert (receipt.tenant_id, receipt.client_ref) == ("tenant-c", "dispatch-42")
        assert receipt.category == "results"
        assert receipt.provider_ref == "4Fz3Y2kQ9"
    assert hard.reason == (
        "5.1.1 smtp; 550 5.1.1 <gone@example.org>: Recipient address rejected:"
        " User unknown in local recipient table"
    )
    assert soft.occurred_at == 1764147600.0  # no Last-Attempt-Date: the DSN's Date


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        (b"", "empty body"),
        (b"\x00\xff\xfe garbage \x80", "not a delivery status notification"),
        (
            b"Content-Type: multipart/report; report-type=disposition-notification; boundary=b\r\n\r\n",
            "report-type disposition-notification",
        ),
        (FOREIGN_DSN.replace(b"X-Triage-Ref", b"X-Other-Ref"), "no X-Triage-Ref"),
        (
            FOREIGN_DSN.replace(b"tenant-c:dispatch-42", b"dispatch-42"),
            "not a Triage message reference",
        ),
        (
            FOREIGN_DSN.replace(b"message/delivery-status", b"text/plain"),
            "no message/delivery-status part",
        ),
        (FOREIGN_DSN.replace(b"Action: failed", b"Action: exploded"), "Action 'exploded'"),
        (FOREIGN_DSN.replace(b"Status: 4.2.2", b"Status: soon"), "Status 'soon'"),
    ],
)
def test_bad_dsns_are_refused_by_name(raw: bytes, problem: str) -> None:
    with pytest.raises(MalformedReceipt, match=problem):
        parse_dsn(raw)


# -- the JSON bounce event ----------------------------------------------------------


def test_bounce_events_hard_and_soft() -> None:
    body = (
        b'[{"type": "bounce", "bounce_type": "hard", "recipient": "gone@example.org",'
        b' "reference": "tenant-a:dispatch-1", "diagnostic": "550 5.1.1 user unknown",'
        b' "timestamp": 1764331200.5, "category": "reminders", "provider_ref": "p-1", "extra": 1},'
        b' {"type": "bounce", "bounce_type": "soft", "recipient": "full@example.org",'
        b' "reference": "tenant-b:dispatch-2"}]'
    )
    hard, soft = parse_bounce_event(body, provider="mailer")
    assert hard == Receipt(
        provider="mailer",
        state=DeliveryState.UNDELIVERABLE,
        permanent=True,
        provider_ref="p-1",
        client_ref="dispatch-1",
        tenant_id="tenant-a",
        category="reminders",
        reason="hard bounce: 550 5.1.1 user unknown",
        occurred_at=1764331200.5,
    )
    assert (soft.state, soft.permanent, soft.tenant_id) == (DeliveryState.FAILED, False, "tenant-b")
    [single] = parse_bounce_event(body[1 : body.index(b"}") + 1])
    assert single.client_ref == "dispatch-1"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"garbage{", "not JSON"),
        (b"[]", "empty array"),
        (
            b'{"type": "complaint", "bounce_type": "hard", "recipient": "a@b", "reference": "t:d"}',
            r"\$\.type",
        ),
        (
            b'{"type": "bounce", "bounce_type": "maybe", "recipient": "a@b", "reference": "t:d"}',
            r"\$\.bounce_type",
        ),
        (b'{"type": "bounce", "recipient": "a@b", "reference": "t:d"}', "bounce_type"),
        (
            b'{"type": "bounce", "bounce_type": "hard", "recipient": "a@b", "reference": "nocolon"}',
            "reference",
        ),
        (
            b'{"type": "bounce", "bounce_type": "hard", "recipient": "a@b", "reference": "t:d", "timestamp": "soon"}',
            "timestamp",
        ),
    ],
)
def test_bad_bounce_events_are_refused_by_name(body: bytes, problem: str) -> None:
    with pytest.raises(MalformedReceipt, match=problem) as caught:
        parse_bounce_event(body)
    assert isinstance(caught.value, ReceiptError)
