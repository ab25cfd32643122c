"""What is PHI (catalog row 11): the ``[phi]`` rules compiled once, and redaction.

:class:`PhiRules` is built from :class:`config.schema.PhiConfig` by :func:`phi_rules`
(one compilation per distinct section, cached) and answers three questions:

* :meth:`PhiRules.check_push` -- does this push payload carry PHI? The rules of the
  payload's template@version apply: the global ``fields`` / ``patterns`` and those
  of every ``[[phi.templates]]`` entry naming that template and version (or every
  version). A data key that is a PHI field (case-insensitive, with a non-empty value)
  or a body / subject / data value matching a PHI pattern is a :class:`PhiHit`.
* :meth:`PhiRules.find_value` / :meth:`PhiRules.find_text` -- is there PHI in a
  log line or a dead letter? Every rule applies there (global and every template's):
  a log line can carry any template's data.
* :meth:`PhiRules.redact_value` / :meth:`PhiRules.redact_text` /
  :meth:`PhiRules.redact_bytes` -- the same thing with every PHI value replaced by
  ``redaction``: a PHI field's value whole, a pattern's match. JSON stays JSON (it
  is walked, never edited as text), so a redacted dead letter can still be redriven.

A :class:`PhiHit` names its rule (``field:diagnosis``, ``pattern:ssn``,
``template:lab_result@3:field:result``...) and keeps a redacted excerpt: the text
around the find, ``excerpt_chars`` each side, with every PHI value in it replaced.
The PHI itself is never kept, logged or stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from config.schema import PhiConfig

__all__ = ["PhiHit", "PhiRules", "phi_rules"]


@dataclass(frozen=True, slots=True)
class PhiHit:
    """One find: the rule that matched, where (``data.<key>``, ``body``, ``$.a.b``...),
    and a redacted excerpt (never the PHI)."""

    rule: str
    where: str
    excerpt: str


@dataclass(frozen=True, slots=True)
class _Ruleset:
    fields: Mapping[str, str]  # lower-cased field -> rule name
    patterns: tuple[tuple[str, re.Pattern[str]], ...]  # (rule name, compiled)


def _ruleset(
    fields: Mapping[str, str], patterns: Iterable[tuple[str, re.Pattern[str]]]
) -> _Ruleset:
    # Patterns stay apart (never one alternation): each keeps its own flags and groups.
    return _Ruleset(dict(fields), tuple(patterns))


def _versions(versions: list[int]) -> list[int | None]:
    return [*versions] if versions else [None]  # None: every version


_MAX_DEPTH: Final = 32  # deeper JSON is redacted / scanned as text


class PhiRules:
    """The compiled ``[phi]`` rules; see the module docstring."""

    def __init__(self, config: PhiConfig) -> None:
        self.redaction = config.redaction
        self.excerpt_chars = config.excerpt_chars
        global_fields = {f.lower(): f"field:{f.lower()}" for f in config.fields}
        global_patterns = [(f"pattern:{n}", re.compile(p)) for n, p in config.patterns.items()]
        self._global = _ruleset(global_fields, global_patterns)
        # template -> version (None: every version) -> its own rules
        self._templates: dict[str, dict[int | None, _Ruleset]] = {}
        every_fields = dict(global_fields)
        every_patterns = list(global_patterns)
        for rule in config.templates:
            for version in _versions(rule.versions):
                at = f"{rule.template}@{'*' if version is None else version}"
                fields = {f.lower(): f"template:{at}:field:{f.lower()}" for f in rule.fields}
                patterns = [
                    (f"template:{at}:pattern:{n}", re.compile(p)) for n, p in rule.patterns.items()
                ]
                self._templates.setdefault(rule.template, {})[version] = _ruleset(fields, patterns)
                for name, field in fields.items():
                    every_fields.setdefault(name, field)
                every_patterns += patterns
        self._every = _ruleset(every_fields, every_patterns)
        self._per_version: dict[tuple[str, int], _Ruleset] = {}

    # -- which rules --------------------------------------------------------------------

    def rules_for(self, template: str, version: int) -> _Ruleset:
        """The rules of ``template@version``: global ones first, then the template's."""
        key = (template, version)
        cached = self._per_version.get(key)
        if cached is not None:
            return cached
        fields = dict(self._global.fields)
        patterns = list(self._global.patterns)
        own = self._templates.get(template, {})
        for entry in (own.get(None), own.get(version)):
            if entry is not None:
                fields.update(entry.fields)
                patterns += entry.patterns
        made = _ruleset(fields, patterns)
        if len(self._per_version) < 4096:  # bounded: template versions are few
            self._per_version[key] = made
        return made

    @property
    def fields(self) -> frozenset[str]:
        """Every PHI field name (lower-cased), of every rule."""
        return frozenset(self._every.fields)

    # -- the push guard -----------------------------------------------------------------

    def check_push(
        self,
        template: str,
        version: int,
        data: Mapping[str, str],
        body: str,
        subject: str | None,
    ) -> PhiHit | None:
        """The first PHI the push payload of ``template@version`` carries, or None."""
        rules = self.rules_for(template, version)
        for key, value in data.items():
            rule = rules.fields.get(key.lower())
            if rule is not None and value:
                return PhiHit(rule, f"data.{key}", f"{key}={self.redaction}")
        texts: list[tuple[str, str]] = [("body", body)]
        if subject is not None:
            texts.append(("subject", subject))
        texts += ((f"data.{k}", v) for k, v in data.items())
        for where, text in texts:
            hit = self._search(rules, text, where)
            if hit is not None:
                return hit
        return None

    # -- the scanner ------------------------------------------------------------------

    def find_text(self, text: str, where: str = "text") -> PhiHit | None:
        """The first PHI in ``text`` by any rule, or None."""
        return self._search(self._every, text, where)

    def find_value(self, value: Any, where: str = "$") -> PhiHit | None:
        """The first PHI in a decoded JSON value (keys that are PHI fields, strings that
        match a pattern), or None."""
        return self._find(value, where, 0)

    def _find(self, value: Any, where: str, depth: int) -> PhiHit | None:
        if isinstance(value, str):
            return self._search(self._every, value, where)
        if depth >= _MAX_DEPTH:
            return self.find_text(str(value), where)
        if isinstance(value, dict):
            for key, item in value.items():
                name = str(key)
                rule = self._every.fields.get(name.lower())
                if rule is not None and item not in (None, "", [], {}) and item != self.redaction:
                    return PhiHit(rule, f"{where}.{name}", f"{name}={self.redaction}")
                hit = self._find(item, f"{where}.{name}", depth + 1)
                if hit is not None:
                    return hit
        elif isinstance(value, list):
            for index, item in enumerate(value):
                hit = self._find(item, f"{where}[{index}]", depth + 1)
                if hit is not None:
                    return hit
        return None

    def _search(self, rules: _Ruleset, text: str, where: str) -> PhiHit | None:
        for name, pattern in rules.patterns:
            match = pattern.search(text)
            if match is not None:
                return PhiHit(name, where, self._excerpt(text, match.start(), match.end()))
        return None

    def _excerpt(self, text: str, start: int, end: int) -> str:
        """The text around ``text[start:end]``, the find and every other PHI in it redacted."""
        n = self.excerpt_chars
        # A PHI value cut by the window's edge could leak a part: redact each side whole,
        # then cut (the redaction marker never matches a pattern: the config checks).
        before = self.redact_text(text[max(0, start - 4 * n) : start])[-n:]
        after = self.redact_text(text[end : end + 4 * n])[:n]
        return f"{before}{self.redaction}{after}"

    # -- redaction --------------------------------------------------------------------

    def redact_text(self, text: str) -> str:
        """``text`` with every match of every pattern replaced by ``redaction``."""
        for _, pattern in self._every.patterns:
            text = pattern.sub(self.redaction, text)
        return text

    def redact_value(self, value: Any, depth: int = 0) -> Any:
        """A copy of a decoded JSON value with every PHI value replaced (a PHI field's
        value whole, a pattern's match in any string); other values as they are."""
        if isinstance(value, str):
            return self.redact_text(value)
        if depth >= _MAX_DEPTH:
            return self.redact_text(str(value))
        if isinstance(value, dict):
            fields = self._every.fields
            return {
                key: (
                    self.redaction
                    if str(key).lower() in fields and item not in (None, "", [], {})
                    else self.redact_value(item, depth + 1)
                )
                for key, item in value.items()
            }
        if isinstance(value, list):
            return [self.redact_value(item, depth + 1) for item in value]
        return value

    def redact_bytes(self, payload: bytes) -> bytes:
        """A dead letter's payload, redacted: JSON walked and re-encoded; other bytes as
        UTF-8 text (undecodable bytes kept as they are where no pattern matches)."""
        try:
            decoded = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            text = payload.decode("utf-8", errors="surrogateescape")
            redacted = self.redact_text(text)
            return payload if redacted == text else redacted.encode("utf-8", "surrogateescape")
        redacted_value = self.redact_value(decoded)
        return payload if redacted_value == decoded else msgspec.json.encode(redacted_value)


_COMPILED: dict[bytes, PhiRules] = {}


def phi_rules(config: PhiConfig) -> PhiRules:
    """The compiled rules of ``config``: compiled once per distinct section."""
    key = msgspec.json.encode(config)
    rules = _COMPILED.get(key)
    if rules is None:
        if len(_COMPILED) >= 64:  # tests build many configs; the daemon one or two
            _COMPILED.clear()
        rules = _COMPILED[key] = PhiRules(config)
    return rules
