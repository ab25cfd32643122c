"""``triage tune what-if NEW.toml --recording FILE [--json]``: other thresholds, replayed.

The daemon records what its breakers and detectors were fed (``[recorder]``,
:mod:`engine.recorder`). This command replays a recording twice per run: once as
recorded (to check the replay reproduces what happened) and once with the
breaker profiles and detector rules of NEW (checked as ``triage check-config``
checks it), and prints, for every breaker and detector whose state changes
would differ, what happened beside what would have, with wall times::

    breaker sms:ghasi [breakers.sms_primary]: fail_max 5 -> 3
      happened  12:01:03.120  open       5 consecutive failures, last ProviderTimeout
      would     12:01:02.870  open       3 consecutive failures, last ProviderTimeout

A call the new breaker would have refused has no outcome; one the real breaker
refused that the new one admits is assumed to end as the next real call did
(counted and said). A detector whose ``kind`` or ``metric`` NEW changes is not
replayed (a restart rebuilds it). Exit 0 when nothing would change, 1 when
something would, 2 for an invalid NEW or an unreadable recording.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from config import ConfigError
from supervisors.cli_common import EXIT_INVALID, report

__all__ = ["EXIT_CHANGED", "EXIT_SAME", "add_parser", "what_if"]

EXIT_SAME = 0
EXIT_CHANGED = 1


@dataclass
class _Verdict:
    """One object of one run: its settings, then and in NEW, and both histories."""

    oid: int
    type: str
    name: str
    where: str  # its config section, or why it was not replayed
    changes: list[str]
    happened: list[Any] = field(default_factory=list)
    as_recorded: list[Any] = field(default_factory=list)
    would: list[Any] = field(default_factory=list)
    refused: int = 0
    assumed: int = 0
    replayed: bool = True

    @property
    def faithful(self) -> bool:
        from engine.replay import same_transitions

        return same_transitions(self.as_recorded, self.happened)

    @property
    def changed(self) -> bool:
        from engine.replay import same_transitions

        return self.replayed and not same_transitions(self.would, self.as_recorded)


def what_if(args: argparse.Namespace) -> int:
    from engine.replay import InputRecordingError, read_recording
    from supervisors.reload import load_checked  # the tree's checks: heavy

    try:
        new, catalog = load_checked(args.new, endpoints=False)
    except ConfigError as exc:
        return report(exc)
    try:
        recording = read_recording(args.recording)
    except InputRecordingError as exc:
        print(f"recording unreadable: {exc}", file=sys.stderr)
        return EXIT_INVALID
    runs = [(run, _judge(run, new, catalog)) for run in recording.runs]
    changed = sum(1 for _, verdicts in runs for v in verdicts if v.changed)
    if args.json:
        print(json.dumps(_as_json(recording, runs, changed), indent=2))
    else:
        _print(recording, runs, changed, args.new)
    return EXIT_CHANGED if changed else EXIT_SAME


def _judge(run: Any, new: Any, catalog: Any) -> list[_Verdict]:
    from config.schema import engine_kwargs
    from engine.replay import replay
    from supervisors.reload import detector_rule, detector_settings

    verdicts: dict[int, _Verdict] = {}
    settings: dict[int, dict[str, Any]] = {}
    for oid, description in sorted(run.objects.items()):
        kind = description.get("type")
        if kind not in ("breaker", "detector"):
            continue
        recorded = description["settings"]
        verdict = _Verdict(oid, kind, description["name"], "", [])
        verdicts[oid] = verdict
        if kind == "breaker":
            profile = description["profile"]
            section = new.breakers.get(profile)
            verdict.where = f"[breakers.{profile}]"
            if section is None:
                verdict.replayed = False
                verdict.where = f"[breakers.{profile}] is not in NEW (a restart keeps it)"
                continue
            wanted = recorded | engine_kwargs(section)
        else:
            row = description.get("row")
            verdict.where = (
                f"catalog row {row}" if row is not None else f"[detectors.{verdict.name}]"
            )
            rule = detector_rule(verdict.name, row, new, catalog)
            if rule is None:
                verdict.replayed = False
                verdict.where += " has no rule in NEW"
                continue
            if (
                rule.get("kind") != description["kind"]
                or rule.get("metric") != description["metric"]
            ):
                verdict.replayed = False
                verdict.where += (
                    f": kind/metric {description['kind']}/{description['metric']} ->"
                    f" {rule.get('kind')}/{rule.get('metric')} needs a restart, not replayed"
                )
                continue
            wanted = detector_settings(verdict.name, rule)
        settings[oid] = wanted
        verdict.changes = [
            f"{key} {recorded.get(key)!r} -> {value!r}"
            for key, value in wanted.items()
            if recorded.get(key) != value
        ]
    as_recorded = replay(run)
    would = replay(run, settings=settings)
    for oid, verdict in verdicts.items():
        verdict.happened = as_recorded.happened(oid)
        if oid in as_recorded.objects:
            verdict.as_recorded = as_recorded.objects[oid].transitions
        if verdict.replayed and oid in would.objects:
            replayed = would.objects[oid]
            verdict.would = replayed.transitions
            verdict.refused, verdict.assumed = replayed.refused, replayed.assumed
    return list(verdicts.values())


def _wall(run: Any, t: float) -> str:
    return datetime.fromtimestamp(run.wall_at(t), UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _print(recording: Any, runs: list[tuple[Any, list[_Verdict]]], changed: int, new: str) -> None:
    inputs = sum(len(run.records) for run, _ in runs)
    dropped = sum(run.dropped for run, _ in runs)
    print(
        f"recording {recording.path}: {len(runs)} run{'s' if len(runs) != 1 else ''},"
        f" {inputs:,} inputs, {dropped:,} dropped by a full buffer"
    )
    for segment, cut in recording.torn:
        print(f"  {segment}: a torn last frame of {cut} bytes ignored (a crash mid-write)")
    total = 0
    for number, (run, verdicts) in enumerate(runs, 1):
        total += len(verdicts)
        print(f"run {number} ({_wall(run, run.origin)} -> {_wall(run, run.end)} UTC)")
        for verdict in verdicts:
            if not verdict.replayed:
                print(f"  {verdict.type} {verdict.name}: {verdict.where}")
                continue
            if not verdict.faithful:
                print(
                    f"  warning: {verdict.type} {verdict.name}: replayed as recorded it does"
                    " not reproduce what happened (inputs dropped, or its start rotated"
                    " away): read its what-if as approximate"
                )
            if not verdict.changed:
                continue
            print(f"  {verdict.type} {verdict.name} {verdict.where}: {', '.join(verdict.changes)}")
            for label, history in (("happened", verdict.happened), ("would", verdict.would)):
                if not history:
                    print(f"    {label:<9} (no change of state)")
                for k, item in enumerate(history):
                    head = label if k == 0 else ""
                    print(f"    {head:<9} {_wall(run, item.t)}  {item.state:<12} {item.detail}")
            if verdict.refused or verdict.assumed:
                print(
                    f"    ({verdict.refused} admitted calls would have been refused;"
                    f" {verdict.assumed} refused calls admitted, their outcome assumed)"
                )
    print(
        f"{changed} of {total} breakers and detectors would have changed state otherwise"
        f" under {new}"
    )


def _as_json(
    recording: Any, runs: list[tuple[Any, list[_Verdict]]], changed: int
) -> dict[str, Any]:
    def history(run: Any, items: list[Any]) -> list[dict[str, Any]]:
        return [
            {"t": i.t, "wall": run.wall_at(i.t), "state": i.state, "detail": i.detail}
            for i in items
        ]

    return {
        "recording": str(recording.path),
        "torn": [{"segment": str(p), "bytes": n} for p, n in recording.torn],
        "changed": changed,
        "runs": [
            {
                "run": run.run,
                "start_wall": run.wall_at(run.origin),
                "end_wall": run.wall_at(run.end),
                "inputs": len(run.records),
                "dropped": run.dropped,
                "segments": [str(Path(p)) for p in run.segments],
                "objects": [
                    {
                        "type": v.type,
                        "name": v.name,
                        "where": v.where,
                        "replayed": v.replayed,
                        "changes": v.changes,
                        "changed": v.changed,
                        "faithful": v.faithful,
                        "happened": history(run, v.happened),
                        "would": history(run, v.would),
                        "refused": v.refused,
                        "assumed": v.assumed,
                    }
                    for v in verdicts
                ],
            }
            for run, verdicts in runs
        ],
    }


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``tune`` (verb ``what-if``) to the ``triage`` subcommands."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "tune", help="try other breaker and detector thresholds against a recording"
    )
    verbs = parser.add_subparsers(dest="tune_command", required=True, metavar="VERB")
    what = verbs.add_parser(
        "what-if",
        help="replay recorded inputs against NEW's thresholds; print what would change",
        description=__doc__.split("::")[0].strip() if __doc__ else None,
    )
    what.add_argument("new", metavar="NEW", help="the config file with the new thresholds")
    what.add_argument(
        "--recording",
        required=True,
        metavar="FILE",
        help="the [recorder] path (its rotated segments are read too), or one segment",
    )
    what.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    what.set_defaults(handler=what_if)
    return parser
