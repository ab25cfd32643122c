"""NATS names and subjects as JetStream takes them, and subject overlap, against brute force."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config.nats_names import (
    MAX_NAME_CHARS,
    name_problem,
    overlaps,
    queue_problem,
    subject_problem,
    subjects_problem,
)
from providers.jetstream import subject_matches

# What the embedded nats-server (2.10) answered when asked to create each of these (a
# stream, and a durable consumer of the same name); names it took come back None here.


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("TRIAGE_EVENTS", None),
        ("triage-inbox", None),
        ("é:x", None),
        ("x" * MAX_NAME_CHARS, None),
        ("", "must not be empty"),
        ("A B", "must not contain whitespace"),
        ("A\tB", "must not contain whitespace"),
        (" ", "must not contain whitespace"),
        ("A.B", "must not contain '.'"),
        ("A*", "must not contain '*'"),
        ("A>", "must not contain '>'"),
        ("A/B", "must not contain '/'"),
        ("A\\B", "must not contain '\\\\'"),
        ("A\x01B", "must not contain the control character '\\x01'"),
        ("x" * (MAX_NAME_CHARS + 1), "must be at most 255 characters, not 256"),
    ],
)
def test_stream_and_durable_names(name: str, problem: str | None) -> None:
    assert name_problem(name) == problem


@pytest.mark.parametrize(
    ("subject", "literal", "problem"),
    [
        ("triage.events.>", False, None),
        ("triage.*.x", False, None),
        ("a*.b>", False, None),  # a wildcard only as a whole token: these are literal tokens
        ("triage.dlq.outbox", True, None),
        ("triage.>.x", False, "'>' may only be the last token"),
        ("", False, "must not be empty"),
        ("triage..x", False, "has an empty token (a leading, trailing or doubled '.')"),
        (".triage", False, "has an empty token (a leading, trailing or doubled '.')"),
        ("triage.", False, "has an empty token (a leading, trailing or doubled '.')"),
        ("triage. x", False, "must not contain whitespace"),
        ("triage.dlq.*", True, "must be a plain subject to publish on, without the wildcard '*'"),
        ("triage.>", True, "must be a plain subject to publish on, without the wildcard '>'"),
    ],
)
def test_subjects(subject: str, literal: bool, problem: str | None) -> None:
    assert subject_problem(subject, literal=literal) == problem


@pytest.mark.parametrize(
    ("subjects", "problem"),
    [
        ("triage.events.>", None),
        ("a.>, b.>", None),
        (" ", "must not be blank"),
        ("a.>,", "subject 2 ('') must not be blank"),
        ("a.>, b..c", "subject 2 ('b..c') has an empty token (a leading, trailing or doubled '.')"),
        (">", "would capture every subject (JetStream refuses such a stream)"),
        ("a.>, a.>", "a subject is listed twice"),
    ],
)
def test_subject_lists(subjects: str, problem: str | None) -> None:
    assert subjects_problem(subjects) == problem


def test_queue_groups_take_dots_but_no_whitespace() -> None:
    assert queue_problem("triage.dispatch") is None
    assert queue_problem("triage dispatch") == "must not contain whitespace"
    assert queue_problem("") == "must not be empty"


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("triage.events.>", "triage.scheduling.>", False),
        ("triage.events.>", "triage.events.x", True),
        ("triage.events.>", "triage.events", False),  # '>' needs one token at least
        ("triage.*", "triage.events.x", False),
        ("triage.*.x", "triage.events.*", True),
        (">", "anything.at.all", True),
        ("a.b", "a.b", True),
        ("a.b", "a.c", False),
    ],
)
def test_overlap_examples(first: str, second: str, expected: bool) -> None:
    assert overlaps(first, second) is expected
    assert overlaps(second, first) is expected


TOKENS = st.sampled_from(["a", "b", "*", ">"])
#: Every concrete subject of one to four tokens over a, b, c: a witness of an overlap of
#: two patterns of at most three tokens, if there is one, is among them (a wildcard is
#: matched by c, or by the other side's literal; '>' by one more token).
SUBJECTS = [".".join(t) for n in range(1, 5) for t in itertools.product("abc", repeat=n)]


@st.composite
def patterns(draw: st.DrawFn) -> str:
    tokens = draw(st.lists(TOKENS, min_size=1, max_size=3))
    if ">" in tokens:  # only as the last token
        tokens = [*tokens[: tokens.index(">")], ">"]
    return ".".join(tokens)


@settings(max_examples=300, deadline=None)
@given(patterns(), patterns())
def test_overlap_is_a_common_matching_subject(first: str, second: str) -> None:
    witness = any(subject_matches(first, s) and subject_matches(second, s) for s in SUBJECTS)
    assert overlaps(first, second) is witness
