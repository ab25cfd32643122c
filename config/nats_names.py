"""NATS names and subjects as the server takes them, so a config is refused before the
daemon asks JetStream for a stream it cannot have.

Names (streams, durable consumers)
    Not empty; no whitespace or control character; none of ``.`` ``*`` ``>``
    (a name is one token of the JetStream API's subjects) and no path separator
    ``/`` ``\\`` (the server stores a stream in a directory of its name); at most
    :data:`MAX_NAME_CHARS` characters.

Subjects
    Tokens separated by ``.``, none of them empty and none holding whitespace;
    ``*`` (one token) and ``>`` (one or more trailing tokens) are wildcards only
    as whole tokens, and ``>`` only last. A subject something is published on
    (``literal``) has no wildcard at all.

Overlap
    Two patterns overlap when one subject matches both (:func:`overlaps`): JetStream
    refuses a second stream whose subjects overlap another's, and a core-NATS request
    on a subject a stream captures is answered by the stream.

The ``subjects`` settings are comma-separated lists (:func:`subject_list`).
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "MAX_NAME_CHARS",
    "MIN_DUPLICATE_WINDOW_S",
    "name_problem",
    "overlaps",
    "queue_problem",
    "subject_list",
    "subject_problem",
    "subjects_problem",
]

#: The longest stream or consumer name JetStream takes (the server's ``JSMaxNameLen``).
MAX_NAME_CHARS: Final = 255
#: The shortest duplicate window JetStream takes for a stream (100 ms).
MIN_DUPLICATE_WINDOW_S: Final = 0.1

_NOT_IN_NAMES: Final = frozenset(".*>/\\")


def _unprintable(value: str) -> str | None:
    for char in value:
        if char.isspace():
            return "whitespace"
        if not char.isprintable():
            return f"the control character {char!r}"
    return None


def name_problem(value: str) -> str | None:
    """Why ``value`` cannot name a JetStream stream or consumer, or None."""
    if not value:
        return "must not be empty"
    bad = _unprintable(value)
    if bad is not None:
        return f"must not contain {bad}"
    found = sorted(_NOT_IN_NAMES.intersection(value))
    if found:
        return "must not contain " + " or ".join(repr(c) for c in found)
    if len(value) > MAX_NAME_CHARS:
        return f"must be at most {MAX_NAME_CHARS} characters, not {len(value)}"
    return None


def queue_problem(value: str) -> str | None:
    """Why ``value`` cannot name a queue group (one word of the protocol), or None."""
    if not value:
        return "must not be empty"
    bad = _unprintable(value)
    return f"must not contain {bad}" if bad is not None else None


def subject_problem(value: str, *, literal: bool = False) -> str | None:
    """Why ``value`` is not a NATS subject (with ``literal``: one to publish on), or None."""
    if not value:
        return "must not be empty"
    bad = _unprintable(value)
    if bad is not None:
        return f"must not contain {bad}"
    tokens = value.split(".")
    for index, token in enumerate(tokens):
        if not token:
            return "has an empty token (a leading, trailing or doubled '.')"
        if token in ("*", ">") and literal:
            return f"must be a plain subject to publish on, without the wildcard {token!r}"
        if token == ">" and index != len(tokens) - 1:
            return "'>' may only be the last token"
    return None


def subject_list(value: str) -> list[str]:
    """The subjects of a comma-separated ``subjects`` setting, each stripped."""
    return [part.strip() for part in value.split(",")]


def subjects_problem(value: str) -> str | None:
    """Why the comma-separated ``value`` is not a list of stream subjects, or None."""
    subjects = subject_list(value)
    for index, subject in enumerate(subjects):
        problem = subject_problem(subject) if subject else "must not be blank"
        if problem is None and subject == ">":
            problem = "would capture every subject (JetStream refuses such a stream)"
        if problem is not None:
            return f"subject {index + 1} ({subject!r}) {problem}" if len(subjects) > 1 else problem
    if len(set(subjects)) != len(subjects):
        return "a subject is listed twice"
    return None


def overlaps(first: str, second: str) -> bool:
    """Whether some subject matches both patterns (``*``: one token, ``>``: one or more)."""
    a, b = first.split("."), second.split(".")
    for index in range(min(len(a), len(b))):
        left, right = a[index], b[index]
        if left == ">" or right == ">":
            return True  # each side has a token here, and ">" takes it and all that follow
        if left != right and "*" not in (left, right):
            return False
    return len(a) == len(b)
