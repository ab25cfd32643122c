"""Catalog row 11, PHI in push: the pre-send guard's policy and the PII scanner.

**The guard** (:class:`PhiGuard`). The dispatch service asks it about every push
before the accept (:meth:`PhiGuard.check`: the ``[phi]`` rules of the payload's
template@version, :mod:`actors.phi_rules`). A hit is a **trip**
(:meth:`PhiGuard.trip`), which, before the refused dispatch is stored:

1. counts ``triage_phi_guard_hits_total{source="push_guard"}`` and feeds row 11's
   count-in-window detector (the page);
2. in ONE tenant transaction (:func:`providers.db.phi_incidents.trip_async`): halts
   the category for the tenant (``category_blocks`` ``disabled`` reason
   ``phi_guard``: every later dispatch of it is refused, ``CategoryDisabled``,
   until an operator runs ``triage category enable``), retires the template
   version (a dispatch naming it is refused :class:`~actors.templates.TemplateRetired`,
   with the reason ``phi_guard: <rule>``), and writes the incident (when, tenant,
   template@version, the rule, a redacted excerpt);
3. drops the registry's cached copies of the template and emits a
   :class:`PhiLeak` notice (severity ``page``) on the bus.

The service then stores the dispatch ``failed`` reason ``phi_guard`` and raises
:class:`~actors.dispatcher.PhiRefused` (422 ``phi_guard``): nothing is sent. If the
database refuses the trip, the request fails (503) with nothing stored and nothing
sent: the guard fails closed.

**The scanner** (:class:`PhiScanner`), an actor: every ``scan_interval_s`` it reads
what it has not read yet of the daemon's JSON log files (``[daemon] log_file`` and
``[phi] log_files``; at most ``scan_max_bytes`` per file per turn, whole lines only)
and of the dead letters (``scan_max_letters`` per turn, by id, as ``triage_relay``),
and looks for PHI with every rule. Log lines and dead letters are redacted before
they are written (:mod:`supervisors.logging`, :mod:`providers.db.dead_letters`), so
a find is something that got by: another writer, an old row. Each find is an
incident (``source`` ``log`` / ``dlq``; its ref is unique: ``log:<dev>:<inode>:<offset>``,
``dlq:<id>``), counted ``triage_phi_guard_hits_total{source=...}``, fed to row 11's
detector and paged (:class:`PhiLeak`) -- once, however often it is read again.

Where it got to (:class:`ScanMemory`: per file the device, inode and offset; the last
dead letter id) outlives the actor's restarts. A file whose inode changed (rotated)
or that shrank (truncated) is read again from its start. A turn whose finds cannot be
recorded (database down) keeps its place: the same bytes are read again next turn.

State machine (one log line per change)::

    IDLE --a find--> FOUND --a turn without one--> IDLE
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec
import trio
from prometheus_client import CollectorRegistry, Counter

from actors.phi_rules import PhiHit, PhiRules
from engine.actor import Actor, Timer
from engine.clock import Clock
from engine.detectors import CountInWindowDetector
from engine.errors import MailboxFull, ProviderError
from engine.events import EventBus, Notice
from engine.metrics import families
from engine.statelog import StateLog
from providers.db.phi_incidents import (
    Find,
    Trip,
    TripResult,
    dead_letters_after_async,
    record_finds_async,
    trip_async,
)

if TYPE_CHECKING:
    from actors.templates import TemplateRegistry
    from providers.db.pool import DbPool
    from providers.db.templates import TemplateRow

__all__ = [
    "ROW",
    "SCAN",
    "PhiGuard",
    "PhiLeak",
    "PhiScanner",
    "Scan",
    "ScanMemory",
    "ScannerState",
    "ScannerStatistics",
]

log = logging.getLogger("triage.phi_guard")

ROW = 11
SEVERITY = "page"  # row 11's severity in the catalog (config/failures.toml)


class PhiLeak(Notice, frozen=True, kw_only=True):
    """Row 11's page: PHI in a push payload (``push_guard``), a log line or a dead letter.

    Never carries the PHI: the rule, where, and the redacted excerpt."""

    source: str
    tenant: str | None
    rule: str
    location: str
    excerpt: str
    template: str | None = None
    version: int | None = None
    severity: str = SEVERITY
    row: int | None = ROW

    def alert_key(self) -> str:
        return f"phi_leak:{self.source}:{self.tenant or '-'}:{self.template or self.rule}"


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.hits = Counter(
            "triage_phi_guard_hits",
            "Push payloads stopped by the pre-send PHI guard or log scanner",
            ["source"],
            registry=registry,
        )


class _Signal:
    """What a guard trip and a scanner find share: count, feed the detector, page."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        events: EventBus | None,
        clock: Clock | None,
        detector: CountInWindowDetector | None,
        severity: str,
    ) -> None:
        self._metrics = families(registry, _Metrics) if registry is not None else None
        self.events = events
        self.clock = clock if clock is not None else Clock()
        self.detector = detector
        self.severity = severity

    def count(self, source: str) -> None:
        if self._metrics is not None:
            self._metrics.hits.labels(source).inc()
        if self.detector is not None:
            self.detector.observe()

    def page(self, leak: PhiLeak) -> None:
        if self.events is not None:
            self.events.emit(leak)

    def leak(
        self,
        source: str,
        tenant: str | None,
        rule: str,
        location: str,
        excerpt: str,
        template: str | None = None,
        version: int | None = None,
    ) -> PhiLeak:
        return PhiLeak(
            at=trio.current_time(), wall=self.clock.wall(), source=source, tenant=tenant,
            rule=rule, location=location, excerpt=excerpt, template=template,
            version=version, severity=self.severity, row=ROW,
        )  # fmt: skip


# -- the guard -------------------------------------------------------------------------


class PhiGuard:
    """The push pre-send guard's policy; see the module docstring."""

    def __init__(
        self,
        db: DbPool,
        rules: PhiRules,
        *,
        detector: CountInWindowDetector | None = None,
        registry: CollectorRegistry | None = None,
        events: EventBus | None = None,
        clock: Clock | None = None,
        severity: str = SEVERITY,
    ) -> None:
        self.db = db
        self.rules = rules
        self._signal = _Signal(registry, events, clock, detector, severity)
        self.trips = 0

    def check(
        self, template: TemplateRow, data: Mapping[str, str], body: str, subject: str | None
    ) -> PhiHit | None:
        """The PHI this push payload of ``template`` carries (its version's rules), or None."""
        return self.rules.check_push(template.name, template.version, data, body, subject)

    async def trip(
        self,
        hit: PhiHit,
        *,
        tenant_id: str,
        dispatch_id: str,
        channel: str,
        template: TemplateRow,
        templates: TemplateRegistry | None = None,
    ) -> TripResult:
        """Count and page, then halt the category, retire the version and write the
        incident (one transaction); drop the registry's cached copies."""
        self.trips += 1
        self._signal.count("push_guard")
        trip = Trip(
            tenant_id=tenant_id, dispatch_id=dispatch_id, channel=channel,
            category=template.category, template=template.name, version=template.version,
            rule=hit.rule, location=hit.where, excerpt=hit.excerpt,
        )  # fmt: skip
        try:
            result = await self.db.run_unit(trip_async, trip)
        finally:
            self._signal.page(
                self._signal.leak(
                    "push_guard",
                    tenant_id,
                    hit.rule,
                    hit.where,
                    hit.excerpt,
                    template.name,
                    template.version,
                )
            )
        if templates is not None:
            templates.invalidate(tenant_id, template.name)
        log.warning(
            "PHI in a push payload: category halted, template version retired, incident open",
            extra={
                "tenant": tenant_id, "dispatch_id": dispatch_id, "template": template.name,
                "version": template.version, "category": template.category, "rule": hit.rule,
                "where": hit.where, "excerpt": hit.excerpt, "incident": result.incident_id,
            },
        )  # fmt: skip
        return result


# -- the scanner -----------------------------------------------------------------------


class Scan(msgspec.Struct, frozen=True, tag=True):
    """Scan what is new (the timer's tick)."""


SCAN = Scan()

ScannerMessage = Scan


class ScannerState(enum.Enum):
    IDLE = "idle"
    FOUND = "found"


@dataclass(frozen=True, slots=True)
class _FilePlace:
    device: int
    inode: int
    offset: int


@dataclass
class ScanMemory:
    """Where the scanner got to; one per child, handed to every incarnation."""

    files: dict[str, _FilePlace] = field(default_factory=dict)
    last_letter_id: int = 0
    turns: int = 0
    lines: int = 0
    bytes_read: int = 0
    letters: int = 0
    finds: int = 0
    new_finds: int = 0
    errors: int = 0
    rotations: int = 0


class ScannerStatistics(msgspec.Struct, frozen=True, kw_only=True):
    state: ScannerState
    turns: int
    lines: int
    bytes_read: int
    letters: int
    finds: int
    new_finds: int
    errors: int
    rotations: int
    last_letter_id: int


def _tenant_of(entry: object) -> str | None:
    value = entry.get("tenant") if isinstance(entry, dict) else None
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _read_new(
    path: str, place: _FilePlace | None, max_bytes: int, rules: PhiRules
) -> tuple[_FilePlace | None, list[Find], int, int, bool]:
    """Worker thread: the complete lines of ``path`` after ``place`` (at most ``max_bytes``).

    Returns the new place, the finds, lines and bytes read, and whether the file was
    rotated or truncated (read again from its start)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return place, [], 0, 0, False
    offset = 0
    rotated = False
    if place is not None:
        if (place.device, place.inode) == (
            stat.st_dev,
            stat.st_ino,
        ) and stat.st_size >= place.offset:
            offset = place.offset
        else:
            rotated = True
    with open(path, "rb") as file:
        file.seek(offset)
        chunk = file.read(max_bytes)
    end = chunk.rfind(b"\n") + 1
    if end == 0 and len(chunk) == max_bytes:
        end = len(chunk)  # one line longer than a turn's budget: scanned as it is
    finds: list[Find] = []
    lines = 0
    start = 0
    while start < end:
        stop = chunk.find(b"\n", start, end)
        stop = end if stop < 0 else stop
        line = chunk[start:stop]
        at = offset + start
        start = stop + 1
        if not line.strip():
            continue
        lines += 1
        try:
            entry = msgspec.json.decode(line)
        except msgspec.DecodeError:
            entry = None
            hit = rules.find_text(line.decode("utf-8", errors="replace"), "line")
        else:
            hit = rules.find_value(entry)
        if hit is not None:
            finds.append(
                Find(
                    source="log",
                    ref=f"log:{stat.st_dev}:{stat.st_ino}:{at}",
                    tenant_id=_tenant_of(entry),
                    rule=hit.rule,
                    location=f"{path}@{at} {hit.where}",
                    excerpt=hit.excerpt,
                )
            )
    new_place = _FilePlace(stat.st_dev, stat.st_ino, offset + end)
    return new_place, finds, lines, end, rotated


class PhiScanner(Actor[ScannerMessage]):
    """The periodic PII scanner of logs and dead letters; see the module docstring."""

    name = "phi_scanner"

    def __init__(
        self,
        db: DbPool | None,
        rules: PhiRules,
        *,
        memory: ScanMemory,
        log_files: Sequence[str],
        interval_s: float,
        max_bytes: int,
        max_letters: int,
        scan_dead_letters: bool,
        detector: CountInWindowDetector | None = None,
        registry: CollectorRegistry | None = None,
        events: EventBus | None = None,
        clock: Clock | None = None,
        severity: str = SEVERITY,
    ) -> None:
        if not interval_s > 0 or max_bytes < 1 or max_letters < 1:
            raise ValueError("interval_s must be > 0, max_bytes and max_letters >= 1")
        self.db = db
        self.rules = rules
        self.memory = memory
        self.log_files = tuple(dict.fromkeys(log_files))
        self.interval_s = interval_s
        self.max_bytes = max_bytes
        self.max_letters = max_letters
        self.scan_dead_letters = scan_dead_letters and db is not None
        self._signal = _Signal(registry, events, clock, detector, severity)
        self.states = StateLog("phi scanner", ScannerState.IDLE, log, warn={ScannerState.FOUND})

    async def init(self) -> None:
        with contextlib.suppress(MailboxFull):  # the first turn at once
            self.ref.tell_nowait(SCAN)

    def timers(self) -> Sequence[Timer]:
        return [Timer(self.interval_s, SCAN)]

    def statistics(self) -> ScannerStatistics:
        m = self.memory
        return ScannerStatistics(
            state=self.states.state, turns=m.turns, lines=m.lines, bytes_read=m.bytes_read,
            letters=m.letters, finds=m.finds, new_finds=m.new_finds, errors=m.errors,
            rotations=m.rotations, last_letter_id=m.last_letter_id,
        )  # fmt: skip

    async def handle(self, message: ScannerMessage) -> None:
        match message:
            case Scan():
                await self._turn()

    async def _turn(self) -> None:
        m = self.memory
        m.turns += 1
        finds: list[Find] = []
        places: dict[str, _FilePlace] = {}
        for path in self.log_files:
            try:
                place, found, lines, read, rotated = await trio.to_thread.run_sync(
                    _read_new, path, m.files.get(path), self.max_bytes, self.rules
                )
            except OSError as exc:
                m.errors += 1
                log.warning(
                    "cannot read a log file to scan", extra={"path": path, "error": str(exc)}
                )
                continue
            if place is not None:
                places[path] = place
            finds += found
            m.lines += lines
            m.bytes_read += read
            m.rotations += int(rotated)
        last_letter = m.last_letter_id
        if self.scan_dead_letters and self.db is not None:
            try:
                letters = await self.db.run_unit(
                    dead_letters_after_async, m.last_letter_id, self.max_letters
                )
            except ProviderError as exc:
                m.errors += 1
                log.warning("cannot read the dead letters to scan", extra={"error": str(exc)})
                letters = []
            for letter in letters:
                last_letter = max(last_letter, letter.id)
                m.letters += 1
                hit = self._find_letter(letter.payload, letter.error)
                if hit is not None:
                    finds.append(
                        Find(
                            source="dlq",
                            ref=f"dlq:{letter.id}",
                            tenant_id=letter.tenant_id,
                            rule=hit.rule,
                            location=f"dead_letters.{letter.id} {hit.where}",
                            excerpt=hit.excerpt,
                        )
                    )
        new: set[tuple[str, str]] = set()
        if finds:
            if self.db is None:
                new = {(f.source, f.ref) for f in finds}
            else:
                try:
                    new = set(await self.db.run_unit(record_finds_async, finds))
                except ProviderError as exc:  # keep the place: read again next turn
                    m.errors += 1
                    log.warning("cannot record PHI finds", extra={"error": str(exc)})
                    return
        m.files.update(places)
        m.last_letter_id = last_letter
        m.finds += len(finds)
        for find in finds:
            if (find.source, find.ref) not in new:
                continue  # recorded (and paged) before
            m.new_finds += 1
            self._signal.count(find.source)
            self._signal.page(
                self._signal.leak(
                    find.source, find.tenant_id, find.rule, find.location, find.excerpt
                )
            )
            log.warning(
                "PHI found by the scanner",
                extra={"source": find.source, "where": find.location, "rule": find.rule,
                       "excerpt": find.excerpt},
            )  # fmt: skip
        if new:
            self.states.enter(ScannerState.FOUND, f"{len(new)} new finds")
        else:
            self.states.enter(ScannerState.IDLE, "nothing new")

    def _find_letter(self, payload: bytes, error: str) -> PhiHit | None:
        try:
            decoded = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            hit = self.rules.find_text(payload.decode("utf-8", errors="replace"), "payload")
        else:
            hit = self.rules.find_value(decoded, "payload")
        return hit if hit is not None else self.rules.find_text(error, "error")
