"""A clamd client: the daemon's protocol over TCP or a unix socket, on Trio.

clamd (ClamAV's daemon) takes one command per connection. The ``z`` form ends
commands and replies with a NUL byte. What this client speaks::

    zPING\\0                 -> PONG\\0
    zSTATS\\0                -> a text block ending in END\\0 (see :func:`parse_stats`)
    zINSTREAM\\0 <chunks> <0> -> stream: OK\\0
                              stream: <signature> FOUND\\0
                              INSTREAM size limit exceeded. ERROR\\0
                              <anything else> ERROR\\0

An INSTREAM chunk is a 4-byte big-endian length, then that many bytes; a
zero-length chunk ends the stream. clamd stops reading at its
``StreamMaxLength`` and answers the size-limit error.

Every answer maps onto one typed result or error (httpx's style: backend errors
translated in one place):

====================================  =============================================
``stream: OK``                        :class:`ScanResult` clean
``stream: <sig> FOUND``               :class:`ScanResult` infected, ``signature``
``INSTREAM size limit exceeded``      :class:`ScanSizeLimit` (a PermanentProviderError:
                                      the blob is too big for this clamd, never clean)
other ``... ERROR``, unparsable       :class:`ScanError` (permanent: never clean)
connection refused / reset / EOF      :class:`ClamdUnavailable` (transient)
no answer within the timeout          :class:`ClamdTimeout` (transient)
====================================  =============================================

Nothing here retries: the scanner pool decides (a transient failure is retried,
a permanent one counts against the attachment's attempts). Timeouts come from
the caller (``[scanner]``): ``connect_timeout_s`` bounds the connection,
``timeout_s`` the whole command once connected.

Addresses: ``tcp://host:port`` or ``unix:///path/to/clamd.ctl``
(:func:`parse_address`).
"""

from __future__ import annotations

import contextlib
import re
import struct
from collections.abc import AsyncIterable
from typing import Final
from urllib.parse import urlsplit

import msgspec
import trio

from engine.errors import (
    PermanentProviderError,
    ProviderTimeout,
    ProviderUnavailable,
)

__all__ = [
    "ClamdAddress",
    "ClamdClient",
    "ClamdStats",
    "ClamdTimeout",
    "ClamdUnavailable",
    "ScanError",
    "ScanResult",
    "ScanSizeLimit",
    "parse_address",
    "parse_scan_reply",
    "parse_stats",
]

_END: Final = b"\0"
_MAX_REPLY: Final = 1 << 20  # a STATS block is a few hundred bytes; never hold more than this


class ClamdUnavailable(ProviderUnavailable):
    """clamd refused or dropped the connection."""


class ClamdTimeout(ProviderTimeout):
    """clamd did not answer in time."""


class ScanError(PermanentProviderError):
    """clamd answered an error (or nonsense) for a scan: the blob is not known clean."""

    def __init__(self, message: str, *, reply: str = "") -> None:
        super().__init__(message)
        self.reply = reply


class ScanSizeLimit(ScanError):
    """clamd's ``StreamMaxLength`` is below the blob: ``INSTREAM size limit exceeded``."""


class ClamdAddress(msgspec.Struct, frozen=True, kw_only=True):
    """Where clamd listens: a TCP ``host``/``port``, or a unix socket ``path``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    def __str__(self) -> str:
        return f"unix://{self.path}" if self.path is not None else f"tcp://{self.host}:{self.port}"


def parse_address(text: str) -> ClamdAddress:
    """``tcp://127.0.0.1:3310`` or ``unix:///run/clamav/clamd.ctl``; ``ValueError`` otherwise."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"clamd address {text!r} is not a URL: {exc}") from exc
    if parts.scheme == "unix":
        if not parts.path or parts.netloc:
            raise ValueError(f"clamd address {text!r}: write unix:///absolute/path")
        return ClamdAddress(path=parts.path)
    if parts.scheme == "tcp":
        if not parts.hostname or port is None:
            raise ValueError(f"clamd address {text!r}: write tcp://host:port")
        return ClamdAddress(host=parts.hostname, port=port)
    raise ValueError(f"clamd address {text!r}: the scheme must be tcp:// or unix://")


class ScanResult(msgspec.Struct, frozen=True, kw_only=True):
    """A finished scan: ``infected`` with clamd's ``signature``, or clean."""

    infected: bool
    signature: str | None = None


class ClamdStats(msgspec.Struct, frozen=True, kw_only=True):
    """The numbers of ``STATS``: queued requests and the thread pool."""

    queue: int
    threads_live: int
    threads_idle: int
    threads_max: int


_FOUND = re.compile(r"^stream: (?P<sig>.+) FOUND$")
_QUEUE = re.compile(r"^QUEUE: (?P<n>\d+) items?\b", re.MULTILINE)
_THREADS = re.compile(
    r"^THREADS: live (?P<live>\d+)\s+idle (?P<idle>\d+)\s+max (?P<max>\d+)", re.MULTILINE
)


def parse_scan_reply(reply: str) -> ScanResult:
    """The result in an INSTREAM reply (NUL stripped); a typed :class:`ScanError` otherwise."""
    text = reply.strip()
    if text == "stream: OK":
        return ScanResult(infected=False)
    found = _FOUND.match(text)
    if found is not None:
        return ScanResult(infected=True, signature=found["sig"])
    if text == "INSTREAM size limit exceeded. ERROR":
        raise ScanSizeLimit("clamd refused the stream: its StreamMaxLength is smaller", reply=text)
    if text.endswith("ERROR"):
        raise ScanError(f"clamd answered an error: {text[:200]!r}", reply=text)
    raise ScanError(f"clamd answered something else than a scan result: {text[:200]!r}", reply=text)


def parse_stats(reply: str) -> ClamdStats:
    """``QUEUE: N items`` and ``THREADS: live N  idle N max N`` of a STATS reply."""
    queue = _QUEUE.search(reply)
    threads = _THREADS.search(reply)
    if queue is None or threads is None:
        raise ScanError(f"clamd STATS without QUEUE/THREADS lines: {reply[:200]!r}", reply=reply)
    return ClamdStats(
        queue=int(queue["n"]),
        threads_live=int(threads["live"]),
        threads_idle=int(threads["idle"]),
        threads_max=int(threads["max"]),
    )


class ClamdClient:
    """Speaks to one clamd. Every number comes from the caller (``[scanner]``).

    ``connect_timeout_s`` bounds opening the connection, ``timeout_s`` a scan after
    that (sending every chunk and reading the verdict), ``command_timeout_s`` a PING
    or STATS (default: ``timeout_s``); ``chunk_bytes`` is the most sent in one
    INSTREAM chunk.
    """

    def __init__(
        self,
        address: ClamdAddress,
        *,
        connect_timeout_s: float,
        timeout_s: float,
        chunk_bytes: int,
        command_timeout_s: float | None = None,
    ) -> None:
        command = timeout_s if command_timeout_s is None else command_timeout_s
        if not (connect_timeout_s > 0 and timeout_s > 0 and command > 0 and chunk_bytes >= 1):
            raise ValueError("clamd timeouts must be > 0 and chunk_bytes >= 1")
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self.command_timeout_s = command
        self.chunk_bytes = chunk_bytes

    def __repr__(self) -> str:
        return f"<ClamdClient {self.address}>"

    async def _connect(self) -> trio.abc.Stream:
        address = self.address
        try:
            with trio.fail_after(self.connect_timeout_s):
                if address.path is not None:
                    return await trio.open_unix_socket(address.path)
                assert address.host is not None and address.port is not None
                return await trio.open_tcp_stream(address.host, address.port)
        except trio.TooSlowError as exc:
            raise ClamdTimeout(f"clamd at {address}: no connection within "
                               f"{self.connect_timeout_s}s") from exc  # fmt: skip
        except OSError as exc:
            raise ClamdUnavailable(f"clamd at {address}: {exc}") from exc

    async def _command(self, command: bytes, chunks: AsyncIterable[bytes] | None = None) -> str:
        stream = await self._connect()
        try:
            with trio.fail_after(self.command_timeout_s):
                await stream.send_all(b"z" + command + _END)
                if chunks is not None:
                    await self._send_chunks(stream, chunks)
                return await _read_reply(stream, self.address)
        except trio.TooSlowError as exc:
            raise ClamdTimeout(
                f"clamd at {self.address}: no answer to {command.decode()} within"
                f" {self.command_timeout_s}s"
            ) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ClamdUnavailable(
                f"clamd at {self.address} dropped the connection during {command.decode()}: {exc}"
            ) from exc
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _send_chunks(self, stream: trio.abc.Stream, chunks: AsyncIterable[bytes]) -> None:
        size = self.chunk_bytes
        async for data in chunks:
            for start in range(0, len(data), size):
                piece = data[start : start + size]
                await stream.send_all(struct.pack(">I", len(piece)) + piece)
        await stream.send_all(struct.pack(">I", 0))

    async def ping(self) -> None:
        """``PING``: returns when clamd answers ``PONG``; a typed error otherwise."""
        reply = await self._command(b"PING")
        if reply.strip() != "PONG":
            raise ScanError(f"clamd answered {reply[:100]!r} to PING", reply=reply)

    async def stats(self) -> ClamdStats:
        """``STATS``: clamd's queue and threads."""
        return parse_stats(await self._command(b"STATS"))

    async def scan(self, chunks: AsyncIterable[bytes]) -> ScanResult:
        """``INSTREAM`` the bytes of ``chunks`` and return the verdict (see the table above).

        clamd may answer (the size-limit error) and close before every chunk is
        sent: the answer is still read and mapped, never taken for a dropped line.
        """
        stream = await self._connect()
        try:
            with trio.fail_after(self.timeout_s):
                await stream.send_all(b"zINSTREAM" + _END)
                # clamd may stop reading (its size limit): its answer then says why.
                with contextlib.suppress(trio.BrokenResourceError, OSError):
                    await self._send_chunks(stream, chunks)
                reply = await _read_reply(stream, self.address)
        except trio.TooSlowError as exc:
            raise ClamdTimeout(
                f"clamd at {self.address}: no verdict within {self.timeout_s}s"
            ) from exc
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ClamdUnavailable(
                f"clamd at {self.address} dropped the connection during a scan: {exc}"
            ) from exc
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()
        return parse_scan_reply(reply)


async def _read_reply(stream: trio.abc.Stream, address: ClamdAddress) -> str:
    """Bytes up to the terminating NUL (or EOF after some bytes), as text."""
    received = bytearray()
    while _END not in received:
        chunk = await stream.receive_some(65536)
        if not chunk:
            if received:
                break
            raise ClamdUnavailable(f"clamd at {address} closed the connection without an answer")
        received += chunk
        if len(received) > _MAX_REPLY:
            raise ScanError(f"clamd at {address}: an answer over {_MAX_REPLY} bytes")
    return bytes(received).split(_END, 1)[0].decode("utf-8", errors="replace")
