"""An embedded clamd (Debian's ``clamav-daemon``), owned by this process, for the daemon and tests.

When no clamd address is configured (``[scanner] clamd_address``) and the
``clamd`` binary exists, the daemon starts its own, as it starts PostgreSQL and
NATS (:mod:`providers.embedded`)::

    with EmbeddedClamd(database=DIR) as clamd:   # config written, started, PING answered
        clamd.address                            # tcp://127.0.0.1:<port>
        clamd.stop(); clamd.start()              # same port, same address
        clamd.pause(); clamd.resume()            # SIGSTOP / SIGCONT: a hung scanner (chaos)

Its configuration file is written in its own directory: ``Foreground yes``,
``TCPSocket`` on a free loopback port, ``DatabaseDirectory`` the signature
directory given (there is no freshclam offline: the caller ships its
signatures, e.g. :func:`shipped_signatures`), plus ``MaxThreads``,
``MaxQueue`` and ``StreamMaxLength`` from the caller. Run as root, clamd is told
``User root`` is fine (it reads only our files).

Ready means: the process answers ``zPING`` with ``PONG``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from importlib import resources
from pathlib import Path
from typing import ClassVar

from providers.clamd import ClamdAddress
from providers.embedded import EmbeddedServer, EmbeddedServerError

__all__ = ["EmbeddedClamd", "find_clamd", "shipped_signatures"]

_LOOPBACK = "127.0.0.1"


def find_clamd() -> Path | None:
    """The machine's ``clamd`` (Debian: ``apt-get install clamav-daemon``), if any."""
    found = shutil.which("clamd") or (
        "/usr/sbin/clamd" if os.access("/usr/sbin/clamd", os.X_OK) else None
    )
    return Path(found) if found else None


def shipped_signatures() -> Path:
    """The signature directory shipped with Triage (``providers/clamd_db``): the EICAR
    test file's hash, so an embedded clamd without the official database still
    knows the standard test virus."""
    return Path(str(resources.files("providers") / "clamd_db"))


class EmbeddedClamd(EmbeddedServer):
    """clamd on a loopback TCP port with the signatures of ``database``."""

    name: ClassVar[str] = "clamd"

    def __init__(
        self,
        *,
        database: Path,
        directory: Path | None = None,
        port: int | None = None,
        max_threads: int = 4,
        max_queue: int = 100,
        stream_max_bytes: int = 25 * 1024 * 1024,
        local_socket: Path | None = None,
        start_timeout_s: float = 60.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        binary = find_clamd()
        if binary is None:
            raise EmbeddedServerError(
                "clamd not found on PATH or in /usr/sbin (Debian: apt-get install clamav-daemon)"
            )
        self._binary = binary
        self.database = Path(database)
        if not any(self.database.glob("*.[hn]db")) and not any(self.database.glob("*.c[vl]d")):
            raise EmbeddedServerError(
                f"no clamd signature file (*.hdb, *.ndb, *.cvd) in {database}"
            )
        self.max_threads = max_threads
        self.max_queue = max_queue
        self.stream_max_bytes = stream_max_bytes
        self.local_socket = local_socket
        super().__init__(
            directory=directory,
            port=port,
            start_timeout_s=start_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )

    @property
    def url(self) -> str:
        return f"tcp://{_LOOPBACK}:{self.port}"

    @property
    def address(self) -> ClamdAddress:
        return ClamdAddress(host=_LOOPBACK, port=self.port)

    @property
    def config_path(self) -> Path:
        return self.directory / "clamd.conf"

    def _prepare(self) -> None:
        lines = [
            "Foreground yes",
            f"DatabaseDirectory {self.database}",
            f"TCPSocket {self.port}",
            f"TCPAddr {_LOOPBACK}",
            f"LogFile {self.directory / 'clamd-internal.log'}",
            f"PidFile {self.directory / 'clamd.pid'}",
            f"TemporaryDirectory {self.directory}",
            f"MaxThreads {self.max_threads}",
            f"MaxQueue {self.max_queue}",
            f"StreamMaxLength {self.stream_max_bytes}",
            "SelfCheck 0",
            "Bytecode no",
        ]
        if self.local_socket is not None:  # LocalSocket as well as the TCP port
            lines.append(f"LocalSocket {self.local_socket}")
        if os.geteuid() == 0:
            lines.append("User root")
        self.config_path.write_text("\n".join(lines) + "\n")

    def _spawn(self) -> str | None:
        self._prepare()  # the port may have moved since the last attempt
        return super()._spawn()

    def _command(self) -> list[str]:
        return [str(self._binary), "--config-file", str(self.config_path)]

    def _is_ready(self) -> bool:
        try:
            with socket.create_connection((_LOOPBACK, self.port), timeout=0.25) as sock:
                sock.sendall(b"zPING\0")
                return sock.recv(64).startswith(b"PONG")
        except OSError:
            return False

    def pause(self) -> None:
        """SIGSTOP: clamd hangs (accepts connections, answers nothing)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        pid = self.pid
        if pid is None:
            raise EmbeddedServerError("embedded clamd is not running")
        os.kill(pid, sig)

    def _terminate(self, sig: signal.Signals) -> None:
        pid = self.pid
        if pid is not None:  # a paused clamd would not see SIGTERM
            os.kill(pid, signal.SIGCONT)
        super()._terminate(sig)
