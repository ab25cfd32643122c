"""The email adapter: one message per SMTP transaction, spoken on a Trio TCP stream.

::

    adapter = SmtpAdapter("smtp", host=..., port=587, sender="noreply@clinic.example",
                          helo_name="triage.clinic.example", timeout_s=10.0)
    accepted = await adapter.send(message)   # Accepted(provider_ref=<queue id>)

The exchange (RFC 5321): greeting → ``EHLO`` (``HELO`` when EHLO is refused) →
``AUTH PLAIN`` when credentials are configured → ``MAIL FROM`` → ``RCPT TO`` →
``DATA`` → the message, dot-stuffed, CRLF line endings → ``.`` → ``QUIT``. One
connection per send; no pipelining, no STARTTLS (the relay is reached over a
trusted network or a TLS-terminating sidecar).

The message is built with the stdlib :mod:`email` package: ``From``, ``To``,
``Subject``, ``Date``, ``Message-ID: <client_ref@helo_name>``, and three headers
a bounce brings back (RFC 3464 returns the original headers):
``X-Triage-Ref`` (the wire reference ``tenant:client_ref``),
``X-Triage-Category`` and ``X-Idempotency-Key``.

Error mapping (see :mod:`providers.channel`). The only ambiguous moment in SMTP
is the one after the final ``.`` went out and before its reply came back: the
server may have queued the message. Every reply, even a negative one, is
definite.

==============================================  ==============================
what happened                                   raised
==============================================  ==============================
connection refused / reset, 421, any 4xx, a     ``ProviderUnavailable``
timeout or drop before the final ``.``
timeout or drop after the final ``.``           ``ProviderTimeout`` (ambiguous)
535 / 530 / 534 / 538, or credentials given     ``AuthFailed``
but ``AUTH PLAIN`` not offered
5xx naming a dead mailbox (5.1.1, 5.1.2,        :class:`~providers.channel.RecipientGone`
5.1.6, 5.1.10, 5.2.1, "user unknown")
any other 5xx                                   ``Rejected``
250 to the final ``.``                          ``Accepted`` — ``provider_ref`` is
                                                the queue id in the reply, else
                                                the Message-ID
==============================================  ==============================

``timeout_s`` bounds the whole exchange (connect to the reply to ``.``); the
``QUIT`` afterwards gets what is left of it and can no longer change the outcome.
"""

from __future__ import annotations

import base64
import contextlib
import email.policy
import email.utils
import re
from email.message import EmailMessage

import trio

from engine.clock import Clock
from engine.errors import (
    AuthFailed,
    ConfigError,
    ProviderTimeout,
    ProviderUnavailable,
    Rejected,
)
from providers.channel import (
    Accepted,
    ChannelName,
    Message,
    RecipientGone,
    StatusAnswer,
)

__all__ = ["Reply", "SmtpAdapter", "build_message", "dot_stuff", "queue_id"]

# 7bit transfer encodings only: the relay need not offer 8BITMIME.
_POLICY = email.policy.SMTP.clone(cte_type="7bit")

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})\b")
_GONE_STATUS = frozenset({"5.1.1", "5.1.2", "5.1.6", "5.1.10", "5.2.1"})
_GONE_TEXT = re.compile(
    r"user unknown|unknown user|no such (user|mailbox|recipient)|mailbox (not found|unavailable)"
    r"|does not exist|recipient (address )?rejected",
    re.IGNORECASE,
)
_QUEUE_ID = (
    re.compile(r"queued as ([A-Za-z0-9][\w.\-]*)"),
    re.compile(r"\bid=([A-Za-z0-9][\w.\-]*)"),
    re.compile(r"^(?:ok|queued)[:\s]+([A-Za-z0-9][\w.\-]{5,})$", re.IGNORECASE),
    re.compile(r"^([A-Za-z0-9]{8,}) Message accepted", re.IGNORECASE),
)
_ADDRESS = re.compile(r"^[^\s<>@\"]+@[^\s<>@\"]+$")


class Reply:
    """One SMTP reply: a three-digit code and its text lines (multi-line replies joined)."""

    __slots__ = ("code", "lines")

    def __init__(self, code: int, lines: list[str]) -> None:
        self.code = code
        self.lines = lines

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code at the start of the text (``5.1.1``), if any."""
        match = _ENHANCED.match(self.lines[0] if self.lines else "")
        return ".".join(match.groups()) if match else None

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class _Dropped(Exception):
    """The server closed the connection (or it broke) in the middle of the exchange."""


class _Wire:
    """CRLF lines and SMTP replies over a Trio stream."""

    def __init__(self, stream: trio.abc.Stream, max_line_bytes: int) -> None:
        self._stream = stream
        self._buffer = bytearray()
        self._max = max_line_bytes

    async def send(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise _Dropped(f"send failed: {exc!r}") from exc

    async def line(self) -> bytes:
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[:end]).rstrip(b"\r")
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > self._max:
                raise _Dropped(f"reply line longer than {self._max} bytes")
            try:
                chunk = await self._stream.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise _Dropped(f"receive failed: {exc!r}") from exc
            if not chunk:
                raise _Dropped("connection closed by the server")
            self._buffer += chunk

    async def reply(self) -> Reply:
        """Read one reply: ``250-first``, ``250-more``, ``250 last`` is one reply."""
        lines: list[str] = []
        code: int | None = None
        while True:
            raw = (await self.line()).decode("utf-8", "replace")
            if len(raw) < 3 or not raw[:3].isdigit() or (len(raw) > 3 and raw[3] not in " -"):
                raise _Dropped(f"not an SMTP reply line: {raw[:80]!r}")
            this = int(raw[:3])
            if code is not None and this != code:
                raise _Dropped(f"reply code changed inside a multi-line reply: {raw[:80]!r}")
            code = this
            lines.append(raw[4:])
            if len(raw) == 3 or raw[3] == " ":
                return Reply(code, lines)


def dot_stuff(data: bytes) -> bytes:
    """``data`` ready to follow ``DATA``: CRLF line endings, a ``.`` doubled at the start of
    every line that begins with one, ending in CRLF (the terminator ``.CRLF`` not included)."""
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def queue_id(reply: Reply) -> str | None:
    """The server's queue id in a 250 reply to the final ``.``, when it names one
    (Postfix ``queued as X``, Exim ``id=X``, ``Ok X``, Sendmail ``X Message accepted``)."""
    text = reply.text.strip()
    if reply.enhanced:
        text = text.split(None, 1)[1] if " " in text else ""
    for pattern in _QUEUE_ID:
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


def build_message(message: Message, *, sender: str, helo_name: str, date: float) -> EmailMessage:
    """The RFC 5322 message for ``message``; ``Rejected`` when a header value is unusable."""
    mail = EmailMessage(policy=_POLICY)
    try:
        mail["From"] = sender
        mail["To"] = message.recipient
        mail["Subject"] = message.subject or ""
        mail["Date"] = email.utils.formatdate(date, usegmt=True)
        mail["Message-ID"] = f"<{message.client_ref}@{helo_name}>"
        mail["X-Triage-Ref"] = message.reference
        mail["X-Triage-Category"] = message.category
        mail["X-Idempotency-Key"] = message.idempotency_key
        mail.set_content(message.body)
    except (ValueError, TypeError) as exc:
        raise Rejected(f"message {message.client_ref!r} cannot be encoded: {exc}") from exc
    return mail


def _check_address(address: str, what: str) -> None:
    if not address.isascii() or not _ADDRESS.match(address):
        raise Rejected(f"{what} {address[:80]!r} is not a plain ASCII mail address")


def _failure(reply: Reply, stage: str, recipient: str) -> Exception:
    """The error for a negative ``reply`` to ``stage``; every reply is definite."""
    detail = f"SMTP {stage}: {reply}"
    if reply.code in (530, 534, 535, 538) or (stage == "AUTH" and reply.code >= 500):
        return AuthFailed(detail)
    if 400 <= reply.code < 500:
        return ProviderUnavailable(detail)
    if stage in ("RCPT", "end of DATA") and (
        reply.enhanced in _GONE_STATUS
        or (reply.code in (550, 551, 553) and _GONE_TEXT.search(reply.text))
    ):
        return RecipientGone(recipient, str(reply))
    return Rejected(detail)


class SmtpAdapter:
    """An SMTP relay as a :class:`~providers.channel.Adapter` (module docstring for the map)."""

    channel = ChannelName.EMAIL

    def __init__(
        self,
        name: str,
        *,
        host: str,
        port: int,
        sender: str,
        helo_name: str,
        timeout_s: float,
        username: str | None = None,
        password: str | None = None,
        max_line_bytes: int = 8192,
        clock: Clock | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ConfigError(f"smtp adapter {name!r}: timeout_s must be > 0, got {timeout_s}")
        if (username is None) != (password is None):
            raise ConfigError(f"smtp adapter {name!r}: give both username and password, or neither")
        if not sender.isascii() or not _ADDRESS.match(sender):
            raise ConfigError(f"smtp adapter {name!r}: sender {sender!r} is not a mail address")
        if not helo_name or any(c.isspace() for c in helo_name):
            raise ConfigError(f"smtp adapter {name!r}: helo_name {helo_name!r} is not a host name")
        self.name = name
        self.host = host
        self.port = port
        self.sender = sender
        self.helo_name = helo_name
        self.timeout_s = timeout_s
        self._credentials = (
            (username, password) if username is not None and password is not None else None
        )
        self._max_line_bytes = max_line_bytes
        self._clock = clock or Clock()

    async def send(self, message: Message) -> Accepted:
        _check_address(message.recipient, "recipient")
        mail = build_message(
            message, sender=self.sender, helo_name=self.helo_name, date=self._clock.wall()
        )
        data = dot_stuff(mail.as_bytes(policy=_POLICY))
        message_id = f"<{message.client_ref}@{self.helo_name}>"
        deadline = trio.current_time() + self.timeout_s
        try:
            with trio.fail_after(self.timeout_s):
                stream = await trio.open_tcp_stream(self.host, self.port)
        except (OSError, trio.TooSlowError) as exc:
            why = (
                f"no connection within {self.timeout_s}s"
                if isinstance(exc, trio.TooSlowError)
                else exc
            )
            raise ProviderUnavailable(f"SMTP {self.host}:{self.port} unreachable: {why}") from exc
        async with stream:
            wire = _Wire(stream, self._max_line_bytes)
            final_dot_sent = False
            try:
                with trio.fail_after(max(deadline - trio.current_time(), 0.0)):
                    await self._transaction(wire, message.recipient, data)
                    # From here on the server may queue the message without our hearing it.
                    final_dot_sent = True
                    await wire.send(b".\r\n")
                    reply = await wire.reply()
            except (_Dropped, trio.TooSlowError) as exc:
                what = "no reply in time" if isinstance(exc, trio.TooSlowError) else str(exc)
                if final_dot_sent:
                    raise ProviderTimeout(
                        f"SMTP {self.host}:{self.port}: {what} after the message was sent;"
                        " it may have been queued"
                    ) from exc
                raise ProviderUnavailable(
                    f"SMTP {self.host}:{self.port}: {what} before the message was sent"
                ) from exc
            if reply.code != 250:
                raise _failure(reply, "end of DATA", message.recipient)
            with trio.move_on_after(max(deadline - trio.current_time(), 0.0)):
                await self._quit(wire)
        return Accepted(provider=self.name, provider_ref=queue_id(reply) or message_id)

    async def _command(self, wire: _Wire, line: str) -> Reply:
        await wire.send(line.encode("ascii") + b"\r\n")
        return await wire.reply()

    async def _transaction(self, wire: _Wire, recipient: str, data: bytes) -> None:
        """Everything up to (not including) the final ``.``; raises on any negative reply."""
        greeting = await wire.reply()
        if greeting.code != 220:
            # 554 at the greeting refuses the service, not this message: fail over.
            raise ProviderUnavailable(f"SMTP greeting: {greeting}")
        ehlo = await self._command(wire, f"EHLO {self.helo_name}")
        extensions: dict[str, str] = {}
        if ehlo.code == 250:
            for line in ehlo.lines[1:]:
                keyword, _, params = line.partition(" ")
                extensions[keyword.upper()] = params.upper()
        elif 500 <= ehlo.code < 600:
            helo = await self._command(wire, f"HELO {self.helo_name}")
            if helo.code != 250:
                raise _failure(helo, "HELO", recipient)
        else:
            raise _failure(ehlo, "EHLO", recipient)
        if self._credentials is not None:
            if "PLAIN" not in extensions.get("AUTH", "").split():
                raise AuthFailed(
                    f"SMTP {self.host}:{self.port} does not offer AUTH PLAIN"
                    f" (AUTH {extensions.get('AUTH', 'absent')})"
                )
            username, password = self._credentials
            token = base64.b64encode(f"\0{username}\0{password}".encode()).decode("ascii")
            auth = await self._command(wire, f"AUTH PLAIN {token}")
            if auth.code != 235:
                raise _failure(auth, "AUTH", recipient)
        for line, stage, expected in (
            (f"MAIL FROM:<{self.sender}>", "MAIL", 250),
            (f"RCPT TO:<{recipient}>", "RCPT", 250),
            ("DATA", "DATA", 354),
        ):
            reply = await self._command(wire, line)
            if reply.code != expected and not (stage == "RCPT" and reply.code == 251):
                raise _failure(reply, stage, recipient)
        await wire.send(data)

    async def _quit(self, wire: _Wire) -> None:
        # The message is already accepted; a rude goodbye changes nothing.
        with contextlib.suppress(_Dropped):
            await self._command(wire, "QUIT")

    async def status(self, message: Message) -> StatusAnswer | None:
        """SMTP has no status query: ``None``. Bounces arrive through :mod:`providers.bounces`."""
        return None

    async def aclose(self) -> None:
        """Nothing to close: each send owns its connection."""
