"""The [phi] rules (catalog row 11): per template@version, redaction, excerpts, and config checks."""

from __future__ import annotations

import msgspec
import pytest

from actors.phi_rules import phi_rules
from config.schema import PhiConfig, PhiTemplateRule

CONFIG = PhiConfig(
    fields=["diagnosis"],
    patterns={"ssn": r"\b\d{3}-\d{2}-\d{4}\b"},
    templates=[
        PhiTemplateRule(template="lab", versions=[3], fields=["result"]),
        PhiTemplateRule(template="clinic", patterns={"hiv": r"(?i)\bHIV\b"}),
    ],
)
RULES = phi_rules(CONFIG)


def test_a_template_rule_holds_for_its_versions_only() -> None:
    hit = RULES.check_push("lab", 3, {"result": "positive"}, "Your result is ready", None)
    assert hit is not None and (hit.rule, hit.where) == (
        "template:lab@3:field:result",
        "data.result",
    )
    assert "positive" not in hit.excerpt
    assert RULES.check_push("lab", 2, {"result": "positive"}, "Your result is ready", None) is None
    # A rule without versions holds for every version; global rules for every template.
    assert RULES.check_push("clinic", 7, {}, "Your hiv clinic visit", None) is not None
    assert RULES.check_push("lab", 2, {}, "hiv", None) is None
    global_hit = RULES.check_push("lab", 1, {"Diagnosis": "flu"}, "x", None)
    assert global_hit is not None and global_hit.rule == "field:diagnosis"
    # An empty PHI field carries nothing.
    assert RULES.check_push("lab", 1, {"diagnosis": ""}, "x", None) is None


def test_patterns_look_at_subject_and_data_values_and_the_excerpt_is_redacted() -> None:
    hit = RULES.check_push("x", 1, {"note": "ssn 123-45-6789 on file"}, "body", "s")
    assert hit is not None and (hit.rule, hit.where) == ("pattern:ssn", "data.note")
    assert hit.excerpt == "ssn [redacted] on file"
    subject = RULES.check_push("x", 1, {}, "body", "re 555-12-3456")
    assert subject is not None and subject.where == "subject"
    # Another PHI value near the find is redacted in the excerpt too.
    near = RULES.find_text("a 111-22-3333 and hiv and 444-55-6666 b")
    assert near is not None
    assert "3333" not in near.excerpt and "6666" not in near.excerpt and "hiv" not in near.excerpt


def test_redaction_replaces_field_values_and_matches_and_keeps_json() -> None:
    value = {"msg": "patient 123-45-6789", "extra": {"Diagnosis": "flu", "n": 1}, "l": ["HIV"]}
    assert RULES.redact_value(value) == {
        "msg": "patient [redacted]",
        "extra": {"Diagnosis": "[redacted]", "n": 1},
        "l": ["[redacted]"],
    }
    payload = msgspec.json.encode({"diagnosis": "flu", "ok": "fine"})
    assert msgspec.json.decode(RULES.redact_bytes(payload)) == {
        "diagnosis": "[redacted]",
        "ok": "fine",
    }
    assert RULES.redact_bytes(b"not json 123-45-6789") == b"not json [redacted]"
    assert RULES.redact_bytes(b'{"clean": 1}') == b'{"clean": 1}'  # untouched when clean
    # Redacted output is never a find again.
    assert RULES.find_value(RULES.redact_value(value)) is None


def test_find_value_names_where() -> None:
    hit = RULES.find_value({"a": {"b": ["x", "id 123-45-6789"]}})
    assert hit is not None and hit.where == "$.a.b[1]" and hit.rule == "pattern:ssn"
    field = RULES.find_value({"extra": {"diagnosis": "flu"}})
    assert field is not None and field.where == "$.extra.diagnosis"


def test_rules_are_compiled_once_per_section() -> None:
    assert phi_rules(CONFIG) is RULES
    assert phi_rules(msgspec.structs.replace(CONFIG, excerpt_chars=5)) is not RULES


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PhiConfig(patterns={"bad": "("}), "patterns.bad: not a regular expression"),
        (lambda: PhiConfig(fields=["mrn", "MRN"]), "fields: a field is listed twice"),
        (
            lambda: PhiConfig(patterns={"red": "redact"}),
            "redaction: '[redacted]' matches pattern 'red'",
        ),
        (
            lambda: PhiConfig(
                templates=[
                    PhiTemplateRule(template="t", versions=[1], fields=["a"]),
                    PhiTemplateRule(template="t", versions=[1, 2], fields=["b"]),
                ]
            ),
            "templates[1]: 't' version 1 has rules already",
        ),
        (lambda: PhiTemplateRule(template="t"), "a template rule needs fields or patterns"),
    ],
)
def test_the_config_refuses(build: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        build()  # type: ignore[operator]
