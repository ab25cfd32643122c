"""The chaos report: ``python -m bench.chaos --all --report DIR``.

``DIR/index.html`` holds the table of the twenty catalog rows (each scenario's
verdict, detection time, accepted/settled/lost/duplicates, notes; the rows without
a scenario say why) and, per scenario run, one figure ``DIR/row-NN.png`` of three
stacked plots on the scenario's own clock:

1. throughput: items accepted, settled and received per second (one-second bins);
2. latency: each key's settle time minus its accept time, where both were noted
   while the scenario ran (scenarios that judge afterwards, from the database,
   settle at the end: their points sit there);
3. breaker state per breaker (closed, half-open, open), with the moments the
   detectors fired (red) and cleared (green).

The fault windows the scenario marked (:func:`bench.chaos.timeline.fault`) are
shaded on all three. ``DIR/report.json`` is the same JSON as ``--json``. The page
is self-contained (no script, no outside asset) so it can be attached to a ticket.
"""

from __future__ import annotations

import html
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import msgspec

from bench.chaos.harness import ScenarioResult
from bench.chaos.timeline import BREAKER_LEVELS, Timeline
from config import Catalog

__all__ = ["plot_timeline", "write_report"]


def _bins(times: Sequence[float], duration: float) -> tuple[list[float], list[int]]:
    width = max(1, math.ceil(duration))
    counts = Counter(min(int(t), width - 1) for t in times)
    return [i + 0.5 for i in range(width)], [counts.get(i, 0) for i in range(width)]


def plot_timeline(timeline: Timeline, title: str, path: Path) -> None:
    """Write the scenario's three plots to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    duration = max(timeline.duration, 1.0)
    fig, (tp, lat, brk) = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    fig.suptitle(title)
    for ax in (tp, lat, brk):
        for label, start, end in timeline.fault_windows():
            ax.axvspan(start, end, color="tab:red", alpha=0.15, label=f"fault: {label}")
        ax.grid(alpha=0.3)
    by_kind: dict[str, list[float]] = defaultdict(list)
    for t, kind, _ in timeline.ledger:
        by_kind[kind].append(t)
    for kind, color in (("accept", "tab:blue"), ("settle", "tab:green"), ("receive", "tab:gray")):
        if by_kind[kind]:
            xs, ys = _bins(by_kind[kind], duration)
            tp.step(xs, ys, where="mid", color=color, label=f"{kind}ed/s".replace("eed", "ed"))
    tp.set_ylabel("items / s")
    latencies = timeline.latencies()
    if latencies:
        lat.scatter([t for t, _ in latencies], [d for _, d in latencies], s=4, color="tab:purple")
    lat.set_ylabel("settle - accept (s)")
    lat.ticklabel_format(axis="y", useOffset=False)
    lat.set_ylim(bottom=0)
    names = sorted({name for _, name, _ in timeline.breakers})
    for offset, name in enumerate(names):
        changes = [(t, BREAKER_LEVELS.get(s, 0)) for t, n, s in timeline.breakers if n == name]
        xs = [0.0] + [t for t, _ in changes] + [duration]
        ys = [0] + [lvl for _, lvl in changes] + [changes[-1][1]]
        brk.step(xs, [y + offset * 0.05 for y in ys], where="post", label=name)
    for t, _, firing in timeline.detectors:
        brk.axvline(t, color="tab:red" if firing else "tab:green", linestyle="--", alpha=0.7)
    brk.set_yticks([0, 1, 2], ["closed", "half-open", "open"])
    brk.set_ylabel("breakers")
    brk.set_xlabel("seconds since the scenario started")
    brk.set_xlim(0, duration)
    for ax in (tp, brk):
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            unique = dict(zip(labels, handles, strict=True))
            ax.legend(unique.values(), unique.keys(), loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
.pass { color: #137333; font-weight: bold; } .fail { color: #b3261e; font-weight: bold; }
.none { color: #777; } td.notes { max-width: 40em; font-size: 90%; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def _cell(text: object, cls: str = "") -> str:
    attr = f' class="{cls}"' if cls else ""
    return f"<td{attr}>{html.escape(str(text))}</td>"


def write_report(
    directory: Path,
    results: Sequence[ScenarioResult],
    timelines: Sequence[Timeline],
    catalog: Catalog,
    *,
    title: str = "Triage chaos report",
) -> Path:
    """Write ``index.html``, one PNG per recorded scenario and ``report.json``; answers
    the page's path."""
    directory.mkdir(parents=True, exist_ok=True)
    by_row = {r.id: r for r in results}
    recorded = {t.scenario: t for t in timelines}
    rows: list[str] = []
    for row in catalog.rows:
        result = by_row.get(row.id)
        if result is None:
            state = catalog.state(row)
            rows.append(
                "<tr>" + _cell(row.id) + _cell(row.name) + _cell("not run", "none")
                + "".join(_cell("") for _ in range(6)) + _cell(f"scenario {state}", "notes")
                + "</tr>"
            )  # fmt: skip
            continue
        verdict = ("PASS", "pass") if result.passed else ("FAIL", "fail")
        detect = "-" if result.detect_s is None else f"{result.detect_s:.2f} s"
        link = (
            f'<a href="#row-{row.id}">{html.escape(row.name)}</a>'
            if row.id in recorded
            else html.escape(row.name)
        )
        rows.append(
            "<tr>" + _cell(row.id) + f"<td>{link}</td>" + _cell(*verdict)
            + _cell(result.detected) + _cell(detect) + _cell(result.mitigated)
            + _cell(result.accepted) + _cell(result.settled)
            + _cell(f"{result.lost} / {result.duplicates}") + _cell(result.notes, "notes")
            + "</tr>"
        )  # fmt: skip
    figures: list[str] = []
    for t in timelines:
        result = by_row.get(t.scenario)
        name = result.name if result is not None else f"row {t.scenario}"
        image = f"row-{t.scenario:02d}.png"
        plot_timeline(t, f"#{t.scenario} {name}", directory / image)
        faults = (
            ", ".join(f"{label} {a:.1f}-{b:.1f} s" for label, a, b in t.fault_windows())
            or "none marked"
        )
        figures.append(
            f'<h2 id="row-{t.scenario}">#{t.scenario} {html.escape(name)}</h2>'
            f"<p>{t.duration:.1f} s; fault windows: {html.escape(faults)};"
            f" breaker changes: {len(t.breakers)}; detector events: {len(t.detectors)}</p>"
            f'<img src="{image}" alt="throughput, latency and breaker state of row'
            f' {t.scenario}">'
        )
    passed = sum(r.passed for r in results)
    header = (
        "<tr><th>row</th><th>failure</th><th>verdict</th><th>detected</th><th>detect</th>"
        "<th>mitigated</th><th>accepted</th><th>settled</th><th>lost / dup</th><th>notes</th></tr>"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{passed} of {len(results)} scenarios passed; {len(catalog.rows)} catalog rows.</p>"
        f"<table>{header}{''.join(rows)}</table>{''.join(figures)}</body></html>\n"
    )
    index = directory / "index.html"
    index.write_text(page, encoding="utf-8")
    report = {"scenarios": msgspec.to_builtins(list(results))}
    (directory / "report.json").write_bytes(msgspec.json.format(msgspec.json.encode(report)))
    return index
