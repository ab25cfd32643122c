"""What the daemon needs of a decoded config beyond its schema, checked before anything starts.

The schema (:mod:`config.schema`) refuses a value on its own; these checks need
more than one section, or the machine the daemon runs on:

* :func:`reference_problems`: the profiles the plain sections name (each vendor's
  ``guard``, ``[dlr] rate_limit``) exist; a reference between profiles (a guard's
  breaker...) is the loader's;
* :func:`nats_problems`: the relay's and the inbox's streams are two streams
  JetStream can have side by side (distinct names, subjects that no one subject
  matches twice: :func:`config.nats_names.overlaps`), the DLQ subject is not
  captured by the inbox, and the dispatch command subject by no stream (a stream
  would answer the commands' requests); row 15's erasure purges the relay's stream
  and reads the inbox's and the DLQ's whole (``[erasure] scan_streams``);
* :func:`path_problems`: the spool's file can be created (no file where a
  directory must be, not a directory itself) and every key file that is set can be
  read;
* :func:`host_problems`: the addresses the daemon binds resolve.

Each returns :class:`~engine.errors.ConfigProblem` lists in ``source`` with the TOML
path of the value (and no line: the decoded config has none).
``supervisors.tree.check_config`` runs them all (``triage check-config`` and
``triage run``, before any service starts).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from pathlib import Path

import msgspec

from config.nats_names import name_problem, overlaps, subject_list
from config.schema import ProvidersConfig, TriageConfig
from engine.errors import ConfigProblem

__all__ = [
    "host_problems",
    "nats_problems",
    "path_problems",
    "problem",
    "reference_problems",
    "references",
]

#: The vendors of ``[providers]``, each with a ``guard``.
#: The vendor sections of ``[providers]`` (each names its guard); ``[providers.http]`` is
#: the HTTP client's settings, not a vendor.
VENDORS = tuple(
    field.name
    for field in msgspec.structs.fields(ProvidersConfig)
    if hasattr(field.type, "__struct_fields__") and "guard" in field.type.__struct_fields__
)


def problem(source: str, path: str, message: str) -> ConfigProblem:
    """A problem of a loaded config: in ``source`` at ``path``, its line left to be found."""
    return ConfigProblem(source=source, line=None, path=path, message=message)


def _known(names: Iterable[str]) -> str:
    return ", ".join(sorted(names)) or "none"


def references(config: TriageConfig) -> list[tuple[str, str, str]]:
    """Every profile a plain section names: ``(TOML path, section, profile name)``."""
    refs = [
        (f"$.providers.{vendor}.guard", "guards", getattr(config.providers, vendor).guard)
        for vendor in VENDORS
    ]
    refs.append(("$.dlr.rate_limit", "rate_limits", config.dlr.rate_limit))
    refs.append(("$.recordings.retry", "retries", config.recordings.retry))
    return refs


def reference_problems(config: TriageConfig, source: str) -> list[ConfigProblem]:
    """A plain section naming a profile that does not exist, at the name."""
    return [
        problem(
            source,
            path,
            f"unknown {section} profile {name!r} (defined: {_known(getattr(config, section))})",
        )
        for path, section, name in references(config)
        if name not in getattr(config, section)
    ]


def nats_problems(config: TriageConfig, source: str, *, dlq_stream: str) -> list[ConfigProblem]:
    """The relay's and the inbox's JetStream settings side by side (module docstring).

    ``dlq_stream`` is the name the relay gives its DLQ stream. Each section's own
    names and subjects are valid already (the schema's).
    """
    relay, inbox, dispatch = config.relay, config.inbox, config.dispatch
    problems: list[ConfigProblem] = []
    long_name = name_problem(dlq_stream)
    if long_name is not None:
        problems.append(
            problem(source, "$.relay.stream", f"its DLQ stream {dlq_stream!r} {long_name}")
        )
    if inbox.stream in (relay.stream, dlq_stream):
        problems.append(
            problem(
                source, "$.inbox.stream",
                f"{inbox.stream!r} is the relay's stream (or its DLQ's): the inbox needs a "
                "stream of its own, or it consumes the relay's events",
            )
        )  # fmt: skip
    relay_subjects = subject_list(relay.subjects)
    inbox_subjects = subject_list(inbox.subjects)
    for subject in inbox_subjects:
        for other in relay_subjects:
            if overlaps(subject, other):
                problems.append(
                    problem(
                        source, "$.inbox.subjects",
                        f"{subject!r} overlaps {other!r} of [relay] subjects: JetStream "
                        "refuses a second stream on subjects another stream captures",
                    )
                )  # fmt: skip
    streams = [("[relay] subjects", s) for s in relay_subjects]
    if not any(overlaps(s, relay.dlq_subject) for s in relay_subjects):
        streams.append(("the relay's DLQ stream", relay.dlq_subject))
        for subject in inbox_subjects:
            if overlaps(subject, relay.dlq_subject):
                problems.append(
                    problem(
                        source, "$.relay.dlq_subject",
                        f"{relay.dlq_subject!r} is captured by {subject!r} of [inbox] "
                        "subjects: the relay's DLQ stream cannot have it, and the inbox "
                        "would consume the dead letters",
                    )
                )  # fmt: skip
    streams += [("[inbox] subjects", s) for s in inbox_subjects]
    for owner, subject in streams:
        if overlaps(subject, dispatch.nats_subject):
            problems.append(
                problem(
                    source, "$.dispatch.nats_subject",
                    f"{dispatch.nats_subject!r} overlaps {subject!r} of {owner}: the stream "
                    "would store the commands and answer their requests",
                )
            )  # fmt: skip
            break
    problems += _erasure_problems(config, source, dlq_stream=dlq_stream)
    return problems


def _erasure_problems(config: TriageConfig, source: str, *, dlq_stream: str) -> list[ConfigProblem]:
    """Row 15 finds a patient's messages where the relay and the inbox put them: the
    patient's subjects on the relay's stream, and the streams whose subjects others
    name (the inbox's, the DLQ's) among those it reads whole."""
    relay, inbox, erasure = config.relay, config.inbox, config.erasure
    problems: list[ConfigProblem] = []
    if erasure.stream != relay.stream:
        problems.append(
            problem(
                source, "$.erasure.stream",
                f"{erasure.stream!r} is not the relay's stream {relay.stream!r}: a patient's "
                "events are published there, and purged from there",
            )
        )  # fmt: skip
    sample = f"{erasure.subject_prefix}.tenant.token.kind"
    if not any(overlaps(s, sample) for s in subject_list(relay.subjects)):
        problems.append(
            problem(
                source, "$.erasure.subject_prefix",
                f"{erasure.subject_prefix!r} is outside [relay] subjects: the relay would "
                "dead-letter a patient's events",
            )
        )  # fmt: skip
    wanted = [("[inbox] stream", inbox.stream)]
    if not any(overlaps(s, relay.dlq_subject) for s in subject_list(relay.subjects)):
        wanted.append(("the relay's DLQ stream", dlq_stream))
    for owner, stream in wanted:
        if stream not in erasure.scan_streams:
            problems.append(
                problem(
                    source, "$.erasure.scan_streams",
                    f"does not name {stream!r} ({owner}): its messages name patients on "
                    "subjects that do not, and an erasure would leave them",
                )
            )  # fmt: skip
    return problems


def _unreadable(path: str) -> str | None:
    try:
        with open(path, "rb"):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def _spool_problem(path: str) -> str | None:
    """Why the spool cannot be opened at ``path`` (created with its directories), or None."""
    spool = Path(path)
    if spool.is_dir():
        return "is a directory; the spool is a file"
    if spool.exists():
        return None if os.access(spool, os.R_OK | os.W_OK) else "cannot be read and written"
    for parent in spool.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"cannot be created: {str(parent)!r} is not a directory"
            return None
    return None


def path_problems(config: TriageConfig, source: str) -> list[ConfigProblem]:
    """Files the daemon opens that it could not: the spool, the vendors' key files, the
    log file's directory."""
    problems: list[ConfigProblem] = []
    spool = _spool_problem(config.spool.path)
    if spool is not None:
        problems.append(problem(source, "$.spool.path", f"the spool {config.spool.path!r} {spool}"))
    p = config.providers
    for path, file in (
        ("$.providers.fcm.service_account_file", p.fcm.service_account_file),
        ("$.providers.apns.key_file", p.apns.key_file),
    ):
        reason = _unreadable(file) if file is not None else None
        if reason is not None:
            problems.append(problem(source, path, f"cannot read {file!r}: {reason}"))
    log_file = config.daemon.log_file
    if log_file is not None:  # the JSON log lines' file (row 11's scanner reads it)
        folder = os.path.dirname(os.path.abspath(log_file))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            problems.append(
                problem(
                    source, "$.daemon.log_file",
                    f"cannot write {log_file!r}: {folder!r} is not a writable directory",
                )
            )  # fmt: skip
    return problems


def _unresolvable(host: str) -> str | None:
    try:
        socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        return str(exc.args[-1]) if exc.args else type(exc).__name__
    return None


def host_problems(config: TriageConfig, source: str) -> list[ConfigProblem]:
    """Addresses the daemon binds (``[daemon] host``; the emulators' when enabled) that do
    not resolve: the bind would fail after the services started."""
    hosts = [("$.daemon.host", config.daemon.host)]
    if config.emulators.enabled:
        hosts.append(("$.emulators.host", config.emulators.host))
    problems = []
    for path, host in hosts:
        reason = _unresolvable(host)
        if reason is not None:
            problems.append(problem(source, path, f"cannot bind {host!r}: {reason}"))
    return problems
