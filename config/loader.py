"""Load and validate a Triage TOML file into a :class:`~config.schema.TriageConfig`.

Errors are collected, not thrown one at a time: every named profile is decoded
on its own, so one file with three bad profiles yields one :class:`ConfigError`
listing three problems, each as ``FILE:LINE: $.section.name.key: what is wrong``::

    default.toml:12: $.breakers.sms_primary.fail_max: expected int >= 1, got 0

msgspec reports dict keys as ``[...]``; decoding each entry separately lets the
path carry the real profile name. tomllib gives no positions, so the line is
found by scanning the text for the section header and the key (best effort; a
problem without a line is printed without one).
"""

from __future__ import annotations

import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec
import msgspec.inspect as mi

from config.schema import (
    AlertmanagerConfig,
    BouncesConfig,
    BreakerConfig,
    BulkheadConfig,
    ChannelsConfig,
    ClockConfig,
    DaemonConfig,
    DashboardConfig,
    DatabaseConfig,
    DetectorConfig,
    DispatchConfig,
    DlrConfig,
    EmulatorsConfig,
    ErasureConfig,
    FallbackConfig,
    GuardConfig,
    IdempotencyConfig,
    InboxConfig,
    JitsiConfig,
    MailboxConfig,
    PhiConfig,
    ProvidersConfig,
    PushFeedbackConfig,
    RateLimitConfig,
    RecorderConfig,
    RecordingsConfig,
    RelayConfig,
    RetryConfig,
    ScannerConfig,
    ServicesConfig,
    SingletonsConfig,
    SloConfig,
    SpoolConfig,
    StatusSweepConfig,
    SupervisorConfig,
    ThreadsConfig,
    TokensConfig,
    TriageConfig,
    UploadsConfig,
)

# The one ConfigError of the project is the engine's (the error tree is drawn once, in
# engine.errors); the loader raises it with the problems of a file.
from engine.errors import ConfigError, ConfigProblem

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "catalog_path",
    "load_config",
    "load_config_text",
    "located",
    "merge_tables",
    "source_files",
]

PathPart = str | int
PathParts = tuple[PathPart, ...]
S = TypeVar("S", bound=msgspec.Struct)

#: The dict sections of named profiles and the Struct each entry decodes to.
PROFILE_SECTIONS: Final[Mapping[str, type[msgspec.Struct]]] = {
    "mailboxes": MailboxConfig,
    "supervisors": SupervisorConfig,
    "breakers": BreakerConfig,
    "bulkheads": BulkheadConfig,
    "retries": RetryConfig,
    "rate_limits": RateLimitConfig,
    "guards": GuardConfig,
    "detectors": DetectorConfig,
}
#: The plain sections (one table each, every key optional) and their Structs.
_PLAIN_SECTIONS: Final[Mapping[str, type[msgspec.Struct]]] = {
    "services": ServicesConfig,
    "database": DatabaseConfig,
    "relay": RelayConfig,
    "idempotency": IdempotencyConfig,
    "inbox": InboxConfig,
    "spool": SpoolConfig,
    "emulators": EmulatorsConfig,
    "providers": ProvidersConfig,
    "channels": ChannelsConfig,
    "dispatch": DispatchConfig,
    "dlr": DlrConfig,
    "push_feedback": PushFeedbackConfig,
    "status_sweep": StatusSweepConfig,
    "bounces": BouncesConfig,
    "uploads": UploadsConfig,
    "scanner": ScannerConfig,
    "jitsi": JitsiConfig,
    "fallback": FallbackConfig,
    "slo": SloConfig,
    "alertmanager": AlertmanagerConfig,
    "dashboard": DashboardConfig,
    "recorder": RecorderConfig,
    "tokens": TokensConfig,
    "recordings": RecordingsConfig,
    "threads": ThreadsConfig,
    "clock": ClockConfig,
    "singletons": SingletonsConfig,
    "phi": PhiConfig,
    "erasure": ErasureConfig,
}
_TOP_LEVEL: Final = frozenset({"daemon", "catalog", *_PLAIN_SECTIONS, *PROFILE_SECTIONS})
#: Guard field -> the section its value must name.
_GUARD_REFERENCES: Final = {
    "breaker": "breakers",
    "bulkhead": "bulkheads",
    "retry": "retries",
    "rate_limit": "rate_limits",
}


@contextmanager
def located(source: str, path: str) -> Iterator[None]:
    """Re-raise a :class:`ConfigError` from the block (an engine constructor's, which
    knows no file) with its unplaced problems placed in ``source`` at ``path``."""
    try:
        yield
    except ConfigError as exc:
        raise exc.at(source, path) from exc


# -- paths ---------------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_MSGSPEC_PATH = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]|\[\.\.\.\]")


def render_path(parts: Iterable[PathPart]) -> str:
    """``("breakers", "sms", "fail_max")`` -> ``$.breakers.sms.fail_max``; ints as ``[i]``."""
    out = "$"
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.fullmatch(part):
            out += f".{part}"
        else:
            out += f"[{json.dumps(part)}]"
    return out


def _parse_msgspec_path(text: str) -> PathParts:
    parts: list[PathPart] = []
    for m in _MSGSPEC_PATH.finditer(text):
        if m.group(1) is not None:
            parts.append(m.group(1))
        elif m.group(2) is not None:
            parts.append(int(m.group(2)))
        else:
            parts.append("...")
    return tuple(parts)


def toml_repr(value: object) -> str:
    """A value as it would be written in TOML (for "got ..." in messages)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and not math.isfinite(value):
        return ("-" if value < 0 else "") + ("nan" if math.isnan(value) else "inf")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array" if value else "[]"
    return str(value)


_MISSING: Final = object()


def _value_at(value: object, parts: PathParts) -> object:
    for part in parts:
        if isinstance(value, dict) and isinstance(part, str):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            value = value[part]
        else:
            return _MISSING
    return value


# -- line numbers --------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\[\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY_PART = r"(?:[A-Za-z0-9_-]+|\"(?:[^\"\\]|\\.)*\"|'[^']*')"
_KEY_LINE = re.compile(rf"^\s*({_KEY_PART}(?:\s*\.\s*{_KEY_PART})*)\s*=")
_SPLIT_KEY = re.compile(r"[A-Za-z0-9_-]+|\"((?:[^\"\\]|\\.)*)\"|'([^']*)'")


def _split_dotted(key: str) -> tuple[str, ...]:
    parts: list[str] = []
    for m in _SPLIT_KEY.finditer(key):
        if m.group(1) is not None:
            parts.append(m.group(1))
        elif m.group(2) is not None:
            parts.append(m.group(2))
        else:
            parts.append(m.group(0))
    return tuple(parts)


class TomlLocator:
    """Best-effort map from TOML paths to 1-based line numbers, built by scanning the text.

    Knows ``[table]`` and ``[[array]]`` headers, dotted keys and multi-line
    strings; a key inside an inline table maps to the line of its table.
    """

    def __init__(self, text: str) -> None:
        self._lines: dict[PathParts, int] = {}
        array_index: dict[PathParts, int] = {}
        table: PathParts = ()
        in_string: str | None = None
        for lineno, line in enumerate(text.splitlines(), start=1):
            if in_string is not None:
                if line.count(in_string) % 2 == 1:
                    in_string = None
                continue
            header = _HEADER.match(line)
            if header is not None:
                names = _split_dotted(header.group(2))
                full: list[PathPart] = []
                for name in names:
                    full.append(name)
                    if tuple(full) in array_index and len(full) < len(names):
                        full.append(array_index[tuple(full)])
                table = tuple(full)
                if header.group(1) == "[[":
                    index = array_index.get(table, -1) + 1
                    array_index[table] = index
                    self._lines.setdefault(table, lineno)
                    table = (*table, index)
                self._lines.setdefault(table, lineno)
                continue
            key = _KEY_LINE.match(line)
            if key is not None:
                names = _split_dotted(key.group(1))
                for i in range(1, len(names) + 1):
                    self._lines.setdefault((*table, *names[:i]), lineno)
                rest = line[key.end() :]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2 == 1:
                        in_string = quote
                        break

    def line_of(self, parts: PathParts, *, exact: bool = False) -> int | None:
        """The line defining ``parts``, else (unless ``exact``) of its nearest parent."""
        for end in range(len(parts), 0, -1):
            line = self._lines.get(parts[:end])
            if line is not None:
                return line
            if exact:
                return None
        return None


# -- parsing and decoding ------------------------------------------------------------------

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def read_text(path: str | os.PathLike[str]) -> str:
    """The file's text, or a :class:`ConfigError` saying why it cannot be read."""
    source = os.fspath(path)
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path; bad UTF-8
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        problem = ConfigProblem(
            source=source, line=None, path="$", message=f"cannot read file: {reason}"
        )
        raise ConfigError([problem]) from exc


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """``tomllib.loads``; a syntax error becomes a :class:`ConfigError` with line and column."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        line = column = None
        m = _TOML_POSITION.search(message)
        if m is not None:
            line, column = int(m.group(1)), int(m.group(2))
            message = message[: m.start()]
        message = message[:1].lower() + message[1:]
        problem = ConfigProblem(
            source=source, line=line, column=column, path="$", message=f"malformed TOML: {message}"
        )
        raise ConfigError([problem]) from exc


def _unwrap(t: mi.Type) -> mi.Type:
    while True:
        if isinstance(t, mi.Metadata):
            t = t.type
        elif isinstance(t, mi.UnionType):
            options = [o for o in t.types if not isinstance(o, mi.NoneType)]
            if len(options) != 1:
                return t
            t = options[0]
        else:
            return t


def _type_at(struct: type[msgspec.Struct], parts: PathParts) -> mi.Type | None:
    t: mi.Type = mi.type_info(struct)
    for part in parts:
        t = _unwrap(t)
        if isinstance(part, str) and isinstance(t, mi.StructType):
            field = next((f for f in t.fields if f.encode_name == part), None)
            if field is None:
                return None
            t = field.type
        elif isinstance(part, int) and isinstance(t, mi.ListType | mi.VarTupleType):
            t = t.item_type
        else:
            return None
    return _unwrap(t)


_AT = re.compile(r"^(?P<text>.*?) - at `\$(?P<path>[^`]*)`$", re.DOTALL)
_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<name>[^`]+)`$")
_MISSING_FIELD = re.compile(r"^Object missing required field `(?P<name>[^`]+)`$")
_EXPECTED_GOT = re.compile(r"^Expected `(?P<want>[^`]+)`, got `(?P<got>[^`]+)`$")
_EXPECTED = re.compile(r"^Expected `(?P<want>[^`]+)`(?P<rest>.*)$")
_ENUM = re.compile(r"^Invalid enum value (?P<got>.+)$")
_POST_INIT = re.compile(
    r"^(?P<field>[a-z_][a-z0-9_]*)(?:\.(?P<key>[A-Za-z0-9_-]+))?(?:\[(?P<index>\d+)\])?"
    r": (?P<text>.+)$",
    re.DOTALL,
)


def explain(
    exc: msgspec.ValidationError, value: object, struct: type[msgspec.Struct]
) -> tuple[PathParts, str]:
    """Turn msgspec's message into (path inside ``value``, message for an SRE)."""
    text = str(exc)
    parts: PathParts = ()
    m = _AT.match(text)
    if m is not None:
        text, parts = m.group("text"), _parse_msgspec_path(m.group("path"))

    def got(at: PathParts, fallback: str) -> str:
        found = _value_at(value, at)
        return fallback if found is _MISSING else toml_repr(found)

    if (m := _UNKNOWN_FIELD.match(text)) is not None:
        return (*parts, m.group("name")), "unknown key"
    if (m := _MISSING_FIELD.match(text)) is not None:
        return (*parts, m.group("name")), "missing required key"
    if (m := _EXPECTED_GOT.match(text)) is not None:
        want = m.group("want")
        if want == "object":
            want = "a table"
        return parts, f"expected {want}, got {got(parts, m.group('got'))}"
    if (m := _EXPECTED.match(text)) is not None:
        return parts, f"expected {m.group('want')}{m.group('rest')}, got {got(parts, '?')}"
    if (m := _ENUM.match(text)) is not None:
        target = _type_at(struct, parts)
        if isinstance(target, mi.LiteralType):
            options = ", ".join(toml_repr(v) for v in target.values)
            return parts, f"expected one of {options}, got {got(parts, m.group('got'))}"
        return parts, f"invalid value {got(parts, m.group('got'))}"
    if (m := _POST_INIT.match(text)) is not None:
        field: PathParts = (*parts, m.group("field"))
        if m.group("key") is not None:  # a table's key: ``patterns.ssn: ...``
            field = (*field, m.group("key"))
        if m.group("index") is not None:
            field = (*field, int(m.group("index")))
        return field, f"{m.group('text')}, got {got(field, '?')}"
    return parts, text[:1].lower() + text[1:]


class Reporter:
    """Collects problems for one file; decodes values into Structs, recording failures."""

    def __init__(self, text: str, source: str, bases: Sequence[tuple[str, str]] = ()) -> None:
        self.source = source
        self.locator = TomlLocator(text)
        #: The files this one extends, nearest first, as (source, locator).
        self.bases = [(base_source, TomlLocator(base_text)) for base_text, base_source in bases]
        self.problems: list[ConfigProblem] = []
        #: Paths whose value is refused as such (:meth:`refuse`): no other problem there.
        self.refused: set[str] = set()

    def where(self, parts: PathParts) -> tuple[str, int | None]:
        """The file and line that wrote ``parts``: this file if it writes the key, else
        the nearest base that does, else this file at the key's nearest parent."""
        for source, locator in [(self.source, self.locator), *self.bases]:
            line = locator.line_of(parts, exact=True)
            if line is not None:
                return source, line
        return self.source, self.locator.line_of(parts)

    def add(self, parts: PathParts, message: str) -> None:
        """Record a problem at ``parts`` (its line found by the locator)."""
        source, line = self.where(parts)
        self.problems.append(
            ConfigProblem(source=source, line=line, path=render_path(parts), message=message)
        )

    def refuse(self, parts: PathParts, message: str) -> None:
        """Record that the value at ``parts`` is unusable whatever its key: the one
        problem reported there (a decode failing on the same value says no more)."""
        self.add(parts, message)
        self.refused.add(self.problems[-1].path)

    def attempt(
        self,
        value: object,
        struct: type[S],
        parts: PathParts,
        *,
        origin: Mapping[str, PathParts] | None = None,
    ) -> tuple[S | None, ConfigProblem | None, PathParts]:
        """Decode ``value`` as ``struct`` at ``parts``: (value, None, ()) or (None, problem, written).

        ``origin`` maps a top-level key of ``value`` to the path of the table
        where it was written, when that is somewhere else (an inherited profile
        value); ``written`` is that table for the failing key, else ``parts``.
        """
        try:
            return msgspec.convert(value, struct), None, ()
        except msgspec.ValidationError as exc:
            inner, message = explain(exc, value, struct)
            written = parts
            if origin is not None and inner and isinstance(inner[0], str):
                written = origin.get(inner[0], parts)
                if written != parts:
                    message += f" (inherited from [{'.'.join(map(str, written))}])"
            source, line = self.where((*written, *inner))
            problem = ConfigProblem(
                source=source, line=line, path=render_path((*parts, *inner)), message=message
            )
            return None, problem, written

    def decode(self, value: object, struct: type[S], parts: PathParts) -> S | None:
        """``value`` as ``struct``, or None after recording the problem at ``parts``."""
        decoded, problem, _ = self.attempt(value, struct, parts)
        if problem is not None:
            self.problems.append(problem)
        return decoded

    def raise_if_any(self) -> None:
        if self.problems:
            kept = [
                p for p in self.problems
                if p.path not in self.refused or p.message.startswith(_REFUSED)
            ]  # fmt: skip
            ordered = sorted(kept, key=lambda p: (p.line is None, p.line or 0))
            raise ConfigError(ordered)


#: How every message of :func:`refuse_unusable_values` starts.
_REFUSED: Final = "must "


def refuse_unusable_values(value: object, report: Reporter, parts: PathParts = ()) -> None:
    """Refuse, wherever they are, values no setting can use: a number that is not
    finite (``nan``, ``inf``: no threshold, window or timeout is infinite, and every
    comparison with ``nan`` is false) and a string with a NUL byte (no path, name or
    header can hold one; the OS refuses it in a path)."""
    if isinstance(value, dict):
        for key, item in value.items():
            refuse_unusable_values(item, report, (*parts, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            refuse_unusable_values(item, report, (*parts, index))
    elif isinstance(value, float) and not math.isfinite(value):
        report.refuse(parts, f"{_REFUSED}be a finite number, got {toml_repr(value)}")
    elif isinstance(value, str) and "\x00" in value:
        report.refuse(parts, f"{_REFUSED}not contain a NUL byte, got {toml_repr(value)}")


# -- profiles ------------------------------------------------------------------------------


class _Profiles:
    """Resolves ``base`` inheritance inside one dict section, on raw TOML tables."""

    def __init__(self, section: str, raw: dict[str, Any], report: Reporter) -> None:
        self.section = section
        self.raw = raw
        self.report = report
        self.resolved: dict[str, dict[str, Any]] = {}
        #: profile -> key -> name of the profile that wrote the key
        self.origin: dict[str, dict[str, str]] = {}
        self.failed: set[str] = set()
        self._reported_cycles: set[frozenset[str]] = set()

    def resolve(self, name: str, chain: tuple[str, ...] = ()) -> dict[str, Any] | None:
        if name in self.resolved:
            return self.resolved[name]
        if name in self.failed:
            return None
        entry = self.raw[name]
        parts = (self.section, name)
        if not isinstance(entry, dict):
            self.failed.add(name)
            self.report.add(parts, f"expected a table, got {toml_repr(entry)}")
            return None
        base = entry.get("base")
        if base is None:
            merged, origin = dict(entry), dict.fromkeys(entry, name)
        else:
            if not isinstance(base, str):
                self.failed.add(name)
                self.report.add((*parts, "base"), f"expected str, got {toml_repr(base)}")
                return None
            if base not in self.raw:
                self.failed.add(name)
                known = ", ".join(sorted(self.raw)) or "none"
                self.report.add(
                    (*parts, "base"),
                    f"unknown profile {toml_repr(base)} in [{self.section}] (defined: {known})",
                )
                return None
            if base == name or base in chain:
                loop = (*chain[chain.index(base) :], name, base) if base in chain else (name, name)
                self.failed.add(name)
                cycle = frozenset(loop)
                if cycle not in self._reported_cycles:
                    self._reported_cycles.add(cycle)
                    self.report.add((*parts, "base"), "inheritance cycle: " + " -> ".join(loop))
                return None
            parent = self.resolve(base, (*chain, name))
            if parent is None:
                # The base's own problem is already reported; do not repeat it here.
                self.failed.add(name)
                return None
            merged = {**parent, **entry}
            origin = {**self.origin[base], **dict.fromkeys(entry, name)}
        self.resolved[name] = merged
        self.origin[name] = origin
        return merged

    def decode(self, struct: type[S]) -> dict[str, S]:
        out: dict[str, S] = {}
        fields = {f.encode_name for f in msgspec.structs.fields(struct)}
        deferred: list[tuple[ConfigProblem, PathParts, PathParts]] = []
        for name in self.raw:
            merged = self.resolve(name)
            if merged is None:
                continue
            parts: PathParts = (self.section, name)
            # Unknown keys are reported here, all of them, and left out of the decode
            # so that it can still find a problem with a known key.
            unknown = [key for key in merged if key not in fields]
            for key in unknown:
                if self.origin[name][key] == name:
                    self.report.add((*parts, key), "unknown key")
            if unknown:
                self.failed.add(name)
                merged = {key: value for key, value in merged.items() if key in fields}
            origin = {key: (self.section, owner) for key, owner in self.origin[name].items()}
            decoded, problem, written = self.report.attempt(merged, struct, parts, origin=origin)
            if problem is not None:
                self.failed.add(name)
                deferred.append((problem, parts, written))
            elif decoded is not None and not unknown:
                out[name] = decoded
        for problem, entry, written in deferred:
            # A value inherited from a profile that failed itself is reported there only.
            if written == entry or written[-1] not in self.failed:
                self.report.problems.append(problem)
        return out


# -- the loader ----------------------------------------------------------------------------


#: The top-level key that makes a file an overlay on another (relative to its directory).
EXTENDS: Final = "extends"
#: How many files an overlay chain may stack (a cycle is refused before that).
_MAX_EXTENDS: Final = 8
#: The failure catalog of a config that names none (beside the config file).
_DEFAULT_CATALOG: Final = "failures.toml"


def merge_tables(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``overlay`` on ``base``: tables merge key by key, any other value replaces."""
    merged = dict(base)
    for key, value in overlay.items():
        below = merged.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            merged[key] = merge_tables(below, value)
        else:
            merged[key] = value
    return merged


def _layers(
    raw: dict[str, Any], source: str, directory: Path
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``raw`` merged onto the files it ``extends`` (nearest first), and their texts."""
    bases: list[tuple[str, str]] = []
    seen = [os.path.abspath(source)]
    merged = raw
    while EXTENDS in merged:
        name = merged.pop(EXTENDS)
        where = bases[-1][1] if bases else source
        if not isinstance(name, str) or not name:
            problem = ConfigProblem(
                source=where, line=None, path=f"$.{EXTENDS}",
                message=f"expected the path of the file to extend, got {toml_repr(name)}",
            )  # fmt: skip
            raise ConfigError([problem])
        path = directory / name
        if os.path.abspath(path) in seen or len(bases) >= _MAX_EXTENDS:
            chain = " -> ".join([*seen, os.path.abspath(path)])
            problem = ConfigProblem(
                source=where, line=None, path=f"$.{EXTENDS}", message=f"extends cycle: {chain}"
            )
            raise ConfigError([problem])
        seen.append(os.path.abspath(path))
        text = read_text(path)
        base = parse_toml(text, os.fspath(path))
        bases.append((text, os.fspath(path)))
        directory = path.parent
        merged = merge_tables(base, merged)  # the base's own `extends` is followed next
    return merged, bases


def load_config(path: str | os.PathLike[str]) -> TriageConfig:
    """Read, validate and decode a Triage TOML file. Raises :class:`ConfigError`."""
    return load_config_text(read_text(path), source=os.fspath(path))


def load_config_text(
    text: str, source: str = "<string>", *, directory: str | os.PathLike[str] | None = None
) -> TriageConfig:
    """Validate and decode TOML text; ``source`` names it in error messages.

    A file with a top-level ``extends = "default.toml"`` is an overlay: it holds
    only what differs from that file (resolved against ``directory``, default
    the directory of ``source``), merged onto it table by table before anything
    is validated; a problem is reported in the file that wrote the key.
    """
    raw, bases = _layers(
        parse_toml(text, source),
        source,
        Path(source).parent if directory is None else Path(directory),
    )
    report = Reporter(text, source, bases)
    refuse_unusable_values(raw, report)

    for key in raw:
        if key not in _TOP_LEVEL:
            report.add((key,), "unknown key")

    daemon: DaemonConfig | None = None
    if "daemon" not in raw:
        report.add(("daemon",), "missing required section [daemon]")
    else:
        daemon = report.decode(raw["daemon"], DaemonConfig, ("daemon",))
    plain = {
        name: report.decode(raw.get(name, {}), struct, (name,))
        for name, struct in _PLAIN_SECTIONS.items()
    }
    catalog = raw.get("catalog", _DEFAULT_CATALOG)
    if not isinstance(catalog, str) or not catalog:
        report.add(("catalog",), f"expected a non-empty str, got {toml_repr(catalog)}")

    sections: dict[str, dict[str, Any]] = {}
    for section, struct in PROFILE_SECTIONS.items():
        table = raw.get(section, {})
        if not isinstance(table, dict):
            report.add((section,), f"expected a table of named profiles, got {toml_repr(table)}")
            continue
        profiles = _Profiles(section, table, report)
        sections[section] = profiles.decode(struct)

    for name, guard in sections.get("guards", {}).items():
        for field, target in _GUARD_REFERENCES.items():
            ref = getattr(guard, field)
            defined = raw.get(target, {})
            if ref is not None and not (isinstance(defined, dict) and ref in defined):
                known = ", ".join(sorted(defined)) if isinstance(defined, dict) else ""
                report.add(
                    ("guards", name, field),
                    f"unknown {target} profile {toml_repr(ref)} (defined: {known or 'none'})",
                )

    report.raise_if_any()
    # No problems means every section decoded.
    assert daemon is not None and all(value is not None for value in plain.values())
    return TriageConfig(
        daemon=daemon,
        **plain,  # type: ignore[arg-type]  # each decoded to its own Struct above
        catalog=str(catalog),
        mailboxes=sections["mailboxes"],
        supervisors=sections["supervisors"],
        breakers=sections["breakers"],
        bulkheads=sections["bulkheads"],
        retries=sections["retries"],
        rate_limits=sections["rate_limits"],
        guards=sections["guards"],
        detectors=sections["detectors"],
    )


def catalog_path(config: TriageConfig, config_path: str | os.PathLike[str]) -> Path:
    """The failure catalog a config names, resolved against the config file's directory."""
    return Path(config_path).parent / config.catalog


def source_files(path: str | os.PathLike[str]) -> list[Path]:
    """Every file a load of the config at ``path`` reads: the file itself, each file it
    ``extends`` (nearest first), then the catalog it names (:func:`catalog_path`); what a
    watch for an edit must look at.

    The paths are joined as the loader joins them, never resolved: a symlink stays a
    symlink, so a reader of the file reads its current target (a Kubernetes ConfigMap
    swaps its ``..data`` link). Best effort, never raising: the chain stops at a file
    that cannot be read or parsed, or that closes a cycle (the load says why), and a
    ``catalog`` that is not a string counts as the default."""
    files = [Path(path)]
    seen = {os.path.abspath(path)}
    catalog: object = None
    while True:
        try:
            raw = tomllib.loads(files[-1].read_text(encoding="utf-8"))
        except (OSError, ValueError):  # unreadable, not UTF-8, or not TOML
            break
        if catalog is None:
            catalog = raw.get("catalog")  # the nearest file that writes it wins
        name = raw.get(EXTENDS)
        if not isinstance(name, str) or not name or len(files) > _MAX_EXTENDS:
            break
        base = files[-1].parent / name
        if os.path.abspath(base) in seen:
            break
        seen.add(os.path.abspath(base))
        files.append(base)
    named = catalog if isinstance(catalog, str) and catalog else _DEFAULT_CATALOG
    files.append(Path(path).parent / named)
    return files
