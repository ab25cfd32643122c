"""A loopback SMTP server that fails on demand and bounces what it is told to.

::

    emulator = SmtpEmulator(bounce_url=intake_url, bounce_secret="s3cret")
    async with serve_smtp_emulator(emulator) as emulator:   # 127.0.0.1, a free port
        adapter = SmtpAdapter("smtp", host="127.0.0.1", port=emulator.port, ...)
        emulator.fail_rcpt("gone@example.org")             # 550 5.1.1 at RCPT
        emulator.bounce("full@example.org", hard=False)    # a "delayed" DSN later
        await emulator.go_down(); await emulator.come_up()  # same port

The server speaks RFC 5321 on Trio: ``EHLO``/``HELO``, ``AUTH PLAIN`` (when built
with credentials), ``MAIL``, ``RCPT``, ``DATA`` (dot-unstuffing, ``SIZE``), ``RSET``,
``NOOP``, ``VRFY``, ``QUIT``; one transaction after another on one connection.

**Counting.** Every message taken (250 to the final ``.``) is counted in
``accepted`` by its ``X-Idempotency-Key`` header (a key counted twice is a
duplicate, :meth:`SmtpEmulator.duplicates`), kept in ``received`` in order and in
``messages`` by its ``X-Triage-Ref``.

**Faults** (:class:`SmtpFaultPlan`, replaced whole by ``set_faults`` or changed by
the helpers): ``latency_s`` before every reply; ``tempfail`` — a 4xx reply at a
stage (421 at the greeting closes the connection); ``rcpt_failures`` — a fixed
reply to ``RCPT TO`` for given recipients (:meth:`SmtpEmulator.fail_rcpt`);
``refuse_ehlo`` (502, so the client falls back to ``HELO``); ``hang_after_data`` —
the message is taken and counted, the reply never comes (the ambiguous case);
``drop_at`` — the connection is reset at a stage (at ``end_of_data`` the message
is taken first, then the connection reset).

**Bounces.** :meth:`SmtpEmulator.bounce` names recipients (or a fraction of all
messages) whose later messages bounce. For each such message the emulator builds
an RFC 3464 delivery status notification (:func:`build_dsn`) and, after
``bounce_delay_s``, POSTs it to ``bounce_url`` as ``Content-Type: message/rfc822``
with ``X-Triage-Signature: hex(HMAC-SHA256(bounce_secret, body))``. While
``paused`` they are held (in a bounded queue), not dropped.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.policy
import email.utils
import hashlib
import hmac
import logging
import re
import socket
import struct
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Annotated, Any, Literal

import httpx
import msgspec
import trio

from engine.clock import Chance, Clock
from providers.http_transport import Http1Transport

__all__ = [
    "BounceRule",
    "ReceivedMail",
    "SmtpEmulator",
    "SmtpFaultPlan",
    "Stage",
    "build_dsn",
    "serve_smtp_emulator",
]

Stage = Literal["connect", "mail", "rcpt", "data", "end_of_data"]
"""Where a fault strikes: the greeting, ``MAIL``, ``RCPT``, ``DATA``, the final ``.``."""

log = logging.getLogger("triage.emulators.smtp")

_PATH = re.compile(r"^(MAIL FROM|RCPT TO):\s*<([^<>]*)>\s*(.*)$", re.IGNORECASE)
_PARSER = BytesParser(policy=email.policy.default)


class SmtpFaultPlan(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the emulator does to the SMTP sessions it serves (mutable)."""

    latency_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    tempfail: Annotated[int, msgspec.Meta(ge=400, le=499)] | None = None
    tempfail_stage: Stage = "mail"
    tempfail_text: str = "4.3.0 Temporary failure, try again later"
    rcpt_failures: dict[str, str] = msgspec.field(default_factory=dict)  # recipient → reply
    refuse_ehlo: bool = False
    hang_after_data: bool = False
    drop_at: Stage | None = None


@dataclass(frozen=True)
class BounceRule:
    """Messages to ``recipients`` (all messages, when ``None``) bounce with chance
    ``fraction``: hard (``failed``, 5.x.x) or soft (``delayed``, 4.x.x)."""

    recipients: frozenset[str] | None
    fraction: float
    action: str
    status: str
    diagnostic: str


@dataclass(frozen=True)
class ReceivedMail:
    """One message the emulator took."""

    queue_id: str
    mail_from: str
    rcpt_to: tuple[str, ...]
    raw: bytes  # as received, dot-unstuffed, CRLF line endings
    message: EmailMessage
    reference: str | None  # X-Triage-Ref
    idempotency_key: str | None  # X-Idempotency-Key
    received_at: float  # wall clock (Unix time)

    @property
    def header_block(self) -> bytes:
        """The original header section, for a DSN's ``text/rfc822-headers`` part."""
        end = self.raw.find(b"\r\n\r\n")
        return self.raw if end < 0 else self.raw[: end + 2]


def build_dsn(
    mail: ReceivedMail,
    recipient: str,
    *,
    reporting_mta: str,
    action: str,
    status: str,
    diagnostic: str,
    date: float,
) -> bytes:
    """An RFC 3464 delivery status notification for ``recipient`` of ``mail``.

    ``multipart/report; report-type=delivery-status`` with three parts: a human
    explanation, ``message/delivery-status`` (per-message fields, then the
    recipient's ``Final-Recipient``/``Action``/``Status``/``Diagnostic-Code``), and
    ``text/rfc822-headers`` — the original headers, ``X-Triage-Ref`` among them.
    """
    boundary = f"=_dsn_{mail.queue_id}_{hashlib.sha256(recipient.encode()).hexdigest()[:12]}"
    when = email.utils.formatdate(date, usegmt=True)
    arrived = email.utils.formatdate(mail.received_at, usegmt=True)
    delayed = action == "delayed"
    subject = (
        "Delivery Status Notification (Delay)" if delayed else "Undelivered Mail Returned to Sender"
    )
    explanation = (
        f"Delivery to <{recipient}> is delayed; the server will keep trying.\r\n"
        if delayed
        else f"Your message could not be delivered to <{recipient}>.\r\n"
    )
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{mail.mail_from}>",
        f"Subject: {subject}",
        f"Date: {when}",
        f"Message-ID: <dsn.{mail.queue_id}.{boundary[-12:]}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        explanation.rstrip("\r\n"),
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
        f"X-Queue-ID: {mail.queue_id}",
        f"Arrival-Date: {arrived}",
        "",
        f"Final-Recipient: rfc822; {recipient}",
        f"Original-Recipient: rfc822; {recipient}",
        f"Action: {action}",
        f"Status: {status}",
        f"Diagnostic-Code: smtp; {diagnostic}",
        f"Last-Attempt-Date: {when}",
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    head = "\r\n".join(lines).encode("ascii") + b"\r\n"
    return head + mail.header_block + f"\r\n--{boundary}--\r\n".encode("ascii")


class _Drop(Exception):
    """Reset the connection now (a fault, or a client that broke the protocol)."""


class _Gone(Exception):
    """The client went away."""


class _Lines:
    def __init__(self, stream: trio.SocketStream, max_line_bytes: int) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._max = max_line_bytes

    async def line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end]).rstrip(b"\r")
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > self._max:
                raise _Drop(f"line longer than {self._max} bytes")
            try:
                chunk = await self._stream.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise _Gone() from exc
            if not chunk:
                raise _Gone()
            self._buffer += chunk


class SmtpEmulator:
    """An SMTP server to test against; serve it with :func:`serve_smtp_emulator`.

    ``username``/``password``: require ``AUTH PLAIN`` before ``MAIL``. ``clock`` stamps
    wall-clock dates; ``chance`` draws the bounce fraction (seedable).
    """

    def __init__(
        self,
        *,
        hostname: str = "smtp-emulator.test",
        username: str | None = None,
        password: str | None = None,
        bounce_url: str | None = None,
        bounce_secret: str | bytes = b"",
        bounce_delay_s: float = 0.0,
        bounce_queue: int = 10_000,
        bounce_workers: int = 4,
        max_message_bytes: int = 10 * 1024 * 1024,
        max_line_bytes: int = 8192,
        clock: Clock | None = None,
        chance: Chance | None = None,
    ) -> None:
        if bounce_delay_s < 0 or bounce_queue < 1 or bounce_workers < 1:
            raise ValueError("bounce_delay_s >= 0, bounce_queue >= 1, bounce_workers >= 1")
        self.hostname = hostname
        self.host = "127.0.0.1"
        self.port = 0
        self.bounce_url = bounce_url
        self.bounce_secret = (
            bounce_secret.encode() if isinstance(bounce_secret, str) else bounce_secret
        )
        self.bounce_delay_s = bounce_delay_s
        self.bounce_workers = bounce_workers
        self.max_message_bytes = max_message_bytes
        self.max_line_bytes = max_line_bytes
        if (username is None) != (password is None):
            raise ValueError("give the emulator both username and password, or neither")
        self._credentials = (
            (username, password) if username is not None and password is not None else None
        )
        self._clock = clock or Clock()
        self._chance = chance or Chance()
        self.faults = SmtpFaultPlan()
        self.bounce_rules: list[BounceRule] = []
        self.accepted: Counter[str] = Counter()
        self.received: list[ReceivedMail] = []
        self.messages: dict[str, ReceivedMail] = {}
        self.sessions = 0
        self.dsns: list[bytes] = []  # every DSN built, in order
        self.bounces_sent = 0
        self.bounce_statuses: Counter[int] = Counter()  # receiver's HTTP status; 0 = no answer
        self._paused = False
        self._resumed = trio.Event()
        self._seq = 0
        self._bounce_send, self._bounce_receive = trio.open_memory_channel[tuple[float, bytes]](
            bounce_queue
        )
        self._http: httpx.AsyncClient | None = None
        self._nursery: trio.Nursery | None = None
        self._scope: trio.CancelScope | None = None

    # -- serving --------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._scope is not None

    async def come_up(self) -> None:
        """Listen (again, on the same port once one was chosen); no-op when up."""
        if self._nursery is None:
            raise RuntimeError("serve the emulator with serve_smtp_emulator() first")
        if self._scope is None:
            self._scope = await self._nursery.start(self._listen)

    async def go_down(self) -> None:
        """Close the port and reset every open session: connects are refused."""
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None
            await trio.lowlevel.checkpoint()

    async def _listen(self, *, task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await sock.bind((self.host, self.port))
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        with trio.CancelScope() as scope:
            async with trio.SocketListener(sock) as listener, trio.open_nursery() as sessions:
                task_status.started(scope)
                await trio.serve_listeners(self._session, [listener], handler_nursery=sessions)

    # -- faults ---------------------------------------------------------------------

    def set_faults(self, **fields: Any) -> SmtpFaultPlan:
        """Replace the fault plan with one built from ``fields`` (validated)."""
        self.faults = msgspec.convert(fields, SmtpFaultPlan)
        return self.faults

    def clear_faults(self) -> None:
        self.faults = SmtpFaultPlan()

    def fail_rcpt(
        self, *recipients: str, code: int = 550, text: str = "5.1.1 User unknown"
    ) -> None:
        """Answer ``RCPT TO`` for these recipients with ``code text``."""
        for recipient in recipients:
            self.faults.rcpt_failures[recipient.lower()] = f"{code} {text}"

    def tempfail(
        self, code: int | None = 421, *, stage: Stage | None = None, text: str | None = None
    ) -> None:
        """A 4xx at ``stage`` (421: the greeting, else ``MAIL``); ``tempfail(None)`` ends it."""
        if code is not None and not 400 <= code <= 499:
            raise ValueError(f"tempfail needs a 4xx code, got {code}")
        self.faults.tempfail = code
        self.faults.tempfail_stage = stage or ("connect" if code == 421 else "mail")
        if text is not None:
            self.faults.tempfail_text = text

    # -- bounces --------------------------------------------------------------------

    def bounce(
        self,
        *recipients: str,
        fraction: float = 1.0,
        hard: bool = True,
        status: str | None = None,
        diagnostic: str | None = None,
    ) -> BounceRule:
        """Bounce later messages to ``recipients`` (every message when none are named)
        with chance ``fraction``: hard (``Action: failed``, default ``5.1.1``) or soft
        (``Action: delayed``, default ``4.2.2``)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be within [0, 1], got {fraction}")
        status = status or ("5.1.1" if hard else "4.2.2")
        if status[0] != ("5" if hard else "4"):
            raise ValueError(
                f"a {'hard' if hard else 'soft'} bounce needs a {'5' if hard else '4'}.x.x status, got {status}"
            )
        default = "550 5.1.1 User unknown" if hard else "452 4.2.2 Mailbox full"
        rule = BounceRule(
            recipients=frozenset(r.lower() for r in recipients) if recipients else None,
            fraction=fraction,
            action="failed" if hard else "delayed",
            status=status,
            diagnostic=diagnostic or default,
        )
        self.bounce_rules.append(rule)
        return rule

    def stop_bouncing(self) -> None:
        self.bounce_rules.clear()

    @property
    def paused(self) -> bool:
        """While true, DSNs are held (queued), not POSTed."""
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self._paused = value
        if not value:
            self._resumed.set()
            self._resumed = trio.Event()

    def dsn_for(self, mail: ReceivedMail, recipient: str, rule: BounceRule) -> bytes:
        return build_dsn(
            mail,
            recipient,
            reporting_mta=self.hostname,
            action=rule.action,
            status=rule.status,
            diagnostic=rule.diagnostic,
            date=self._clock.wall(),
        )

    def sign(self, body: bytes) -> str:
        return hmac.new(self.bounce_secret, body, hashlib.sha256).hexdigest()

    async def _queue_bounces(self, mail: ReceivedMail) -> None:
        for recipient in mail.rcpt_to:
            for rule in self.bounce_rules:
                if rule.recipients is not None and recipient.lower() not in rule.recipients:
                    continue
                if rule.fraction < 1.0 and self._chance.random() >= rule.fraction:
                    continue
                dsn = self.dsn_for(mail, recipient, rule)
                self.dsns.append(dsn)
                await self._bounce_send.send((trio.current_time() + self.bounce_delay_s, dsn))
                break

    async def _bounce_worker(self) -> None:
        async for due, dsn in self._bounce_receive:
            await trio.sleep_until(due)
            await self.post_bounce(dsn)

    async def post_bounce(self, dsn: bytes) -> int:
        """POST one DSN to ``bounce_url`` now (held while paused); the receiver's status."""
        while self._paused:
            await self._resumed.wait()
        if self._http is None or self.bounce_url is None:
            return 0
        headers = {"Content-Type": "message/rfc822", "X-Triage-Signature": self.sign(dsn)}
        try:
            answer = await self._http.post(self.bounce_url, content=dsn, headers=headers)
            status = answer.status_code
        except httpx.HTTPError:
            status = 0
        self.bounces_sent += 1
        self.bounce_statuses[status] += 1
        return status

    # -- counts ---------------------------------------------------------------------

    def duplicates(self) -> int:
        """Messages taken beyond the first for their idempotency key."""
        return sum(n - 1 for n in self.accepted.values() if n > 1)

    def stats(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "accepted": sum(self.accepted.values()),
            "keys": len(self.accepted),
            "duplicates": self.duplicates(),
            "messages": len(self.messages),
            "dsns": len(self.dsns),
            "bounces_sent": self.bounces_sent,
            "bounce_statuses": {str(k): v for k, v in self.bounce_statuses.items()},
            "faults": msgspec.to_builtins(self.faults),
        }

    # -- the protocol ---------------------------------------------------------------

    async def _session(self, stream: trio.SocketStream) -> None:
        self.sessions += 1
        try:
            await self._converse(stream, _Lines(stream, self.max_line_bytes))
        except _Drop:
            with contextlib.suppress(OSError):
                stream.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
        except (_Gone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:  # one bad session must not take the emulator down
            log.exception("smtp emulator: session failed; connection closed")
        finally:
            stream.socket.close()

    async def _reply(self, stream: trio.SocketStream, *lines: str) -> None:
        if self.faults.latency_s > 0:
            await trio.sleep(self.faults.latency_s)
        code, _, first = lines[0].partition(" ")
        texts = [first, *lines[1:]]
        out = [f"{code}-{text}" for text in texts[:-1]] + [f"{code} {texts[-1]}"]
        await stream.send_all("".join(f"{line}\r\n" for line in out).encode())
        if code == "421":
            raise _Gone()  # 421: the server closes the channel after saying so

    def _fault(self, stage: Stage) -> str | None:
        """The tempfail reply due at ``stage``, if any; raises :class:`_Drop` for ``drop_at``."""
        plan = self.faults
        if plan.drop_at == stage and stage != "end_of_data":
            raise _Drop(stage)
        if plan.tempfail is not None and plan.tempfail_stage == stage:
            return f"{plan.tempfail} {plan.tempfail_text}"
        return None

    async def _converse(self, stream: trio.SocketStream, lines: _Lines) -> None:
        refusal = self._fault("connect")
        if refusal is not None:
            await self._reply(stream, refusal)  # a 4xx greeting: nothing else is accepted
            while True:
                request = await lines.line()
                if request.upper() == b"QUIT":
                    await self._reply(stream, "221 2.0.0 Bye")
                    return
                await self._reply(stream, "503 5.5.1 Service not available")
        await self._reply(stream, f"220 {self.hostname} ESMTP Triage emulator")
        helo: str | None = None
        authed = self._credentials is None
        mail_from: str | None = None
        rcpts: list[str] = []
        while True:
            raw = await lines.line()
            line = raw.decode("utf-8", "replace")
            verb = line.split(" ", 1)[0].upper()
            match verb:
                case "EHLO" if self.faults.refuse_ehlo:
                    await self._reply(stream, "502 5.5.2 EHLO not implemented")
                case "EHLO" | "HELO":
                    helo = line[5:].strip() or None
                    if helo is None:
                        await self._reply(stream, f"501 5.5.4 {verb} needs a host name")
                        continue
                    mail_from, rcpts = None, []
                    if verb == "HELO":
                        await self._reply(stream, f"250 {self.hostname}")
                        continue
                    features = [f"SIZE {self.max_message_bytes}", "8BITMIME", "ENHANCEDSTATUSCODES"]
                    if self._credentials is not None:
                        features.insert(0, "AUTH PLAIN")
                    await self._reply(stream, f"250 {self.hostname} greets {helo}", *features)
                case "AUTH":
                    authed = await self._auth(stream, lines, line, authed)
                case "MAIL":
                    match_ = _PATH.match(line)
                    if helo is None:
                        await self._reply(stream, "503 5.5.1 Say EHLO first")
                    elif not authed:
                        await self._reply(stream, "530 5.7.0 Authentication required")
                    elif mail_from is not None:
                        await self._reply(stream, "503 5.5.1 Nested MAIL command")
                    elif match_ is None or match_.group(1).upper() != "MAIL FROM":
                        await self._reply(stream, "501 5.5.4 Syntax: MAIL FROM:<address>")
                    elif (refusal := self._fault("mail")) is not None:
                        await self._reply(stream, refusal)
                    else:
                        mail_from, rcpts = match_.group(2), []
                        await self._reply(stream, "250 2.1.0 Ok")
                case "RCPT":
                    match_ = _PATH.match(line)
                    if mail_from is None:
                        await self._reply(stream, "503 5.5.1 Need MAIL first")
                    elif (
                        match_ is None
                        or match_.group(1).upper() != "RCPT TO"
                        or not match_.group(2)
                    ):
                        await self._reply(stream, "501 5.5.4 Syntax: RCPT TO:<address>")
                    elif (refusal := self._fault("rcpt")) is not None:
                        await self._reply(stream, refusal)
                    elif (
                        failure := self.faults.rcpt_failures.get(match_.group(2).lower())
                    ) is not None:
                        await self._reply(stream, failure)
                    else:
                        rcpts.append(match_.group(2))
                        await self._reply(stream, "250 2.1.5 Ok")
                case "DATA":
                    if mail_from is None or not rcpts:
                        await self._reply(stream, "503 5.5.1 Need MAIL and RCPT first")
                    elif (refusal := self._fault("data")) is not None:
                        await self._reply(stream, refusal)
                    else:
                        await self._reply(stream, "354 End data with <CR><LF>.<CR><LF>")
                        await self._data(stream, lines, mail_from, tuple(rcpts))
                        mail_from, rcpts = None, []
                case "RSET":
                    mail_from, rcpts = None, []
                    await self._reply(stream, "250 2.0.0 Ok")
                case "NOOP":
                    await self._reply(stream, "250 2.0.0 Ok")
                case "VRFY":
                    await self._reply(stream, "252 2.5.2 Cannot VRFY user, but will accept message")
                case "QUIT":
                    await self._reply(stream, "221 2.0.0 Bye")
                    return
                case _:
                    await self._reply(stream, f"500 5.5.2 Command unrecognized: {verb[:20]!r}")

    async def _auth(
        self, stream: trio.SocketStream, lines: _Lines, line: str, authed: bool
    ) -> bool:
        parts = line.split()
        if self._credentials is None:
            await self._reply(stream, "503 5.5.1 AUTH not offered")
            return authed
        if authed:
            await self._reply(stream, "503 5.5.1 Already authenticated")
            return authed
        if len(parts) < 2 or parts[1].upper() != "PLAIN":
            await self._reply(stream, "504 5.5.4 Unrecognized authentication type")
            return False
        if len(parts) >= 3:
            token = parts[2]
        else:
            await self._reply(stream, "334 ")
            token = (await lines.line()).decode("ascii", "replace").strip()
        try:
            _authzid, user, password = base64.b64decode(token, validate=True).decode().split("\0")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            await self._reply(stream, "501 5.5.2 Cannot decode AUTH PLAIN response")
            return False
        if (user, password) == self._credentials:
            await self._reply(stream, "235 2.7.0 Authentication successful")
            return True
        await self._reply(stream, "535 5.7.8 Authentication credentials invalid")
        return False

    async def _data(
        self, stream: trio.SocketStream, lines: _Lines, mail_from: str, rcpts: tuple[str, ...]
    ) -> None:
        chunks: list[bytes] = []
        size = 0
        while True:
            line = await lines.line()
            if line == b".":
                break
            if line.startswith(b"."):
                line = line[1:]
            size += len(line) + 2
            if size <= self.max_message_bytes:
                chunks.append(line + b"\r\n")
        if size > self.max_message_bytes:
            await self._reply(stream, f"552 5.3.4 Message exceeds {self.max_message_bytes} bytes")
            return
        plan = self.faults
        if plan.tempfail is not None and plan.tempfail_stage == "end_of_data":
            await self._reply(stream, f"{plan.tempfail} {plan.tempfail_text}")
            return
        raw = b"".join(chunks)
        mail = self._take(raw, mail_from, rcpts)
        await self._queue_bounces(mail)
        if plan.drop_at == "end_of_data":
            raise _Drop("end_of_data")
        if plan.hang_after_data:
            while True:  # taken, never answered: wait (discarding) until the client leaves
                await lines.line()
        await self._reply(stream, f"250 2.0.0 Ok: queued as {mail.queue_id}")

    def _take(self, raw: bytes, mail_from: str, rcpts: tuple[str, ...]) -> ReceivedMail:
        self._seq += 1
        message = _PARSER.parsebytes(raw)
        assert isinstance(message, EmailMessage)  # policy.default builds EmailMessage
        reference = message.get("X-Triage-Ref")
        key = message.get("X-Idempotency-Key")
        mail = ReceivedMail(
            queue_id=f"{self._seq:010X}",
            mail_from=mail_from,
            rcpt_to=rcpts,
            raw=raw,
            message=message,
            reference=str(reference) if reference is not None else None,
            idempotency_key=str(key) if key is not None else None,
            received_at=self._clock.wall(),
        )
        self.accepted[mail.idempotency_key or ""] += 1
        self.received.append(mail)
        if mail.reference is not None:
            self.messages[mail.reference] = mail
        return mail


@contextlib.asynccontextmanager
async def serve_smtp_emulator(
    emulator: SmtpEmulator,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    bounce_timeout_s: float = 5.0,
) -> AsyncIterator[SmtpEmulator]:
    """Serve ``emulator`` on ``host:port`` (0: a free port) until the block exits.

    Yields the emulator, up (``.port``, ``.url``, ``go_down()``, ``come_up()``). DSNs
    are POSTed by an httpx client whose timeout is ``bounce_timeout_s``.
    """
    emulator.host = host
    emulator.port = port
    async with (
        httpx.AsyncClient(timeout=bounce_timeout_s, transport=Http1Transport()) as http,
        trio.open_nursery() as nursery,
    ):
        emulator._http = http
        emulator._nursery = nursery
        try:
            for _ in range(emulator.bounce_workers):
                nursery.start_soon(emulator._bounce_worker)
            await emulator.come_up()
            yield emulator
        finally:
            nursery.cancel_scope.cancel()
            emulator._http = None
            emulator._nursery = None
            emulator._scope = None
