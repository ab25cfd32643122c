"""The HTTP/1.1 client suite runs end to end (tiny size: that it runs, not its speed)."""

from __future__ import annotations

from bench.perf import http1


def test_http1_suite_compares_both_clients_without_failures() -> None:
    cpu, rate = http1.run_suite(256, repeat=1)
    assert (cpu.name, cpu.unit, rate.name) == ("http1_client_cpu", "us/request", "http1_rate")
    assert cpu.details["failures"] == 0
    assert cpu.value > 0 and cpu.baseline_value > 0
    assert rate.value > 0 and rate.baseline_value > 0
    assert len(cpu.samples) == len(cpu.baseline_samples) == 1
