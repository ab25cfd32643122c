"""The chaos report (``--report DIR``): a stand-in scenario with a real breaker and a
marked fault, recorded and rendered; the page's table covers the whole catalog."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

import config
from bench.chaos.__main__ import main
from bench.chaos.harness import ChaosContext, Ledger, Outcome, Scenario
from bench.chaos.timeline import Timeline, fault, recording
from config import engine_kwargs
from engine.breaker import Breaker
from engine.events import DetectorCleared, DetectorFired
from engine.runtime import open_runtime


async def _with_a_fault(ctx: ChaosContext) -> Outcome:
    ledger = Ledger()
    async with open_runtime(seed=1) as runtime:
        breaker = Breaker(
            "sms_primary", **engine_kwargs(ctx.config.breakers["sms_primary"]),
            clock=runtime.clock, events=runtime.events,
        )  # fmt: skip
        for n in range(20):
            ledger.accept(f"k{n}")
        await trio.sleep(0.05)
        with fault("gateway 503"):
            breaker.force_open("chaos")
            runtime.events.emit(DetectorFired(at=0.0, wall=0.0, detector="d", value=1.0,
                                              threshold=0.5, row=1))  # fmt: skip
            await trio.sleep(0.1)
            breaker.reset("recovered")
            runtime.events.emit(DetectorCleared(at=0.0, wall=0.0, detector="d", value=0.0,
                                                threshold=0.5, row=1))  # fmt: skip
        for n in range(20):
            ledger.settle(f"k{n}")
            ledger.receive(f"k{n}")
    return Outcome(detected=True, detect_s=0.1, mitigated=True, ledger=ledger)


def test_the_timeline_records_ledger_breakers_detectors_and_faults() -> None:
    async def go() -> Timeline:
        ctx = ChaosContext(config=config.load_config(config.default_path("chaos.toml")),
                           catalog=None, quick=True)  # type: ignore[arg-type]  # fmt: skip
        with recording(1) as timeline:
            await _with_a_fault(ctx)
        return timeline

    timeline = trio.run(go)
    assert [k for _, k, _ in timeline.ledger].count("accept") == 20
    assert [s for _, _, s in timeline.breakers] == ["forced-open", "closed"]
    assert [f for _, _, f in timeline.detectors] == [True, False]
    [(label, start, end)] = timeline.fault_windows()
    assert label == "gateway 503" and 0.04 < start < end
    assert len(timeline.latencies()) == 20 and all(d > 0.1 for _, d in timeline.latencies())


def test_the_report_renders_the_table_and_the_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report"
    assert main(["--all", "--report", str(report)], scenarios={1: Scenario(1, _with_a_fault)}) == 0
    page = (report / "index.html").read_text()
    assert page.count("<tr>") == 1 + 20  # the header and every catalog row
    assert '<td class="pass">PASS</td>' in page
    assert page.count("not run") == 19
    assert "gateway 503" in page and 'src="row-01.png"' in page
    image = (report / "row-01.png").read_bytes()
    assert image.startswith(b"\x89PNG") and len(image) > 10_000
    [row] = json.loads((report / "report.json").read_text())["scenarios"]
    assert (row["id"], row["passed"], row["accepted"], row["settled"]) == (1, True, 20, 20)
    err = capsys.readouterr().err
    assert "[1/1] row 1 SMS provider outage ..." in err and "[1/1] row 1 PASS in" in err


def test_ids_and_all_together_are_a_usage_error() -> None:
    with pytest.raises(SystemExit) as info:
        main(["1", "--all"], scenarios={})
    assert info.value.code == 2
