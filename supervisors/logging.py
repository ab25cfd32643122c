"""JSON-lines logging for the daemon: one object per line, on stderr by default.

Every line is one JSON object with, in this order::

    {"ts": 1767225600.123, "level": "info", "logger": "triage.daemon", "msg": "ready", ...}

``ts`` is seconds since the epoch read from the runtime's injectable wall clock
(the same function handed to :func:`engine.runtime.open_runtime`), so a test
that fixes the wall clock fixes the timestamps too. ``level`` is the lower-case
level name, as the config spells it. The record's extra fields
(``log.info("ready", extra={"port": 8080})``) follow as they are; values JSON
cannot hold are written as their ``str()``, NaN and infinities as ``null``
(msgspec's rule). An exception is written as ``exc`` (the formatted traceback,
newlines escaped), so one record is always exactly one line.

Writing is synchronous, as :mod:`logging` is: the daemon logs state changes,
not traffic, and stderr is a pipe read by the container runtime.

**Redaction at the source** (catalog row 11): given ``redact`` (the daemon passes
:meth:`actors.phi_rules.PhiRules.redact_value`), every entry -- message, extra
fields, traceback -- is redacted before it is encoded, so a PHI value never reaches
stderr or the file. **The file sink** (``[daemon] log_file``): the same lines are
appended to that file too, reopened when its inode changes (an outside rotation:
``logging.handlers.WatchedFileHandler``); the PII scanner reads it.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final, TextIO

import msgspec

__all__ = ["LEVELS", "JsonFormatter", "json_logging"]

#: The config's ``log_level`` words and the :mod:`logging` levels they stand for.
LEVELS: Final[dict[str, int]] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES: Final = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime", "taskName"}


def _encode_other(value: object) -> object:
    """msgspec's hook for values it cannot encode: their text."""
    return str(value)


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line (see the module docstring)."""

    def __init__(
        self, wall: Callable[[], float], redact: Callable[[Any], Any] | None = None
    ) -> None:
        super().__init__()
        self._wall = wall
        self._redact = redact
        self._encoder = msgspec.json.Encoder(enc_hook=_encode_other)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self._wall(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        if self._redact is not None:
            # Values JSON cannot hold become their text first, so that text is redacted too.
            entry = self._redact(msgspec.json.decode(self._encoder.encode(entry)))
        return self._encoder.encode(entry).decode()


#: Libraries whose per-request logging is held at warning.
QUIET_LIBRARIES = ("httpx", "httpcore", "hpack", "h2", "hypercorn.access")


@contextmanager
def json_logging(
    level: str,
    *,
    wall: Callable[[], float],
    stream: TextIO | None = None,
    log_file: str | None = None,
    redact: Callable[[Any], Any] | None = None,
) -> Iterator[logging.Handler]:
    """Send every log record at ``level`` or above to ``stream`` as JSON lines (and,
    with ``log_file``, to that file), each entry passed through ``redact`` first.

    Installs the handlers on the root logger for the duration of the block and
    restores the root logger's handlers and level afterwards. ``stream``
    defaults to ``sys.stderr`` as it is when the block is entered. Yields the
    stream's handler.
    """
    try:
        threshold = LEVELS[level]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; known: {', '.join(LEVELS)}") from None
    formatter = JsonFormatter(wall, redact)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter)
    handlers: list[logging.Handler] = [handler]
    if log_file is not None:
        file_handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(formatter)
        handlers.append(file_handler)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers = handlers
    root.setLevel(threshold)
    # The HTTP client libraries log every request at info/debug: one line per SMS
    # is noise at any level we run at. Their warnings still come through.
    quiet = [logging.getLogger(name) for name in QUIET_LIBRARIES]
    saved_quiet = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(max(threshold, logging.WARNING))
    try:
        yield handler
    finally:
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        for logger, saved in zip(quiet, saved_quiet, strict=True):
            logger.setLevel(saved)
        for installed in handlers:
            installed.close()
